"""What fits a card: the largest micro-batch and sequence length, and single changes that make a run fit."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

import yaml

from qlora_engine.budget.estimate import (
    VramEstimate,
    estimate_from_spec,
    every_layer,
    fewest_checkpointed,
    reached_layers,
    resolve_spec,
    with_checkpointing,
)
from qlora_engine.budget.estimate import variant as _variant
from qlora_engine.budget.spec import ModelSpec
from qlora_engine.budget.units import format_bytes
from qlora_engine.config import TrainConfig, validate
from qlora_engine.errors import ConfigError

MAX_MICRO_BATCH = 1024
MAX_SEQUENCE = 1 << 20


@dataclass
class Suggestion:
    """One change that makes an over-budget run fit; ``overrides`` apply it (config.apply_overrides)."""

    description: str
    overrides: list[str]
    total: int | None = None
    """The estimated total after the change, in bytes."""

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass
class FitAdvice:
    """The answer to "does it fit this card, and if not, what would?"."""

    fits: bool
    gpu_bytes: int
    estimate: VramEstimate
    max_micro_batch_size: int
    """Largest micro-batch that fits with everything else unchanged (0: not even 1)."""
    max_sequence_length: int
    """Largest data.max_length that fits with everything else unchanged, assuming samples fill it (0: none)."""
    suggestions: list[Suggestion] = field(default_factory=list)
    faster: Suggestion | None = None
    """For a run that fits with gradient checkpointing: the least checkpointing that still fits
    with the estimate's upper bound (fewer checkpointed layers, or none), which runs faster."""

    def to_dict(self) -> dict[str, Any]:
        return {
            "fits": self.fits,
            "gpu_bytes": self.gpu_bytes,
            "estimate": self.estimate.to_dict(),
            "max_micro_batch_size": self.max_micro_batch_size,
            "max_sequence_length": self.max_sequence_length,
            "suggestions": [s.to_dict() for s in self.suggestions],
            "faster": self.faster.to_dict() if self.faster else None,
        }


class _Probe:
    def __init__(self, spec: ModelSpec, gpu_bytes: int, data_stats: dict[str, Any] | None) -> None:
        self.spec, self.gpu_bytes, self.data_stats = spec, gpu_bytes, data_stats

    def __call__(self, cfg: TrainConfig, *, data: bool = True) -> VramEstimate:
        stats = self.data_stats if data else None
        return estimate_from_spec(cfg, self.spec, gpu_bytes=self.gpu_bytes, data_stats=stats)

    def fits(self, cfg: TrainConfig, *, data: bool = True) -> bool:
        return bool(self(cfg, data=data).fits)


def _largest(ok: Any, lo: int, hi: int) -> int:
    """Largest n in [lo, hi] with ok(n), for a monotone ok; lo - 1 if none."""
    if not ok(lo):
        return lo - 1
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if ok(mid):
            lo = mid
        else:
            hi = mid - 1
    return lo


def _max_micro_batch(cfg: TrainConfig, probe: _Probe) -> int:
    return max(0, _largest(lambda n: probe.fits(_variant(cfg, train__micro_batch_size=n)), 1, MAX_MICRO_BATCH))


def _max_sequence(cfg: TrainConfig, probe: _Probe) -> int:
    cap = probe.spec.max_position_embeddings or MAX_SEQUENCE
    best = _largest(lambda n: probe.fits(_variant(cfg, data__max_length=n), data=False), 8, max(8, cap))
    if best < 8:
        return 0
    return best - best % 64 if best >= 64 else best


def fit(
    cfg: TrainConfig,
    gpu_bytes: int,
    model_config: Any = None,
    data_stats: dict[str, Any] | None = None,
    *,
    auto: bool = False,
) -> FitAdvice:
    """How this run sits on a card of ``gpu_bytes``: the largest micro-batch and sequence that
    fit, and, if it does not fit, each single change that makes it fit.

    ``model_config``: a ``config.json`` dict, a ``PretrainedConfig`` or an already-read
    :class:`ModelSpec`. ``auto``: ``cfg`` is what ``train.gradient_checkpointing: auto`` chose
    for this card (``qlora_engine.plan``): the largest batch and sequence are then those that fit
    with every layer checkpointed, since 'auto' checkpoints as much as it must, and nothing
    faster is offered (auto already checkpoints the fewest layers that fit).

    Raises:
        ConfigError: an invalid config value or GPU size.
    """
    validate(cfg)
    if isinstance(gpu_bytes, bool) or not isinstance(gpu_bytes, int) or gpu_bytes <= 0:
        raise ConfigError(f"GPU size: {gpu_bytes!r} is not a positive number of bytes.")
    spec = model_config if isinstance(model_config, ModelSpec) else resolve_spec(cfg, model_config)
    if cfg.train.gradient_checkpointing == "auto":  # unsettled: as the estimate takes it, every layer
        cfg, auto = every_layer(cfg), True
    probe = _Probe(spec, gpu_bytes, data_stats)
    current = probe(cfg)
    search = every_layer(cfg) if auto else cfg
    advice = FitAdvice(
        fits=bool(current.fits),
        gpu_bytes=gpu_bytes,
        estimate=current,
        max_micro_batch_size=_max_micro_batch(search, probe) if spec.usable else 0,
        max_sequence_length=_max_sequence(search, probe) if spec.usable else 0,
    )
    if not current.fits and spec.usable:
        advice.suggestions = _suggestions(cfg, probe, current, advice)
    if current.fits and spec.usable and cfg.train.gradient_checkpointing and not auto:
        advice.faster = _less_checkpointing(cfg, probe, current)
    return advice


def _fewest_checkpointed(cfg: TrainConfig, probe: _Probe, ok: Any) -> int | None:
    """The fewest checkpointed layers (0: checkpointing off) for which ``ok(estimate)`` holds."""
    return fewest_checkpointed(cfg, probe.spec, lambda variant: ok(probe(variant)))


def _checkpoint_change(k: int, n: int) -> tuple[str, list[str]]:
    if k == 0:
        return "Gradient checkpointing off (about a third faster)", ["train.gradient_checkpointing=false"]
    return (
        f"Checkpoint only the lowest {k} of {n} layers (the rest are not recomputed: faster)",
        ["train.gradient_checkpointing=true", f"train.checkpoint_layers={k}"],
    )


def _less_checkpointing(cfg: TrainConfig, probe: _Probe, current: VramEstimate) -> Suggestion | None:
    n = reached_layers(cfg, probe.spec)
    now = n if cfg.train.checkpoint_layers is None else min(cfg.train.checkpoint_layers, n)
    k = _fewest_checkpointed(cfg, probe, lambda est: est.high <= probe.gpu_bytes)
    if k is None or k >= now:
        return None
    description, overrides = _checkpoint_change(k, n)
    est = probe(with_checkpointing(cfg, k, n))
    return Suggestion(
        f"{description}: {format_bytes(est.total)} instead of {format_bytes(current.total)}", overrides, est.total
    )


def _suggestions(cfg: TrainConfig, probe: _Probe, current: VramEstimate, advice: FitAdvice) -> list[Suggestion]:
    """Single changes that make the run fit, the ones that cost the least quality first."""
    out: list[Suggestion] = []
    was = format_bytes(current.total)

    def changed(overrides: list[str]) -> TrainConfig:  # the config with these overrides, not validated again (fast)
        pairs = (item.partition("=") for item in overrides)
        return _variant(cfg, **{key.replace(".", "__"): yaml.safe_load(raw) for key, _, raw in pairs})

    def offer(description: str, overrides: list[str], variant: TrainConfig | None = None) -> None:
        est = probe(variant or changed(overrides))
        if est.fits:
            out.append(Suggestion(f"{description}: {format_bytes(est.total)} instead of {was}", overrides, est.total))

    tr, lo = cfg.train, cfg.lora
    if tr.keep_dequantized is True:  # the same math, a few percent slower: the cheapest change of all
        offer("Dequantize the 4-bit weights per step instead of keeping them", ["train.keep_dequantized=false"])
    n = reached_layers(cfg, probe.spec)
    now = n if tr.checkpoint_layers is None else min(tr.checkpoint_layers, n)
    if 0 < now < n or not tr.gradient_checkpointing:  # some layers are not checkpointed
        k = _fewest_checkpointed(cfg, probe, lambda est: bool(est.fits))
        if k is not None and 0 < k < n and (k > now or not tr.gradient_checkpointing):
            offer(*_checkpoint_change(k, n))
    if tr.gradient_checkpointing and 0 < now < n:
        every = ["train.gradient_checkpointing=true", "train.checkpoint_layers=null"]
        offer("Checkpoint every layer (about a third slower)", every)
    elif not tr.gradient_checkpointing:  # sized with every layer checkpointed, whatever train.checkpoint_layers says
        on = ["train.gradient_checkpointing=true"]
        offer("Turn on gradient checkpointing (about a third slower)", on, every_layer(cfg))
    if cfg.optim.optimizer != "paged_adamw_8bit":
        offer("Use the paged 8-bit AdamW optimizer", ["optim.optimizer=paged_adamw_8bit"])
    if tr.gradient_checkpointing and not tr.offload_activations:
        host = probe(changed(["train.offload_activations=true"])).details.get("host_activation_bytes", 0)
        offer(
            f"Keep the checkpointed activations in CPU RAM ({format_bytes(host)} of it; slower steps)",
            ["train.offload_activations=true"],
        )
    chunk = 4096
    if (tr.mlp_chunk_tokens is None or tr.mlp_chunk_tokens > chunk) and cfg.data.max_length > chunk:
        chunked = [f"train.mlp_chunk_tokens={chunk}"]
        offer(f"Run the MLPs in chunks of {chunk} tokens (one more MLP forward per step)", chunked)
    if cfg.model.attn_implementation == "eager":
        offer("Use SDPA attention", ["model.attn_implementation=sdpa"])
    mbs = advice.max_micro_batch_size
    if 1 <= mbs < tr.micro_batch_size:
        # a divisor of the step's batch, so the steps see the same samples and a run can resume
        batch = tr.micro_batch_size * tr.gradient_accumulation_steps
        mbs = max(d for d in range(1, mbs + 1) if batch % d == 0)
        ga = batch // mbs
        offer(
            f"Micro-batch {mbs} with {ga} accumulation steps (same effective batch, slower)",
            [f"train.micro_batch_size={mbs}", f"train.gradient_accumulation_steps={ga}"],
        )
    rank = lo.rank // 2
    while rank >= 1:
        if probe.fits(changed([f"lora.rank={rank}"])):
            offer(f"LoRA rank {rank} instead of {lo.rank}", [f"lora.rank={rank}"])
            break
        rank //= 2
    seq = advice.max_sequence_length
    if 64 <= seq < cfg.data.max_length:  # shorter than 64 tokens trains nothing useful
        verb = "drops" if cfg.data.overlong == "drop" else "truncates"
        offer(f"Sequences of at most {seq} tokens ({verb} longer samples)", [f"data.max_length={seq}"])
    return out
