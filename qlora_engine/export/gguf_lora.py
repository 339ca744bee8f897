"""The LoRA adapter as a GGUF adapter file (llama.cpp ``--lora``, Ollama ``ADAPTER``).

llama.cpp's layout: ``general.type = "adapter"``, ``adapter.type = "lora"``,
``adapter.lora.alpha``, and for each adapted matrix ``W`` (llama.cpp name ``blk.N.attn_q.weight``)
two tensors ``blk.N.attn_q.weight.lora_a`` (rank x in) and ``...lora_b`` (out x rank). At run
time llama.cpp adds ``alpha / rank * B (A x)``, rank being read from the tensors' shapes.

Two things must match what the same model's GGUF base does:

* B's rows are outputs, so for the Q and K projections of the ``llama`` architecture they get
  the same rotary row reordering as the base weights (A is untouched);
* the scale: peft scales by ``alpha / rank`` (or ``alpha / sqrt(rank)`` with rsLoRA). The alpha
  written is chosen so that llama.cpp's ``alpha / rank`` equals peft's scale exactly.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import gguf
import torch

from qlora_engine.errors import ModelError
from qlora_engine.export.gguf_model import ArchSpec, PlannedTensor, TensorNamer, write_gguf

_PREFIX = "base_model.model."


def lora_scale(adapter_config: dict[str, Any], rank: int) -> float:
    alpha = float(adapter_config.get("lora_alpha", rank))
    return alpha / math.sqrt(rank) if adapter_config.get("use_rslora") else alpha / rank


def check_adapter_supported(adapter_config: dict[str, Any]) -> None:
    if adapter_config.get("use_dora"):
        raise ModelError(
            "GGUF LoRA export: DoRA adapters have a magnitude vector llama.cpp's LoRA files cannot hold.",
            hint="Export the merged model as GGUF instead (--format gguf --no-lora).",
        )
    if adapter_config.get("rank_pattern") or adapter_config.get("alpha_pattern"):
        raise ModelError(
            "GGUF LoRA export: per-layer ranks or alphas (rank_pattern/alpha_pattern) are not supported yet."
        )
    if adapter_config.get("modules_to_save"):
        raise ModelError(
            "GGUF LoRA export: the adapter also trains whole modules (modules_to_save), which a LoRA file cannot hold."
        )


def plan_lora_tensors(
    spec: ArchSpec, config: Any, weights: dict[str, torch.Tensor], adapter_config: dict[str, Any]
) -> tuple[list[PlannedTensor], float]:
    """The adapter's A/B tensors under llama.cpp names, and the alpha to write."""
    check_adapter_supported(adapter_config)
    namer = TensorNamer(spec, config)
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    for key, t in weights.items():
        name = key.removeprefix(_PREFIX)
        if name.endswith(".lora_A.weight"):
            pairs.setdefault(name[: -len(".lora_A.weight")], {})["A"] = t
        elif name.endswith(".lora_B.weight"):
            pairs.setdefault(name[: -len(".lora_B.weight")], {})["B"] = t
        else:
            raise ModelError(
                f"GGUF LoRA export: unexpected tensor {key!r} in the adapter (only lora_A/lora_B are supported)."
            )
    if not pairs:
        raise ModelError("GGUF LoRA export: the adapter holds no LoRA matrices.")
    ranks = {p["A"].shape[0] for p in pairs.values() if "A" in p}
    if len(ranks) != 1:
        raise ModelError(f"GGUF LoRA export: the adapter mixes ranks {sorted(ranks)}; not supported yet.")
    rank = ranks.pop()
    alpha = lora_scale(adapter_config, rank) * rank  # llama.cpp scales by alpha / rank
    plan: list[PlannedTensor] = []
    for module in sorted(pairs, key=_layer_order):
        pair = pairs[module]
        if set(pair) != {"A", "B"}:
            raise ModelError(f"GGUF LoRA export: {module} has only {sorted(pair)} of its A/B pair.")
        base = namer.gguf_name(module + ".weight")
        a = pair["A"].to(torch.float32)
        b = namer.reorder(base, pair["B"].to(torch.float32))
        plan.append(
            PlannedTensor(base + ".lora_a", tuple(a.shape), gguf.GGMLQuantizationType.F32, lambda a=a: a.numpy())
        )
        plan.append(
            PlannedTensor(base + ".lora_b", tuple(b.shape), gguf.GGMLQuantizationType.F32, lambda b=b: b.numpy())
        )
    return plan, alpha


def _layer_order(module: str) -> tuple[int, str]:
    for part in module.split("."):
        if part.isdigit():
            return int(part), module
    return -1, module


def write_lora_gguf(
    path: Path,
    spec: ArchSpec,
    config: Any,
    adapter_dir: Path,
    adapter_config: dict[str, Any],
    *,
    name: str,
    progress: Callable[[int, int, str], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
) -> Path:
    from safetensors.torch import load_file  # lazy: only writing the LoRA GGUF reads safetensors

    weights = load_file(str(adapter_dir / "adapter_model.safetensors"))
    plan, alpha = plan_lora_tensors(spec, config, weights, adapter_config)

    def metadata(w: gguf.GGUFWriter) -> None:
        w.add_type(gguf.GGUFType.ADAPTER)
        w.add_name(name)
        w.add_string(gguf.Keys.Adapter.TYPE, "lora")
        w.add_float32(gguf.Keys.Adapter.LORA_ALPHA, float(alpha))

    return write_gguf(path, spec, metadata, plan, progress=progress, should_stop=should_stop)
