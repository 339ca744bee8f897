"""train.gradient_checkpointing: auto (the default): the VRAM budget checkpoints only as many
layers as the card needs, and a step that still runs out of memory checkpoints them all.

The budget part uses the Llama-3-8B shape (config only); the engine part trains a real
4-layer NF4 Llama on the CPU, telling the trainer how much GPU memory it has.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from tiny import LLAMA3_8B, build_tiny_llama

from qlora_engine import vram
from qlora_engine.budget import estimate, fit
from qlora_engine.budget.estimate import with_checkpointing
from qlora_engine.config import TrainConfig, apply_overrides
from qlora_engine.data import PreparedData
from qlora_engine.data.store import token_stats
from qlora_engine.errors import ConfigError
from qlora_engine.events import ListSink, LogLine, RunStarted, StepMetrics
from qlora_engine.plan import advise, choose_checkpointing
from qlora_engine.runner import build_trainer
from qlora_engine.train import Trainer

GiB = 1 << 30
STATS = {"max": 2048, "longest_sequence": 2048}


def cfg_8b(*overrides: str) -> TrainConfig:
    base = ["data.path=x", "data.max_length=2048", "train.micro_batch_size=4", "train.kernels=liger"]
    return apply_overrides(TrainConfig(), base + list(overrides))


def ladder(cfg: TrainConfig, card: int, n: int = 32) -> list[int]:
    """The upper bound of the estimate with k = 0..n layers checkpointed, one by one."""
    return [
        estimate(with_checkpointing(cfg, k, n), LLAMA3_8B, gpu_bytes=card, data_stats=STATS).high for k in range(n + 1)
    ]


def test_auto_is_the_default_and_reads_from_yaml(tmp_path):
    assert TrainConfig().train.gradient_checkpointing == "auto"
    path = tmp_path / "run.yaml"
    path.write_text("model:\n  ref: x\ndata:\n  path: y\ntrain:\n  gradient_checkpointing: true\n")
    assert TrainConfig.load(path).train.gradient_checkpointing is True
    cfg = apply_overrides(TrainConfig(), ["train.gradient_checkpointing=false", "train.gradient_checkpointing=auto"])
    assert cfg.train.gradient_checkpointing == "auto"
    cfg.save(path)
    assert TrainConfig.load(path).train.gradient_checkpointing == "auto"


def test_choosing_the_layers_yourself_needs_true():
    with pytest.raises(ConfigError, match=r"train.checkpoint_layers.*gradient_checkpointing to true"):
        apply_overrides(TrainConfig(), ["train.checkpoint_layers=8"])
    cfg = apply_overrides(TrainConfig(), ["train.gradient_checkpointing=true", "train.checkpoint_layers=8"])
    assert cfg.train.checkpoint_layers == 8


@pytest.mark.parametrize("card_gib", [16, 24, 40, 80])
def test_auto_checkpoints_the_fewest_layers_that_fit_the_card(card_gib):
    card = card_gib * GiB
    cfg = cfg_8b("train.keep_dequantized=false")  # what auto adds on a roomy card: test_keep_dequantized.py
    highs = ladder(cfg, card)
    fewest = next(k for k, high in enumerate(highs) if high <= card)  # counted one by one, not searched
    planned = advise(cfg, LLAMA3_8B, gpu_bytes=card, data_stats=STATS)
    est = planned.estimate
    assert est.details["checkpointed_layers"] == fewest and est.details["checkpointing_auto"]
    chosen = estimate(with_checkpointing(cfg, fewest, 32), LLAMA3_8B, gpu_bytes=card, data_stats=STATS)
    assert est.total == chosen.total and est.high <= card
    decision = planned.decision("train.gradient_checkpointing")
    assert decision.requested == "auto" and decision.chosen == fewest and f"{card_gib}.0 GiB" in decision.reason


def test_auto_on_a_big_card_turns_checkpointing_off_and_without_a_card_checkpoints_all():
    roomy = advise(cfg_8b(), LLAMA3_8B, gpu_bytes=80 * GiB, data_stats=STATS).estimate
    assert roomy.details["checkpointed_layers"] == 0 and not roomy.details["gradient_checkpointing"]
    unknown = estimate(cfg_8b(), LLAMA3_8B, data_stats=STATS)
    every = estimate(cfg_8b("train.gradient_checkpointing=true"), LLAMA3_8B, data_stats=STATS)
    assert unknown.details["checkpointed_layers"] == 32 and unknown.total == every.total
    assert roomy.total > every.total + 20 * GiB  # what the speed costs: the activations of 32 layers


def test_a_model_the_budget_cannot_read_gets_every_layer_checkpointed():
    from qlora_engine.budget.spec import spec_from_config

    spec = spec_from_config({"model_type": "mystery", "vocab_size": 1000})  # no hidden size, no layer count
    assert not spec.usable
    cfg, decision = choose_checkpointing(cfg_8b(), spec, 80 * GiB)
    assert cfg.train.gradient_checkpointing is True and cfg.train.checkpoint_layers is None
    assert decision.field == "train.gradient_checkpointing" and "cannot model" in decision.reason


def test_fit_under_auto_searches_with_every_layer_and_offers_nothing_faster():
    auto = fit(cfg_8b(), 24 * GiB, LLAMA3_8B, data_stats=STATS)
    every = fit(cfg_8b("train.gradient_checkpointing=true"), 24 * GiB, LLAMA3_8B, data_stats=STATS)
    assert auto.fits and auto.faster is None and every.faster is not None
    assert auto.max_micro_batch_size == every.max_micro_batch_size >= 4
    assert auto.max_sequence_length == every.max_sequence_length
    # a card it does not fit even with every layer checkpointed: the usual single changes
    tight = fit(cfg_8b("train.micro_batch_size=32"), 24 * GiB, LLAMA3_8B, data_stats=STATS)
    assert not tight.fits and tight.suggestions
    assert tight.estimate.details["checkpointed_layers"] == 32
    for s in tight.suggestions:
        changed = apply_overrides(cfg_8b("train.micro_batch_size=32"), s.overrides)
        assert estimate(changed, LLAMA3_8B, gpu_bytes=24 * GiB, data_stats=STATS).fits


# -- the engine ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def four_layers(tmp_path_factory):
    return build_tiny_llama(tmp_path_factory.mktemp("tiny-llama-4"), layers=4)


def long_samples(cfg: TrainConfig, n: int, length: int) -> PreparedData:
    """``n`` samples of ``length`` random tokens: activations big enough for checkpointing to matter."""
    gen = torch.Generator().manual_seed(0)
    vocab = json.loads((cfg.resolve(cfg.model.ref) / "config.json").read_text())["vocab_size"]
    rows = [torch.randint(3, vocab, (length,), generator=gen).tolist() for _ in range(n)]
    report = {"token_stats": token_stats(np.array([length] * n), cfg.data.max_length)}
    return PreparedData(train=[{"input_ids": r, "labels": r} for r in rows], validation=None, report=report,
                        fingerprint=f"random-{n}x{length}")


def checkpointed(trainer: Trainer) -> list[bool]:
    from transformers.modeling_layers import GradientCheckpointingLayer

    return [m.gradient_checkpointing for m in trainer.model.modules() if isinstance(m, GradientCheckpointingLayer)]


def decided(sink: ListSink, field: str = "train.gradient_checkpointing"):
    """The run's decision on ``field``, from its run_started event (attributes, not text)."""
    (started,) = sink.of(RunStarted)
    return next(d for d in started.decision_list() if d.field == field)


def test_on_the_cpu_auto_checkpoints_every_layer_and_says_so(tiny_cfg, four_layers):
    sink = ListSink()
    trainer = build_trainer(tiny_cfg(f"model.ref={four_layers}"), sink)
    trainer.setup()
    try:
        assert checkpointed(trainer) == [True] * 4
        decision = decided(sink)
        assert decision.chosen == 4 and decision.summary == "every layer checkpointed"
        assert "no GPU" in decision.reason
        assert trainer.facts["checkpointed_layers"] == 4
    finally:
        trainer.cleanup()


def test_a_card_with_room_for_some_layers_then_an_out_of_memory_step(tiny_cfg, four_layers, tmp_path, monkeypatch):
    """The trainer checkpoints what the budget chose for the card it is told it has; a step that
    still runs out of memory runs again with every layer checkpointed, the same math."""
    cfg = tiny_cfg(f"model.ref={four_layers}", "train.max_steps=3", f"output.dir={tmp_path / 'auto'}",
                   "data.max_length=512", "train.micro_batch_size=2", "train.gradient_accumulation_steps=2")
    data = long_samples(cfg, 12, 512)
    model_config = json.loads((four_layers / "config.json").read_text())
    stats = data.report["token_stats"]
    highs = [estimate(with_checkpointing(cfg, k, 4), model_config, data_stats=stats).high for k in range(5)]
    assert highs[0] > highs[2] > highs[4]
    card = highs[2]  # room for two layers' activations, not for four
    fewest = next(k for k, h in enumerate(highs) if h <= card)
    assert 0 < fewest < 4
    monkeypatch.setattr(vram, "usable_vram", lambda device: card)

    sink = ListSink()
    trainer = build_trainer(cfg, sink, data=data)
    trainer.setup()
    try:
        assert checkpointed(trainer) == [True] * fewest + [False] * (4 - fewest)
        decision = decided(sink)
        assert decision.chosen == fewest and decision.summary == f"the lowest {fewest} of 4 layers checkpointed"
        top = [m for m in trainer.model.modules() if type(m).__name__ == "LlamaDecoderLayer"][-1]
        calls, raised = [], []

        def out_of_memory_once(_module, _args):
            # in the second micro-batch's forward, after the first one's gradients were added up
            calls.append(trainer.step)
            if len(calls) == 2:
                raised.append(trainer.step)
                raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (raised by the test)")

        top.register_forward_pre_hook(out_of_memory_once)
        trainer.train()
        assert raised == [0] and checkpointed(trainer) == [True] * 4
        assert trainer.facts["checkpointed_layers"] == 4
    finally:
        trainer.cleanup()
    warning = [e for e in sink.of(LogLine) if e.level == "warning" and "ran out of memory at step 1" in e.message]
    assert warning and f"with {fewest} of 4 layers" in warning[0].message

    every = ListSink()
    cfg_every = apply_overrides(cfg, ["train.gradient_checkpointing=true", f"output.dir={tmp_path / 'every'}"])
    reference = build_trainer(cfg_every, every, data=long_samples(cfg, 12, 512))
    reference.setup()
    reference.train()
    reference.cleanup()
    got, want = [e.loss for e in sink.of(StepMetrics)], [e.loss for e in every.of(StepMetrics)]
    assert len(got) == 3 and got == pytest.approx(want, rel=1e-5)


def test_an_out_of_memory_step_with_every_layer_checkpointed_still_fails(tiny_cfg, four_layers, tmp_path):
    sink = ListSink()
    trainer = build_trainer(tiny_cfg(f"model.ref={four_layers}", f"output.dir={tmp_path / 'r'}"), sink)
    trainer.setup()
    try:
        def out_of_memory(_module, _args):
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (raised by the test)")

        trainer.model.get_input_embeddings().register_forward_pre_hook(out_of_memory)
        with pytest.raises(torch.cuda.OutOfMemoryError):
            trainer.train()
    finally:
        trainer.cleanup()
    assert not any(e.level == "warning" and "ran out of memory" in e.message for e in sink.of(LogLine))


def test_the_estimate_command_says_what_auto_chose():
    from qlora_engine.budget.cli import render

    tight = advise(cfg_8b(), LLAMA3_8B, gpu_bytes=24 * GiB, data_stats=STATS).estimate
    k = tight.details["checkpointed_layers"]
    assert 0 < k < 32 and f"checkpointing on ({k} layers), chosen by auto" in render(tight)
    roomy = advise(cfg_8b(), LLAMA3_8B, gpu_bytes=80 * GiB, data_stats=STATS).estimate
    assert "checkpointing off, chosen by auto" in render(roomy)
    mine = estimate(cfg_8b("train.gradient_checkpointing=true"), LLAMA3_8B, gpu_bytes=24 * GiB, data_stats=STATS)
    assert "checkpointing on (32 layers)," in render(mine) and "auto" not in render(mine).splitlines()[0]
