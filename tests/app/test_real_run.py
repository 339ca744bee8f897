"""Real runs: the form filled as a user fills it, the real engine as a child process, a tiny
NF4 Llama trained on the CPU. Stop and resume from the history; close the window mid-run.
"""

from __future__ import annotations

from pathlib import Path

from PySide6.QtCore import Qt
from PySide6.QtWidgets import QApplication

from qlora_engine.checkpoint import list_checkpoints
from qlora_engine.events import StepMetrics, read_events


def type_into(qtbot, editor, text: str) -> None:
    editor.clear()
    qtbot.keyClicks(editor, text)


def fill_form(qtbot, window, model_dir: Path, data: Path, out: Path, steps: int, save_steps: int | None) -> None:
    """Go through the pages in order, as a person would."""
    w = window
    f = lambda page, key: page.bindings[key].editor  # noqa: E731
    w.show_page("model")
    with qtbot.waitSignal(w.model_page.info_changed, timeout=60_000, check_params_cb=lambda info: info is not None):
        type_into(qtbot, f(w.model_page, "model.ref"), str(model_dir))
    assert w.model_page.fact_labels["architecture"].text() == "LlamaForCausalLM"
    w.next_button.click()
    assert w.current_page == "data"
    type_into(qtbot, f(w.data_page, "data.path"), str(data))
    w.next_button.click()
    assert w.current_page == "adapter"
    rank = f(w.adapter_page, "lora.rank")
    rank.setValue(8)
    w.adapter_page.preset_buttons["attention"].click()
    w.next_button.click()
    assert w.current_page == "training"
    t = w.training_page
    f(t, "train.max_steps").setValue(steps)
    f(t, "train.save_steps").setValue(save_steps or 0)
    f(t, "train.gradient_accumulation_steps").setValue(1)
    f(t, "train.micro_batch_size").setValue(2)
    f(t, "data.max_length").setValue(64)
    device = f(t, "train.device")
    device.setCurrentIndex(device.findData("cpu"))
    type_into(qtbot, f(t, "output.dir"), str(out))
    type_into(qtbot, f(t, "optim.learning_rate"), "1e-3")
    w.next_button.click()
    assert w.current_page == "run"
    cfg = w.config_model.config
    assert w.config_model.valid, w.config_model.errors
    assert (cfg.lora.rank, cfg.lora.target_modules, cfg.train.max_steps, cfg.optim.learning_rate) == (
        8,
        ["attention"],
        steps,
        1e-3,
    )


def test_full_run_from_the_form(qtbot, window, tiny_model_dir, text_data, tmp_path, loop_probe):
    out = tmp_path / "runs" / "first"
    fill_form(qtbot, window, tiny_model_dir, text_data, out, steps=6, save_steps=3)
    QApplication.processEvents()  # fill_form ends on the run page: its first paint is done before we measure
    loop_probe.start()
    ctl = window.runs
    with qtbot.waitSignal(ctl.ended, timeout=120_000) as blocker:
        qtbot.mouseClick(window.run_view.start_button, Qt.MouseButton.LeftButton)
    loop_probe.stop()
    assert blocker.args == ["finished"], window.run_view.log.toPlainText()
    # the log says which fast paths the run took (attention adapters: 4 a layer, 2 layers; no GPU kernels)
    assert "no fused kernels, fast LoRA on 8 layers" in window.run_view.log.toPlainText()
    steps = [e for e in read_events(out / "events.jsonl") if isinstance(e, StepMetrics)]
    assert [s.step for s in steps] == [1, 2, 3, 4, 5, 6]
    window.run_view.redraw()
    xs, ys = window.run_view.charts.curves["train loss"].getData()
    assert list(xs) == [1, 2, 3, 4, 5, 6]  # a point per logged step
    assert (out / "adapter" / "adapter_model.safetensors").is_file()
    assert window.run_view.progress.value() == 6
    loop_probe.check()


def test_stop_mid_run_then_resume_from_history(qtbot, window, tiny_model_dir, text_data, tmp_path):
    out = tmp_path / "runs" / "stopped"
    fill_form(qtbot, window, tiny_model_dir, text_data, out, steps=10, save_steps=None)
    ctl = window.runs
    with qtbot.waitSignal(ctl.event, timeout=120_000, check_params_cb=lambda e: isinstance(e, StepMetrics)):
        window.run_view.start_button.click()
    with qtbot.waitSignal(ctl.ended, timeout=120_000) as blocker:
        window.run_view.stop_button.click()
    assert blocker.args == ["stopped"], window.run_view.log.toPlainText()
    stopped_at = ctl.record.step
    assert 1 <= stopped_at < 10
    assert [s for s, _ in list_checkpoints(out / "checkpoints")] == [stopped_at]

    window.show_page("history")
    with qtbot.waitSignal(window.history.refreshed, timeout=10_000):
        window.history.refresh()
    assert window.history.select_path(out)
    summary = window.history.selected()[0]
    assert summary.status == "stopped" and summary.resumable
    assert window.history.resume_button.isEnabled()
    with qtbot.waitSignal(ctl.ended, timeout=120_000) as blocker:
        window.history.resume_button.click()
    assert blocker.args == ["finished"], window.run_view.log.toPlainText()
    rec = ctl.record
    assert rec.started.resumed_from and rec.started.start_step == stopped_at
    assert rec.step == 10
    window.run_view.redraw()
    xs, _ = window.run_view.charts.curves["train loss"].getData()
    assert list(xs) == list(range(1, 11))  # the curve before the stop stays; the resumed steps follow
    assert rec.elapsed > rec.segment_elapsed > 0  # and so does the training time before it
    assert (out / "adapter").is_dir()


def test_closing_the_window_mid_run_stops_the_child(qtbot, make_window, tiny_model_dir, text_data, tmp_path):
    window = make_window()
    out = tmp_path / "runs" / "closed"
    fill_form(qtbot, window, tiny_model_dir, text_data, out, steps=200, save_steps=None)
    ctl = window.runs
    with qtbot.waitSignal(ctl.event, timeout=120_000, check_params_cb=lambda e: isinstance(e, StepMetrics)):
        window.run_view.start_button.click()
    proc = ctl.job._worker.proc
    asked = []
    window.ask_stop_on_close = lambda: asked.append(True) or True
    window.close()
    assert asked == [True]
    assert window.isVisible()  # it waits for the run to save
    qtbot.waitUntil(lambda: not window.isVisible(), timeout=120_000)
    assert proc.poll() is not None
    assert ctl.state == "stopped"
    assert list_checkpoints(out / "checkpoints"), "the stopped run saved a checkpoint"
    assert not ctl.job._thread.isRunning()
