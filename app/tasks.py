"""Background work for the window: a QThread with a queue of keyed jobs, latest request wins.

Inspecting a model or a dataset can take seconds (a hub download, tokenizing a file), so it
never runs on the GUI thread. Pages submit a job under a key ("model", "data"); if a newer
job for the same key arrives before the old one starts, the old one is dropped, and a
result that is no longer the latest for its key is never delivered. Results come back as
Qt signals, queued onto the GUI thread.

Work that touches weights (training, Try, Export) is not a task: it runs in a child process
(:class:`app.run_worker.EngineJob`).

Every QThread the app starts is registered in :data:`THREADS` so the tests can fail any
test that leaves one running.
"""

from __future__ import annotations

import threading
import traceback
import weakref
from collections.abc import Callable
from typing import Any

from PySide6.QtCore import QObject, QThread, Signal, Slot

THREADS: weakref.WeakSet[QThread] = weakref.WeakSet()
"""Every QThread started by the app (the leak check in tests/app/conftest.py reads it)."""


def track(thread: QThread) -> QThread:
    THREADS.add(thread)
    return thread


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
