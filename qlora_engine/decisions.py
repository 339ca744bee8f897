"""Decisions the engine takes for the user, and the reasons a checkpoint would not resume, as data.

A :class:`Decision` is an ``auto`` setting made concrete (which layers to checkpoint, which
kernels to use), a fix for an out-of-memory error, or any other choice the engine makes for
the user: the field it settles, what was asked, what was chosen and why. A
:class:`ResumeBlocker` is one setting that changed between a checkpoint and its resumption.
Both render to text through ``str()`` in one place; callers branch on the attributes.

Torch-free and Qt-free: the app imports this module to judge a resume before it starts a child.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from qlora_engine.config import TrainConfig


@dataclass(frozen=True)
class Decision:
    """One choice the engine made for the user."""

    field: str
    """The config field path the decision settles, e.g. ``train.gradient_checkpointing``."""
    requested: Any
    """What the config asked for (``"auto"``)."""
    chosen: Any
    """What the engine chose: a value of the field or, for a count, the count."""
    reason: str
    """Why, in words for the user."""
    summary: str = ""
    """The choice in a few words (``"21 of 32 layers checkpointed"``); empty: ``chosen`` as text."""

    def __str__(self) -> str:
        return f"{self.field} {self.requested}: {self.summary or self.chosen} ({self.reason})"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Decision:
        return cls(**{k: d.get(k) for k in ("field", "requested", "chosen", "reason")}, summary=d.get("summary") or "")


@dataclass(frozen=True)
class ResumeBlocker:
    """One setting that differs between a checkpoint's run and the config that would resume it."""

    field: str
    """A config field path (``lora.rank``), a section (``quant``) or a derived setting."""
    before: Any
    after: Any

    def __str__(self) -> str:
        return f"{self.field}: {self.before!r} -> {self.after!r}"

    @property
    def section(self) -> str:
        return self.field.split(".", 1)[0]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class RunPlan:
    """A run made concrete: what the trainer takes, and all it takes (see ``qlora_engine.plan``)."""

    requested: TrainConfig
    """The config as the user wrote it (saved as the run's ``config.yaml``; ``auto`` stays ``auto``)."""
    config: TrainConfig
    """The config that runs: every ``auto`` settled."""
    total_steps: int
    decisions: tuple[Decision, ...] = ()
    oom_fallback: TrainConfig | None = None
    """Every layer checkpointed, when ``auto`` left layers out that an out-of-memory step can take back."""
    vram_estimate: dict[str, Any] | None = None
    """The budget's prediction for the config that runs (None when the budget cannot model it)."""
