"""Writing a Hugging Face causal LM as a GGUF file llama.cpp (and Ollama) can load.

What llama.cpp expects of the Llama family, and what this module writes:

* tensor names in llama.cpp's scheme (``token_embd``, ``blk.N.attn_q``, ``output_norm`` ...),
  taken from the ``gguf`` package's own name map;
* for the ``llama`` architecture, the rows of the Q and K projections reordered: Hugging Face
  Llama checkpoints rotate the two halves of each head (``rotate_half``), llama.cpp rotates
  interleaved pairs, so each head's rows ``[0..d/2), [d/2..d)`` are interleaved. Qwen2 uses
  the half-split rotation in llama.cpp too and is written as is;
* norms, biases and other 1-D tensors in F32; matrices in F16 or Q8_0 (a matrix whose rows
  are not a multiple of the 32-value Q8_0 block stays F16, as llama.cpp's own converter does);
* hyperparameters under ``<arch>.*`` and the tokenizer under ``tokenizer.ggml.*``.

The tensors are written one at a time (header and tensor table first, then the data), so a
large model never needs a second full copy in memory.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import torch

from qlora_engine.errors import ExportCancelled, ModelError
from qlora_engine.export.gguf_vocab import VocabMetadata

TYPES = {
    "f32": (gguf.LlamaFileType.ALL_F32, gguf.GGMLQuantizationType.F32),
    "f16": (gguf.LlamaFileType.MOSTLY_F16, gguf.GGMLQuantizationType.F16),
    "q8_0": (gguf.LlamaFileType.MOSTLY_Q8_0, gguf.GGMLQuantizationType.Q8_0),
}
"""GGUF output types: name -> (file type, matrix tensor type)."""


@dataclass(frozen=True)
class ArchSpec:
    hf_architecture: str
    gguf_arch: gguf.MODEL_ARCH
    permute_qk: bool

    @property
    def name(self) -> str:
        return gguf.MODEL_ARCH_NAMES[self.gguf_arch]


SUPPORTED = {
    "LlamaForCausalLM": ArchSpec("LlamaForCausalLM", gguf.MODEL_ARCH.LLAMA, True),  # Llama 1-3, SmolLM, TinyLlama
    "MistralForCausalLM": ArchSpec(
        "MistralForCausalLM", gguf.MODEL_ARCH.LLAMA, True
    ),  # llama.cpp runs Mistral as llama
    "Qwen2ForCausalLM": ArchSpec("Qwen2ForCausalLM", gguf.MODEL_ARCH.QWEN2, False),
}


def arch_spec(config: Any) -> ArchSpec:
    """The GGUF layout of a model config, or a clear "not supported yet" error."""
    archs = getattr(config, "architectures", None) or []
    by_type = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM"}
    arch = archs[0] if archs else by_type.get(getattr(config, "model_type", ""), type(config).__name__)
    spec = SUPPORTED.get(arch)
    if spec is None:
        raise ModelError(
            f"GGUF export of {arch} models is not supported yet; supported: Llama, Mistral, Qwen2 and SmolLM "
            f"({', '.join(SUPPORTED)}).",
            hint="Export the merged model (--format merged) and convert it with llama.cpp's convert_hf_to_gguf.py.",
        )
    rope = rope_parameters(config)
    kind = rope.get("rope_type") or rope.get("type") or "default"
    if kind not in ("default", "linear", "llama3", "yarn"):
        raise ModelError(f"GGUF export: RoPE scaling {kind!r} of this model is not supported yet.")
    return spec


def rope_parameters(config: Any) -> dict[str, Any]:
    params = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    params = dict(params)
    if "rope_theta" not in params and getattr(config, "rope_theta", None) is not None:
        params["rope_theta"] = config.rope_theta
    return params


def head_dim(config: Any) -> int:
    return int(getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads)


def permute_rows(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """Interleave the two rotary halves of each head's rows (Hugging Face -> llama.cpp order)."""
    rows = w.shape[0]
    return w.reshape(n_head, 2, rows // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_hparams(w: gguf.GGUFWriter, config: Any) -> None:
    """The ``<arch>.*`` keys llama.cpp reads for the Llama family."""
    w.add_context_length(int(config.max_position_embeddings))
    w.add_embedding_length(int(config.hidden_size))
    w.add_feed_forward_length(int(config.intermediate_size))
    w.add_block_count(int(config.num_hidden_layers))
    w.add_head_count(int(config.num_attention_heads))
    w.add_head_count_kv(int(getattr(config, "num_key_value_heads", None) or config.num_attention_heads))
    w.add_layer_norm_rms_eps(float(config.rms_norm_eps))
    w.add_vocab_size(int(config.vocab_size))
    hd = head_dim(config)
    w.add_rope_dimension_count(hd)
    w.add_key_length(hd)
    w.add_value_length(hd)
    rope = rope_parameters(config)
    if rope.get("rope_theta") is not None:
        w.add_rope_freq_base(float(rope["rope_theta"]))
    kind = rope.get("rope_type") or rope.get("type") or "default"
    if kind == "linear":
        w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(float(rope["factor"]))
    elif kind == "yarn":
        w.add_rope_scaling_type(gguf.RopeScalingType.YARN)
        w.add_rope_scaling_factor(float(rope["factor"]))
        w.add_rope_scaling_orig_ctx_len(int(rope["original_max_position_embeddings"]))


def llama3_rope_factors(config: Any) -> np.ndarray | None:
    """Per-frequency divisors of Llama 3.1's RoPE scaling (llama.cpp reads them as ``rope_freqs``)."""
    rope = rope_parameters(config)
    if (rope.get("rope_type") or rope.get("type")) != "llama3":
        return None
    dim = head_dim(config)
    base = float(rope.get("rope_theta", 10000.0))
    factor = float(rope.get("factor", 8.0))
    low, high = float(rope.get("low_freq_factor", 1.0)), float(rope.get("high_freq_factor", 4.0))
    old_ctx = float(rope.get("original_max_position_embeddings", 8192))
    out = []
    for i in range(0, dim, 2):
        wavelen = 2 * math.pi * base ** (i / dim)
        if wavelen < old_ctx / high:  # high frequencies: unchanged
            out.append(1.0)
        elif wavelen > old_ctx / low:  # low frequencies: scaled by the full factor
            out.append(factor)
        else:  # in between: a smooth blend of the two
            smooth = (old_ctx / wavelen - low) / (high - low)
            out.append(1.0 / ((1 - smooth) / factor + smooth))
    return np.asarray(out, dtype=np.float32)


# -- tensors --------------------------------------------------------------------------------------


class TensorNamer:
    """Hugging Face parameter names -> llama.cpp tensor names for one architecture."""

    def __init__(self, spec: ArchSpec, config: Any) -> None:
        self.spec = spec
        self.map = gguf.get_tensor_name_map(spec.gguf_arch, int(config.num_hidden_layers))
        self.n_head = int(config.num_attention_heads)
        self.n_kv = int(getattr(config, "num_key_value_heads", None) or self.n_head)

    def gguf_name(self, hf_name: str) -> str:
        name = self.map.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if name is None:
            raise ModelError(f"GGUF export: the tensor {hf_name!r} has no llama.cpp name for {self.spec.name}.")
        return name

    def reorder(self, gguf_name: str, t: torch.Tensor) -> torch.Tensor:
        """Rows of Q and K in llama.cpp's rotary order (also for LoRA B matrices, whose rows are outputs)."""
        if not self.spec.permute_qk:
            return t
        if ".attn_q." in gguf_name:
            return permute_rows(t, self.n_head)
        return permute_rows(t, self.n_kv) if ".attn_k." in gguf_name else t


def tensor_type(gguf_name: str, shape: tuple[int, ...], out_type: str) -> gguf.GGMLQuantizationType:
    if len(shape) <= 1 or gguf_name.endswith("_norm.weight") or not gguf_name.endswith(".weight"):
        return gguf.GGMLQuantizationType.F32
    qtype = TYPES[out_type][1]
    if qtype == gguf.GGMLQuantizationType.Q8_0:
        block, _ = gguf.GGML_QUANT_SIZES[qtype]
        if shape[-1] % block:
            return gguf.GGMLQuantizationType.F16
    return qtype


def encode(data: np.ndarray, qtype: gguf.GGMLQuantizationType, name: str = "") -> np.ndarray:
    if qtype == gguf.GGMLQuantizationType.F32:
        return data.astype(np.float32, copy=False)
    if qtype == gguf.GGMLQuantizationType.F16:
        with np.errstate(over="ignore"):
            out = data.astype(np.float16)
        if not np.isfinite(out).all() and np.isfinite(data).all():
            raise ModelError(
                f"GGUF export: {name} has weights beyond float16's range (+-65504); an F16 file would hold infinities.",
                hint="Export Q8_0 only (--gguf-types q8_0), whose blocks keep their own scale.",
            )
        return out
    return gguf.quants.quantize(data.astype(np.float32, copy=False), qtype)


@dataclass
class PlannedTensor:
    name: str
    shape: tuple[int, ...]
    qtype: gguf.GGMLQuantizationType
    load: Callable[[], np.ndarray]
    """Returns the tensor's float32 data, already in llama.cpp's layout."""


def plan_model_tensors(
    spec: ArchSpec,
    config: Any,
    tensors: Iterable[tuple[str, Callable[[], torch.Tensor], tuple[int, ...]]],
    out_type: str,
) -> list[PlannedTensor]:
    """Name, type and a loader for each tensor of a model, in file order."""
    namer = TensorNamer(spec, config)
    tied = bool(getattr(config, "tie_word_embeddings", False))
    plan: list[PlannedTensor] = []
    factors = llama3_rope_factors(config)
    if factors is not None:
        plan.append(
            PlannedTensor("rope_freqs.weight", tuple(factors.shape), gguf.GGMLQuantizationType.F32, lambda: factors)
        )
    for hf_name, get, shape in tensors:
        if hf_name.endswith("rotary_emb.inv_freq") or (tied and hf_name == "lm_head.weight"):
            continue
        name = namer.gguf_name(hf_name)

        def load(get=get, name=name) -> np.ndarray:
            return namer.reorder(name, get().to(torch.float32)).numpy()

        plan.append(PlannedTensor(name, tuple(shape), tensor_type(name, tuple(shape), out_type), load))
    return plan


def write_gguf(
    path: Path,
    spec: ArchSpec,
    metadata: Callable[[gguf.GGUFWriter], None],
    plan: list[PlannedTensor],
    *,
    progress: Callable[[int, int, str], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
) -> Path:
    """Write ``plan``'s tensors with ``metadata`` (a function adding key-values) to ``path``, streaming."""

    w = gguf.GGUFWriter(path=None, arch=spec.name)
    metadata(w)
    for t in plan:
        if t.qtype in (gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16):
            dtype = np.float32 if t.qtype == gguf.GGMLQuantizationType.F32 else np.float16
            nbytes = int(np.prod(t.shape)) * np.dtype(dtype).itemsize
            w.add_tensor_info(t.name, t.shape, np.dtype(dtype), nbytes, raw_dtype=t.qtype)
        else:
            byte_shape = gguf.quant_shape_to_byte_shape(t.shape, t.qtype)
            w.add_tensor_info(t.name, byte_shape, np.dtype(np.uint8), int(np.prod(byte_shape)), raw_dtype=t.qtype)
    w.write_header_to_file(path=path)
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    try:
        for i, t in enumerate(plan):
            if should_stop is not None and should_stop():
                raise ExportCancelled("export cancelled; nothing was written.")
            data = encode(t.load(), t.qtype, t.name)
            w.write_tensor_data(data)
            if progress is not None:
                progress(i + 1, len(plan), t.name)
    finally:
        w.close()
    return path


def model_metadata(
    spec: ArchSpec, config: Any, vocab: VocabMetadata, out_type: str, *, name: str, extra: dict[str, str] | None = None
) -> Callable[[gguf.GGUFWriter], None]:
    def add(w: gguf.GGUFWriter) -> None:
        w.add_type(gguf.GGUFType.MODEL)
        w.add_name(name)
        for key, value in (extra or {}).items():
            w.add_string(key, value)
        write_hparams(w, config)
        w.add_file_type(TYPES[out_type][0])
        w.add_quantization_version(gguf.GGML_QUANT_VERSION)
        vocab.write(w)

    return add


def state_dict_tensors(model: torch.nn.Module) -> Iterator[tuple[str, Callable[[], torch.Tensor], tuple[int, ...]]]:
    """(name, loader, shape) for every tensor of an in-memory model."""
    for name, t in model.state_dict().items():
        yield name, (lambda t=t: t.detach().cpu()), tuple(t.shape)
