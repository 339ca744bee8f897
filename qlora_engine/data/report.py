"""What data preparation did, as one typed record: :class:`DataReport`.

The report travels in the ``run_started`` event and in the tokenized-data cache as plain JSON
(:meth:`DataReport.to_dict` / :meth:`DataReport.from_dict`); in the engine it is read by
attribute (``report.token_stats``). ``report["rows"]`` and ``report.get("token_stats")`` still
read it as the older dict did, for callers not yet moved to attributes.
"""

from __future__ import annotations

import dataclasses
from dataclasses import asdict, dataclass
from typing import Any


@dataclass
class OverlongCounts:
    """Samples longer than ``data.max_length`` tokens and what became of them."""

    policy: str
    max_length: int
    truncated: int = 0
    dropped: int = 0
    no_answer_left: int = 0
    cut_before_tokenizing: int = 0
    """Samples so long in characters that their text was cut before tokenizing (so memory is
    bounded by max_length); each of them is also counted as truncated or dropped."""


@dataclass
class SetReport:
    """One side of the split (train or validation) after tokenizing and packing."""

    samples: int
    sequences: int
    tokens: int
    trained_tokens: int
    packing_fill: float | None = None


@dataclass
class DataReport:
    """Everything :func:`qlora_engine.data.prepare_data` reports (see the module docstring)."""

    source: str
    source_kind: str
    format: str
    evidence: dict[str, Any]
    rows: int
    skipped: dict[str, dict[str, Any]]
    """Skip reason -> ``{"count": n, "where": ["line 3", ...]}`` (the first few places)."""
    skipped_total: int
    overlong: OverlongCounts
    token_stats: dict[str, Any]
    train: SetReport
    validation: SetReport | None = None
    validation_source: str | None = None
    template: str | None = None
    train_on_prompt: bool = False
    packing: bool = False
    fingerprint: str = ""
    cache: str = "off"
    note: str | None = None

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        for side in ("train", "validation"):
            if d[side] is not None and d[side]["packing_fill"] is None:
                del d[side]["packing_fill"]
        if d["note"] is None:
            del d["note"]
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> DataReport:
        """The report :meth:`to_dict` wrote (raises TypeError or KeyError for anything else)."""
        d = dict(d)
        d["overlong"] = OverlongCounts(**d["overlong"])
        d["train"] = SetReport(**d["train"])
        d["validation"] = SetReport(**d["validation"]) if d.get("validation") else None
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})

    # -- the older dict-style reads -------------------------------------------------------------
    def __getitem__(self, key: str) -> Any:
        return self.to_dict()[key]

    def get(self, key: str, default: Any = None) -> Any:
        return self.to_dict().get(key, default)
