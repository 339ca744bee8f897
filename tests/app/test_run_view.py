"""The run view driven by recorded event streams, through the real worker thread and child process.

A small replay script stands in for the engine (tests/app/replay_engine.py), so these tests
exercise the QThread worker, the JSON parsing, the record, the charts, the error dialog and
the history without loading a model.
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import pytest
from PySide6.QtGui import QGuiApplication
from PySide6.QtWidgets import QApplication

from app.history import scan, summarize
from app.run_record import RunRecord
from qlora_engine.config import TrainConfig
from qlora_engine.events import RunFailed, StepMetrics, read_events

REPLAY = Path(__file__).with_name("replay_engine.py")


def use_replay(window, events: Path, *extra: str) -> None:
    window.runs.command_factory = lambda config, resume=None: [
        sys.executable,
        str(REPLAY),
        str(events),
        *extra,
    ]


def ready(window, tmp_path: Path) -> None:
    """A configuration that passes the checks before a run (the replay ignores it)."""
    window.config_model.set_values(
        {
            ("model", "ref"): str(tmp_path / "model"),
            ("data", "path"): str(tmp_path / "data.jsonl"),
            ("output", "dir"): str(tmp_path / "runs" / "replayed"),
        }
    )


def run_replay(qtbot, window, tmp_path, events: Path, *extra: str, final: str | None = None) -> None:
    use_replay(window, events, *extra)
    ready(window, tmp_path)
    with qtbot.waitSignal(window.runs.ended, timeout=30_000) as blocker:
        assert window.runs.start()
    if final:
        assert blocker.args == [final]


def test_normal_run_draws_every_step(qtbot, window, tmp_path, events_dir):
    events = read_events(events_dir / "normal.jsonl")
    steps = [e for e in events if isinstance(e, StepMetrics)]
    run_replay(qtbot, window, tmp_path, events_dir / "normal.jsonl", final="finished")
    view = window.run_view
    view.redraw()
    xs, ys = view.charts.curves["train loss"].getData()
    assert list(xs) == [s.step for s in steps]
    assert list(ys) == pytest.approx([s.loss for s in steps])
    lr_x, _ = view.charts.curves["learning rate"].getData()
    assert len(lr_x) == len(steps)
    assert len(view.charts.curves["tokens/s"].getData()[0]) == len(steps)
    assert len(view.charts.curves["grad norm"].getData()[0]) == len(steps)
    assert view.progress.value() == view.progress.maximum() == steps[-1].total_steps
    assert view.state_label.text() == "Finished"
    assert view.start_button.isEnabled() and not view.stop_button.isEnabled() and not view.abort_button.isEnabled()
    log = view.log.toPlainText()
    assert "finished at step 12" in log and "replay engine: starting" in log
    assert window.runs.dialog is None
    assert window.current_page == "run"
    assert window.budget.isHidden()  # the run page shows the run, not the configuration
    view.charts.draw(view.record, force=True)
    assert [label.text for _, label in view.charts.loss.legend.items] == ["train loss"]  # no eval in this run
    assert view.charts.vram.legend.items == []  # a CPU run: no memory series


def test_out_of_memory_shows_one_error_dialog(qtbot, window, tmp_path, events_dir):
    shown = []
    window.runs.error_shown.connect(shown.append)
    run_replay(qtbot, window, tmp_path, events_dir / "oom.jsonl", "--exit", "1", final="failed")
    assert len(shown) == 1
    dialog = shown[0]
    failure = read_events(events_dir / "oom.jsonl")[-1]
    assert isinstance(failure, RunFailed)
    assert dialog.isVisible()
    assert "CUDA out of memory" in dialog.findChild(type(dialog.facts), "errorMessage").text()
    assert "gradient_checkpointing" in dialog.findChild(type(dialog.facts), "errorHint").text()
    assert "step-000004" in dialog.facts.text()  # the checkpoint to resume from
    assert str(window.runs.log_path) in dialog.facts.text()  # the run's log
    assert dialog.traceback.toPlainText() == failure.traceback
    assert dialog.traceback.isReadOnly()
    dialog.copy_details()
    assert "OutOfMemoryError" in QGuiApplication.clipboard().text()
    assert window.run_view.state_label.text() == "Failed"
    # the engine's own memory figures and the predicted peak are on the VRAM chart
    charts = window.run_view.charts
    window.run_view.redraw()
    assert len(charts.curves["torch reserved"].getData()[0]) == 5
    assert charts.estimate_line.isVisible()
    assert charts.estimate_line.value() == pytest.approx(
        RunRecord.from_events(read_events(events_dir / "oom.jsonl")).estimate_peak / 2**30
    )


def test_user_stop_replay_and_engine_crash(qtbot, window, tmp_path, events_dir):
    run_replay(qtbot, window, tmp_path, events_dir / "stop.jsonl", final="stopped")
    assert window.run_view.state_label.text() == "Stopped (saved)"
    assert window.runs.dialog is None
    # an engine that dies without a word still gets the error dialog, with its stderr as the details
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    shown = []
    window.runs.error_shown.connect(shown.append)
    run_replay(qtbot, window, tmp_path, empty, "--exit", "3", final="failed")
    assert len(shown) == 1
    assert "exit code 3" in shown[0].failure.message
    assert "replay engine: done" in shown[0].traceback.toPlainText()


def test_stop_and_abort_reach_the_child(qtbot, window, tmp_path, events_dir):
    use_replay(window, events_dir / "normal.jsonl", "--hang")
    ready(window, tmp_path)
    ctl = window.runs
    with qtbot.waitSignal(ctl.updated, timeout=20_000):
        window.runs.start()
    assert window.run_view.stop_button.isEnabled() and not window.run_view.start_button.isEnabled()
    with qtbot.waitSignal(ctl.ended, timeout=20_000) as blocker:
        window.run_view.stop_button.click()
    assert blocker.args == ["stopped"]  # the replay finished as the engine does on "stop"
    # a run still training (no run_finished yet) is aborted
    unfinished = tmp_path / "unfinished.jsonl"
    lines = (events_dir / "normal.jsonl").read_text().splitlines(keepends=True)
    unfinished.write_text("".join(ln for ln in lines if '"run_finished"' not in ln and '"done"' not in ln))
    use_replay(window, unfinished, "--hang")
    window.config_model.set_value("output", "dir", str(tmp_path / "runs" / "second"))
    with qtbot.waitSignal(ctl.updated, timeout=20_000):
        window.runs.start()
    pid = ctl.job.pid
    with qtbot.waitSignal(ctl.ended, timeout=20_000) as blocker:
        window.run_view.abort_button.click()
    assert blocker.args == ["aborted"]
    assert ctl.job.returncode != 0
    assert not Path(f"/proc/{pid}").exists() or "Z" in Path(f"/proc/{pid}/stat").read_text().split(")")[-1][:3]
    assert "Aborted" in window.run_view.log.toPlainText()


def test_window_answers_timers_while_events_stream(qtbot, window, tmp_path, events_dir, loop_probe):
    """The event loop keeps answering a 20 ms timer while three thousand events stream in."""
    many = tmp_path / "many.jsonl"
    lines = (events_dir / "normal.jsonl").read_text().splitlines()
    head = [ln for ln in lines if '"event": "step"' not in ln and '"run_finished"' not in ln]
    step_line = next(ln for ln in lines if '"event": "step"' in ln)
    import json

    step = json.loads(step_line)
    body = []
    for i in range(1, 3001):
        step.update(step=i, total_steps=3000, loss=6.0 - i / 1000)
        body.append(json.dumps(step))
    tail = [ln for ln in lines if '"run_finished"' in ln]
    many.write_text("\n".join(head + body + tail) + "\n")
    use_replay(window, many, "--delay", "0.0005")
    ready(window, tmp_path)
    window.show_page("run")  # the first paint of the charts is a page switch, not streaming
    QApplication.processEvents()
    loop_probe.start()
    with qtbot.waitSignal(window.runs.ended, timeout=60_000):
        window.runs.start()
    loop_probe.stop()
    window.run_view.redraw()
    assert len(window.run_view.charts.curves["train loss"].getData()[0]) == 3000
    loop_probe.check()


def test_history_lists_runs_and_redraws_one(qtbot, window, tmp_path, events_dir):
    runs = tmp_path / "runs"
    for name in ("normal", "stop", "oom"):
        d = runs / name
        d.mkdir(parents=True)
        shutil.copy(events_dir / f"{name}.jsonl", d / "events.jsonl")
    (runs / "stop" / "checkpoints" / "step-000003").mkdir(parents=True)
    assert summarize(runs / "normal").status == "finished"
    assert summarize(runs / "oom").status == "failed"
    assert summarize(runs / "stop").status == "stopped"
    window.history.set_source_provider(lambda: ([runs], []))
    with qtbot.waitSignal(window.history.refreshed, timeout=10_000):
        window.history.refresh()
    assert {s.name for s in window.history.runs} == {"normal", "stop", "oom"}
    assert len(scan([runs], [runs / "normal"])) == 3  # no duplicates
    window.history.select_path(runs / "normal")
    window.history.open_button.click()
    assert window.current_page == "run"
    xs, _ = window.run_view.charts.curves["train loss"].getData()
    assert len(xs) == 12
    assert "from history" in window.run_view.title.text()
    # overlay the runs' loss curves
    window.history.table.selectAll()
    window.history.compare_button.click()
    assert window.run_view.charts.overlay_count == 3
    # a finished run's configuration goes back into the form, pointed at a fresh folder
    started = RunRecord.from_dir(runs / "normal").started
    TrainConfig.from_dict(started.config).save(runs / "normal" / "config.yaml")
    window.show_page("history")
    window.history.table.clearSelection()
    window.history.select_path(runs / "normal")
    assert window.history.load_button.isEnabled()
    window.history.load_button.click()
    cfg = window.config_model.config
    assert cfg.train.max_steps == started.config["train"]["max_steps"]
    assert cfg.output.dir == str(runs / "normal-2")
    assert window.current_page == "model"
