"""Python's cycle collector runs on the GUI thread only (worker threads must never destroy Qt objects)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import threading


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


def test_the_app_installs_the_collector(studio_home):
    # In a child process: main() runs the application's event loop to its end, which would
    # leave this test process's QApplication closing.
    probe = textwrap.dedent("""
        import gc, sys
        from PySide6.QtCore import QTimer
        from PySide6.QtWidgets import QApplication
        from app import main as app_main
        seen = []
        def look_and_quit():
            seen.append(gc.isenabled())
            for w in QApplication.topLevelWidgets():
                w.close()
            QApplication.quit()
        QApplication([])
        QTimer.singleShot(200, look_and_quit)
        rc = app_main.main([])
        print("automatic gc:", seen, "exit:", rc)
    """)
    out = subprocess.run(
        [sys.executable, "-c", probe],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "QT_QPA_PLATFORM": "offscreen"},
    )
    assert "automatic gc: [False] exit: 0" in out.stdout, out.stdout + out.stderr
