"""Several processes, one run: data-parallel (DDP) and sharded (FSDP2) QLoRA under ``torchrun``.

``torchrun`` starts one process per GPU (``qlora-engine train CONFIG --gpus N`` starts it for
you; see :mod:`qlora_engine.cluster`); each runs the same ``qlora-engine train`` and this module
makes them one run. Nothing here is a scheme of our own: the process group, DDP and FSDP2 are
PyTorch's, used the way ``accelerate`` and the Hugging Face Trainer use them.

**The same run as one process.** An optimizer step's batch is ``micro_batch_size x
gradient_accumulation_steps`` samples, however many processes share it: the step's
micro-batches (numbers ``step*ga .. step*ga+ga-1`` of the run's one seeded stream, see
:mod:`qlora_engine.train`) are split into contiguous runs, one per process. Every process
counts the answer tokens of the whole step (it can: the data order is a pure function of the
seed), so each micro-batch's loss is divided by the step's global label count, and the gradient
average that DDP and FSDP take over processes is undone by scaling the loss by the process count.
The gradients summed over processes are then exactly those of one process running every
micro-batch; the learning-rate schedule and the step count do not depend on the process count,
and a checkpoint written by N processes resumes under M.

**One writer.** Only rank 0 writes events, logs, checkpoints and the adapter; the others report
through a null sink and wait for the writes at a barrier.

**No hangs.** Every collective has a timeout (``QLORA_DIST_TIMEOUT`` seconds, 30 minutes by
default: long enough for rank 0 to tokenize a large dataset while the others wait); a process
that dies closes its connections, so the others fail at their next collective at once, with an
error naming the rank that is gone (:class:`~qlora_engine.errors.DistributedError`).

**Stopping together.** SIGINT and SIGTERM (``torchrun`` forwards both; SLURM sends SIGTERM
before a time limit) and the control lines on rank 0's stdin are requests; at each step boundary
the processes agree on them (one small all-reduce), so all stop after the same step and rank 0
saves once.
"""

from __future__ import annotations

import contextlib
import datetime
import os
import socket
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from qlora_engine.control import RunControl
from qlora_engine.errors import DistributedError

TIMEOUT_ENV = "QLORA_DIST_TIMEOUT"
DEFAULT_TIMEOUT_S = 1800.0
STRATEGIES = ("single", "ddp", "fsdp")


def launched() -> tuple[int, int, int]:
    """``(rank, world_size, local_rank)`` of this process as ``torchrun`` set them; ``(0, 1, 0)`` alone."""
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)), int(os.environ.get("LOCAL_RANK", 0))


def is_main_process() -> bool:
    """Whether this process is rank 0 (or the only one): the one that writes and reads stdin."""
    return launched()[0] == 0


def collective_timeout() -> datetime.timedelta:
    try:
        seconds = float(os.environ.get(TIMEOUT_ENV, DEFAULT_TIMEOUT_S))
    except ValueError:
        seconds = DEFAULT_TIMEOUT_S
    return datetime.timedelta(seconds=max(seconds, 1.0))


@dataclass(frozen=True)
class Requests:
    """The control requests every process agreed on at a step boundary."""

    stop: bool = False
    abort: bool = False
    save: bool = False


class World:
    """This process's place in the run: rank, size, strategy, and every collective the trainer uses.

    One process (``strategy`` single) makes each method a no-op or the identity, so the trainer's
    step has no ``if distributed`` branches.
    """

    def __init__(self, rank: int = 0, size: int = 1, local_rank: int = 0) -> None:
        self.rank, self.size, self.local_rank = rank, size, local_rank
        self.strategy = "single"
        self.control_group: Any = (
            None  # gloo: the CPU-side collectives (requests, counts), even when NCCL carries gradients
        )
        self.peers: list[tuple[int, str, str]] = [(os.getpid(), socket.gethostname(), "")]
        self._owns_group = False

    @classmethod
    def from_env(cls) -> World:
        return cls(*launched())

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def connected(self) -> bool:
        """Whether a process group joins this process to the others (DDP or FSDP, of any size)."""
        return self.strategy != "single"

    def processes(self) -> list[dict[str, Any]]:
        """One record per process of a multi-process run (empty alone): for the run record and the app."""
        if self.size == 1:
            return []
        return [{"rank": r, "pid": pid, "host": host, "device": dev} for r, (pid, host, dev) in enumerate(self.peers)]

    # -- starting and ending -------------------------------------------------------------------

    def pick_device(self, device: torch.device) -> torch.device:
        """This process's card: ``cuda:LOCAL_RANK`` under torchrun (each process owns one GPU)."""
        if device.type == "cuda" and self.size > 1:
            torch.cuda.set_device(self.local_rank)
            return torch.device("cuda", self.local_rank)
        return device

    def connect(self, device: torch.device) -> None:
        """Join torchrun's process group (several processes only; the strategy is chosen later).

        NCCL carries the gradients between GPUs; a gloo group beside it carries the small
        CPU-side collectives (requests, loss sums), so they never wait on a CUDA stream.
        """
        if self.size == 1 or dist.is_initialized():
            return
        timeout = collective_timeout()
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend, timeout=timeout, device_id=device if device.type == "cuda" else None)
        self._owns_group = True
        self.control_group = dist.new_group(backend="gloo", timeout=timeout) if backend != "gloo" else dist.group.WORLD
        peers: list[Any] = [None] * self.size
        me = (os.getpid(), socket.gethostname(), str(device))
        self._collective(dist.all_gather_object, peers, me, group=self.control_group)
        self.peers = [tuple(p) for p in peers]

    def use(self, strategy: str, device: torch.device) -> None:
        """Run ``strategy`` (the plan's ``train.strategy``).

        A ``ddp`` or ``fsdp`` run of one process makes its own process group of one, so the same
        code path runs on one card as on eight.
        """
        if strategy not in STRATEGIES:
            raise ValueError(f"unknown strategy {strategy!r}")
        if strategy == "single":
            if self.size > 1:
                raise DistributedError(
                    f"{self.size} processes were started but train.strategy is 'single'.",
                    field="train.strategy",
                    fix="Set train.strategy to auto, ddp or fsdp, or start one process.",
                )
            return
        self.strategy = strategy
        if not dist.is_initialized():  # one process outside torchrun: a group of one needs no rendezvous
            backend = "nccl" if device.type == "cuda" else "gloo"
            dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1, timeout=collective_timeout())
            self._owns_group = True
            self.control_group = dist.new_group(backend="gloo") if backend != "gloo" else dist.group.WORLD

    def close(self) -> None:
        if self._owns_group and dist.is_initialized():
            with contextlib.suppress(Exception):  # a peer may be gone already: nothing left to agree on
                dist.destroy_process_group()
            self._owns_group = False

    @contextlib.contextmanager
    def main_first(self) -> Iterator[None]:
        """Rank 0 runs the block first (it downloads and fills the data cache), the others after it."""
        if self.size == 1:
            yield
            return
        if self.is_main:
            try:
                yield
            finally:  # a failure on rank 0 releases the others too: they meet the same error themselves
                self._collective(dist.barrier, group=self.control_group)
        else:
            self._collective(dist.barrier, group=self.control_group)
            yield

    # -- the step ------------------------------------------------------------------------------

    def share(self, n: int) -> range:
        """The indices of ``n`` micro-batches (one step's) that this process runs: a contiguous run."""
        per, extra = divmod(n, self.size)
        start = self.rank * per + min(self.rank, extra)
        return range(start, start + per + (1 if self.rank < extra else 0))

    def eval_share(self, n: int) -> range:
        """Validation batches this process evaluates; FSDP needs every process in every forward."""
        if self.strategy == "fsdp":
            return range(n)  # every process sees every batch; the sums then count each N times, the ratio once
        return range(self.rank, n, self.size)

    @property
    def grad_scale(self) -> float:
        """DDP and FSDP average gradients over processes; the loss is a global sum, so undo the average."""
        return float(self.size) if self.connected else 1.0

    def wrap(self, model: torch.nn.Module, *, decoder_layers: list[torch.nn.Module] | None = None) -> torch.nn.Module:
        """The module the step calls: DDP around the model, FSDP2 sharding it in place, or the model itself."""
        if self.strategy == "ddp":
            # Only the LoRA weights are trained: DDP neither broadcasts nor watches the frozen
            # 4-bit base (identical on every process, loaded from the same files).
            model._ddp_params_and_buffers_to_ignore = [
                n for n, p in model.named_parameters() if not p.requires_grad
            ] + [n for n, _ in model.named_buffers()]
            ids = [self.local_rank] if next(iter(model.parameters())).is_cuda else None
            return DistributedDataParallel(model, device_ids=ids)
        if self.strategy == "fsdp":
            # lazy: FSDP runs only; sharding loads torch's FSDP and DTensor modules
            from qlora_engine.sharding import shard_model

            return shard_model(model, decoder_layers or [])
        return model

    @contextlib.contextmanager
    def accumulating(self, net: torch.nn.Module, last: bool) -> Iterator[None]:
        """Skip the gradient exchange on every micro-batch but a process's last one of the step."""
        if self.strategy == "ddp" and not last:
            with net.no_sync():
                yield
        elif self.strategy == "fsdp":
            net.set_requires_gradient_sync(last)
            yield
        else:
            yield

    def sum(self, value: torch.Tensor) -> torch.Tensor:
        """``value`` summed over processes (identity alone)."""
        if not self.connected or self.size == 1:
            return value
        out = value.detach().to(torch.float64).cpu().clone()
        self._collective(dist.all_reduce, out, group=self.control_group)
        return out

    def agree(self, control: RunControl) -> Requests:
        """The requests of any process, agreed by all at this step boundary (waits while paused)."""
        if not self.connected or self.size == 1:
            control.wait_if_paused()
            return Requests(control.stop_requested, control.abort_requested, control.take_save_request())
        while True:
            paused = not control._resume.is_set()
            flags = torch.tensor(
                [control.stop_requested, control.abort_requested, control.take_save_request(), paused],
                dtype=torch.int32,
            )
            self._collective(dist.all_reduce, flags, op=dist.ReduceOp.MAX, group=self.control_group)
            stop, abort, save, paused_any = (bool(x) for x in flags.tolist())
            if save:
                control.request_save()  # held until the loop is not paused
            if not paused_any or stop or abort:
                return Requests(stop, abort, save and control.take_save_request())
            # Paused: poll together, so no collective outlives its timeout while the user waits.
            time.sleep(0.5)

    def barrier(self) -> None:
        if self.connected and self.size > 1:
            self._collective(dist.barrier, group=self.control_group)

    def gather(self, obj: Any) -> list[Any]:
        """Every process's ``obj``, in rank order (alone: ``[obj]``)."""
        if not self.connected or self.size == 1:
            return [obj]
        out: list[Any] = [None] * self.size
        self._collective(dist.all_gather_object, out, obj, group=self.control_group)
        return out

    # -- state to save and resume -------------------------------------------------------------------

    def adapter_state(self, model: torch.nn.Module) -> dict[str, torch.Tensor]:
        """The trainable (LoRA) weights by their names in the model, whole (FSDP gathers them to rank 0)."""
        if self.strategy == "fsdp":
            # lazy: FSDP runs only; sharding loads torch's FSDP and DTensor modules
            from qlora_engine.sharding import full_adapter_state

            return full_adapter_state(model, self.is_main)
        return {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}

    def optimizer_state(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
        """The optimizer's state as one process would hold it (so N processes resume under M)."""
        if self.strategy == "fsdp":
            # lazy: FSDP runs only; sharding loads torch's FSDP and DTensor modules
            from qlora_engine.sharding import full_optimizer_state

            return full_optimizer_state(model, optimizer)
        return optimizer.state_dict()

    def load_optimizer_state(
        self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, state: dict[str, Any]
    ) -> None:
        if self.strategy == "fsdp":
            # lazy: FSDP runs only; sharding loads torch's FSDP and DTensor modules
            from qlora_engine.sharding import load_full_optimizer_state

            load_full_optimizer_state(model, optimizer, state)
        else:
            optimizer.load_state_dict(state)

    # -- failures ------------------------------------------------------------------------------

    def _collective(self, fn: Any, *args: Any, **kw: Any) -> Any:
        try:
            return fn(*args, **kw)
        except RuntimeError as e:  # DistBackendError, DistNetworkError and gloo's own are RuntimeErrors
            raise self.failure(e) from e

    def failure(self, e: BaseException) -> DistributedError:
        """The error to report when a collective failed: which rank is gone, when this host can tell."""
        here = socket.gethostname()

        def dead() -> list[int]:
            return [r for r, (pid, host, _) in enumerate(self.peers) if host == here and not _alive(pid)]

        gone = dead()
        # A killed process closes its sockets before it turns into a zombie: the broken collective
        # can arrive here first. Give the peer a moment to be seen as gone.
        deadline = time.monotonic() + 3.0
        while not gone and time.monotonic() < deadline:
            time.sleep(0.1)
            gone = dead()
        if gone:
            names = ", ".join(f"rank {r} (process {self.peers[r][0]})" for r in gone)
            what = f"{names} of {self.size} stopped; rank {self.rank} stopped too."
        else:
            what = (
                f"another process of the {self.size}-process run stopped or did not answer within "
                f"{collective_timeout().total_seconds():.0f} s; rank {self.rank} stopped too "
                f"({type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''})."
            )
        return DistributedError(
            what,
            fix="The last checkpoint is kept: resume with --resume (with any number of processes). torchrun's "
            f"summary names the process that failed first; {TIMEOUT_ENV} sets the timeout in seconds.",
        )

    def is_collective_failure(self, e: BaseException) -> bool:
        """Whether ``e`` came from the process group (a peer died mid-step), not from the model."""
        if not self.connected or self.size == 1:
            return False
        dist_errors = tuple(
            t for t in (getattr(dist, "DistError", None), getattr(dist, "DistBackendError", None)) if t is not None
        )
        text = str(e)
        return isinstance(e, dist_errors) or any(
            k in text for k in ("Gloo", "gloo", "NCCL", "Connection closed", "Connection reset")
        )


def _alive(pid: int) -> bool:
    """Whether process ``pid`` on this host still runs (a zombie, killed but not yet reaped, does not)."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii") as fh:
            return fh.read().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except OSError:
        if sys.platform.startswith("linux"):
            return False
    try:
        os.kill(pid, 0)
    except OSError:
        return False
    return True
