"""The VRAM budget of one GPU when several share a run (``train.strategy`` ddp or fsdp).

Arithmetic on a single-GPU :class:`~qlora_engine.budget.estimate.VramEstimate`, nothing measured:

- **ddp**: every card holds the whole run, so each needs the single-GPU budget, plus DDP's
  gradient buckets (a second fp32 copy of the LoRA gradients, which DDP reduces in place).
- **fsdp**: the persistent state is sharded, ``1/N`` per card (the 4-bit weights stored in the
  compute dtype, their constants, the unquantized weights, the LoRA weights, gradients and
  optimizer state); a card also holds the layers it has gathered for the current forward or
  backward pass (the one computing and the one prefetched: two decoder layers of 4-bit weights);
  activations, logits and the CUDA context are per card as before.

Not yet calibrated on several real GPUs (its own issue); the notes say so.
"""

from __future__ import annotations

import dataclasses

from qlora_engine.budget.estimate import VramEstimate

COMPONENT_HELP = {
    "ddp_buckets": "DDP's gradient buckets: a second copy of the LoRA gradients, reduced across GPUs",
    "gathered_layers": "FSDP: the decoder layers gathered whole for the pass (the one computing, the next prefetched)",
}

SHARDED = (
    "quantized_weights",
    "quant_constants",
    "unquantized_weights",
    "lora_weights",
    "lora_grads",
    "optimizer_state",
)


def per_process(est: VramEstimate, strategy: str, world_size: int, num_layers: int | None = None) -> VramEstimate:
    """The budget of one of ``world_size`` GPUs running ``strategy`` (``est``: the whole run on one GPU).

    ``num_layers``: decoder layers of the model (sizes the gathered layers under FSDP; None:
    taken from the estimate's details, or 32).
    """
    if strategy == "single" or (strategy == "ddp" and world_size <= 1):
        return est
    parts = dict(est.components)
    notes = list(est.notes)
    if strategy == "ddp":
        parts["ddp_buckets"] = parts.get("lora_grads", 0)
        notes.append(f"data-parallel over {world_size} GPUs: each holds the whole run and DDP's gradient buckets")
    else:
        n = max(1, world_size)
        layers = num_layers or int(est.details.get("num_layers") or 32)
        packed = parts.get("quantized_weights", 0) + parts.get("quant_constants", 0)
        for name in SHARDED:
            if name in parts:
                parts[name] = -(-parts[name] // n)
        parts["gathered_layers"] = 2 * packed // max(layers, 1) if n > 1 else 0
        notes.append(
            f"sharded over {n} GPUs (FSDP): weights, LoRA and optimizer state 1/{n} per GPU, "
            "plus two gathered decoder layers; not yet measured on several GPUs"
        )
    delta = sum(parts.values()) - sum(est.components.values())
    return dataclasses.replace(
        est,
        components=parts,
        total=est.total + delta,
        low=est.low + delta,
        high=est.high + delta,
        fits=None if est.gpu_bytes is None else est.total + delta <= est.gpu_bytes,
        notes=notes,
        details={**est.details, "strategy": strategy, "world_size": world_size},
    )
