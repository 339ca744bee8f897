"""What the budget needs to know about a model, read from its ``config.json`` alone.

:func:`model_spec` turns a transformers config (a ``PretrainedConfig`` or the plain dict of
``config.json``) into a :class:`ModelSpec`: the shapes of the linear layers of one decoder
block, the weights that stay unquantized, and the few architecture quirks that change
memory. Nothing here reads weights or builds a model.

Families whose forward pass we have read (Llama and its close relatives) are modelled
exactly; anything else is modelled as a Llama-like decoder and the spec says why it is
approximate instead of failing.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from qlora_engine.errors import ConfigError, ModelError

# Families whose decoder block is Llama's (RMSNorm -> attention -> RMSNorm -> gated MLP), with
# the differences that matter for memory. Keys are config.json's ``model_type``.
_LLAMA_LIKE: dict[str, dict[str, Any]] = {
    "llama": {},
    "mistral": {},
    "ministral": {},
    "granite": {},
    "smollm3": {},
    "qwen2": {"qkv_bias": True},  # q/k/v carry biases, o_proj does not
    "qwen3": {"head_norms": True},  # RMSNorm over head_dim on q and k
    "gemma": {"tied_default": True},
    "gemma2": {
        "norms": 4,
        "tied_default": True,
        "approx": "Gemma 2's logit soft-capping and sliding-window attention are modelled roughly",
    },
    "gemma3_text": {
        "norms": 4,
        "head_norms": True,
        "tied_default": True,
        "approx": "Gemma 3's sliding-window attention is modelled as full attention",
    },
    "phi3": {"fused": True},  # qkv_proj and gate_up_proj are single matrices
}

_ALIASES = {
    "hidden_size": ("hidden_size", "n_embd", "d_model", "dim"),
    "num_hidden_layers": ("num_hidden_layers", "n_layer", "num_layers", "n_layers"),
    "num_attention_heads": ("num_attention_heads", "n_head", "num_heads", "n_heads"),
    "num_key_value_heads": ("num_key_value_heads", "num_kv_heads", "n_head_kv", "n_kv_heads"),
    "intermediate_size": ("intermediate_size", "ffn_dim", "n_inner", "ffn_hidden_size"),
    "vocab_size": ("vocab_size", "padded_vocab_size", "n_vocab"),
}

_MOE_KEYS = ("num_local_experts", "num_experts", "n_routed_experts", "moe_num_experts")


@dataclass(frozen=True)
class LinearShape:
    """One linear layer of a decoder block, as it will be quantized and (maybe) adapted."""

    name: str
    """The short module name that LoRA targets match (``q_proj``)."""
    in_features: int
    out_features: int
    bias: bool
    role: str
    """'attention' or 'mlp': which LoRA preset includes it."""
    input_group: str
    """Layers that read the same input tensor share a group (q/k/v read the normed hidden state)."""

    @property
    def numel(self) -> int:
        return self.in_features * self.out_features


@dataclass(frozen=True)
class ModelSpec:
    """The facts of a decoder-only model that decide its training memory."""

    model_type: str
    architecture: str
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    tie_word_embeddings: bool
    block_linears: tuple[LinearShape, ...]
    norms_per_block: int
    """RMSNorms over the hidden size in each block (Llama: 2; Gemma 2/3: 4)."""
    head_norms: bool
    """RMSNorm over head_dim applied to q and k (Qwen 3, Gemma 3)."""
    logit_softcap: float | None
    max_position_embeddings: int | None
    prequantized: dict[str, Any] | None
    """The checkpoint's own bitsandbytes 4-bit settings, if it was saved quantized."""
    reasons: tuple[str, ...] = field(default=())
    """Why an estimate from this spec is approximate (empty: the family is modelled exactly)."""
    usable: bool = True
    """False when essential sizes are missing and no estimate can be made."""

    @property
    def approximate(self) -> bool:
        return bool(self.reasons) or not self.usable

    def linear_names(self) -> list[str]:
        return [lin.name for lin in self.block_linears]


def _get(d: dict[str, Any], key: str) -> Any:
    for alias in _ALIASES.get(key, (key,)):
        v = d.get(alias)
        if v is not None:
            return v
    return None


def _as_dict(model_config: Any) -> dict[str, Any]:
    if isinstance(model_config, dict):
        return dict(model_config)
    to_dict = getattr(model_config, "to_dict", None)
    if callable(to_dict):
        return to_dict()
    raise TypeError(f"model_config must be a transformers config or a dict, not {type(model_config).__name__}")


def _with_defaults(d: dict[str, Any]) -> dict[str, Any]:
    """Fill the defaults transformers would use for keys a config.json leaves out.

    A config.json only lists values that differ from its class's defaults (e.g. Llama
    leaves out ``tie_word_embeddings: false``), so reading the raw dict alone would guess.
    """
    model_type = d.get("model_type")
    if not model_type:
        return d
    try:
        # lazy: the budget is imported at the CLI's start-up and by the app, without transformers
        from transformers import CONFIG_MAPPING

        cls = CONFIG_MAPPING[model_type]
    except Exception:
        return d
    try:
        filled = cls(**{k: v for k, v in d.items() if k != "model_type"}).to_dict()
    except Exception:
        return d
    return {**filled, **{k: v for k, v in d.items() if v is not None}}


def _text_part(d: dict[str, Any], reasons: list[str]) -> dict[str, Any]:
    """The language model's part of a multimodal config (``text_config``)."""
    text = d.get("text_config")
    if isinstance(text, dict) and _get(d, "hidden_size") is None:
        reasons.append(
            f"{d.get('model_type', 'this model')} is multimodal: only its language model is counted "
            "(vision/audio towers are not)"
        )
        merged = dict(text)
        merged.setdefault("quantization_config", d.get("quantization_config"))
        merged.setdefault("architectures", d.get("architectures"))
        return merged
    return d


def _int(v: Any) -> int | None:
    try:
        if v is None or isinstance(v, bool):
            return None
        i = int(v)
        return i if i > 0 else None
    except (TypeError, ValueError):
        return None


def _bnb_prequantized(d: dict[str, Any], reasons: list[str]) -> dict[str, Any] | None:
    q = d.get("quantization_config")
    if not isinstance(q, dict):
        return None
    method = q.get("quant_method", "")
    if method == "gguf":  # GGUF files are dequantized to bf16 once, then quantized like any checkpoint
        return None
    if method == "bitsandbytes" and (q.get("load_in_4bit") or q.get("_load_in_4bit")):
        return {
            "quant_type": q.get("bnb_4bit_quant_type", "fp4"),
            "double_quant": bool(q.get("bnb_4bit_use_double_quant", False)),
            "skip_modules": list(q.get("llm_int8_skip_modules") or []),
        }
    reasons.append(
        f"the checkpoint is already quantized ({method or 'unknown method'}); the estimate assumes it is "
        "loaded and requantized to 4-bit like a bf16 checkpoint"
    )
    return None


def model_spec(model_config: Any) -> ModelSpec:
    """Read a :class:`ModelSpec` from a transformers config or a ``config.json`` dict.

    Never raises for an unknown or incomplete config: the spec then carries ``reasons``
    (and ``usable=False`` when even the hidden size or layer count is missing).
    """
    reasons: list[str] = []
    raw = _as_dict(model_config)
    d = _text_part(raw, reasons)
    # Which sizes the config itself states; transformers' class defaults would hide a gap.
    stated = {k for k in _ALIASES if _get(d, k) is not None}
    stated_head_dim = _int(d.get("head_dim"))
    d = _with_defaults(d)
    model_type = str(d.get("model_type") or raw.get("model_type") or "unknown")
    arch_list = d.get("architectures") or raw.get("architectures") or []
    architecture = str(arch_list[0]) if arch_list else model_type
    family = _LLAMA_LIKE.get(model_type)
    if family is None:
        reasons.append(
            f"architecture {model_type!r} is not one the budget knows exactly; it is modelled as a Llama-like decoder"
        )
        family = {}
    elif family.get("approx"):
        reasons.append(family["approx"])
    if any(_int(d.get(k)) for k in _MOE_KEYS):
        reasons.append("mixture-of-experts layers are modelled as one dense MLP per block (experts not counted)")

    def size(key: str) -> int | None:
        return _int(_get(d, key)) if key in stated else None

    hidden = size("hidden_size")
    layers = size("num_hidden_layers")
    vocab = size("vocab_size")
    heads = size("num_attention_heads")
    usable = True
    if hidden is None or layers is None:
        missing = [k for k, v in (("hidden_size", hidden), ("num_hidden_layers", layers)) if v is None]
        reasons.append(f"config.json lacks {', '.join(missing)}: no estimate is possible")
        usable = False
        hidden, layers = hidden or 0, layers or 0
    if vocab is None:
        reasons.append("config.json lacks vocab_size; assumed 32000")
        vocab = 32000
    if heads is None:
        heads = max(1, hidden // 128) if hidden else 1
        reasons.append(f"config.json lacks num_attention_heads; assumed {heads}")
    kv = _int(_get(d, "num_key_value_heads"))  # a default here (= heads) is transformers' own rule
    if kv is None:
        kv = 1 if d.get("multi_query") else heads
    head_dim = stated_head_dim or (hidden // heads if heads else 0)
    inter = size("intermediate_size")
    if inter is None:
        inter = 4 * hidden
        reasons.append(f"config.json lacks intermediate_size; assumed 4 x hidden = {inter}")

    tied = d.get("tie_word_embeddings")
    if tied is None:
        tied = bool(family.get("tied_default", False))
    softcap = d.get("final_logit_softcapping")
    softcap = float(softcap) if isinstance(softcap, (int, float)) and softcap else None

    ad, kd = heads * head_dim, kv * head_dim
    attn_bias = bool(d.get("attention_bias", False))
    mlp_bias = bool(d.get("mlp_bias", False))
    if family.get("fused"):
        linears = (
            LinearShape("qkv_proj", hidden, ad + 2 * kd, attn_bias, "attention", "attn_in"),
            LinearShape("o_proj", ad, hidden, attn_bias, "attention", "o_in"),
            LinearShape("gate_up_proj", hidden, 2 * inter, mlp_bias, "mlp", "mlp_in"),
            LinearShape("down_proj", inter, hidden, mlp_bias, "mlp", "down_in"),
        )
    else:
        qkv_bias = attn_bias or bool(family.get("qkv_bias"))
        linears = (
            LinearShape("q_proj", hidden, ad, qkv_bias, "attention", "attn_in"),
            LinearShape("k_proj", hidden, kd, qkv_bias, "attention", "attn_in"),
            LinearShape("v_proj", hidden, kd, qkv_bias, "attention", "attn_in"),
            LinearShape("o_proj", ad, hidden, attn_bias, "attention", "o_in"),
            LinearShape("gate_proj", hidden, inter, mlp_bias, "mlp", "mlp_in"),
            LinearShape("up_proj", hidden, inter, mlp_bias, "mlp", "mlp_in"),
            LinearShape("down_proj", inter, hidden, mlp_bias, "mlp", "down_in"),
        )
    return ModelSpec(
        model_type=model_type,
        architecture=architecture,
        vocab_size=vocab,
        hidden_size=hidden,
        num_layers=layers,
        num_heads=heads,
        num_kv_heads=kv,
        head_dim=head_dim,
        intermediate_size=inter,
        tie_word_embeddings=bool(tied),
        block_linears=linears,
        norms_per_block=int(family.get("norms", 2)),
        head_norms=bool(family.get("head_norms", False)),
        logit_softcap=softcap,
        max_position_embeddings=_int(d.get("max_position_embeddings")),
        prequantized=_bnb_prequantized(d, reasons),
        reasons=tuple(reasons),
        usable=usable,
    )


# -- reading a model reference's config, cached -------------------------------------------------------

_CACHE: dict[Any, ModelSpec] = {}
_CACHE_MAX = 64


def _remember(key: Any, spec: ModelSpec) -> ModelSpec:
    if len(_CACHE) >= _CACHE_MAX:
        _CACHE.pop(next(iter(_CACHE)))
    _CACHE[key] = spec
    return spec


def spec_from_config(model_config: Any) -> ModelSpec:
    """:func:`model_spec`, cached on the config's content (the GUI recomputes on every keystroke)."""
    d = _as_dict(model_config)
    key = ("config", json.dumps(d, sort_keys=True, default=str))
    hit = _CACHE.get(key)
    return hit if hit is not None else _remember(key, model_spec(d))


def spec_from_ref(ref: str, *, revision: str | None = None, trust_remote_code: bool = False) -> ModelSpec:
    """The spec of a model reference (folder, .gguf file, hub id); reads config files only.

    A local folder's ``config.json`` is read directly, so an architecture transformers does
    not know still gives an (approximate) estimate. Cached on the file's modification time.
    """
    if not ref or not ref.strip():
        raise ConfigError("model.ref: no model chosen; set a local folder, a .gguf file or a hub id.")
    path = Path(ref).expanduser()
    cfg_file = path / "config.json"
    if path.is_dir() and cfg_file.is_file():
        key: Any = ("file", str(cfg_file.resolve()), cfg_file.stat().st_mtime_ns)
        hit = _CACHE.get(key)
        if hit is not None:
            return hit
        try:
            d = json.loads(cfg_file.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as e:
            raise ModelError(f"{cfg_file}: not readable as JSON ({e}).") from e
        if not isinstance(d, dict):
            raise ModelError(f"{cfg_file}: expected a JSON object.")
        return _remember(key, model_spec(d))
    key = ("ref", ref, revision, path.stat().st_mtime_ns if path.is_file() else None)
    hit = _CACHE.get(key)
    if hit is not None:
        return hit
    # lazy: models imports torch; the budget stays torch-free (CLI start-up, the app)
    from qlora_engine.models import read_model_config

    config = read_model_config(ref, trust_remote_code=trust_remote_code, revision=revision)
    return _remember(key, model_spec(config))


def ceil_div(a: int, b: int) -> int:
    return -(-a // b)
