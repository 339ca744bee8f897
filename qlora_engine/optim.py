"""Optimizers (bitsandbytes' 8-bit and paged variants, torch AdamW) and learning-rate schedules.

One flat buffer (``FLAT``, on by default). bitsandbytes' optimizers update one tensor per
launch from a Python loop and synchronize the device after each (``sync_gpu``): with LoRA on
every linear layer of an 8B model that is 448 launches and 448 waits a step, the GPU idle in
between (bench/NOTES.md, session 4). So every trainable tensor becomes a view of one flat fp32
buffer, and its gradient a view of a second one; the optimizer sees one parameter per group
and updates all of them in one launch. Each tensor starts at a multiple of 256 elements (the
8-bit optimizers' quantization block): every block of the flat buffer belongs to one tensor
(the padding is zero and stays zero), so the 8-bit update is the same arithmetic as
tensor by tensor. Tensors under bitsandbytes' ``min_8bit_size`` keep 32-bit state there, so
they get a flat buffer of their own held at 32 bits.

The gradients are views that live as long as the run: autograd adds into them in place,
``zero_grad`` clears the flat gradient buffer with one kernel instead of dropping them.
Checkpoints hold the optimizer state of the flat parameters; a checkpoint written tensor by
tensor (before this change) still loads (:meth:`FlatOptimizerMixin.load_state_dict`).
"""

from __future__ import annotations

import math
from typing import Any

import torch

from qlora_engine.config_sections import OptimConfig

FLAT = True
"""Whether :func:`build_optimizer` gives the optimizer one flat buffer (a switch for benchmarks and tests)."""

ALIGN = 256  # bitsandbytes' 8-bit optimizer block (Optimizer2State.init_state): flat tensors start on one
MIN_8BIT_SIZE = 4096  # bitsandbytes' default min_8bit_size: smaller tensors keep 32-bit state


def _classes() -> dict[str, Any]:
    # lazy: bitsandbytes costs seconds to import; the app imports this module (through train) for resume_blockers
    import bitsandbytes as bnb

    return {
        "paged_adamw_8bit": bnb.optim.PagedAdamW8bit,
        "paged_adamw_32bit": bnb.optim.PagedAdamW32bit,
        "adamw_8bit": bnb.optim.AdamW8bit,
        "adamw_32bit": bnb.optim.AdamW32bit,
    }


def build_optimizer(cfg: OptimConfig, params: list[torch.nn.Parameter], *, flat: bool = True) -> torch.optim.Optimizer:
    """The configured optimizer over ``params``; one flat buffer (:data:`FLAT`) unless ``flat`` is False
    (DDP and FSDP own the parameters' storage and gradients: their views cannot be re-pointed)."""
    kw = {
        "lr": cfg.learning_rate,
        "betas": (cfg.adam_beta1, cfg.adam_beta2),
        "eps": cfg.adam_epsilon,
        "weight_decay": cfg.weight_decay,
    }
    name = cfg.optimizer
    if name.startswith("paged_") and params and params[0].device.type != "cuda":
        # Paging moves optimizer state between GPU and CPU memory; on the CPU there is nothing to
        # page, and bitsandbytes would fall back with a warning. Build the plain one directly.
        name = name.removeprefix("paged_")
    cls = torch.optim.AdamW if name == "adamw" else _classes()[name]
    if not (FLAT and flat) or not params:
        return _own_overrides(cls(params, **kw))
    groups = flatten(params, eight_bit=name.endswith("8bit"))
    flat_cls = type(f"Flat{cls.__name__}", (FlatOptimizerMixin, cls), {})
    opt = _own_overrides(flat_cls([g.flat for g in groups], **kw))
    opt.flat_groups = groups
    opt._given_order = list(params)
    if cfg.optimizer.endswith("8bit"):
        for g in groups:  # what bitsandbytes would have chosen for each small tensor on its own
            if not g.eight_bit:
                opt.mng.pid2config[id(g.flat)] = {"optim_bits": 32}
    return opt


def _own_overrides(opt: torch.optim.Optimizer) -> torch.optim.Optimizer:
    """A bitsandbytes optimizer with its own override table instead of the process-wide one.

    bitsandbytes keeps per-parameter settings in one global manager keyed by ``id(tensor)`` and by
    position (group, index), never cleared: an override written for an optimizer that is gone (ours
    for a small flat group, or transformers' 32-bit embeddings) applied to whichever tensor later got
    that id or position, giving it 32-bit state in an 8-bit optimizer."""
    if hasattr(opt, "mng"):
        from bitsandbytes.optim import GlobalOptimManager  # lazy: bitsandbytes costs seconds to import

        opt.mng = GlobalOptimManager.__new__(GlobalOptimManager)  # its __init__ refuses: it is meant as a singleton
        opt.mng.initialize()
    return opt


class FlatGroup:
    """Trainable tensors as views of one flat fp32 parameter (``flat``), their gradients views of ``flat.grad``."""

    def __init__(self, params: list[torch.nn.Parameter], eight_bit: bool) -> None:
        self.params = params
        self.eight_bit = eight_bit
        self.offsets, end = [], 0
        for p in params:
            self.offsets.append(end)
            end += -(-p.numel() // ALIGN) * ALIGN
        first = params[0]
        data = torch.zeros(end, dtype=first.dtype, device=first.device)
        for p, o in zip(params, self.offsets, strict=True):
            data[o : o + p.numel()].copy_(p.detach().reshape(-1))
            p.data = data[o : o + p.numel()].view_as(p)  # the tensor's own storage is freed here
        if first.device.type == "cuda":
            # The freed tensors would stay in torch's cache: at r=2048 on the 1B shape that kept 4 GiB
            # reserved for the whole run (bench/NOTES.md, session 7). Give them back before the gradients.
            torch.cuda.empty_cache()
        grad = torch.zeros(end, dtype=first.dtype, device=first.device)
        self.flat = torch.nn.Parameter(data)
        self.flat.grad = grad
        for p, o in zip(params, self.offsets, strict=True):
            p.grad = grad[o : o + p.numel()].view_as(p)

    def relink(self) -> None:
        """Point the tensors' gradients at the flat gradient buffer again (after someone set them to None)."""
        grad = self.flat.grad
        if grad is None:
            grad = self.flat.grad = torch.zeros_like(self.flat)
        for p, o in zip(self.params, self.offsets, strict=True):
            if p.grad is None or p.grad.data_ptr() != grad[o:].data_ptr():
                if p.grad is not None:  # a gradient autograd made on its own: keep its values
                    grad[o : o + p.numel()].copy_(p.grad.reshape(-1))
                p.grad = grad[o : o + p.numel()].view_as(p)


def flatten(params: list[torch.nn.Parameter], *, eight_bit: bool) -> list[FlatGroup]:
    """The flat groups of ``params``: one per (device, dtype), the small tensors of an 8-bit optimizer apart."""
    keyed: dict[tuple, list[torch.nn.Parameter]] = {}
    for p in params:
        big = not eight_bit or p.numel() >= MIN_8BIT_SIZE
        keyed.setdefault((str(p.device), p.dtype, big), []).append(p)
    return [FlatGroup(ps, eight_bit and big) for (_, _, big), ps in keyed.items()]


class FlatOptimizerMixin:
    """Mixed in before an optimizer class built on :class:`FlatGroup` parameters."""

    flat_groups: list[FlatGroup]

    def zero_grad(self, set_to_none: bool = True) -> None:  # noqa: ARG002 - the views must stay
        for g in self.flat_groups:
            g.relink()
            g.flat.grad.zero_()

    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:
        for g in self.flat_groups:
            g.relink()
        return super().step(closure)

    def state_dict(self) -> dict[str, Any]:
        """The state laid out tensor by tensor, as a per-tensor optimizer writes it: a checkpoint
        stays one layout whoever wrote it (one process with the flat buffer, or DDP/FSDP without)."""
        flat = super().state_dict()
        (group, *_rest) = flat["param_groups"]
        index = {id(p): i for i, p in enumerate(p for g in self.param_groups for p in g["params"])}
        order = {id(p): i for i, p in enumerate(self._given_order)}
        state: dict[int, Any] = {}
        for g in self.flat_groups:
            whole = flat["state"].get(index[id(g.flat)])
            if not whole:
                continue
            for p, o in zip(g.params, g.offsets, strict=True):
                state[order[id(p)]] = _split(whole, g, p, o)
        new_group = {k: v for k, v in group.items() if k != "params"}
        return {"state": state, "param_groups": [{**new_group, "params": list(range(len(self._given_order)))}]}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a flat state, or one written tensor by tensor (one group, a state per tensor)."""
        groups = state_dict["param_groups"]
        n_params = sum(len(g.params) for g in self.flat_groups)
        if len(groups) == 1 and len(groups[0]["params"]) == n_params and n_params != len(self.flat_groups):
            state_dict = self._from_per_tensor(state_dict)
        super().load_state_dict(state_dict)

    def _from_per_tensor(self, state_dict: dict[str, Any]) -> dict[str, Any]:
        (group,) = state_dict["param_groups"]
        ids = group["params"]
        index = {id(p): i for i, p in enumerate(p for g in self.param_groups for p in g["params"])}
        order = self._given_order  # the tensors in the order they were given, as the per-tensor state lists them
        per = {id(p): state_dict["state"].get(pid) for p, pid in zip(order, ids, strict=True)}
        state: dict[int, Any] = {}
        for g in self.flat_groups:
            states = [per[id(p)] for p in g.params]
            if not any(states):
                continue
            state[index[id(g.flat)]] = _merge(states, g)
        new_group = {k: v for k, v in group.items() if k != "params"}
        return {
            "state": state,
            "param_groups": [{**new_group, "params": [index[id(g.flat)] for g in self.flat_groups]}],
        }


def _merge(states: list[dict[str, Any]], g: FlatGroup) -> dict[str, Any]:
    """One flat state from the states of ``g``'s tensors (bitsandbytes nests its tensors one dict down)."""
    merged: dict[str, Any] = {}
    for key, first in states[0].items():
        vals = [s[key] for s in states]
        if isinstance(first, dict):
            merged[key] = _merge(vals, g)
        elif torch.is_tensor(first) and first.dim() >= 1 and not key.startswith("qmap"):
            # an 8-bit state's padding holds the code its kernel writes for 0.0, as a flat optimizer's own would
            pad = zero_codes(g.flat.device).get(key, 0) if first.dtype == torch.uint8 else 0
            merged[key] = _concat(vals, g, pad)
        else:  # the step count, the 8-bit code maps: the same for every tensor
            merged[key] = first
    return merged


def _split(whole: dict[str, Any], g: FlatGroup, p: torch.nn.Parameter, o: int) -> dict[str, Any]:
    """Tensor ``p``'s part (at offset ``o``) of a flat state: the inverse of :func:`_merge`."""
    part: dict[str, Any] = {}
    for key, value in whole.items():
        if isinstance(value, dict):
            part[key] = _split(value, g, p, o)
        elif torch.is_tensor(value) and value.dim() >= 1 and not key.startswith("qmap"):
            if value.numel() == g.flat.numel():  # one entry per element
                part[key] = value[o : o + p.numel()].clone().view_as(p)
            else:  # one entry per 256-element block (blockwise absmax)
                part[key] = value[o // ALIGN : o // ALIGN + -(-p.numel() // ALIGN)].clone()
        elif torch.is_tensor(value):  # torch's step count is a tensor it adds to in place: one per tensor
            part[key] = value.clone()
        else:
            part[key] = value
    return part


def zero_codes(device: torch.device) -> dict[str, int]:
    """The codes bitsandbytes' 8-bit AdamW writes into ``state1``/``state2`` for elements whose state is 0.0
    (they differ between its CPU and CUDA kernels), read off one update of a 512-element tensor."""
    # lazy: bitsandbytes costs seconds to import; the app imports this module (through train) for resume_blockers
    import bitsandbytes as bnb

    p = torch.nn.Parameter(torch.zeros(512, device=device))
    p.grad = torch.zeros_like(p)
    p.grad[0] = 1.0  # a block with a non-zero maximum; element 1 stays zero
    opt = bnb.optim.AdamW8bit([p], min_8bit_size=1)
    opt.step()
    st = opt.state[p]
    return {"state1": int(st["state1"][1]), "state2": int(st["state2"][1])}


def _concat(vals: list[torch.Tensor], g: FlatGroup, pad: int = 0) -> torch.Tensor:
    """Per-tensor state ``vals`` laid out like ``g``'s flat buffer (elements, or one entry per 256-element block)."""
    total = g.flat.numel()
    if all(v.numel() == p.numel() for v, p in zip(vals, g.params, strict=True)):
        out = torch.full((total,), pad, dtype=vals[0].dtype, device=g.flat.device)
        for v, o in zip(vals, g.offsets, strict=True):
            out[o : o + v.numel()].copy_(v.reshape(-1))
        return out
    out = torch.zeros(total // ALIGN, dtype=vals[0].dtype, device=g.flat.device)  # blockwise absmax
    for v, o in zip(vals, g.offsets, strict=True):
        out[o // ALIGN : o // ALIGN + v.numel()].copy_(v.reshape(-1))
    return out


def lr_factor(kind: str, step: int, warmup: int, total: int) -> float:
    """Multiplier of the peak learning rate at optimizer step ``step`` (0-based)."""
    if warmup > 0 and step < warmup:
        return (step + 1) / (warmup + 1)
    if kind == "constant":
        return 1.0
    span = max(1, total - warmup)
    progress = min(1.0, (step - warmup) / span)
    return max(0.0, 1.0 - progress) if kind == "linear" else 0.5 * (1.0 + math.cos(math.pi * progress))


def warmup_for(warmup_steps: int, total_steps: int) -> tuple[int, str | None]:
    """The warmup a run of ``total_steps`` uses, and a note for the user when it differs from the config.

    A warmup longer than half the run (the default 10 steps in an 8-step run, say) would spend
    the run ramping up: it is scaled to a tenth of the run (at least one step), and the note
    names the field so the user can set it.
    """
    if warmup_steps <= 0 or warmup_steps * 2 <= total_steps:
        return max(warmup_steps, 0), None
    scaled = max(1, round(total_steps / 10))
    note = (
        f"optim.warmup_steps: {warmup_steps} warmup steps would take up {'all' if warmup_steps >= total_steps else 'most'} "
        f"of this {total_steps}-step run; warming up for {scaled} step{'s' if scaled != 1 else ''} (a tenth of it) "
        f"instead. Set optim.warmup_steps to at most {total_steps // 2} to choose yourself."
    )
    return scaled, note


def build_scheduler(cfg: OptimConfig, optimizer: torch.optim.Optimizer, total_steps: int):
    """The learning-rate schedule (see :func:`warmup_for` for the warmup it uses)."""
    kind, (warmup, _) = cfg.scheduler, warmup_for(cfg.warmup_steps, total_steps)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(kind, s, warmup, total_steps))


# -- paged optimizer state ---------------------------------------------------------------------


def paged_state_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Bytes of the optimizer's state in CUDA managed memory (bitsandbytes' paged buffers)."""
    return sum(
        v.numel() * v.element_size()
        for state in optimizer.state.values()
        for v in state.values()
        if torch.is_tensor(v) and getattr(v, "is_paged", False)
    )


def device_outside_torch(device: torch.device) -> int:
    """Bytes of the GPU in use but not by torch's allocator: the CUDA context, other processes,
    kernels' code, and this process's managed memory resident on the device."""
    free, total = torch.cuda.mem_get_info(device)
    return total - free - torch.cuda.memory_reserved(device)


def paged_out_bytes(optimizer: torch.optim.Optimizer, device: torch.device, outside_before: int) -> int | None:
    """How much paged optimizer state is in CPU RAM now, at least; None without paged state.

    CUDA tells no page's place, but a resident page takes device memory that torch did not
    reserve: the state's resident part is what the GPU's use outside torch grew by since
    ``outside_before`` (:func:`device_outside_torch` before the state existed), the rest is paged
    out. Kernels loaded since then count as resident state, so the figure is a lower bound.
    """
    if device.type != "cuda":
        return None
    paged = paged_state_bytes(optimizer)
    if not paged:
        return None
    resident = device_outside_torch(device) - outside_before
    return min(paged, max(0, paged - resident))
