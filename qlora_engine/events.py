"""Everything the engine reports, as frozen dataclasses that serialize to one JSON line each.

The GUI reads the same stream the CLI prints (``--events -``) and every run keeps in
``events.jsonl``: one line per event, ``{"event": "<kind>", "time": ..., ...fields}``.
:func:`from_json` turns a line back into its dataclass.
"""

from __future__ import annotations

import dataclasses
import json
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, ClassVar, Protocol

from qlora_engine import errors
from qlora_engine.decisions import Decision
from qlora_engine.errors import QLoRAError
from qlora_engine.scrub import scrub as redact  # hub tokens -> hf_***: the one scrubber every writer goes through


def _now() -> float:
    return time.time()


@dataclass(frozen=True)
class Event:
    kind: ClassVar[str] = "event"
    time: float = field(default_factory=_now, kw_only=True)

    def to_dict(self) -> dict[str, Any]:
        return {"event": self.kind, **dataclasses.asdict(self)}

    def to_json(self) -> str:
        return redact(json.dumps(self.to_dict(), default=str, allow_nan=True))


@dataclass(frozen=True)
class RunStarted(Event):
    kind: ClassVar[str] = "run_started"
    run_dir: str
    config: dict[str, Any]
    model: dict[str, Any]
    """Facts about the model: architecture, parameter counts, layers, trainable parameters."""
    device: str
    total_steps: int
    resumed_from: str | None = None
    start_step: int = 0
    vram_estimate: dict[str, Any] | None = None
    """The budget's prediction, so a viewer can draw it beside the measured curve."""
    data: dict[str, Any] | None = None
    decisions: list[dict[str, Any]] | None = None
    """The plan's decisions (``qlora_engine.decisions.Decision.to_dict``): every ``auto`` made concrete, with its reason."""
    processes: list[dict[str, Any]] | None = None
    """Several processes (torchrun): one record each, ``rank``, ``pid``, ``host``, ``device``; None alone."""

    def decision_list(self) -> list[Decision]:
        return [Decision.from_dict(d) for d in self.decisions or []]


@dataclass(frozen=True)
class PhaseChanged(Event):
    kind: ClassVar[str] = "phase"
    phase: str
    """One of: resolving, loading_model, quantizing, preparing_data, training, evaluating, saving, exporting, done."""
    detail: str = ""


@dataclass(frozen=True)
class StepMetrics(Event):
    kind: ClassVar[str] = "step"
    step: int
    total_steps: int
    epoch: float
    loss: float
    learning_rate: float
    grad_norm: float
    tokens: int
    """Tokens (non-padding) processed in this optimizer step."""
    tokens_per_second: float
    elapsed: float
    eta: float
    cuda_allocated: float | None = None
    """Peak bytes allocated by torch since the previous step (None off CUDA)."""
    cuda_reserved: float | None = None
    paged_out: float | None = None
    """Bytes of paged optimizer state not on the GPU after the step, at least (None without paged
    state): bitsandbytes' paged buffers are CUDA managed memory, which the driver moves to CPU RAM
    when the GPU is full. Read from the device's free memory (:func:`qlora_engine.optim.paged_out_bytes`)."""


@dataclass(frozen=True)
class EvalResult(Event):
    kind: ClassVar[str] = "eval"
    step: int
    loss: float
    tokens: int


@dataclass(frozen=True)
class CheckpointSaved(Event):
    kind: ClassVar[str] = "checkpoint"
    step: int
    path: str


@dataclass(frozen=True)
class LogLine(Event):
    kind: ClassVar[str] = "log"
    level: str
    """debug, info, warning or error."""
    message: str


@dataclass(frozen=True)
class RunFinished(Event):
    kind: ClassVar[str] = "run_finished"
    step: int
    adapter_dir: str | None
    stopped_early: bool
    final_loss: float | None
    final_eval_loss: float | None
    elapsed: float


@dataclass(frozen=True)
class RunFailed(Event):
    kind: ClassVar[str] = "run_failed"
    error_type: str
    message: str
    """Written for the user: what went wrong (rendered once, by ``qlora_engine.errors.render``)."""
    traceback: str
    step: int | None = None
    last_checkpoint: str | None = None
    hint: str | None = None
    fixes: list[dict[str, Any]] | None = None
    """Changes that would avoid this failure, each ``{"description", "overrides"}`` (out of memory)."""
    error: dict[str, Any] | None = None
    """A user error's attributes (``QLoRAError.to_dict``: field, file, line, checkpoint, fix, problems);
    None for an internal error. Read it through :meth:`user_error`, never by parsing ``message``."""
    log_file: str | None = None
    """Where the full traceback was written."""

    def user_error(self) -> QLoRAError | None:
        """The user error this event reports, as its type with its attributes (None: an internal error)."""
        return errors.from_dict(self.error) if self.error else None


@dataclass(frozen=True)
class ChatReady(Event):
    """``chat --serve``: the model is loaded and the server reads requests."""

    kind: ClassVar[str] = "chat_ready"
    model: str
    device: str


@dataclass(frozen=True)
class AnswerPiece(Event):
    """``chat --serve``: new text of one side's answer to request ``request``."""

    kind: ClassVar[str] = "answer_piece"
    request: int
    side: str
    """'base' (adapter off) or 'tuned'."""
    text: str


@dataclass(frozen=True)
class AnswerDone(Event):
    """``chat --serve``: one side's answer is complete."""

    kind: ClassVar[str] = "answer_done"
    request: int
    side: str
    text: str
    tokens: int
    tokens_per_second: float
    finish_reason: str
    """'eos' (the model ended its answer), 'length' (the token limit) or 'cancelled'."""


@dataclass(frozen=True)
class InspectResult(Event):
    """``inspect-serve``: the answer to request ``request`` (plain JSON data)."""

    kind: ClassVar[str] = "inspect_result"
    request: int
    result: Any


@dataclass(frozen=True)
class InspectFailed(Event):
    """``inspect-serve``: request ``request`` failed; a user error's attributes are in ``error``."""

    kind: ClassVar[str] = "inspect_failed"
    request: int
    error_type: str
    message: str
    error: dict[str, Any] | None = None
    traceback: str = ""

    def user_error(self) -> QLoRAError | None:
        return errors.from_dict(self.error) if self.error else None


EVENT_TYPES: dict[str, type[Event]] = {
    cls.kind: cls
    for cls in (
        RunStarted, PhaseChanged, StepMetrics, EvalResult, CheckpointSaved, LogLine, RunFinished, RunFailed,
        ChatReady, AnswerPiece, AnswerDone, InspectResult, InspectFailed,
    )
}


def speed_paths(facts: dict[str, Any]) -> str:
    """Which fast paths a run took, from its RunStarted model facts ('' when they do not say)."""
    parts = []
    if facts.get("kernels"):
        parts.append("Liger kernels" if facts["kernels"] == "liger" else "no fused kernels")
    if facts.get("fast_lora_layers") is not None:
        n = facts["fast_lora_layers"]
        parts.append(f"fast LoRA on {n} layers" if n else "peft's LoRA path")
    if facts.get("checkpointed_layers") is not None:
        n, of = facts["checkpointed_layers"], facts.get("num_layers")
        parts.append(f"{n} of {of} layers checkpointed" if n and of else "checkpointing on" if n else "no checkpointing")
    if facts.get("dequantized"):
        parts.append("4-bit weights kept dequantized")
    return ", ".join(parts)


def from_dict(d: dict[str, Any]) -> Event:
    d = dict(d)
    kind = d.pop("event", None)
    cls = EVENT_TYPES.get(kind)
    if cls is None:
        raise ValueError(f"unknown event kind {kind!r}")
    names = {f.name for f in dataclasses.fields(cls)}
    return cls(**{k: v for k, v in d.items() if k in names})


def from_json(line: str) -> Event:
    return from_dict(json.loads(line))


def iter_events(path: str | Path) -> Iterator[Event]:
    """The events of an ``events.jsonl`` file one by one (a long run's file need not fit in memory).

    A torn last line (a killed run) and lines that are not events are skipped.
    """
    with open(path, encoding="utf-8") as fh:
        for line in fh:
            try:
                yield from_json(line)
            except (ValueError, TypeError):  # a blank or torn line (json's errors are ValueErrors), not an event
                continue


def read_events(path: str | Path) -> list[Event]:
    """All events of an ``events.jsonl`` file; a torn last line (a killed run) is ignored."""
    return list(iter_events(path))


# -- sinks -------------------------------------------------------------------------------------


class EventSink(Protocol):
    def emit(self, event: Event) -> None: ...

    def close(self) -> None: ...


class NullSink:
    """Takes events and keeps nothing; the sinks below inherit its ``close`` that has nothing to close."""

    def emit(self, event: Event) -> None:
        pass

    def close(self) -> None:
        pass


class ListSink(NullSink):
    """Keeps events in memory (tests, in-process callers)."""

    def __init__(self) -> None:
        self.events: list[Event] = []

    def emit(self, event: Event) -> None:
        self.events.append(event)

    def of(self, cls: type[Event]) -> list[Any]:
        return [e for e in self.events if isinstance(e, cls)]


class StreamSink(NullSink):
    """One JSON line per event to a text stream (``--events -`` is stdout), flushed at once."""

    def __init__(self, stream: IO[str] | None = None) -> None:
        self.stream = stream or sys.stdout
        self._lock = threading.Lock()

    def emit(self, event: Event) -> None:
        with self._lock:
            self.stream.write(event.to_json() + "\n")
            self.stream.flush()


class JsonlFileSink(StreamSink):
    """Appends to a file (a resumed run continues its ``events.jsonl``)."""

    def __init__(self, path: str | Path) -> None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        super().__init__(open(path, "a", encoding="utf-8"))  # noqa: SIM115 - closed in close()
        self.path = Path(path)
        self.failed: OSError | None = None

    def emit(self, event: Event) -> None:
        """Append the event; if the disk is full, stop writing the file (the error being reported,
        a full disk, must not be replaced by a second one from its own log)."""
        if self.failed is not None:
            return
        try:
            super().emit(event)
        except OSError as e:
            self.failed = e
            print(f"warning: {self.path}: events no longer written ({e.strerror or e})", file=sys.stderr)

    def close(self) -> None:
        try:
            self.stream.close()
        except OSError:
            pass  # the rest could not be written: already said in emit


class MultiSink:
    def __init__(self, *sinks: Any) -> None:
        self.sinks = list(sinks)

    def emit(self, event: Event) -> None:
        for s in self.sinks:
            s.emit(event)

    def close(self) -> None:
        for s in self.sinks:
            s.close()


def describe(e: Event) -> str:
    """An event as the line a person reads (the terminal, the app's log pane): the one place
    events become text. Redacted."""
    if isinstance(e, StepMetrics):
        mem = f"  mem {e.cuda_reserved / 2**30:.1f} GiB" if e.cuda_reserved else ""
        if e.paged_out:
            mem += f" ({e.paged_out / 2**30:.1f} GiB of optimizer state paged out to CPU RAM)"
        msg = (
            f"step {e.step}/{e.total_steps}  loss {e.loss:.4f}  lr {e.learning_rate:.2e}  "
            f"gnorm {e.grad_norm:.3f}  {e.tokens_per_second:,.0f} tok/s  eta {fmt_duration(e.eta)}{mem}"
        )
    elif isinstance(e, PhaseChanged):
        msg = f"[{e.phase}] {e.detail}".rstrip()
    elif isinstance(e, LogLine):
        msg = e.message if e.level == "info" else f"{e.level}: {e.message}"
    elif isinstance(e, EvalResult):
        msg = f"eval at step {e.step}: loss {e.loss:.4f}"
    elif isinstance(e, CheckpointSaved):
        msg = f"checkpoint saved: {e.path}"
    elif isinstance(e, RunStarted):
        where = f"resumed from {e.resumed_from} at step {e.start_step}" if e.resumed_from else "started"
        speed = speed_paths(e.model)
        on = f"{len(e.processes)} processes ({e.device} each)" if e.processes else e.device
        msg = f"run {where} in {e.run_dir} on {on}: {e.total_steps} steps" + (f" ({speed})" if speed else "")
        msg += "".join(f"\n  decided: {d}" for d in e.decision_list())
    elif isinstance(e, RunFinished):
        if e.adapter_dir is None:  # aborted, or stopped before its first step: no adapter was written
            msg = f"stopped at step {e.step} in {fmt_duration(e.elapsed)}; no adapter was saved"
        else:
            how = "stopped and saved" if e.stopped_early else "finished"
            msg = f"{how} at step {e.step} in {fmt_duration(e.elapsed)}; adapter: {e.adapter_dir}"
    elif isinstance(e, ChatReady):
        msg = f"model ready: {e.model} on {e.device}"
    elif isinstance(e, AnswerPiece):
        msg = e.text
    elif isinstance(e, AnswerDone):
        why = {"eos": "ended by the model", "length": "stopped at the token limit"}.get(e.finish_reason, e.finish_reason)
        msg = f"[{e.side}: {e.tokens} tokens, {e.tokens_per_second:.1f} tok/s, {why}]"
    elif isinstance(e, RunFailed):  # the CLI's own form of an error (cli._fail), so a terminal reads one form
        msg = e.message if e.error_type == "KeyboardInterrupt" else f"error: {e.message}"
        if e.hint:
            msg += f"\nhint: {e.hint}"
        for fix in e.fixes or []:
            msg += f"\n  fix: {fix['description']}: " + " ".join(fix["overrides"])
        if e.log_file:
            msg += f"\ndetails: {e.log_file}"
    else:
        msg = e.to_json()
    return redact(msg)


class TextSink(NullSink):
    """Human-readable progress lines for a terminal (:func:`describe`)."""

    def __init__(self, stream: IO[str] | None = None) -> None:
        self.stream = stream or sys.stderr

    def emit(self, e: Event) -> None:
        print(describe(e), file=self.stream, flush=True)


def fmt_duration(seconds: float | None) -> str:
    """``1:02:03`` or ``2:03``; ``-`` for an unknown or negative time."""
    if seconds is None or seconds != seconds or seconds < 0:
        return "-"
    seconds = int(max(seconds, 0))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"
