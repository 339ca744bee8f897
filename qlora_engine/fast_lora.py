"""LoRA on 4-bit layers in the compute dtype, without peft's per-call copies (``train.fast_lora``).

peft's 4-bit LoRA layer (``peft.tuners.lora.bnb.Linear4bit``) clones the base output, casts
the input to the adapter weights' fp32, runs both LoRA matmuls in fp32, scales the fp32
result, casts it back and adds it. At thousands of tokens each of those is a full-width
tensor read and written (the fp32 ones twice as wide as the bf16 activations), so the
LoRA part costs more memory traffic than the 4-bit matmul beside it, and autograd keeps the
fp32 copy of every input for the weight gradients.

Here the adapter weights stay fp32 (what the optimizer updates), are scaled and cast to the
compute dtype once per call (rank x features: tiny), and the two LoRA matmuls run in that
dtype on the layer's own input, as torch's autocast would run them: the math of mixed
precision training. What autograd keeps per layer is the bf16 input (which the layers
around it keep anyway) and the rank-wide ``x @ A``.

The order of the two halves matters under non-reentrant checkpointing. The backward of a
checkpointed block first recomputes its forward, and torch stops that recomputation as soon
as every tensor the backward needs is back. bitsandbytes' 4-bit matmul keeps no tensor (its
backward needs only the frozen weight), so in the last linear of a block (``down_proj``
in Llama-like models) the LoRA half runs first: the recomputation then stops before that
layer's 4-bit matmul, whose output only fed the residual sum. That skips about a quarter of
a block's recomputed matmul work. Elsewhere the 4-bit matmul runs first and the LoRA
product is added by the same GEMM that computes it (``addmm``).

Anything this does not cover falls back to peft's own forward, per call: no gradients
(evaluation, generation: bitsandbytes' inference kernels are faster there), adapters
disabled or merged, several adapters, DoRA or another LoRA variant, dropout, float16.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

FAST_DTYPES = (torch.bfloat16, torch.float32)


def why_not(module: Any) -> str | None:
    """Why ``module`` (a peft LoRA layer) cannot take the fast path at all; None when it can."""
    if type(module).__name__ != "Linear4bit" or not hasattr(module, "lora_A"):
        return "not a 4-bit LoRA layer"
    if len(module.lora_A) != 1:
        return "several adapters"
    (name,) = module.lora_A.keys()
    if getattr(module, "lora_variant", {}).get(name) is not None or getattr(module, "use_dora", {}).get(name):
        return "DoRA or another LoRA variant"
    if not isinstance(module.lora_dropout[name], torch.nn.Identity):
        return "LoRA dropout"
    if module.base_layer.compute_dtype not in FAST_DTYPES:
        return f"compute dtype {module.base_layer.compute_dtype}"
    return None


def _fast_forward(module: Any, original: Any, *, lora_first: bool) -> Any:
    (name,) = module.lora_A.keys()
    lora_A, lora_B = module.lora_A[name].weight, module.lora_B[name].weight
    base = module.base_layer

    def forward(x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if (
            args
            or kwargs
            or not torch.is_grad_enabled()
            or module.disable_adapters
            or module.merged
            or module.active_adapters != [name]
            or x.dtype != base.compute_dtype
        ):
            return original(x, *args, **kwargs)
        a = lora_A.to(x.dtype)
        b = (lora_B * module.scaling[name]).to(x.dtype)
        if lora_first:
            lora = F.linear(F.linear(x, a), b)  # keeps x and x @ A: the last tensors the backward needs
            return base(x).add_(lora)  # bitsandbytes keeps nothing, so a recomputation stops before this
        out = base(x)
        xa = F.linear(x, a)
        flat = torch.addmm(out.reshape(-1, out.shape[-1]), xa.reshape(-1, xa.shape[-1]), b.t())
        return flat.view(out.shape)

    return forward


def enable(model: torch.nn.Module) -> tuple[int, dict[str, int]]:
    """Give every eligible 4-bit LoRA layer the fast forward; returns (fast, {reason: count} of the rest)."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    last = set()  # the last LoRA layer of each decoder block: its LoRA half runs first
    for block in model.modules():
        if isinstance(block, GradientCheckpointingLayer):
            layers = [m for m in block.modules() if hasattr(m, "lora_A")]
            if layers:
                last.add(id(layers[-1]))
    fast, skipped = 0, {}
    for module in model.modules():
        if not hasattr(module, "lora_A") or not hasattr(module, "base_layer"):
            continue
        reason = why_not(module)
        if reason is not None:
            skipped[reason] = skipped.get(reason, 0) + 1
            continue
        module.forward = _fast_forward(module, module.forward, lora_first=id(module) in last)
        fast += 1
    return fast, skipped
