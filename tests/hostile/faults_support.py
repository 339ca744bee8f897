"""Real faults for the fault corpus: damaged bytes, a file-size limit, a full tmpfs, signals to a live run.

Nothing here fakes an error: damage is bytes changed on disk, a full disk is the kernel's EFBIG
(``RLIMIT_FSIZE``) or ENOSPC (a small tmpfs), a signal goes to a real ``qlora_engine train``
process that prints its events on stdout.
"""

from __future__ import annotations

import contextlib
import json
import os
import queue
import resource
import shutil
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

from qlora_engine.config import TrainConfig, apply_overrides

ROOT = Path(__file__).resolve().parents[2]
TEXTS = [
    "The quick brown fox jumps over the lazy dog.",
    "What is the capital of France? The capital of France is Paris.",
    "1 2 3 4 5 6 7 8 9 10",
]


def write_data(folder: Path) -> Path:
    path = folder / "train.jsonl"
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in TEXTS), encoding="utf-8")
    return path


def make_cfg(model: Path, data: Path, out: Path, *overrides: str) -> TrainConfig:
    """A tiny, fast run: 3 samples a step, constant schedule, the plain AdamW optimizer (no bitsandbytes state)."""
    base = [
        f"model.ref={model}",
        f"data.path={data}",
        f"output.dir={out}",
        "train.max_steps=3",
        "train.micro_batch_size=3",
        "train.gradient_accumulation_steps=1",
        "train.save_steps=1",
        "train.save_total_limit=null",
        "train.gradient_checkpointing=false",
        "optim.optimizer=adamw",
        "optim.learning_rate=1e-2",
        "optim.warmup_steps=0",
        "optim.scheduler=constant",
        "lora.rank=4",
    ]
    return apply_overrides(TrainConfig(), base + list(overrides))


# -- damage -----------------------------------------------------------------------------------


def flip(path: Path) -> None:
    """One byte in the middle XOR 0xFF: the size stays."""
    raw = bytearray(path.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    path.write_bytes(bytes(raw))


def zero_block(path: Path) -> None:
    """A block in the second half overwritten with other bytes of the same length: the size stays."""
    raw = bytearray(path.read_bytes())
    start = len(raw) // 2
    n = max(1, min(64, len(raw) - start))
    raw[start : start + n] = bytes((b + 1) % 256 for b in raw[start : start + n])
    path.write_bytes(bytes(raw))


def truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: len(path.read_bytes()) // 2])


def remove(path: Path) -> None:
    path.unlink()


DAMAGE = {"flipped": flip, "same-size": zero_block, "truncated": truncate, "missing": remove}


def snapshot(folder: Path) -> dict[str, bytes]:
    """Every file under ``folder`` and its bytes (to assert that nothing changed)."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def dead_pid() -> int:
    """The id of a process that has exited (and been reaped)."""
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


# -- a full disk ------------------------------------------------------------------------------


@contextlib.contextmanager
def file_size_limit(limit: int) -> Iterator[None]:
    """RLIMIT_FSIZE for this process: a write past ``limit`` bytes gets the kernel's EFBIG.

    SIGXFSZ is ignored meanwhile, or the kernel would kill the process instead of failing the
    write. Both are restored after (the hard limit is never lowered, so the soft one can go back).
    """
    old_limit = resource.getrlimit(resource.RLIMIT_FSIZE)
    old_handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, old_limit[1]))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, old_limit)
        signal.signal(signal.SIGXFSZ, old_handler)


def limited_child(limit: int):
    """A ``preexec_fn`` for a child process under a file-size limit (EFBIG, never SIGXFSZ)."""

    def setup() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # an ignored signal stays ignored across exec
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))

    return setup


def try_mount(where: Path, options: str) -> str | None:
    """Mount a tmpfs at ``where``; None if done, else why not (the test then skips with that reason)."""
    where.mkdir(parents=True, exist_ok=True)
    try:
        out = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(where)], capture_output=True, text=True, timeout=20
        )
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"mount is not available here ({e})"
    if out.returncode != 0:
        return f"this sandbox does not allow mounting a tmpfs: {out.stderr.strip() or out.returncode}"
    return None


def unmount(where: Path) -> None:
    subprocess.run(["umount", "-l", str(where)], capture_output=True, timeout=20)


# -- a live run and its signals ---------------------------------------------------------------


def engine_env(**extra: str) -> dict[str, str]:
    env = {
        **os.environ,
        "PYTHONPATH": str(ROOT),
        "HF_HUB_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "OMP_NUM_THREADS": "1",
        **extra,
    }
    return env


class LiveRun:
    """``python -m qlora_engine train CONFIG --events -`` in a child process, its events read as they come."""

    def __init__(
        self, config: Path, *args: str, env: dict[str, str] | None = None, stdin: bool = False, preexec_fn=None
    ) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "qlora_engine", "train", str(config), "--events", "-", *args],
            stdin=subprocess.PIPE if stdin else subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            # a child that hangs is sent SIGABRT by finish(): faulthandler then writes every thread's stack
            env={**(env or engine_env()), "PYTHONFAULTHANDLER": "1"},
            cwd=str(config.parent),
            preexec_fn=preexec_fn,
        )
        self.events: list[dict] = []
        self.stderr: list[str] = []
        self._events: queue.Queue[dict | None] = queue.Queue()
        self._stderr: queue.Queue[str | None] = queue.Queue()
        threading.Thread(target=self._read, args=(self.proc.stdout, self._events, True), daemon=True).start()
        threading.Thread(target=self._read, args=(self.proc.stderr, self._stderr, False), daemon=True).start()

    @staticmethod
    def _read(stream, q, as_json: bool) -> None:
        for line in stream:
            if as_json:
                try:
                    q.put(json.loads(line))
                except ValueError:
                    continue
            else:
                q.put(line)
        q.put(None)

    def wait_event(self, match, timeout: float = 90) -> dict:
        """Read events until one satisfies ``match``; every event read is kept in ``events``."""
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            try:
                e = self._events.get(timeout=max(0.01, end - time.monotonic()))
            except queue.Empty:
                break
            if e is None:
                raise AssertionError(f"the run ended before the event: {self.finish()[1]}")
            self.events.append(e)
            if match(e):
                return e
        raise AssertionError("no such event in time")

    def wait_stderr(self, text: str, timeout: float = 30) -> None:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            try:
                line = self._stderr.get(timeout=max(0.01, end - time.monotonic()))
            except queue.Empty:
                break
            if line is None:
                break
            self.stderr.append(line)
            if text in line:
                return
        raise AssertionError(f"{text!r} never came on stderr: {''.join(self.stderr)}")

    def signal(self, signum: int) -> None:
        self.proc.send_signal(signum)

    def finish(self, timeout: float = 90) -> tuple[int, str]:
        """Wait for the exit; (exit code, all of stderr). The remaining events land in ``events``."""
        try:
            code = self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            # Say where it hung: SIGABRT makes faulthandler print every thread's stack on stderr.
            self.proc.send_signal(signal.SIGABRT)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
            self._drain()
            last = [e.get("event") for e in self.events[-5:]]
            raise AssertionError(
                f"the run did not exit within {timeout:.0f} s (last events {last}); its stderr:\n"
                + "".join(self.stderr)[-6000:]
            ) from None
        self._drain()
        return code, "".join(self.stderr)

    def _drain(self) -> None:
        """What the reader threads still hold, into ``events`` and ``stderr``."""
        for q, sink in ((self._events, self.events), (self._stderr, self.stderr)):
            while True:
                try:
                    item = q.get(timeout=5)
                except queue.Empty:
                    break
                if item is None:
                    break
                sink.append(item)

    def of(self, kind: str) -> list[dict]:
        return [e for e in self.events if e.get("event") == kind]


def leftovers(*folders: Path) -> list[str]:
    """Interrupted-write folders and locks left in ``folders``."""
    out = []
    for folder in folders:
        if folder.is_dir():
            out += [p.name for p in folder.iterdir() if p.name.startswith((".tmp-", ".old-")) or p.name == "run.lock"]
    return out


def fake_hub_snapshot(hub_cache: Path, repo: str, model_dir: Path) -> Path:
    """``repo`` in a Hugging Face hub cache layout holding the files of ``model_dir``, so an offline
    ``snapshot_download(repo)`` (a hub URL as the model reference) resolves it with no network."""
    commit = uuid.uuid4().hex + "abcdefgh"
    base = hub_cache / f"models--{repo.replace('/', '--')}"
    snap = base / "snapshots" / commit
    shutil.copytree(model_dir, snap)
    (base / "refs").mkdir(parents=True, exist_ok=True)
    (base / "refs" / "main").write_text(commit)
    return snap


def every_file(*roots: Path) -> list[Path]:
    return [p for root in roots if root.exists() for p in sorted(root.rglob("*")) if p.is_file()]


def copy_run(base, tmp_path: Path, *overrides: str):
    """A fresh copy of the base run in ``tmp_path`` and its config (with ``overrides``)."""
    dst = tmp_path / "run"
    shutil.copytree(base["run"], dst)
    return dst, make_cfg(base["model"], base["data"], dst, "train.max_steps=4", *overrides)


def unchanged_but_events(before: dict[str, bytes], after: dict[str, bytes]) -> None:
    """Nothing rewritten or deleted; events.jsonl only appended to (the failure is logged there)."""
    ev_before, ev_after = before.pop("events.jsonl", b""), after.pop("events.jsonl", b"")
    assert ev_after.startswith(ev_before)
    assert after == before
