"""Paged optimizer state spilling to CPU RAM, shown on a GPU (issue 21, goal 7).

    python bench/spill.py [--shape llama-1b] [--rank 2048] [--steps 4] [--optimizer paged_adamw_32bit]

A large LoRA rank (r=2048 on all linear layers of the Llama-1B shape: 1.44e9 trainable
parameters, 11.5 GB of 32-bit Adam state) makes the optimizer state the biggest thing on the
card. Four runs, each in a fresh subprocess, 2048 x 1, every layer checkpointed:

- free: the paged optimizer, then the same optimizer unpaged (``adamw_32bit``: bitsandbytes'
  own, state in torch's allocator), on the whole card: tokens/s of both where both fit;
- squeezed: the same two with a ballast tensor taking the card's memory down to what the
  budget says the run needs outside the optimizer state (its ``torch_reserved``, +10%) plus
  half the state. The unpaged run must run out of memory; the paged one must finish, the
  driver moving the state's pages between GPU and CPU RAM.

Why a ballast and not ``set_per_process_memory_fraction``: the fraction caps torch's allocator
only. Paged state is CUDA managed memory, outside torch: under a cap the paged run would fit
with its whole state still on the GPU, and nothing would page. A ballast takes the memory
itself, as a smaller card would.

Reported next to each: the budget's estimate for the card the run saw (``spill_to_cpu_bytes``,
what it predicts will page out) and the engine's own ``StepMetrics.paged_out`` (a lower bound
read from the device's free memory after each step). Prints one JSON line per run; writes
``bench/results/<date>-<card>-spill-<shape>-<HHMM>.json`` (also to $OUT when set).
"""

from __future__ import annotations

import argparse
import copy
import datetime
import json
import os
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

GiB = 2**30


def gib(n: float | None) -> float | None:
    return None if n is None else round(n / GiB, 2)


def overrides(args: argparse.Namespace, optimizer: str) -> list[str]:
    return [f"lora.rank={args.rank}", f"lora.alpha={args.rank}", f"optim.optimizer={optimizer}"]


def worker(args: argparse.Namespace) -> dict:
    import torch
    from speed import build_trainer

    from qlora_engine import budget
    from qlora_engine.config import TrainConfig, apply_overrides
    from qlora_engine.events import StepMetrics
    from qlora_engine.vram import usable_vram

    seq = args.seq
    stats = {"max": seq, "p95": seq, "median": seq}
    # The config names paged optimizers and adamw_8bit only: the unpaged twin of the paged run
    # is built by the engine's own optim.build_optimizer after setup (the state is made at the
    # first step, so nothing of the paged one ever exists), as bench/ab.py swaps optimizers.
    paged_name = args.optimizer if args.optimizer.startswith("paged_") else "paged_" + args.optimizer
    extra = overrides(args, paged_name)
    base = [f"model.ref={args.path}", "data.path=synthetic", f"data.max_length={seq}", "train.micro_batch_size=1",
            "train.gradient_accumulation_steps=1", "lora.target_modules=[all-linear]", "train.gradient_checkpointing=true"]  # fmt: skip
    # the budget of the paged run sizes the squeeze the same for both optimizers
    sizing = budget.estimate(apply_overrides(TrainConfig(), [*base, *overrides(args, paged_name)]), data_stats=stats)
    paged = sizing.details.get("paged_optimizer_bytes", 0)
    ballast = None
    device = torch.device("cuda")
    if args.squeeze:
        free, _ = torch.cuda.mem_get_info()
        keep = int(sizing.torch_reserved * 1.10 + 0.5 * paged)
        ballast = torch.empty(max(0, free - keep), dtype=torch.uint8, device=device)
    card = usable_vram(device) - (ballast.numel() if ballast is not None else 0)  # the ballast is torch's: not the run's
    res: dict = dict(optimizer=args.optimizer, squeezed=args.squeeze, rank=args.rank, seq=seq,
                     ballast_gib=gib(ballast.numel()) if ballast is not None else 0, card_for_run_gib=gib(card),
                     budget_paged_state_gib=gib(paged), budget_torch_reserved_gib=gib(sizing.torch_reserved))  # fmt: skip
    try:
        trainer, sink, _ = build_trainer(args.path, seq, 1, args.steps, extra, warmup=args.warmup)
        if args.optimizer != paged_name:
            from qlora_engine import optim

            ocfg = copy.copy(trainer.cfg.optim)
            object.__setattr__(ocfg, "optimizer", args.optimizer)
            trainer.optimizer = optim.build_optimizer(ocfg, trainer.params)
            trainer.scheduler = optim.build_scheduler(ocfg, trainer.optimizer, trainer.total_steps)
        res["optimizer_class"] = type(trainer.optimizer).__name__
        est = budget.estimate(trainer.plan.config, data_stats=stats, gpu_bytes=card)
        res["budget"] = {"total_gib": gib(est.total), "torch_reserved_gib": gib(est.torch_reserved),
                         "spill_to_cpu_gib": gib(est.spill_to_cpu_bytes),
                         # unpaged, the same state bytes sit in torch's allocator: it fits if the total does
                         "fits": est.fits if args.optimizer == paged_name else est.total <= card}  # fmt: skip
        trainer.train()
        steps = sink.of(StepMetrics)
        measured = steps[args.warmup :]
        tps = sorted(e.tokens_per_second for e in measured)
        res.update(
            completed=True,
            tok_s=round(tps[len(tps) // 2]),
            step_s=[round(e.tokens / e.tokens_per_second, 3) for e in measured if e.tokens_per_second],
            loss=round(steps[-1].loss, 3),
            peak_reserved_gib=gib(max(e.cuda_reserved or 0 for e in steps)),
            paged_out_gib=[gib(e.paged_out) for e in steps],  # the engine's own figure, per step
        )
    except torch.OutOfMemoryError as e:
        res.update(completed=False, error="OutOfMemoryError: " + str(e).split("\n")[0][:200])
    except Exception as e:
        res.update(completed=False, error=f"{type(e).__name__}: {str(e)[:300]}")
    return res


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", default="llama-1b")
    ap.add_argument("--rank", type=int, default=2048)
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--optimizer", default="paged_adamw_32bit", help="the paged optimizer; its unpaged twin runs too")
    ap.add_argument("--runs", default="free,squeezed", help="which pairs to run")
    ap.add_argument("--timeout", type=float, default=150.0, help="seconds a run may take (model load included)")
    ap.add_argument("--worker", action="store_true")
    ap.add_argument("--squeeze", action="store_true")
    args = ap.parse_args()
    args.path = f"/tmp/ckpt-{args.shape}"
    if args.worker:
        print("RESULT " + json.dumps(worker(args)), flush=True)
        return

    import torch
    from speed import prepare_checkpoint, versions

    card = torch.cuda.get_device_name(0)
    prepare_checkpoint(args.shape, args.path)
    out = dict(date=datetime.date.today().isoformat(), card=card, shape=args.shape, versions=versions(), results=[])
    name = f"{out['date']}-{card.replace(' ', '-')}-spill-{args.shape}-{datetime.datetime.now():%H%M}.json"
    unpaged = args.optimizer.removeprefix("paged_")
    for run in filter(None, args.runs.split(",")):
        for optimizer in (args.optimizer, unpaged):
            cmd = [sys.executable, __file__, "--worker", "--shape", args.shape, "--rank", str(args.rank),
                   "--seq", str(args.seq), "--steps", str(args.steps), "--warmup", str(args.warmup),
                   "--optimizer", optimizer] + (["--squeeze"] if run == "squeezed" else [])  # fmt: skip
            try:
                proc = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout)
                lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
                res = json.loads(lines[-1][7:]) if lines else dict(optimizer=optimizer, run=run, error=proc.stderr[-800:])
            except subprocess.TimeoutExpired:  # paging that thrashes: slower than the call can wait
                res = dict(optimizer=optimizer, run=run, completed=False, error=f"still running after {args.timeout} s; killed")
            print(json.dumps(res), flush=True)
            out["results"].append(res)
            for where in filter(None, [HERE / "results", Path(os.environ["OUT"]) if os.environ.get("OUT") else None]):
                where.mkdir(parents=True, exist_ok=True)
                (where / name).write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
