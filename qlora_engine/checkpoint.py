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
import hashlib
import json
import os
import pickle
import random
import re
import shutil
import socket
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

from qlora_engine.config import TrainConfig
from qlora_engine.decisions import ResumeBlocker
from qlora_engine.errors import DiskFullError, Problem, ResumeError, RunLockedError, WriteError
from qlora_engine.paths import pid_alive as _pid_alive
from qlora_engine.paths import sweep_interrupted
from qlora_engine.scrub import scrub, scrub_tree

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


def tree_bytes(path: Path) -> int:
    """Bytes of the files under ``path`` (0 if it is gone)."""
    try:
        return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file())
    except OSError:
        return 0


def write_atomic_folder(
    target: Path, write: Callable[[Path], None], *, replace: bool = False, needed: int | None = None
) -> Path:
    """Let ``write`` fill a temporary sibling folder, then rename it to ``target``.

    Before the rename every file is scrubbed of hub tokens (:func:`qlora_engine.scrub.scrub_tree`:
    this also cleans what third-party writers put there) and flushed to disk. An error (disk
    full, a kill, a signal) leaves ``target`` as it was and removes the temporary folder; a
    folder left by a killed process is swept at the next start (:func:`qlora_engine.paths.sweep_interrupted`).

    A full disk (ENOSPC, or EFBIG from a file-size limit; torch and safetensors wrap them in
    their own errors) raises :class:`DiskFullError` naming ``target`` and about how much it
    needs (``needed`` if the caller knows, else the largest of what was written before the
    failure and the newest sibling of the same kind). A folder that cannot be written
    (read-only, no permission) raises :class:`WriteError`.
    """

    tmp = target.with_name(f".tmp-{target.name}-{os.getpid()}")
    written = 0
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        sweep_interrupted(target.parent)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        write(tmp)
        scrub_tree(tmp)
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
    except BaseException as e:
        written = tree_bytes(tmp)
        code = disk_errno(e, target.parent)  # before the removal gives the space back
        shutil.rmtree(tmp, ignore_errors=True)
        if code is not None:
            raise disk_full(target, code, max(needed or 0, written, _sibling_bytes(target))) from None
        if isinstance(e, OSError) and e.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
            raise WriteError(
                f"cannot write here ({os.strerror(e.errno).lower()}); nothing was written.",
                file=target.parent,
                fix="Choose a folder you can write to (or make this one writable), then try again.",
            ) from None
        raise
    return target


_DISK_WORDS = (
    ("no space left", errno.ENOSPC),
    ("file too large", errno.EFBIG),
    ("os error 28", errno.ENOSPC),
    ("os error 27", errno.EFBIG),
    ("errno 28", errno.ENOSPC),
    ("errno 27", errno.EFBIG),
)
# torch.save to a path: its C++ writer loses the errno ("unexpected pos", "file write failed",
# "iostream error"); :func:`save_torch` writes through a Python file, which keeps it, and these
# words make the limits themselves be checked for the cause.
_LOST_ERRNO = ("unexpected pos", "file write failed", "iostream error")


def save_torch(obj: Any, path: Path) -> None:
    """``torch.save`` through a Python file object, so a full disk keeps its OSError (as the cause
    of torch's RuntimeError) instead of only "unexpected pos" text."""
    import torch  # lazy: the app's GUI process imports this module (checkpoint lists) and must not import torch

    with open(path, "wb") as fh:
        torch.save(obj, fh)


def _limits_errno(where: Path | None) -> int | None:
    """Which limit a write whose errno was lost most likely hit: a file-size limit, or a full disk."""
    try:
        import resource  # lazy: POSIX only (Windows has no resource module)
    except ImportError:
        resource = None  # type: ignore[assignment]
    if resource is not None and resource.getrlimit(resource.RLIMIT_FSIZE)[0] != resource.RLIM_INFINITY:
        return errno.EFBIG
    try:
        if where is not None and shutil.disk_usage(where).free < (16 << 20):
            return errno.ENOSPC
    except OSError:
        pass
    return None


def disk_errno(e: BaseException | None, where: Path | None = None) -> int | None:
    """ENOSPC or EFBIG if ``e`` (or what it wraps) is a full disk or a file-size limit, else None.

    torch.save raises a RuntimeError and safetensors its own error around the OS error, with
    the errno only in the text (or lost): those are recognised too.
    """
    seen = 0
    while e is not None and seen < 5:
        if isinstance(e, DiskFullError):
            return errno.ENOSPC
        if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EFBIG):
            return e.errno
        if isinstance(e, (RuntimeError, OSError)) or type(e).__name__ == "SafetensorError":
            text = str(e).lower()
            for words, code in _DISK_WORDS:
                if words in text:
                    return code
            if any(words in text for words in _LOST_ERRNO):
                lost = _limits_errno(where)
                if lost is not None:
                    return lost
        e = e.__cause__ or e.__context__
        seen += 1
    return None


def fmt_bytes(n: int) -> str:
    """``1.2 GB``, ``340 MB``, ``12 kB``: how much space a write needs, for people."""
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{n} bytes"


def disk_full(target: Path, code: int, needed: int) -> DiskFullError:
    """The :class:`DiskFullError` of a write of ``target`` that hit ``code`` (ENOSPC or EFBIG)."""
    why = "the file-size limit (ulimit -f) was reached" if code == errno.EFBIG else "no space left on the device"
    kept = f"{target} is unchanged" if target.exists() else f"nothing was written to {target}"
    return DiskFullError(
        f"disk full at {target}, about {fmt_bytes(max(needed, 1))} needed ({why}); {kept}.",
        file=target,
        fix=f"Free space on the disk holding {target.parent} (or choose another folder), then try again: "
        "a run resumes from its last complete checkpoint, which is kept intact.",
    )


def _sibling_bytes(target: Path) -> int:
    """The size of the newest complete checkpoint beside ``target`` (what the next one will need)."""
    if not _STEP_RE.match(target.name):
        return tree_bytes(target) if target.exists() else 0
    found = list_checkpoints(target.parent)
    return tree_bytes(found[-1][1]) if found else 0


def checkpoint_name(step: int) -> str:
    return f"step-{step:06d}"


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def write_marker(folder: Path, meta: dict[str, Any]) -> None:
    """Write the manifest last: every file's size and SHA-256, and when it was written."""
    files = {
        p.name: {"size": p.stat().st_size, "sha256": file_sha256(p)}
        for p in sorted(folder.iterdir())
        if p.is_file() and p.name != MARKER
    }
    marker = {"complete": True, "written": time.time(), "files": files, **meta}
    (folder / MARKER).write_text(json.dumps(marker, indent=1), encoding="utf-8")


def _read_marker(folder: Path) -> dict[str, Any] | None:
    try:
        marker = json.loads((folder / MARKER).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return marker if isinstance(marker, dict) and marker.get("complete") else None


def _expected(entry: Any) -> tuple[int | None, str | None]:
    if isinstance(entry, dict):
        return entry.get("size"), entry.get("sha256")
    return entry, None  # manifests before checksums: the size only


def is_complete(folder: Path) -> bool:
    """True if ``folder`` holds a checkpoint this engine finished writing, every file of its size.

    The cheap check (sizes), used to list checkpoints; :func:`verify` also compares checksums
    and runs before anything is loaded from a checkpoint.
    """
    marker = _read_marker(folder)
    if marker is None:
        return False
    for name, entry in marker.get("files", {}).items():
        p = folder / name
        size, _ = _expected(entry)
        if not p.is_file() or p.stat().st_size != size:
            return False
    return True


def verify(folder: Path) -> tuple[str, str] | None:
    """The first damaged file of a checkpoint and what is wrong with it, or None if it is intact.

    Compares every file with the manifest's size and SHA-256, so damage that keeps a file's
    size (flipped bytes) is found too.
    """
    marker = _read_marker(folder)
    if marker is None:
        return MARKER, "missing or unreadable" if not (folder / MARKER).exists() else "damaged"
    for name, entry in marker.get("files", {}).items():
        p = folder / name
        size, digest = _expected(entry)
        if not p.is_file():
            return name, "missing"
        if p.stat().st_size != size:
            return name, f"{p.stat().st_size} bytes instead of {size} (truncated or extended)"
        if digest is not None and file_sha256(p) != digest:
            return name, "its content changed (checksum mismatch)"
    if not (folder / STATE).is_file():
        return STATE, "missing"
    return None


def newest_intact(ckpt_dir: Path, *, below: Path | None = None) -> Path | None:
    """The newest checkpoint of ``ckpt_dir`` that passes :func:`verify` (other than ``below``)."""
    for _, p in reversed(list_checkpoints(ckpt_dir)):
        if below is not None and p.resolve() == below.resolve():
            continue
        if verify(p) is None:
            return p
    return None


def damaged(folder: Path, name: str, what: str) -> ResumeError:
    """The :class:`ResumeError` of a damaged checkpoint, offering the newest intact one."""
    other = newest_intact(folder.parent, below=folder)
    if other is not None:
        fix = f"Resume from the newest intact checkpoint: --resume {other}"
    else:
        fix = "No other intact checkpoint is left: start a new run (set another output.dir or move this one away)."
    return ResumeError(
        f"damaged checkpoint: {name} is {what}; nothing was loaded.", file=folder / name, checkpoint=folder, fix=fix
    )


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


def newest_checkpoint_folder(ckpt_dir: Path) -> Path | None:
    """The checkpoint folder with the highest step, complete or damaged (``--resume`` checks it,
    and names the damage rather than silently taking an older one). Interrupted writes
    (``.tmp-*``) are not checkpoint folders."""
    if not ckpt_dir.is_dir():
        return None
    found = [(int(m.group(1)), p) for p in ckpt_dir.iterdir() if (m := _STEP_RE.match(p.name)) and p.is_dir()]
    return max(found)[1] if found else None


def _written(folder: Path, step: int) -> tuple[float, int]:
    marker = _read_marker(folder) or {}
    return float(marker.get("written", 0.0)), step


def prune_checkpoints(ckpt_dir: Path, keep: int | None, protect: tuple[Path | None, ...] = ()) -> list[Path]:
    """Delete the least recently written checkpoints beyond ``keep``; the ones deleted.

    Counted by when each was written, not by its step number: after a resume from an older
    checkpoint, the new ones are the newest. A checkpoint in ``protect`` (the one just written,
    the one the run resumed from) is never deleted.
    """
    if keep is None:
        return []
    kept = {p.resolve() for p in protect if p is not None}
    found = sorted(list_checkpoints(ckpt_dir), key=lambda sp: _written(sp[1], sp[0]))
    deletable = [p for _, p in found if p.resolve() not in kept]
    excess = len(found) - keep
    gone = deletable[: max(excess, 0)]
    for p in gone:
        shutil.rmtree(p, ignore_errors=True)
    return gone


def load_state(folder: Path) -> dict[str, Any]:
    """The trainer state of a checkpoint, after checking every file against its manifest."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ResumeError(
            "no such checkpoint folder.",
            checkpoint=folder,
            fix="`--resume` without a path picks the newest complete checkpoint.",
        )
    bad = verify(folder)
    if bad is not None:
        if bad[0] == MARKER:
            raise ResumeError(
                f"not a complete checkpoint written by QLoRA Studio ({MARKER} is {bad[1]}); nothing was loaded.",
                file=folder / MARKER,
                checkpoint=folder,
                fix=damaged(folder, *bad).fix,
            )
        raise damaged(folder, *bad)
    try:
        return json.loads((folder / STATE).read_text(encoding="utf-8"))
    except ValueError:
        raise damaged(folder, STATE, "not valid JSON") from None


def torch_load_own(folder: Path, name: str) -> Any:
    """Load a torch file from a checkpoint folder the engine wrote (checked), tensors and plain data only."""
    if not is_complete(folder):
        raise ResumeError(
            f"refusing to load {name}: this folder was not written completely by QLoRA Studio.",
            file=folder / name,
            checkpoint=folder,
        )

    import torch  # lazy: the app's GUI process imports this module (checkpoint lists) and must not import torch

    try:
        return torch.load(folder / name, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError, AttributeError) as e:
        # torch's own message advises weights_only=False, which would run the file's code: never
        # pass that on (nor chain it into the traceback).
        raise ResumeError(
            f"{name} holds something other than tensors and plain data ({type(e).__name__}); refused, "
            "nothing was loaded.",
            file=folder / name,
            checkpoint=folder,
            fix=damaged(folder, name, "unreadable").fix,
        ) from None


def tensors_fingerprint(tensors: dict[str, Any]) -> str:
    """A short hash of named tensors (names, dtypes, shapes and bytes): equal only for equal weights."""
    import torch  # lazy: the app's GUI process imports this module (checkpoint lists) and must not import torch

    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


# -- RNG --------------------------------------------------------------------------------------


def rng_state() -> dict[str, Any]:
    import torch  # lazy: the app's GUI process imports this module (checkpoint lists) and must not import torch

    state: dict[str, Any] = {"python": random.getstate(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    import torch  # lazy: the app's GUI process imports this module (checkpoint lists) and must not import torch

    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# -- the run lock -----------------------------------------------------------------------------


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
    """The settings a checkpoint can only be resumed with (the data is checked by its fingerprint).

    The optimizer is part of it: another optimizer cannot take the saved state (and an 8-bit
    state read as 32-bit would be garbage). The model reference is kept scrubbed of tokens.
    """

    return {
        "model.ref": scrub(c.model.ref),
        "quant": asdict(c.quant),
        "lora": {k: v for k, v in asdict(c.lora).items() if k != "dropout"},
        "optim.optimizer": c.optim.optimizer,
        # the batch of a step, not its split into micro-batches (see qlora_engine.train's docstring)
        "train.micro_batch_size x gradient_accumulation_steps": c.train.micro_batch_size
        * c.train.gradient_accumulation_steps,
        "train.seed": c.train.seed,
    }


def identity_changes(saved: dict[str, Any], now: dict[str, Any]) -> list[ResumeBlocker]:
    """What differs between a checkpoint's identity and the current one (keys the checkpoint
    does not record, from an older version of the engine, are not compared)."""
    return [ResumeBlocker(k, saved[k], v) for k, v in now.items() if k in saved and saved[k] != v]


def check_resume(folder: Path, cfg: TrainConfig, *, force: bool = False) -> dict[str, Any]:
    """Verify a checkpoint (every file against its manifest) and that ``cfg`` can resume it.

    Runs before the model loads and before any file of the run is written; the data's
    fingerprint is compared later, once the data is prepared. Returns the trainer state.
    """
    state = load_state(folder)
    changes = identity_changes(state.get("identity", {}), setup_identity(cfg))
    if changes and not force:
        raise changed_setup(folder, changes)
    return state


def changed_setup(folder: Path, changes: list[ResumeBlocker]) -> ResumeError:
    first = changes[0]
    return ResumeError(
        "cannot resume, the setup changed since this checkpoint: "
        + "; ".join(f"{c.field}: checkpoint has {c.before!r}, config has {c.after!r}" for c in changes)
        + "; nothing was changed.",
        checkpoint=folder,
        field=first.field,
        problems=[Problem(f"checkpoint has {c.before!r}, config has {c.after!r}", field=c.field) for c in changes],
        fix="Undo the change, start a new run in another output.dir, or pass --force-resume.",
    )


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
