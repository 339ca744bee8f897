"""Random weights of a model shape, built one tensor at a time as the engine's loader asks for them.

A 70B checkpoint is ~140 GB in bf16: more than the GPU machine's 64 GiB disk and its 128 GiB of
RAM. :class:`RandomWeights` is a mapping from checkpoint names to :class:`LazyTensor` values that
``qlora_engine.models.load_quantized_model(..., weights=...)`` hands to transformers in place of
the folder's safetensors slices: transformers materializes each (``value[...]``) only when its
turn comes and quantizes it to NF4 before the next, so the bf16 weights exist one tensor at a
time, on the device they load to. Every value is drawn from its own generator seeded by the
tensor's name, so the same mapping gives the same weights every time (the CPU test saves them
as a real checkpoint and compares the two loads).
"""

from __future__ import annotations

import json
import zlib
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import torch

LLAMA3_70B = {
    "model_type": "llama",
    "architectures": ["LlamaForCausalLM"],
    "vocab_size": 128256,
    "hidden_size": 8192,
    "intermediate_size": 28672,
    "num_hidden_layers": 80,
    "num_attention_heads": 64,
    "num_key_value_heads": 8,
    "max_position_embeddings": 1048576,  # 8192 in the real config: raised so the context search is not capped
    "rope_theta": 500000.0,
    "rms_norm_eps": 1e-5,
    "torch_dtype": "bfloat16",
    "tie_word_embeddings": False,
}
"""The Llama-3-70B config (bench/budget_70b.py reads the same)."""


class LazyTensor:
    """One checkpoint tensor, drawn when indexed (``t[...]``), like a safetensors slice."""

    def __init__(self, name: str, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device, seed: int):
        self.name, self.shape, self.dtype, self.device = name, torch.Size(shape), dtype, device
        self.seed = (seed * 1_000_003 + zlib.crc32(name.encode())) % 2**63

    def get_shape(self) -> list[int]:
        return list(self.shape)

    def get_dtype(self) -> str:
        return {torch.bfloat16: "BF16", torch.float16: "F16", torch.float32: "F32"}[self.dtype]

    def materialize(self) -> torch.Tensor:
        gen = torch.Generator(self.device).manual_seed(self.seed)
        out = torch.empty(self.shape, dtype=self.dtype, device=self.device)
        if self.name.endswith("norm.weight"):
            return out.fill_(1.0)  # RMSNorm scales start at one, as the model's own init
        # a little under the init's 0.02, so 80 random layers do not blow the residual stream up
        return out.normal_(0.0, 0.02, generator=gen)

    def __getitem__(self, index: Any) -> torch.Tensor:
        return self.materialize()[index]


class RandomWeights(Mapping[str, LazyTensor]):
    """Every tensor a checkpoint of ``config`` holds (a tied output embedding once), drawn on demand.

    Args:
        config: a ``PretrainedConfig``, a ``config.json`` dict, or a model folder.
        device: where the values are drawn: the device the model loads to, so a 70B shape's
            bf16 weights never pass through host memory.
        seed: the weights of one seed are the same on every call (and differ between devices:
            CUDA and CPU generators differ).
    """

    def __init__(
        self, config: Any, device: torch.device | str = "cpu", seed: int = 0, dtype: torch.dtype = torch.bfloat16
    ):
        from transformers import AutoConfig, AutoModelForCausalLM, PretrainedConfig

        if isinstance(config, (str, Path)):
            config = AutoConfig.from_pretrained(config)
        elif not isinstance(config, PretrainedConfig):
            d = dict(config)
            config = AutoConfig.for_model(d.pop("model_type"), **d)
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config)
        shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
        if getattr(config, "tie_word_embeddings", False):
            out = model.get_output_embeddings()
            for k in [k for k in shapes if out is not None and k.startswith("lm_head.")]:
                del shapes[k]  # saved once, as the input embedding (save_pretrained does the same)
        device = torch.device(device)
        self._tensors = {k: LazyTensor(k, s, dtype, device, seed) for k, s in shapes.items()}

    def __getitem__(self, key: str) -> LazyTensor:
        return self._tensors[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._tensors)

    def __len__(self) -> int:
        return len(self._tensors)

    def nbytes(self) -> int:
        """What the weights would take in a bf16 checkpoint."""
        return sum(t.shape.numel() * t.dtype.itemsize for t in self._tensors.values())

    def save(self, folder: Path) -> None:
        """Write the weights as a real safetensors checkpoint (small shapes: the CPU test)."""
        from safetensors.torch import save_file

        save_file({k: t[...].contiguous() for k, t in self._tensors.items()}, str(Path(folder) / "model.safetensors"))


def write_folder(folder: Path, config: dict[str, Any]) -> Path:
    """A model folder with ``config.json`` and a small tokenizer, but no weights (they come from memory)."""
    import sys

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config, indent=1))
    if not (folder / "tokenizer_config.json").exists():
        sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
        from tiny import build_tokenizer  # random tokens need only its pad id

        build_tokenizer(folder)
    return folder


def use_in_engine(folder: Path, weights: RandomWeights) -> None:
    """Make the engine load ``weights`` for the model in ``folder`` (bench processes only).

    The trainer calls ``model_ref.resolve_model`` (which refuses a folder without weight files)
    and ``models.load_quantized_model``; both are wrapped for this one folder, everything else
    (the quantization config, the dtype, the attention, the LoRA wrapping) is the engine's own.
    """
    from qlora_engine import model_ref, models

    folder = Path(folder).resolve()
    resolve, load = model_ref.resolve_model, models.load_quantized_model

    def resolve_here(ref: str, **kw: Any) -> Path:
        return folder if Path(ref).expanduser().resolve() == folder else resolve(ref, **kw)

    def load_here(cfg: Any, where: Path, device: torch.device, dtype: torch.dtype, **kw: Any) -> Any:
        if Path(where).resolve() == folder:
            kw["weights"] = weights
        return load(cfg, where, device, dtype, **kw)

    model_ref.resolve_model, models.load_quantized_model = resolve_here, load_here
