"""Plan, then train: a run's config made concrete for its data and card, once, before the trainer exists.

:func:`make_plan` takes the config as the user wrote it, the model's facts (its ``config.json``,
read without weights), the prepared data's statistics and the card the run will have, and
returns a :class:`RunPlan`: the config with every ``auto`` settled, each settlement a
:class:`~qlora_engine.decisions.Decision` with its reason, the step count, the budget's
prediction, and what to fall back to if a step still runs out of memory. The trainer takes
the plan and consults nothing else; the run's ``run_started`` event carries the decisions.

:func:`advise` is the same planning for the budget panel and ``qlora-engine estimate``: the
estimate and the fit of the config that would run on a given card.

Layering (checked by import-linter): the budget (``qlora_engine.budget``) is pure arithmetic on
a config whose ``auto`` is settled and never imports this module; this module decides with it;
the trainer (``qlora_engine.train``) imports neither.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from qlora_engine.budget.estimate import (
    GiB,
    VramEstimate,
    estimate_from_spec,
    every_layer,
    fewest_checkpointed,
    reached_layers,
    resolve_spec,
    with_checkpointing,
)
from qlora_engine.budget.fit import FitAdvice, fit
from qlora_engine.budget.kernels import resolve_kernels
from qlora_engine.budget.spec import ModelSpec
from qlora_engine.config import TrainConfig, validate
from qlora_engine.decisions import Decision, RunPlan


def choose_checkpointing(
    cfg: TrainConfig,
    spec: ModelSpec,
    gpu_bytes: int | None,
    *,
    data_stats: dict[str, Any] | None = None,
    liger_installed: bool | None = None,
) -> tuple[TrainConfig, Decision | None]:
    """``train.gradient_checkpointing: auto`` made concrete for a card of ``gpu_bytes``.

    The fewest checkpointed layers whose estimate, upper bound included, fits the card: none
    when the whole run fits (the fastest step), every layer when nothing fits or the card is
    unknown (the least memory). A config that is not 'auto' comes back unchanged, with no decision.
    """
    if cfg.train.gradient_checkpointing != "auto":
        return cfg, None
    n = reached_layers(cfg, spec) if spec.usable else 0

    def decided(k: int | None, reason: str) -> tuple[TrainConfig, Decision]:
        every = k is None or (n and k >= n)
        chosen = every_layer(cfg) if every else with_checkpointing(cfg, k, n)
        if every:
            summary = "every layer checkpointed"
        elif k == 0:
            summary = "off"
        else:
            summary = f"the lowest {k} of {n} layers checkpointed"
        count = n if every and n else k
        return chosen, Decision("train.gradient_checkpointing", "auto", count, reason, summary)

    if not spec.usable:
        return decided(None, "the VRAM budget cannot model this model")
    if not gpu_bytes or not n:
        return decided(None, "no GPU to size the run for")

    def ok(variant: TrainConfig) -> bool:
        est = estimate_from_spec(variant, spec, gpu_bytes=gpu_bytes, data_stats=data_stats, liger_installed=liger_installed)
        return est.high <= gpu_bytes

    k = fewest_checkpointed(cfg, spec, ok)
    size = f"{gpu_bytes / GiB:.1f} GiB"
    if k is None:
        return decided(None, f"even so it may not fit {size}")
    if k == 0:
        return decided(0, f"the run fits {size} without it")
    return decided(k, f"the fewest that fit {size}")


@dataclass(frozen=True)
class Advice:
    """What the budget says of a config on a card: the estimate of what would run, its fit, the decisions."""

    estimate: VramEstimate
    fit: FitAdvice | None
    decisions: list[Decision] = field(default_factory=list)
    config: TrainConfig | None = None
    """The config that would run (``auto`` settled)."""

    def decision(self, field_path: str) -> Decision | None:
        return next((d for d in self.decisions if d.field == field_path), None)


def advise(
    cfg: TrainConfig,
    model_config: Any = None,
    *,
    gpu_bytes: int | None = None,
    data_stats: dict[str, Any] | None = None,
    gpu_name: str | None = None,
    spec: ModelSpec | None = None,
    cuda: bool = True,
) -> Advice:
    """The estimate and fit of ``cfg`` as it would run on a card of ``gpu_bytes`` (``auto`` settled).

    ``cuda=False``: the run is on the CPU (no card, no CUDA context counted). A card that is not
    this machine's (planning a run for another box) is just its ``gpu_bytes``.

    Raises:
        ConfigError: a config value is invalid, or the LoRA targets/layers do not exist.
        ModelError: the model reference cannot be read.
    """
    validate(cfg)
    if spec is None:
        spec = resolve_spec(cfg, model_config)
    resolved, decision = choose_checkpointing(cfg, spec, gpu_bytes, data_stats=data_stats)
    est = estimate_from_spec(
        resolved, spec, gpu_bytes=gpu_bytes, gpu_name=gpu_name, data_stats=data_stats, cuda=cuda or bool(gpu_bytes)
    )
    if decision is not None:
        est.details["checkpointing_auto"] = True
        est.notes.insert(0, str(decision))
    advice = None
    if gpu_bytes:
        advice = fit(resolved, gpu_bytes, spec, data_stats=data_stats, auto=decision is not None)
    return Advice(est, advice, [decision] if decision else [], resolved)


def total_steps(cfg: TrainConfig, n_train: int) -> int:
    """Optimizer steps of a run: ``train.max_steps``, or the epochs over ``n_train`` samples."""
    if cfg.train.max_steps is not None:
        return cfg.train.max_steps
    per_step = cfg.train.micro_batch_size * cfg.train.gradient_accumulation_steps
    return max(1, math.ceil(cfg.train.epochs * n_train / per_step))


def make_plan(
    cfg: TrainConfig,
    *,
    n_train: int,
    data_stats: dict[str, Any] | None,
    cuda: bool,
    card_bytes: int | None,
    model_config: Any = None,
) -> RunPlan:
    """Plan one run (see the module docstring).

    Args:
        cfg: the validated config as the user wrote it.
        n_train: training samples after preparation.
        data_stats: the data report's ``token_stats`` (sizes the estimate for the real lengths).
        cuda: whether the run is on a CUDA card.
        card_bytes: the GPU memory this process can have (None on the CPU: every layer checkpointed).
        model_config: the model's ``config.json`` as a dict or ``PretrainedConfig`` (None: read
            from ``cfg.model.ref``).
    """
    decisions: list[Decision] = []
    try:
        spec: ModelSpec | None = resolve_spec(cfg, model_config)
    except Exception as e:  # the budget is advice: a model it cannot read never fails the run
        spec, why = None, f"the VRAM budget cannot read the model ({e})"
    else:
        why = "the VRAM budget cannot model this model"
    config, oom_fallback = cfg, None
    if cfg.train.gradient_checkpointing == "auto":
        if spec is not None and spec.usable:
            config, decision = choose_checkpointing(cfg, spec, card_bytes, data_stats=data_stats)
        else:
            config = every_layer(cfg)
            decision = Decision("train.gradient_checkpointing", "auto", None, why, "every layer checkpointed")
        if decision is not None:
            decisions.append(decision)
        tr = config.train
        if not (tr.gradient_checkpointing and tr.checkpoint_layers is None):
            oom_fallback = every_layer(config)
    if cfg.train.kernels == "auto" and spec is not None:
        kernels = resolve_kernels("auto", spec.model_type, cuda=cuda)
        decisions.append(Decision("train.kernels", "auto", kernels.kernels, kernels.reason, kernels.kernels))
    estimate = None
    if spec is not None and spec.usable:
        try:
            estimate = estimate_from_spec(config, spec, data_stats=data_stats).to_dict()
        except Exception:  # advice only
            estimate = None
    return RunPlan(
        requested=cfg,
        config=config,
        total_steps=total_steps(cfg, n_train),
        decisions=tuple(decisions),
        oom_fallback=oom_fallback,
        vram_estimate=estimate,
    )
