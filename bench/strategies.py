"""One GPU through each training strategy: single, DDP and FSDP2 (a process group of one) give the same losses.

    python bench/strategies.py [--shape llama3-8b] [--seq 1024] [--mbs 1] [--steps 4]

Builds the random-weight checkpoint of the shape (as ``bench/speed.py`` does), then trains the
same run three times, each in a fresh subprocess: ``train.strategy`` single, ddp and fsdp (the
4-bit weights stored in the compute dtype, sharded over one process). Every case uses torch's
AdamW, which FSDP needs. Prints one JSON line per strategy (losses, peak memory, tokens per
second), then the largest relative loss difference from ``single``; writes
``bench/results/<date>-<card>-strategies.json`` (also to $OUT when set). The issue's "done when":
the three agree within float rounding on the 8B shape.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

STRATEGIES = ("single", "ddp", "fsdp")


def worker(args: argparse.Namespace) -> None:
    import speed
    import torch

    from qlora_engine.events import StepMetrics

    extra = [f"train.strategy={args.worker}", "optim.optimizer=adamw", *filter(None, args.extra.split(";"))]
    trainer, sink, _ = speed.build_trainer(args.path, args.seq, args.mbs, args.steps, extra, warmup=0)
    trainer.train()
    metrics = sink.of(StepMetrics)
    cuda = torch.cuda.is_available()
    print(
        json.dumps(
            {
                "strategy": args.worker,
                "quant_storage": trainer.facts.get("quant_storage"),
                "losses": [m.loss for m in metrics],
                "grad_norms": [m.grad_norm for m in metrics],
                "tokens_per_second": sorted(m.tokens_per_second for m in metrics)[len(metrics) // 2],
                "max_reserved_gib": round(torch.cuda.max_memory_reserved() / 2**30, 2) if cuda else None,
                "max_allocated_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2) if cuda else None,
            }
        ),
        flush=True,
    )


def _card() -> str:
    import torch

    return torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", default="llama3-8b")
    ap.add_argument("--seq", type=int, default=1024)
    ap.add_argument("--mbs", type=int, default=1)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--extra", default="", help="engine overrides for every case, ';'-separated")
    ap.add_argument("--path", help="the checkpoint folder (default: /tmp/bench-<shape>)")
    ap.add_argument("--worker", choices=STRATEGIES)
    args = ap.parse_args()
    args.path = args.path or f"/tmp/bench-{args.shape}"
    if args.worker:
        worker(args)
        return
    import speed

    speed.prepare_checkpoint(args.shape, args.path)
    results = []
    for strategy in STRATEGIES:
        cmd = [sys.executable, __file__, "--worker", strategy, "--path", args.path, "--seq", str(args.seq),
               "--mbs", str(args.mbs), "--steps", str(args.steps), "--extra", args.extra]  # fmt: skip
        out = subprocess.run(cmd, capture_output=True, text=True)
        line = next((x for x in reversed(out.stdout.splitlines()) if x.startswith("{")), None)
        result = json.loads(line) if line else {"strategy": strategy, "error": out.stderr[-2000:]}
        print(json.dumps(result), flush=True)
        results.append(result)
    base = results[0].get("losses") or []
    for r in results[1:]:
        losses = r.get("losses") or []
        if base and len(losses) == len(base):
            r["max_rel_loss_diff_vs_single"] = max(abs(a - b) / abs(b) for a, b in zip(losses, base, strict=True))
    summary = {
        "shape": args.shape,
        "seq": args.seq,
        "mbs": args.mbs,
        "steps": args.steps,
        "card": _card(),
        "results": results,
    }
    print(json.dumps({k: r.get("max_rel_loss_diff_vs_single") for k, r in zip(STRATEGIES, results, strict=True)}))
    stamp = datetime.date.today().isoformat()
    for folder in filter(None, [HERE / "results", Path(os.environ["OUT"]) if os.environ.get("OUT") else None]):
        folder.mkdir(parents=True, exist_ok=True)
        card = summary["card"].replace(" ", "-")
        (folder / f"{stamp}-{card}-strategies-{args.shape}.json").write_text(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
