"""Run folders as files: a title and notes, deleting, finding, the next free name, absolute paths.

Plain data and file operations, no Qt, no torch (the history page only draws them).

A run's title and notes live in ``<run>/studio.json`` beside its ``config.yaml``, so they travel
with the folder. Renaming gives a run a *title*; the folder keeps its name, because the run's
``config.yaml`` (``output.dir``), its checkpoints and every resume name that folder.
"""

from __future__ import annotations

import copy
import importlib.util
import json
import os
import re
import shutil
import socket
import subprocess
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from qlora_engine.config import TrainConfig

NOTES_FILE = "studio.json"


class RunBusyError(Exception):
    """The run is alive (its lock is held by a live process): it cannot be deleted now."""


@dataclass(frozen=True)
class RunNotes:
    title: str = ""
    notes: str = ""


def read_notes(run_dir: str | Path) -> RunNotes:
    """The run's title and notes (empty when none were written or the file is unreadable)."""
    try:
        data = json.loads((Path(run_dir) / NOTES_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return RunNotes()
    if not isinstance(data, dict):
        return RunNotes()
    return RunNotes(title=str(data.get("title") or ""), notes=str(data.get("notes") or ""))


def write_notes(run_dir: str | Path, notes: RunNotes) -> None:
    """Save the title and notes (a temporary file renamed over the old one: never half-written)."""
    path = Path(run_dir) / NOTES_FILE
    tmp = path.with_name(NOTES_FILE + ".tmp")
    tmp.write_text(json.dumps({"title": notes.title.strip(), "notes": notes.notes}, indent=2), encoding="utf-8")
    os.replace(tmp, path)


def delete_run(run_dir: str | Path, *, alive: bool) -> None:
    """Remove a run folder for good (the page offers the trash first).

    ``alive``: whether a live process holds the run's lock (the history knows); such a run is refused.

    Raises:
        RunBusyError: the run is alive.
        ValueError: the folder is not a run folder (nothing else is ever removed).
    """
    run_dir = Path(run_dir)
    if alive:
        raise RunBusyError(f"{run_dir.name} is running: stop it before deleting it")
    if not ((run_dir / "events.jsonl").is_file() or (run_dir / "config.yaml").is_file()):
        raise ValueError(f"{run_dir} is not a run folder")
    shutil.rmtree(run_dir)


def matches(query: str, *fields: str) -> bool:
    """Whether every word of ``query`` appears (any case) in one of ``fields``: the history's filter."""
    text = " ".join(f.lower() for f in fields if f)
    return all(word in text for word in query.lower().split())


def tracking_dir(run_dir: str | Path) -> Path | None:
    """The run's TensorBoard folder (``output.report_to: [tensorboard]``), if it wrote one."""
    path = Path(run_dir) / "tensorboard"
    return path if path.is_dir() and any(path.glob("events.out.tfevents.*")) else None


def tensorboard_installed() -> bool:
    return importlib.util.find_spec("tensorboard") is not None


class TensorBoardServer:
    """``qlora-engine tensorboard LOGDIR`` for one run, on a free port of 127.0.0.1 (nothing listens outside).

    ``engine_argv`` makes the engine's command line (``app.run_worker.engine_argv``: the frozen app
    runs its own binary with ``--engine``, where ``python -m tensorboard`` does not exist)."""

    def __init__(
        self, logdir: str | Path, engine_argv: Callable[..., list[str]], env: dict[str, str] | None = None
    ) -> None:
        self.logdir = Path(logdir)
        with socket.socket() as s:  # a free port now; TensorBoard binds it a moment later
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}/"
        self.command = engine_argv("tensorboard", str(self.logdir), "--port", str(self.port))
        self.env = env
        self.process = None

    def start(self) -> None:
        self.process = subprocess.Popen(
            self.command, env=self.env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )

    def ready(self) -> bool:
        """Whether it answers on its port yet (it takes a few seconds to start)."""
        if self.process is None or self.process.poll() is not None:
            return False
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=0.2):
                return True
        except OSError:
            return False

    @property
    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def stop(self) -> None:
        if self.alive:
            self.process.terminate()
            try:
                self.process.wait(timeout=5)
            except Exception:  # noqa: BLE001 - it did not go quietly
                self.process.kill()
                self.process.wait()


def absolute_config(cfg: TrainConfig) -> TrainConfig:
    """A copy whose file paths are absolute (hub ids and dataset ids are left alone)."""
    out = copy.deepcopy(cfg)
    base = cfg.base_dir or Path.cwd()

    def absolute(value: str | None, must_exist: bool) -> str | None:
        if not value:
            return value
        p = Path(value).expanduser()
        if p.is_absolute():
            return str(p)
        candidate = (base / p).resolve()
        if must_exist and not candidate.exists():
            return value  # a hub id such as 'HuggingFaceTB/SmolLM2-135M-Instruct'
        return str(candidate)

    out.model.ref = absolute(out.model.ref, True) or ""
    out.data.path = absolute(out.data.path, True) or ""
    out.data.validation_path = absolute(out.data.validation_path, True)
    out.output.dir = absolute(out.output.dir, False) or ""
    out.base_dir = None
    return out


def holds_run(run_dir: Path) -> bool:
    """True if a run has already written checkpoints or an adapter there (the engine won't overwrite)."""
    ckpts = run_dir / "checkpoints"
    return (run_dir / "adapter").exists() or (ckpts.is_dir() and any(ckpts.iterdir()))


def next_free_dir(run_dir: Path) -> Path:
    """``runs/my-run`` -> ``runs/my-run-2`` (or -3, ...): the first name not holding a run."""
    stem = re.sub(r"-\d+$", "", run_dir.name)
    n = 2
    while True:
        candidate = run_dir.with_name(f"{stem}-{n}")
        if not candidate.exists() or not any(candidate.iterdir()):
            return candidate
        n += 1
