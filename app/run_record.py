"""Everything known about one run, accumulated from its events (no Qt here).

The run view draws a :class:`RunRecord`; the live path feeds it events one by one from the
child process, the history path feeds it a run's ``events.jsonl`` line by line. Both end in
the same state, so a replayed run looks exactly like it did live.

The record keeps what the window draws and the latest values, never the whole stream: every
chart series is a :class:`~app.series.BoundedSeries` (exact for the first few thousand
points, then decimated, min/max-preserving), and the log lines and checkpoints are the newest
few. A run of a million steps takes the same memory as one of ten thousand; its full record
is the ``events.jsonl`` on disk.
"""

from __future__ import annotations

import json
import time
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from app.gpu_cards import line_name
from app.series import BoundedSeries
from qlora_engine.events import (
    CheckpointSaved,
    EvalResult,
    Event,
    LogLine,
    PhaseChanged,
    RunFailed,
    RunFinished,
    RunStarted,
    StepMetrics,
    iter_events,
)

KEPT_LOG_LINES = 2000
"""The engine's log lines a record keeps (the newest); the log pane holds a few more of its own."""
KEPT_CHECKPOINTS = 100

STEP_SERIES = ("loss", "learning_rate", "grad_norm", "tokens_per_second")
"""Step metrics drawn against the step."""
MEMORY_SERIES = {
    "vram_used": "GPU used (NVML)",
    "vram_process": "this run (NVML)",
    "cuda_allocated": "torch allocated",
    "cuda_reserved": "torch reserved",
    "paged_out": "paged out to CPU RAM",
}
"""Memory figures drawn against the time (NVML samples, and the engine's own per step), and their labels."""


def _new_series() -> dict[str, BoundedSeries]:
    return {name: BoundedSeries() for name in (*STEP_SERIES, "eval_loss", *MEMORY_SERIES)}


@dataclass
class RunRecord:
    """The state of a run as its events tell it."""

    run_dir: Path | None = None
    gpus: list[int] = field(default_factory=list)
    """The cards (NVML numbers) the run was launched on; [] for the CPU. Several: one VRAM line each."""
    started: RunStarted | None = None
    phase: str = ""
    latest: StepMetrics | None = None
    """The newest step's metrics."""
    last_eval: EvalResult | None = None
    checkpoints: deque[CheckpointSaved] = field(default_factory=lambda: deque(maxlen=KEPT_CHECKPOINTS))
    logs: deque[LogLine] = field(default_factory=lambda: deque(maxlen=KEPT_LOG_LINES))
    finished: RunFinished | None = None
    failed: RunFailed | None = None
    first_time: float | None = None
    elapsed_before: float = 0.0
    """Training time of the parts before the newest resume (the engine counts each part from 0)."""
    version: int = 0
    """Bumped on every change, so a view can skip redrawing what it has already drawn."""
    _stale_latest: StepMetrics | None = field(default=None, repr=False)
    _series: dict[str, BoundedSeries] = field(default_factory=_new_series, repr=False)
    """Every drawn series by name: step metrics and eval loss by step, memory by time."""

    # -- feeding ---------------------------------------------------------------------------
    def apply(self, e: Event) -> None:
        if self.first_time is None:
            self.first_time = e.time
        self.version += 1
        if isinstance(e, StepMetrics):
            # a resumed run repeats nothing, but a run resumed from an earlier checkpoint
            # than its last logged step re-logs steps: the newer value replaces the older
            for name in STEP_SERIES:
                col = self._series[name]
                col.drop_from(e.step)
                col.append(e.step, getattr(e, name))
            for name in ("cuda_allocated", "cuda_reserved"):
                if getattr(e, name) is not None:
                    self._series[name].append(e.time, getattr(e, name))
            # drawn from the first step that pages anything out: a paged optimizer that never
            # spills (the usual case) adds no line at zero to every GPU run's chart
            if e.paged_out or (e.paged_out is not None and len(self._series["paged_out"])):
                self._series["paged_out"].append(e.time, e.paged_out)
            self.latest = e
        elif isinstance(e, EvalResult):
            self._series["eval_loss"].drop_from(e.step)
            self._series["eval_loss"].append(e.step, e.loss)
            self.last_eval = e
        elif isinstance(e, PhaseChanged):
            self.phase = e.phase
        elif isinstance(e, RunStarted):
            if self.started is not None and not e.resumed_from:
                self._start_over(e)  # a new run in the same folder: nothing of the old one is its own
            if e.resumed_from and self.started is not None:
                self.elapsed_before += self.segment_elapsed
                self._stale_latest = self.latest  # its elapsed belongs to the part before
            if self.started is None or e.resumed_from:
                self.started = e
            self.run_dir = Path(e.run_dir)
            self.finished = None
            self.failed = None
            if e.start_step:
                # steps logged after the checkpoint this run resumes from are done again
                for name in (*STEP_SERIES, "eval_loss"):
                    self._series[name].drop_after(e.start_step)
                if self.latest is not None and self.latest.step > e.start_step:
                    self.latest = None
                if self.last_eval is not None and self.last_eval.step > e.start_step:
                    self.last_eval = None
        elif isinstance(e, CheckpointSaved):
            self.checkpoints.append(e)
        elif isinstance(e, LogLine):
            self.logs.append(e)
        elif isinstance(e, RunFinished):
            self.finished = e
            self.phase = "done"
        elif isinstance(e, RunFailed):
            self.failed = e
            self.phase = "failed"

    def _start_over(self, e: Event) -> None:
        fresh = RunRecord(run_dir=self.run_dir, gpus=self.gpus, first_time=e.time, version=self.version)
        self.__dict__.update(fresh.__dict__)

    def add_vram(
        self, used_bytes: float, process_bytes: float | None = None, at: float | None = None, card: int | None = None
    ) -> None:
        """One NVML sample of a card's memory (the whole card's, and this run's if known).

        On a run over several cards (``gpus``) each card has its own line, ``GPU N``.
        """
        at = at if at is not None else time.time()
        if card is not None and len(self.gpus) > 1:
            self._series.setdefault(line_name(card), BoundedSeries()).append(at, used_bytes)
        else:
            self._series["vram_used"].append(at, used_bytes)
            if process_bytes is not None:
                self._series["vram_process"].append(at, process_bytes)
        self.version += 1

    @classmethod
    def from_events(cls, events: Iterable[Event], run_dir: Path | None = None) -> RunRecord:
        rec = cls(run_dir=run_dir)
        for e in events:
            rec.apply(e)
        return rec

    @classmethod
    def from_dir(cls, run_dir: str | Path) -> RunRecord:
        """Read a run folder's ``events.jsonl`` line by line (an empty record if there is none yet)."""
        run_dir = Path(run_dir)
        path = run_dir / "events.jsonl"
        rec = cls.from_events(iter_events(path) if path.is_file() else (), run_dir)
        rec.run_dir = run_dir
        return rec

    # -- reading ---------------------------------------------------------------------------
    @property
    def total_steps(self) -> int:
        if self.latest is not None:
            return self.latest.total_steps
        return self.started.total_steps if self.started else 0

    @property
    def step(self) -> int:
        if self.finished:
            return self.finished.step
        if self.latest is not None:
            return self.latest.step
        return self.started.start_step if self.started else 0

    @property
    def status(self) -> str:
        """One of: empty, starting, running, finished, stopped, failed, interrupted."""
        if self.failed is not None:
            return "failed"
        if self.finished is not None:
            return "stopped" if self.finished.stopped_early else "finished"
        if self.started is None and self.latest is None:
            return "starting" if self.phase else "empty"
        return "running"

    @property
    def segment_elapsed(self) -> float:
        """Seconds of training since the newest (re)start, as the engine reported them."""
        if self.finished is not None:
            return self.finished.elapsed
        if self.latest is None or self.latest is self._stale_latest:
            return 0.0
        return self.latest.elapsed

    @property
    def elapsed(self) -> float | None:
        """Seconds of training over every part of the run (resumes included); None before a step."""
        if self.finished is None and (self.latest is None or self.latest is self._stale_latest):
            return self.elapsed_before or None
        return self.elapsed_before + self.segment_elapsed

    @property
    def estimate_peak(self) -> float | None:
        """The budget's predicted peak in bytes, if the run carried one."""
        est = (self.started.vram_estimate if self.started else None) or {}
        peaks = (est.get(key) for key in ("total", "total_bytes", "peak"))
        return next((float(v) for v in peaks if isinstance(v, (int, float))), None)

    @property
    def has_steps(self) -> bool:
        return bool(self._series["loss"])

    def kept_points(self) -> int:
        """Points held over all series (bounded, however long the run)."""
        return sum(len(s) for s in self._series.values())

    def series(self, name: str) -> tuple[list[float], list[float]]:
        """(steps, values) of one step metric (``STEP_SERIES``), decimated once it is long.

        The lists are shared with the record: read them, do not change them.
        """
        if name not in STEP_SERIES:
            raise KeyError(f"no step series {name!r}; one of {', '.join(STEP_SERIES)}")
        return self._series[name].data()

    def eval_series(self) -> tuple[list[float], list[float]]:
        return self._series["eval_loss"].data()

    def memory_series(self) -> dict[str, tuple[list[float], list[float]]]:
        """Seconds since the start -> GiB, for NVML samples (one line per card of several) and the engine's figures."""
        lines = {**MEMORY_SERIES, **{line_name(i): line_name(i) for i in self.gpus if line_name(i) in self._series}}
        first_samples = [self._series[name].data()[0][:1] for name in lines]
        t0 = self.first_time or min((s[0] for s in first_samples if s), default=0.0)
        gib = float(2**30)
        out: dict[str, tuple[list[float], list[float]]] = {}
        for name, label in lines.items():
            xs, ys = self._series[name].data()
            if xs:
                out[label] = ([x - t0 for x in xs], [y / gib for y in ys])
        return out

    @property
    def last_checkpoint(self) -> str | None:
        if self.failed and self.failed.last_checkpoint:
            return self.failed.last_checkpoint
        return self.checkpoints[-1].path if self.checkpoints else None

    def config_dict(self) -> dict[str, Any] | None:
        return self.started.config if self.started else None


def write_events(path: str | Path, events: list[Event]) -> None:
    """Write events as JSONL (tests and the screenshot script record runs with it)."""
    with open(path, "w", encoding="utf-8") as fh:
        fh.writelines(json.dumps(e.to_dict(), default=str) + "\n" for e in events)
