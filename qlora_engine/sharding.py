"""Sharded QLoRA with PyTorch's FSDP2 (``fully_shard``): for models that do not fit one card.

Each decoder layer is one FSDP unit, the model the root: between uses, a card keeps ``1/N`` of
every weight (the packed 4-bit ones, stored in the compute dtype through
``bnb_4bit_quant_storage`` so that a unit's tensors share one dtype), of the LoRA weights, their
gradients and the optimizer state; a layer is gathered whole for its forward and backward and
freed after. The bitsandbytes quantization constants are not parameters: every card keeps its
own copy on the module (``Linear4bit.quant_state``), which bitsandbytes puts back on the gathered
weight (``fix_4bit_weight_quant_state_from_module``).

Checkpoints hold the adapter and the optimizer state whole, in the same layout as one process
writes (gathered to rank 0 through ``torch.distributed.checkpoint.state_dict``), so a sharded
run resumes on any number of cards, with or without sharding.
"""

from __future__ import annotations

from typing import Any

import torch
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict, set_optimizer_state_dict
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor


def shard_model(model: torch.nn.Module, layers: list[torch.nn.Module]) -> torch.nn.Module:
    """Shard ``model`` in place over the default process group: each of ``layers`` a unit, then the rest."""
    for layer in layers:
        fully_shard(layer, reshard_after_forward=True)
    fully_shard(model, reshard_after_forward=True)
    return model


def _options(**kw: Any) -> Any:
    return StateDictOptions(full_state_dict=True, cpu_offload=True, **kw)


def full_adapter_state(model: torch.nn.Module, is_main: bool) -> dict[str, torch.Tensor]:
    """The LoRA weights, whole, on rank 0 (empty elsewhere): every process must call it."""
    out = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        t = p.full_tensor() if isinstance(p, DTensor) else p  # a collective: every process runs it
        if is_main:
            out[name] = t.detach().cpu()
    return out


def full_optimizer_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """The optimizer state whole, in ``optimizer.state_dict()``'s own layout (parameter numbers, not names).

    That is the layout one process and DDP write, so the checkpoint resumes with any strategy.
    """
    named = get_optimizer_state_dict(model, optimizer, options=_options())
    if "param_groups" not in named:  # ranks other than 0 receive nothing (cpu_offload gathers to rank 0)
        return {}
    order = [fqn for group in named["param_groups"] for fqn in group["params"]]
    index = {fqn: i for i, fqn in enumerate(order)}
    groups, start = [], 0
    for group in named["param_groups"]:
        n = len(group["params"])
        groups.append({**group, "params": list(range(start, start + n))})
        start += n
    return {"state": {index[k]: v for k, v in named["state"].items()}, "param_groups": groups}


def load_full_optimizer_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer, state: dict[str, Any]) -> None:
    """Load a whole optimizer state (any strategy wrote it) into a sharded optimizer."""
    # The optimizer was built on the trainable parameters in this order (qlora_engine.train).
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    groups, start = [], 0
    for group in state["param_groups"]:
        n = len(group["params"])
        groups.append({**group, "params": names[start : start + n]})
        start += n
    named = {"state": {names[int(k)]: v for k, v in state["state"].items()}, "param_groups": groups}
    set_optimizer_state_dict(model, optimizer, named, options=_options(broadcast_from_rank0=False))
