"""Out of GPU memory during a step: the error dialog offers the budget's fixes, and one click applies
a fix and resumes the run from its checkpoint (or starts a new run when the checkpoint cannot fit).

The dialog tests replay a failure whose fixes the engine's own ``oom_fixes`` computed for a
real configuration of the tiny Llama. The end-to-end test runs the real engine as a child
process on the CPU; ``oom_engine.py`` makes one step raise CUDA's out-of-memory error, which
then goes through the engine's real out-of-memory handling.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import yaml

from app.budget_panel import compute_budget
from app.error_dialog import RunErrorDialog
from app.failure_fixes import BEFORE_FIX_NAME, fix_choices
from app.run_catalog import absolute_config
from app.run_worker import engine_command
from qlora_engine.checkpoint import list_checkpoints, resume_blockers, write_marker
from qlora_engine.config import TrainConfig, apply_overrides
from qlora_engine.data import PreparedData
from qlora_engine.events import CheckpointSaved, RunFailed, RunStarted, StepMetrics, read_events
from qlora_engine.vram import oom_fixes

HERE = Path(__file__).parent
REPLAY = HERE / "replay_engine.py"
OOM_ENGINE = HERE / "oom_engine.py"

# Sixteen sequences of 512 tokens (every row is longer and truncated) in micro-batches of 16,
# without gradient checkpointing: the activations are a large enough part of the tiny model's
# estimate that the budget finds fixes (a micro-batch split, shorter sequences).
MEMORY_HUNGRY = {
    ("train", "micro_batch_size"): 16,
    ("train", "gradient_accumulation_steps"): 1,
    ("data", "max_length"): 512,
    ("train", "gradient_checkpointing"): False,
}


@pytest.fixture
def long_text_data(tmp_path) -> Path:
    path = tmp_path / "long.jsonl"
    rows = [
        {"text": " ".join(f"Line {i}.{j}: the quick brown fox jumps over the lazy dog." for j in range(60))}
        for i in range(16)
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def memory_hungry_run(window, model_dir: Path, data: Path, out: Path) -> None:
    """The form as a run of 4 steps, a checkpoint every 2, on the CPU."""
    window.config_model.set_values(
        {
            ("model", "ref"): str(model_dir),
            ("data", "path"): str(data),
            ("output", "dir"): str(out),
            ("train", "device"): "cpu",
            ("lora", "rank"): 8,
            ("train", "max_steps"): 4,
            ("train", "save_steps"): 2,
            ("optim", "learning_rate"): 1e-3,
            **MEMORY_HUNGRY,
        }
    )
    assert window.config_model.valid, window.config_model.errors


def expected_label(before: TrainConfig, overrides: list[str], checkpoint_step: int | None) -> str:
    """What the button must say, from the engine's own judgement."""
    if checkpoint_step is not None and not resume_blockers(before, apply_overrides(before, overrides)):
        return f"Apply and resume from step {checkpoint_step}"
    return "Apply and start a new run"


def wait_for_fixes(qtbot, dialog) -> None:
    qtbot.waitUntil(lambda: len(dialog.fix_buttons) == len(dialog.failure.fixes), timeout=60_000)


def test_fixes_are_offered_as_resume_or_new_run_from_resume_blockers(
    qtbot, window, tiny_model_dir, long_text_data, tmp_path, events_dir
):
    run_dir = tmp_path / "runs" / "oom"
    memory_hungry_run(window, tiny_model_dir, long_text_data, run_dir)
    # the run folder as the engine leaves it: its config and a complete checkpoint at step 2
    before = absolute_config(window.config_model.config)
    before.save(run_dir / "config.yaml")
    ckpt = run_dir / "checkpoints" / "step-000002"
    ckpt.mkdir(parents=True)
    (ckpt / "adapter_model.safetensors").write_bytes(b"0" * 64)
    write_marker(ckpt, {"step": 2})
    assert list_checkpoints(run_dir / "checkpoints") == [(2, ckpt)]

    stats = {"min": 512, "max": 512, "longest_sequence": 512}
    fixes = oom_fixes(before, PreparedData(train=[], validation=None, report={"token_stats": stats}), None)
    assert fixes, "the budget offers no fix for this configuration (the test needs some)"
    fixes.append({"description": "LoRA rank 4 instead of 8", "overrides": ["lora.rank=4"]})
    failure = RunFailed(
        error_type="OutOfMemoryError",
        message="The GPU ran out of memory at step 3; the last checkpoint is kept.",
        traceback="torch.OutOfMemoryError: CUDA out of memory.",
        step=2,
        last_checkpoint=str(ckpt),
        hint="Out of GPU memory. Changes that fit: ...",
        fixes=fixes,
    )
    events = tmp_path / "oom-with-fixes.jsonl"
    started = RunStarted(run_dir=str(run_dir), config=before.to_dict(), model={}, device="cpu", total_steps=4)
    lines = [started, CheckpointSaved(step=2, path=str(ckpt)), failure]
    events.write_text("".join(json.dumps(e.to_dict()) + "\n" for e in lines), encoding="utf-8")

    launches = []

    def factory(config, resume=None):
        launches.append((Path(config), resume))
        if len(launches) == 1:
            return [sys.executable, str(REPLAY), str(events), "--exit", "3"]
        return [sys.executable, str(REPLAY), str(events_dir / "normal.jsonl")]

    ctl = window.runs
    ctl.command_factory = factory
    window.runs.ask_existing_run = lambda run_dir, new_dir: "resume"
    with qtbot.waitSignal(window.runs.error_shown, timeout=30_000) as shown:
        assert window.runs.start()
    dialog = shown.args[0]
    assert not dialog.fix_box.isHidden()
    wait_for_fixes(qtbot, dialog)

    labels = [b.text() for b in dialog.fix_buttons]
    assert labels == [expected_label(before, f["overrides"], 2) for f in fixes]
    assert any("resume from step 2" in label for label in labels)
    assert any(label == "Apply and start a new run" for label in labels)
    for choice, fix in zip(dialog.fix_choices, fixes, strict=True):
        assert choice.description == fix["description"] and list(choice.overrides) == fix["overrides"]
        assert choice.resumable == (not resume_blockers(before, choice.config))
    reasons = {c.overrides[0]: c.reason for c in dialog.fix_choices}
    assert "adapter" in reasons["lora.rank=4"]
    data_fix = next(c for c in dialog.fix_choices if c.overrides[0].startswith("data.max_length="))
    assert "training data" in data_fix.reason and "data.max_length" in data_fix.reason
    assert not data_fix.resumable

    # a fix that cannot resume: a new run in a fresh folder, the failed run left alone. The form
    # was edited since the run started, so it is replaced by the run's configuration with the fix
    window.config_model.set_value("optim", "learning_rate", 5e-4)
    asked = []
    window.ask_save_changes = lambda: asked.append(True) or "discard"
    button = dialog.fix_buttons[dialog.fix_choices.index(data_fix)]
    with qtbot.waitSignal(ctl.ended, timeout=30_000) as ended:
        button.click()
    assert ended.args == ["finished"]
    assert not dialog.isVisible()
    assert window.current_page == "run"
    (config, resume) = launches[-1]
    assert resume is None
    launched = yaml.safe_load(config.read_text(encoding="utf-8"))
    new_length = int(data_fix.overrides[0].split("=")[1])
    assert launched["data"]["max_length"] == new_length
    assert launched["output"]["dir"] == str(run_dir.with_name("oom-2"))
    assert launched["optim"]["learning_rate"] == before.optim.learning_rate
    assert asked == [True]  # the edited form was not dropped without asking
    assert window.config_model.config.data.max_length == new_length  # the form shows what runs
    assert window.config_model.config.optim.learning_rate == before.optim.learning_rate
    assert window.training_page.bindings["data.max_length"].editor.value() == new_length
    assert TrainConfig.load(run_dir / "config.yaml") == before
    assert not (run_dir / BEFORE_FIX_NAME).exists()


def test_without_a_checkpoint_every_fix_starts_a_new_run_and_without_fixes_the_dialog_is_as_before(
    qtbot, tiny_model_dir, tmp_path, events_dir
):
    before = apply_overrides(
        TrainConfig(),
        [
            f"model.ref={tiny_model_dir}",
            "data.path=train.jsonl",
            "train.micro_batch_size=4",
            "train.gradient_accumulation_steps=1",
        ],
    )
    split = {
        "description": "Micro-batch 2 with 2 accumulation steps",
        "overrides": ["train.micro_batch_size=2", "train.gradient_accumulation_steps=2"],
    }
    failure = RunFailed(error_type="OutOfMemoryError", message="out of memory", traceback="", step=1, fixes=[split])
    assert resume_blockers(before, apply_overrides(before, split["overrides"])) == []
    choices = fix_choices(failure, before, tmp_path / "no-checkpoints")
    assert [c.label for c in choices] == ["Apply and start a new run"]
    assert "No checkpoint" in choices[0].reason
    dialog = RunErrorDialog(failure)
    qtbot.addWidget(dialog)
    dialog.set_fix_choices(choices)
    assert [b.text() for b in dialog.fix_buttons] == ["Apply and start a new run"]

    plain = read_events(events_dir / "oom.jsonl")[-1]
    assert isinstance(plain, RunFailed) and not plain.fixes
    dialog = RunErrorDialog(plain)
    qtbot.addWidget(dialog)
    assert dialog.fix_box.isHidden() and dialog.fix_buttons == []
    assert dialog.findChild(type(dialog.facts), "errorHint").text() == plain.hint


def test_out_of_memory_fix_resumes_the_real_run_from_its_checkpoint(
    qtbot, window, tiny_model_dir, long_text_data, tmp_path
):
    out = tmp_path / "runs" / "oom"
    memory_hungry_run(window, tiny_model_dir, long_text_data, out)
    window.show_page("run")

    launches = []

    def factory(config, resume=None):
        # the first launch runs out of memory when step 3 begins (after the checkpoint at step 2)
        launches.append(resume)
        cmd = engine_command(config, resume)
        return [sys.executable, str(OOM_ENGINE), "2", *cmd[3:]] if len(launches) == 1 else cmd

    ctl = window.runs
    ctl.command_factory = factory
    with qtbot.waitSignal(window.runs.error_shown, timeout=300_000) as shown:
        window.run_view.start_button.click()
    assert ctl.state == "failed", window.run_view.log.toPlainText()
    failure = ctl.record.failed
    assert failure.error_type == "OutOfMemoryError" and "step 3" in failure.message
    assert failure.last_checkpoint.endswith("step-000002") and failure.fixes
    dialog = shown.args[0]
    wait_for_fixes(qtbot, dialog)

    before = TrainConfig.load(out / "config.yaml")
    assert before.train.micro_batch_size == 16
    labels = [b.text() for b in dialog.fix_buttons]
    assert labels == [expected_label(before, f["overrides"], 2) for f in failure.fixes]
    split = next(
        (c for c in dialog.fix_choices if any(o.startswith("train.micro_batch_size=") for o in c.overrides)), None
    )
    assert split is not None, f"no micro-batch split among the fixes: {failure.fixes}"
    assert split.resumable and split.label == "Apply and resume from step 2"
    new_mbs = split.config.train.micro_batch_size
    new_ga = split.config.train.gradient_accumulation_steps
    assert new_mbs < 16 and new_mbs * new_ga == 16

    with qtbot.waitSignal(ctl.ended, timeout=300_000) as ended:
        dialog.fix_buttons[dialog.fix_choices.index(split)].click()
    assert ended.args == ["finished"], window.run_view.log.toPlainText()
    assert launches == [None, True]
    assert not dialog.isVisible() and window.current_page == "run"

    # the same run went on from its checkpoint, with the changed configuration
    rec = ctl.record
    assert rec.started.resumed_from.endswith("step-000002") and rec.started.start_step == 2
    assert rec.started.config["train"]["micro_batch_size"] == new_mbs
    resumed = [s.step for s in read_events(out / "events.jsonl") if isinstance(s, StepMetrics)]
    assert resumed == [1, 2, 3, 4]  # steps 1-2 before the failure, 3-4 after the fix
    window.run_view.redraw()
    xs, ys = window.run_view.charts.curves["train loss"].getData()
    # the live chart: the steps before the failure stay, the resumed ones follow, finite losses
    assert list(xs) == [1, 2, 3, 4] and all(y == y for y in ys)
    assert (out / "adapter" / "adapter_model.safetensors").is_file()

    # the run folder says what it ran with, and what it ran with before the fix
    after = TrainConfig.load(out / "config.yaml")
    assert (after.train.micro_batch_size, after.train.gradient_accumulation_steps) == (new_mbs, new_ga)
    kept = TrainConfig.load(out / BEFORE_FIX_NAME)
    assert kept == before
    assert f"kept in {BEFORE_FIX_NAME}" in window.run_view.log.toPlainText()

    # the form, the training page and the budget follow the change
    assert window.config_model.config.train.micro_batch_size == new_mbs
    assert window.training_page.bindings["train.micro_batch_size"].editor.value() == new_mbs
    assert window.training_page.bindings["train.gradient_accumulation_steps"].editor.value() == new_ga
    budget = window.budget

    def budget_is_current() -> bool:
        current = compute_budget(absolute_config(window.config_model.config), None, budget.data_stats)
        return budget.result is not None and budget.result["estimate"].total == current["estimate"].total

    qtbot.waitUntil(budget_is_current, timeout=60_000)
