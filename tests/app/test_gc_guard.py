"""Python's cycle collector runs on the GUI thread only (worker threads must never destroy Qt objects)."""

from __future__ import annotations

import gc
import threading

from PySide6.QtCore import QTimer
from PySide6.QtWidgets import QApplication


class _Cyclic:
    """Garbage only the cycle collector frees; records which thread freed it."""

    def __init__(self, seen: list[bool]) -> None:
        self.me = self
        self.seen = seen

    def __del__(self) -> None:
        self.seen.append(threading.current_thread() is threading.main_thread())


def test_cycles_made_anywhere_are_freed_on_the_gui_thread(qtbot, gui_thread_gc):
    seen: list[bool] = []
    for _ in range(1_000):  # more than the collector's first threshold (700 new objects)
        _Cyclic(seen)

    def churn() -> None:  # allocates far past the collector's thresholds, as a model load does
        for _ in range(50):
            [[] for _ in range(10_000)]

    worker = threading.Thread(target=churn)
    worker.start()
    worker.join()
    assert seen == [], "the worker thread ran the cycle collector"
    qtbot.waitUntil(lambda: len(seen) == 1_000, timeout=5_000)
    assert all(seen)


def test_the_app_installs_the_collector(studio_home, monkeypatch):
    from app import main as app_main

    state = {}

    def look_and_quit() -> None:
        state["automatic_gc"] = gc.isenabled()
        for w in QApplication.topLevelWidgets():
            w.close()
        QApplication.quit()

    gc.enable()
    QTimer.singleShot(200, look_and_quit)
    try:
        assert app_main.main([]) == 0
    finally:
        gc.enable()
    assert state == {"automatic_gc": False}
