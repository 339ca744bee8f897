"""The control object the training loop polls at step boundaries.

Thread-safe: the CLI's signal handler, a stdin reader thread or an in-process caller set
requests; the loop reads them between optimizer steps (never in the middle of one, so a
stop always leaves a consistent, resumable checkpoint).
"""

from __future__ import annotations

import sys
import threading
from typing import IO


class RunControl:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._stop = False
        self._abort = False
        self._save = False
        self._resume = threading.Event()
        self._resume.set()

    def request_stop(self) -> None:
        """Save a checkpoint and the adapter at the next step boundary, then finish."""
        with self._lock:
            self._stop = True
        self._resume.set()

    def request_abort(self) -> None:
        """End at the next step boundary without saving (the last checkpoint stays)."""
        with self._lock:
            self._abort = True
        self._resume.set()

    def request_save(self) -> None:
        """Write a checkpoint at the next step boundary and carry on."""
        with self._lock:
            self._save = True

    def pause(self) -> None:
        self._resume.clear()

    def resume(self) -> None:
        self._resume.set()

    @property
    def stop_requested(self) -> bool:
        with self._lock:
            return self._stop

    @property
    def abort_requested(self) -> bool:
        with self._lock:
            return self._abort

    def take_save_request(self) -> bool:
        """True once per save request."""
        with self._lock:
            s, self._save = self._save, False
            return s

    def wait_if_paused(self) -> None:
        self._resume.wait()

    def listen(self, stream: IO[str] | None = None) -> threading.Thread:
        """Read ``stop`` / ``save`` / ``abort`` / ``pause`` / ``resume`` lines from a stream in a daemon thread.

        End of stream (the parent closed our stdin or died) counts as ``stop``, so an
        orphaned run saves and exits instead of training on unseen.
        """
        stream = stream or sys.stdin
        actions = {
            "stop": self.request_stop,
            "save": self.request_save,
            "abort": self.request_abort,
            "pause": self.pause,
            "resume": self.resume,
        }

        def loop() -> None:
            for line in stream:
                action = actions.get(line.strip().lower())
                if action:
                    action()
            self.request_stop()

        t = threading.Thread(target=loop, name="control-stdin", daemon=True)
        t.start()
        return t


class Aborted(KeyboardInterrupt):
    """The run was aborted (a second Ctrl-C or SIGTERM, or an 'abort' line): nothing more is saved,
    every earlier checkpoint stays. ``signum``: the signal that aborted it, if one did."""

    def __init__(self, signum: int | None = None) -> None:
        super().__init__(signum)
        self.signum = signum
