"""Where a training step's GPU time goes: the engine's step under torch's profiler, kernels by kind.

    python bench/profile_step.py [--shape llama3-8b] [--seq 2048] [--mbs 4] [--extra "train.fast_lora=false"]

Runs the engine's Trainer (as ``bench/speed.py`` does: real load, LoRA, optimizer, random
tokens) for ``--warmup`` steps, then profiles ``--steps`` steps. Prints, per step: the wall
time, the time the GPU was busy (the union of kernel intervals: the rest is launch gaps and
host work), each kind of kernel's share (matrix products, 4-bit dequantization, attention,
fused Triton kernels, elementwise copies and casts, the optimizer), the top kernels, and the
kernels the GPU waited for most (idle time charged to the kernel that ends it).
Writes ``bench/results/<date>-<card>-profile-<case>.json`` (and to $OUT when set).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

# (kind, substrings of the kernel name), first match wins; lower-case. PyTorch's own kernels
# are "void at::native::..."; Triton kernels (Liger's) carry their Python function's name.
KINDS = [
    ("dequant 4-bit", ("dequantize", "kdequant")),
    ("optimizer", ("optimizer", "koptimizer", "adam")),
    ("attention", ("flash", "fmha", "attention", "sdpa")),
    ("matmul", ("gemm", "xmma", "cutlass", "nvjet", "cublas", "sm90_", "sm80_", "splitk")),
    ("copy / cast", ("copy", "memcpy", "catarray")),
    ("elementwise / reduce", ("at::native",)),
    ("triton (liger)", ("triton", "_kernel", "liger")),
]


def kind_of(name: str) -> str:
    low = name.lower()
    for kind, keys in KINDS:
        if any(k in low for k in keys):
            return kind
    return "other"


def is_annotation(event) -> bool:
    """The profiler's own ranges shown on the GPU timeline (ProfilerStep#3, Optimizer.step#...): not kernels."""
    return bool(getattr(event, "is_user_annotation", False)) or event.name.startswith("ProfilerStep") or "#" in event.name


def busy_us(intervals: list[tuple[float, float]]) -> float:
    """Length of the union of [start, end) intervals."""
    total, end = 0.0, float("-inf")
    for a, b in sorted(intervals):
        if b <= end:
            continue
        total += b - max(a, end)
        end = b
    return total


def idle_before(kernels: list[tuple[str, float, float]], steps: int, min_us: float = 2.0, top: int = 15) -> list[dict]:
    """Where the GPU waits: each idle stretch longer than ``min_us`` (no kernel running), charged
    to the kernel that ends it. A wait before a kernel is time the host took to launch it (Python,
    the launch itself, a sync), so the names say which code keeps the GPU waiting."""
    waits: dict[str, list[float]] = {}
    end = None
    for name, a, b in sorted(kernels, key=lambda k: k[1]):
        if end is not None and a - end > min_us:
            waits.setdefault(name, []).append(a - end)
        end = b if end is None else max(end, b)
    ranked = sorted(waits.items(), key=lambda kv: -sum(kv[1]))[:top]
    return [dict(next_kernel=n[:120], kind=kind_of(n), waits_per_step=len(w) / steps,
                 ms_per_step=round(sum(w) / 1e3 / steps, 2)) for n, w in ranked]


def summarize(kernels: list[tuple[str, float, float]], steps: int, wall_s: float) -> dict:
    """``kernels``: (name, start_us, end_us) of every GPU kernel in the profiled steps."""
    by_kind: dict[str, float] = {}
    by_name: dict[str, list[float]] = {}
    for name, a, b in kernels:
        by_kind[kind_of(name)] = by_kind.get(kind_of(name), 0.0) + (b - a)
        by_name.setdefault(name, []).append(b - a)
    kernel_us = sum(by_kind.values())
    busy = busy_us([(a, b) for _, a, b in kernels])
    top = sorted(by_name.items(), key=lambda kv: -sum(kv[1]))[:30]
    return dict(
        wall_ms_per_step=round(wall_s * 1e3 / steps, 1),
        gpu_busy_ms_per_step=round(busy / 1e3 / steps, 1),
        kernel_ms_per_step=round(kernel_us / 1e3 / steps, 1),
        kernels_per_step=len(kernels) / steps,
        kinds={k: dict(ms_per_step=round(v / 1e3 / steps, 1), share=round(v / kernel_us, 3) if kernel_us else 0)
               for k, v in sorted(by_kind.items(), key=lambda kv: -kv[1])},
        top=[dict(name=n[:120], kind=kind_of(n), calls_per_step=len(t) / steps, ms_per_step=round(sum(t) / 1e3 / steps, 2))
             for n, t in top],
        idle_before=idle_before(kernels, steps),
    )


def main() -> None:
    import torch
    from speed import build_trainer, prepare_checkpoint
    from torch.profiler import ProfilerActivity, profile, schedule

    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", default="llama3-8b")
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--mbs", type=int, default=4)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--extra", default="", help="engine overrides, ';'-separated")
    args = ap.parse_args()
    path = f"/tmp/ckpt-{args.shape}"
    cuda = torch.cuda.is_available()
    if cuda:
        prepare_checkpoint(args.shape, path)
    extra = [e for e in args.extra.split(";") if e]
    trainer, sink, _ = build_trainer(path, args.seq, args.mbs, args.steps, extra, args.warmup)

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    marks: list[float] = []
    kernels: list[tuple[str, float, float]] = []

    def keep_kernels(prof) -> None:  # the events of a cycle exist only inside this callback
        kernels.extend(
            (e.name, e.time_range.start, e.time_range.end)
            for e in prof.events()
            if e.device_type == torch.autograd.DeviceType.CUDA and not is_annotation(e)
        )

    plan = schedule(wait=0, warmup=args.warmup, active=args.steps, repeat=1)
    with profile(activities=activities, schedule=plan, on_trace_ready=keep_kernels) as prof:
        step = trainer.optimizer.step

        def step_and_mark(*a, **k):
            out = step(*a, **k)
            if cuda:
                torch.cuda.synchronize()
            marks.append(time.perf_counter())
            prof.step()
            return out

        trainer.optimizer.step = step_and_mark
        trainer.train()
    wall = marks[-1] - marks[-1 - args.steps]
    card = torch.cuda.get_device_name(0) if cuda else "cpu"
    res = dict(date=datetime.date.today().isoformat(), card=card, shape=args.shape, seq=args.seq, mbs=args.mbs,
               extra=extra, kernels=trainer.kernels, fast_lora_layers=trainer.fast_lora,
               tok_s=round(args.seq * args.mbs * args.steps / wall), **summarize(kernels, args.steps, wall))
    print(json.dumps(res, indent=1), flush=True)
    name = f"{res['date']}-{card.replace(' ', '-')}-profile-{args.shape}-{args.seq}x{args.mbs}"
    name += ("-" + "-".join(e.replace("=", "_").replace("train.", "") for e in extra) if extra else "") + ".json"
    for folder in filter(None, [HERE / "results", Path(os.environ["OUT"]) if os.environ.get("OUT") else None]):
        folder.mkdir(parents=True, exist_ok=True)
        (folder / name).write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
