"""Where the engine keeps files of its own (per user, per platform, via platformdirs)."""

from __future__ import annotations

import os
import time
from pathlib import Path

import platformdirs

from qlora_engine.events import redact


def cache_dir() -> Path:
    """Converted models and tokenized data. ``QLORA_STUDIO_CACHE`` overrides the platform default."""
    env = os.environ.get("QLORA_STUDIO_CACHE")
    path = Path(env).expanduser() if env else Path(platformdirs.user_cache_dir("qlora-studio", appauthor=False))
    path.mkdir(parents=True, exist_ok=True)
    return path


def write_error_log(text: str, folder: Path | None = None, *, name: str = "error") -> Path | None:
    """Write a traceback (redacted) to ``folder/logs/`` (a run folder) or the user cache's ``logs/``.

    Returns the file's path, or None when no folder can take it (a read-only place, a full disk):
    a failure to log must never hide the failure being logged.
    """
    stamp = time.strftime("%Y%m%d-%H%M%S")
    for base in ([folder / "logs"] if folder is not None else []) + [None]:
        try:
            logs = base if base is not None else cache_dir() / "logs"
            logs.mkdir(parents=True, exist_ok=True)
            path = logs / f"{name}-{stamp}-{os.getpid()}.log"
            path.write_text(redact(text), encoding="utf-8")
            return path
        except OSError:
            continue
    return None
