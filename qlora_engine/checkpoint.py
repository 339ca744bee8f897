"""Resumable checkpoints and the run lock.

A checkpoint is a folder ``checkpoints/step-NNNNNN/`` with the adapter, the optimizer,
scheduler and RNG states and ``trainer_state.json``. It is written into a temporary
folder, flushed to disk, and renamed into place; ``qlora_checkpoint.json`` is written
last and lists every file with its size. A folder without that marker, or whose files do
not match it, is never picked as "latest" and is never loaded: the marker is also how the
engine knows it wrote the folder itself before it unpickles anything from it (and even
then only with ``weights_only=True``).
"""

from __future__ import annotations

import errno
import json
import os
import random
import re
import shutil
import socket
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

from qlora_engine.config import TrainConfig
from qlora_engine.decisions import ResumeBlocker
from qlora_engine.errors import DiskFullError, ResumeError, RunLockedError

MARKER = "qlora_checkpoint.json"
STATE = "trainer_state.json"
_STEP_RE = re.compile(r"^step-(\d+)$")


def _fsync_dir(path: Path) -> None:
    if os.name != "posix":
        return
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_tree(path: Path) -> None:
    for p in path.rglob("*"):
        if p.is_file():
            with open(p, "rb") as fh:
                os.fsync(fh.fileno())
    _fsync_dir(path)


def write_atomic_folder(target: Path, write: Callable[[Path], None], *, replace: bool = False) -> Path:
    """Let ``write`` fill a temporary sibling folder, then rename it to ``target``.

    An error (disk full, a kill) leaves ``target`` as it was; the temporary folder is removed
    on errors we see and ignored by readers otherwise.
    """
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".tmp-{target.name}-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir()
        write(tmp)
        _fsync_tree(tmp)
        if target.exists():
            if not replace:
                raise FileExistsError(f"{target} already exists")
            old = target.with_name(f".old-{target.name}-{os.getpid()}")
            target.rename(old)
            tmp.rename(target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(target)
        _fsync_dir(target.parent)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if e.errno == errno.ENOSPC:
            kept = f"{target} is unchanged" if target.exists() else f"nothing was written to {target}"
            raise DiskFullError(
                f"The disk is full: writing {target.name} into {target.parent} failed; {kept}.",
                hint=f"Free space on the disk holding {target.parent} (or choose another folder), then try again: "
                "a run resumes from its last complete checkpoint.",
            ) from e
        raise
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def checkpoint_name(step: int) -> str:
    return f"step-{step:06d}"


def write_marker(folder: Path, meta: dict[str, Any]) -> None:
    files = {p.name: p.stat().st_size for p in sorted(folder.iterdir()) if p.is_file() and p.name != MARKER}
    (folder / MARKER).write_text(json.dumps({"complete": True, "files": files, **meta}, indent=1), encoding="utf-8")


def is_complete(folder: Path) -> bool:
    """True if ``folder`` holds a checkpoint this engine finished writing, with every file intact."""
    try:
        marker = json.loads((folder / MARKER).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return False
    if not marker.get("complete"):
        return False
    for name, size in marker.get("files", {}).items():
        p = folder / name
        if not p.is_file() or p.stat().st_size != size:
            return False
    return True


def list_checkpoints(ckpt_dir: Path) -> list[tuple[int, Path]]:
    """Complete checkpoints, oldest first."""
    if not ckpt_dir.is_dir():
        return []
    out = []
    for p in ckpt_dir.iterdir():
        m = _STEP_RE.match(p.name)
        if m and p.is_dir() and is_complete(p):
            out.append((int(m.group(1)), p))
    return sorted(out)


def latest_checkpoint(ckpt_dir: Path) -> Path | None:
    found = list_checkpoints(ckpt_dir)
    return found[-1][1] if found else None


def prune_checkpoints(ckpt_dir: Path, keep: int | None) -> None:
    if keep is None:
        return
    found = list_checkpoints(ckpt_dir)
    for _, p in found[:-keep] if len(found) > keep else []:
        shutil.rmtree(p, ignore_errors=True)


def load_state(folder: Path) -> dict[str, Any]:
    if not is_complete(folder):
        raise ResumeError(
            f"{folder}: not a complete checkpoint written by QLoRA Studio (missing or mismatched {MARKER}).",
            hint="Resume from another checkpoint; `--resume` without a path picks the newest complete one.",
        )
    return json.loads((folder / STATE).read_text(encoding="utf-8"))


def torch_load_own(folder: Path, name: str) -> Any:
    """Load a torch file from a checkpoint folder the engine wrote (checked), tensors and plain data only."""
    if not is_complete(folder):
        raise ResumeError(f"{folder}: refusing to load {name}: this folder was not written completely by QLoRA Studio.")
    import torch  # here, not at the top: the app reads checkpoint folders without needing torch

    return torch.load(folder / name, map_location="cpu", weights_only=True)


def tensors_fingerprint(tensors: dict[str, Any]) -> str:
    """A short hash of named tensors (names, dtypes, shapes and bytes): equal only for equal weights."""
    import hashlib

    import torch

    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


# -- RNG --------------------------------------------------------------------------------------


def rng_state() -> dict[str, Any]:
    import torch

    state: dict[str, Any] = {"python": random.getstate(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    import torch

    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# -- the run lock -----------------------------------------------------------------------------


def _pid_alive(pid: int) -> bool:
    if pid <= 0:
        return False
    if os.name == "nt":  # os.kill(pid, 0) would send Ctrl+C there: ask the process table instead
        import ctypes

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
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    except OSError:
        return False
    return True


class RunLock:
    """``run.lock`` in the run folder: held while the run lives; a lock of a dead process is stale."""

    def __init__(self, run_dir: Path) -> None:
        self.path = run_dir / "run.lock"
        self.held = False

    def acquire(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        me = {"pid": os.getpid(), "host": socket.gethostname()}
        for _ in range(2):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                try:
                    other = json.loads(self.path.read_text(encoding="utf-8") or "{}")
                except (OSError, json.JSONDecodeError):
                    other = {}
                same_host = other.get("host") == me["host"]
                if same_host and _pid_alive(int(other.get("pid", -1))) and other.get("pid") != me["pid"]:
                    raise RunLockedError(
                        f"{self.path.parent}: another run (process {other.get('pid')}) is writing to this folder.",
                        hint="Wait for it to finish, stop it, or choose another output.dir.",
                    ) from None
                if not same_host and other.get("host"):
                    raise RunLockedError(
                        f"{self.path.parent}: locked by a run on host {other.get('host')!r} (process {other.get('pid')}).",
                        hint=f"If that run is gone, delete {self.path}.",
                    ) from None
                self.path.unlink(missing_ok=True)  # stale: its process is gone
                continue
            with os.fdopen(fd, "w") as fh:
                json.dump(me, fh)
            self.held = True
            return
        raise RunLockedError(f"{self.path}: could not take the run lock.")

    def release(self) -> None:
        if self.held:
            self.path.unlink(missing_ok=True)
            self.held = False

    def __enter__(self) -> RunLock:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


# -- what a checkpoint can be resumed with --------------------------------------------------


def setup_identity(c: TrainConfig) -> dict[str, Any]:
    """The settings a checkpoint can only be resumed with (the data is checked by its fingerprint)."""
    return {
        "model.ref": c.model.ref,
        "quant": asdict(c.quant),
        "lora": {k: v for k, v in asdict(c.lora).items() if k != "dropout"},
        # the batch of a step, not its split into micro-batches (see qlora_engine.train's docstring)
        "train.micro_batch_size x gradient_accumulation_steps": c.train.micro_batch_size
        * c.train.gradient_accumulation_steps,
        "train.seed": c.train.seed,
    }


def resume_blockers(before: TrainConfig, after: TrainConfig) -> list[ResumeBlocker]:
    """Why a run checkpointed under ``before`` would not resume under ``after`` (empty: it would).

    Judged from the two configs alone, before loading anything: any change of a data setting
    counts (a resume then compares the prepared data's fingerprint). The app uses it to offer
    "apply and resume" or "apply and start a new run" for an out-of-memory fix.
    """

    def identity(c: TrainConfig) -> dict[str, Any]:
        data = {f"data.{k}": v for k, v in asdict(c.data).items() if k != "cache"}
        for key in ("data.path", "data.validation_path"):
            if data[key] and c.resolve(data[key]).exists():
                data[key] = str(c.resolve(data[key]).resolve())
        return {**setup_identity(c), **data}

    a, b = identity(before), identity(after)
    return [ResumeBlocker(k, a[k], b[k]) for k in a if a[k] != b[k]]
