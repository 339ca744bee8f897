"""The window's questions about models, data and the budget, answered by a child process.

Inspecting a model builds it on the meta device and reading data tokenizes it: both import
torch, which the window's process never does. :class:`Inspector` keeps one
``qlora-engine inspect-serve`` child (:mod:`qlora_engine.inspect_server`), started on the
first question and again if it dies, held by an :class:`~app.run_worker.EngineJob`. Pages
submit a request under a key ("model", "data", "budget"); as with a task runner, the newest
request of a key replaces one still waiting, an answer that is no longer the newest of its
key is dropped, and one request is in the child at a time. Answers come back as plain JSON;
a failure comes back as the engine's typed error (:func:`qlora_engine.errors.from_dict`).
"""

from __future__ import annotations

import json
from typing import Any

from PySide6.QtCore import QObject, Signal

from app.run_worker import EngineJob, engine_argv, engine_env
from qlora_engine.events import Event, InspectFailed, InspectResult

QUIT_WAIT_MS = 10_000


class InspectorError(Exception):
    """An internal error in the inspecting child (a bug or a library's error), with its traceback."""

    def __init__(self, message: str, traceback: str = "") -> None:
        super().__init__(message)
        self.traceback = traceback


class Inspector(QObject):
    """One inspecting child, shared by the pages.

    Signals:
        finished(key, result): the newest request of ``key`` was answered.
        failed(key, exception, traceback_text): it failed (a ``QLoRAError`` for a user error).
        busy_changed(key, busy)
    """

    finished = Signal(str, object)
    failed = Signal(str, object, str)
    busy_changed = Signal(str, bool)

    def __init__(self, parent: QObject | None = None) -> None:
        super().__init__(parent)
        self.job: EngineJob | None = None
        self._ticket = 0
        self._latest: dict[str, int] = {}
        self._pending: dict[str, tuple[int, dict[str, Any]]] = {}
        self._in_child: tuple[str, int] | None = None
        self._closed = False

    def submit(self, key: str, request: dict[str, Any]) -> int:
        """Ask ``request`` under ``key``; a waiting request of the same key is replaced."""
        if self._closed:
            return -1
        self._ticket += 1
        self._latest[key] = self._ticket
        self._pending[key] = (self._ticket, request)
        self.busy_changed.emit(key, True)
        self._send_next()
        return self._ticket

    def cancel(self, key: str) -> None:
        """Forget ``key``: drop its waiting request and ignore the answer to one in the child."""
        self._pending.pop(key, None)
        self._latest[key] = -1
        self.busy_changed.emit(key, False)

    def shutdown(self, timeout_ms: int = QUIT_WAIT_MS) -> bool:
        """End the child now. True if it is gone.

        It writes nothing anywhere, so ending it mid-answer loses nothing; waiting for it to
        finish importing the ML stack (seconds) would only hold up closing the window.
        """
        self._closed = True
        self._pending.clear()
        job, self.job = self.job, None
        if job is None:
            return True
        job.abort()
        return job.wait(timeout_ms)

    # -- the child ------------------------------------------------------------------------------

    def _send_next(self) -> None:
        if self._in_child is not None or not self._pending or self._closed:
            return
        key = next(iter(self._pending))
        ticket, request = self._pending.pop(key)
        if self.job is None:
            self.job = EngineJob(engine_argv("inspect-serve", "--events", "-"), env=engine_env(), parent=self)
            self.job.event.connect(self._on_event)
            self.job.finished.connect(self._on_exit)
            self.job.start()
        self._in_child = (key, ticket)
        self.job.send(json.dumps({**request, "request": ticket}))

    def _on_event(self, e: Event) -> None:
        if not isinstance(e, (InspectResult, InspectFailed)) or self._in_child is None:
            return
        key, ticket = self._in_child
        if e.request != ticket:
            return
        self._in_child = None
        if self._latest.get(key) == ticket:
            self._latest[key] = -1
            self.busy_changed.emit(key, False)
            if isinstance(e, InspectResult):
                self.finished.emit(key, e.result)
            else:
                self.failed.emit(key, e.user_error() or InspectorError(e.message, e.traceback), e.traceback)
        self._send_next()

    def _on_exit(self, code: int, stderr_tail: str) -> None:
        """The child died (a crash, the system's out-of-memory killer): fail its question, start over."""
        job, self.job = self.job, None
        if job is not None:
            job.deleteLater()
        if self._in_child is not None and not self._closed:
            key, ticket = self._in_child
            self._in_child = None
            if self._latest.get(key) == ticket:
                self._latest[key] = -1
                self.busy_changed.emit(key, False)
                error = InspectorError(f"The inspecting process ended unexpectedly (exit code {code}).", stderr_tail)
                self.failed.emit(key, error, stderr_tail)
        self._send_next()
