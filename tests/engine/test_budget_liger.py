"""The budget with Liger Kernel: which kernels a run gets, and the formulas against the H200.

Liger's kernels need triton and a GPU, so they cannot run here. What is tested instead:

* The kernel choice: ``budget.kernels.resolve_kernels`` (through the estimate) against the
  engine's own ``models.apply_fused_kernels``, run with a stand-in ``liger_kernel`` module, for
  every ``train.kernels`` value, CUDA or CPU, supported architecture or not, liger installed or
  not. They differ in one place, on purpose: 'liger' without the package installed here is
  assumed (the run may be on another machine; the engine refuses to start without it).
* The fused loss's chunk size against the worked example in liger-kernel 0.8.5's own source
  comment. (The wheel is not in CI, so the budget's copy of liger's tables in ``kernels`` is
  not re-read from it here; the GPU runs, which install it, check the choice end to end:
  ``kernels_as_assumed`` in bench/budget_accuracy.py's records.)
* The formulas against the engine's measurements on an H200 (bench/results, bench/NOTES.md):
  Llama-3-8B shape, LoRA r=16 on all linear layers, checkpointing, paged AdamW 8-bit,
  expandable segments; with Liger at 2048x4, 8192x1, 32768x1 and 131072x1 tokens and without
  at 2048x4 and 8192x1. The formulas were not fitted to these points. The cuBLAS workspaces
  (the intercept of allocated, 64 MiB) were measured from them, and the expandable-segments
  slack was fitted on them together with the 14 cases of
  bench/results/2026-11-27-NVIDIA-H200-budget.json (tests/engine/test_budget_recorded.py), as
  CALIBRATION says.
* The formulas against the engine's runs with ``train.fast_lora`` (measured after its formulas
  were written, and not fitted to): 2048x4 with checkpointing, 131072x1 and 350000x1 with
  offloaded activations and 4,096-token MLP chunks (bench/results/...-speed-llama3-8b-1406,
  -1412 and -350k.json, read here to check the numbers).
* The two independent writings of what a block keeps (``formulas.block_saved``'s closed form
  and ``timeline``'s replay) agree, with and without Liger, peft's LoRA forward and
  ``train.fast_lora``'s, across families and options.
"""

from __future__ import annotations

import itertools
import json
import statistics
import sys
import types
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from tiny import LLAMA3_8B

from qlora_engine import models
from qlora_engine.budget import estimate, fit, model_spec
from qlora_engine.budget import formulas as fm
from qlora_engine.budget import kernels as kn
from qlora_engine.budget.allocator import CALIBRATION
from qlora_engine.budget.cli import render
from qlora_engine.budget.estimate import estimate_from_spec
from qlora_engine.budget.timeline import block_trace
from qlora_engine.config import TrainConfig, apply_overrides
from qlora_engine.errors import ConfigError

GiB = 1 << 30
ROOT = Path(__file__).resolve().parents[2]

def cfg_with(*overrides: str) -> TrainConfig:
    return apply_overrides(TrainConfig(), list(overrides))


@pytest.fixture(autouse=True)
def engine_allocator(monkeypatch):
    monkeypatch.delenv("PYTORCH_CUDA_ALLOC_CONF", raising=False)  # the engine's default: expandable


# -- which kernels -----------------------------------------------------------------------------


@pytest.fixture
def stand_in_liger(monkeypatch):
    """Install (or hide) a ``liger_kernel`` whose table is the budget's copy and whose patch
    function records the model it was given; returns a function to pick installed or not."""
    applied: list = []

    def install(installed: bool) -> list:
        names = ["liger_kernel", "liger_kernel.transformers", "liger_kernel.transformers.monkey_patch"]
        if not installed:
            for name in names:
                monkeypatch.setitem(sys.modules, name, None)  # import raises ImportError
            return applied
        mods = {name: types.ModuleType(name) for name in names}
        mp = mods[names[2]]
        mp.MODEL_TYPE_TO_APPLY_LIGER_FN = dict.fromkeys(kn.LIGER_MODEL_TYPES)
        mp._apply_liger_kernel_to_instance = lambda model: applied.append(model)
        for name, mod in mods.items():
            monkeypatch.setitem(sys.modules, name, mod)
        return applied

    return install


MODEL_TYPES = {"llama": LLAMA3_8B, "granite": {**LLAMA3_8B, "model_type": "granite"}}
MODEL_TYPES["mystery"] = {**LLAMA3_8B, "model_type": "mystery-net"}


@pytest.mark.parametrize("choice, device, model_type, installed", list(itertools.product(
    ["auto", "liger", "none"], ["cuda", "cpu"], list(MODEL_TYPES), [True, False],
)))  # fmt: skip
def test_the_budget_assumes_the_kernels_the_engine_applies(stand_in_liger, choice, device, model_type, installed):
    applied = stand_in_liger(installed)
    config = MODEL_TYPES[model_type]
    base = SimpleNamespace(config=SimpleNamespace(model_type=config["model_type"]))
    try:
        engine: str | type = models.apply_fused_kernels(base, choice, torch.device(device))
    except ConfigError:
        engine = ConfigError
    assert (engine == "liger") == bool(applied)

    cfg = cfg_with(f"train.kernels={choice}", f"train.device={device}", "data.max_length=512")
    try:
        est = estimate_from_spec(cfg, model_spec(config), liger_installed=installed)
        budget: str | type = est.details["kernels"]
    except ConfigError:
        budget = ConfigError
    if choice == "liger" and not installed and engine is ConfigError and budget == "liger":
        # The one difference: planning on a machine without liger for a run that will have it.
        assert "not installed here" in est.details["kernels_reason"]
        return
    assert budget == engine
    if budget is not ConfigError:
        note = next(n for n in est.notes if n.startswith("kernels: "))
        assert note == f"kernels: {budget} ({est.details['kernels_reason']})"
        assert est.details["kernels_requested"] == choice


def test_auto_looks_for_liger_on_this_machine(monkeypatch):
    for found in (True, False):
        monkeypatch.setattr(kn.importlib.util, "find_spec", lambda name, found=found: object() if found else None)
        est = estimate(cfg_with("data.max_length=512"), LLAMA3_8B)
        assert est.details["kernels"] == ("liger" if found else "none")
        assert ("not installed" in est.details["kernels_reason"]) is not found


def test_the_kernel_choice_is_shown():
    est = estimate_from_spec(cfg_with("data.max_length=2048"), model_spec(LLAMA3_8B), liger_installed=True)
    text = render(est)
    assert "kernels: liger ('auto' on CUDA with liger-kernel installed: Liger Kernel for llama)" in text
    assert not est.approximate  # the choice is a note, not a reason to widen the range


def test_the_fused_loss_chunk_is_liger_s():
    # liger's own comment: BT = 4096*4, V = 32000, H = 4096 ==> inc_factor = 8, chunk_size = 2048
    assert fm.flce_chunk_rows(4096 * 4, 4096, 32000) == 2048
    assert fm.flce_chunk_rows(8192, 4096, 128256) == 256  # cdiv(128256, 4096) = 32 -> 8192 / 32
    assert fm.flce_chunk_rows(100, 4096, 128256) == 4  # next power of two of cdiv(100, 32)
    assert fm.flce_chunk_rows(3, 4096, 4096) == 3  # never more rows than tokens


# -- the formulas against the H200 --------------------------------------------------------------

@pytest.fixture(autouse=True)
def _tensor_by_tensor_lora(request, monkeypatch):
    """The records in this file (bar the flat-buffer one) predate optim.FLAT: estimate them as the engine then ran."""
    if "flat_buffer" not in request.node.name:
        monkeypatch.setattr(fm, "FLAT_LORA", False)


# (train.kernels, seq, micro-batch, peak allocated GiB, peak reserved GiB): the engine on an
# NVIDIA H200 (torch 2.11, transformers 5.17, peft 0.21, bitsandbytes 0.50.2, liger-kernel
# 0.8.5; bench/results/2026-11-27-NVIDIA-H200-speed-llama3-8b-0948.json and -long-context.jsonl).
H200 = [
    ("liger", 2048, 4, 10.10, 10.71),
    ("liger", 8192, 1, 10.11, 10.73),
    ("liger", 32768, 1, 23.73, 27.08),
    ("liger", 131072, 1, 78.20, 89.91),
    ("none", 2048, 4, 19.44, 22.28),
    ("none", 8192, 1, 19.44, 22.18),
]


def _h200_estimate(kernels: str, seq: int, mbs: int, fast_lora: bool = False, extra: tuple[str, ...] = ()):
    # fast_lora False for H200's runs (above): they predate train.fast_lora and took peft's LoRA forward.
    cfg = cfg_with(
        f"data.max_length={seq}", f"train.micro_batch_size={mbs}", "train.gradient_accumulation_steps=1",
        "train.gradient_checkpointing=true", "lora.rank=16", "lora.alpha=16", "lora.target_modules=[all-linear]",
        "optim.optimizer=paged_adamw_8bit", f"train.kernels={kernels}", f"train.fast_lora={str(fast_lora).lower()}",
        *extra,
    )  # fmt: skip
    return estimate_from_spec(cfg, model_spec(LLAMA3_8B), data_stats={"min": seq, "max": seq}, liger_installed=True)


@pytest.mark.parametrize("kernels, seq, mbs, allocated, reserved", H200)
def test_the_formulas_reproduce_the_h200_runs(kernels, seq, mbs, allocated, reserved):
    est = _h200_estimate(kernels, seq, mbs)
    d = est.details
    assert d["kernels"] == kernels and d["allocator"] == "expandable_segments" and d["allocator_calibrated"]
    assert not d["fast_lora"]
    # Liger: the top block's recomputation (LoRA's fp32 temporaries of up_proj) under the 32
    # kept block inputs; plain: the loss's fp32 buffers.
    assert d["peak_phase"] == ("block_backward" if kernels == "liger" else "loss_backward")
    # The reported values have two decimals: 0.005 GiB of rounding on top of 0.3%.
    assert d["torch_allocated"] / GiB == pytest.approx(allocated, rel=0.003, abs=0.006)
    err = 100 * (d["torch_reserved"] / GiB - reserved) / reserved
    assert -2.5 <= err <= 2.5  # the issue's goal is +-7%, never more than 5% under


def test_the_h200_runs_meet_the_issue_s_goals():
    errs = []
    for kernels, seq, mbs, _, reserved in H200:
        errs.append(100 * (_h200_estimate(kernels, seq, mbs).details["torch_reserved"] / GiB - reserved) / reserved)
    assert max(abs(e) for e in errs) <= 7 and statistics.median(abs(e) for e in errs) <= 3 and min(errs) >= -5


LONG = ("train.offload_activations=true", "train.mlp_chunk_tokens=4096")

# train.fast_lora on the H200 (bench/speed.py: the engine with Liger, paged AdamW 8-bit, r=16 on
# all linear layers, expandable segments, the Llama-3-8B shape; the long runs under a 78 GiB cap,
# far above their peaks): (record, seq, micro-batch, overrides, peak allocated GiB, peak
# reserved GiB, the estimate's reserved error in %). Peaks are the max over steps of torch's
# per-step max_memory_allocated/reserved: the whole step's. Estimated (total, low-high, GiB):
# 10.40 (9.64-10.69), 20.55 (18.13-21.27), 44.01 (37.75-45.75).
FAST_LORA_H200 = [
    ("2026-11-27-NVIDIA-H200-speed-llama3-8b-1406.json", 2048, 4, (), 9.08, 9.45, +3.0),
    ("2026-11-27-NVIDIA-H200-speed-llama3-8b-1412.json", 131072, 1, LONG, 17.79, 20.16, -1.4),
    ("2026-11-27-NVIDIA-H200-speed-llama3-8b-350k.json", 350000, 1, LONG, 38.02, 42.51, +2.0),
]


def _recorded(record: str, seq: int, mbs: int, extra: tuple[str, ...]) -> dict:
    data = json.loads((ROOT / "bench" / "results" / record).read_text())
    assert (data["card"], data["shape"], data["versions"]["liger-kernel"]) == ("NVIDIA H200", "llama3-8b", "0.8.5")
    [r] = [r for r in data["results"]
           if r["stack"] == "engine" and (r["seq"], r["mbs"], tuple(r["extra"])) == (seq, mbs, extra)]  # fmt: skip
    return r


@pytest.mark.parametrize("record, seq, mbs, extra, allocated, reserved, _", FAST_LORA_H200)
def test_the_fast_lora_points_are_the_records(record, seq, mbs, extra, allocated, reserved, _):
    r = _recorded(record, seq, mbs, extra)
    assert r["kernels"] == "liger" and r["fast_lora_layers"] == 7 * 32  # every adapted layer on the fast path
    assert (r["peak_alloc_gib"], r["peak_reserved_gib"]) == (allocated, reserved)
    # The estimate the run recorded is today's, except at 2048 x 4, run before the budget modelled
    # train.fast_lora: its 11.59 GiB counted peft's path (today's estimate with fast_lora=false).
    modelled = not record.endswith("-1406.json")
    assert r["estimate"]["total_gib"] == round(_h200_estimate("liger", seq, mbs, modelled, extra).total / GiB, 2)


def test_the_same_run_without_fast_lora_is_the_h200_s_earlier_run():
    # The 2048 x 4 run with train.fast_lora=false, beside the fast one: peft's LoRA forward on
    # every layer, and the same peaks as H200's first row (the -0948.json run), which
    # test_the_formulas_reproduce_the_h200_runs bounds (estimate 10.11 allocated, +0.1%; 10.93
    # reserved, +2.0%).
    r = _recorded("2026-11-27-NVIDIA-H200-speed-llama3-8b-1406.json", 2048, 4, ("train.fast_lora=false",))
    assert r["kernels"] == "liger" and r["fast_lora_layers"] == 0
    assert (r["peak_alloc_gib"], r["peak_reserved_gib"]) == H200[0][3:] == (10.10, 10.71)


@pytest.mark.parametrize("record, seq, mbs, extra, allocated, reserved, reserved_err", FAST_LORA_H200)
def test_fast_lora_reproduces_the_h200_runs(record, seq, mbs, extra, allocated, reserved, reserved_err):
    # The formulas: peak allocated to 0.3% (measured 9.08, 17.79, 38.02 GiB; estimated 9.08,
    # 17.83, 38.06), as on peft's runs above. The allocator's slack is fitted on peft's runs and
    # not refitted to these three points: reserved +3.0%, -1.4%, +2.0% (estimated 9.73, 19.88,
    # 43.34 GiB). At 131k tokens it is short by 0.28 GiB: the fitted 16% of the dynamic part
    # gives 2.05 GiB of slack where the run had 2.37; at 350k it gives 5.29 where the run had
    # 4.49. Safe side within a small margin: never more than 2.5% under (the issue allows 5%),
    # at most 5% over.
    est = _h200_estimate("liger", seq, mbs, True, extra)
    d = est.details
    assert d["fast_lora"] and d["kernels"] == "liger" and d["allocator"] == "expandable_segments"
    assert (d["host_activation_bytes"] > 0) == bool(extra)  # the long runs' block inputs in CPU RAM
    # 2048 x 4: down_proj's two input gradients over the recomputed top block; 131k and 350k:
    # the attention's backward in the top block.
    assert d["peak_phase"] == "block_backward"
    assert d["torch_allocated"] / GiB == pytest.approx(allocated, rel=0.003, abs=0.006)
    err = 100 * (d["torch_reserved"] / GiB - reserved) / reserved
    assert err == pytest.approx(reserved_err, abs=0.05)
    assert -2.5 <= err <= 5
    # The measured peak with what the estimate puts outside torch (CUDA context, paged
    # optimizer state) falls in the estimate's range.
    outside = est.components["cuda_context"] + d["paged_optimizer_bytes"]
    assert est.low <= reserved * GiB + outside <= est.high


@pytest.mark.parametrize("seq", [131072, 350000])
def test_the_mlp_chunks_concatenated_gradient_is_not_the_peak(seq):
    # Not replayed (timeline's docstring): the chunked MLP's input gradients, one per chunk,
    # wait for split's backward, which concatenates them; for a moment after the last chunk the
    # pieces and the whole gradient (2 x tokens x hidden in bf16) are alive where the replay
    # counts one. Alive then at most: the incoming gradient, what the recomputed block keeps,
    # the pieces and their concatenation, 3 x tokens x hidden in all beside the saved tensors;
    # the block's backward peak (the attention's, after the MLP) is above that by gigabytes
    # (2.5 GiB at 131k tokens, 6.7 at 350k), so the estimate misses nothing here. The measured
    # allocated peaks (above, within 0.3%) agree.
    spec = model_spec(LLAMA3_8B)
    s = fm.StepShape(batch=1, seq=seq, elem=2, checkpointing=True, mask=False, packed=False, attn="sdpa", rank=16,
                     dropout=False, dora=False, kernels="liger", loss="fused_linear_cross_entropy", fast_lora=True,
                     offload=True, mlp_chunk=4096)  # fmt: skip
    top = block_trace(spec, s, list(spec.block_linears), True)
    concatenation = top.saved + 3 * 2 * seq * spec.hidden_size
    assert top.backward_peak - concatenation > 2 * GiB


def test_the_liger_peak_grows_like_the_h200_s():
    # Per token at long context: 32 kept block inputs (2 x 4096 bytes each) and the top block's
    # recomputation peak, against the H200's slope between 32k and 131k tokens (594,960 bytes).
    a, b = _h200_estimate("liger", 32768, 1), _h200_estimate("liger", 131072, 1)
    slope = (b.details["torch_allocated"] - a.details["torch_allocated"]) / (131072 - 32768)
    assert slope == pytest.approx((78.20 - 23.73) * GiB / (131072 - 32768), rel=0.001)
    spec = model_spec(LLAMA3_8B)
    tops = [
        block_trace(spec, fm.StepShape(batch=1, seq=n, elem=2, checkpointing=True, mask=False, packed=False,
                                       attn="sdpa", rank=16, dropout=False, dora=False, kernels="liger",
                                       loss="fused_linear_cross_entropy"), list(spec.block_linears), True)
        for n in (32768, 65536)
    ]  # fmt: skip
    per_token = (tops[1].backward_peak - tops[0].backward_peak) // 32768
    assert per_token == 332_296 and tops[0].saved == 242_248 * 32768
    # kept inputs + the top block's peak + the batch (32) + RoPE's cos/sin (512) per token
    assert 32 * 2 * 4096 + per_token + 32 + 512 == pytest.approx(slope, rel=0.0001)


def test_fast_lora_keeps_only_compute_dtype_inputs_and_x_at_a():
    # train.fast_lora: per token, the top block keeps each LoRA
    # input once in bf16 (norm outputs, the SwiGLU output; SDPA keeps o_proj's input anyway)
    # and x @ A (2 x 16 bytes a layer), not peft's fp32 copies (242,248 bytes above), plus the
    # rank-wide bf16 halves of A and B, two of each (5 MiB a block, whatever the length).
    spec = model_spec(LLAMA3_8B)
    shape = dict(batch=1, elem=2, checkpointing=True, mask=False, packed=False, attn="sdpa", rank=16, dropout=False,
                 dora=False, kernels="liger", loss="fused_linear_cross_entropy", fast_lora=True)  # fmt: skip
    tops = [block_trace(spec, fm.StepShape(seq=n, **shape), list(spec.block_linears), True) for n in (32768, 65536)]
    inputs = 2 * (4096 + 4096 + 14336)  # q/k/v's, gate/up's and down_proj's
    liger = 4 + 2 * 4096 + 4 + 2 * 2 * 14336  # the norms' rstd and second input, SwiGLU's two inputs
    attention = 2 * 4096 + 2 * 2 * 1024 + 2 * 4096 + 4 * 32  # q, k, v, output, log-sum-exp
    per_token = inputs + liger + attention + 7 * 2 * 16
    assert per_token == 131_432 and tops[0].saved == per_token * 32768 + 2 * 2 * 16 * sum(
        lin.in_features + lin.out_features for lin in spec.block_linears
    )
    # The top block's backward peak: down_proj's two input gradients over the recomputed block
    # (the recomputation stops before down_proj's 4-bit matmul), not up_proj's fp32 temporaries;
    # with the LoRA backward's rank-wide temporaries alive (g @ b, its sum, the doubled copy: 160).
    assert (tops[1].backward_peak - tops[0].backward_peak) // 32768 == 196_968 + 160  # peft's: 332,296
    fast, peft = _h200_estimate("liger", 2048, 4, fast_lora=True), _h200_estimate("liger", 2048, 4)
    assert fast.details["fast_lora"] and fast.details["peak_phase"] == "block_backward"
    assert fast.components["activations"] < 0.8 * peft.components["activations"]  # 3.6 GiB, 4.6 with peft's
    assert peft.total - fast.total > GiB
    assert any("train.fast_lora" in n and "three GPU runs" in n for n in fast.notes)


def test_the_calibration_says_what_was_fitted():
    exp = CALIBRATION["allocator"]["expandable_segments"]
    assert exp["measured"] and exp["fixed"] == 80 << 20 and exp["logits_fragmentation"] == 0
    assert (exp["fragmentation"], exp["fragmentation_without_checkpointing"]) == (0.16, 0.06)
    assert "H200" in exp["source"] and "2026-11-27-NVIDIA-H200-budget.json" in exp["source"]
    assert CALIBRATION["cublas_workspace"] == 64 << 20


# -- Liger's estimate as a whole -----------------------------------------------------------------


def test_liger_takes_the_logits_out_of_the_peak():
    plain = _h200_estimate("none", 2048, 4)
    liger = _h200_estimate("liger", 2048, 4)
    assert plain.components["logits_loss"] == 12 * 2048 * 4 * LLAMA3_8B["vocab_size"]
    assert liger.components["logits_loss"] == 0 and liger.details["loss"] == "fused_linear_cross_entropy"
    assert liger.details["phases"]["loss_forward"] < liger.details["phases"]["block_backward"]
    assert liger.total < 0.6 * plain.total
    assert not any("dominate" in n for n in liger.notes) and any("Liger" in n for n in plain.notes if "dominate" in n)


@pytest.mark.parametrize(
    "field, values",
    [("train.micro_batch_size", [1, 2, 4, 8]), ("data.max_length", [256, 1024, 4096]), ("lora.rank", [4, 16, 64, 256])],
)
@pytest.mark.parametrize("ckpt", [True, False])
def test_more_of_anything_costs_more_with_liger(field, values, ckpt):
    spec = model_spec(LLAMA3_8B)
    totals = [
        estimate_from_spec(cfg_with(f"{field}={v}", f"train.gradient_checkpointing={ckpt}", "train.kernels=liger"),
                           spec, liger_installed=True).total
        for v in values
    ]  # fmt: skip
    assert totals == sorted(totals) and len(set(totals)) == len(totals)


def test_fit_with_liger_reaches_long_contexts(monkeypatch):
    monkeypatch.setattr(kn, "liger_installed", lambda: True)

    def longest(fast_lora: str) -> int:
        cfg = cfg_with("train.micro_batch_size=1", "train.gradient_accumulation_steps=1",
                       "optim.optimizer=paged_adamw_8bit", f"train.fast_lora={fast_lora}")  # fmt: skip
        advice = fit(cfg, 80 * GiB, {**LLAMA3_8B, "max_position_embeddings": 1 << 20})
        assert advice.estimate.details["kernels"] == "liger"
        return advice.max_sequence_length

    # The H200 trained 131,072 tokens in 89.9 GiB reserved (peft's LoRA path): an 80 GiB card
    # holds somewhat less; train.fast_lora drops peft's fp32 copies, so more (not yet measured).
    peft = longest("false")
    assert 100_000 < peft < 131_072
    assert longest("true") > 1.1 * peft


# -- two writings of what a block keeps ------------------------------------------------------------

_SMALL = {"architectures": ["X"], "vocab_size": 1000, "hidden_size": 256, "intermediate_size": 704,
          "num_hidden_layers": 4, "num_attention_heads": 8, "num_key_value_heads": 2, "head_dim": 32}  # fmt: skip


@pytest.mark.parametrize("family", ["llama", "qwen2", "qwen3", "gemma2", "gemma3_text", "phi3"])
def test_the_closed_form_and_the_replay_keep_the_same_bytes(family):
    spec = model_spec({**_SMALL, "model_type": family})
    names = spec.linear_names()
    targets = [names, [n for n in names if n[0] in "qkvo"], [names[-1]], [names[1]], ["o_proj"]]
    for kernels, ckpt, mask, lora, chosen, grad, attn, elem in itertools.product(
        ["none", "liger"], [True, False], [False, True], ["peft", "peft+dropout", "fast"], targets, [True, False],
        ["sdpa", "eager"], [2, 4],
    ):  # fmt: skip
        s = fm.StepShape(
            batch=2, seq=64, elem=elem, checkpointing=ckpt, mask=mask, packed=False, attn=attn, rank=8,
            dropout=lora == "peft+dropout", dora=False, kernels=kernels, fast_lora=lora == "fast",
            loss="fused_linear_cross_entropy" if kernels == "liger" else "plain",
            norm_in_place=family not in ("gemma2", "gemma3_text"),
        )  # fmt: skip
        adapted = [lin for lin in spec.block_linears if lin.name in chosen]
        trace = block_trace(spec, s, adapted, grad)
        case = (kernels, ckpt, mask, lora, chosen, grad, attn, elem)
        assert trace.saved == fm.block_saved(spec, s, adapted, grad), case
        assert trace.backward_peak >= trace.saved and (ckpt or trace.forward_peak >= trace.saved)


@pytest.mark.parametrize(("seq", "mbs", "allocated", "reserved"), [(2048, 4, 9.20, 9.56), (2048, 1, 6.57, 6.80)])
def test_the_flat_buffer_engine_on_the_h100_is_predicted(seq, mbs, allocated, reserved):
    # optim.FLAT (one LoRA buffer, gradients alive through the run), fast_lora, Liger, every layer
    # checkpointed, on an NVIDIA H100 80GB HBM3 (torch 2.11, transformers 5.17, bnb 0.50.2;
    # bench/results/2026-12-06-NVIDIA-H100-80GB-HBM3-speed-llama3-8b-0428.json).
    assert fm.FLAT_LORA
    d = _h200_estimate("liger", seq, mbs, fast_lora=True).details
    assert d["torch_allocated"] / GiB == pytest.approx(allocated, rel=0.003, abs=0.006)
    err = 100 * (d["torch_reserved"] / GiB - reserved) / reserved
    assert -2.5 <= err <= 3.5  # measured +3.3% and +0.4%; the issue's goal is +-7%
