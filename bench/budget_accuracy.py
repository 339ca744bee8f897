"""Accuracy of the VRAM budget: predicted vs measured peak memory of real engine runs, on one GPU.

    python bench/budget_accuracy.py [--shapes llama3-8b,llama-1b] [--cases NAME,...] [--steps 6]
                                    [--deadline-s 560] [--workdir /tmp] [--resume]

Builds random-weight checkpoints of two shapes (BENCHMARKS.md's Llama-3-8B and a ~1B Llama,
both through ``save_pretrained`` as real safetensors), then runs every case through the
engine's trainer (``qlora_engine.train.Trainer``: the real 4-bit load, LoRA, optimizer and
steps, fed random tokens), each case in a fresh subprocess so that peaks do not mix. For
each case it prints one JSON line comparing ``budget.estimate`` with what torch measured:

* ``torch.cuda.max_memory_reserved()`` of the training steps (the trainer resets the peak
  every step; the max over steps is taken) against the estimate's ``torch_reserved``
  (its total less the CUDA context and the paged optimizer state, which live outside
  torch's allocator) -- the number the issue's accuracy goal is about;
* peak allocated against the estimate's ``torch_allocated`` (the formulas without the
  allocator's slack), to tell formula errors from fragmentation;
* device memory outside torch at the last step (``mem_get_info`` used - reserved) against the
  estimate's CUDA context + paged optimizer state.

A table and a summary against the goals (every case within +-7%, median |error| <= 3%, no
under-prediction beyond 5%) come last; the record goes to
``bench/results/<date>-<card>-budget.json`` and to $OUT when set. Results are appended to
``<workdir>/budget-partial.jsonl`` as they come, so ``--resume`` continues a run that hit the
deadline (the checkpoints stay in ``<workdir>`` while the machine is warm).
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))

SHAPES = {
    "llama3-8b": dict(
        vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
        num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=8192, rope_theta=500000.0,
    ),
    # TinyLlama-1.1B's shape: a ~1B Llama with a 32k vocabulary, so the cases vary the
    # vocabulary against the hidden size (the logits dominate Llama-3's peaks).
    "llama-1b": dict(
        vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_hidden_layers=22,
        num_attention_heads=32, num_key_value_heads=4, max_position_embeddings=8192, rope_theta=10000.0,
    ),
}  # fmt: skip

# name: (shape, seq, micro-batch, checkpointing, optimizer, data kind, extra overrides)
# A spread over the axes, not the full product. Data kinds: "fixed" (every sample
# exactly seq tokens: no padding, flash attention), "padded" (lengths seq..seq-3, so every
# micro-batch is padded and a 4-D mask is built), "packed" (two samples per sequence:
# a block-diagonal mask from position_ids).
CASES: dict[str, tuple] = {
    "8b-512x1-ckpt-p8": ("llama3-8b", 512, 1, True, "paged_adamw_8bit", "fixed", []),
    "8b-2048x1-ckpt-p8": ("llama3-8b", 2048, 1, True, "paged_adamw_8bit", "fixed", []),
    "8b-2048x4-ckpt-p8": ("llama3-8b", 2048, 4, True, "paged_adamw_8bit", "fixed", []),
    "8b-8192x1-ckpt-p8": ("llama3-8b", 8192, 1, True, "paged_adamw_8bit", "fixed", []),
    "8b-2048x1-nockpt-p8": ("llama3-8b", 2048, 1, False, "paged_adamw_8bit", "fixed", []),
    "8b-512x4-nockpt-p32": ("llama3-8b", 512, 4, False, "paged_adamw_32bit", "fixed", []),
    "8b-2048x2-ckpt-p32-r64-ga2": (
        "llama3-8b", 2048, 2, True, "paged_adamw_32bit", "fixed",
        ["lora.rank=64", "lora.alpha=64", "train.gradient_accumulation_steps=2"],
    ),
    "8b-2048x4-ckpt-p8-padded": ("llama3-8b", 2048, 4, True, "paged_adamw_8bit", "padded", []),
    "1b-512x4-ckpt-p8": ("llama-1b", 512, 4, True, "paged_adamw_8bit", "fixed", []),
    "1b-2048x4-ckpt-p32": ("llama-1b", 2048, 4, True, "paged_adamw_32bit", "fixed", []),
    "1b-2048x1-nockpt-p8": ("llama-1b", 2048, 1, False, "paged_adamw_8bit", "fixed", []),
    "1b-8192x1-ckpt-p8": ("llama-1b", 8192, 1, True, "paged_adamw_8bit", "fixed", []),
    "1b-8192x1-nockpt-adamw": ("llama-1b", 8192, 1, False, "adamw", "fixed", []),
    "1b-2048x4-ckpt-p8-packed": ("llama-1b", 2048, 4, True, "paged_adamw_8bit", "packed", []),
    "1b-1024x8-nockpt-a8-attn-ga2": (
        "llama-1b", 1024, 8, False, "adamw_8bit", "fixed",
        ["lora.target_modules=[attention]", "train.gradient_accumulation_steps=2"],
    ),
}  # fmt: skip

GOALS = {"max_abs_pct": 7.0, "median_abs_pct": 3.0, "max_under_pct": 5.0}
GiB = 1 << 30


def gib(n: float | None) -> float | None:
    return None if n is None else round(n / GiB, 3)


# -- the checkpoint ------------------------------------------------------------------------------


def make_checkpoint(shape: str, path: Path) -> None:
    """Random bf16 weights of the shape, saved as safetensors, plus a small tokenizer (pad id only)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    if not (path / "config.json").exists():
        t = time.time()
        cfg = LlamaConfig(**SHAPES[shape], dtype="bfloat16")
        with torch.device("cuda"):
            model = LlamaForCausalLM(cfg).to(torch.bfloat16)
        tmp = path.with_name(path.name + ".tmp")
        model.save_pretrained(tmp, max_shard_size="5GB")
        tmp.rename(path)
        del model
        gc.collect()
        torch.cuda.empty_cache()
        print(f"# saved {shape} in {time.time() - t:.0f}s", file=sys.stderr, flush=True)
    if not (path / "tokenizer_config.json").exists():
        sys.path.insert(0, str(ROOT / "tests"))
        from tiny import build_tokenizer

        build_tokenizer(path)  # the engine loads a tokenizer with the model; random ids need only its pad id


# -- one case, in its own process ----------------------------------------------------------------


def synthetic_data(kind: str, seq: int, n: int, vocab: int) -> tuple[list[dict], dict]:
    """Samples of random ids and the token statistics the data module would report for them."""
    import torch

    gen = torch.Generator().manual_seed(0)
    samples = []
    for k in range(n):
        length = seq - (k % 4) if kind == "padded" else seq
        ids = torch.randint(0, vocab, (length,), generator=gen).tolist()
        sample = {"input_ids": ids, "labels": ids}
        if kind == "packed":
            cut = seq // 3
            sample["position_ids"] = list(range(cut)) + list(range(seq - cut))
        samples.append(sample)
    lengths = [len(s["input_ids"]) for s in samples]
    stats = {"min": min(lengths), "max": max(lengths), "median": sorted(lengths)[len(lengths) // 2],
             "p95": max(lengths), "longest_sequence": max(lengths)}  # fmt: skip
    return samples, stats


def run_case(name: str, workdir: Path, steps: int) -> dict:
    import torch

    from qlora_engine import budget
    from qlora_engine.config import TrainConfig, apply_overrides
    from qlora_engine.data import PreparedData
    from qlora_engine.events import ListSink, PhaseChanged, StepMetrics
    from qlora_engine.train import Trainer

    shape, seq, mbs, ckpt, optimizer, kind, extra = CASES[name]
    path = workdir / f"ckpt-{shape}"
    torch.cuda.init()
    torch.ones(1, device="cuda")
    free, total = torch.cuda.mem_get_info()
    context_at_start = total - free - torch.cuda.memory_reserved()

    cfg = apply_overrides(
        TrainConfig(),
        [
            f"model.ref={path}",
            "data.path=synthetic",
            f"data.max_length={seq}",
            f"data.packing={'true' if kind == 'packed' else 'false'}",
            f"output.dir={workdir / f'run-{name}-{os.getpid()}'}",
            f"train.max_steps={steps}",
            f"train.micro_batch_size={mbs}",
            "train.gradient_accumulation_steps=1",
            f"train.gradient_checkpointing={'true' if ckpt else 'false'}",
            "train.save_steps=null",
            "lora.rank=16",
            "lora.alpha=16",
            "lora.target_modules=[all-linear]",
            f"optim.optimizer={optimizer}",
            *extra,
        ],
    )
    ga = cfg.train.gradient_accumulation_steps
    samples, stats = synthetic_data(kind, seq, mbs * ga * steps, SHAPES[shape]["vocab_size"])
    est = budget.estimate(cfg, data_stats=stats, gpu_bytes=total, gpu_name=torch.cuda.get_device_name(0))

    class Probe(ListSink):
        """Reads torch's and the driver's counters as events arrive (same process, same thread)."""

        def __init__(self) -> None:
            super().__init__()
            self.load_peak_reserved = None
            self.static_allocated = None
            self.outside_torch = None

        def emit(self, event) -> None:
            super().emit(event)
            if isinstance(event, PhaseChanged) and event.phase == "training" and self.static_allocated is None:
                self.static_allocated = torch.cuda.memory_allocated()
                self.load_peak_reserved = torch.cuda.max_memory_reserved()
            if isinstance(event, StepMetrics):
                torch.cuda.synchronize()
                f, t = torch.cuda.mem_get_info()
                self.outside_torch = (t - f) - torch.cuda.memory_reserved()

    sink = Probe()
    trainer = Trainer(cfg, sink, data=PreparedData(train=samples, validation=None, report={}, fingerprint="synthetic"))
    trainer.setup()
    trainer.save_checkpoint = lambda: None  # measure training, not disk writes
    trainer.save_adapter = lambda: None
    t0 = time.time()
    trainer.train()
    step_s = (time.time() - t0) / steps
    metrics = sink.of(StepMetrics)
    reserved = [m.cuda_reserved for m in metrics]
    allocated = [m.cuda_allocated for m in metrics]
    peak_reserved, peak_allocated = max(reserved), max(allocated)

    d = est.details
    pred_reserved, pred_allocated = d["torch_reserved"], d["torch_allocated"]
    pred_outside = est.components["cuda_context"] + d["paged_optimizer_bytes"]
    return dict(
        case=name, card=torch.cuda.get_device_name(0), shape=shape, seq=seq, micro_batch=mbs, grad_accum=ga, checkpointing=ckpt,
        optimizer=optimizer, data=kind, rank=cfg.lora.rank, targets=cfg.lora.target_modules, steps=steps,
        step_s=round(step_s, 2), loss=round(metrics[-1].loss, 3),
        measured=dict(
            peak_reserved_gib=gib(peak_reserved), peak_allocated_gib=gib(peak_allocated),
            reserved_per_step_gib=[gib(r) for r in reserved], allocated_per_step_gib=[gib(a) for a in allocated],
            load_peak_reserved_gib=gib(sink.load_peak_reserved), static_allocated_gib=gib(sink.static_allocated),
            outside_torch_gib=gib(sink.outside_torch), context_at_start_gib=gib(context_at_start),
        ),
        predicted=dict(
            torch_reserved_gib=gib(pred_reserved), torch_allocated_gib=gib(pred_allocated),
            outside_torch_gib=gib(pred_outside), total_gib=gib(est.total), low_gib=gib(est.low),
            high_gib=gib(est.high), peak_phase=d["peak_phase"], attention_mask=d["attention_mask"],
            static_gib=gib(sum(est.components[k] for k in ("quantized_weights", "quant_constants",
                                                            "unquantized_weights", "lora_weights"))),
            components_gib={k: gib(v) for k, v in est.components.items()},
            approximate=est.approximate,
        ),
        reserved_error_pct=round(100 * (pred_reserved - peak_reserved) / peak_reserved, 2),
        allocated_error_pct=round(100 * (pred_allocated - peak_allocated) / peak_allocated, 2),
        in_range=est.low - pred_outside <= peak_reserved <= est.high - pred_outside,
    )  # fmt: skip


# -- the driver ------------------------------------------------------------------------------------


def versions() -> dict:
    import importlib.metadata as md

    out = {}
    for name in ("torch", "transformers", "peft", "bitsandbytes", "accelerate"):
        try:
            out[name] = md.version(name)
        except md.PackageNotFoundError:
            out[name] = None
    return out


def check_imports() -> None:
    """Fail early, naming what to carry. Looks modules up without importing them: importing
    bitsandbytes creates a CUDA context, and this process must hold none (see main)."""
    import importlib.util

    wanted = ("torch", "transformers", "peft", "accelerate", "bitsandbytes", "yaml", "numpy", "platformdirs", "pynvml")
    missing = [mod for mod in wanted if importlib.util.find_spec(mod) is None]
    if missing:
        sys.exit(f"missing on this machine: {', '.join(missing)} (carry their wheels and pip install them first)")


def summarize(results: list[dict]) -> dict:
    ok = [r for r in results if "reserved_error_pct" in r]
    errs = [r["reserved_error_pct"] for r in ok]
    if not errs:
        return {"cases": 0}
    summary = {
        "cases": len(ok),
        "failed_cases": len(results) - len(ok),
        "median_abs_error_pct": round(statistics.median(abs(e) for e in errs), 2),
        "max_abs_error_pct": round(max(abs(e) for e in errs), 2),
        "worst_under_prediction_pct": round(min(min(errs), 0.0), 2),
        "allocated_median_abs_error_pct": round(statistics.median(abs(r["allocated_error_pct"]) for r in ok), 2),
        "in_low_high_range": sum(bool(r["in_range"]) for r in ok),
    }
    summary["goals_met"] = (
        summary["max_abs_error_pct"] <= GOALS["max_abs_pct"]
        and summary["median_abs_error_pct"] <= GOALS["median_abs_pct"]
        and -summary["worst_under_prediction_pct"] <= GOALS["max_under_pct"]
        and summary["failed_cases"] == 0
    )
    return summary


def table(results: list[dict]) -> str:
    head = f"{'case':<30} {'meas res':>9} {'pred res':>9} {'err %':>7} {'meas alloc':>10} {'pred alloc':>10} {'err %':>7}  peak phase"
    lines = [head, "-" * len(head)]
    for r in results:
        if "error" in r:
            lines.append(f"{r['case']:<30} ERROR {r['error'][:90]}")
            continue
        m, p = r["measured"], r["predicted"]
        lines.append(
            f"{r['case']:<30} {m['peak_reserved_gib']:>9.2f} {p['torch_reserved_gib']:>9.2f} {r['reserved_error_pct']:>+7.1f} "
            f"{m['peak_allocated_gib']:>10.2f} {p['torch_allocated_gib']:>10.2f} {r['allocated_error_pct']:>+7.1f}  {p['peak_phase']}"
        )
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shapes", default="llama3-8b,llama-1b")
    ap.add_argument("--cases", default="", help="comma-separated case names (default: all of the shapes)")
    ap.add_argument("--steps", type=int, default=6, help="optimizer steps per case (the peak settles after 2-3)")
    ap.add_argument("--deadline-s", type=float, default=560, help="start no case after this many seconds")
    ap.add_argument("--case-timeout-s", type=float, default=240)
    ap.add_argument("--workdir", default="/tmp/budget-bench")
    ap.add_argument("--resume", action="store_true", help="skip cases already in <workdir>/budget-partial.jsonl")
    ap.add_argument("--list", action="store_true", help="list the cases and exit")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--make-checkpoint", help=argparse.SUPPRESS)
    args = ap.parse_args()
    workdir = Path(args.workdir)

    if args.list:
        for name, spec in CASES.items():
            print(name, spec)
        return
    if args.make_checkpoint:
        make_checkpoint(args.make_checkpoint, workdir / f"ckpt-{args.make_checkpoint}")
        return
    if args.worker:
        try:
            res = run_case(args.worker, workdir, args.steps)
        except Exception as e:  # an OOM is a result too: the estimate should have said so
            import traceback

            res = dict(
                case=args.worker, error=f"{type(e).__name__}: {str(e)[:400]}", traceback=traceback.format_exc()[-1500:]
            )
        print("RESULT " + json.dumps(res), flush=True)
        return

    # This process never touches CUDA: the workers read device-wide free memory, and a context
    # held here would count as theirs. Checkpoints are built in a subprocess, and the card's
    # name comes back with the results.
    t_start = time.time()
    check_imports()
    print(f"# {versions()}", file=sys.stderr, flush=True)
    shapes = [s for s in args.shapes.split(",") if s]
    names = [n for n in (args.cases.split(",") if args.cases else CASES) if n and CASES[n][0] in shapes]
    workdir.mkdir(parents=True, exist_ok=True)
    partial = workdir / "budget-partial.jsonl"
    done: dict[str, dict] = {}
    if args.resume and partial.exists():
        for line in partial.read_text().splitlines():
            r = json.loads(line)
            done[r["case"]] = r
    elif partial.exists():
        partial.unlink()
    for shape in shapes:
        if any(CASES[n][0] == shape and n not in done for n in names):
            cmd = [sys.executable, __file__, "--make-checkpoint", shape, "--workdir", str(workdir)]
            subprocess.run(cmd, check=True, cwd=ROOT)

    results = [done[n] for n in names if n in done]
    for name in names:
        if name in done:
            continue
        if time.time() - t_start > args.deadline_s:
            print(f"# deadline: {name} not run (use --resume in the next call)", file=sys.stderr, flush=True)
            continue
        cmd = [sys.executable, __file__, "--worker", name, "--workdir", str(workdir), "--steps", str(args.steps)]
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=args.case_timeout_s, cwd=ROOT)
            lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
            res = json.loads(lines[-1][7:]) if lines else dict(case=name, error=proc.stderr[-800:])
        except subprocess.TimeoutExpired:
            res = dict(case=name, error=f"timed out after {args.case_timeout_s:.0f}s")
        print(json.dumps(res), flush=True)
        with open(partial, "a") as fh:
            fh.write(json.dumps(res) + "\n")
        results.append(res)

    card = next((r["card"] for r in results if r.get("card")), "unknown-GPU")
    print(f"# {card}", file=sys.stderr, flush=True)
    summary = summarize(results)
    print("\n" + table(results))
    print("\n" + json.dumps({"summary": summary, "goals": GOALS}))
    from qlora_engine.budget import CALIBRATION

    record = dict(
        date=datetime.date.today().isoformat(), card=card, versions=versions(), steps=args.steps,
        calibration=CALIBRATION, summary=summary, goals=GOALS, results=results,
        not_run=[n for n in names if n not in {r["case"] for r in results}],
    )  # fmt: skip
    fname = f"{record['date']}-{card.replace(' ', '-')}-budget.json"
    for folder in filter(None, [HERE / "results", Path(os.environ["OUT"]) if os.environ.get("OUT") else None]):
        folder.mkdir(parents=True, exist_ok=True)
        (folder / fname).write_text(json.dumps(record, indent=1))


if __name__ == "__main__":
    main()
