"""Which fused kernels a run will use: the budget's copy of ``models.apply_fused_kernels``' choice.

The engine applies Liger Kernel to the base model when ``train.kernels`` is 'auto' or
'liger', the run is on CUDA, ``liger_kernel`` imports and the config's ``model_type`` is in
liger's ``MODEL_TYPE_TO_APPLY_LIGER_FN`` (models.apply_fused_kernels). The budget cannot
import liger to ask (it needs triton and a GPU, and the estimate must stay cheap), so it
keeps liger-kernel 0.8.5's table of model types, and what each ``apply_liger_kernel_to_*``
replaces by default, and looks the package up with ``importlib.util.find_spec`` only.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass

# liger-kernel 0.8.5, transformers/monkey_patch.py: MODEL_TYPE_TO_APPLY_LIGER_FN's keys.
LIGER_MODEL_TYPES = frozenset(
    {
        "deepseek_v2", "deepseek_v3", "deepseek_v4", "gemma", "gemma2", "gemma3_text", "gemma3", "gemma4_text",
        "gemma4", "glm4", "glm4v", "glm4v_moe", "gpt_oss", "internvl", "llama", "llama4_text", "llama4", "llava",
        "granite", "mllama", "mllama_text_model", "ministral", "mistral", "mixtral", "muse_glimmer", "nemotron",
        "olmo2", "pixtral", "olmo3", "qwen2", "qwen3", "qwen3_moe", "qwen2_vl", "qwen2_vl_text", "qwen2_5_vl",
        "qwen2_5_vl_text", "qwen3_next", "qwen3_5", "qwen3_5_text", "qwen3_5_moe", "qwen3_5_moe_text", "qwen3_vl",
        "qwen3_vl_text", "qwen3_vl_moe", "qwen3_vl_moe_text", "smollm3", "phi3", "paligemma", "falcon_h1",
        "smolvlm", "hunyuan_v1_dense", "hunyuan_v1_moe", "exaone4",
    }
)  # fmt: skip

# The families the budget models exactly (spec._LLAMA_LIKE) and what liger 0.8.5's
# apply_liger_kernel_to_<type> does to them by default: RoPE in place, RMSNorm (Gemma 2/3:
# not in place, so its backward allocates dX), the gated MLP (SwiGLU; GeGLU for Gemma) and
# the loss: fused linear + cross-entropy, except Granite, whose default is liger's plain
# cross-entropy over materialized logits.
_LIGER_LOSS = {"granite": "cross_entropy"}
_LIGER_NORM_NOT_IN_PLACE = frozenset({"gemma2", "gemma3_text", "gemma3"})

VERSION = "0.8.5"
"""The liger-kernel release whose source these tables and the formulas were read from."""


@dataclass(frozen=True)
class KernelChoice:
    """What the estimate assumes the engine will run (``kernels``) and why, in words."""

    requested: str
    kernels: str
    """'liger' or 'none'."""
    reason: str
    loss: str = "plain"
    """'fused_linear_cross_entropy', 'cross_entropy' (liger's, over materialized logits) or 'plain'."""
    norm_in_place: bool = True
    installed: bool = False

    @property
    def liger(self) -> bool:
        return self.kernels == "liger"


def liger_installed() -> bool:
    """Whether ``liger_kernel`` can be found on this machine (looked up, not imported)."""
    try:
        return importlib.util.find_spec("liger_kernel") is not None
    except (ImportError, ValueError):
        return False


def resolve_kernels(choice: str, model_type: str, *, cuda: bool, installed: bool | None = None) -> KernelChoice:
    """What ``models.apply_fused_kernels`` will do with ``train.kernels = choice``.

    ``cuda``: the run will be on a CUDA card (``train.device`` is not 'cpu'; the budget plans
    for a GPU). ``installed``: whether liger-kernel is importable (None: look it up here).
    'liger' is assumed as asked even when the package is missing on this machine (the run may
    be elsewhere; the engine refuses to start without it), with a reason saying so; 'liger'
    for an architecture liger does not patch, or for a CPU run, is the engine's ConfigError and
    is reported by the caller.
    """
    if installed is None:
        installed = liger_installed()
    supported = model_type in LIGER_MODEL_TYPES
    if choice == "none":
        return KernelChoice(choice, "none", "train.kernels is 'none': the plain transformers code", installed=installed)
    if not cuda:
        return KernelChoice(choice, "none", "no fused kernels on the CPU", installed=installed)
    if not supported:
        return KernelChoice(
            choice,
            "none",
            f"Liger Kernel has no kernels for {model_type!r}: the plain transformers code",
            installed=installed,
        )
    loss = _LIGER_LOSS.get(model_type, "fused_linear_cross_entropy")
    in_place = model_type not in _LIGER_NORM_NOT_IN_PLACE
    if choice == "auto" and not installed:
        return KernelChoice(
            choice, "none", "liger-kernel is not installed here, so 'auto' runs the plain transformers code",
            installed=False,
        )  # fmt: skip
    if choice == "auto":
        reason = f"'auto' on CUDA with liger-kernel installed: Liger Kernel for {model_type}"
    elif installed:
        reason = f"train.kernels is 'liger': Liger Kernel for {model_type}"
    else:
        reason = (
            f"train.kernels is 'liger': Liger Kernel for {model_type} assumed, but liger-kernel is not installed "
            "here (the engine will refuse to start without it)"
        )
    return KernelChoice(choice, "liger", reason, loss=loss, norm_in_place=in_place, installed=installed)
