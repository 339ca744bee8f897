"""One training run as the window sees it: launch, live record, VRAM sampling, stop and abort.

The controller writes the configuration it launches (every path made absolute, so the run
does not depend on the app's working directory), starts the engine child process through
:class:`~app.run_worker.EngineJob`, feeds its events into a :class:`RunRecord`, samples
the GPU's memory through NVML about twice a second, and turns an engine that died without
a word (a native crash, a kill) into a ``RunFailed`` the window can show.

Its state is derived (:mod:`app.job_state`): from the run's events first, then from what the
user asked (stop, abort) and how the child exited. A failure is the engine's ``run_failed``
event (also for one before the run starts); the child's stderr is only shown, never parsed.
A resumed run's record starts from the run folder's ``events.jsonl``, so the curve and the
elapsed time of the part before the resume stay.
"""

from __future__ import annotations

import copy
import re
import time
from pathlib import Path

from PySide6.QtCore import QObject, QTimer, Signal, Slot

from app.job_state import JobFacts, ending_event, state_of
from app.run_record import RunRecord
from app.run_worker import EngineJob, engine_command, engine_env
from app.settings import data_dir, logs_dir
from qlora_engine import gpu as gpu_facts
from qlora_engine.config import TrainConfig
from qlora_engine.events import Event

VRAM_SAMPLE_MS = 500


def absolute_config(cfg: TrainConfig) -> TrainConfig:
    """A copy whose file paths are absolute (hub ids and dataset ids are left alone)."""
    out = copy.deepcopy(cfg)
    base = cfg.base_dir or Path.cwd()

    def absolute(value: str | None, must_exist: bool) -> str | None:
        if not value:
            return value
        p = Path(value).expanduser()
        if p.is_absolute():
            return str(p)
        candidate = (base / p).resolve()
        if must_exist and not candidate.exists():
            return value  # a hub id such as 'HuggingFaceTB/SmolLM2-135M-Instruct'
        return str(candidate)

    out.model.ref = absolute(out.model.ref, True) or ""
    out.data.path = absolute(out.data.path, True) or ""
    out.data.validation_path = absolute(out.data.validation_path, True)
    out.output.dir = absolute(out.output.dir, False) or ""
    out.base_dir = None
    return out


def holds_run(run_dir: Path) -> bool:
    """True if a run has already written checkpoints or an adapter there (the engine won't overwrite)."""
    ckpts = run_dir / "checkpoints"
    return (run_dir / "adapter").exists() or (ckpts.is_dir() and any(ckpts.iterdir()))


def next_free_dir(run_dir: Path) -> Path:
    """``runs/my-run`` -> ``runs/my-run-2`` (or -3, ...): the first name not holding a run."""
    stem = re.sub(r"-\d+$", "", run_dir.name)
    n = 2
    while True:
        candidate = run_dir.with_name(f"{stem}-{n}")
        if not candidate.exists() or not any(candidate.iterdir()):
            return candidate
        n += 1


class RunController(QObject):
    """Owns at most one live run.

    Signals:
        state_changed(str): idle, starting, running, stopping, finished, stopped, failed, aborted.
        updated(): the record changed (the view throttles its redraws).
        event(Event): every engine event as it arrives.
        output(str): a line of the engine's human text (stderr).
        failed(RunFailed, str): the run failed; the second value is the path of its log.
        ended(str): the child process is gone; the final state.
    """

    state_changed = Signal(str)
    updated = Signal()
    event = Signal(object)
    output = Signal(str)
    failed = Signal(object, str)
    ended = Signal(str)

    def __init__(self, parent: QObject | None = None) -> None:
        super().__init__(parent)
        self.process: EngineJob | None = None
        self.record = RunRecord()
        self.facts = JobFacts()
        self.state = "idle"
        self.gpu: gpu_facts.GpuInfo | None = None
        self.config_path: Path | None = None
        self.log_path: Path | None = None
        self.run_dir: Path | None = None
        self.command_factory = engine_command
        """Builds the child's command line (tests swap in a replay of recorded events)."""
        self._sampler = QTimer(self)
        self._sampler.setInterval(VRAM_SAMPLE_MS)
        self._sampler.timeout.connect(self._sample_vram)

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.returncode is None

    # -- launching -------------------------------------------------------------------------
    def start(
        self,
        cfg: TrainConfig,
        *,
        resume: bool | str | None = None,
        gpu: gpu_facts.GpuInfo | None = None,
        config_path: Path | None = None,
    ) -> Path:
        """Launch a run; returns its run folder.

        Args:
            cfg: a valid configuration (its relative paths are resolved against ``cfg.base_dir``).
            resume: True to continue from the newest checkpoint, or a checkpoint folder.
            gpu: the card to run on (None: the CPU, or whatever ``train.device`` picks).
            config_path: launch this YAML as is (a run folder's own ``config.yaml`` when resuming).

        Raises:
            RuntimeError: a run is already live.
        """
        if self.running:
            raise RuntimeError("a run is already in progress")
        launch = absolute_config(cfg)
        run_dir = Path(launch.output.dir)
        if config_path is None:
            stamp = time.strftime("%Y%m%d-%H%M%S")
            config_path = data_dir() / "launch" / f"{stamp}-{run_dir.name}.yaml"
            launch.save(config_path)
        self.config_path = config_path
        self.run_dir = run_dir
        self.log_path = logs_dir() / f"{run_dir.name}-{time.strftime('%Y%m%d-%H%M%S')}.log"
        self.gpu = gpu
        env = engine_env()
        if gpu is not None:
            env["CUDA_VISIBLE_DEVICES"] = gpu.cuda_visible_id
        elif launch.train.device != "cuda":
            env["CUDA_VISIBLE_DEVICES"] = ""  # the CPU was chosen: keep the child off every GPU
        cmd = self.command_factory(config_path, resume)
        # a resumed run continues its record: the curve and the time before the resume stay
        self.record = RunRecord.from_dir(run_dir) if resume else RunRecord(run_dir=run_dir)
        self.facts = JobFacts(launched=True)
        proc = EngineJob(
            cmd, cwd=run_dir.parent if run_dir.parent.is_dir() else None, env=env, log_path=self.log_path, parent=self
        )
        proc.event.connect(self._on_event)
        proc.output.connect(self.output)
        proc.finished.connect(self._on_finished)
        self.process = proc
        self._update_state()
        proc.start()
        if gpu is not None:
            self._sampler.start()
        return run_dir

    def stop(self) -> None:
        """Save and finish at the next step boundary."""
        if self.running:
            self.facts.stop_requested = True
            self.process.stop()
            self._update_state()

    def abort(self) -> None:
        """End the engine now; the checkpoints already on disk stay."""
        if self.running:
            self.facts.abort_requested = True
            self.process.abort()

    def save_now(self) -> None:
        if self.running:
            self.process.save_now()

    def wait(self, timeout_ms: int = 60_000) -> bool:
        return self.process.wait(timeout_ms) if self.process is not None else True

    # -- events ----------------------------------------------------------------------------
    @Slot(object)
    def _on_event(self, e: Event) -> None:
        self.record.apply(e)
        self._update_state()
        self.event.emit(e)
        self.updated.emit()

    def _sample_vram(self) -> None:
        if self.gpu is None or not self.running:
            return
        s = gpu_facts.sample(self.gpu.index, pid=self.process.pid if self.process else None)
        if s is not None:
            self.record.add_vram(s.used_bytes, s.process_bytes)
            self.updated.emit()

    @Slot(int, str)
    def _on_finished(self, code: int, stderr_tail: str) -> None:
        self._sampler.stop()
        self.facts.exit_code = code
        closing = ending_event(self.record, self.facts, stderr_tail)
        if closing is not None:
            self._on_event(closing)
        self.updated.emit()
        self._update_state()
        if self.state == "failed":
            self.failed.emit(self.record.failed, str(self.log_path) if self.log_path else "")
        self.ended.emit(self.state)

    def _update_state(self) -> None:
        state = state_of(self.record, self.facts)
        if state != self.state:
            self.state = state
            self.state_changed.emit(state)
