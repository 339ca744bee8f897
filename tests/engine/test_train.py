"""Real NF4 QLoRA training of a tiny Llama on the CPU: the loss falls, resume is exact, the adapter reloads."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import bitsandbytes as bnb
import pytest
import torch
from safetensors.torch import load_file

from qlora_engine.control import RunControl
from qlora_engine.errors import QLoRAError, ResumeError, RunLockedError
from qlora_engine.events import CheckpointSaved, ListSink, RunFinished, RunStarted, StepMetrics, read_events
from qlora_engine.runner import build_trainer, run


def losses(sink: ListSink) -> list[float]:
    return [e.loss for e in sink.of(StepMetrics)]


def test_base_layers_are_real_4bit_nf4(tiny_cfg):
    trainer = build_trainer(tiny_cfg(), ListSink())
    trainer.setup()
    q_layers = [m for m in trainer.model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert len(q_layers) == 2 * 7  # every projection of both blocks
    for layer in q_layers:
        w = layer.weight
        assert w.dtype == torch.uint8  # packed: two 4-bit values per byte
        assert w.numel() * 2 == w.quant_state.shape.numel()
        assert w.quant_state.quant_type == "nf4"
        assert w.quant_state.nested  # double quantization of the absmax constants
        assert not w.requires_grad
    # the weights that stay unquantized keep the compute dtype (fp32 on the CPU), never upcast beyond it
    assert trainer.model.get_input_embeddings().weight.dtype == trainer.dtype
    trainable = [n for n, p in trainer.model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    trainer.cleanup()


def test_loss_falls_by_half_on_a_memorizable_set(tiny_cfg):
    sink = ListSink()
    finished = run(tiny_cfg("train.max_steps=40"), sink)
    curve = losses(sink)
    assert len(curve) == 40
    assert curve[-1] < 0.5 * curve[0], curve
    assert finished.adapter_dir and finished.final_loss == curve[-1]
    started = sink.of(RunStarted)[0]
    assert started.total_steps == 40 and started.model["trainable_parameters"] > 0


def test_events_file_matches_the_stream(tiny_cfg):
    cfg = tiny_cfg("train.max_steps=3", "train.save_steps=2")
    sink = ListSink()
    run(cfg, sink)
    on_disk = read_events(cfg.output_dir / "events.jsonl")
    assert [e.to_dict() for e in on_disk] == [e.to_dict() for e in sink.events]
    assert [e.step for e in sink.of(CheckpointSaved)] == [2, 3]
    assert (cfg.output_dir / "config.yaml").is_file() and not (cfg.output_dir / "run.lock").exists()


class StopAt:
    """A sink that asks the run to stop (and save) once step ``n`` is reported."""

    def __init__(self, n: int, control: RunControl) -> None:
        self.n, self.control, self.inner = n, control, ListSink()

    def emit(self, e):
        self.inner.emit(e)
        if isinstance(e, StepMetrics) and e.step == self.n:
            self.control.request_stop()

    def close(self):
        pass


def test_resume_gives_the_same_losses_and_adapter(tiny_cfg, tmp_path):
    # Dropout, a paged 8-bit optimizer, accumulation and more than one epoch: every piece of
    # state (RNG, optimizer, scheduler, data position) must come back for the numbers to agree.
    common = ["train.max_steps=8", "train.micro_batch_size=2", "train.gradient_accumulation_steps=2",
              "lora.dropout=0.1", "optim.scheduler=cosine", "optim.warmup_steps=2", "train.save_steps=3"]
    straight = ListSink()
    run(tiny_cfg(*common, f"output.dir={tmp_path / 'straight'}"), straight)

    control = RunControl()
    stopper = StopAt(4, control)
    cfg = tiny_cfg(*common, f"output.dir={tmp_path / 'split'}")
    first = run(cfg, stopper, control)
    assert first.stopped_early and first.step == 4
    resumed = ListSink()
    run(cfg, resumed, resume=True)

    a, b = losses(straight), losses(stopper.inner) + losses(resumed)
    assert [e.step for e in resumed.of(StepMetrics)] == [5, 6, 7, 8]
    assert b == pytest.approx(a, abs=1e-6)
    wa = load_file(tmp_path / "straight" / "adapter" / "adapter_model.safetensors")
    wb = load_file(tmp_path / "split" / "adapter" / "adapter_model.safetensors")
    assert wa.keys() == wb.keys()
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], rtol=0, atol=1e-6)


def test_resume_refuses_a_changed_lora_shape_or_model(tiny_cfg, tiny_model_no_template_dir):
    run(tiny_cfg("train.max_steps=2"), ListSink())
    with pytest.raises(ResumeError, match=r"lora.*rank"):
        run(tiny_cfg("train.max_steps=4", "lora.rank=4"), ListSink(), resume=True)
    with pytest.raises(ResumeError, match=r"model.ref: checkpoint has .*config has .*tiny-llama-plain"):
        run(tiny_cfg("train.max_steps=4", f"model.ref={tiny_model_no_template_dir}"), ListSink(), resume=True)


def test_a_finished_run_folder_is_never_overwritten(tiny_cfg):
    cfg = tiny_cfg("train.max_steps=2")
    run(cfg, ListSink())
    before = (cfg.output_dir / "adapter" / "adapter_model.safetensors").read_bytes()
    with pytest.raises(QLoRAError, match="already holds a run"):
        run(cfg, ListSink())
    assert (cfg.output_dir / "adapter" / "adapter_model.safetensors").read_bytes() == before


def test_a_live_lock_refuses_a_second_run_and_a_stale_one_is_cleared(tiny_cfg):
    cfg = tiny_cfg("train.max_steps=1")
    cfg.output_dir.mkdir(parents=True)
    lock = cfg.output_dir / "run.lock"
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        import socket

        lock.write_text(json.dumps({"pid": sleeper.pid, "host": socket.gethostname()}))
        with pytest.raises(RunLockedError, match=str(sleeper.pid)):
            run(cfg, ListSink())
    finally:
        sleeper.kill()
        sleeper.wait()
    # the process is gone now: its lock is stale and the run proceeds
    assert isinstance(run(cfg, ListSink()), RunFinished)


def test_adapter_reloads_in_a_fresh_process_with_the_same_logits(tiny_cfg, tmp_path):
    cfg = tiny_cfg("train.max_steps=10")
    trainer = build_trainer(cfg, ListSink())
    trainer.setup()
    trainer.train()
    probe = torch.tensor([[5, 17, 42, 99, 7, 3]])
    trainer.model.eval()
    with torch.no_grad():
        expected = trainer.model(input_ids=probe).logits
    trainer.cleanup()
    torch.save(expected, tmp_path / "expected.pt")

    script = textwrap.dedent(
        f"""
        import torch
        from peft import PeftModel
        from transformers import AutoModelForCausalLM, BitsAndBytesConfig
        q = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                               bnb_4bit_compute_dtype=torch.float32)
        base = AutoModelForCausalLM.from_pretrained({str(cfg.model.ref)!r}, quantization_config=q,
                                                    dtype=torch.float32, device_map={{"": "cpu"}})
        model = PeftModel.from_pretrained(base, {str(cfg.output_dir / "adapter")!r}).eval()
        with torch.no_grad():
            logits = model(input_ids=torch.tensor({probe.tolist()})).logits
        torch.save(logits, {str(tmp_path / "got.pt")!r})
        """
    )
    subprocess.run([sys.executable, "-c", script], check=True, capture_output=True)
    got = torch.load(tmp_path / "got.pt", weights_only=True)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)
    # and the adapter really changed the model: LoRA B matrices are no longer zero
    weights = load_file(cfg.output_dir / "adapter" / "adapter_model.safetensors")
    assert any(v.abs().sum() > 0 for k, v in weights.items() if "lora_B" in k)
