"""What each fix of a failed run would do: continue the run from its checkpoint, or start a new one.

When a step runs out of GPU memory the engine's ``RunFailed`` carries the budget's fixes,
each a description and ``section.field=value`` overrides. Whether a fix can continue the
run is judged from the two configurations alone (``qlora_engine.checkpoint.resume_blockers``,
typed :class:`~qlora_engine.decisions.ResumeBlocker` values; torch-free)
and from the checkpoints on disk, before anything is loaded, so the error dialog can say
"Apply and resume from step N" or "Apply and start a new run" and why. No Qt here: the
dialog draws these choices and the run actions carry them out. Nothing here parses engine text:
a blocker's field says what changes.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from qlora_engine.checkpoint import list_checkpoints, resume_blockers
from qlora_engine.config import ConfigError, TrainConfig, apply_overrides
from qlora_engine.decisions import ResumeBlocker
from qlora_engine.events import RunFailed

BEFORE_FIX_NAME = "config.before-fix.yaml"
"""Where the run folder keeps its configuration from before a fix was applied (then -2, -3, ...)."""

_WHAT_CHANGES = {
    "data": "the training data",
    "lora": "the adapter's shape",
    "quant": "the quantization",
    "model": "the base model",
    "train.micro_batch_size x gradient_accumulation_steps": "the batch of a step",
    "train.seed": "the seed",
}


@dataclass(frozen=True)
class FixChoice:
    """One fix of a failed run, ready to apply.

    Attributes:
        description: the budget's sentence (what changes and what it saves).
        overrides: the ``section.field=value`` changes.
        run_dir: the failed run's folder.
        before: the failed run's configuration (None: it could not be read).
        config: ``before`` with the change applied (None: it does not apply).
        resume_step: the step of the checkpoint the run continues from; None: a new run.
        reason: one line on why this fix starts a new run ("" when it resumes).
    """

    description: str
    overrides: tuple[str, ...]
    run_dir: Path
    before: TrainConfig | None
    config: TrainConfig | None
    resume_step: int | None
    reason: str = ""

    @property
    def resumable(self) -> bool:
        return self.resume_step is not None

    @property
    def label(self) -> str:
        if self.resumable:
            return f"Apply and resume from step {self.resume_step}"
        return "Apply and start a new run"


def failed_run_config(run_dir: Path, started_config: dict[str, Any] | None = None) -> TrainConfig | None:
    """The configuration a resume of ``run_dir`` would start from: its ``config.yaml``.

    Falls back to the configuration the run reported when it started (a run whose folder
    has no config.yaml); None if neither can be read.
    """
    run_dir = Path(run_dir)
    try:
        cfg = TrainConfig.load(run_dir / "config.yaml")
    except ConfigError:
        if not started_config:
            return None
        try:
            cfg = TrainConfig.from_dict(dict(started_config), source=str(run_dir / "events.jsonl"))
        except ConfigError:
            return None
    cfg.base_dir = run_dir.resolve()  # as the history's resume reads it
    return cfg


def judge_fixes(failure: RunFailed, run_dir: Path, started_config: dict[str, Any] | None = None) -> list[FixChoice]:
    """The failure's fixes judged against the run folder's configuration and checkpoints.

    Reads the run's config and lists its checkpoints (no torch): the window calls it off the GUI thread.
    """
    return fix_choices(failure, failed_run_config(run_dir, started_config), run_dir)


def fix_choices(failure: RunFailed, before: TrainConfig | None, run_dir: Path) -> list[FixChoice]:
    """The failure's fixes, each judged against the failed run's configuration and checkpoints."""
    run_dir = Path(run_dir)
    found = list_checkpoints(run_dir / "checkpoints")
    checkpoint_step = found[-1][0] if found else None  # what a resume (newest complete checkpoint) loads
    out = []
    for fix in failure.fixes or []:
        description = str(fix.get("description", "")).strip() or "Change the configuration"
        overrides = tuple(str(o) for o in fix.get("overrides") or [])
        after, step, reason = None, None, ""
        if before is None:
            reason = "The run's configuration could not be read, so this change cannot be applied here."
        elif not overrides:
            reason = "This fix names no setting to change."
        else:
            try:
                after = apply_overrides(before, list(overrides))
            except ConfigError as e:
                reason = f"This change does not apply: {e}"
            else:
                blockers = resume_blockers(before, after)
                if blockers:
                    reason = why_new_run(blockers)
                elif checkpoint_step is None:
                    reason = "No checkpoint was saved before the failure, so the run starts over."
                else:
                    step = checkpoint_step
        out.append(FixChoice(description, overrides, run_dir, before, after, step, reason))
    return out


def why_new_run(blockers: list[ResumeBlocker]) -> str:
    """One line from ``resume_blockers``: what the change touches, so the checkpoint no longer fits."""
    things: list[str] = []
    for b in blockers:
        thing = _WHAT_CHANGES.get(b.field) or _WHAT_CHANGES.get(b.section) or b.field
        if thing not in things:
            things.append(thing)
    data = [f"{b.field}: {b.before!r} -> {b.after!r}" for b in blockers if b.section == "data"]
    detail = f" ({'; '.join(data)})" if data else ""
    return f"It changes {' and '.join(things)}{detail}, so the checkpoint does not fit: a new run starts."


def keep_config_before_fix(run_dir: Path, before: TrainConfig) -> Path:
    """Keep the run's configuration from before a fix next to it; returns the copy's path.

    A second fix of the same run keeps its own copy (``config.before-fix-2.yaml``, ...), so
    every configuration the run went through stays on disk.
    """
    run_dir = Path(run_dir)
    stem, suffix = BEFORE_FIX_NAME.rsplit(".", 1)
    target = run_dir / BEFORE_FIX_NAME
    n = 2
    while target.exists():
        target = run_dir / f"{stem}-{n}.{suffix}"
        n += 1
    current = run_dir / "config.yaml"
    if current.is_file():
        shutil.copy2(current, target)
    else:
        before.save(target)
    return target
