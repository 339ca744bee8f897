"""GPU memory around a run: what this process can have, and what to change after running out
(the failure's fixes and hint)."""

from __future__ import annotations

from typing import Any

import torch

from qlora_engine import budget
from qlora_engine.budget.allocator import CALIBRATION
from qlora_engine.config import TrainConfig
from qlora_engine.data import PreparedData


def available_host_ram() -> int:
    """The CPU RAM the operating system can give now without swapping (psutil's ``available``)."""
    import psutil  # lazy: only a run's plan asks

    return int(psutil.virtual_memory().available)


def usable_vram(device: torch.device) -> int | None:
    """The GPU memory this process can have: what is free now and what it holds, within any cap
    set by ``torch.cuda.set_per_process_memory_fraction``, plus its CUDA context (which the budget
    counts and ``mem_get_info`` already took off); None on the CPU."""
    if device.type != "cuda":
        return None

    index = torch.cuda.current_device() if device.index is None else device.index
    free, total = torch.cuda.mem_get_info(index)
    usable = free + torch.cuda.memory_reserved(index)
    fraction = getattr(torch.cuda, "get_per_process_memory_fraction", None)  # a cap set on this process
    if fraction is not None:
        usable = min(usable, int(fraction(index) * total))
    return int(usable + CALIBRATION["cuda_context"])


def oom_fixes(cfg: TrainConfig, data: PreparedData | None, card_bytes: int | None) -> list[dict[str, Any]]:
    """Single changes that the budget says would make this run fit (least quality lost first).

    If the estimate exceeds the card, fit the card. If it does not (the estimate was wrong:
    it is an estimate), ask for a quarter less of the memory the run itself needs, beyond
    the fixed CUDA context.
    """
    try:
        stats = data.token_stats if data is not None else None
        est = budget.estimate(cfg, data_stats=stats)
        fixed = est.components.get("cuda_context", 0)
        target = card_bytes if card_bytes and est.total > card_bytes else int(fixed + 0.75 * (est.total - fixed))
        return [s.to_dict() for s in budget.fit(cfg, target, data_stats=stats).suggestions]
    except Exception:
        return []


def oom_hint(cfg: TrainConfig) -> str:
    tips = []
    if not cfg.train.gradient_checkpointing:
        tips.append("turn on train.gradient_checkpointing")
    if cfg.train.micro_batch_size > 1:
        tips.append(f"lower train.micro_batch_size (now {cfg.train.micro_batch_size}) and raise gradient_accumulation_steps")
    tips.append(f"shorten data.max_length (now {cfg.data.max_length})")
    if not cfg.optim.optimizer.startswith("paged"):
        tips.append("use optim.optimizer=paged_adamw_8bit")
    return "Out of GPU memory. To fit: " + "; or ".join(tips) + ". Then resume from the last checkpoint."
