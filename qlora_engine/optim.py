"""Optimizers (bitsandbytes' 8-bit and paged variants, torch AdamW) and learning-rate schedules."""

from __future__ import annotations

import math

import torch

from qlora_engine.config import OptimConfig


def build_optimizer(cfg: OptimConfig, params: list[torch.nn.Parameter]) -> torch.optim.Optimizer:
    kw = {
        "lr": cfg.learning_rate,
        "betas": (cfg.adam_beta1, cfg.adam_beta2),
        "eps": cfg.adam_epsilon,
        "weight_decay": cfg.weight_decay,
    }
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(params, **kw)
    import bitsandbytes as bnb

    name = cfg.optimizer
    if name.startswith("paged_") and params and params[0].device.type != "cuda":
        # Paging moves optimizer state between GPU and CPU memory; on the CPU there is nothing to
        # page, and bitsandbytes would fall back with a warning. Build the plain one directly.
        name = {"paged_adamw_8bit": "adamw_8bit", "paged_adamw_32bit": "adamw_32bit"}[name]
    cls = {
        "paged_adamw_8bit": bnb.optim.PagedAdamW8bit,
        "paged_adamw_32bit": bnb.optim.PagedAdamW32bit,
        "adamw_8bit": bnb.optim.AdamW8bit,
        "adamw_32bit": bnb.optim.AdamW32bit,
    }[name]
    return cls(params, **kw)


def lr_factor(kind: str, step: int, warmup: int, total: int) -> float:
    """Multiplier of the peak learning rate at optimizer step ``step`` (0-based)."""
    if warmup > 0 and step < warmup:
        return (step + 1) / (warmup + 1)
    if kind == "constant":
        return 1.0
    span = max(1, total - warmup)
    progress = min(1.0, (step - warmup) / span)
    if kind == "linear":
        return max(0.0, 1.0 - progress)
    return 0.5 * (1.0 + math.cos(math.pi * progress))


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
