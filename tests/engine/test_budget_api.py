"""The budget's interface: validation, unknown architectures, fit(), serialization, the CLI and the run event."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from tiny import LLAMA3_8B

from qlora_engine import budget
from qlora_engine.budget import (
    COMPONENTS,
    FitAdvice,
    VramEstimate,
    estimate,
    fit,
    model_spec,
    parse_gpu_size,
)
from qlora_engine.budget import spec as spec_module
from qlora_engine.cli import main as cli_main
from qlora_engine.config import TrainConfig, apply_overrides
from qlora_engine.errors import ConfigError
from qlora_engine.events import ListSink, RunStarted
from qlora_engine.runner import run

GiB = 1 << 30

def cfg_with(*overrides: str) -> TrainConfig:
    return apply_overrides(TrainConfig(), list(overrides))


# -- GPU sizes -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text, expected",
    [
        ("24GiB", 24 * GiB),
        ("80GB", 80 * GiB),
        ("24", 24 * GiB),
        ("24 gib", 24 * GiB),
        ("22000MiB", 22000 << 20),
        ("1.5T", int(1.5 * (1 << 40))),
        (16, 16 * GiB),
        ("rtx4090", 24564 << 20),
        ("H100", 81559 << 20),
    ],
)
def test_parse_gpu_size(text, expected):
    assert parse_gpu_size(text) == expected


@pytest.mark.parametrize("text", ["", "abc", "-8GB", "0", "24XB", "nan", "inf", "12 GB extra", "100MB", "99TB", True])
def test_parse_gpu_size_rejects_nonsense(text):
    with pytest.raises(ConfigError, match="GPU size"):
        parse_gpu_size(text)


@pytest.mark.parametrize("bad", [0, -1, 1.5, "24GiB", True])
def test_estimate_rejects_a_bad_gpu_size(bad):
    with pytest.raises(ConfigError, match="GPU size"):
        estimate(cfg_with(), LLAMA3_8B, gpu_bytes=bad)


def test_negative_batch_is_a_validation_error():
    with pytest.raises(ConfigError, match="micro_batch_size"):
        cfg_with("train.micro_batch_size=-1")
    cfg = cfg_with()
    cfg.train.micro_batch_size = 0  # the GUI edits fields in place; estimate validates again
    with pytest.raises(ConfigError, match="micro_batch_size"):
        estimate(cfg, LLAMA3_8B)


def test_unknown_lora_target_or_layer_is_a_validation_error():
    with pytest.raises(ConfigError, match="target_modules"):
        estimate(cfg_with("lora.target_modules=[qkv]"), LLAMA3_8B)
    with pytest.raises(ConfigError, match="lora.layers"):
        estimate(cfg_with("lora.layers='30-40'"), LLAMA3_8B)


# -- unknown or incomplete configs ---------------------------------------------------------------


def test_unknown_architecture_gives_an_approximate_estimate():
    mystery = {"model_type": "mystery-net", "hidden_size": 2048, "num_hidden_layers": 16, "vocab_size": 50000}
    est = estimate(cfg_with(), mystery, gpu_bytes=24 * GiB)
    assert est.approximate and est.total > 0 and est.fits is True
    text = " ".join(est.reasons)
    assert "mystery-net" in text and "intermediate_size" in text and "num_attention_heads" in text
    assert est.low < est.total < est.high


def test_missing_sizes_give_no_estimate_but_no_crash():
    for broken in ({"model_type": "llama"}, {}, {"model_type": "llama", "hidden_size": "many"}):
        est = estimate(cfg_with(), broken, gpu_bytes=24 * GiB)
        assert est.approximate and est.fits is None and est.total == 0
        assert any("no estimate" in r for r in est.reasons)


def test_a_llama_config_json_without_defaults_reads_like_transformers_does():
    # config.json omits values equal to the class defaults (Llama: untied embeddings).
    spec = model_spec(LLAMA3_8B)
    assert not spec.approximate and not spec.tie_word_embeddings and spec.head_dim == 128
    assert spec.linear_names() == ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def test_prequantized_checkpoints():
    bnb4 = {"quant_method": "bitsandbytes", "load_in_4bit": True, "bnb_4bit_quant_type": "nf4",
            "bnb_4bit_use_double_quant": False}  # fmt: skip
    saved = estimate(cfg_with("quant.double_quant=true"), {**LLAMA3_8B, "quantization_config": bnb4})
    plain = estimate(cfg_with("quant.double_quant=false"), LLAMA3_8B)
    assert not saved.approximate and saved.components["quant_constants"] == plain.components["quant_constants"]
    gguf = estimate(cfg_with(), {**LLAMA3_8B, "quantization_config": {"quant_method": "gguf"}})
    assert not gguf.approximate
    gptq = estimate(cfg_with(), {**LLAMA3_8B, "quantization_config": {"quant_method": "gptq"}})
    assert gptq.approximate and "gptq" in " ".join(gptq.reasons)


def test_multimodal_config_counts_its_language_model():
    gemma3 = {"model_type": "gemma3", "text_config": {**LLAMA3_8B, "model_type": "gemma3_text", "head_dim": 128}}
    est = estimate(cfg_with(), gemma3)
    assert est.approximate and any("multimodal" in r for r in est.reasons)
    assert est.details["quantized_parameters"] > 6e9


def test_families_with_fused_or_biased_projections():
    phi3 = model_spec({**LLAMA3_8B, "model_type": "phi3"})
    assert phi3.linear_names() == ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"]
    qwen2 = model_spec({**LLAMA3_8B, "model_type": "qwen2"})
    assert [lin.bias for lin in qwen2.block_linears][:4] == [True, True, True, False]
    assert estimate(cfg_with("lora.target_modules=[attention]"), {**LLAMA3_8B, "model_type": "phi3"}).total > 0


# -- the estimate's structure --------------------------------------------------------------------


def test_components_add_up_and_serialize():
    est = estimate(cfg_with(), LLAMA3_8B, gpu_bytes=24 * GiB, gpu_name="RTX 4090")
    assert list(est.components) == list(COMPONENTS)
    assert sum(est.components.values()) == est.total
    assert est.low < est.total < est.high
    back = VramEstimate.from_dict(json.loads(json.dumps(est.to_dict())))
    assert back == est


def test_paged_optimizer_state_is_outside_torch_reserved_and_can_spill():
    cfg = cfg_with("optim.optimizer=paged_adamw_32bit", "lora.rank=256")
    est = estimate(cfg, LLAMA3_8B)
    paged = est.details["paged_optimizer_bytes"]
    assert paged > 1 * GiB
    assert est.torch_reserved == est.total - est.components["cuda_context"] - paged
    tight = est.total - paged // 2  # half the paged state would not fit on this card
    on_card = estimate(cfg, LLAMA3_8B, gpu_bytes=tight)
    assert on_card.fits and on_card.spill_to_cpu_bytes == est.total - tight
    unpaged = estimate(cfg_with("optim.optimizer=adamw", "lora.rank=256"), LLAMA3_8B, gpu_bytes=tight)
    assert unpaged.fits is False and unpaged.spill_to_cpu_bytes == 0


def test_data_statistics_size_the_longest_micro_batch():
    cfg = cfg_with("data.max_length=4096", "train.micro_batch_size=2")
    full = estimate(cfg, LLAMA3_8B)
    short = estimate(cfg, LLAMA3_8B, data_stats={"min": 100, "max": 900, "median": 300, "p95": 700})
    assert short.details["sequence_length"] == 900 and short.total < full.total
    assert short.details["attention_mask"]  # lengths differ, so micro-batches are padded
    same = estimate(cfg, LLAMA3_8B, data_stats={"min": 5000, "max": 9000})  # all truncated to 4096
    assert same.details["sequence_length"] == 4096 and not same.details["attention_mask"]
    packed = estimate(cfg_with("data.max_length=4096", "data.packing=true"), LLAMA3_8B, data_stats={"max": 300})
    assert packed.details["attention_mask"]


@pytest.mark.parametrize(
    "field, values",
    [
        ("train.micro_batch_size", [1, 2, 4, 8]),
        ("data.max_length", [256, 1024, 4096]),
        ("lora.rank", [4, 16, 64, 256]),
    ],
)
@pytest.mark.parametrize("ckpt", [True, False])
def test_more_of_anything_costs_more(field, values, ckpt):
    totals = [
        estimate(cfg_with(f"{field}={v}", f"train.gradient_checkpointing={ckpt}"), LLAMA3_8B).total for v in values
    ]
    assert totals == sorted(totals) and len(set(totals)) == len(totals)


def test_checkpointing_and_8bit_state_save_memory():
    base = estimate(cfg_with("train.gradient_checkpointing=false", "optim.optimizer=adamw"), LLAMA3_8B)
    ckpt = estimate(cfg_with("optim.optimizer=adamw"), LLAMA3_8B)
    eight = estimate(cfg_with("train.gradient_checkpointing=false", "optim.optimizer=adamw_8bit"), LLAMA3_8B)
    assert ckpt.components["activations"] < base.components["activations"] / 4
    assert eight.components["optimizer_state"] < base.components["optimizer_state"] / 3


def test_the_model_config_is_read_once(tiny_model_dir, monkeypatch):
    calls = []
    real = spec_module.model_spec
    monkeypatch.setattr(spec_module, "model_spec", lambda c: calls.append(1) or real(c))
    spec_module._CACHE.clear()
    cfg = cfg_with(f"model.ref={tiny_model_dir}")
    for rank in (4, 8, 16):
        estimate(apply_overrides(cfg, [f"lora.rank={rank}"]))
    assert calls == [1]


# -- logits and the allocator ----------------------------------------------------------------------


def test_the_logits_do_not_outlive_the_loss():
    # The trainer drops the model output before backward(): the loss's backward peak is the
    # fp32 log-softmax and its two gradients (12 x T x V), and no later phase holds logits.
    cfg = cfg_with("data.max_length=2048", "train.micro_batch_size=1", "train.kernels=none")
    est = estimate(cfg, LLAMA3_8B, data_stats={"min": 2048, "max": 2048})
    assert est.details["peak_phase"] == "loss_backward"
    assert est.components["logits_loss"] == 12 * 2048 * LLAMA3_8B["vocab_size"]


@pytest.mark.parametrize(
    "conf, mode",
    [
        (None, "expandable_segments"),  # the engine's default (qlora_engine/train.py)
        ("expandable_segments:True", "expandable_segments"),
        ("expandable_segments:False", "fixed_segments"),
        ("max_split_size_mb:128", "fixed_segments"),  # the user's own setting wins, expandable off
        ("max_split_size_mb:128, expandable_segments:true", "expandable_segments"),
    ],
)
def test_allocator_mode_follows_the_environment_like_the_engine(conf, mode):
    env = {} if conf is None else {"PYTORCH_CUDA_ALLOC_CONF": conf}
    assert budget.allocator_mode(env) == mode


def test_the_engine_sets_the_allocator_mode_the_budget_assumes():
    env = {k: v for k, v in os.environ.items() if k != "PYTORCH_CUDA_ALLOC_CONF"}
    code = "import os, qlora_engine.train; print(os.environ['PYTORCH_CUDA_ALLOC_CONF'])"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == budget.ENGINE_ALLOC_CONF


def _standard(seq: int, mbs: int) -> TrainConfig:
    # As the H200 ran it, before train.fast_lora: peft's LoRA forward.
    return cfg_with(f"data.max_length={seq}", f"train.micro_batch_size={mbs}", "train.gradient_checkpointing=true",
                    "lora.rank=16", "lora.alpha=16", "optim.optimizer=paged_adamw_8bit", "train.kernels=none",
                    "train.fast_lora=false")  # fmt: skip


@pytest.mark.parametrize(
    "seq, mbs, allocated_gib, reserved_gib", [(2048, 1, 9.53, 11.2), (2048, 4, 21.4, 27.79), (8192, 1, 21.4, 27.66)]
)
def test_fixed_segments_slack_reproduces_the_runs_it_was_fitted_to(monkeypatch, seq, mbs, allocated_gib, reserved_gib):
    # The H200 runs behind CALIBRATION["allocator"]["fixed_segments"]: no expandable segments,
    # and a trainer that still held the bf16 logits (2 x T x V) through the backward pass.
    monkeypatch.setenv("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:False")
    est = estimate(_standard(seq, mbs), LLAMA3_8B, data_stats={"min": seq, "max": seq})
    held_logits = 2 * seq * mbs * LLAMA3_8B["vocab_size"]
    assert est.details["allocator"] == "fixed_segments" and est.details["allocator_calibrated"]
    assert (est.details["torch_allocated"] + held_logits) / GiB == pytest.approx(allocated_gib, rel=0.02)
    assert (est.torch_reserved + held_logits) / GiB == pytest.approx(reserved_gib, rel=0.02)


def test_expandable_segments_slack_is_measured_and_below_the_fixed_mode(monkeypatch):
    # Calibrated on the H200 (tests/engine/test_budget_liger.py checks it against those runs).
    cfg = _standard(2048, 4)
    monkeypatch.setenv("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
    expandable = estimate(cfg, LLAMA3_8B, data_stats={"min": 2048, "max": 2048})
    monkeypatch.setenv("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:False")
    fixed = estimate(cfg, LLAMA3_8B, data_stats={"min": 2048, "max": 2048})
    assert expandable.details["allocator"] == "expandable_segments" and expandable.details["allocator_calibrated"]
    assert not any("not yet measured" in n for n in expandable.notes + fixed.notes)
    # Same formulas; the fixed mode strands logits-sized blocks, so it reserves more.
    assert expandable.details["torch_allocated"] == fixed.details["torch_allocated"]
    c = budget.CALIBRATION["allocator"]["expandable_segments"]
    rounding = expandable.components["allocator_slack"] - int(c["fragmentation"] * expandable.details["dynamic_bytes"])
    assert c["fixed"] <= rounding < c["fixed"] + (2 << 20)  # only the 512-byte rounding of persistent tensors besides
    assert expandable.components["allocator_slack"] < fixed.components["allocator_slack"]
    assert expandable.low < expandable.total < expandable.high < fixed.total


# -- fit -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("gpu", ["12GiB", "24GiB", "40GiB", "80GiB"])
@pytest.mark.parametrize("ckpt", [True, False])
def test_fit_limits_are_tight(gpu, ckpt):
    gpu_bytes = parse_gpu_size(gpu)
    cfg = cfg_with("data.max_length=2048", f"train.gradient_checkpointing={ckpt}")
    advice = fit(cfg, gpu_bytes, LLAMA3_8B)
    m = advice.max_micro_batch_size
    if m:
        assert estimate(apply_overrides(cfg, [f"train.micro_batch_size={m}"]), LLAMA3_8B, gpu_bytes=gpu_bytes).fits
    assert not estimate(apply_overrides(cfg, [f"train.micro_batch_size={m + 1}"]), LLAMA3_8B, gpu_bytes=gpu_bytes).fits
    s = advice.max_sequence_length
    if s:
        assert estimate(apply_overrides(cfg, [f"data.max_length={s}"]), LLAMA3_8B, gpu_bytes=gpu_bytes).fits
        longer = estimate(apply_overrides(cfg, [f"data.max_length={s + 64}"]), LLAMA3_8B, gpu_bytes=gpu_bytes)
        assert not longer.fits or s + 64 > LLAMA3_8B["max_position_embeddings"]  # capped at the model's context
    assert advice.fits == bool(advice.estimate.fits)


def test_fit_grows_with_the_card():
    cfg = cfg_with("data.max_length=1024")
    limits = [fit(cfg, g * GiB, LLAMA3_8B) for g in (10, 16, 24, 48, 80)]
    mbs = [a.max_micro_batch_size for a in limits]
    seq = [a.max_sequence_length for a in limits]
    assert mbs == sorted(mbs) and seq == sorted(seq) and mbs[-1] > mbs[0]


def test_every_suggestion_makes_the_run_fit():
    cfg = cfg_with(
        "data.max_length=4096",
        "train.micro_batch_size=4",
        "train.gradient_checkpointing=false",
        "optim.optimizer=adamw",
        "lora.rank=64",
    )
    gpu = 80 * GiB
    advice = fit(cfg, gpu, LLAMA3_8B)
    assert not advice.fits
    kinds = {o.split("=")[0] for s in advice.suggestions for o in s.overrides}
    assert {"train.gradient_checkpointing", "train.micro_batch_size", "data.max_length"} <= kinds
    for s in advice.suggestions:
        fixed = estimate(apply_overrides(cfg, s.overrides), LLAMA3_8B, gpu_bytes=gpu)
        assert fixed.fits and fixed.total == s.total, s
    assert fit(apply_overrides(cfg, advice.suggestions[0].overrides), gpu, LLAMA3_8B).suggestions == []


def test_fit_serializes():
    advice = fit(cfg_with(), 8 * GiB, LLAMA3_8B)
    d = json.loads(json.dumps(advice.to_dict()))
    assert isinstance(advice, FitAdvice) and d["estimate"]["total"] == advice.estimate.total


# -- the CLI and the run ---------------------------------------------------------------------------


def test_cli_estimate(tiny_model_dir, tmp_path, capsys):
    path = tmp_path / "run.yaml"
    cfg_with(f"model.ref={tiny_model_dir}").save(path)
    assert cli_main(["estimate", str(path), "--gpu", "1GiB", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["estimate"]["fits"] is True and out["fit"]["max_micro_batch_size"] >= 1
    assert cli_main(["estimate", str(path), "lora.rank=4", "--gpu", "1GiB"]) == 0
    text = capsys.readouterr().out
    assert "quantized_weights" in text and "fits on" in text
    assert cli_main(["estimate", str(path), "--gpu", "lots"]) == 2
    assert "GPU size" in capsys.readouterr().err


def test_run_started_carries_the_estimate(tiny_cfg):
    sink = ListSink()
    run(tiny_cfg("train.max_steps=1"), sink)
    started = sink.of(RunStarted)[0]
    est = VramEstimate.from_dict(started.vram_estimate)
    assert est.total > 0 and est.details["lora_parameters"] == started.model["trainable_parameters"]


def test_public_names():
    assert callable(budget.estimate) and callable(budget.fit)
