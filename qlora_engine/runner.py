"""One run from a config: lock the folder, prepare, plan, train, and report a failure as data.

``run(cfg, sink, control)`` is the one entry point (the CLI, the app's child process and the
tests call it). It reads top to bottom:

1. the run folder is locked and a resume checkpoint found (or a used folder refused) before
   anything heavy starts;
2. :func:`qlora_engine.train.prepare_inputs`: the device, the tokenizer and the data;
3. :func:`qlora_engine.plan.make_plan`: every ``auto`` settled for this data and card;
4. :class:`qlora_engine.train.Trainer`: ``setup()`` and ``train()``;
5. a failure becomes one ``run_failed`` event carrying the error's attributes (a user error's
   field, file, line and fix; for an out-of-memory step, the budget's fixes), with the
   traceback written to ``<run>/logs/``; then it is raised again.
"""

from __future__ import annotations

import json
import traceback
from pathlib import Path
from typing import Any

import torch

from qlora_engine import checkpoint as ckpt
from qlora_engine import models, vram
from qlora_engine.config import TrainConfig, check_output_dir, check_ready, run_warnings
from qlora_engine.control import RunControl
from qlora_engine.data import PreparedData
from qlora_engine.decisions import RunPlan
from qlora_engine.distributed import World
from qlora_engine.errors import ConfigError, QLoRAError
from qlora_engine.events import EventSink, JsonlFileSink, LogLine, MultiSink, NullSink, RunFailed, RunFinished
from qlora_engine.paths import sweep_interrupted, write_error_log
from qlora_engine.plan import make_plan
from qlora_engine.scrub import remember_config
from qlora_engine.tracking import tracking_sinks
from qlora_engine.train import RunInputs, Trainer, find_resume_checkpoint, prepare_inputs


def plan_for(cfg: TrainConfig, inputs: RunInputs, world_size: int = 1) -> RunPlan:
    """The plan of ``cfg`` for the prepared inputs, on the card this process has now."""
    stats = inputs.data.token_stats
    return make_plan(
        cfg,
        n_train=len(inputs.data.train),
        data_stats=stats,
        cuda=inputs.device.type == "cuda",
        card_bytes=vram.usable_vram(inputs.device),  # before the weights take their share
        host_ram_bytes=vram.available_host_ram(),
        model_config=_model_config(inputs.model_folder),
        world_size=world_size,
    )


def build_trainer(
    cfg: TrainConfig,
    sink: EventSink,
    control: RunControl | None = None,
    *,
    resume: bool | str | Path | None = None,
    force_resume: bool = False,
    data: PreparedData | None = None,
    world: World | None = None,
) -> Trainer:
    """Steps 1-3 of :func:`run` without the lock: a trainer ready for ``setup()``.

    ``data``: samples already prepared by the caller (benchmarks); None reads ``cfg.data``.
    ``world``: this process's place in a multi-process run (None: alone).
    """
    remember_config(cfg)  # a token in the config is masked in everything written from here on
    world = world or World()
    if data is None:
        check_ready(cfg)
    resume_from = find_resume_checkpoint(cfg.output_dir, resume)
    if resume_from is not None:  # damage or a changed setup is refused before the model loads
        ckpt.check_resume(resume_from, cfg, force=force_resume)
    with world.main_first():  # rank 0 downloads and fills the data cache; the others read it
        inputs = prepare_inputs(cfg, sink, data, world=world)
    plan = plan_for(cfg, inputs, world.size)
    for problem in run_warnings(cfg, plan.total_steps, len(inputs.data.train)):
        sink.emit(LogLine(level="warning", message=str(problem)))
    world.use(plan.config.train.strategy, inputs.device)
    return Trainer(plan, inputs, sink, control, resume_from=resume_from, force_resume=force_resume, world=world)


def run(
    cfg: TrainConfig,
    sink: EventSink | None = None,
    control: RunControl | None = None,
    *,
    resume: bool | str | Path | None = None,
    force_resume: bool = False,
) -> RunFinished:
    """Train one run. Events go to ``sink``, to ``<output.dir>/events.jsonl`` and to the trackers of
    ``output.report_to``.

    Errors are reported as a ``RunFailed`` event and then raised. Under ``torchrun`` the
    processes join one run (:mod:`qlora_engine.distributed`): rank 0 holds the lock and writes
    the events, the other ranks report nothing and write nothing.
    """
    remember_config(cfg)
    world = World.from_env()
    if not world.is_main:
        return _run_helper(cfg, world, control, resume=resume, force_resume=force_resume)
    run_dir = cfg.output_dir
    lock = ckpt.RunLock(run_dir)
    try:
        check_output_dir(cfg)  # an existing file or a read-only place: refused before anything is written
        try:
            run_dir.mkdir(parents=True, exist_ok=True)
            lock.acquire()  # raises before anything is written if another run lives here
        except OSError as e:
            code = ckpt.disk_errno(e, run_dir if run_dir.is_dir() else None)
            if code is not None:  # a disk already full at the start
                lock.path.unlink(missing_ok=True)
                raise ckpt.disk_full(lock.path, code, 4096) from None
            raise ConfigError(
                f"the run folder cannot be made ({e.strerror or e}); nothing was written.", field="output.dir", file=run_dir
            ) from None
    except QLoRAError as e:  # another run owns events.jsonl: report on the caller's sink only
        (sink or NullSink()).emit(_failed(e, None, run_dir))
        raise
    trainer: Trainer | None = None
    out: MultiSink | None = None
    try:
        for folder in (run_dir, run_dir / "checkpoints"):  # what a killed run's writes left behind
            sweep_interrupted(folder)
        out = base = MultiSink(JsonlFileSink(run_dir / "events.jsonl"), sink or NullSink())
        # Trackers (output.report_to) listen to the same stream; a failing one warns on `base` and goes quiet.
        out = MultiSink(base, *tracking_sinks(cfg.output.report_to, run_dir, report=base))
        world.connect(world.pick_device(models.pick_device(cfg.train.device)))
        trainer = build_trainer(cfg, out, control, resume=resume, force_resume=force_resume, world=world)
        trainer.setup()
        return trainer.train()
    except BaseException as e:
        report = out or sink or NullSink()
        if world.is_collective_failure(e):
            e = world.failure(e)
            report.emit(_failed(e, trainer, run_dir))
            raise e from None
        report.emit(_failed(e, trainer, run_dir))
        raise
    finally:
        if trainer is not None:
            trainer.cleanup()
        world.close()
        if out is not None:
            out.close()
        lock.release()  # whatever happened, even a second signal: the folder is free again


def _run_helper(
    cfg: TrainConfig, world: World, control: RunControl | None, *, resume: Any, force_resume: bool
) -> RunFinished:
    """A rank other than 0: the same run, no lock, no events, no files (its errors go to stderr)."""
    trainer: Trainer | None = None
    try:
        world.connect(world.pick_device(models.pick_device(cfg.train.device)))
        trainer = build_trainer(cfg, NullSink(), control, resume=resume, force_resume=force_resume, world=world)
        trainer.setup()
        return trainer.train()
    except BaseException as e:
        if world.is_collective_failure(e):
            raise world.failure(e) from None
        raise
    finally:
        if trainer is not None:
            trainer.cleanup()
        world.close()


def _failed(e: BaseException, trainer: Trainer | None, run_dir: Path) -> RunFailed:
    """The ``run_failed`` event of an exception: the error's attributes, never only its text."""
    tb = traceback.format_exc()
    step = trainer.step if trainer is not None else 0
    user = e if isinstance(e, QLoRAError) else None
    message, hint, fixes = str(e), getattr(e, "fix", None), None
    if isinstance(e, torch.cuda.OutOfMemoryError) and trainer is not None:
        trainer.cleanup()  # give the memory back before anything else runs
        cfg = trainer.plan.requested
        card = torch.cuda.get_device_properties(trainer.device).total_memory if trainer.device.type == "cuda" else None
        fixes = vram.oom_fixes(cfg, trainer.data, card)
        hint = vram.oom_hint(cfg)
        if fixes:
            hint = "Out of GPU memory. Changes that fit: " + "; ".join(f["description"] for f in fixes[:3]) + "."
        message = f"The GPU ran out of memory at step {step + 1}; the last checkpoint is kept."
    elif isinstance(e, KeyboardInterrupt):
        last = ckpt.latest_checkpoint(run_dir / "checkpoints")
        kept = f"the last checkpoint is kept: {last}" if last else "no checkpoint was written yet"
        message = f"aborted at step {step}; {kept}."
    elif user is None:
        message = f"internal error ({type(e).__name__}: {e})"
        hint = "this is a bug in qlora-engine, not in your input; please report it with the details file."
    log = write_error_log(tb, run_dir) if user is None else None
    last = ckpt.latest_checkpoint(run_dir / "checkpoints")
    return RunFailed(
        error_type=type(e).__name__,
        message=message,
        traceback=tb,
        step=step,
        last_checkpoint=str(last) if last else None,
        hint=hint,
        fixes=fixes,
        error=user.to_dict() if user else None,
        log_file=str(log) if log else None,
    )


def _model_config(folder: Path) -> dict | None:
    """The resolved model folder's ``config.json`` (the planner reads it, not the hub again)."""
    try:
        return json.loads((Path(folder) / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
