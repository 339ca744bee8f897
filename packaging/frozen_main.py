"""The entry script of the frozen app (PyInstaller runs this file as ``__main__``).

One executable plays three parts, chosen by the first argument:

- ``qlora-studio [CONFIG.yaml]``: the window (``app.main.main``);
- ``qlora-studio --engine ARGS...``: the engine, exactly as ``qlora-engine ARGS...``. A frozen
  app has no ``python`` to run ``python -m qlora_engine``, so ``app/run_worker.py`` launches
  its own executable with ``--engine`` in front when ``sys.frozen`` is set, and
  ``app.main.main`` hands those arguments to ``qlora_engine.cli.main``;
- ``qlora-studio --smoke-test [...]``: the self-test in ``frozen_smoke.py`` that
  ``packaging/build.sh`` runs on every build (a user can run it too, to check an install).

Nothing here is needed by the wheel: ``pip install`` users get the two console scripts.
"""

from __future__ import annotations

import multiprocessing
import os
import sys


def _give_missing_streams_a_sink() -> None:
    """A GUI-subsystem executable on Windows (console=False) may start with no stdout/stderr.

    Python then sets ``sys.stdout``/``sys.stderr`` to None and the first library that prints
    (tqdm progress bars, warnings, logging's last-resort handler) raises AttributeError. When
    the engine runs as the app's child its pipes are inherited, so the streams exist and this
    changes nothing.
    """
    for name in ("stdout", "stderr"):
        if getattr(sys, name) is None:
            setattr(sys, name, open(os.devnull, "w", encoding="utf-8"))  # noqa: SIM115 (lives as long as the process)


def main() -> int:
    # A child started by multiprocessing's spawn method (the default on Windows and macOS;
    # a DataLoader with workers, datasets.map(num_proc=...)) re-runs this executable with
    # special arguments: freeze_support() runs the child's work and exits before we parse argv.
    multiprocessing.freeze_support()
    _give_missing_streams_a_sink()
    argv = sys.argv[1:]
    if argv[:1] == ["--smoke-test"]:
        from frozen_smoke import main as smoke_main

        return smoke_main(argv[1:])
    from app.main import main as app_main

    return app_main(argv)


if __name__ == "__main__":
    raise SystemExit(main())
