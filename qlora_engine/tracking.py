"""Experiment tracking: sinks that pass a run's events on to TensorBoard, W&B or MLflow.

``output.report_to`` names the trackers; :func:`tracking_sinks` builds one event sink for each and
the runner adds them beside ``events.jsonl``. They subscribe to the same event stream, so the
training loop knows nothing of them (no ``if tensorboard:`` in the step).

A tracker is a side channel: when one fails mid-run (a full disk under its folder, a dropped
connection) it reports one warning and goes quiet; the run and its ``events.jsonl`` go on.
Only TensorBoard writes into the run folder (``<run>/tensorboard``); W&B and MLflow take their
settings and login from their own environment variables and files, and nothing here writes a
credential anywhere.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

from qlora_engine.errors import ConfigError
from qlora_engine.events import (
    EvalResult,
    Event,
    EventSink,
    LogLine,
    RunFailed,
    RunFinished,
    RunStarted,
    StepMetrics,
)

TENSORBOARD_DIR = "tensorboard"
"""Where a run's TensorBoard event files go, inside the run folder."""

PACKAGES = {"tensorboard": "tensorboard", "wandb": "wandb", "mlflow": "mlflow"}
"""The module each tracker needs (and the pip package of the same name)."""


def step_scalars(e: StepMetrics) -> dict[str, float]:
    """The scalars of one optimizer step, under the names every tracker logs them."""
    out = {
        "train/loss": e.loss,
        "train/learning_rate": e.learning_rate,
        "train/grad_norm": e.grad_norm,
        "train/tokens_per_second": e.tokens_per_second,
        "train/epoch": e.epoch,
    }
    if e.cuda_allocated is not None:
        out["memory/torch_allocated_gib"] = e.cuda_allocated / 2**30
    if e.cuda_reserved is not None:
        out["memory/torch_reserved_gib"] = e.cuda_reserved / 2**30
    return out


def flat_config(config: dict[str, Any]) -> dict[str, Any]:
    """``{"lora": {"rank": 16}}`` as ``{"lora.rank": 16}``, lists as text (what hparams tables take)."""
    flat: dict[str, Any] = {}
    for section, values in config.items():
        if isinstance(values, dict):
            for k, v in values.items():
                flat[f"{section}.{k}"] = v if isinstance(v, (int, float, str, bool)) else str(v)
        else:
            flat[section] = values if isinstance(values, (int, float, str, bool)) else str(values)
    return flat


def available(tracker: str) -> bool:
    return importlib.util.find_spec(PACKAGES[tracker]) is not None


def check_trackers(report_to: list[str]) -> None:
    """Refuse, before anything loads, a tracker whose package is not installed.

    Raises:
        ConfigError: naming ``output.report_to`` and the package to install.
    """
    missing = [t for t in report_to if not available(t)]
    if missing:
        raise ConfigError(
            f"{', '.join(missing)} {'is' if len(missing) == 1 else 'are'} not installed",
            field="output.report_to",
            fix=f"pip install {' '.join(PACKAGES[t] for t in missing)}, or take "
            f"{', '.join(missing)} out of output.report_to",
        )


class TensorBoardSink:
    """Writes scalars (and the config, as text and hparams) to ``log_dir`` with PyTorch's SummaryWriter.

    The writer opens on ``run_started``: a resumed run purges what the crashed one wrote after its
    checkpoint, so the curves do not double back.
    """

    def __init__(self, log_dir: str | Path) -> None:
        self.log_dir = Path(log_dir)
        self.writer: Any = None

    def emit(self, event: Event) -> None:
        if isinstance(event, RunStarted):
            from torch.utils.tensorboard import SummaryWriter  # lazy: optional package, only when this tracker is on

            self.close()
            purge = event.start_step + 1 if event.resumed_from else None
            self.writer = SummaryWriter(log_dir=str(self.log_dir), purge_step=purge)
            cfg_text = "\n".join(f"    {k}: {v}" for k, v in flat_config(event.config).items())
            self.writer.add_text("config", cfg_text, global_step=event.start_step)
            return
        w = self.writer
        if w is None:
            return
        if isinstance(event, StepMetrics):
            for name, value in step_scalars(event).items():
                w.add_scalar(name, value, global_step=event.step)
        elif isinstance(event, EvalResult):
            w.add_scalar("eval/loss", event.loss, global_step=event.step)
        elif isinstance(event, (RunFinished, RunFailed)):
            w.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None


class WandbSink:
    """Logs to Weights & Biases (its project, entity, mode and login come from its own environment)."""

    def __init__(self, run_name: str) -> None:
        self.run_name = run_name
        self.run: Any = None

    def emit(self, event: Event) -> None:
        if isinstance(event, RunStarted):
            import wandb  # lazy: optional package, only when this tracker is on

            self.run = wandb.init(name=self.run_name, config=flat_config(event.config), resume="allow")
        elif self.run is None:
            return
        elif isinstance(event, StepMetrics):
            self.run.log(step_scalars(event), step=event.step)
        elif isinstance(event, EvalResult):
            self.run.log({"eval/loss": event.loss}, step=event.step)

    def close(self) -> None:
        if self.run is not None:
            self.run.finish()
            self.run = None


class MlflowSink:
    """Logs to MLflow (tracking URI and experiment from MLFLOW_TRACKING_URI / MLFLOW_EXPERIMENT_NAME)."""

    def __init__(self, run_name: str) -> None:
        self.run_name = run_name
        self.active = False

    def emit(self, event: Event) -> None:
        import mlflow  # lazy: optional package, only when this tracker is on

        if isinstance(event, RunStarted):
            mlflow.start_run(run_name=self.run_name)
            mlflow.log_params({k: str(v)[:250] for k, v in flat_config(event.config).items()})
            self.active = True
        elif not self.active:
            return
        elif isinstance(event, StepMetrics):
            mlflow.log_metrics({k.replace("/", "_"): v for k, v in step_scalars(event).items()}, step=event.step)
        elif isinstance(event, EvalResult):
            mlflow.log_metric("eval_loss", event.loss, step=event.step)

    def close(self) -> None:
        if self.active:
            import mlflow  # lazy: optional package, only when this tracker is on

            mlflow.end_run()
            self.active = False


class GuardedSink:
    """A tracker that cannot end the run: its first error becomes one warning, then it is dropped.

    ``report`` is where the warning goes (the run's own sink, so it lands in events.jsonl).
    """

    def __init__(self, name: str, sink: Any, report: EventSink | None = None) -> None:
        self.name, self.sink, self.report = name, sink, report
        self.failed: str | None = None

    def emit(self, event: Event) -> None:
        if self.failed is not None:
            return
        try:
            self.sink.emit(event)
        except Exception as e:  # noqa: BLE001 - any tracker failure; the run must go on
            self.failed = f"{type(e).__name__}: {e}"
            self._close_quietly()
            if self.report is not None:
                self.report.emit(LogLine(level="warning", message=f"{self.name}: stopped logging ({self.failed})"))

    def _close_quietly(self) -> None:
        try:
            self.sink.close()
        except Exception:  # noqa: BLE001 - already failed; the warning says so
            pass

    def close(self) -> None:
        if self.failed is None:
            self._close_quietly()


def tracking_sinks(report_to: list[str], run_dir: Path, *, report: EventSink | None = None) -> list[GuardedSink]:
    """One guarded sink per tracker named in ``output.report_to`` (checked installed first)."""
    check_trackers(report_to)
    makers = {
        "tensorboard": lambda: TensorBoardSink(run_dir / TENSORBOARD_DIR),
        "wandb": lambda: WandbSink(run_dir.name),
        "mlflow": lambda: MlflowSink(run_dir.name),
    }
    return [GuardedSink(t, makers[t](), report) for t in dict.fromkeys(report_to)]


def cmd_tensorboard(args: Any) -> int:
    """Serve a run's TensorBoard folder through tensorboard's program API, in this process: the app's
    "Open logs" starts this command, which its frozen build (no ``python -m``) runs too."""
    check_trackers(["tensorboard"])
    from tensorboard import default, program  # optional: only for this command

    tb = program.TensorBoard(plugins=default.get_plugins())
    tb.configure(argv=[None, "--logdir", str(args.logdir), "--host", "127.0.0.1", "--port", str(args.port)])
    return int(tb.main() or 0)


def add_cli(sub: Any) -> None:
    s = sub.add_parser("tensorboard", help="serve a run's TensorBoard event files on 127.0.0.1")
    s.add_argument("logdir", help=f"the folder of event files (<run>/{TENSORBOARD_DIR})")
    s.add_argument("--port", type=int, default=6006)
    s.set_defaults(func=cmd_tensorboard)
