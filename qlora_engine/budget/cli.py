"""``qlora-engine estimate run.yaml [--gpu 24GiB] [--json]``: the budget from a terminal."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from qlora_engine.budget.estimate import ABSENT_WHEN_ZERO, COMPONENT_HELP, GiB
from qlora_engine.budget.parallel import COMPONENT_HELP as PARALLEL_HELP
from qlora_engine.budget.units import format_bytes, parse_gpu_size


def add_cli(sub: Any) -> None:
    """Register the ``estimate`` subcommand (called by qlora_engine.cli)."""
    s = sub.add_parser("estimate", help="predict peak VRAM by component, and what fits a GPU (loads no weights)")
    s.add_argument("config", help="run config YAML")
    s.add_argument("overrides", nargs="*", metavar="section.field=value", help="e.g. lora.rank=32")
    s.add_argument("--gpu", help="GPU memory (24GiB, 80GB, 24, rtx4090); default: the first NVIDIA GPU found")
    s.add_argument(
        "--data", action="store_true",
        help="tokenize the dataset and size activations by its longest sample (slower for large sets)",
    )  # fmt: skip
    s.add_argument("--json", action="store_true", help="print the estimate (and fit advice) as JSON")
    s.add_argument("--gpus", type=int, default=1, help="GPUs sharing the run: the budget of one of them (ddp or fsdp)")
    s.set_defaults(func=estimate_main)


def _detect_gpu() -> tuple[int | None, str | None]:
    try:
        from qlora_engine.gpu import query_gpus  # lazy: only this subcommand needs it (fast --help)

        report = query_gpus()
    except Exception:
        return None, None
    if not report.available:
        return None, None
    g = report.gpus[0]
    return g.total_bytes, g.name


def _data_stats(cfg: Any) -> dict[str, Any] | None:
    from qlora_engine.data import inspect_data  # lazy: only this subcommand needs it (fast --help)

    result = inspect_data(cfg, cfg.model.ref, samples=0)
    return result.get("token_stats")


def estimate_main(args: argparse.Namespace) -> int:
    from qlora_engine.config import TrainConfig  # lazy: only this subcommand needs it (fast --help)
    from qlora_engine.plan import advise  # lazy: only this subcommand needs it (fast --help)

    cfg = TrainConfig.load(args.config, list(args.overrides or []))
    if args.gpu:
        gpu_bytes, gpu_name = parse_gpu_size(args.gpu), args.gpu
    else:
        gpu_bytes, gpu_name = _detect_gpu()
    stats = _data_stats(cfg) if args.data else None
    planned = advise(cfg, gpu_bytes=gpu_bytes, data_stats=stats, gpu_name=gpu_name, world_size=args.gpus)
    est, advice = planned.estimate, planned.fit
    if args.json:
        out: dict[str, Any] = {"estimate": est.to_dict()}
        if advice is not None:
            out["fit"] = {k: v for k, v in advice.to_dict().items() if k != "estimate"}
        from qlora_engine.scrub import print_json  # lazy: only this subcommand needs it (fast --help)

        print_json(out)
    else:
        print(render(est, advice))
    return 3 if est.fits is False else 0


def _checkpointing(d: dict[str, Any]) -> str:
    n = d.get("checkpointed_layers", 0)
    what = "off" if not d["gradient_checkpointing"] else f"on ({n} layers)"
    return f"{what}, chosen by auto" if d.get("checkpointing_auto") else what


def render(est: Any, advice: Any = None) -> str:
    """The estimate as a table a person reads in a terminal."""
    d = est.details
    if d.get("usable") is False:
        return "No estimate: " + "; ".join(est.reasons)
    lines = [
        f"{d['architecture']}: micro-batch {d['micro_batch_size']} x {d['sequence_length']} tokens, "
        f"checkpointing {_checkpointing(d)}, {d['lora_parameters']:,} LoRA parameters"
    ]
    if d.get("kernels"):
        lines.append(f"kernels: {d['kernels']} ({d.get('kernels_reason', '')})")
    width = max(len(k) for k in est.components)
    for name, value in est.components.items():
        if not value and name in ABSENT_WHEN_ZERO:
            continue
        share = value / est.total if est.total else 0
        bar = "#" * round(share * 40)
        lines.append(f"  {name:<{width}}  {format_bytes(value):>10}  {bar:<40}  {COMPONENT_HELP.get(name) or PARALLEL_HELP.get(name, '')}")
    lines.append(
        f"  {'total':<{width}}  {format_bytes(est.total):>10}  "
        f"(likely {est.low / GiB:.1f}-{est.high / GiB:.1f} GiB; peak during {d['peak_phase'].replace('_', ' ')})"
    )
    if est.gpu_bytes:
        verdict = "fits" if est.fits else "does NOT fit"
        lines.append(f"{verdict} on {est.gpu_name or 'the GPU'} ({format_bytes(est.gpu_bytes)})")
    else:
        lines.append("no GPU found or given (--gpu 24GiB): no verdict")
    if est.approximate:
        lines.append("approximate: " + "; ".join(est.reasons))
    for note in est.notes:
        if not note.startswith("kernels: "):  # shown above
            lines.append(f"note: {note}")
    if advice is not None:
        lines.append(
            f"largest micro-batch that fits: {advice.max_micro_batch_size}; "
            f"largest data.max_length that fits: {advice.max_sequence_length}"
        )
        for s in advice.suggestions:
            lines.append(f"  try: {s.description}   [{' '.join(s.overrides)}]")
        if advice.faster is not None:
            f = advice.faster
            lines.append(f"faster, and still fits: {f.description}   [{' '.join(f.overrides)}]")
    return "\n".join(lines)


if __name__ == "__main__":  # pragma: no cover - python -m qlora_engine.budget.cli
    p = argparse.ArgumentParser(prog="qlora-engine")
    add_cli(p.add_subparsers(dest="command", required=True))
    a = p.parse_args()
    sys.exit(a.func(a))
