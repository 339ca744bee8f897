"""Speed and memory of the engine next to the plain Hugging Face stack, on one GPU, in one call.

    python bench/speed.py [--shape llama3-8b] [--cases 2048x1,2048x4,8192x1] [--steps 8] [--no-baseline]

Builds a random-weight checkpoint of the shape (BENCHMARKS.md's standard case), then runs
every case through the engine (``qlora_engine.runner.build_trainer``: the real load, LoRA,
optimizer and training step, fed random tokens) and through ``bench/hf_baseline.py``, each
in a fresh subprocess so that peaks do not mix. Prints one JSON line per case, a table
last, and writes ``bench/results/<date>-<card>-speed.json`` (also to $OUT when set).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))


def prepare_checkpoint(shape: str, path: str) -> None:
    """The random-weight checkpoint of ``shape`` at ``path``, with a tokenizer (the engine loads one; random tokens need only its pad id)."""
    import hf_baseline

    hf_baseline.make_checkpoint(shape, path)
    if not (Path(path) / "tokenizer_config.json").exists():
        sys.path.insert(0, str(HERE.parent / "tests"))
        from tiny import build_tokenizer

        build_tokenizer(Path(path))


def varlen_samples(vocab: int, seq: int, count: int, seed: int = 0) -> list[list[int]]:
    """``count`` random samples of varied length, like chat fine-tuning data: lengths log-normal
    around a median of seq/5 (409 tokens at 2048), from 32 tokens up to ``seq``."""
    import numpy as np

    rng = np.random.default_rng(seed)
    lengths = np.clip(rng.lognormal(np.log(seq / 5), 0.8, count), 32, seq).astype(int)
    return [rng.integers(0, vocab, n).tolist() for n in lengths]


def build_trainer(path: str, seq: int, mbs: int, steps: int, extra: list[str], warmup: int = 3, varlen: bool = False):
    """The engine's Trainer for one case, set up and fed random tokens (all ``seq`` long, or of
    varied length with ``varlen``, packed when the config says so); returns (trainer, sink, cfg)."""
    import numpy as np
    import torch

    from qlora_engine import runner
    from qlora_engine.config import TrainConfig, apply_overrides
    from qlora_engine.data import PreparedData
    from qlora_engine.data.store import SampleBuilder, pack, token_stats
    from qlora_engine.events import ListSink

    cfg = apply_overrides(
        TrainConfig(),
        [
            f"model.ref={path}",
            "data.path=synthetic",
            f"data.max_length={seq}",
            f"output.dir=/tmp/bench-run-{seq}x{mbs}-{os.getpid()}",
            f"train.max_steps={steps + warmup}",
            f"train.micro_batch_size={mbs}",
            "train.gradient_accumulation_steps=1",
            "train.save_steps=null",
            "lora.rank=16",
            "lora.alpha=16",
            "lora.target_modules=[all-linear]",
            "optim.optimizer=paged_adamw_8bit",
            "train.gradient_checkpointing=true",  # the standard case checkpoints; a variant may say auto or false
            *extra,
        ],
    )
    gen = torch.Generator().manual_seed(0)
    n = mbs * (steps + warmup)
    vocab = json.loads((Path(path) / "config.json").read_text())["vocab_size"]
    samples: Any = []
    if varlen:  # enough samples for n rows either way (packed: about five to a row)
        rows = varlen_samples(vocab, seq, n * (8 if cfg.data.packing else 1))
        if cfg.data.packing:
            builder = SampleBuilder()
            for ids in rows:
                builder.add(ids, [True] * len(ids))
            samples = pack(builder.build(), seq)
        else:
            samples = [{"input_ids": ids, "labels": ids} for ids in rows]
        lengths = np.array([len(r) for r in rows])
        report = {"token_stats": token_stats(lengths, seq)}
    else:
        for _ in range(n):
            ids = torch.randint(0, vocab, (seq,), generator=gen).tolist()
            samples.append({"input_ids": ids, "labels": ids})
        report = {}
    data = PreparedData(train=samples, validation=None, report=report, fingerprint="synthetic")
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    sink = ListSink()
    trainer = runner.build_trainer(cfg, sink, data=data)
    trainer.setup()
    trainer.save_checkpoint = lambda: None  # measure training, not disk writes
    trainer.save_adapter = lambda: None
    return trainer, sink, cfg


def engine_case(path: str, seq: int, mbs: int, steps: int, extra: list[str], warmup: int = 3, varlen: bool = False) -> dict:
    import torch

    from qlora_engine.events import LogLine, StepMetrics

    for flag in [e for e in extra if e.startswith("flag:")]:  # an engine module's switch, e.g. flag:fast_lora.ADD_IN_PLACE=0
        import importlib

        name, _, value = flag[5:].partition("=")
        module, _, attr = name.rpartition(".")
        switches = importlib.import_module(f"qlora_engine.{module}")
        setattr(switches, attr, type(getattr(switches, attr))(int(value)))
    trainer, sink, cfg = build_trainer(path, seq, mbs, steps, [e for e in extra if not e.startswith("flag:")], warmup, varlen)
    trainer.train()
    steps_m = sink.of(StepMetrics)[warmup:]
    tps = sorted(e.tokens_per_second for e in steps_m)
    estimate = None
    try:
        from qlora_engine import budget

        ran = trainer.plan.config  # what ran: 'auto' settled by the plan for this card
        est = budget.estimate(ran, data_stats={"max": seq, "p95": seq, "median": seq}, gpu_bytes=card_bytes())
        estimate = {"total_gib": round(est.total / 2**30, 2), "low_gib": round(est.low / 2**30, 2),
                    "high_gib": round(est.high / 2**30, 2)}
    except Exception as e:  # the budget is optional here
        estimate = {"error": f"{type(e).__name__}: {e}"[:200]}
    compiled = None
    if trainer.compiled is not None:  # what the compiler made of the layers (a break or a skipped CUDA graph is host work back)
        from torch._dynamo.utils import counters

        compiled = dict(how=trainer.compiled.how, graphs=counters["stats"]["unique_graphs"],
                        graph_breaks=sum(counters["graph_break"].values()),
                        break_reasons=[r[:200] for r in list(counters["graph_break"])[:3]],
                        cudagraph_skips=counters["inductor"]["cudagraph_skips"])
    return dict(
        stack="engine",
        seq=seq,
        mbs=mbs,
        extra=extra,
        compiled=compiled,
        warmup_step_s=[round(e.tokens / e.tokens_per_second, 2) for e in sink.of(StepMetrics)[:warmup] if e.tokens_per_second],
        kernels=trainer.kernels,
        fast_lora_layers=trainer.fast_lora,
        checkpointed_layers=trainer.checkpointed,
        checkpointing_notes=[e.message for e in sink.of(LogLine) if "checkpoint" in e.message],
        varlen=varlen,
        step_s=[round(e.tokens / e.tokens_per_second, 3) for e in steps_m if e.tokens_per_second],
        tok_s=round(tps[len(tps) // 2]),
        loss=round(steps_m[-1].loss, 3),
        peak_alloc_gib=round(max(e.cuda_allocated or 0 for e in sink.of(StepMetrics)) / 2**30, 2),
        peak_reserved_gib=round(max(e.cuda_reserved or 0 for e in sink.of(StepMetrics)) / 2**30, 2),
        process_peak_reserved_gib=round(torch.cuda.max_memory_reserved() / 2**30, 2) if torch.cuda.is_available() else None,
        estimate=estimate,
    )


def card_bytes() -> int | None:
    """What the engine's 'auto' sizes the run for (``vram.usable_vram``): the card, or the cap."""
    import torch

    from qlora_engine.vram import usable_vram

    return usable_vram(torch.device("cuda")) if torch.cuda.is_available() else None


def baseline_case(path: str, seq: int, mbs: int, steps: int) -> dict:
    import hf_baseline

    res = hf_baseline.run(path, seq, mbs, steps=steps, liger=False)
    res["stack"] = "hf-baseline"
    return res


def versions() -> dict:
    import importlib.metadata as md

    out = {}
    for name in ("torch", "transformers", "peft", "bitsandbytes", "accelerate", "liger-kernel"):
        try:
            out[name] = md.version(name)
        except md.PackageNotFoundError:
            out[name] = None
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", default="llama3-8b")
    ap.add_argument("--cases", default="2048x1,2048x4,8192x1")
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--warmup", type=int, default=3, help="steps run before the measured ones")
    ap.add_argument("--vram-cap-gib", type=float, help="cap what torch may take of the card (an 80 GB card on a bigger one)")
    ap.add_argument("--no-baseline", action="store_true")
    ap.add_argument("--varlen", action="store_true", help="samples of varied length (packing's case), engine only")
    ap.add_argument("--extra", default="", help="engine overrides for every case, ';'-separated")
    ap.add_argument(
        "--variants", default="", help="engine variants, '|'-separated, each a ';'-separated override list "
        "('' is the default config; 'flag:fast_lora.ADD_IN_PLACE=0' sets an engine module's switch); every case runs every variant"
    )
    ap.add_argument("--worker", choices=["engine", "baseline"])
    ap.add_argument("--seq", type=int)
    ap.add_argument("--mbs", type=int)
    args = ap.parse_args()
    path = f"/tmp/ckpt-{args.shape}"
    extra = [e for e in args.extra.split(";") if e]

    if args.worker:
        if args.vram_cap_gib:
            import torch

            total = torch.cuda.get_device_properties(0).total_memory
            torch.cuda.set_per_process_memory_fraction(min(1.0, args.vram_cap_gib * 2**30 / total))
        try:
            if args.worker == "engine":
                res = engine_case(path, args.seq, args.mbs, args.steps, extra, args.warmup, args.varlen)
            else:
                res = baseline_case(path, args.seq, args.mbs, args.steps)
        except Exception as e:
            res = dict(stack=args.worker, seq=args.seq, mbs=args.mbs, error=f"{type(e).__name__}: {str(e)[:300]}")
        print("RESULT " + json.dumps(res), flush=True)
        return

    import torch

    card = torch.cuda.get_device_name(0)
    print(f"# {card} {versions()}", file=sys.stderr, flush=True)
    prepare_checkpoint(args.shape, path)
    results = []
    for case in args.cases.split(","):
        seq, mbs = (int(x) for x in case.split("x"))
        # --extra goes with every variant (a variant's own overrides come after it, so they win)
        variants = [";".join(filter(None, [args.extra, v])) for v in args.variants.split("|")] if args.variants else [args.extra]
        runs = [("engine", v) for v in variants]
        if not args.no_baseline:
            runs.insert(0, ("hf-baseline", ""))
        for stack, variant in runs:
            worker = "engine" if stack == "engine" else "baseline"
            cmd = [sys.executable, __file__, "--worker", worker, "--shape", args.shape, "--seq", str(seq),
                   "--mbs", str(mbs), "--steps", str(args.steps), "--warmup", str(args.warmup), "--extra", variant]
            if args.vram_cap_gib:
                cmd += ["--vram-cap-gib", str(args.vram_cap_gib)]
            if args.varlen:
                cmd += ["--varlen"]
            proc = subprocess.run(cmd, capture_output=True, text=True)
            lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
            res = json.loads(lines[-1][7:]) if lines else dict(stack=stack, seq=seq, mbs=mbs,
                                                                 error=proc.stderr[-600:])
            print(json.dumps(res), flush=True)
            results.append(res)
            write_record(args, card, extra, results)  # after every case: a call cut short keeps what ran

    print(f"\n{'stack':<40} {'seq x mbs':<10} {'tok/s':>8} {'alloc GiB':>10} {'reserved GiB':>13} {'estimate GiB':>13}")
    for r in results:
        est = (r.get("estimate") or {}).get("total_gib", "")
        name = r["stack"] + (" " + " ".join(r["extra"]) if r.get("extra") else "")
        print(f"{name:<40} {str(r['seq']) + ' x ' + str(r['mbs']):<10} {r.get('tok_s', 'ERR'):>8} "
              f"{r.get('peak_alloc_gib', ''):>10} {r.get('peak_reserved_gib', ''):>13} {est:>13}")
    write_record(args, card, extra, results)


_STAMP = datetime.datetime.now().strftime("%H%M")


def write_record(args: Any, card: str, extra: list[str], results: list[dict]) -> None:
    record = dict(date=datetime.date.today().isoformat(), card=card, shape=args.shape, versions=versions(),
                  extra=extra, vram_cap_gib=args.vram_cap_gib, results=results)
    name = f"{record['date']}-{card.replace(' ', '-')}-speed-{args.shape}-{_STAMP}.json"
    for folder in filter(None, [HERE / "results", Path(os.environ["OUT"]) if os.environ.get("OUT") else None]):
        folder.mkdir(parents=True, exist_ok=True)
        (folder / name).write_text(json.dumps(record, indent=1))


if __name__ == "__main__":
    main()
