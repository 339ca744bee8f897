"""train.keep_dequantized (auto | true | false): the 4-bit weights dequantized once and kept for the run.

The budget part uses the Llama-3-8B shape (config only): ``auto`` keeps them only when no layer is
checkpointed and the estimate with them still fits the card, and the estimate counts exactly the
bytes the trainer keeps. The engine part trains a real NF4 Llama on the CPU: the same losses and
LoRA gradients as dequantizing per call, no dequantization in a step, and an out-of-memory step
that lets them go.
"""

from __future__ import annotations

import json

import pytest
import torch
from tiny import LLAMA3_8B, build_tiny_llama

from qlora_engine import fast_lora, vram
from qlora_engine.budget import estimate
from qlora_engine.config import TrainConfig, apply_overrides
from qlora_engine.errors import ConfigError
from qlora_engine.events import ListSink, LogLine, RunStarted, StepMetrics
from qlora_engine.plan import advise, make_plan
from qlora_engine.runner import build_trainer

GiB = 1 << 30
STATS = {"max": 2048, "longest_sequence": 2048}
BF16 = 2


def cfg_8b(*overrides: str) -> TrainConfig:
    base = ["data.path=x", "data.max_length=2048", "train.micro_batch_size=4", "train.kernels=liger"]
    return apply_overrides(TrainConfig(), base + list(overrides))


def adapted_numel(spec: dict, targets: set[str]) -> int:
    """The weights of one block's adapted linear layers, from the model's config."""
    h, i = spec["hidden_size"], spec["intermediate_size"]
    kv = spec["num_key_value_heads"] * h // spec["num_attention_heads"]
    sizes = {"q_proj": h * h, "k_proj": h * kv, "v_proj": h * kv, "o_proj": h * h,
             "gate_proj": h * i, "up_proj": h * i, "down_proj": i * h}  # fmt: skip
    return sum(sizes[t] for t in targets)


def decision(advice, field="train.keep_dequantized"):
    return next((d for d in advice.decisions if d.field == field), None)


# --- the choice -------------------------------------------------------------------------------


def test_auto_is_the_default_and_the_field_reads_from_yaml(tmp_path):
    assert TrainConfig().train.keep_dequantized == "auto"
    for text, want in (("auto", "auto"), ("true", True), ("false", False), ("yes", True), ("off", False)):
        path = tmp_path / "c.yaml"
        path.write_text(f"train:\n  keep_dequantized: {text}\n")
        assert TrainConfig.load(path).train.keep_dequantized == want


@pytest.mark.parametrize("text", ["'sometimes'", "2", "[true]", "'on-gpu'"])
def test_other_values_are_refused_at_the_field(tmp_path, text):
    path = tmp_path / "c.yaml"
    path.write_text(f"train:\n  keep_dequantized: {text}\n")
    with pytest.raises(ConfigError) as e:
        TrainConfig.load(path)
    assert "train.keep_dequantized" in str(e.value)


@pytest.mark.parametrize("card_gib", [12, 16, 24, 32, 40, 48, 56, 64, 72, 79.1, 96, 120, 141])
@pytest.mark.parametrize("shape", [(2048, 4), (1024, 2), (4096, 1), (512, 8)])
def test_auto_keeps_them_only_when_nothing_is_checkpointed_and_they_fit(card_gib, shape):
    seq, mbs = shape
    cfg = cfg_8b(f"data.max_length={seq}", f"train.micro_batch_size={mbs}")
    card = int(card_gib * GiB)
    stats = {"max": seq, "longest_sequence": seq}
    advice = advise(cfg, LLAMA3_8B, gpu_bytes=card, data_stats=stats)
    chosen, ckpt = decision(advice), decision(advice, "train.gradient_checkpointing")
    kept = advice.estimate.components["dequantized_weights"]
    with_them = estimate(
        apply_overrides(cfg, ["train.gradient_checkpointing=false", "train.keep_dequantized=true"]),
        LLAMA3_8B, gpu_bytes=card, data_stats=stats,
    ).high  # fmt: skip
    assert chosen is not None and chosen.requested == "auto"
    if chosen.chosen:
        assert ckpt.summary == "off" and with_them <= card
        assert advice.config.train.keep_dequantized is True and kept > 0
        assert advice.estimate.high <= card
    else:
        assert ckpt.summary != "off" or with_them > card
        assert advice.config.train.keep_dequantized is False and kept == 0
        assert ("checkpoints layers" in chosen.reason) == (ckpt.summary != "off")


def test_the_choice_flips_at_the_card_where_they_fit():
    cfg = cfg_8b()
    on = apply_overrides(cfg, ["train.gradient_checkpointing=false", "train.keep_dequantized=true"])
    need = estimate(on, LLAMA3_8B, gpu_bytes=80 * GiB, data_stats=STATS).high
    assert decision(advise(cfg, LLAMA3_8B, gpu_bytes=need, data_stats=STATS)).chosen is True
    below = decision(advise(cfg, LLAMA3_8B, gpu_bytes=need - 64 * (1 << 20), data_stats=STATS))
    assert below.chosen is False and "may not fit" in below.reason


@pytest.mark.parametrize(
    "overrides, reason",
    [
        (["lora.dropout=0.1"], "fast_lora"),
        (["lora.use_dora=true"], "fast_lora"),
        (["quant.compute_dtype=float16"], "fast_lora"),
        (["train.fast_lora=false"], "fast_lora"),
        (["train.gradient_checkpointing=true"], "checkpoints layers"),
        (["train.gradient_checkpointing=true", "train.checkpoint_layers=3"], "checkpoints layers"),
    ],
)
def test_auto_leaves_them_out_where_they_cannot_or_should_not_be_kept(overrides, reason):
    advice = advise(cfg_8b(*overrides), LLAMA3_8B, gpu_bytes=141 * GiB, data_stats=STATS)
    chosen = decision(advice)
    assert chosen.chosen is False and reason in chosen.reason
    assert advice.estimate.components["dequantized_weights"] == 0


def test_ddp_counts_its_gradient_buckets_before_keeping_them():
    cfg = cfg_8b("train.strategy=ddp")
    on = apply_overrides(cfg, ["train.gradient_checkpointing=false", "train.keep_dequantized=true"])
    single = estimate(on, LLAMA3_8B, gpu_bytes=80 * GiB, data_stats=STATS)
    assert single.components["lora_grads"] > 0
    card = single.high  # room for one process's run with them, not for DDP's buckets beside it
    one = make_plan(cfg, n_train=100, data_stats=STATS, cuda=True, card_bytes=card, model_config=LLAMA3_8B)
    two = make_plan(cfg, n_train=100, data_stats=STATS, cuda=True, card_bytes=card, model_config=LLAMA3_8B, world_size=2)
    assert one.config.train.keep_dequantized is True
    assert two.config.train.keep_dequantized is False
    assert "may not fit" in next(d for d in two.decisions if d.field == "train.keep_dequantized").reason
    roomy = make_plan(cfg, n_train=100, data_stats=STATS, cuda=True, card_bytes=2 * card, model_config=LLAMA3_8B,
                      world_size=2)  # fmt: skip
    assert roomy.config.train.keep_dequantized is True and roomy.config.train.strategy == "ddp"


def test_fsdp_leaves_them_out_and_refuses_them_when_asked():
    two = advise(cfg_8b("train.strategy=fsdp"), LLAMA3_8B, gpu_bytes=141 * GiB, data_stats=STATS, world_size=2)
    assert decision(two).chosen is False and "FSDP" in decision(two).reason
    with pytest.raises(ConfigError) as e:
        cfg_8b("train.strategy=fsdp", "train.keep_dequantized=true")
    assert e.value.field == "train.keep_dequantized"
    plan = dict(n_train=100, data_stats=STATS, cuda=True, card_bytes=20 * GiB, model_config=LLAMA3_8B, world_size=2)
    with pytest.raises(ConfigError) as e:  # auto's strategy settles on FSDP for a model no card holds
        make_plan(cfg_8b("train.keep_dequantized=true", "train.gradient_checkpointing=true"), **plan)
    assert e.value.field == "train.keep_dequantized"


@pytest.mark.parametrize("overrides", [["train.fast_lora=false"], ["train.fast_lora=false", "lora.rank=8"]])
def test_true_without_the_fast_path_is_refused_at_the_field(overrides):
    with pytest.raises(ConfigError) as e:
        cfg_8b("train.keep_dequantized=true", *overrides)
    assert e.value.field == "train.keep_dequantized" and "fast_lora" in str(e.value)


@pytest.mark.parametrize("value", [True, False])
def test_an_explicit_value_is_kept_whatever_the_card(value):
    for card in (12 * GiB, 141 * GiB, None):
        advice = advise(cfg_8b(f"train.keep_dequantized={str(value).lower()}", "train.gradient_checkpointing=false"),
                        LLAMA3_8B, gpu_bytes=card, data_stats=STATS)  # fmt: skip
        assert decision(advice) is None and advice.config.train.keep_dequantized is value
        assert (advice.estimate.components["dequantized_weights"] > 0) is value


@pytest.mark.parametrize("card_gib", [8, 10, 12, 14, 16, 18, 20, 22])
@pytest.mark.parametrize("checkpointing", ["true", "false"])
def test_kept_on_a_card_too_small_the_first_fix_offered_is_to_let_them_go(card_gib, checkpointing):
    cfg = cfg_8b("train.keep_dequantized=true", f"train.gradient_checkpointing={checkpointing}")
    card = card_gib * GiB
    advice = advise(cfg, LLAMA3_8B, gpu_bytes=card, data_stats=STATS)
    without = estimate(apply_overrides(cfg, ["train.keep_dequantized=false"]), LLAMA3_8B, gpu_bytes=card, data_stats=STATS)
    assert not advice.estimate.fits  # 13 GiB of kept weights on top of the run
    offered = [s.overrides for s in advice.fit.suggestions]
    if without.fits:
        assert offered[0] == ["train.keep_dequantized=false"]
        assert advice.fit.suggestions[0].total == without.total
    else:
        assert ["train.keep_dequantized=false"] not in offered


@pytest.mark.parametrize(
    "overrides, targets, layers",
    [
        ([], {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}, 32),
        (["lora.target_modules=[attention]"], {"q_proj", "k_proj", "v_proj", "o_proj"}, 32),
        (["lora.target_modules=[mlp]"], {"gate_proj", "up_proj", "down_proj"}, 32),
        (["lora.target_modules=[q_proj, v_proj]"], {"q_proj", "v_proj"}, 32),
        (["lora.layers=0-7"], {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}, 8),
        (["lora.layers=12-29", "lora.target_modules=[down_proj]"], {"down_proj"}, 18),
    ],
)
def test_the_budget_counts_the_adapted_weights_in_the_compute_dtype(overrides, targets, layers):
    est = estimate(cfg_8b("train.keep_dequantized=true", "train.gradient_checkpointing=false", *overrides),
                   LLAMA3_8B, data_stats=STATS)  # fmt: skip
    assert est.components["dequantized_weights"] == BF16 * layers * adapted_numel(LLAMA3_8B, targets)


def test_the_plan_s_out_of_memory_fallback_keeps_none():
    plan = make_plan(cfg_8b(), n_train=100, data_stats=STATS, cuda=True, card_bytes=141 * GiB, model_config=LLAMA3_8B)
    assert plan.config.train.keep_dequantized is True and plan.config.train.gradient_checkpointing is False
    assert plan.oom_fallback.train.keep_dequantized is False and plan.oom_fallback.train.gradient_checkpointing is True
    cpu = make_plan(cfg_8b(), n_train=100, data_stats=STATS, cuda=False, card_bytes=None, model_config=LLAMA3_8B)
    assert cpu.config.train.keep_dequantized is False


# --- the run ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def four_layers(tmp_path_factory):
    return build_tiny_llama(tmp_path_factory.mktemp("tiny-llama-4"), layers=4)


def kept(trainer) -> dict[str, torch.Tensor]:
    return {n: m._qlora_dense for n, m in trainer.model.named_modules() if getattr(m, "_qlora_dense", None) is not None}


@pytest.mark.parametrize(
    "overrides",
    [
        [],
        ["lora.target_modules=[attention]"],
        ["lora.target_modules=[q_proj, down_proj]", "lora.layers=1-2"],
        ["quant.compute_dtype=bfloat16", "lora.target_modules=[mlp]"],
    ],
)
def test_the_trainer_keeps_what_the_budget_counts(tiny_cfg, four_layers, overrides):
    cfg = tiny_cfg(f"model.ref={four_layers}", "train.keep_dequantized=true", "train.gradient_checkpointing=false",
                   *overrides)  # fmt: skip
    trainer = build_trainer(cfg, ListSink())
    trainer.setup()
    try:
        dense = kept(trainer)
        assert dense and trainer.facts["dequantized"] is True
        assert all(t.dtype == trainer.dtype for t in dense.values())
        model_config = json.loads((four_layers / "config.json").read_text())
        dtype = str(trainer.dtype).removeprefix("torch.")  # 'auto' is float32 on the CPU, bfloat16 to the budget
        est = estimate(apply_overrides(cfg, [f"quant.compute_dtype={dtype}"]), model_config)
        assert est.components["dequantized_weights"] == sum(t.numel() * t.element_size() for t in dense.values())
        for name, t in dense.items():  # the very values of the 4-bit weight
            base = trainer.model.get_submodule(name)
            assert torch.equal(t, fast_lora.dequantize(base.weight).to(trainer.dtype))
    finally:
        trainer.cleanup()


@pytest.mark.parametrize("dtype", ["float32"])  # bfloat16: the next test
@pytest.mark.parametrize("merged", [True, False])  # the frozen matmul inside the LoRA function, or beside it
def test_a_run_that_keeps_them_trains_the_same_losses_without_dequantizing(
    tiny_cfg, four_layers, tmp_path, monkeypatch, dtype, merged
):
    monkeypatch.setattr(fast_lora, "MERGE_DENSE", merged)

    def losses(value: str) -> tuple[list[float], int]:
        calls = []
        real = fast_lora.dequantize
        monkeypatch.setattr(fast_lora, "dequantize", lambda w: calls.append(1) or real(w))
        sink = ListSink()
        cfg = tiny_cfg(f"model.ref={four_layers}", f"train.keep_dequantized={value}", f"quant.compute_dtype={dtype}",
                       "train.gradient_checkpointing=false", "train.max_steps=4", f"output.dir={tmp_path / value}")  # fmt: skip
        trainer = build_trainer(cfg, sink)
        trainer.setup()
        calls.clear()  # what setup dequantized once
        trainer.train()
        trainer.cleanup()
        monkeypatch.setattr(fast_lora, "dequantize", real)
        return [e.loss for e in sink.of(StepMetrics)], len(calls)

    (kept_losses, kept_calls), (plain_losses, plain_calls) = losses("true"), losses("false")
    assert len(kept_losses) == 4 and kept_losses == pytest.approx(plain_losses, rel=1e-6)
    assert kept_calls == 0 and plain_calls > 0


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_in_bfloat16_their_gradients_are_no_further_from_float32(four_layers, tmp_path, seed):
    """Kept, a layer's frozen matmul runs inside the LoRA function, whose backward adds the LoRA
    half's input gradient into the frozen matmul's in the GEMM (fp32 accumulation) rather than
    summing two bf16 tensors: other rounding, so compared by distance to the float32 computation."""
    from tests.engine.test_fast_lora import make_trainer, rel_err, step

    ids = torch.randint(0, 200, (2, 128), generator=torch.Generator().manual_seed(seed))
    samples = [{"input_ids": row.tolist(), "labels": row.tolist()} for row in ids]
    runs = {}
    for name, overrides in {
        "fp32": ["quant.compute_dtype=float32", "train.keep_dequantized=false"],
        "kept": ["quant.compute_dtype=bfloat16", "train.keep_dequantized=true"],
        "per call": ["quant.compute_dtype=bfloat16", "train.keep_dequantized=false"],
    }.items():
        trainer, _ = make_trainer(four_layers, samples, tmp_path / name, "train.gradient_checkpointing=false", *overrides)
        assert bool(kept(trainer)) == (name == "kept")
        runs[name] = step(trainer, samples)
        trainer.cleanup()
    (loss_fp32, want, _), (loss_kept, got, _), (loss_call, other, _) = runs["fp32"], runs["kept"], runs["per call"]
    # down_proj's LoRA half, added apart per call, is added in the GEMM when kept: bf16 rounding apart
    assert loss_kept == pytest.approx(loss_call, rel=1e-3) and loss_kept == pytest.approx(loss_fp32, rel=1e-2)
    assert rel_err(got, want) <= 1.02 * rel_err(other, want)
    assert rel_err(got, other) < 2e-2


def test_an_out_of_memory_step_lets_them_go_and_checkpoints_every_layer(tiny_cfg, four_layers, tmp_path, monkeypatch):
    monkeypatch.setattr(vram, "usable_vram", lambda device: 141 * GiB)  # told of a big card: auto keeps them
    sink = ListSink()
    cfg = tiny_cfg(f"model.ref={four_layers}", "train.max_steps=3", f"output.dir={tmp_path / 'auto'}")
    trainer = build_trainer(cfg, sink)
    trainer.setup()
    try:
        (started,) = sink.of(RunStarted)
        chosen = next(d for d in started.decision_list() if d.field == "train.keep_dequantized")
        assert chosen.chosen is True and kept(trainer)
        top = [m for m in trainer.model.modules() if type(m).__name__ == "LlamaDecoderLayer"][-1]
        raised = []

        def out_of_memory_once(_module, _args):
            if not raised and trainer.step == 1:
                raised.append(trainer.step)
                raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (raised by the test)")

        top.register_forward_pre_hook(out_of_memory_once)
        trainer.train()
        assert raised == [1] and not kept(trainer) and trainer.facts["dequantized"] is False
    finally:
        trainer.cleanup()
    (warning,) = [e.message for e in sink.of(LogLine) if e.level == "warning" and "ran out of memory" in e.message]
    assert "keeps no weight dequantized" in warning and "at step 2" in warning

    reference = ListSink()
    plain = build_trainer(apply_overrides(cfg, ["train.keep_dequantized=false", f"output.dir={tmp_path / 'plain'}"]),
                          reference)  # fmt: skip
    plain.setup()
    plain.train()
    plain.cleanup()
    got, want = [e.loss for e in sink.of(StepMetrics)], [e.loss for e in reference.of(StepMetrics)]
    assert len(got) == 3 and got == pytest.approx(want, rel=1e-5)


def test_compiled_layers_read_the_kept_weights_with_no_graph_break(tiny_cfg, four_layers, tmp_path, monkeypatch):
    # aot_eager: dynamo's graphs and AOT autograd's partition, as on a GPU (test_compile_switch.py says why)
    from torch._dynamo.utils import counters

    monkeypatch.setattr(fast_lora.CompiledBlocks, "BACKEND", "aot_eager")
    calls = []
    real = fast_lora._dequantize  # what the compiled 4-bit matmul op runs
    monkeypatch.setattr(fast_lora, "_dequantize", lambda *q: calls.append(1) or real(*q))

    def losses(*overrides: str) -> list[float]:
        torch._dynamo.reset()
        counters.clear()
        sink = ListSink()
        cfg = tiny_cfg(f"model.ref={four_layers}", "train.gradient_checkpointing=false", "train.max_steps=3",
                       f"output.dir={tmp_path / '-'.join(overrides)}", *overrides)  # fmt: skip
        trainer = build_trainer(cfg, sink)
        trainer.setup()
        calls.clear()  # the kept weights are dequantized once, at setup: count the steps' calls only
        trainer.train()
        trainer.cleanup()
        assert not counters["graph_break"], dict(counters["graph_break"])
        return [e.loss for e in sink.of(StepMetrics)]

    plain = losses("train.keep_dequantized=false", "train.compile=blocks")
    assert calls  # the compiled layers dequantized in every step
    calls.clear()
    kept_losses = losses("train.keep_dequantized=true", "train.compile=blocks")
    assert not calls
    eager = losses("train.keep_dequantized=false")
    torch._dynamo.reset()
    assert len(kept_losses) == 3
    assert kept_losses == pytest.approx(plain, rel=1e-5) and kept_losses == pytest.approx(eager, rel=1e-5)


@pytest.mark.parametrize("gpu", [None, 24 * GiB])
def test_the_estimate_lists_them_only_when_kept(gpu):
    from qlora_engine.budget.cli import render

    def lines(value: str) -> list[str]:
        cfg = cfg_8b(f"train.keep_dequantized={value}", "train.gradient_checkpointing=true")
        est = estimate(cfg, LLAMA3_8B, gpu_bytes=gpu, data_stats=STATS)
        return [ln.split()[0] for ln in render(est).splitlines() if ln.startswith("  ")]

    kept, not_kept = lines("true"), lines("false")
    assert "dequantized_weights" in kept and "dequantized_weights" not in not_kept
    assert "quantized_weights" in kept and "quantized_weights" in not_kept
