"""train.fast_lora: LoRA in the compute dtype beside the 4-bit matmul (qlora_engine.fast_lora).

A real 4-layer NF4 Llama on the CPU. In float32 the fast path is the same arithmetic as
peft's, so loss and LoRA gradients must match exactly; in bfloat16 it must be no further
from a float32 reference than peft's own bfloat16 path. Under checkpointing the
recomputation must stop before the last 4-bit matmul of each block (the work it skips).
"""

from __future__ import annotations

import re

import pytest
import torch
from tiny import build_tiny_llama
from train_support import make_trainer as make_trainer_on
from train_support import rel_err

from qlora_engine import fast_lora
from qlora_engine.data import collate
from qlora_engine.events import ListSink, LogLine
from qlora_engine.train import Trainer

SEQ = 128


@pytest.fixture(scope="module")
def four_layers(tmp_path_factory):
    return build_tiny_llama(tmp_path_factory.mktemp("tiny-llama-4"), layers=4)


@pytest.fixture(scope="module")
def samples():
    ids = torch.randint(0, 200, (2, SEQ), generator=torch.Generator().manual_seed(0))
    return [{"input_ids": row.tolist(), "labels": row.tolist()} for row in ids]


def make_trainer(model_dir, samples, tmp_path, *overrides: str) -> tuple[Trainer, ListSink]:
    return make_trainer_on(model_dir, samples, tmp_path, *overrides, max_length=SEQ)


def step(trainer: Trainer, samples) -> tuple[float, dict[str, torch.Tensor], dict[str, int]]:
    """One forward and backward; returns the loss, the LoRA gradients and the 4-bit matmul calls per layer:
    on peft's path its base layer's forwards; on the fast path the frozen weight's dequantizations
    before the backward and during it (``"<layer>"`` and ``"<layer>:backward"``), one for each 4-bit
    matmul, be it in the base layer's own forward or inside the LoRA function."""
    calls: dict[str, int] = {}
    hooks = [
        module.register_forward_hook(lambda *_, n=name: calls.__setitem__(n, calls.get(n, 0) + 1))
        for name, module in trainer.model.named_modules()
        if name.endswith("base_layer") and not trainer.fast_lora
    ]
    names = {id(m.weight): name for name, m in trainer.model.named_modules() if name.endswith("base_layer")}
    phase = [""]
    real = fast_lora.dequantize

    def counted(weight, *args, **kwargs):
        key = names[id(weight)] + phase[0]
        calls[key] = calls.get(key, 0) + 1
        return real(weight, *args, **kwargs)

    fast_lora.dequantize = counted
    try:
        batch = collate(samples, trainer.tokenizer.pad_token_id)
        loss = trainer.model(**batch, use_cache=False).loss
        phase[0] = ":backward"
        loss.backward()
    finally:
        fast_lora.dequantize = real
    for h in hooks:
        h.remove()
    grads = {n: p.grad.float().clone() for n, p in trainer.model.named_parameters() if p.requires_grad}
    return float(loss), grads, calls


@pytest.mark.parametrize(
    "overrides",
    [[], ["train.gradient_checkpointing=false"], ["train.gradient_checkpointing=true", "train.checkpoint_layers=2"], ["train.mlp_chunk_tokens=64"]],
    ids=["checkpointed", "no-checkpointing", "half-checkpointed", "mlp-chunks"],
)
def test_float32_is_the_same_arithmetic_as_peft(four_layers, samples, tmp_path, overrides):
    fast, _ = make_trainer(four_layers, samples, tmp_path, "quant.compute_dtype=float32", *overrides)
    assert fast.fast_lora == 4 * 7
    loss_fast, grads_fast, _ = step(fast, samples)
    plain, _ = make_trainer(four_layers, samples, tmp_path, "quant.compute_dtype=float32", "train.fast_lora=false", *overrides)
    assert plain.fast_lora == 0
    loss_plain, grads_plain, _ = step(plain, samples)
    assert loss_fast == pytest.approx(loss_plain, rel=1e-6)
    assert rel_err(grads_fast, grads_plain) < 1e-5


def test_bfloat16_is_as_near_float32_as_peft_s_own_path(four_layers, samples, tmp_path):
    _, reference, _ = step(make_trainer(four_layers, samples, tmp_path, "quant.compute_dtype=float32")[0], samples)
    loss_fast, fast, _ = step(make_trainer(four_layers, samples, tmp_path, "quant.compute_dtype=bfloat16")[0], samples)
    trainer, _ = make_trainer(four_layers, samples, tmp_path, "quant.compute_dtype=bfloat16", "train.fast_lora=false")
    loss_plain, plain, _ = step(trainer, samples)
    # bf16 activations are what separates either path from float32 (about 15% on this random
    # model); LoRA in bf16 must not add to it measurably.
    assert rel_err(fast, reference) <= 1.1 * rel_err(plain, reference)
    assert rel_err(fast, plain) < 0.05
    assert loss_fast == pytest.approx(loss_plain, rel=1e-3)
    assert all(g.dtype == torch.float32 for g in fast.values())  # fp32 master weights, fp32 gradients


@pytest.mark.parametrize("merged", [True, False])  # fast_lora.MERGE_4BIT: the frozen matmul inside the LoRA function
def test_the_recomputation_stops_before_each_block_s_last_4bit_matmul(four_layers, samples, tmp_path, monkeypatch, merged):
    monkeypatch.setattr(fast_lora, "MERGE_4BIT", merged)

    def matmuls(*overrides: str) -> dict[str, int]:
        trainer, _ = make_trainer(four_layers, samples, tmp_path, *overrides)
        calls = step(trainer, samples)[2]
        return {name.split(".layers.")[1].replace(".base_layer", ""): n for name, n in calls.items() if ".layers." in name}

    fast = matmuls()
    for block in range(4):
        for proj in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                     "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"):  # fmt: skip
            assert fast[f"{block}.{proj}"] == 1  # one 4-bit matmul in the forward
            recomputed = proj != "mlp.down_proj"  # the backward recomputes all but each block's last
            input_grad = block > 0 or proj not in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")
            assert fast[f"{block}.{proj}:backward"] == recomputed + input_grad  # (the embeddings need none)
    assert len(fast) == 4 * 7 * 2
    plain = matmuls("train.fast_lora=false")
    assert len(plain) == 4 * 7 and set(plain.values()) == {2}
    unchecked = matmuls("train.gradient_checkpointing=false")
    assert len(unchecked) == 4 * 7 * 2 - 3 and set(unchecked.values()) == {1}  # nothing recomputed


@pytest.mark.parametrize("merged", [True, False])
def test_float32_merged_or_not_the_frozen_matmul_is_the_same_arithmetic(four_layers, samples, tmp_path, monkeypatch, merged):
    monkeypatch.setattr(fast_lora, "MERGE_4BIT", merged)
    fast, _ = make_trainer(four_layers, samples, tmp_path, "quant.compute_dtype=float32")
    own_forwards: list[str] = []  # the base layers whose own forward ran (merged: only each block's last)
    hooks = [
        m.register_forward_hook(lambda *_, n=name: own_forwards.append(n.split(".")[-2]))
        for name, m in fast.model.named_modules()
        if name.endswith("base_layer")
    ]
    loss_fast, grads_fast, _ = step(fast, samples)
    for h in hooks:
        h.remove()
    assert set(own_forwards) == ({"down_proj"} if merged else {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"})
    plain, _ = make_trainer(four_layers, samples, tmp_path, "quant.compute_dtype=float32", "train.fast_lora=false")
    loss_plain, grads_plain, _ = step(plain, samples)
    assert loss_fast == pytest.approx(loss_plain, rel=1e-6)
    assert rel_err(grads_fast, grads_plain) < 1e-5


def test_evaluation_and_disabled_adapters_take_peft_s_path(four_layers, samples, tmp_path):
    fast, _ = make_trainer(four_layers, samples, tmp_path, "quant.compute_dtype=bfloat16")
    plain, _ = make_trainer(four_layers, samples, tmp_path, "quant.compute_dtype=bfloat16", "train.fast_lora=false")
    batch = collate(samples, fast.tokenizer.pad_token_id)
    with torch.no_grad():
        assert float(fast.model(**batch).loss) == float(plain.model(**batch).loss)
    with fast.model.disable_adapter(), plain.model.disable_adapter():
        assert float(fast.model(**batch).loss) == float(plain.model(**batch).loss)


@pytest.mark.parametrize(
    ("overrides", "reason"),
    [(["lora.dropout=0.1"], "LoRA dropout"), (["lora.use_dora=true"], "DoRA"), (["quant.compute_dtype=float16"], "float16")],
)
def test_layers_it_does_not_cover_keep_peft_s_path_and_say_so(four_layers, samples, tmp_path, overrides, reason):
    trainer, sink = make_trainer(four_layers, samples, tmp_path, *overrides)
    assert trainer.fast_lora == 0
    notes = [e.message for e in sink.of(LogLine) if "train.fast_lora" in e.message]
    assert len(notes) == 1 and "28" in notes[0] and reason in notes[0]
    loss, grads, _ = step(trainer, samples)
    assert torch.isfinite(torch.tensor(loss)) and all(torch.isfinite(g).all() for g in grads.values())


def test_split_weights_keep_what_rounding_them_to_bfloat16_would_lose():
    # Two rows of B that bf16 rounds to the same 1.0, and an incoming gradient that takes their
    # difference: rounded weights make g @ B zero, and with it A's gradient.
    from qlora_engine.fast_lora import _LoraProduct

    gen = torch.Generator().manual_seed(0)
    x = torch.randn(64, 32, generator=gen).bfloat16().requires_grad_()
    A = torch.randn(1, 32, generator=gen).requires_grad_()
    B = torch.tensor([[1.003], [1.001]], requires_grad=True)
    g = torch.tensor([1.0, -1.0]).expand(64, 2).bfloat16()
    assert float((g.float() @ B.detach().bfloat16().float()).abs().max()) == 0.0  # what plain bf16 would see
    y = _LoraProduct.apply(x, A, B, 2.0, None)
    y.backward(g)
    xd, Ad, Bd, gd = x.double(), A.double(), 2.0 * B.double(), g.double()
    want_a = (gd @ Bd).t() @ xd  # d/dA of sum(g * (x @ A.T @ (2B).T))
    assert torch.allclose(A.grad.double(), want_a.detach(), rtol=2e-2, atol=1e-4 * want_a.abs().max().item())
    assert float(A.grad.abs().max()) > 0.05 * float(want_a.abs().max())
    torch.testing.assert_close(y.double(), (xd @ Ad.t() @ Bd.t()).detach(), rtol=1e-2, atol=1e-2)
    torch.testing.assert_close(B.grad.double(), (2.0 * gd.t() @ (xd @ Ad.t())).detach(), rtol=1e-2, atol=1e-2)


def _lora_case(seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 16, 32, generator=gen).bfloat16().requires_grad_()
    A = (0.1 * torch.randn(4, 32, generator=gen)).requires_grad_()
    B = torch.randn(24, 4, generator=gen).requires_grad_()
    base = torch.randn(2, 16, 24, generator=gen).bfloat16().requires_grad_()
    return x, A, B, base, torch.randn(2, 16, 24, generator=gen).bfloat16()


def _lora_step(out_of, monkeypatch, in_place: bool):
    from qlora_engine import fast_lora

    monkeypatch.setattr(fast_lora, "ADD_IN_PLACE", in_place)
    x, A, B, base, g = _lora_case()
    out = out_of(base)
    y = fast_lora._LoraProduct.apply(x, A, B, 2.0, out)
    y.backward(g)
    return y, out, [t.grad for t in (x, A, B, base)]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_the_lora_half_adds_into_a_fresh_base_output_in_place(monkeypatch, seed):
    # The base output (a fresh tensor from the 4-bit matmul) takes the LoRA half in place: no copy
    # of a projection's whole output, the same values and gradients as the out-of-place sum.
    def fresh(base):
        return base * 1.0

    y, out, grads = _lora_step(fresh, monkeypatch, in_place=True)
    assert y.data_ptr() == out.data_ptr()
    y_ref, out_ref, grads_ref = _lora_step(fresh, monkeypatch, in_place=False)
    assert y_ref.data_ptr() != out_ref.data_ptr()
    torch.testing.assert_close(y, y_ref, rtol=0, atol=0)
    for got, want in zip(grads, grads_ref, strict=True):
        torch.testing.assert_close(got, want, rtol=0, atol=0)


@pytest.mark.parametrize(
    "view",
    [
        lambda base: base.detach().clone().view(32, 24).view(2, 16, 24),  # a view of a contiguous tensor
        lambda base: torch.cat([base.detach(), base.detach()], dim=-1)[..., :24],  # a slice of a wider one
        lambda base: base.detach().clone().transpose(0, 1).contiguous().transpose(0, 1),  # not contiguous
        lambda base: base.detach().clone().expand(2, 16, 24),  # an expanded (aliasing) view
    ],
    ids=["view", "slice", "transposed", "expanded"],
)
def test_the_lora_half_never_writes_into_a_view(monkeypatch, view):
    # bitsandbytes may hand back a view of its own packed weight: it must come out untouched.
    kept = {}

    def remember(base):
        out = view(base)
        kept["storage"] = out._base if out._base is not None else out
        kept["before"] = kept["storage"].clone()
        return out

    y, out, _ = _lora_step(remember, monkeypatch, in_place=True)
    assert torch.equal(kept["storage"], kept["before"])
    y_ref, _, _ = _lora_step(lambda base: base.detach() * 1.0, monkeypatch, in_place=False)
    torch.testing.assert_close(y, y_ref, rtol=0, atol=0)


@pytest.mark.parametrize("shape", [(2, 16, 24), (1, 5, 24), (40, 24), (3, 2, 7, 24)])
def test_the_in_place_op_passes_torch_s_checks(shape):
    # qlora::add_lora_ (what a compiled graph runs): its schema, fake kernel and declared mutation.
    from qlora_engine import fast_lora

    gen = torch.Generator().manual_seed(sum(shape))
    out = torch.randn(shape, generator=gen).bfloat16()
    xa, b = torch.randn(*shape[:-1], 8, generator=gen).bfloat16().reshape(-1, 8), torch.randn(24, 8, generator=gen)
    want = out.float() + (xa.float() @ b.bfloat16().float().t()).view(shape)
    fast_lora.add_lora_(out, xa, b.bfloat16())
    torch.testing.assert_close(out.float(), want, rtol=2e-2, atol=2e-2)
    torch.library.opcheck(fast_lora.add_lora_, (out.clone(), xa, b.bfloat16()))


@pytest.mark.parametrize("seed", [0, 1])
def test_compiled_the_lora_half_adds_into_the_base_output_without_a_copy(seed):
    # Under torch.compile an in-place addmm_ is functionalized into an out-of-place addmm (a copy of
    # the projection's whole output first): the op must instead write into the buffer the base
    # matmul produced, and the compiled values and gradients must be eager's.
    from torch._inductor.utils import run_and_get_code

    from qlora_engine import fast_lora

    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(64, 32, generator=gen).requires_grad_()
    W = torch.randn(48, 32, generator=gen)
    A = (0.1 * torch.randn(4, 32, generator=gen)).requires_grad_()
    B = torch.randn(48, 4, generator=gen).requires_grad_()

    def f(x, A, B):
        y = fast_lora._LoraProduct.apply(x, A, B, 2.0, x @ W.t())
        return torch.nn.functional.silu(y)  # a consumer after the add, as a block has

    torch._dynamo.reset()
    try:
        (y, code) = run_and_get_code(torch.compile(f, backend="inductor", fullgraph=True), x, A, B)
    finally:
        torch._dynamo.reset()
    forward = code[0]
    made = re.findall(r"extern_kernels\.mm\(.*out=(buf\d+)\)", forward)  # the matmuls' output buffers
    added = re.findall(r"torch\.ops\.qlora\.add_lora_\.default\((buf\d+)", forward)
    assert len(added) == 1 and added[0] in made, forward
    assert "addmm" not in forward and ".copy_(" not in forward
    y_eager = f(x, A, B)
    torch.testing.assert_close(y, y_eager, rtol=1e-5, atol=1e-5)
    g = torch.randn(y.shape, generator=gen)
    got = torch.autograd.grad(y, (x, A, B), g)
    want = torch.autograd.grad(y_eager, (x, A, B), g)
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize(
    ("overrides", "said"),
    [
        ([], "fast LoRA on 14 layers, 2 of 2 layers checkpointed"),
        (["train.fast_lora=false"], "peft's LoRA path, 2 of 2 layers checkpointed"),
        (["train.gradient_checkpointing=false"], "fast LoRA on 14 layers, no checkpointing"),
        (
            ["train.gradient_checkpointing=false", "train.keep_dequantized=true"],
            "fast LoRA on 14 layers, no checkpointing, 4-bit weights kept dequantized",
        ),
    ],
)
def test_the_terminal_says_which_lora_path_the_run_takes(tiny_cfg, overrides, said):
    import io

    from qlora_engine.events import MultiSink, TextSink
    from qlora_engine.runner import run

    text = io.StringIO()
    run(tiny_cfg("train.max_steps=1", *overrides), MultiSink(ListSink(), TextSink(text)))
    started = [line for line in text.getvalue().splitlines() if "run started" in line]
    assert len(started) == 1 and started[0].endswith(f"(no fused kernels, {said})")


def _tiny_family(path, model_type: str):
    """A tiny random model of another family, with the tiny Llama's tokenizer."""
    from tiny import build_tokenizer
    from transformers import AutoConfig, AutoModelForCausalLM

    tok = build_tokenizer(path)
    extra = {"head_dim": 16} if model_type == "gemma" else {}
    cfg = AutoConfig.for_model(
        model_type, vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512, pad_token_id=tok.pad_token_id,
        eos_token_id=tok.eos_token_id, bos_token_id=None, tie_word_embeddings=False, **extra,
    )  # fmt: skip
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(cfg).save_pretrained(path, safe_serialization=True)
    return path


@pytest.mark.parametrize(
    ("model_type", "layers"),
    [("qwen2", 14), ("gemma", 14), ("phi3", 8)],  # Qwen2: q/k/v with bias; Phi-3: fused qkv_proj and gate_up_proj
)
def test_other_families_take_the_fast_path_with_the_same_arithmetic(tmp_path, samples, model_type, layers):
    model = _tiny_family(tmp_path / model_type, model_type)
    fast, _ = make_trainer(model, samples, tmp_path, "quant.compute_dtype=float32")
    assert fast.fast_lora == layers
    loss_fast, grads_fast, calls = step(fast, samples)
    plain, _ = make_trainer(model, samples, tmp_path, "quant.compute_dtype=float32", "train.fast_lora=false")
    loss_plain, grads_plain, _ = step(plain, samples)
    assert loss_fast == pytest.approx(loss_plain, rel=1e-6)
    assert rel_err(grads_fast, grads_plain) < 1e-5
    backward = {n: c for n, c in calls.items() if n.endswith(":backward")}
    assert sorted(set(backward.values())) == [1, 2]  # each block's last 4-bit matmul is not recomputed


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_the_lean_4bit_matmul_is_bitsandbytes_arithmetic(four_layers, samples, tmp_path, monkeypatch, dtype):
    # fast_lora.LEAN_4BIT: the frozen 4-bit matmul under training dequantizes and multiplies itself
    # (bitsandbytes' kernels, called without its per-call Python); same loss and LoRA gradients.
    lean, _ = make_trainer(four_layers, samples, tmp_path, f"quant.compute_dtype={dtype}")
    loss_lean, grads_lean, calls_lean = step(lean, samples)
    assert len(calls_lean) == 4 * 7 * 2  # every layer's weight, in the forward and in the backward
    monkeypatch.setattr(fast_lora, "LEAN_4BIT", False)
    own, _ = make_trainer(four_layers, samples, tmp_path, f"quant.compute_dtype={dtype}")
    loss_own, grads_own, calls_own = step(own, samples)
    assert calls_own == {}  # bitsandbytes' own matmul: it dequantizes by itself
    assert loss_lean == pytest.approx(loss_own, rel=1e-6)
    assert rel_err(grads_lean, grads_own) < (1e-5 if dtype == "float32" else 1e-2)


def test_lora_gradients_are_no_further_from_float32_than_the_plain_stack_s(four_layers, samples, tmp_path):
    # Issue 21's gradient check: the same model and batch computed in float32 on the dequantized
    # weights is the reference; the plain Hugging Face stack (bf16 4-bit matmuls, every other weight
    # upcast to float32 as prepare_model_for_kbit_training does, peft's float32 LoRA) is the bar.
    _, reference, _ = step(make_trainer(four_layers, samples, tmp_path, "quant.compute_dtype=float32",
                                        "train.fast_lora=false")[0], samples)
    plain, _ = make_trainer(four_layers, samples, tmp_path, "quant.compute_dtype=bfloat16", "train.fast_lora=false")
    for p in plain.model.parameters():
        if p.dtype == torch.bfloat16:
            p.data = p.data.float()
    _, stack, _ = step(plain, samples)
    _, engine, _ = step(make_trainer(four_layers, samples, tmp_path, "quant.compute_dtype=bfloat16")[0], samples)
    assert rel_err(engine, reference) <= 1.1 * rel_err(stack, reference), (rel_err(engine, reference), rel_err(stack, reference))
