"""Faults: kills, torn checkpoints, a full disk, out of memory, NaN loss, changed setups. Nothing is lost."""

from __future__ import annotations

import errno
import json
import os
import pickle
import shutil
import signal
import subprocess
import sys

import pytest
import torch

from qlora_engine import checkpoint as ckpt
from qlora_engine.checkpoint import resume_blockers
from qlora_engine.config import apply_overrides
from qlora_engine.errors import DiskFullError, ResumeError, TrainingDiverged
from qlora_engine.events import ListSink, RunFailed, StepMetrics, from_json
from qlora_engine.runner import build_trainer, run
from qlora_engine.train import Trainer


def losses(sink):
    return [e.loss for e in sink.of(StepMetrics)]


def out_of_memory_at_step(step: int, monkeypatch) -> None:
    """Make the first micro-batch of optimizer step ``step`` raise CUDA's out-of-memory error."""
    real = Trainer.micro_batch

    def micro_batch(self, k):
        if self.step == step - 1:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real(self, k)

    monkeypatch.setattr(Trainer, "micro_batch", micro_batch)


COMMON = ["train.max_steps=8", "train.micro_batch_size=2", "train.gradient_accumulation_steps=2", "lora.dropout=0.1",
          "train.save_steps=2", "train.save_total_limit=null"]


def test_sigkill_mid_run_then_resume_matches_an_uninterrupted_run(tiny_cfg, tmp_path):
    straight = ListSink()
    run(tiny_cfg(*COMMON, f"output.dir={tmp_path / 'straight'}"), straight)

    cfg = tiny_cfg(*COMMON, "train.max_steps=400", f"output.dir={tmp_path / 'killed'}")
    config = tmp_path / "run.yaml"
    cfg.save(config)
    proc = subprocess.Popen([sys.executable, "-m", "qlora_engine", "train", str(config), "--events", "-"],
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    first = []
    for line in proc.stdout:
        e = from_json(line)
        if isinstance(e, StepMetrics):
            first.append(e)
        if isinstance(e, StepMetrics) and e.step == 5:  # after the checkpoint at 4, mid-way to 6
            proc.send_signal(signal.SIGKILL)
            break
    proc.wait()
    assert (tmp_path / "killed" / "run.lock").exists()  # a kill leaves its lock behind ...
    resumed = ListSink()
    run(tiny_cfg(*COMMON, f"output.dir={tmp_path / 'killed'}"), resumed, resume=True)  # ... recognised as stale
    assert [e.step for e in resumed.of(StepMetrics)] == [5, 6, 7, 8]
    # (max_steps differs between the two runs, but the schedule is constant: the numbers must agree)
    assert losses(resumed) == pytest.approx(losses(straight)[4:], abs=1e-6)
    assert [e.loss for e in first[:4]] == pytest.approx(losses(straight)[:4], abs=1e-6)


@pytest.mark.parametrize("fail_at", ["adapter_model.safetensors", "optimizer.pt", "scheduler.pt", "rng.pt",
                                     "trainer_state.json", "qlora_checkpoint.json"])
def test_a_checkpoint_torn_at_any_file_never_becomes_latest(tiny_cfg, monkeypatch, fail_at):
    cfg = tiny_cfg(*COMMON, "train.max_steps=4")
    trainer = build_trainer(cfg, ListSink())
    trainer.setup()
    trainer.total_steps = 2  # two good steps and a good checkpoint
    trainer.train()
    good = ckpt.latest_checkpoint(trainer.ckpt_dir)
    assert good is not None and good.name == "step-000002"

    # Simulate a kill at `fail_at` of the next checkpoint: the temporary folder stays behind
    # with whatever was written so far, exactly as a SIGKILL would leave it.
    real_rmtree = shutil.rmtree
    monkeypatch.setattr(ckpt.shutil, "rmtree", lambda p, **k: None if ".tmp-" in str(p) else real_rmtree(p, **k))
    real_write_text, real_save = type(good).write_text, torch.save

    def boom(name):
        raise SystemExit(f"killed while writing {name}")

    def save(obj, f, *a, **k):
        if str(getattr(f, "name", f)).endswith(fail_at):  # a path, or the file object the engine writes through
            boom(fail_at)
        return real_save(obj, f, *a, **k)

    def write_text(self, *a, **k):
        if self.name == fail_at:
            boom(fail_at)
        return real_write_text(self, *a, **k)

    monkeypatch.setattr(torch, "save", save)
    monkeypatch.setattr(type(good), "write_text", write_text)
    if fail_at == "adapter_model.safetensors":
        monkeypatch.setattr(trainer.model, "save_pretrained", lambda *a, **k: boom(fail_at))
    trainer.step = 3
    with pytest.raises(SystemExit):
        trainer.save_checkpoint()
    monkeypatch.undo()
    leftovers = [p.name for p in trainer.ckpt_dir.iterdir() if p.name.startswith(".tmp-")]
    assert leftovers  # the torn folder is there ...
    assert ckpt.latest_checkpoint(trainer.ckpt_dir) == good  # ... and never picked
    trainer.cleanup()
    resumed = ListSink()
    run(cfg, resumed, resume=True)
    assert [e.step for e in resumed.of(StepMetrics)] == [3, 4]


def test_a_checkpoint_with_a_bad_marker_is_refused(tiny_cfg):
    cfg = tiny_cfg(*COMMON, "train.max_steps=2")
    run(cfg, ListSink())
    folder = cfg.output_dir / "checkpoints" / "step-000002"
    with open(folder / "optimizer.pt", "ab") as fh:  # a file whose size no longer matches the marker
        fh.write(b"x")
    assert ckpt.latest_checkpoint(cfg.output_dir / "checkpoints") is None
    with pytest.raises(ResumeError, match="damaged checkpoint: optimizer.pt is"):
        run(tiny_cfg(*COMMON, "train.max_steps=4"), ListSink(), resume=str(folder))


def test_disk_full_while_checkpointing_keeps_the_previous_checkpoint(tiny_cfg, monkeypatch):
    cfg = tiny_cfg(*COMMON, "train.max_steps=6")
    real_save = torch.save
    calls = {"n": 0}

    def save(obj, f, *a, **k):
        if str(getattr(f, "name", f)).endswith("optimizer.pt"):
            calls["n"] += 1
            if calls["n"] == 2:  # the second checkpoint (step 4)
                raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(obj, f, *a, **k)

    monkeypatch.setattr(torch, "save", save)
    sink = ListSink()
    with pytest.raises(DiskFullError, match="disk full at") as info:
        run(cfg, sink)
    assert "Free space" in info.value.hint
    failed = sink.of(RunFailed)[0]
    assert failed.error_type == "DiskFullError" and failed.last_checkpoint.endswith("step-000002")
    monkeypatch.undo()
    assert [p.name for p in (cfg.output_dir / "checkpoints").iterdir()] == ["step-000002"]
    resumed = ListSink()
    run(cfg, resumed, resume=True)
    assert resumed.of(StepMetrics)[0].step == 3


def test_out_of_memory_names_fixes_that_apply_and_keeps_the_checkpoint(tiny_cfg, monkeypatch):
    cfg = tiny_cfg(*COMMON, "train.max_steps=6", "train.gradient_checkpointing=false", "optim.optimizer=adamw",
                   "train.micro_batch_size=3", "train.gradient_accumulation_steps=1")
    out_of_memory_at_step(4, monkeypatch)
    sink = ListSink()
    with pytest.raises(torch.cuda.OutOfMemoryError):
        run(cfg, sink)
    failed = sink.of(RunFailed)[0]
    assert "ran out of memory at step 4" in failed.message
    assert failed.last_checkpoint.endswith("step-000002")
    assert "gradient_checkpointing" in failed.hint  # the tiny model's needs are all fixed costs: generic advice
    assert (cfg.output_dir / "checkpoints" / "step-000002").is_dir()
    monkeypatch.undo()  # "the memory is back": resume with the suggested change
    resumed = ListSink()
    run(apply_overrides(cfg, ["train.gradient_checkpointing=true"]), resumed, resume=True)
    assert resumed.of(StepMetrics)[0].step == 3


def test_an_out_of_memory_fix_that_splits_the_batch_resumes_as_if_nothing_happened(tiny_cfg, tmp_path, monkeypatch):
    # The fix the budget offers most often: smaller micro-batches, more accumulation, the same
    # batch per step. The resumed run must see the same samples per step (across an epoch
    # boundary too: 6 steps x 4 samples > the data) and reach the uninterrupted run's losses.
    common = ["train.max_steps=6", "train.save_steps=2", "lora.dropout=0.0"]
    straight = ListSink()
    run(tiny_cfg(*common, "train.micro_batch_size=4", f"output.dir={tmp_path / 'straight'}"), straight)

    cfg = tiny_cfg(*common, "train.micro_batch_size=4", f"output.dir={tmp_path / 'oom'}")
    out_of_memory_at_step(4, monkeypatch)
    first = ListSink()
    with pytest.raises(torch.cuda.OutOfMemoryError):
        run(cfg, first)
    monkeypatch.undo()
    split = apply_overrides(cfg, ["train.micro_batch_size=2", "train.gradient_accumulation_steps=2"])
    assert resume_blockers(cfg, split) == []
    (blocker,) = resume_blockers(cfg, apply_overrides(cfg, ["data.max_length=64"]))
    assert (blocker.field, blocker.before, blocker.after) == ("data.max_length", 1024, 64)
    resumed = ListSink()
    run(split, resumed, resume=True)
    assert [e.step for e in resumed.of(StepMetrics)] == [3, 4, 5, 6]
    assert losses(first)[:2] + losses(resumed) == pytest.approx(losses(straight), rel=1e-5)
    with pytest.raises(ResumeError, match="gradient_accumulation_steps: checkpoint has 4, config has 6"):
        run(apply_overrides(cfg, ["train.micro_batch_size=3", "train.gradient_accumulation_steps=2",
                                  "train.max_steps=8"]), ListSink(), resume=True)


def test_out_of_memory_fixes_come_from_the_budget_and_apply(tmp_path):
    # An 8B-shaped model (config only: the budget never reads weights) on an 80 GiB card.
    folder = tmp_path / "llama-8b-shape"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 128256, "hidden_size": 4096,
        "intermediate_size": 14336, "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8,
        "max_position_embeddings": 8192, "torch_dtype": "bfloat16",
    }))
    from qlora_engine.config import TrainConfig
    from qlora_engine.data import PreparedData
    from qlora_engine.vram import oom_fixes

    cfg = apply_overrides(TrainConfig(), [f"model.ref={folder}", "data.path=x", "data.max_length=4096",
                                          "train.micro_batch_size=4", "train.gradient_checkpointing=false"])
    data = PreparedData(train=[], validation=None, report={"token_stats": {"max": 4096, "longest_sequence": 4096}})
    fixes = oom_fixes(cfg, data, card_bytes=80 * 2**30)
    assert fixes
    assert any(f["overrides"] == ["train.gradient_checkpointing=true"] for f in fixes)
    for fix in fixes:  # every suggestion is a valid config change
        assert apply_overrides(cfg, fix["overrides"]) != cfg


def test_nan_loss_stops_within_one_step_naming_the_last_checkpoint(tiny_cfg):
    trainer = build_trainer(tiny_cfg(*COMMON, "train.max_steps=6"), ListSink())
    trainer.setup()

    def poison(module, args, output):
        return output * float("nan") if trainer.step == 3 else output

    trainer.model.get_output_embeddings().register_forward_hook(poison)
    with pytest.raises(TrainingDiverged, match=r"loss became nan at step 4.*step-000002"):
        trainer.train()
    assert trainer.step == 3  # the bad step was not applied
    trainer.cleanup()


def test_resume_with_changed_data_is_refused_unless_forced(tiny_cfg, tmp_path):
    cfg = tiny_cfg(*COMMON, "train.max_steps=2")
    run(cfg, ListSink())
    data = cfg.resolve(cfg.data.path)
    data.write_text(data.read_text() + json.dumps({"text": "one more row"}) + "\n")
    with pytest.raises(ResumeError, match="data.fingerprint"):
        run(tiny_cfg(*COMMON, "train.max_steps=4"), ListSink(), resume=True)
    forced = ListSink()
    run(tiny_cfg(*COMMON, "train.max_steps=4"), forced, resume=True, force_resume=True)
    assert [e.step for e in forced.of(StepMetrics)] == [3, 4]


def test_checkpoint_state_never_runs_pickled_code(tiny_cfg, tmp_path):
    cfg = tiny_cfg(*COMMON, "train.max_steps=2")
    run(cfg, ListSink())
    folder = cfg.output_dir / "checkpoints" / "step-000002"
    flag = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {flag}",))

    (folder / "rng.pt").write_bytes(pickle.dumps(Evil()))
    ckpt.write_marker(folder, {"step": 2})  # even with a forged marker, weights_only refuses code
    with pytest.raises(ResumeError, match="rng.pt holds something other than tensors"):
        run(tiny_cfg(*COMMON, "train.max_steps=4"), ListSink(), resume=True)
    assert not flag.exists()
