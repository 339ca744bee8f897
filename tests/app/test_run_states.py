"""State that cannot lie: each page shows the run it is about, derived from the job and its record.

Runs are replayed through the real worker thread and child process (a small script prints
the events; see replay_engine.py), in the real window. Each test walks one story a user
lives through (finish, abort, resume, a second run, a run after a failed one) and checks
every page that shows something of a run: the Run page's state, header, curves, axes and
times; Try and Export; the error dialog.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from app.charts import peak_text
from qlora_engine.checkpoint import write_marker
from qlora_engine.config import TrainConfig
from qlora_engine.events import CheckpointSaved, RunFailed, RunFinished, RunStarted, StepMetrics

REPLAY = Path(__file__).with_name("replay_engine.py")
TOTAL = 12


def segment(
    run_dir: Path,
    steps: range,
    *,
    resumed: bool = False,
    end: str = "finished",
    estimate: float | None = None,
    lr: float = 1e-4,
) -> list:
    """The events of one part of a run: started (or resumed), steps 5 s apart, then its end."""
    events: list = [
        RunStarted(
            run_dir=str(run_dir),
            config=TrainConfig().to_dict(),
            model={},
            device="cpu",
            total_steps=TOTAL,
            resumed_from=str(run_dir / "checkpoints" / f"step-{steps.start - 1:06d}") if resumed else None,
            start_step=steps.start - 1 if resumed else 0,
            vram_estimate={"total": estimate} if estimate else None,
        )
    ]
    for i, step in enumerate(steps):
        events.append(
            StepMetrics(
                step=step, total_steps=TOTAL, epoch=0.0, loss=3.0 - 0.1 * step, learning_rate=lr, grad_norm=1.0,
                tokens=100, tokens_per_second=50.0, elapsed=5.0 * (i + 1), eta=1.0,
            )
        )  # fmt: skip
    last = steps[-1]
    if end == "failed":
        events.append(RunFailed(error_type="DataError", message="a row is broken", traceback="", step=last))
    elif end in ("finished", "stopped"):
        events.append(
            RunFinished(
                step=last, adapter_dir=str(run_dir / "adapter"), stopped_early=end == "stopped", final_loss=1.0,
                final_eval_loss=None, elapsed=5.0 * len(steps),
            )
        )  # fmt: skip
    return events


def write(path: Path, events: list) -> Path:
    path.write_text("".join(json.dumps(e.to_dict()) + "\n" for e in events), encoding="utf-8")
    return path


def play(qtbot, window, tmp_path: Path, name: str, events: list, *extra: str, final: str | None = "finished") -> Path:
    """Start a run named ``name`` from the form whose engine prints ``events``; wait for its end."""
    run_dir = tmp_path / "runs" / name
    stream = write(tmp_path / f"{name}.jsonl", events)
    window.runs.command_factory = lambda config, resume=None: [
        sys.executable, str(REPLAY), str(stream), "--write-adapter", *extra
    ]  # fmt: skip
    window.config_model.set_values(
        {("model", "ref"): str(tmp_path), ("data", "path"): str(stream), ("output", "dir"): str(run_dir)}
    )
    if final is None:
        assert window.runs.start()
        return run_dir
    with qtbot.waitSignal(window.runs.ended, timeout=30_000) as ended:
        assert window.runs.start()
    assert ended.args == [final]
    window.run_view.redraw()
    return run_dir


def loss_steps(window) -> list[float]:
    return list(window.run_view.charts.curves["train loss"].getData()[0])


def test_a_finished_run_is_finished_on_every_page_even_if_abort_was_clicked_late(qtbot, window, tmp_path):
    run_dir = tmp_path / "runs" / "a"
    play(qtbot, window, tmp_path, "a", segment(run_dir, range(1, 13)), "--hang", final=None)
    qtbot.waitUntil(lambda: window.runs.record.finished is not None, timeout=30_000)
    with qtbot.waitSignal(window.runs.ended, timeout=30_000) as ended:
        window.run_view.abort_button.click()  # the engine said run_finished, then was killed
    assert ended.args == ["finished"]
    view = window.run_view
    assert view.state_label.text() == "Finished" and view.title.text() == "Run: a"
    assert "Aborted" not in view.log.toPlainText()
    assert window.result_page.try_page.run_dir == run_dir == window.result_page.export_page.run_dir
    assert str(run_dir) in window.result_page.try_page.run_label.text()
    assert window.result_page.export_page.export_button.isEnabled()


def test_abort_while_training_is_aborted(qtbot, window, tmp_path):
    run_dir = tmp_path / "runs" / "b"
    play(qtbot, window, tmp_path, "b", segment(run_dir, range(1, 4), end="none"), "--hang", final=None)
    qtbot.waitUntil(lambda: window.runs.record.step == 3, timeout=30_000)
    with qtbot.waitSignal(window.runs.ended, timeout=30_000) as ended:
        window.run_view.abort_button.click()
    assert ended.args == ["aborted"] and window.run_view.state_label.text() == "Aborted"
    assert window.runs.dialog is None  # an abort the user asked for is not a failure
    assert (
        window.result_page.try_page.run_dir == run_dir and not window.result_page.try_page.generate_button.isEnabled()
    )


def test_resume_keeps_the_curve_and_the_time_before_it(qtbot, window, tmp_path):
    run_dir = tmp_path / "runs" / "c"
    ckpt = run_dir / "checkpoints" / "step-000006"
    ckpt.mkdir(parents=True)
    write_marker(ckpt, {"step": 6})
    cfg = TrainConfig()
    cfg.model.ref, cfg.data.path, cfg.output.dir = str(tmp_path), str(tmp_path / "x.jsonl"), str(run_dir)
    cfg.save(run_dir / "config.yaml")
    first = segment(run_dir, range(1, 7), end="stopped")  # 30 s of training, stopped at step 6
    write(run_dir / "events.jsonl", [*first[:-1], CheckpointSaved(step=6, path=str(ckpt)), first[-1]])
    stream = write(tmp_path / "c2.jsonl", segment(run_dir, range(7, 13), resumed=True))  # 30 s more
    window.runs.command_factory = lambda config, resume=None: [sys.executable, str(REPLAY), str(stream)]
    with qtbot.waitSignal(window.runs.ended, timeout=30_000) as ended:
        assert window.runs.resume(run_dir)
    assert ended.args == ["finished"]
    window.run_view.redraw()
    assert loss_steps(window) == list(range(1, 13))  # the part before the resume stays on the chart
    assert window.runs.record.elapsed == pytest.approx(60.0)
    assert "elapsed 1:00" in window.run_view.eta.text()
    assert window.run_view.progress.value() == TOTAL


def test_a_second_run_leaves_nothing_of_the_first_on_any_page(qtbot, window, tmp_path):
    a = tmp_path / "runs" / "a"
    play(qtbot, window, tmp_path, "a", segment(a, range(1, 13), estimate=3 * 2**30))
    charts = window.run_view.charts
    assert charts.estimate_line.isVisible()
    # what the user did with run a: an answer in Try, an export, a zoomed chart
    page = window.result_page
    page.try_page.panes["tuned"].setPlainText("You: hi\n\nModel: an answer of run a")
    page.export_page.phase.setText(f"Exported to {tmp_path / 'a-adapter'}")
    page.export_page.last_export = tmp_path
    charts.loss.setXRange(0, 1000)
    # Start names the run it will train, not the one on screen
    b = tmp_path / "runs" / "b"
    window.config_model.set_value("output", "dir", str(b))
    window.update_run_summary()
    assert window.run_view.title.text() == "Run: a"
    assert window.run_view.summary.text().startswith("Start trains:") and str(b) in window.run_view.summary.text()
    play(qtbot, window, tmp_path, "b", segment(b, range(1, 4)))
    assert window.run_view.title.text() == "Run: b" and window.run_view.state_label.text() == "Finished"
    assert loss_steps(window) == [1, 2, 3]
    qtbot.waitUntil(lambda: charts.loss.viewRange()[0][1] < 10, timeout=5_000)  # run b's axes, not a's zoom
    assert not charts.estimate_line.isVisible()  # run b carried no estimate: none of run a's is shown
    assert page.try_page.run_dir == b and page.try_page.panes["tuned"].toPlainText() == ""
    assert page.export_page.run_dir == b and page.export_page.phase.text() == ""
    assert page.export_page.last_export is None and not page.export_page.open_button.isEnabled()


def test_a_run_after_a_failed_one(qtbot, window, tmp_path):
    a = tmp_path / "runs" / "a"
    shown = []
    window.runs.error_shown.connect(shown.append)
    play(qtbot, window, tmp_path, "a", segment(a, range(1, 3), end="failed"), "--exit", "2", final="failed")
    assert len(shown) == 1 and shown[0].isVisible()
    assert window.run_view.state_label.text() == "Failed"
    assert shown[0].traceback.isVisible()  # no user-error attributes: the details are the point
    b = tmp_path / "runs" / "b"
    play(qtbot, window, tmp_path, "b", segment(b, range(1, 4)))
    assert not shown[0].isVisible() and window.runs.dialog is None  # run a's failure is gone
    assert window.run_view.title.text() == "Run: b" and window.run_view.state_label.text() == "Finished"
    assert "a row is broken" not in window.run_view.log.toPlainText()
    assert window.result_page.try_page.run_dir == b and window.result_page.try_page.generate_button.isEnabled()


def test_one_point_charts_stay_above_zero_and_a_small_peak_is_not_zero(qtbot, window, tmp_path):
    run_dir = tmp_path / "runs" / "one"
    play(qtbot, window, tmp_path, "one", segment(run_dir, range(1, 2), estimate=35 * 2**20, lr=2e-4))
    charts = window.run_view.charts
    charts.draw(window.run_view.record, force=True)
    qtbot.wait(50)  # let the views settle their ranges
    for key, plot in charts.plots.items():
        (x0, _), (y0, y1) = plot.viewRange()
        assert x0 >= 0 and y0 >= 0 and y1 > y0, key
    assert peak_text(35 * 2**20) == "35 MiB" and peak_text(3 * 2**30) == "3.00 GiB"
    assert charts.estimate_line.label.format == "predicted peak 35 MiB"


def test_start_refuses_a_model_the_engine_flagged(qtbot, window, tmp_path):
    not_a_model = tmp_path / "notes.txt"
    not_a_model.write_text("these are notes, not weights")
    window.config_model.set_values(
        {("model", "ref"): str(not_a_model), ("data", "path"): str(not_a_model), ("output", "dir"): str(tmp_path / "o")}
    )
    window.model_page.inspect_now()
    qtbot.waitUntil(lambda: window.model_page.error is not None, timeout=60_000)
    window.show_page("run")
    assert not window.runs.start()
    assert window.current_page == "model" and window.runs.job is None
    window.config_model.set_value("model", "ref", "")  # the flag was about that model: it goes with it
    assert window.model_page.error is None
