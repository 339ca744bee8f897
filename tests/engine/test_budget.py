"""The budget's byte counts against what the libraries really allocate, exactly, on the CPU.

* 4-bit weights and constants: the tensors bitsandbytes builds when transformers loads a
  model in 4 bit. The CPU and CUDA paths give the same layout (blocks of 64 values, nested
  blocks of 256: Params4bit's default blocksize, functional.quantize_4bit; the CPU uses the
  default backend's quantize_4bit and the CPU quantize_blockwise kernel, whose output shapes
  match the CUDA kernels'). What only CUDA adds, the caching allocator's 512-byte rounding of
  each tensor, is part of the estimate's allocator slack, not of these components.
* LoRA parameters: what the engine's own ``models.wrap_with_lora`` (peft) makes trainable.
* Activations: the bytes autograd saves in a real forward pass of the engine's model
  (4-bit base, fp32 adapters, bf16 compute, SDPA), counted with saved-tensor hooks.
"""

from __future__ import annotations

import bitsandbytes as bnb
import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from qlora_engine import models
from qlora_engine.budget import estimate, model_spec
from qlora_engine.budget import formulas as fm
from qlora_engine.budget.estimate import adapted_linears
from qlora_engine.config import TrainConfig, apply_overrides

CPU = torch.device("cpu")


def config_for(folder, *overrides: str) -> TrainConfig:
    return apply_overrides(TrainConfig(), [f"model.ref={folder}", "quant.compute_dtype=bfloat16", *overrides])


@pytest.fixture(scope="module")
def odd_model_dir(tmp_path_factory):
    """A Llama whose layer sizes are odd (odd element counts, partial blocks, several nested
    blocks), with head_dim * heads != hidden and tied embeddings."""
    path = tmp_path_factory.mktemp("odd-llama")
    cfg = LlamaConfig(
        vocab_size=301,
        hidden_size=99,
        intermediate_size=251,
        num_hidden_layers=3,
        num_attention_heads=3,
        head_dim=32,
        num_key_value_heads=1,
        max_position_embeddings=256,
        tie_word_embeddings=True,
    )
    torch.manual_seed(0)
    LlamaForCausalLM(cfg).save_pretrained(path, safe_serialization=True)
    return path


def load_4bit(cfg: TrainConfig, folder) -> torch.nn.Module:
    return models.load_quantized_model(cfg, folder, CPU, torch.bfloat16)


def _tensors(obj, seen: dict[int, torch.Tensor]) -> None:
    """Every tensor a QuantState holds, including its nested state (deduplicated by storage)."""
    for value in vars(obj).values():
        if isinstance(value, torch.Tensor):
            seen.setdefault(value.untyped_storage().data_ptr(), value)
        elif isinstance(value, bnb.functional.QuantState):
            _tensors(value, seen)


def bitsandbytes_bytes(model: torch.nn.Module) -> tuple[int, int, int]:
    """(packed weight bytes, quantization-constant bytes, every other parameter's bytes)."""
    packed = 0
    consts: dict[int, torch.Tensor] = {}
    layers = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert layers
    for layer in layers:
        w = layer.weight
        assert w.dtype == torch.uint8 and not getattr(w.quant_state, "packing_format_for_cpu", False)
        packed += w.numel() * w.element_size()
        _tensors(w.quant_state, consts)
    const_bytes = sum(t.numel() * t.element_size() for t in consts.values())
    other = sum(p.numel() * p.element_size() for p in model.parameters() if not isinstance(p, bnb.nn.Params4bit))
    return packed, const_bytes, other


@pytest.mark.parametrize("model", ["tiny", "odd"])
@pytest.mark.parametrize("quant", [("nf4", True), ("fp4", False), ("nf4", False)])
def test_quantized_and_unquantized_bytes_equal_what_bitsandbytes_builds(model, quant, tiny_model_dir, odd_model_dir):
    folder = tiny_model_dir if model == "tiny" else odd_model_dir
    qtype, dq = quant
    cfg = config_for(folder, f"quant.quant_type={qtype}", f"quant.double_quant={str(dq).lower()}")
    packed, consts, other = bitsandbytes_bytes(load_4bit(cfg, folder))
    est = estimate(cfg)
    assert est.components["quantized_weights"] == packed
    assert est.components["quant_constants"] == consts
    assert est.components["unquantized_weights"] == other
    assert not est.approximate


def test_double_quantization_costs_about_an_eighth_of_a_bit_per_weight():
    # The figure: ~0.127 bits per parameter of constants instead of 0.5.
    n = 4096 * 14336
    _, dq = fm.quantized_linear_bytes(n, double_quant=True)
    _, plain = fm.quantized_linear_bytes(n, double_quant=False)
    assert 8 * dq / n == pytest.approx(0.127, abs=0.002)
    assert 8 * plain / n == pytest.approx(0.5, abs=0.001)


LORA_CASES = [
    ("lora.target_modules=[all-linear]", "lora.rank=8"),
    ("lora.target_modules=[attention]", "lora.rank=4"),
    ("lora.target_modules=[mlp]", "lora.rank=16", "lora.layers='1'"),
    ("lora.target_modules=[q_proj, v_proj]", "lora.rank=3"),
    ("lora.target_modules=[all-linear]", "lora.rank=2", "lora.use_dora=true"),
    ("lora.target_modules=[o_proj, down_proj]", "lora.rank=5", "lora.layers='0,2'"),
]


@pytest.mark.parametrize("overrides", LORA_CASES, ids=lambda o: " ".join(o))
def test_lora_parameter_count_equals_peft(overrides, odd_model_dir):
    cfg = config_for(odd_model_dir, *overrides)
    model = models.wrap_with_lora(load_4bit(cfg, odd_model_dir), cfg)
    trainable = [p for p in model.parameters() if p.requires_grad]
    est = estimate(cfg)
    assert est.details["lora_parameters"] == sum(p.numel() for p in trainable)
    # peft keeps adapters in fp32 (autocast_adapter_dtype), which the estimate assumes.
    assert {p.dtype for p in trainable} == {torch.float32}
    assert est.components["lora_weights"] == sum(p.numel() * 4 for p in trainable)


# -- activations -----------------------------------------------------------------------------------

ACTIVATION_CASES = {
    "plain": (),
    "checkpointing": ("train.gradient_checkpointing=true",),
    "padding-mask": ("padding",),
    "attention-only+dropout": ("lora.target_modules=[attention]", "lora.dropout=0.1"),
    "some-layers": ("lora.layers='1'", "lora.rank=4"),
    "mlp-only": ("lora.target_modules=[mlp]",),
    "v-only+dropout": ("lora.target_modules=[v_proj]", "lora.dropout=0.05"),
    "up-only": ("lora.target_modules=[up_proj]",),
    "packed": ("packed",),
    "checkpointing+padding": ("train.gradient_checkpointing=true", "padding"),
}


@pytest.mark.parametrize("case", list(ACTIVATION_CASES))
def test_saved_activation_bytes_equal_what_autograd_keeps(case, tiny_model_dir):
    """The per-block formula (norms, fp32 adapter inputs, attention, gated MLP), the final norm
    and the loss's log-softmax, against the tensors autograd really saves."""
    extra = [o for o in ACTIVATION_CASES[case] if "=" in o]
    padding = "padding" in ACTIVATION_CASES[case]
    packed = "packed" in ACTIVATION_CASES[case]
    ckpt = any(o.startswith("train.gradient_checkpointing=true") for o in extra)
    cfg = config_for(tiny_model_dir, "lora.rank=8", f"train.gradient_checkpointing={str(ckpt).lower()}", *extra)
    model = models.wrap_with_lora(load_4bit(cfg, tiny_model_dir), cfg)
    if ckpt:
        models.enable_gradient_checkpointing(model)
    model.train()

    # s is a multiple of 32: CUDA's memory-efficient kernel pads its log-sum-exp to 32 rows,
    # the CPU kernel does not; the formula follows CUDA.
    b, s = 2, 64
    torch.manual_seed(0)
    ids = torch.randint(3, 300, (b, s))
    mask = torch.ones(b, s, dtype=torch.long)
    if padding:
        mask[1, 40:] = 0
    saved: dict[int, int] = {}
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    params |= {t.untyped_storage().data_ptr() for t in model.buffers()}

    def pack(t: torch.Tensor) -> torch.Tensor:
        st = t.untyped_storage()
        if st.data_ptr() not in params:
            saved[st.data_ptr()] = st.nbytes()
        return t

    batch = {"input_ids": ids, "attention_mask": mask, "labels": ids}
    if packed:  # two samples per row; transformers builds a block-diagonal mask from the positions
        batch = {
            "input_ids": ids,
            "labels": ids,
            "position_ids": torch.cat([torch.arange(24), torch.arange(40)]).repeat(b, 1),
        }
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = model(**batch)
    assert torch.isfinite(out.loss)

    spec = model_spec(LlamaConfig.from_pretrained(tiny_model_dir))
    shape = fm.StepShape(
        batch=b, seq=s, elem=2, checkpointing=ckpt, mask=padding or packed, packed=packed, attn="sdpa",
        rank=cfg.lora.rank, dropout=cfg.lora.dropout > 0, dora=False, dropout_mask_bytes=4,
    )  # fmt: skip
    adapted = adapted_linears(cfg, spec, [])
    layers = range(spec.num_layers) if cfg.lora.layers is None else [int(cfg.lora.layers)]
    T = b * s
    if ckpt:
        blocks = spec.num_layers * 2 * T * spec.hidden_size  # each block's input
    else:
        blocks = fm.blocks_saved(spec, shape, adapted, set(layers))
        rows = b if packed else 1
        blocks += 2 * 2 * rows * s * spec.head_dim  # RoPE's cos and sin, shared by the blocks
    loss = 8 * T + 4 * T * spec.vocab_size + 4  # shifted labels, fp32 log-softmax, nll's total weight
    assert sum(saved.values()) == blocks + fm.final_saved(spec, shape) + loss
