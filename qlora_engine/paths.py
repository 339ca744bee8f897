"""Where the engine keeps files of its own (per user, per platform, via platformdirs), and the
sweep of folders that interrupted writes left behind."""

from __future__ import annotations

import os
import re
import shutil
import time
from pathlib import Path

import platformdirs

from qlora_engine.scrub import scrub

# Temporary names of the engine's writers, each carrying the writer's process id:
# write_atomic_folder (.tmp-NAME-PID, .old-NAME-PID), the GGUF conversion (NAME.tmp-PID),
# the data cache (.KEY.PID.NS.tmp) and archive extraction (.KEY.PID.NS.partial).
_INTERRUPTED = (
    re.compile(r"^\.(?:tmp|old)-.+-(?P<pid>\d+)$"),
    re.compile(r"^.+\.tmp-(?P<pid>\d+)$"),
    re.compile(r"^\..+\.(?P<pid>\d+)\.\d+\.(?:tmp|partial)$"),
)
_swept: set[str] = set()


def pid_alive(pid: int) -> bool:
    """Whether process ``pid`` of this machine still runs."""
    if pid <= 0:
        return False
    if os.name == "nt":  # os.kill(pid, 0) would send Ctrl+C there: ask the process table instead
        import ctypes  # lazy: Windows only, and the app imports this module at start-up

        kernel32 = ctypes.windll.kernel32
        handle = kernel32.OpenProcess(0x1000, False, pid)  # PROCESS_QUERY_LIMITED_INFORMATION
        if not handle:
            return False
        code = ctypes.c_ulong()
        kernel32.GetExitCodeProcess(handle, ctypes.byref(code))
        kernel32.CloseHandle(handle)
        return code.value == 259  # STILL_ACTIVE
    try:
        os.kill(pid, 0)
    except PermissionError:  # alive, another user's
        return True
    except OSError:  # ProcessLookupError: gone
        return False
    return True


def interrupted_pid(name: str) -> int | None:
    """The process id in the name of an engine's temporary folder, or None for any other name."""
    return next((int(m.group("pid")) for pattern in _INTERRUPTED if (m := pattern.match(name))), None)


def sweep_interrupted(folder: Path) -> list[Path]:
    """Remove the temporary folders (and files) of writes whose process is gone; the ones removed.

    A write interrupted by a kill, a power cut or a full disk can leave its temporary folder
    (a GGUF conversion: hundreds of MB). Only entries whose writer process no longer runs go:
    another live process may be writing right now.
    """
    folder = Path(folder)
    removed: list[Path] = []
    try:
        entries = list(folder.iterdir())
    except OSError:
        return removed
    for p in entries:
        pid = interrupted_pid(p.name)
        if pid is None or pid == os.getpid() or pid_alive(pid):
            continue
        try:
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p)
            else:
                p.unlink()
            removed.append(p)
        except OSError:
            pass  # read-only or already gone: a later start tries again
    return removed


def sweep_once(folder: Path) -> list[Path]:
    """:func:`sweep_interrupted` of ``folder``, the first time this process asks for it."""
    key = str(Path(folder).resolve())
    if key in _swept:
        return []
    _swept.add(key)
    return sweep_interrupted(folder)


def cache_dir() -> Path:
    """Converted models and tokenized data. ``QLORA_STUDIO_CACHE`` overrides the platform default.

    The first call of a process sweeps what interrupted writes left in the cache
    (the cache itself, ``gguf/``, ``data/`` and ``archives/``).
    """
    env = os.environ.get("QLORA_STUDIO_CACHE")
    path = Path(env).expanduser() if env else Path(platformdirs.user_cache_dir("qlora-studio", appauthor=False))
    path.mkdir(parents=True, exist_ok=True)
    for sub in ("", "gguf", "data", "archives"):
        sweep_once(path / sub)
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
            path.write_text(scrub(text), encoding="utf-8")
            return path
        except OSError:
            continue
    return None
