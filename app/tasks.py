"""Background work for the window: a QThread with a queue of keyed jobs, latest request wins.

Inspecting a model or a dataset can take seconds (a hub download, tokenizing a file), so it
never runs on the GUI thread. Pages submit a job under a key ("model", "data"); if a newer
job for the same key arrives before the old one starts, the old one is dropped, and a
result that is no longer the latest for its key is never delivered. Results come back as
Qt signals, queued onto the GUI thread.

A page with one long job of its own (trying a model, exporting one) keeps a worker object on
a :class:`WorkerThread` instead, and stops the job with the worker's ``cancel`` flag.

Every QThread the app starts is registered in :data:`THREADS` so the tests can fail any
test that leaves one running.
"""

from __future__ import annotations

import threading
import traceback
import weakref
from collections.abc import Callable
from typing import Any, Generic, TypeVar

from PySide6.QtCore import QObject, QThread, Signal, Slot

from qlora_engine.errors import QLoRAError
from qlora_engine.events import Event

_import_lock = threading.Lock()


def import_ml_stack() -> None:
    """Import transformers (and resolve the lazy names we use) once, under a lock.

    transformers imports its submodules lazily on first attribute access, and two threads
    doing that at the same time can see a half-initialized module ("cannot import name
    'AutoConfig'"). Every background job that touches the ML stack calls this first.
    """
    with _import_lock:
        import transformers

        for name in ("AutoConfig", "AutoTokenizer", "AutoModelForCausalLM", "PreTrainedTokenizerFast"):
            getattr(transformers, name)


THREADS: weakref.WeakSet[QThread] = weakref.WeakSet()
"""Every QThread started by the app (the leak check in tests/app/conftest.py reads it)."""


def track(thread: QThread) -> QThread:
    THREADS.add(thread)
    return thread


class JobWorker(QObject):
    """A page's worker for its long job (it lives on a :class:`WorkerThread`).

    The job checks :attr:`cancel` between its steps. The GUI thread sets the flag; a queued
    call could not reach the worker, whose thread is busy in the job and not in its event loop.
    A job that fails says so with :meth:`report_failure`.
    """

    failed = Signal(str, str, str)
    """message, hint, traceback ('' for errors written for the user)."""

    def __init__(self) -> None:
        super().__init__()
        self.cancel = threading.Event()

    def report_failure(self, error: Exception) -> None:
        """Emit :attr:`failed`: an error written for the user as it is, any other with its traceback."""
        if isinstance(error, QLoRAError):
            self.failed.emit(str(error), error.hint or "", "")
        else:  # shown in the page with its traceback, for a bug report
            self.failed.emit(f"{type(error).__name__}: {error}", "", "".join(traceback.format_exception(error)))


class SignalSink:
    """An engine event sink for a job on a worker thread: each event goes to ``emit`` (a worker's signal)."""

    def __init__(self, emit: Callable[[Any], None]) -> None:
        self._emit = emit

    def emit(self, event: Event) -> None:
        self._emit(event)

    def close(self) -> None:
        pass


W = TypeVar("W", bound=JobWorker)


class WorkerThread(Generic[W]):
    """A page's worker on its own QThread: made and started on first use, ended by :meth:`stop`.

    The thread is registered with :func:`track`, and the worker is deleted when the thread ends.
    ``connect(worker)`` wires the new worker's signals and slots to the page.
    """

    def __init__(self, name: str, make_worker: Callable[[], W], connect: Callable[[W], None]) -> None:
        self.name = name
        self._make_worker = make_worker
        self._connect = connect
        self.thread: QThread | None = None
        self.worker: W | None = None

    def ensure(self) -> W:
        """The worker; the first call (and the first after :meth:`stop`) makes it and starts its thread."""
        if self.worker is None:
            thread = track(QThread())
            thread.setObjectName(self.name)
            worker = self._make_worker()
            worker.moveToThread(thread)
            self._connect(worker)
            thread.finished.connect(worker.deleteLater)
            thread.start()
            self.thread, self.worker = thread, worker
        return self.worker

    def stop(self, timeout_ms: int) -> bool:
        """Cancel the job in progress, end the thread and forget it and the worker.

        Returns:
            True if the thread ended within ``timeout_ms`` (or was never started).
        """
        if self.thread is None:
            return True
        self.worker.cancel.set()
        self.thread.quit()
        ended = self.thread.wait(timeout_ms)
        self.thread = None
        self.worker = None
        return ended


class _Worker(QObject):
    done = Signal(str, int, object)
    failed = Signal(str, int, object, str)

    def __init__(self, runner: TaskRunner) -> None:
        super().__init__()
        self._runner = runner

    @Slot()
    def drain(self) -> None:
        while True:
            job = self._runner._take()
            if job is None:
                return
            key, ticket, fn = job
            try:
                result = fn()
            except Exception as e:  # delivered to the page, which shows it where it belongs
                self.failed.emit(key, ticket, e, traceback.format_exc())
            else:
                self.done.emit(key, ticket, result)


class TaskRunner(QObject):
    """One background thread running submitted callables, one key at a time, newest first.

    Signals:
        finished(key, result): the latest job for ``key`` returned ``result``.
        failed(key, exception, traceback_text): the latest job for ``key`` raised.
    """

    finished = Signal(str, object)
    failed = Signal(str, object, str)
    busy_changed = Signal(str, bool)
    _wake = Signal()

    def __init__(self, name: str, parent: QObject | None = None) -> None:
        super().__init__(parent)
        self._lock = threading.Lock()
        self._pending: dict[str, tuple[int, Callable[[], Any]]] = {}
        self._latest: dict[str, int] = {}
        self._ticket = 0
        self._closed = False
        self._thread = track(QThread())
        self._thread.setObjectName(f"tasks-{name}")
        self._worker = _Worker(self)
        self._worker.moveToThread(self._thread)
        self._wake.connect(self._worker.drain)
        self._worker.done.connect(self._on_done)
        self._worker.failed.connect(self._on_failed)
        self._thread.start()

    def submit(self, key: str, fn: Callable[[], Any]) -> int:
        """Run ``fn()`` in the background; a pending job of the same key is replaced."""
        with self._lock:
            if self._closed:
                return -1
            self._ticket += 1
            ticket = self._ticket
            self._pending[key] = (ticket, fn)
            self._latest[key] = ticket
        self.busy_changed.emit(key, True)
        self._wake.emit()
        return ticket

    def cancel(self, key: str) -> None:
        """Forget ``key``: drop its pending job and ignore the result of a running one."""
        with self._lock:
            self._pending.pop(key, None)
            self._latest[key] = -1
        self.busy_changed.emit(key, False)

    def is_busy(self, key: str) -> bool:
        with self._lock:
            return self._latest.get(key, -1) > 0

    def _take(self) -> tuple[str, int, Callable[[], Any]] | None:
        with self._lock:
            if not self._pending or self._closed:
                return None
            key = next(iter(self._pending))
            ticket, fn = self._pending.pop(key)
            return key, ticket, fn

    def _current(self, key: str, ticket: int) -> bool:
        with self._lock:
            if self._latest.get(key) != ticket:
                return False
            self._latest[key] = -1
            return True

    @Slot(str, int, object)
    def _on_done(self, key: str, ticket: int, result: Any) -> None:
        if self._current(key, ticket):
            self.busy_changed.emit(key, False)
            self.finished.emit(key, result)

    @Slot(str, int, object, str)
    def _on_failed(self, key: str, ticket: int, exc: Exception, tb: str) -> None:
        if self._current(key, ticket):
            self.busy_changed.emit(key, False)
            self.failed.emit(key, exc, tb)

    def shutdown(self, timeout_ms: int = 30_000) -> bool:
        """Drop pending jobs, let a running one finish, end the thread. True if it ended in time."""
        with self._lock:
            self._closed = True
            self._pending.clear()
        self._thread.quit()
        return self._thread.wait(timeout_ms)
