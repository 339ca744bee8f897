"""The job object: one engine child process, its events in, its control lines out, its exit.

Every piece of work that touches weights runs in a child (``python -m qlora_engine ...
--events -``): training, Try (``chat --serve``) and Export. :class:`EngineJob` owns one such
child from start to exit; pages observe it through its signals and never touch the process.

Why a child process under the thread (see docs/DESIGN.md): a CUDA out-of-memory error or a native
crash cannot take the window down, and all VRAM returns to the system when a run ends.

The worker's ``run()`` blocks its thread reading the child's stdout line by line; that is
fine because the thread has nothing else to do. Requests from the GUI (stop, save, abort)
therefore do not go through the worker's event loop: they write to the child's stdin or
kill it directly, under a lock.

Delivery is batched: the worker queues parsed events and output lines and wakes the GUI
thread with one signal while the queue is non-empty; the GUI thread takes at most
``BATCH`` items per turn of its event loop. One queued Qt signal per event would let a fast
stream (thousands of steps, or a burst of stderr) occupy the loop for long stretches,
because Qt delivers all posted events of a thread before it looks at its timers again.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import weakref
from collections import deque
from pathlib import Path

from PySide6.QtCore import QObject, QThread, QTimer, Signal, Slot

from app.tasks import track
from qlora_engine.events import from_dict, redact

BATCH = 50
"""Most events the GUI thread handles in one turn of its event loop."""

TERMINATE = "\x00terminate"
"""Queued in place of a line when the child is asked to end before it exists."""

CHILDREN: weakref.WeakSet[subprocess.Popen] = weakref.WeakSet()
"""Every engine process the app started (the tests' leak check reads it)."""


def engine_argv(*args: str) -> list[str]:
    """``python -m qlora_engine ARGS`` for this interpreter (the packaged app: its own binary in engine mode)."""
    if getattr(sys, "frozen", False):
        return [sys.executable, "--engine", *args]
    return [sys.executable, "-m", "qlora_engine", *args]


def engine_env(base: dict[str, str] | None = None) -> dict[str, str]:
    """The child's environment: this one, with the engine's package root importable."""
    env = dict(os.environ if base is None else base)
    root = str(Path(__file__).resolve().parent.parent)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [root, env.get("PYTHONPATH")]))
    return env


def engine_command(config_path: Path, resume: str | bool | None = None) -> list[str]:
    """The command line of ``qlora-engine train`` for this interpreter."""
    cmd = engine_argv("train", str(config_path), "--events", "-", "--control-stdin")
    if resume:
        cmd.append("--resume")
        if isinstance(resume, (str, Path)):
            cmd.append(str(resume))
    return cmd


def _kill_tree(proc: subprocess.Popen) -> None:
    """Kill the engine and anything it started (its own process group on POSIX)."""
    if os.name == "posix":
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # start_new_session made its pid the group id
            return
        except (ProcessLookupError, PermissionError):
            pass
    try:
        proc.kill()
    except ProcessLookupError:
        pass


class RunWorker(QObject):
    """Lives in its own QThread; ``run()`` owns the child process from start to exit.

    Signals:
        started(pid): the child process is running.
        available(): items wait in the queue (emitted once until :meth:`take` empties it).
        finished(returncode, stderr_tail): the child has exited and its pipes are drained.

    Queue items are ``("event", Event)`` (an engine event parsed back into its dataclass) or
    ``("output", str)`` (a line of human text: the child's stderr, or a stdout line that is
    not an event).
    """

    started = Signal(int)
    available = Signal()
    finished = Signal(int, str)

    def __init__(
        self, cmd: list[str], cwd: Path | None = None, env: dict[str, str] | None = None, log_path: Path | None = None
    ) -> None:
        super().__init__()
        self.cmd = cmd
        self.cwd = cwd
        self.env = env
        self.log_path = log_path
        self.proc: subprocess.Popen | None = None
        self._lock = threading.Lock()
        self._aborted = False
        self._stderr_tail: deque[str] = deque(maxlen=200)
        self._queue: deque[tuple[str, object]] = deque()
        self._woken = False
        self._early_input: list[str] = []

    def _put(self, kind: str, item: object) -> None:
        with self._lock:
            self._queue.append((kind, item))
            if self._woken:
                return
            self._woken = True
        self.available.emit()

    def take(self, limit: int = BATCH) -> tuple[list[tuple[str, object]], bool]:
        """Up to ``limit`` queued items, and whether more remain (GUI thread)."""
        with self._lock:
            n = min(limit, len(self._queue))
            items = [self._queue.popleft() for _ in range(n)]
            more = bool(self._queue)
            if not more:
                self._woken = False
            return items, more

    @Slot()
    def run(self) -> None:
        env = dict(os.environ if self.env is None else self.env)
        env.setdefault("PYTHONUNBUFFERED", "1")
        env.setdefault("PYTHONIOENCODING", "utf-8")
        try:
            proc = subprocess.Popen(
                self.cmd,
                cwd=self.cwd,
                env=env,
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
                encoding="utf-8",
                errors="replace",
                bufsize=1,
                # its own process group: a Ctrl-C in the terminal that started the app reaches
                # the app, which stops the run cleanly, instead of killing the child mid-write
                start_new_session=(os.name == "posix"),
                creationflags=getattr(subprocess, "CREATE_NEW_PROCESS_GROUP", 0) if os.name == "nt" else 0,
            )
        except OSError as e:
            self._put("output", f"could not start the engine: {e}")
            self.finished.emit(-1, str(e))
            QThread.currentThread().quit()
            return
        CHILDREN.add(proc)
        with self._lock:
            self.proc = proc
            aborted = self._aborted
            early, self._early_input = self._early_input, []
        for line in early:  # lines sent (or an end asked for) before the child existed, in order
            self.terminate() if line is TERMINATE else self.send(line)
        if aborted:
            _kill_tree(proc)
        self.started.emit(proc.pid)
        log = open(self.log_path, "a", encoding="utf-8") if self.log_path else None  # noqa: SIM115
        err_thread = threading.Thread(target=self._drain_stderr, args=(proc, log), name="engine-stderr", daemon=True)
        err_thread.start()
        try:
            assert proc.stdout is not None
            for line in proc.stdout:
                self._handle_stdout(line)
        finally:
            proc.wait()
            err_thread.join()
            if log:
                log.close()
            with self._lock:
                if proc.stdin and not proc.stdin.closed:
                    try:
                        proc.stdin.close()
                    except OSError:
                        pass
        self.finished.emit(proc.returncode, "".join(self._stderr_tail))
        # end this thread's event loop now, so EngineJob.wait() returns even while the GUI thread
        # blocks in it (the queued ``finished`` is delivered when the GUI thread runs again)
        QThread.currentThread().quit()

    def _handle_stdout(self, line: str) -> None:
        text = line.strip()
        if not text:
            return
        if text.startswith("{"):
            try:
                self._put("event", from_dict(json.loads(text)))
                return
            except (ValueError, TypeError):
                pass  # not one of ours: show it as text
        self._put("output", text)

    def _drain_stderr(self, proc: subprocess.Popen, log) -> None:
        assert proc.stderr is not None
        for line in proc.stderr:
            self._stderr_tail.append(line)
            if log:
                log.write(redact(line))
                log.flush()
            self._put("output", line.rstrip("\n"))

    # -- requests from the GUI thread ------------------------------------------------------
    def send(self, command: str) -> bool:
        """Write one control line (``stop``, ``save``, ``abort``) to the child; False if it is gone."""
        with self._lock:
            proc = self.proc
            if proc is None and not self._aborted:
                self._early_input.append(command)  # the thread has not started the child yet
                return True
            if proc is None or proc.poll() is not None or proc.stdin is None or proc.stdin.closed:
                return False
            try:
                proc.stdin.write(command + "\n")
                proc.stdin.flush()
                return True
            except (BrokenPipeError, OSError, ValueError):
                return False

    def terminate(self) -> None:
        """Ask the child to end (SIGTERM): the engine unwinds and removes its temporary folders."""
        with self._lock:
            proc = self.proc
            if proc is None:
                self._early_input.append(TERMINATE)  # the child is ended as soon as it exists
                return
        if proc.poll() is None:
            proc.terminate()

    def kill(self) -> None:
        """End the child now (Abort). Checkpoints already written stay on disk."""
        with self._lock:
            self._aborted = True
            proc = self.proc
        if proc is not None and proc.poll() is None:
            _kill_tree(proc)

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None


class EngineJob(QObject):
    """The GUI's handle on one engine child process: starts the thread and worker, relays their signals.

    ``send(line)`` writes a control line (a training run's ``stop``/``save``, a Try session's
    JSON request or ``cancel``); ``terminate()`` asks the child to end (an export's Cancel);
    ``abort()`` ends it now. ``finished(returncode, stderr_tail)`` fires once, after every
    event the child wrote has been delivered and the thread has ended.
    """

    started = Signal(int)
    event = Signal(object)
    output = Signal(str)
    finished = Signal(int, str)

    def __init__(
        self,
        cmd: list[str],
        cwd: Path | None = None,
        env: dict[str, str] | None = None,
        log_path: Path | None = None,
        parent: QObject | None = None,
    ) -> None:
        super().__init__(parent)
        self.cmd = cmd
        self.returncode: int | None = None
        self.stop_requested = False
        self.aborted = False
        self._thread = track(QThread())
        self._thread.setObjectName(f"engine-{cmd[3] if len(cmd) > 3 else 'job'}")
        self._worker = RunWorker(cmd, cwd, env, log_path)
        self._worker.moveToThread(self._thread)
        self._thread.started.connect(self._worker.run)
        self._worker.started.connect(self.started)
        self._worker.available.connect(self._drain)
        self._worker.finished.connect(self._on_finished)
        self._exit: tuple[int, str] | None = None

    def start(self) -> None:
        self._thread.start()

    @property
    def running(self) -> bool:
        return self._thread.isRunning() and self.returncode is None

    @property
    def pid(self) -> int | None:
        return self._worker.pid

    def stop(self) -> bool:
        """Save a checkpoint and the adapter at the next step boundary, then exit."""
        self.stop_requested = True
        return self._worker.send("stop")

    def save_now(self) -> bool:
        return self._worker.send("save")

    def send(self, line: str) -> bool:
        """Write one line to the child's stdin; False if it is gone."""
        return self._worker.send(line)

    def terminate(self) -> None:
        self._worker.terminate()

    def abort(self) -> None:
        self.aborted = True
        self._worker.kill()

    @Slot()
    def _drain(self) -> None:
        """Deliver one batch; schedule the next turn if more wait (timers and input run between)."""
        items, more = self._worker.take()
        for kind, item in items:
            if kind == "event":
                self.event.emit(item)
            else:
                self.output.emit(item)
        if more:
            QTimer.singleShot(0, self._drain)
        elif self._exit is not None and self.returncode is None:
            self._finish()

    @Slot(int, str)
    def _on_finished(self, code: int, tail: str) -> None:
        self._thread.quit()
        self._thread.wait()
        self._exit = (code, tail)
        self._drain()  # finishes once everything queued before the exit has been delivered

    def _finish(self) -> None:
        code, tail = self._exit
        self.returncode = code
        self.finished.emit(code, tail)

    def wait(self, timeout_ms: int = 60_000) -> bool:
        """Block until the thread has ended (tests and shutdown only). True if it did."""
        return self._thread.wait(timeout_ms)
