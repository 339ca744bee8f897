"""Fixtures for the desktop app's tests: an isolated app home, a window, and a leak check.

Every test runs with ``QLORA_STUDIO_HOME`` in a temporary folder (settings, workspace, logs),
and fails if it leaves a QThread running or an engine child process alive.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from app import run_worker, tasks

EVENTS_DIR = Path(__file__).resolve().parents[1] / "data" / "events"

# A 1920x1200 offscreen screen (the default is 800x800, smaller than the window): Qt reads
# this when the QApplication is created, which pytest-qt does lazily, after collection.
if os.environ.get("QT_QPA_PLATFORM") == "offscreen":
    os.environ["QT_QPA_PLATFORM"] = f"offscreen:configfile={Path(__file__).with_name('offscreen.json')}"


def _live_children() -> list[int]:
    """PIDs of this process's children that are still running (Linux: from /proc)."""
    pids: list[int] = []
    task_dir = Path(f"/proc/{os.getpid()}/task")
    if not task_dir.is_dir():
        return [p.pid for p in list(run_worker.CHILDREN) if p.poll() is None]
    for t in task_dir.iterdir():
        try:
            pids += [int(x) for x in (t / "children").read_text().split()]
        except OSError:
            continue
    alive = []
    for pid in pids:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if state != "Z":
            alive.append(pid)
    return alive


@pytest.fixture(autouse=True)
def studio_home(tmp_path, monkeypatch) -> Path:
    home = tmp_path / "studio-home"
    monkeypatch.setenv("QLORA_STUDIO_HOME", str(home))
    monkeypatch.setenv("QLORA_STUDIO_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("QLORA_STUDIO_DEMO_GGUF", raising=False)
    return home


@pytest.fixture(autouse=True)
def gui_thread_gc(qapp):
    """Collect cycles on the GUI thread only, as the app does (app.main.collect_garbage_on_gui_thread)."""
    import gc

    from app.main import collect_garbage_on_gui_thread

    collector = collect_garbage_on_gui_thread()
    yield collector
    collector.timer.stop()
    gc.enable()


@pytest.fixture(autouse=True)
def no_leaks(qapp):
    """Fail a test that leaves a QThread running or an engine process alive (and clean up after it)."""
    before = set(_live_children())
    yield
    leaked_threads = [t.objectName() or repr(t) for t in list(tasks.THREADS) if t.isRunning()]
    leaked_procs = [p for p in list(run_worker.CHILDREN) if p.poll() is None]
    other = [pid for pid in _live_children() if pid not in before and pid not in {p.pid for p in leaked_procs}]
    for p in leaked_procs:
        p.kill()
        p.wait(10)
    for t in list(tasks.THREADS):
        if t.isRunning():
            t.quit()
            t.wait(10_000)
    assert not leaked_threads, f"test left QThreads running: {leaked_threads}"
    assert not leaked_procs, f"test left engine processes alive: {[p.pid for p in leaked_procs]}"
    assert not other, f"test left child processes alive: {other}"


@pytest.fixture
def make_window(qtbot, studio_home):
    """Build MainWindows that never block on a question, and close them (and their runs) at the end."""
    from app.main_window import MainWindow

    made = []

    def make(demo_model=None, **kw):
        w = MainWindow(demo_model=demo_model, **kw)
        w.ask_save_changes = lambda: "discard"
        w.ask_stop_on_close = lambda: True
        w.runs.tell = lambda title, text: w.statusBar().showMessage(f"{title}: {text}")
        w.runs.ask_existing_run = lambda run_dir, new_dir: "new"
        qtbot.addWidget(w)
        w.show()
        made.append(w)
        return w

    yield make
    for w in made:
        if w.runs.running:
            w.runs.abort()
            w.runs.wait(30_000)
            qtbot.waitUntil(lambda w=w: not w.runs.running, timeout=30_000)
        if w.runs.dialog is not None:
            w.runs.dialog.close()
        w._close_after_run = False
        w.close()
        w.deleteLater()
    # destroy the windows now, not during the next test's event loop (a probe would see it)
    from PySide6.QtCore import QCoreApplication, QEvent

    QCoreApplication.sendPostedEvents(None, QEvent.Type.DeferredDelete)


@pytest.fixture
def window(make_window):
    return make_window()


@pytest.fixture
def text_data(tmp_path) -> Path:
    """A tiny text JSONL dataset the tiny model trains on in a few CPU steps."""
    path = tmp_path / "train.jsonl"
    rows = [{"text": f"The quick brown fox {i} jumps over the lazy dog."} for i in range(16)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


@pytest.fixture
def events_dir() -> Path:
    return EVENTS_DIR


class EventLoopProbe:
    """Ticks a 20 ms timer and records, per tick, the wall-clock gap and the GUI thread's CPU time.

    A handler of ours that blocks the event loop shows in both. A busy machine (other test
    runs on the same two cores) and the GIL shared with the reader thread only stretch the
    wall-clock gaps, so the tests hold the GUI thread's own work between two ticks to 100 ms,
    and the wall-clock gaps to a bound that only a real block (a model load or a whole-file
    read on the GUI thread, seconds) would break.

    While it runs, what the process held before it is frozen out of the cycle collector
    (``gc.freeze``): the app's collector runs on the GUI thread, and in a test worker the heap
    holds everything the earlier test files imported and made (torch, transformers: a million
    objects and more, which the window never imports). A full collection of that took 588 ms on
    the GUI thread in CI; of the window's own heap (80 thousand objects) it takes about 23 ms.
    What is made while the probe runs is still collected, and counted.
    """

    def __init__(self) -> None:
        from PySide6.QtCore import QTimer

        self.wall: list[float] = []
        self.cpu: list[float] = []
        self._timer = QTimer()
        self._timer.setInterval(20)
        self._timer.timeout.connect(self._tick)

    def _tick(self) -> None:
        import time

        now, cpu = time.perf_counter(), time.thread_time()
        self.wall.append(now - self._last[0])
        self.cpu.append(cpu - self._last[1])
        self._last = (now, cpu)

    def start(self) -> None:
        import gc
        import time

        gc.freeze()
        self._last = (time.perf_counter(), time.thread_time())
        self._timer.start()

    def stop(self) -> None:
        import gc

        self._timer.stop()
        gc.unfreeze()

    def check(self, cpu_limit: float = 0.1, wall_limit: float = 1.0) -> None:
        assert len(self.wall) > 5, "the probe timer hardly ran"
        worst_cpu = max(self.cpu[1:])
        worst_wall = max(self.wall[1:])
        assert worst_cpu < cpu_limit, f"the GUI thread worked {worst_cpu * 1000:.0f} ms without returning to the loop"
        assert worst_wall < wall_limit, f"the event loop did not answer for {worst_wall * 1000:.0f} ms"


@pytest.fixture
def loop_probe():
    probe = EventLoopProbe()
    yield probe
    probe.stop()
