"""The budget panel: the real estimate of the tiny model, against a card of a chosen size.

This machine has no GPU, so the card is described to the panel as NVML would list it
(a ``GpuInfo``); the estimate, the fit search and the suggestions are the engine's own.
"""

from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path

from app.budget_panel import CUSTOM_CARD, FASTER_TITLE
from qlora_engine.gpu import GpuInfo

SMALL_CARD = GpuInfo(index=0, name="Test GPU 1 GiB", total_bytes=2**30, free_bytes=2**30, used_bytes=0, uuid="GPU-test")


def with_model(qtbot, window, model_dir: Path) -> None:
    with qtbot.waitSignal(window.budget.updated, timeout=60_000):
        window.config_model.set_value("model", "ref", str(model_dir))


def test_cpu_estimate_without_a_card(qtbot, window, tiny_model_dir):
    panel = window.budget
    assert panel.gpu_combo.currentText().startswith("CPU")
    assert "Choose a model" in panel.status.text()
    with_model(qtbot, window, tiny_model_dir)
    assert panel.result is not None
    est = panel.result["estimate"]
    assert panel.bar.total == sum(est.components.values())
    assert "GiB" in panel.headline.text()
    assert panel.property("state") == "cpu"
    # a CPU run has no CUDA context and keeps no weight dequantized: neither is counted, nor listed
    assert est.components["cuda_context"] == 0 and est.components["dequantized_weights"] == 0
    assert panel.legend.count() == 3 * (len(est.components) - 2)
    shown = [panel.legend.itemAtPosition(r, 1).widget().text() for r in range(len(est.components) - 2)]
    assert "cuda context" not in shown and "dequantized weights" not in shown
    assert "quantized weights" in shown


def legend_names(panel) -> list[str]:
    return [panel.legend.itemAtPosition(r, 1).widget().text() for r in range(panel.legend.count() // 3)]


def test_a_roomy_card_lists_the_weights_auto_keeps_dequantized_and_the_switch_takes_them_out(
    qtbot, window, tiny_model_dir
):
    panel = window.budget
    with_model(qtbot, window, tiny_model_dir)
    assert "dequantized weights" not in legend_names(panel)  # the CPU keeps none
    with qtbot.waitSignal(panel.updated, timeout=10_000):
        panel.plan_for(24)  # the tiny model needs no checkpointing there, and has room to keep them
    est = panel.result["estimate"]
    assert est.components["dequantized_weights"] > 0 and "dequantized weights" in legend_names(panel)
    assert any(note.startswith("train.keep_dequantized auto: on (the run fits") for note in est.notes), est.notes
    assert "Weights kept dequantized (auto): on, the run fits 24.0 GiB with them" in panel.status.text()
    with qtbot.waitSignal(panel.updated, timeout=10_000):
        window.config_model.set_value("train", "keep_dequantized", False)
    est_off = panel.result["estimate"]
    assert est_off.components["dequantized_weights"] == 0 and "dequantized weights" not in legend_names(panel)
    assert est_off.total == est.total - est.components["dequantized_weights"]
    assert "Weights kept dequantized" not in panel.status.text()  # false: nothing to decide


def test_planning_for_a_card_of_another_machine(qtbot, window, tiny_model_dir):
    """No GPU here: choose the card of the box the run is for; its CUDA context counts, nothing runs on it."""
    panel = window.budget
    with_model(qtbot, window, tiny_model_dir)
    cpu_total = panel.result["estimate"].total
    with qtbot.waitSignal(panel.updated, timeout=10_000):
        panel.plan_for(24)
    assert panel.gpu_combo.currentText() == "Plan for a 24 GB card"
    assert panel.result["gpu_bytes"] == 24564 * 2**20
    assert panel.bar.capacity == 24564 * 2**20
    est = panel.result["estimate"]
    from qlora_engine.budget.allocator import CALIBRATION

    assert est.components["cuda_context"] == CALIBRATION["cuda_context"] > 0  # it will exist on that card
    assert est.total > cpu_total
    assert panel.property("state") == "ok" and " of 23.99 GiB" in panel.headline.text()
    assert panel.selected_gpu() is None  # the run itself is not sent to a card this machine lacks
    assert panel.target_gib.isHidden()  # the size box is for "a card of …" only
    with qtbot.waitSignal(panel.updated, timeout=10_000):
        panel.plan_for(1.5)  # a number: any size, in GiB
    assert not panel.target_gib.isHidden()
    assert panel.result["gpu_bytes"] == 3 * 2**29
    with qtbot.waitSignal(panel.updated, timeout=10_000):
        window.config_model.set_values({("train", "micro_batch_size"): 64, ("data", "max_length"): 4096})
    assert panel.property("state") == "over" and panel.suggestion_buttons
    panel.refresh_gpus()  # looking for local GPUs again keeps the planned card
    assert panel.gpu_combo.currentData() == CUSTOM_CARD and panel.planned_card().total_bytes == 3 * 2**29


def test_over_budget_turns_red_and_a_suggestion_applies(qtbot, window, tiny_model_dir):
    panel = window.budget
    panel.set_gpus([SMALL_CARD])
    assert panel.selected_gpu() == SMALL_CARD
    with_model(qtbot, window, tiny_model_dir)
    assert panel.property("state") == "ok"
    with qtbot.waitSignal(panel.updated, timeout=10_000):
        window.config_model.set_values(
            {
                ("train", "micro_batch_size"): 64,
                ("data", "max_length"): 4096,
                ("train", "gradient_checkpointing"): False,
            }
        )
    assert panel.property("state") == "over"
    assert "Does not fit" in panel.status.text()
    assert panel.bar.capacity == 2**30 and panel.bar.total > 2**30
    assert panel.suggestion_buttons and panel.suggest_title.isVisibleTo(panel)
    first = panel.suggestion_buttons[0]
    overrides = panel.result["advice"].suggestions[0].overrides
    assert first.toolTip() == "Apply: " + ", ".join(overrides)
    with qtbot.waitSignal(panel.updated, timeout=10_000):
        first.click()
    cfg = window.config_model.config
    for item in overrides:
        key, value = item.split("=")
        section, name = key.split(".")
        assert str(getattr(getattr(cfg, section), name)) == value
    assert panel.property("state") == "ok"
    faster = panel.result["advice"].faster  # a fitting run is offered at most the one faster change
    assert len(panel.suggestion_buttons) == (faster is not None)
    assert "Largest micro-batch that fits" in panel.largest.text()


def test_auto_checkpointing_says_what_it_chose_for_the_card(qtbot, window, tiny_model_dir):
    panel = window.budget
    panel.set_gpus([SMALL_CARD])
    with_model(qtbot, window, tiny_model_dir)
    assert window.config_model.config.train.gradient_checkpointing == "auto"
    est = panel.result["estimate"]
    assert est.details["checkpointing_auto"] and not est.details["gradient_checkpointing"]  # the tiny model: room
    assert "Gradient checkpointing (auto): off, the run fits 1.0 GiB without it" in panel.status.text()
    assert panel.property("state") == "ok" and not panel.suggestion_buttons  # nothing faster to offer
    layers = window.training_page.bindings["train.checkpoint_layers"]
    assert not layers.editor.isEnabled()  # auto chooses them
    window.config_model.set_value("train", "gradient_checkpointing", True)
    assert layers.editor.isEnabled()
    layers.editor.setValue(1)
    assert window.config_model.config.train.checkpoint_layers == 1
    window.config_model.set_value("train", "gradient_checkpointing", "auto")  # the count goes with "every layer"
    assert window.config_model.valid and window.config_model.config.train.checkpoint_layers is None
    assert not layers.editor.isEnabled()


def test_a_run_with_room_is_offered_less_checkpointing(qtbot, window, tiny_model_dir):
    panel = window.budget
    panel.set_gpus([SMALL_CARD])
    with_model(qtbot, window, tiny_model_dir)
    with qtbot.waitSignal(panel.updated, timeout=10_000):
        window.config_model.set_value("train", "gradient_checkpointing", True)  # every layer, the user's choice
    assert panel.property("state") == "ok" and panel.suggest_title.text() == FASTER_TITLE
    (button,) = panel.suggestion_buttons
    assert panel.result["advice"].faster.overrides == ["train.gradient_checkpointing=false"]
    with qtbot.waitSignal(panel.updated, timeout=10_000):
        button.click()
    assert not window.config_model.config.train.gradient_checkpointing
    assert panel.property("state") == "ok" and not panel.suggestion_buttons
    assert not panel.suggest_title.isVisibleTo(panel)


def test_estimate_follows_each_change_within_100_ms(qtbot, window, tiny_model_dir):
    panel = window.budget
    panel.set_gpus([SMALL_CARD])
    with_model(qtbot, window, tiny_model_dir)  # the first estimate reads the model's config.json
    delays, work = [], []
    for rank in (8, 16, 32, 64, 4, 12, 24):
        t0, cpu0 = time.perf_counter(), time.process_time()
        with qtbot.waitSignal(panel.updated, timeout=5_000):
            window.adapter_page.bindings["lora.rank"].editor.setValue(rank)
        delays.append(time.perf_counter() - t0)
        work.append(time.process_time() - cpu0)
        assert panel.result["estimate"].components["lora_weights"] > 0
    # The 100 ms promise, as the CPU time this process (GUI and worker threads) spends per
    # change: a busy machine stretches the wall clock, not the work. The wall clock only
    # catches a real block (reading the model again, seconds).
    assert statistics.median(work) < 0.1, work
    assert max(delays) < 1.0, delays


def test_the_chosen_card_is_the_one_the_run_gets(qtbot, window, tmp_path, events_dir):
    window.budget.set_gpus([SMALL_CARD])
    replay = Path(__file__).with_name("replay_engine.py")
    ctl = window.runs
    ctl.command_factory = lambda config, resume=None: [sys.executable, str(replay), str(events_dir / "stop.jsonl")]
    window.config_model.set_values(
        {
            ("model", "ref"): str(tmp_path / "m"),
            ("data", "path"): str(tmp_path / "d.jsonl"),
            ("output", "dir"): str(tmp_path / "runs" / "x"),
        }
    )
    with qtbot.waitSignal(ctl.ended, timeout=20_000):
        assert window.runs.start()
    assert ctl.job._worker.env["CUDA_VISIBLE_DEVICES"] == "GPU-test"
    window.budget.set_gpus([])
    window.config_model.set_value("output", "dir", str(tmp_path / "runs" / "y"))
    with qtbot.waitSignal(ctl.ended, timeout=20_000):
        assert window.runs.start()
    assert ctl.job._worker.env["CUDA_VISIBLE_DEVICES"] == ""  # CPU chosen: no GPU for the child
