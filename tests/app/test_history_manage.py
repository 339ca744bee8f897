"""The fuller history: sort by value, filter, title and notes kept with the run, delete, open logs."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
from PySide6.QtCore import Qt

from app import run_catalog
from app.history import HistoryPage, summarize


@pytest.fixture
def runs(tmp_path, events_dir) -> Path:
    """Three recorded runs (finished, stopped, out of memory) with their real event streams."""
    root = tmp_path / "runs"
    for name in ("normal", "stop", "oom"):
        (root / name).mkdir(parents=True)
        shutil.copy(events_dir / f"{name}.jsonl", root / name / "events.jsonl")
    return root


@pytest.fixture
def history(qtbot, window, runs) -> HistoryPage:
    page = window.history
    page.set_source_provider(lambda: ([runs], []))
    window.show_page("history")
    with qtbot.waitSignal(page.refreshed, timeout=10_000):
        page.refresh()
    return page


def refreshed(qtbot, page, action) -> None:
    with qtbot.waitSignal(page.refreshed, timeout=10_000):
        action()


def column(page: HistoryPage, name: str) -> list[str]:
    c = page.COLUMNS.index(name)
    return [page.table.item(r, c).text() for r in range(page.table.rowCount()) if not page.table.isRowHidden(r)]


def test_columns_sort_by_value(history):
    losses = {s.name: s.final_loss for s in history.runs}
    assert all(v is not None for v in losses.values())
    history.table.sortByColumn(history.COLUMNS.index("Train loss"), Qt.SortOrder.AscendingOrder)
    assert [s.name for s in history.visible_runs()] == sorted(losses, key=losses.get)
    steps = [s.step for s in history.visible_runs()]
    history.table.sortByColumn(history.COLUMNS.index("Steps"), Qt.SortOrder.DescendingOrder)
    assert [s.step for s in history.visible_runs()] == sorted(steps, reverse=True)  # as numbers, not text
    # the selection follows the run, not the row, through a sort
    history.select_path(history.runs[0].path)
    chosen = history.selected()[0].path
    history.table.sortByColumn(0, Qt.SortOrder.AscendingOrder)
    assert [s.path for s in history.selected()] == [chosen]


def test_title_and_notes_are_kept_with_the_run_and_filtered_on(qtbot, history, runs):
    history.ask_text = lambda title, label, text, multiline=False: (
        "baseline, lr 2e-4" if not multiline else "first try\nloss flat after step 8"
    )
    history.select_path(runs / "stop")
    refreshed(qtbot, history, history._rename_selected)
    history.select_path(runs / "stop")
    refreshed(qtbot, history, history._edit_notes_selected)
    saved = json.loads((runs / "stop" / run_catalog.NOTES_FILE).read_text())
    assert saved == {"title": "baseline, lr 2e-4", "notes": "first try\nloss flat after step 8"}
    assert summarize(runs / "stop").display_name == "baseline, lr 2e-4"
    assert (runs / "stop").is_dir()  # the folder keeps its name: configs and checkpoints name it
    assert "baseline, lr 2e-4" in column(history, "Run") and "first try" in column(history, "Notes")
    history.filter.setText("flat")  # a word of the notes
    assert [s.name for s in history.visible_runs()] == ["stop"]
    history.filter.setText("failed")  # the status
    assert [s.name for s in history.visible_runs()] == ["oom"]
    history.filter.setText("nothing like this")
    assert history.visible_runs() == [] and "0 of 3 runs match" in history.info.text()
    history.filter.clear()
    assert len(history.visible_runs()) == 3


def test_delete_moves_the_run_away_and_refuses_a_live_one(qtbot, history, runs, tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "xdg"))  # the trash of this test, not the user's
    asked, told = [], []
    history.tell = lambda title, text: told.append(title)
    history.ask_delete = lambda s, permanently: asked.append((s.name, permanently)) or True
    history.select_path(runs / "oom")
    refreshed(qtbot, history, history._delete_selected)
    assert not (runs / "oom").exists()
    assert {s.name for s in history.runs} == {"normal", "stop"}
    assert asked[0] == ("oom", False)
    assert asked[1:] in ([], [("oom", True)])  # to the trash; or, where there is none, a second yes first
    # a live run (its lock held by a live process: this one) is not deleted
    (runs / "normal" / "run.lock").write_text(json.dumps({"pid": os.getpid()}))
    live = summarize(runs / "normal")
    assert live.alive
    assert history.delete_run(live) is False and (runs / "normal" / "events.jsonl").is_file()
    assert told == ["Run in progress"] and len(asked) in (1, 2)  # refused before any question
    with pytest.raises(run_catalog.RunBusyError):
        run_catalog.delete_run(runs / "normal", alive=True)
    with pytest.raises(ValueError):  # never anything that is not a run folder
        run_catalog.delete_run(tmp_path, alive=False)


def test_open_logs_serves_the_runs_tensorboard_files(qtbot, history, runs):
    pytest.importorskip("tensorboard")
    from torch.utils.tensorboard import SummaryWriter

    opened = []
    history.open_url = opened.append
    with SummaryWriter(str(runs / "normal" / "tensorboard")) as w:
        for step in range(1, 4):
            w.add_scalar("train/loss", 3.0 / step, step)
    url = history.open_logs(runs / "normal")
    try:
        assert url.startswith("http://127.0.0.1:")
        # the engine's own command (which the frozen app runs as `qlora-studio --engine ...`), not `python -m tensorboard`
        assert history.tensorboards[runs / "normal"].command[1:4] == ["-m", "qlora_engine", "tensorboard"]
        qtbot.waitUntil(lambda: opened == [url], timeout=60_000)
        import urllib.request

        with urllib.request.urlopen(url + "data/runs", timeout=10) as r:  # TensorBoard's own API
            assert json.loads(r.read()) == ["."]
    finally:
        history.shutdown()
    assert not history.tensorboards
    # a run without event files: its folder opens instead
    assert history.open_logs(runs / "stop") == str(runs / "stop")


def test_the_frozen_entry_serves_tensorboard_through_the_engine(qtbot, runs):
    """What the PyInstaller build runs for Open logs: its entry script with ``--engine tensorboard``."""
    pytest.importorskip("tensorboard")
    import sys
    import urllib.request

    from torch.utils.tensorboard import SummaryWriter

    from app.run_worker import engine_env

    logdir = runs / "normal" / "tensorboard"
    with SummaryWriter(str(logdir)) as w:
        w.add_scalar("train/loss", 1.0, 1)
    frozen_main = Path(__file__).resolve().parents[2] / "packaging" / "frozen_main.py"
    server = run_catalog.TensorBoardServer(logdir, lambda *a: [sys.executable, str(frozen_main), "--engine", *a], engine_env())
    server.start()
    try:
        qtbot.waitUntil(server.ready, timeout=60_000)
        with urllib.request.urlopen(server.url + "data/runs", timeout=10) as r:
            assert json.loads(r.read()) == ["."]
    finally:
        server.stop()
    assert not server.alive
