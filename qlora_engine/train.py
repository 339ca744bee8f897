"""The trainer: one QLoRA run from a validated config.

``run(cfg, sink, control)`` is the one entry point (the CLI and the tests call it). The
recipe has four parts that read top to bottom: :meth:`Trainer.setup` (load, quantize,
wrap, data, optimizer), :meth:`Trainer.train` (the loop), :meth:`Trainer.save_checkpoint`
and :meth:`Trainer.cleanup`.

Data order is a pure function of the seed: the run reads one stream of samples, epoch after
epoch, each epoch a permutation seeded by (seed, epoch), and micro-batch ``k`` is samples
``k*b .. (k+1)*b`` of that stream (``b`` = micro_batch_size). An optimizer step therefore
sees the same samples however its batch (micro_batch_size x gradient_accumulation_steps) is
split, the data position of a checkpoint is just its step, and a resumed run sees exactly
the batches an uninterrupted run would have seen, also after an out-of-memory fix that
split the batch into smaller micro-batches.
"""

from __future__ import annotations

import json
import math
import os
import random
import time
import traceback
from collections import deque
from dataclasses import asdict
from pathlib import Path
from typing import Any

# Expandable segments let the CUDA caching allocator grow blocks in place instead of
# stranding partly used ones: reserved memory stays close to allocated memory (several GiB
# less at 8B scale). Read when CUDA first allocates, so it must be set before that; a value
# the user set wins.
os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")

import torch  # noqa: E402

from qlora_engine import checkpoint as ckpt
from qlora_engine import fast_lora, models
from qlora_engine.config import TrainConfig, check_ready
from qlora_engine.control import RunControl
from qlora_engine.data import PreparedData, collate, count_tokens, prepare_data
from qlora_engine.errors import QLoRAError, ResumeError, TrainingDiverged
from qlora_engine.events import (
    CheckpointSaved,
    EvalResult,
    EventSink,
    JsonlFileSink,
    LogLine,
    MultiSink,
    NullSink,
    PhaseChanged,
    RunFailed,
    RunFinished,
    RunStarted,
    StepMetrics,
)
from qlora_engine.optim import build_optimizer, build_scheduler, warmup_for
from qlora_engine.vram import oom_fixes, oom_hint, usable_vram, vram_estimate


class Trainer:
    def __init__(
        self,
        cfg: TrainConfig,
        sink: EventSink,
        control: RunControl | None = None,
        *,
        resume: bool | str | Path | None = None,
        force_resume: bool = False,
        data: PreparedData | None = None,
    ) -> None:
        """``data``: samples already prepared by the caller (benchmarks); None reads ``cfg.data``."""
        if data is None:
            check_ready(cfg)
        self.cfg = cfg
        self.sink = sink
        self.control = control or RunControl()
        self.resume = resume
        self.force_resume = force_resume
        self.run_dir = cfg.output_dir
        self.ckpt_dir = self.run_dir / "checkpoints"
        self.data = data
        self._order: tuple[int, list[int]] = (-1, [])  # (epoch, its sample order), the one in use
        self.step = 0
        self.last_loss: float | None = None
        self.last_eval_loss: float | None = None
        self.last_checkpoint: Path | None = None

    # -- setup -------------------------------------------------------------------------------

    def setup(self) -> None:
        cfg, emit = self.cfg, self.sink.emit
        resume_from = self._find_resume_checkpoint()
        self.device = models.pick_device(cfg.train.device)
        self.dtype = models.pick_compute_dtype(cfg.quant.compute_dtype, self.device)
        _seed_everything(cfg.train.seed)

        emit(PhaseChanged(phase="resolving", detail=cfg.model.ref))
        folder = models.resolve_model(cfg.model.ref, revision=cfg.model.revision, sink=self.sink)
        self.model_folder = folder
        self.tokenizer = models.load_tokenizer(folder, trust_remote_code=cfg.model.trust_remote_code)

        if self.data is None:
            emit(PhaseChanged(phase="preparing_data", detail=cfg.data.path))
            self.data = prepare_data(cfg, self.tokenizer, self.sink)
        if not self.data.train:
            raise QLoRAError(f"{cfg.data.path}: no training samples left after preparation.")
        self.samples_per_step = cfg.train.micro_batch_size * cfg.train.gradient_accumulation_steps
        if cfg.train.max_steps is not None:
            self.total_steps = cfg.train.max_steps
        else:
            self.total_steps = max(1, math.ceil(cfg.train.epochs * len(self.data.train) / self.samples_per_step))

        card = usable_vram(self.device)  # before the weights take their share
        emit(PhaseChanged(phase="loading_model", detail=f"{folder} in 4-bit {cfg.quant.quant_type} on {self.device}"))
        base = models.load_quantized_model(cfg, folder, self.device, self.dtype)
        self.kernels = models.apply_fused_kernels(base, cfg.train.kernels, self.device)
        if cfg.train.kernels == "auto" and self.kernels == "none":
            from qlora_engine.budget.kernels import resolve_kernels

            why = resolve_kernels("auto", getattr(base.config, "model_type", ""), cuda=self.device.type == "cuda").reason
            emit(LogLine(level="info", message=f"train.kernels auto: no fused kernels ({why})"))
        torch.manual_seed(cfg.train.seed)  # the LoRA init depends on the seed only
        self.model = models.wrap_with_lora(base, cfg)
        self.fast_lora = 0
        if cfg.train.fast_lora:
            self.fast_lora, skipped = fast_lora.enable(self.model)
            if skipped:
                why = ", ".join(f"{n} for {reason}" for reason, n in skipped.items())
                emit(LogLine(level="info", message=f"train.fast_lora: peft's LoRA path kept on {why}"))
        if cfg.train.mlp_chunk_tokens:
            tiled = models.tile_mlps(self.model, cfg.train.mlp_chunk_tokens)
            emit(LogLine(level="info", message=f"{tiled} MLPs run in chunks of {cfg.train.mlp_chunk_tokens} tokens"))
        # What runs: the config with train.gradient_checkpointing 'auto' made concrete for this card.
        self.run_cfg = self._choose_checkpointing(card)
        self.checkpointed = 0
        if self.run_cfg.train.gradient_checkpointing:
            offload = cfg.train.offload_activations and self.device.type == "cuda"
            if cfg.train.offload_activations and not offload:
                emit(LogLine(level="info", message="train.offload_activations: nothing to move on the CPU; ignored"))
            layers = self.run_cfg.train.checkpoint_layers
            self.checkpointed = models.enable_gradient_checkpointing(self.model, layers, offload=offload)
            if cfg.train.checkpoint_layers is not None:
                note = f"gradient checkpointing on the lowest {self.checkpointed} decoder layers (train.checkpoint_layers)"
                emit(LogLine(level="info", message=note))
        self.model.train()
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = build_optimizer(cfg.optim, self.params)
        self.scheduler = build_scheduler(cfg.optim, self.optimizer, self.total_steps)
        if note := warmup_for(cfg.optim.warmup_steps, self.total_steps)[1]:  # short runs (issue 19)
            emit(LogLine(level="warning", message=note))

        self.resumed_from = None
        if resume_from is not None:
            self._load_checkpoint(resume_from)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        cfg.save(self.run_dir / "config.yaml")
        self.facts = {
            **models.model_facts(self.model),
            "kernels": self.kernels,
            "fast_lora_layers": self.fast_lora,
            "checkpointed_layers": self.checkpointed,
        }
        emit(
            RunStarted(
                run_dir=str(self.run_dir),
                config=cfg.to_dict(),
                model=self.facts,
                device=_device_name(self.device),
                total_steps=self.total_steps,
                resumed_from=str(resume_from) if resume_from else None,
                start_step=self.step,
                vram_estimate=vram_estimate(self.run_cfg, self.data),
                data=self.data.report,
            )
        )

    def _choose_checkpointing(self, card: int | None) -> TrainConfig:
        """The run's config with ``train.gradient_checkpointing: auto`` resolved by the VRAM budget.

        ``card``: the bytes this process can have on the GPU (None on the CPU, where 'auto'
        checkpoints every layer). If the budget cannot model the model, every layer too.
        """
        cfg = self.cfg
        self.auto_checkpointing = cfg.train.gradient_checkpointing == "auto"
        if not self.auto_checkpointing:
            return cfg
        from qlora_engine.budget.estimate import every_layer, resolve_checkpointing, resolve_spec

        stats = self.data.report.get("token_stats") if isinstance(self.data.report, dict) else None
        try:
            spec = resolve_spec(cfg)  # as the budget page reads it
        except Exception as e:  # the budget is advice: never fail a run over it
            chosen = every_layer(cfg)
            note = f"train.gradient_checkpointing auto: every layer checkpointed (the VRAM budget cannot model it: {e})"
        else:
            chosen, note = resolve_checkpointing(cfg, spec, card, data_stats=stats)
        self.sink.emit(LogLine(level="info", message=note or ""))
        return chosen

    def _checkpoint_every_layer(self) -> None:
        """After an out-of-memory error under 'auto' with layers left out (:meth:`_auto_can_grow`): checkpoint them all."""
        from qlora_engine.budget.estimate import every_layer

        self.optimizer.zero_grad(set_to_none=True)
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
        before = self.checkpointed
        self.run_cfg = every_layer(self.run_cfg)
        offload = self.cfg.train.offload_activations and self.device.type == "cuda"
        self.checkpointed = models.enable_gradient_checkpointing(self.model, None, offload=offload)
        self.facts["checkpointed_layers"] = self.checkpointed
        self.sink.emit(
            LogLine(
                level="warning",
                message=f"The GPU ran out of memory at step {self.step + 1} with {before} of {self.checkpointed} "
                "layers checkpointed (train.gradient_checkpointing auto); every layer is checkpointed from "
                "now on and the step runs again.",
            )
        )

    def _find_resume_checkpoint(self) -> Path | None:
        if not self.resume:
            existing = ckpt.list_checkpoints(self.ckpt_dir)
            if existing or (self.run_dir / "adapter").exists():
                raise QLoRAError(
                    f"{self.run_dir}: this folder already holds a run (checkpoints or an adapter).",
                    hint="Continue it with --resume, or set output.dir to a new folder; nothing there was changed.",
                )
            return None
        if self.resume is True:
            found = ckpt.latest_checkpoint(self.ckpt_dir)
            if found is None:
                raise ResumeError(f"{self.ckpt_dir}: no complete checkpoint to resume from.")
            return found
        return Path(self.resume)

    def _identity(self) -> dict[str, Any]:
        """What must not change between a checkpoint and its resumption."""
        return {**_setup_identity(self.cfg), "data.fingerprint": self.data.fingerprint}

    def _load_checkpoint(self, folder: Path) -> None:
        from peft import set_peft_model_state_dict
        from safetensors.torch import load_file

        state = ckpt.load_state(folder)
        diffs = [
            f"{k}: checkpoint has {state['identity'].get(k)!r}, config has {v!r}"
            for k, v in self._identity().items()
            if state["identity"].get(k) != v
        ]
        if diffs and not self.force_resume:
            raise ResumeError(
                f"{folder}: cannot resume, the setup changed since this checkpoint: " + "; ".join(diffs),
                hint="Undo the change, start a new run in another output.dir, or pass --force-resume.",
            )
        weights = load_file(folder / "adapter_model.safetensors", device=str(self.device))
        result = set_peft_model_state_dict(self.model, weights)
        if getattr(result, "unexpected_keys", None):
            raise ResumeError(f"{folder}: the adapter does not fit this model ({result.unexpected_keys[:3]} ...).")
        self.optimizer.load_state_dict(ckpt.torch_load_own(folder, "optimizer.pt"))
        self.scheduler.load_state_dict(ckpt.torch_load_own(folder, "scheduler.pt"))
        # --- train more (issue 19): the schedule is this run's, not the checkpoint's --------------
        # The checkpoint's optimizer holds the learning rate its own schedule reached (0 at the end
        # of a cosine run). With a longer run (`--more N`, a raised train.max_steps) the schedule is
        # stretched to the new end: the next step trains at what that schedule gives for this step.
        sched = self.scheduler
        for group, base_lr, factor in zip(self.optimizer.param_groups, sched.base_lrs, sched.lr_lambdas, strict=True):
            group["lr"] = base_lr * factor(sched.last_epoch)
        self.scheduler._last_lr = [g["lr"] for g in self.optimizer.param_groups]  # what get_last_lr() reports
        # --- end of train more ------------------------------------------------------------------
        ckpt.set_rng_state(ckpt.torch_load_own(folder, "rng.pt"))
        self.step = int(state["step"])
        self.last_loss = state.get("last_loss")
        self.resumed_from = folder
        self.sink.emit(LogLine(level="info", message=f"resumed from {folder} at step {self.step}"))

    # -- the loop ----------------------------------------------------------------------------

    def micro_batch(self, k: int) -> dict[str, torch.Tensor]:
        """Micro-batch number ``k`` of the whole run (see the module docstring)."""
        bs, n = self.cfg.train.micro_batch_size, len(self.data.train)
        rows = []
        for i in range(k * bs, (k + 1) * bs):
            epoch, j = divmod(i, n)
            rows.append(self.data.train[self._epoch_order(epoch)[j]])
        return collate(rows, self.tokenizer.pad_token_id)

    def _epoch_order(self, epoch: int) -> list[int]:
        if self._order[0] != epoch:
            gen = torch.Generator().manual_seed(self.cfg.train.seed * 1_000_003 + epoch)
            self._order = (epoch, torch.randperm(len(self.data.train), generator=gen).tolist())
        return self._order[1]

    def train(self) -> RunFinished:
        cfg, emit = self.cfg, self.sink.emit
        ga = cfg.train.gradient_accumulation_steps
        emit(PhaseChanged(phase="training", detail=f"steps {self.step + 1}-{self.total_steps}"))
        t_start = time.perf_counter()
        step_times: deque[float] = deque(maxlen=20)  # for the ETA
        stopped = False
        while self.step < self.total_steps:
            self.control.wait_if_paused()
            if self.control.abort_requested:
                stopped = True
                emit(LogLine(level="warning", message=f"aborted at step {self.step}; nothing saved after the last checkpoint"))
                return self._finish(t_start, stopped=True, save=False)
            t0 = time.perf_counter()
            if self.device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(self.device)
            batches = [self.micro_batch(self.step * ga + i) for i in range(ga)]
            # Normalize by the label count of the whole optimizer step, so every answer token
            # weighs the same however the tokens fall into micro-batches.
            n_labels = sum(int((b["labels"][:, 1:] != -100).sum()) for b in batches)
            n_tokens = sum(count_tokens(b, self.tokenizer.pad_token_id) for b in batches)
            try:
                loss_sum = self._forward_backward(batches, n_labels)
            except torch.cuda.OutOfMemoryError:
                if not self._auto_can_grow():
                    raise
                retry = True  # outside the handler: the traceback holds the step's tensors
            else:
                retry = False
            if retry:
                self._checkpoint_every_layer()
                loss_sum = self._forward_backward(batches, n_labels)
            max_norm = cfg.optim.max_grad_norm if cfg.optim.max_grad_norm > 0 else float("inf")
            grad_norm = torch.nn.utils.clip_grad_norm_(self.params, max_norm)
            loss = float(loss_sum)  # a CPU-GPU sync point, once per optimizer step
            if not math.isfinite(loss):
                raise self._diverged(loss)
            lr = self.scheduler.get_last_lr()[0]
            self.optimizer.step()
            self.scheduler.step()
            self.optimizer.zero_grad(set_to_none=True)
            self.step += 1
            self.last_loss = loss
            dt = time.perf_counter() - t0
            step_times.append(dt)
            if self.step % cfg.train.logging_steps == 0 or self.step == self.total_steps:
                emit(
                    StepMetrics(
                        step=self.step,
                        total_steps=self.total_steps,
                        epoch=self.step * self.samples_per_step / len(self.data.train),
                        loss=loss,
                        learning_rate=lr,
                        grad_norm=float(grad_norm),
                        tokens=n_tokens,
                        tokens_per_second=n_tokens / dt if dt > 0 else 0.0,
                        elapsed=time.perf_counter() - t_start,
                        eta=sum(step_times) / len(step_times) * (self.total_steps - self.step),
                        cuda_allocated=_cuda_mem(self.device, "max_memory_allocated"),
                        cuda_reserved=_cuda_mem(self.device, "max_memory_reserved"),
                    )
                )
            if cfg.train.eval_steps and self.step % cfg.train.eval_steps == 0 and self.step < self.total_steps:
                self.evaluate()
            if self.control.stop_requested:
                stopped = self.step < self.total_steps
                break
            due = cfg.train.save_steps and self.step % cfg.train.save_steps == 0 and self.step < self.total_steps
            if due or self.control.take_save_request():
                self.save_checkpoint()
                emit(PhaseChanged(phase="training"))
        if self.data.validation:
            self.evaluate()
        return self._finish(t_start, stopped=stopped, save=True)

    def _forward_backward(self, batches: list[dict[str, torch.Tensor]], n_labels: int) -> torch.Tensor:
        """Forward and backward of a step's micro-batches (gradients accumulate); the summed loss."""
        loss_sum = torch.zeros((), device=self.device)
        n_items = torch.tensor(max(n_labels, 1), device=self.device)
        for b in batches:
            b = {k: v.to(self.device, non_blocking=True) for k, v in b.items()}
            # Keep only the loss: holding the model output would keep the logits alive
            # through the backward pass (2 bytes x tokens x vocabulary).
            # use_cache=False also matters for packed batches: transformers only keeps
            # attention inside each packed sample (from the position_ids) without a KV cache.
            micro_loss = self.model(**b, use_cache=False, num_items_in_batch=n_items).loss
            micro_loss.backward()
            loss_sum += micro_loss.detach()
        return loss_sum

    def _auto_can_grow(self) -> bool:
        """Whether 'auto' left layers out of checkpointing that an out-of-memory error can take back."""
        tr = self.run_cfg.train
        return self.auto_checkpointing and not (tr.gradient_checkpointing and tr.checkpoint_layers is None)

    def _finish(self, t_start: float, *, stopped: bool, save: bool) -> RunFinished:
        adapter_dir = None
        if save:
            if self.last_checkpoint is None or not self.last_checkpoint.name.endswith(f"{self.step:06d}"):
                self.save_checkpoint()
            adapter_dir = self.save_adapter()
        event = RunFinished(
            step=self.step,
            adapter_dir=str(adapter_dir) if adapter_dir else None,
            stopped_early=stopped,
            final_loss=self.last_loss,
            final_eval_loss=self.last_eval_loss,
            elapsed=time.perf_counter() - t_start,
        )
        self.sink.emit(PhaseChanged(phase="done"))
        self.sink.emit(event)
        return event

    def _diverged(self, loss: float) -> TrainingDiverged:
        last = ckpt.latest_checkpoint(self.ckpt_dir)
        fp16 = " The compute dtype is float16, whose overflow is the usual cause." if self.dtype == torch.float16 else ""
        return TrainingDiverged(
            f"the loss became {loss} at step {self.step + 1}.{fp16} "
            f"Last good checkpoint: {last if last else 'none yet'}.",
            hint="Lower optim.learning_rate, keep optim.max_grad_norm at 1.0, or use bfloat16; then resume.",
        )

    @torch.no_grad()
    def evaluate(self) -> float | None:
        if not self.data.validation:
            return None
        self.sink.emit(PhaseChanged(phase="evaluating", detail=f"{len(self.data.validation)} samples"))
        self.model.eval()
        bs = self.cfg.train.micro_batch_size
        total, count = 0.0, 0
        for i in range(0, len(self.data.validation), bs):
            b = collate(self.data.validation[i : i + bs], self.tokenizer.pad_token_id)
            n = int((b["labels"][:, 1:] != -100).sum())
            if n == 0:
                continue
            b = {k: v.to(self.device) for k, v in b.items()}
            total += float(self.model(**b, use_cache=False).loss) * n
            count += n
        self.model.train()
        loss = total / max(count, 1)
        self.last_eval_loss = loss
        self.sink.emit(EvalResult(step=self.step, loss=loss, tokens=count))
        self.sink.emit(PhaseChanged(phase="training"))
        return loss

    # -- saving --------------------------------------------------------------------------------

    def save_checkpoint(self) -> Path:
        self.sink.emit(PhaseChanged(phase="saving", detail=f"checkpoint at step {self.step}"))
        state = {
            "step": self.step,
            "total_steps": self.total_steps,
            "micro_batches_seen": self.step * self.cfg.train.gradient_accumulation_steps,
            "last_loss": self.last_loss,
            "identity": self._identity(),
        }

        def write(tmp: Path) -> None:
            self.model.save_pretrained(tmp, safe_serialization=True)
            torch.save(self.optimizer.state_dict(), tmp / "optimizer.pt")
            torch.save(self.scheduler.state_dict(), tmp / "scheduler.pt")
            torch.save(ckpt.rng_state(), tmp / "rng.pt")
            (tmp / ckpt.STATE).write_text(json.dumps(state, indent=1, default=str), encoding="utf-8")
            ckpt.write_marker(tmp, {"step": self.step})

        path = ckpt.write_atomic_folder(self.ckpt_dir / ckpt.checkpoint_name(self.step), write, replace=True)
        ckpt.prune_checkpoints(self.ckpt_dir, self.cfg.train.save_total_limit)
        self.last_checkpoint = path
        self.sink.emit(CheckpointSaved(step=self.step, path=str(path)))
        return path

    def save_adapter(self) -> Path:
        def write(tmp: Path) -> None:
            self.model.save_pretrained(tmp, safe_serialization=True)
            self.tokenizer.save_pretrained(tmp)

        return ckpt.write_atomic_folder(self.run_dir / "adapter", write, replace=True)

    def cleanup(self) -> None:
        for name in ("optimizer", "scheduler", "model"):
            if hasattr(self, name):
                delattr(self, name)
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


# -- helpers -----------------------------------------------------------------------------------


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return f"cuda:{device.index or 0} ({torch.cuda.get_device_name(device)})"
    return "cpu"


def _cuda_mem(device: torch.device, fn: str) -> float | None:
    if device.type != "cuda":
        return None
    return float(getattr(torch.cuda, fn)(device))


def _setup_identity(c: TrainConfig) -> dict[str, Any]:
    """The settings a checkpoint can only be resumed with (the data is checked by its fingerprint)."""
    return {
        "model.ref": c.model.ref,
        "quant": asdict(c.quant),
        "lora": {k: v for k, v in asdict(c.lora).items() if k != "dropout"},
        # the batch of a step, not its split into micro-batches (see the module docstring)
        "train.micro_batch_size x gradient_accumulation_steps": c.train.micro_batch_size
        * c.train.gradient_accumulation_steps,
        "train.seed": c.train.seed,
    }


def resume_blockers(before: TrainConfig, after: TrainConfig) -> list[str]:
    """Why a run checkpointed under ``before`` would not resume under ``after`` (empty: it would).

    Judged from the two configs alone, before loading anything: any change of a data setting
    counts (a resume then compares the prepared data's fingerprint). The app uses it to offer
    "apply and resume" or "apply and start a new run" for an out-of-memory fix.
    """

    def identity(c: TrainConfig) -> dict[str, Any]:
        data = {f"data.{k}": v for k, v in asdict(c.data).items() if k != "cache"}
        for key in ("data.path", "data.validation_path"):
            if data[key] and c.resolve(data[key]).exists():
                data[key] = str(c.resolve(data[key]).resolve())
        return {**_setup_identity(c), **data}

    a, b = identity(before), identity(after)
    return [f"{k}: {a[k]!r} -> {b[k]!r}" for k in a if a[k] != b[k]]


def run(
    cfg: TrainConfig,
    sink: EventSink | None = None,
    control: RunControl | None = None,
    *,
    resume: bool | str | Path | None = None,
    force_resume: bool = False,
) -> RunFinished:
    """Train one run. Events go to ``sink`` and to ``<output.dir>/events.jsonl``.

    Errors are reported as a ``RunFailed`` event and then raised.
    """
    run_dir = cfg.output_dir
    run_dir.mkdir(parents=True, exist_ok=True)
    lock = ckpt.RunLock(run_dir)
    lock.acquire()  # raises before anything is written if another run lives here
    file_sink = JsonlFileSink(run_dir / "events.jsonl")
    out = MultiSink(file_sink, sink or NullSink())
    trainer = Trainer(cfg, out, control, resume=resume, force_resume=force_resume)
    try:
        trainer.setup()
        return trainer.train()
    except BaseException as e:
        hint = getattr(e, "hint", None)
        message = str(e)
        fixes = None
        if isinstance(e, torch.cuda.OutOfMemoryError):
            trainer.cleanup()  # give the memory back before anything else runs
            device = getattr(trainer, "device", None)
            card = torch.cuda.get_device_properties(device).total_memory if device and device.type == "cuda" else None
            fixes = oom_fixes(cfg, trainer.data, card)
            hint = oom_hint(cfg)
            if fixes:
                hint = "Out of GPU memory. Changes that fit: " + "; ".join(f["description"] for f in fixes[:3]) + "."
            message = f"The GPU ran out of memory at step {trainer.step + 1}; the last checkpoint is kept."
        elif isinstance(e, KeyboardInterrupt):
            message = "Interrupted; the last checkpoint is kept."
        out.emit(
            RunFailed(
                error_type=type(e).__name__,
                message=message,
                traceback=traceback.format_exc(),
                step=trainer.step,
                last_checkpoint=str(p) if (p := ckpt.latest_checkpoint(trainer.ckpt_dir)) else None,
                hint=hint,
                fixes=fixes,
            )
        )
        raise
    finally:
        trainer.cleanup()
        out.close()
        lock.release()
