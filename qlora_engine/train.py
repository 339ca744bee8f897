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
from collections import deque
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

# Expandable segments let the CUDA caching allocator grow blocks in place instead of
# stranding partly used ones: reserved memory stays close to allocated memory (several GiB
# less at 8B scale). Read when CUDA first allocates, so it must be set before that; a value
# the user set wins.
os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")

import torch  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

from qlora_engine import checkpoint as ckpt
from qlora_engine import fast_lora, loss_weights, model_ref, models, optim
from qlora_engine.config import TrainConfig
from qlora_engine.control import Aborted, RunControl
from qlora_engine.data import IGNORE_INDEX, PreparedData, collate, count_tokens, prepare_data
from qlora_engine.decisions import RunPlan
from qlora_engine.distributed import World
from qlora_engine.errors import DataError, QLoRAError, ResumeError, TrainingDiverged
from qlora_engine.events import (
    CheckpointSaved,
    EvalResult,
    EventSink,
    LogLine,
    PhaseChanged,
    RunFinished,
    RunStarted,
    StepMetrics,
)
from qlora_engine.optim import build_optimizer, build_scheduler, warmup_for
from qlora_engine.scrub import scrub_tree


@dataclass
class RunInputs:
    """What a run reads before its model loads (:func:`prepare_inputs`)."""

    device: torch.device
    dtype: torch.dtype
    model_folder: Path
    tokenizer: Any
    data: PreparedData


def prepare_inputs(
    cfg: TrainConfig, sink: EventSink, data: PreparedData | None = None, *, world: World | None = None
) -> RunInputs:
    """Resolve the device and the model folder, load the tokenizer and prepare the data.

    ``data``: samples already prepared by the caller (benchmarks); None reads ``cfg.data``.
    ``world``: under torchrun, each process takes its own GPU (``cuda:LOCAL_RANK``).
    """
    device = (world or World()).pick_device(models.pick_device(cfg.train.device))
    dtype = models.pick_compute_dtype(cfg.quant.compute_dtype, device)
    sink.emit(PhaseChanged(phase="resolving", detail=cfg.model.ref))
    folder = model_ref.resolve_model(cfg.model.ref, revision=cfg.model.revision, sink=sink, token=cfg.model.token)
    tokenizer = models.load_tokenizer(folder, trust_remote_code=cfg.model.trust_remote_code)
    if data is None:
        sink.emit(PhaseChanged(phase="preparing_data", detail=cfg.data.path))
        data = prepare_data(cfg, tokenizer, sink)
    if not data.train:
        raise DataError("no training samples left after preparation.", file=cfg.data.path)
    return RunInputs(device, dtype, folder, tokenizer, data)


def find_resume_checkpoint(run_dir: Path, resume: bool | str | Path | None) -> Path | None:
    """The checkpoint to resume from (``resume`` True: the newest), or None for a new run.

    A new run in a folder that already holds one is refused before anything is written.
    """
    ckpt_dir = run_dir / "checkpoints"
    if not resume:
        if ckpt.list_checkpoints(ckpt_dir) or (run_dir / "adapter").exists():
            raise QLoRAError(
                "this folder already holds a run (checkpoints or an adapter).",
                file=run_dir,
                field="output.dir",
                fix="Continue it with --resume, or set output.dir to a new folder; nothing there was changed.",
            )
        return None
    if resume is True:
        found = ckpt.newest_checkpoint_folder(ckpt_dir)  # damaged: named when it is verified
        if found is None:
            raise ResumeError("no complete checkpoint to resume from.", file=ckpt_dir)
        return found
    return Path(resume)


class Trainer:
    """One run of a :class:`~qlora_engine.plan.RunPlan`: the plan says what runs, the trainer runs it."""

    def __init__(
        self,
        plan: RunPlan,
        inputs: RunInputs,
        sink: EventSink,
        control: RunControl | None = None,
        *,
        resume_from: Path | None = None,
        force_resume: bool = False,
        world: World | None = None,
    ) -> None:
        self.plan = plan
        self.cfg = plan.config  # every 'auto' settled; plan.requested is what the user wrote
        self.sink = sink
        self.control = control or RunControl()
        self.resume_from = resume_from
        self.force_resume = force_resume
        # This process's place among those sharing the run (one process: every method is the identity).
        self.world = world or World()
        self.device, self.dtype = inputs.device, inputs.dtype
        self.model_folder, self.tokenizer, self.data = inputs.model_folder, inputs.tokenizer, inputs.data
        self.run_dir = self.cfg.output_dir
        self.ckpt_dir = self.run_dir / "checkpoints"
        self.total_steps = plan.total_steps
        self.samples_per_step = self.cfg.train.micro_batch_size * self.cfg.train.gradient_accumulation_steps
        self._order: tuple[int, list[int]] = (-1, [])  # (epoch, its sample order), the one in use
        self.step = 0
        self.last_loss: float | None = None
        self.last_eval_loss: float | None = None
        self.last_checkpoint: Path | None = None
        self.grown = False  # whether an out-of-memory step made every layer checkpointed

    # -- setup -------------------------------------------------------------------------------

    def setup(self) -> None:
        cfg, emit = self.cfg, self.sink.emit
        _seed_everything(cfg.train.seed)
        detail = f"{self.model_folder} in 4-bit {cfg.quant.quant_type} on {self.device}"
        emit(PhaseChanged(phase="loading_model", detail=detail))
        # FSDP shards whole tensors of one dtype: the packed 4-bit weights are stored in the compute dtype.
        storage = self.dtype if cfg.train.strategy == "fsdp" else torch.uint8
        base = models.load_quantized_model(cfg, self.model_folder, self.device, self.dtype, storage=storage)
        compiled = cfg.train.compile != "off"
        self.kernels = models.apply_fused_kernels(base, cfg.train.kernels, self.device, loss_only=compiled)
        torch.manual_seed(cfg.train.seed)  # the LoRA init depends on the seed only
        self.model = models.wrap_with_lora(base, cfg)
        self.fast_lora = 0
        if cfg.train.fast_lora:
            self.fast_lora, skipped = fast_lora.enable(self.model, dense=cfg.train.keep_dequantized is True)
            if skipped:
                why = ", ".join(f"{n} for {reason}" for reason, n in skipped.items())
                emit(LogLine(level="info", message=f"train.fast_lora: peft's LoRA path kept on {why}"))
        if cfg.train.mlp_chunk_tokens:
            tiled = models.tile_mlps(self.model, cfg.train.mlp_chunk_tokens)
            emit(LogLine(level="info", message=f"{tiled} MLPs run in chunks of {cfg.train.mlp_chunk_tokens} tokens"))
        self.checkpointed = 0
        if cfg.train.gradient_checkpointing:
            offload = cfg.train.offload_activations and self.device.type == "cuda"
            if cfg.train.offload_activations and not offload:
                emit(LogLine(level="info", message="train.offload_activations: nothing to move on the CPU; ignored"))
            self.checkpointed = models.enable_gradient_checkpointing(
                self.model, cfg.train.checkpoint_layers, offload=offload
            )
            if self.plan.requested.train.checkpoint_layers is not None:
                note = f"gradient checkpointing on the lowest {self.checkpointed} decoder layers (train.checkpoint_layers)"
                emit(LogLine(level="info", message=note))
        self.compiled = fast_lora.CompiledBlocks(self.model, cfg.train.compile, self.device, self.world.size) if compiled else None
        if note := getattr(self.compiled, "note", None):
            emit(LogLine(level="info", message=note))
        self.model.train()
        self.body = models.decoder_body(self.model)  # where loss weights act (qlora_engine.loss_weights)
        self.resumed_from = None
        if self.resume_from is not None:
            self._load_adapter_weights(self.resume_from)  # before sharding: FSDP splits what is loaded
        # -- several processes: the module the step calls (DDP around the model, or FSDP sharding it)
        self.net = self.world.wrap(self.model, decoder_layers=models.decoder_layers(self.model))
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        # the GPU's use outside torch before any paged optimizer state exists (StepMetrics.paged_out)
        self._outside_torch = optim.device_outside_torch(self.device) if self.device.type == "cuda" else 0
        # one flat buffer for one process; DDP's buckets and FSDP's shards own the parameters' storage
        self.optimizer = build_optimizer(cfg.optim, self.params, flat=self.world.strategy == "single")
        self.scheduler = build_scheduler(cfg.optim, self.optimizer, self.total_steps)
        if note := warmup_for(cfg.optim.warmup_steps, self.total_steps)[1]:  # short runs
            emit(LogLine(level="warning", message=note))
        if self.resume_from is not None:
            self._load_training_state(self.resume_from)
        if self.world.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            try:
                self.plan.requested.save(self.run_dir / "config.yaml")
            except OSError as e:
                code = ckpt.disk_errno(e, self.run_dir)
                if code is None:
                    raise
                raise ckpt.disk_full(self.run_dir / "config.yaml", code, 1 << 16) from None
        self.facts = {
            **models.model_facts(self.model),
            "kernels": self.kernels,
            "fast_lora_layers": self.fast_lora,
            "dequantized": cfg.train.keep_dequantized is True and self.fast_lora > 0,
            "checkpointed_layers": self.checkpointed,
            "compiled": cfg.train.compile,
            "quant_storage": str(storage).removeprefix("torch."),
        }
        emit(
            RunStarted(
                run_dir=str(self.run_dir),
                config=self.plan.requested.to_dict(),
                model=self.facts,
                device=_device_name(self.device),
                total_steps=self.total_steps,
                resumed_from=str(self.resume_from) if self.resume_from else None,
                start_step=self.step,
                vram_estimate=self.plan.vram_estimate,
                data=self.data.report_dict(),
                decisions=[d.to_dict() for d in self.plan.decisions],
                processes=self.world.processes() or None,
            )
        )

    def _checkpoint_every_layer(self) -> None:
        """After an out-of-memory step when the plan left layers out of checkpointing: checkpoint them all."""
        self.optimizer.zero_grad(set_to_none=True)
        before = self.checkpointed
        self.grown = True
        offload = self.cfg.train.offload_activations and self.device.type == "cuda"
        dense = " and keeps no weight dequantized" if fast_lora.drop_dense(self.model) else ""  # as the plan's fallback
        if self.compiled is not None:
            self.compiled.undo()
        self.checkpointed = models.enable_gradient_checkpointing(self.model, None, offload=offload)
        if self.compiled is not None:
            self.compiled.apply()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
        self.facts.update(checkpointed_layers=self.checkpointed, dequantized=False)
        message = (
            f"The GPU ran out of memory at step {self.step + 1} with {before} of {self.checkpointed} layers "
            f"checkpointed (train.gradient_checkpointing auto); the run checkpoints every layer from now on{dense} "
            "and the step runs again."
        )
        self.sink.emit(LogLine(level="warning", message=message))

    def _stop_compiling(self, failure: str) -> None:
        """After torch.compile failed on the layers: run them eager from now on (the step runs again)."""
        self.optimizer.zero_grad(set_to_none=True)  # the micro-batches before the failure accumulated
        self.sink.emit(LogLine(level="warning", message=self.compiled.give_up(failure, self.step + 1)))
        self.compiled, self.facts["compiled"] = None, "off"

    def _identity(self) -> dict[str, Any]:
        """What must not change between a checkpoint and its resumption."""
        return {**ckpt.setup_identity(self.cfg), "data.fingerprint": self.data.fingerprint}

    def _load_adapter_weights(self, folder: Path) -> None:
        """A checkpoint's adapter weights into the model, after checking it belongs to this setup."""
        # lazy: peft costs seconds to import; the app imports this module for resume_blockers
        from peft import set_peft_model_state_dict

        state = ckpt.load_state(folder)  # every file checked against the manifest first
        changes = ckpt.identity_changes(state.get("identity", {}), self._identity())
        if changes and not self.force_resume:
            raise ckpt.changed_setup(folder, changes)
        weights = load_file(folder / "adapter_model.safetensors", device=str(self.device))
        result = set_peft_model_state_dict(self.model, weights)
        if getattr(result, "unexpected_keys", None):
            raise ResumeError(f"{folder}: the adapter does not fit this model ({result.unexpected_keys[:3]} ...).")

    def _load_training_state(self, folder: Path) -> None:
        """A checkpoint's optimizer, schedule, RNG and step (every process loads the same whole state)."""
        state = ckpt.load_state(folder)
        self.world.load_optimizer_state(self.model, self.optimizer, ckpt.torch_load_own(folder, "optimizer.pt"))
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
        multiple = self.compiled.PAD_MULTIPLE if self.compiled is not None else 1
        return collate(rows, self.tokenizer.pad_token_id, multiple=multiple, cap=self.cfg.data.max_length)

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
        start_step = self.step
        while self.step < self.total_steps:
            # Requests (stop, save, abort, pause) of any process, agreed by all at this boundary.
            req = self.world.agree(self.control)
            if req.abort:
                emit(LogLine(level="warning", message=f"aborted at step {self.step}; nothing saved after the last checkpoint"))
                return self._finish(t_start, stopped=True, save=False)
            if req.stop and self.step == start_step:
                # stopped (SIGTERM, Ctrl-C, 'stop') before the first step: nothing new to save
                emit(LogLine(level="warning", message=f"stopped before step {self.step + 1}; nothing new to save"))
                return self._finish(t_start, stopped=True, save=False)
            if req.stop:
                stopped = True
                break
            if req.save and not self._saved_at_step():
                self.save_checkpoint()
                emit(PhaseChanged(phase="training"))
            t0 = time.perf_counter()
            if self.device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(self.device)
            batches = [self.micro_batch(self.step * ga + i) for i in range(ga)]
            # Normalize by the label count of the whole optimizer step (every process counts all
            # of it), so every answer token weighs the same however the tokens fall into
            # micro-batches and processes.
            n_labels = sum(int((b["labels"][:, 1:] != IGNORE_INDEX).sum()) for b in batches)
            weight_total = loss_weights.step_total(batches)
            n_tokens = sum(count_tokens(b, self.tokenizer.pad_token_id) for b in batches)
            mine = [batches[i] for i in self.world.share(ga)]  # this process's part of the step
            try:
                loss_sum = self._forward_backward(mine, n_labels, weight_total)
            except torch.cuda.OutOfMemoryError:
                if not self._auto_can_grow():
                    raise
                retry = self._checkpoint_every_layer  # outside the handler: the traceback holds the step's tensors
            except torch._dynamo.exc.TorchDynamoException as e:  # the compiler failed on these layers
                if self.compiled is None:
                    raise
                retry = partial(self._stop_compiling, f"{type(e).__name__}: {' '.join(str(e).split())[:300]}")
            else:
                retry = None
            if retry is not None:
                retry()
                loss_sum = self._forward_backward(mine, n_labels, weight_total)
            max_norm = cfg.optim.max_grad_norm if cfg.optim.max_grad_norm > 0 else float("inf")
            grad_norm = torch.nn.utils.clip_grad_norm_(self.params, max_norm)
            loss = float(self.world.sum(loss_sum))  # a CPU-GPU sync point, once per optimizer step
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
                        paged_out=optim.paged_out_bytes(self.optimizer, self.device, self._outside_torch),
                    )
                )
            if cfg.train.eval_steps and self.step % cfg.train.eval_steps == 0 and self.step < self.total_steps:
                self.evaluate()
            due = cfg.train.save_steps and self.step % cfg.train.save_steps == 0 and self.step < self.total_steps
            if due:
                self.save_checkpoint()
                emit(PhaseChanged(phase="training"))
        if self.data.validation:
            self.evaluate()
        return self._finish(t_start, stopped=stopped, save=True)

    def _forward_backward(self, batches: list[dict[str, torch.Tensor]], n_labels: int, weight_total: float | None) -> torch.Tensor:
        """Forward and backward of a step's micro-batches (gradients accumulate); the summed plain loss."""
        loss_sum = torch.zeros((), device=self.device)
        n_items = torch.tensor(max(n_labels, 1), device=self.device)
        for i, b in enumerate(batches):
            b = {k: v.to(self.device, non_blocking=True) for k, v in b.items()}
            if self.compiled is not None:
                self.compiled.step_begins()
            # Several processes exchange gradients once per step, on each one's last micro-batch.
            with self.world.accumulating(self.net, last=i == len(batches) - 1):
                # Keep only the loss: holding the model output would keep the logits alive
                # through the backward pass (2 bytes x tokens x vocabulary).
                # use_cache=False also matters for packed batches: transformers only keeps
                # attention inside each packed sample (from the position_ids) without a KV cache.
                with loss_weights.weighted(self.body, b.pop(loss_weights.KEY, None), n_labels, weight_total):
                    micro_loss = self.net(**b, use_cache=False, num_items_in_batch=n_items).loss
                # DDP and FSDP average gradients over processes; the loss is already a share of
                # the global sum, so the scale (the process count) makes theirs a sum.
                # One process: no scale at all (a multiply would add a scalar to the backward's peak).
                scale = self.world.grad_scale
                (micro_loss if scale == 1 else micro_loss * scale).backward()
            loss_sum += micro_loss.detach()
        return loss_sum

    def _auto_can_grow(self) -> bool:
        """Whether the plan left layers out of checkpointing that an out-of-memory error can take back.

        Not with several processes: one process re-running a step alone would fall out of step
        with the others' gradient exchange; the run fails instead (naming the rank) and resumes.
        """
        return self.plan.oom_fallback is not None and not self.grown and self.world.size == 1

    def _saved_at_step(self) -> bool:
        return self.last_checkpoint is not None and self.last_checkpoint.name.endswith(f"{self.step:06d}")

    def _finish(self, t_start: float, *, stopped: bool, save: bool) -> RunFinished:
        adapter_dir = None
        if save:
            if not self._saved_at_step():
                self.save_checkpoint()
            if self.control.abort_requested:  # an abort while saving: the checkpoint stays, no adapter
                raise Aborted()
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
        starts = range(0, len(self.data.validation), bs)
        total, count = 0.0, 0
        for j in self.world.eval_share(len(starts)):  # several processes: each its share of the batches
            i = starts[j]
            b = collate(self.data.validation[i : i + bs], self.tokenizer.pad_token_id, weights=False)  # plain loss
            n = int((b["labels"][:, 1:] != IGNORE_INDEX).sum())
            if n == 0 and self.world.strategy != "fsdp":  # FSDP: every process joins every forward
                continue
            b = {k: v.to(self.device) for k, v in b.items()}
            total += float(self.model(**b, use_cache=False).loss) * n
            count += n
        self.model.train()
        total, count = self.world.sum(torch.tensor([total, float(count)], dtype=torch.float64)).tolist()
        loss = total / max(count, 1)
        self.last_eval_loss = loss
        self.sink.emit(EvalResult(step=self.step, loss=loss, tokens=count))
        self.sink.emit(PhaseChanged(phase="training"))
        return loss

    # -- saving --------------------------------------------------------------------------------

    def save_checkpoint(self) -> Path:
        """Every process calls it (FSDP gathers the state together); rank 0 alone writes."""
        self.sink.emit(PhaseChanged(phase="saving", detail=f"checkpoint at step {self.step}"))
        adapter = self.world.adapter_state(self.model)
        optimizer = self.world.optimizer_state(self.model, self.optimizer)
        self._check_replicas(adapter)
        path = self.ckpt_dir / ckpt.checkpoint_name(self.step)
        if not self.world.is_main:
            self.world.barrier()  # returns once rank 0 has written the checkpoint
            self.last_checkpoint = path
            return path
        state = {
            "step": self.step,
            "total_steps": self.total_steps,
            "micro_batches_seen": self.step * self.cfg.train.gradient_accumulation_steps,
            "last_loss": self.last_loss,
            "identity": self._identity(),
        }

        def write(tmp: Path) -> None:
            self.model.save_pretrained(tmp, state_dict=adapter, safe_serialization=True)
            ckpt.save_torch(optimizer, tmp / "optimizer.pt")
            ckpt.save_torch(self.scheduler.state_dict(), tmp / "scheduler.pt")
            ckpt.save_torch(ckpt.rng_state(), tmp / "rng.pt")
            (tmp / ckpt.STATE).write_text(json.dumps(state, indent=1, default=str), encoding="utf-8")
            scrub_tree(tmp)  # before the manifest: its checksums are of the files as they stay
            ckpt.write_marker(tmp, {"step": self.step})

        try:
            path = ckpt.write_atomic_folder(path, write, replace=True)
            # never the one just written, nor the one this run resumed from (still the only good one of
            # its line until a newer one exists)
            ckpt.prune_checkpoints(self.ckpt_dir, self.cfg.train.save_total_limit, protect=(path, self.resumed_from))
        finally:
            self.world.barrier()  # the others wait for the write (and learn of its failure by their own error)
        self.last_checkpoint = path
        self.sink.emit(CheckpointSaved(step=self.step, path=str(path)))
        return path

    def _check_replicas(self, adapter: dict[str, torch.Tensor]) -> None:
        """Several processes: every one must hold the same adapter; rank 0 logs their fingerprints."""
        if self.world.size == 1:
            return
        # lazy: peft costs seconds to import; the app imports this module for resume_blockers
        from peft import get_peft_model_state_dict

        ddp = self.world.strategy == "ddp"
        saved = get_peft_model_state_dict(self.model, state_dict=adapter) if ddp else {}
        prints = self.world.gather(ckpt.tensors_fingerprint(saved) if ddp else "")
        if not self.world.is_main or not ddp:
            return
        if len(set(prints)) != 1:
            raise RuntimeError(f"the processes' adapters differ at step {self.step}: {prints}")
        self.sink.emit(LogLine(level="info", message=f"adapter identical on {len(prints)} processes: {prints[0]}"))

    def save_adapter(self) -> Path | None:
        """The final adapter, whole (FSDP gathers it); rank 0 writes it, the others get None."""
        adapter = self.world.adapter_state(self.model)
        if not self.world.is_main:
            self.world.barrier()
            return None

        def write(tmp: Path) -> None:
            self.model.save_pretrained(tmp, state_dict=adapter, safe_serialization=True)
            self.tokenizer.save_pretrained(tmp)

        try:
            return ckpt.write_atomic_folder(self.run_dir / "adapter", write, replace=True)
        finally:
            self.world.barrier()

    def cleanup(self) -> None:
        for name in ("optimizer", "scheduler", "net", "model"):
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
    return None if device.type != "cuda" else float(getattr(torch.cuda, fn)(device))
