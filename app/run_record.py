"""Everything known about one run, accumulated from its events (no Qt here).

The run view draws a :class:`RunRecord`; the live path feeds it events one by one from the
child process, the history path feeds it a whole ``events.jsonl`` at once. Both end in the
same state, so a replayed run looks exactly like it did live.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

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
    read_events,
)


@dataclass
class VramSample:
    time: float
    used_bytes: float
    process_bytes: float | None = None


@dataclass
class RunRecord:
    """The state of a run as its events tell it."""

    run_dir: Path | None = None
    started: RunStarted | None = None
    phase: str = ""
    phase_detail: str = ""
    steps: list[StepMetrics] = field(default_factory=list)
    evals: list[EvalResult] = field(default_factory=list)
    checkpoints: list[CheckpointSaved] = field(default_factory=list)
    logs: list[LogLine] = field(default_factory=list)
    finished: RunFinished | None = None
    failed: RunFailed | None = None
    vram: list[VramSample] = field(default_factory=list)
    first_time: float | None = None
    last_time: float | None = None
    version: int = 0
    """Bumped on every change, so a view can skip redrawing what it has already drawn."""
    _series: dict[str, list[float]] = field(default_factory=dict, repr=False)
    """Step metrics as columns, appended per step, so a redraw does not walk every event again."""

    SERIES = ("step", "loss", "learning_rate", "grad_norm", "tokens_per_second")

    # -- feeding ---------------------------------------------------------------------------
    def apply(self, e: Event) -> None:
        if self.first_time is None:
            self.first_time = e.time
        self.last_time = e.time
        self.version += 1
        if isinstance(e, StepMetrics):
            # a resumed run repeats nothing, but a run resumed from an earlier checkpoint
            # than its last logged step re-logs steps: the newer value replaces the older
            while self.steps and self.steps[-1].step >= e.step:
                self.steps.pop()
                for col in self._series.values():
                    col.pop()
            self.steps.append(e)
            for name in self.SERIES:
                self._series.setdefault(name, []).append(float(getattr(e, name)))
        elif isinstance(e, EvalResult):
            while self.evals and self.evals[-1].step >= e.step:
                self.evals.pop()
            self.evals.append(e)
        elif isinstance(e, PhaseChanged):
            self.phase, self.phase_detail = e.phase, e.detail
        elif isinstance(e, RunStarted):
            if self.started is None or e.resumed_from:
                self.started = e
            self.run_dir = Path(e.run_dir)
            self.finished = None
            self.failed = None
            if e.start_step:
                self.steps = [s for s in self.steps if s.step <= e.start_step]
                self.evals = [s for s in self.evals if s.step <= e.start_step]
                self._series = {n: [float(getattr(s, n)) for s in self.steps] for n in self.SERIES}
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

    def add_vram(self, used_bytes: float, process_bytes: float | None = None, at: float | None = None) -> None:
        self.vram.append(VramSample(at if at is not None else time.time(), used_bytes, process_bytes))
        self.version += 1

    @classmethod
    def from_events(cls, events: list[Event], run_dir: Path | None = None) -> RunRecord:
        rec = cls(run_dir=run_dir)
        for e in events:
            rec.apply(e)
        return rec

    @classmethod
    def from_dir(cls, run_dir: str | Path) -> RunRecord:
        """Read a run folder's ``events.jsonl`` (an empty record if there is none yet)."""
        run_dir = Path(run_dir)
        path = run_dir / "events.jsonl"
        events = read_events(path) if path.is_file() else []
        rec = cls.from_events(events, run_dir)
        rec.run_dir = run_dir
        return rec

    # -- reading ---------------------------------------------------------------------------
    @property
    def total_steps(self) -> int:
        if self.steps:
            return self.steps[-1].total_steps
        return self.started.total_steps if self.started else 0

    @property
    def step(self) -> int:
        if self.finished:
            return self.finished.step
        if self.steps:
            return self.steps[-1].step
        return self.started.start_step if self.started else 0

    @property
    def status(self) -> str:
        """One of: empty, starting, running, finished, stopped, failed, interrupted."""
        if self.failed is not None:
            return "failed"
        if self.finished is not None:
            return "stopped" if self.finished.stopped_early else "finished"
        if self.started is None and not self.steps:
            return "starting" if self.phase else "empty"
        return "running"

    @property
    def estimate_peak(self) -> float | None:
        """The budget's predicted peak in bytes, if the run carried one."""
        est = self.started.vram_estimate if self.started else None
        if not est:
            return None
        for key in ("total", "total_bytes", "peak"):
            if isinstance(est.get(key), (int, float)):
                return float(est[key])
        return None

    def series(self, name: str) -> tuple[list[float], list[float]]:
        """(steps, values) of one step metric, skipping missing values."""
        if name in self._series:
            return self._series["step"], self._series[name]
        xs, ys = [], []
        for s in self.steps:
            v = getattr(s, name)
            if v is not None:
                xs.append(float(s.step))
                ys.append(float(v))
        return xs, ys

    def eval_series(self) -> tuple[list[float], list[float]]:
        return [float(e.step) for e in self.evals], [float(e.loss) for e in self.evals]

    def memory_series(self) -> dict[str, tuple[list[float], list[float]]]:
        """Seconds since the start -> GiB, for NVML samples and the engine's own figures."""
        t0 = self.first_time or (self.vram[0].time if self.vram else 0.0)
        gib = float(2**30)
        out: dict[str, tuple[list[float], list[float]]] = {}
        if self.vram:
            out["GPU used (NVML)"] = ([v.time - t0 for v in self.vram], [v.used_bytes / gib for v in self.vram])
            proc = [v for v in self.vram if v.process_bytes is not None]
            if proc:
                out["this run (NVML)"] = ([v.time - t0 for v in proc], [v.process_bytes / gib for v in proc])
        for attr, label in (("cuda_allocated", "torch allocated"), ("cuda_reserved", "torch reserved")):
            pts = [(s.time - t0, getattr(s, attr) / gib) for s in self.steps if getattr(s, attr) is not None]
            if pts:
                out[label] = ([p[0] for p in pts], [p[1] for p in pts])
        return out

    @property
    def latest(self) -> StepMetrics | None:
        return self.steps[-1] if self.steps else None

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
        for e in events:
            fh.write(json.dumps(e.to_dict(), default=str) + "\n")
