"""The state of one engine job, derived from what the job reported (no Qt, no torch).

A job is one child process (a training run, an export, a Try session). Its state is never
remembered separately from the facts it comes from: while the child lives it is
``starting`` until the run reports that it started, then ``running`` (``stopping`` once a
stop was asked for); when the child has exited, the final state comes from the events it
wrote, and only then from how it ended. A run that reported ``run_finished`` is finished even
if Abort was clicked while it was writing its adapter; a run that reported ``run_failed``
failed; a child that exited without a final event was aborted (if the user asked) or died.

The window and the tests read the same functions, so what a page shows and what a test
asserts cannot drift apart.
"""

from __future__ import annotations

from dataclasses import dataclass

from app.run_record import RunRecord
from qlora_engine.events import LogLine, RunFailed

SIGNAL_DEATHS = (-9, -11, 137, 139)
"""Exit codes of a child ended by the system (the kernel's out-of-memory killer, a crash)."""


@dataclass
class JobFacts:
    """What the app knows about a job besides its events: what the user asked and how the child ended."""

    launched: bool = False
    stop_requested: bool = False
    abort_requested: bool = False
    exit_code: int | None = None
    """None while the child lives."""


def live_state(record: RunRecord, facts: JobFacts) -> str:
    """The state of a job whose child is alive (or ``idle`` when none was launched)."""
    if not facts.launched:
        return "idle"
    if facts.stop_requested or facts.abort_requested:
        return "stopping"
    return "running" if record.started is not None else "starting"


def final_state(record: RunRecord) -> str:
    """The state of a job whose child has exited, from its events first.

    Args:
        record: the run's record, with every event the child wrote applied.
    """
    if record.failed is not None:
        return "failed"
    if record.finished is not None:
        return "stopped" if record.finished.stopped_early else "finished"
    return "aborted"


def state_of(record: RunRecord, facts: JobFacts) -> str:
    """The one state a page shows for this job."""
    if facts.exit_code is None:
        return live_state(record, facts)
    state = final_state(record)
    if state == "aborted" and not facts.abort_requested:
        return "failed"  # no final event and nobody asked: the child died
    if state == "stopped" and facts.abort_requested and record.finished.adapter_dir is None:
        return "aborted"  # several processes are told to abort and end together, saving nothing
    return state


def ending_event(record: RunRecord, facts: JobFacts, stderr_tail: str) -> LogLine | RunFailed | None:
    """The event that closes a record whose child exited without a final event of its own.

    Abort: a warning naming the checkpoint that is kept. A child that died without a word: a
    ``RunFailed`` with the exit code, and its stderr as the details (shown, never parsed).
    """
    if record.failed is not None or record.finished is not None or facts.exit_code is None:
        return None
    if facts.abort_requested:
        ckpt = record.last_checkpoint
        return LogLine(
            level="warning",
            message=f"Aborted. The last checkpoint is kept: {ckpt}"
            if ckpt
            else "Aborted before any checkpoint was written.",
        )
    code = facts.exit_code
    if code < 0 or code in SIGNAL_DEATHS:
        message = f"The engine process was ended by the system (exit code {code}), for example out of memory."
    else:
        message = f"The engine process ended unexpectedly (exit code {code})."
    return RunFailed(
        error_type="EngineExited",
        message=message,
        traceback=stderr_tail or "(the engine wrote nothing to stderr)",
        step=record.step or None,
        last_checkpoint=record.last_checkpoint,
    )
