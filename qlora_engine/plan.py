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
from dataclasses import dataclass, field, replace
from typing import Any

from qlora_engine.budget.estimate import (
    GiB,
    VramEstimate,
    estimate_from_spec,
    every_layer,
    fewest_checkpointed,
    reached_layers,
    resolve_spec,
    variant,
    with_checkpointing,
)
from qlora_engine.budget.fit import FitAdvice, fit
from qlora_engine.budget.formulas import fast_lora_applies
from qlora_engine.budget.kernels import resolve_kernels
from qlora_engine.budget.parallel import per_process
from qlora_engine.budget.spec import ModelSpec
from qlora_engine.budget.units import format_bytes
from qlora_engine.config import TrainConfig, validate
from qlora_engine.decisions import Decision, RunPlan
from qlora_engine.errors import ConfigError


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


def choose_dequantized(
    cfg: TrainConfig,
    spec: ModelSpec,
    gpu_bytes: int | None,
    *,
    strategy: str = "single",
    world_size: int = 1,
    data_stats: dict[str, Any] | None = None,
) -> tuple[TrainConfig, Decision | None]:
    """``train.keep_dequantized: auto`` made concrete for a card of ``gpu_bytes`` (checkpointing settled first;
    ``strategy`` and ``world_size``: how the run shares its GPUs, so DDP's gradient buckets are counted).

    On when no layer is checkpointed and the estimate with the dequantized weights, upper bound
    included, still fits the card: checkpointing fewer layers saves far more time per byte than
    dequantizing nothing, so the weights never take memory that a checkpointed layer could have.
    A config that is not 'auto' comes back unchanged, with no decision.
    """
    if cfg.train.keep_dequantized != "auto":
        return cfg, None

    def decided(on: bool, reason: str) -> tuple[TrainConfig, Decision]:
        chosen = variant(cfg, train__keep_dequantized=on)
        return chosen, Decision("train.keep_dequantized", "auto", on, reason, "on" if on else "off")

    tr = cfg.train
    if not gpu_bytes or not spec.usable:
        return decided(False, "no GPU to size the run for" if not gpu_bytes else "the VRAM budget cannot model this model")
    if not fast_lora_applies(tr.fast_lora, cfg.quant.compute_dtype, cfg.lora.dropout, cfg.lora.use_dora):
        return decided(False, "only train.fast_lora's path keeps them")
    if strategy == "fsdp":
        return decided(False, "FSDP shards the 4-bit weights")
    if tr.gradient_checkpointing:
        return decided(False, "the run checkpoints layers; the memory goes to those first")
    on = variant(cfg, train__keep_dequantized=True)
    est = estimate_from_spec(on, spec, gpu_bytes=gpu_bytes, data_stats=data_stats)
    need = per_process(est, strategy, world_size, spec.num_layers).high
    size = f"{gpu_bytes / GiB:.1f} GiB"
    if need > gpu_bytes:
        return decided(False, f"with them the run may not fit {size}: {format_bytes(need)} at most")
    return decided(True, f"the run fits {size} with them: {format_bytes(need)} at most")


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
    world_size: int = 1,
    cuda: bool = True,
) -> Advice:
    """The estimate and fit of ``cfg`` as it would run on a card of ``gpu_bytes`` (``auto`` settled).

    ``world_size``: GPUs sharing the run; the estimate is then one GPU's, for the strategy the
    run would take (``train.strategy``), and the fit advice is the single-GPU one.
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
    strategy, chosen = choose_strategy(cfg, world_size, spec, gpu_bytes, data_stats) if world_size > 1 else ("single", None)
    resolved, dense = choose_dequantized(
        resolved, spec, gpu_bytes, strategy=strategy, world_size=world_size, data_stats=data_stats
    )
    est = estimate_from_spec(
        resolved, spec, gpu_bytes=gpu_bytes, gpu_name=gpu_name, data_stats=data_stats, cuda=cuda or bool(gpu_bytes)
    )
    if dense is not None:
        est.notes.insert(0, str(dense))
    if decision is not None:
        est.details["checkpointing_auto"] = True
        est.notes.insert(0, str(decision))
    decisions = [d for d in (decision, dense) if d]
    if world_size > 1:
        est = per_process(est, strategy, world_size, spec.num_layers if spec.usable else None)
        decisions += [chosen] if chosen else []
    advice = None
    if gpu_bytes:
        advice = fit(resolved, gpu_bytes, spec, data_stats=data_stats, auto=decision is not None)
    return Advice(est, advice, decisions, resolved)


def total_steps(cfg: TrainConfig, n_train: int) -> int:
    """Optimizer steps of a run: ``train.max_steps``, or the epochs over ``n_train`` samples."""
    if cfg.train.max_steps is not None:
        return cfg.train.max_steps
    per_step = cfg.train.micro_batch_size * cfg.train.gradient_accumulation_steps
    return max(1, math.ceil(cfg.train.epochs * n_train / per_step))


def choose_strategy(
    cfg: TrainConfig, world_size: int, spec: ModelSpec | None, card_bytes: int | None, data_stats: dict[str, Any] | None
) -> tuple[str, Decision | None]:
    """``train.strategy`` made concrete for ``world_size`` processes on cards of ``card_bytes``.

    auto: one process runs alone; several share the batch (DDP) when the whole 4-bit model and
    its training state fit each card with every layer checkpointed, and shard the model (FSDP)
    when not. Raises ConfigError for 'single' with several processes.
    """
    asked = cfg.train.strategy
    if asked == "single" and world_size > 1:
        raise ConfigError(
            f"'single' runs one process, but {world_size} were started.",
            field="train.strategy",
            fix="Set train.strategy to auto, ddp or fsdp, or start one process.",
        )
    if asked != "auto":
        return asked, None
    if world_size == 1:
        return "single", Decision("train.strategy", "auto", "single", "nothing to share", "one process")
    if spec is None or not spec.usable or not card_bytes:
        return "ddp", Decision(
            "train.strategy", "auto", "ddp", "no GPU size to judge the model by", f"data-parallel over {world_size}"
        )
    least = estimate_from_spec(every_layer(cfg), spec, gpu_bytes=card_bytes, data_stats=data_stats)
    need, size = f"{least.high / GiB:.1f} GiB", f"{card_bytes / GiB:.1f} GiB"
    if least.high <= card_bytes:
        return "ddp", Decision(
            "train.strategy", "auto", "ddp", f"the whole run fits each card ({need} of {size})",
            f"data-parallel over {world_size} GPUs",
        )
    return "fsdp", Decision(
        "train.strategy", "auto", "fsdp", f"one card cannot hold the run ({need} > {size})",
        f"sharded over {world_size} GPUs",
    )


def split_batch(cfg: TrainConfig, world_size: int) -> tuple[TrainConfig, Decision | None]:
    """Share each step's micro-batches among ``world_size`` processes, the step's batch unchanged.

    DDP needs at least one micro-batch per process; FSDP the same number on every process (each
    forward is a collective). When the config's split does not allow it, the step's samples are
    cut into more, smaller micro-batches: the fewest that work (the data order does not change:
    micro-batch ``k`` is samples ``k*b .. (k+1)*b`` of one stream). When no split works, a
    ConfigError says what to set.
    """
    tr = cfg.train
    fsdp = tr.strategy == "fsdp"

    def ok(ga: int) -> bool:
        return ga % world_size == 0 if fsdp else ga >= world_size

    if world_size <= 1 or ok(tr.gradient_accumulation_steps):
        return cfg, None
    batch = tr.micro_batch_size * tr.gradient_accumulation_steps
    ga = next((g for g in range(tr.gradient_accumulation_steps, batch + 1) if batch % g == 0 and ok(g)), None)
    if ga is None:
        need = "a multiple of" if fsdp else "at least"
        raise ConfigError(
            f"a step's batch of {batch} samples (micro_batch_size x gradient_accumulation_steps) cannot be shared "
            f"by {world_size} processes.",
            field="train.gradient_accumulation_steps",
            fix=f"Make gradient_accumulation_steps {need} {world_size} (e.g. {world_size}).",
        )
    per = batch // ga
    split = replace(cfg, train=replace(tr, micro_batch_size=per, gradient_accumulation_steps=ga))
    return split, Decision(
        "train.micro_batch_size",
        tr.micro_batch_size,
        per,
        f"{world_size} processes share each step's {batch} samples as {ga} micro-batches",
        f"{ga} micro-batches of {per} over {world_size} processes",
    )


def choose_optimizer(cfg: TrainConfig) -> tuple[TrainConfig, Decision | None]:
    """FSDP's sharded weights (DTensors) need torch's AdamW: bitsandbytes' optimizers cannot update them."""
    if cfg.train.strategy != "fsdp" or cfg.optim.optimizer == "adamw":
        return cfg, None
    return replace(cfg, optim=replace(cfg.optim, optimizer="adamw")), Decision(
        "optim.optimizer",
        cfg.optim.optimizer,
        "adamw",
        "bitsandbytes' optimizers cannot update FSDP's sharded weights; AdamW's state is sharded 1/N instead",
        "adamw",
    )


HOST_RAM_SHARE = 0.8
"""The share of the available CPU RAM that offloaded layer inputs may pin: pinned pages cannot be
swapped out, so the rest is left to the process itself, the data and the operating system."""


def check_host_ram(cfg: TrainConfig, needed: int, available: int) -> None:
    """Refuse a run whose offloaded layer inputs would pin more CPU RAM than the machine can give.

    Pinned memory cannot be swapped out: a run that takes it all stalls or kills more than itself,
    and only after the model has loaded. The bytes are exact (tokens x hidden size x 2 bytes x the
    checkpointed layers), not an estimate.

    Raises:
        ConfigError: on ``train.offload_activations``, naming both sizes and what to change.
    """
    if not cfg.train.offload_activations or needed <= HOST_RAM_SHARE * available:
        return
    raise ConfigError(
        f"the offloaded layer inputs need {format_bytes(needed)} of pinned CPU RAM; this machine has "
        f"{format_bytes(available)} available, and at most {HOST_RAM_SHARE:.0%} of it may be pinned",
        field="train.offload_activations",
        fix="Shorten data.max_length or lower train.micro_batch_size, or free CPU RAM; "
        "without offloading the layer inputs stay on the GPU.",
    )


def make_plan(
    cfg: TrainConfig,
    *,
    n_train: int,
    data_stats: dict[str, Any] | None,
    cuda: bool,
    card_bytes: int | None,
    model_config: Any = None,
    world_size: int = 1,
    host_ram_bytes: int | None = None,
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
        world_size: processes sharing the run (torchrun's ``WORLD_SIZE``).
        host_ram_bytes: the CPU RAM available now (None: not checked).

    Raises:
        ConfigError: ``train.offload_activations`` would pin more CPU RAM than the machine has
            (see :func:`check_host_ram`).
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
    strategy, decision = choose_strategy(cfg, world_size, spec, card_bytes, data_stats)
    config = replace(config, train=replace(config.train, strategy=strategy))
    decisions += [decision] if decision else []
    if cfg.train.keep_dequantized == "auto":
        if spec is not None:
            config, decision = choose_dequantized(
                config, spec, card_bytes, strategy=strategy, world_size=world_size, data_stats=data_stats
            )
            decisions += [decision] if decision else []
        else:
            config = replace(config, train=replace(config.train, keep_dequantized=False))
    elif cfg.train.keep_dequantized and strategy == "fsdp":
        raise ConfigError(
            "train.keep_dequantized: true cannot run with FSDP, which shards the 4-bit weights.",
            field="train.keep_dequantized",
            fix="Set train.keep_dequantized to auto or false, or train.strategy to ddp.",
        )
    if oom_fallback is not None:
        oom_fallback = replace(oom_fallback, train=replace(oom_fallback.train, keep_dequantized=False))
    for settle in (lambda c: split_batch(c, world_size), choose_optimizer):
        config, decision = settle(config)
        decisions += [decision] if decision else []
    if cfg.train.kernels == "auto" and spec is not None:
        kernels = resolve_kernels("auto", spec.model_type, cuda=cuda)
        decisions.append(Decision("train.kernels", "auto", kernels.kernels, kernels.reason, kernels.kernels))
    estimate = None
    if spec is not None and spec.usable:
        try:
            estimate = per_process(estimate_from_spec(config, spec, data_stats=data_stats), strategy, world_size, spec.num_layers).to_dict()
        except Exception:  # advice only
            estimate = None
    if cuda and estimate is not None and host_ram_bytes is not None:
        check_host_ram(config, estimate["details"].get("host_activation_bytes", 0), host_ram_bytes)
    return RunPlan(
        requested=cfg,
        config=config,
        total_steps=total_steps(cfg, n_train),
        decisions=tuple(decisions),
        oom_fallback=oom_fallback,
        vram_estimate=estimate,
    )
