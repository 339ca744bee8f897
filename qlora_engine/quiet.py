"""Third-party warnings, caught: a user should read only what we say, and what matters.

The libraries under the engine talk on their own: bitsandbytes logs that an optional CPU kernel
from the kernels hub is not there, transformers logs notes about GGUF loading and draws
progress bars, torch and others raise ``FutureWarning`` and ``UserWarning`` about their own
internals. None of that is something our user can act on, and mixed into our output it hides
what is. :func:`capture` (installed by the commands that load models) collects all of it:

- warnings raised from code outside the engine and the app, and log records of the libraries'
  loggers, are kept, not printed; ``--verbose`` prints them as they come, as before;
- :meth:`Captured.write` puts them into the run's ``third_party.log``;
- :meth:`Captured.summary` is one line in our words, only for what we do not already know to be
  harmless (those known notices are listed in :data:`KNOWN`, each with the reason).

Things the engine can simply avoid, it avoids where the cause is (a paged optimizer on a CPU is
not built, see :mod:`optim`).
"""

from __future__ import annotations

import importlib.util
import logging
import os
import re
import threading
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

LIBRARY_LOGGERS = (
    "bitsandbytes",
    "transformers",
    "peft",
    "accelerate",
    "torch",
    "huggingface_hub",
    "kernels",
    "datasets",
    "safetensors",
    "gguf",
    "tokenizers",
    "filelock",
    "urllib3",
)

_OURS = tuple(str(Path(__file__).resolve().parent.parent / d) + os.sep for d in ("qlora_engine", "app"))

KNOWN: tuple[tuple[str, str], ...] = (
    (
        r"gemm_4bit_forward from kernels-community",
        "bitsandbytes looks for an optional fused CPU kernel on the kernels hub; without it (the engine never "
        "downloads code) its built-in CPU path computes the same result.",
    ),
    (
        r"Loading a GGUF checkpoint with its weights packed",
        "transformers' advice for running a GGUF model as is; the engine dequantizes the GGUF once into a cached "
        "16-bit copy and quantizes that to NF4, so the advice does not apply.",
    ),
    (
        r"publisher trust check for 'kernels-community",
        "the kernels library notes that it checks nothing while offline; the engine loads no kernel from the hub.",
    ),
    (
        r"`is_gradient_checkpointing` is deprecated",
        "transformers renamed a property that peft still reads; nothing changes for this run.",
    ),
    (
        r"context_fn is passed to torch.utils.checkpoint under torch.compile",
        "train.compile marks every operation of a checkpointed layer to be recomputed (so the layer keeps only its "
        "input, as without compiling); torch reminds that this must not meet in-place operations, and the layers "
        "compiled here are checked to give the eager losses and gradients.",
    ),
    (
        r"Paged optimizers are not supported on CPU",
        "bitsandbytes falls back to a plain optimizer on the CPU; the engine builds the plain one there itself.",
    ),
)
"""Notices known to be harmless here: (pattern, why it does not matter). Kept in the log, not summarized."""


@dataclass
class Notice:
    source: str
    level: str
    text: str
    when: float = field(default_factory=time.time)

    @property
    def known(self) -> str | None:
        """Why this notice is harmless, if it is a known one."""
        return next((why for pattern, why in KNOWN if re.search(pattern, self.text)), None)


class _Handler(logging.Handler):
    def __init__(self, captured: Captured) -> None:
        super().__init__(level=logging.WARNING)
        self.captured = captured

    def emit(self, record: logging.LogRecord) -> None:
        try:
            text = record.getMessage()
        except Exception:  # a library's bad format string must not break the run
            text = str(record.msg)
        self.captured.add(Notice(record.name, record.levelname.lower(), text))


class Captured:
    """Third-party notices collected while a command runs."""

    def __init__(self) -> None:
        self.notices: list[Notice] = []
        self._lock = threading.Lock()

    def add(self, notice: Notice) -> None:
        with self._lock:
            self.notices.append(notice)

    def unknown(self) -> list[Notice]:
        return [n for n in self.notices if n.known is None]

    def write(self, path: Path) -> Path | None:
        """Append the notices to ``path`` (the run's ``third_party.log``); None if there were none."""
        if not self.notices:
            return None
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "a", encoding="utf-8") as f:
            for n in self.notices:
                stamp = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(n.when))
                f.write(f"{stamp} {n.level} [{n.source}] {n.text}\n")
                if n.known:
                    f.write(f"    (QLoRA Studio: {n.known})\n")
        return path

    def summary(self, log_file: Path | None) -> str | None:
        """One line about the notices we do not know to be harmless, or None if there are none."""
        unknown = self.unknown()
        if not unknown:
            return None
        sources = ", ".join(sorted({n.source.split(".")[0] for n in unknown}))
        where = f"written to {log_file}" if log_file else "not shown"
        return (
            f"note: {len(unknown)} warning{'s' if len(unknown) != 1 else ''} from the libraries underneath "
            f"({sources}) {where}; none stopped the run. --verbose prints them as they come."
        )


_active: Captured | None = None


def capture(verbose: bool = False) -> Captured:
    """Start catching third-party warnings and log records (idempotent). ``verbose``: let them through.

    Call before the libraries are imported: some talk at import time (bitsandbytes does), and
    progress bars are switched off by an environment variable read then.
    """
    global _active
    if _active is not None:
        return _active
    _active = captured = Captured()
    if verbose:
        return captured
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")  # transformers' and the hub's tqdm bars
    handler = _Handler(captured)
    for name in LIBRARY_LOGGERS:
        lg = logging.getLogger(name)
        lg.addHandler(handler)
        lg.propagate = False  # not to the root logger's last-resort printing
    _quiet_transformers_handler()
    _quiet_torch_handlers(handler)
    shown = warnings.showwarning

    def showwarning(message, category, filename, lineno, file=None, line=None):  # noqa: ANN001
        # Our own warnings pass; a deprecation notice is about a library's API even where our call
        # triggers it, and nothing the user can act on, so it goes to the log like the rest.
        deprecation = issubclass(category, (DeprecationWarning, PendingDeprecationWarning, FutureWarning))
        parts = Path(filename).parts
        lib = next((p for p in reversed(parts) if p in ("site-packages", "dist-packages")), None)
        if (lib is None or str(Path(filename).resolve()).startswith(_OURS)) and not deprecation:
            shown(message, category, filename, lineno, file, line)
            return
        name = parts[parts.index(lib) + 1] if lib else Path(filename).name
        captured.add(Notice(name, category.__name__, f"{message} ({filename}:{lineno})"))

    warnings.showwarning = showwarning
    return captured


def _quiet_torch_handlers(handler: logging.Handler) -> None:
    """torch's compiler logs (torch._dynamo, torch._inductor, ...) print through handlers of their own
    on loggers that do not propagate: replace those with ours."""
    if importlib.util.find_spec("torch") is None:
        return
    # lazy: torch is slow to import and may be absent; importing it installs those handlers
    import torch._logging  # noqa: F401

    for name, lg in list(logging.root.manager.loggerDict.items()):
        if name.startswith("torch.") and isinstance(lg, logging.Logger) and not lg.propagate:
            for h in list(lg.handlers):
                lg.removeHandler(h)
            lg.addHandler(handler)


def _quiet_transformers_handler() -> None:
    """transformers prints through a handler of its own: remove it, so its records reach ours."""
    if importlib.util.find_spec("transformers") is None:
        return
    from transformers.utils import logging as tf_logging  # lazy: transformers is slow to import, maybe absent

    tf_logging.disable_default_handler()
