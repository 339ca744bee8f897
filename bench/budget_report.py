"""What bench/budget_accuracy.py makes of its results: the summary against the goals, the
table, and a least-squares fit of the allocator's slack."""

from __future__ import annotations

import statistics

from budget_cases import GOALS


def fit_slack(results: list[dict]) -> dict:
    """Least-squares fit of the measured slack (reserved - allocated), per allocator mode, to the
    estimate's form: fixed + fragmentation x dynamic (fragmentation_without_checkpointing for
    runs without checkpointing) + logits_fragmentation x 4TV (plain loss peaks only). The inputs of CALIBRATION["allocator"][mode] after a run; read before pasting."""
    by_mode: dict[str, list[dict]] = {}
    for r in results:
        if "measured" in r:
            by_mode.setdefault(r["allocator"]["budget_mode"], []).append(r)
    out = {}
    for mode, rs in by_mode.items():
        rows = [(1.0, r["predicted"]["dynamic_gib"] if r["checkpointing"] else 0.0,
                 0.0 if r["checkpointing"] else r["predicted"]["dynamic_gib"],
                 r["predicted"]["logits_fp32_gib"] if r["predicted"]["peak_phase"].startswith("loss") else 0.0)
                for r in rs]  # fmt: skip
        y = [r["measured"]["slack_gib"] for r in rs]
        fit: dict = {"cases": len(rs), "measured_slack_gib": dict(zip([r["case"] for r in rs], y, strict=True))}
        try:
            import numpy as np

            a = np.array(rows)
            cols = [c for c in range(4) if a[:, c].any()] if len(rs) >= 4 else [0]
            coef, *_ = np.linalg.lstsq(a[:, cols], np.array(y), rcond=None)
            names = ("fixed_gib", "fragmentation", "fragmentation_without_checkpointing", "logits_fragmentation")
            named = dict.fromkeys(names, 0.0)
            for c, v in zip(cols, coef, strict=True):
                named[list(named)[c]] = round(float(v), 4)
            fit["fit"] = named
            resid = np.array(y) - a[:, cols] @ coef
            fit["worst_under_gib"] = round(float(resid.max()), 3)  # the slack the fit misses at worst
        except Exception as e:  # numpy missing or a degenerate set: the raw numbers are still there
            fit["fit_error"] = repr(e)
        out[mode] = fit
    return out


def summarize(results: list[dict]) -> dict:
    ok = [r for r in results if "reserved_error_pct" in r]
    failed = sum("error" in r for r in results)
    errs = [r["reserved_error_pct"] for r in ok]
    if not errs:
        return {"cases": 0, "failed_cases": failed}
    summary = {
        "cases": len(ok),
        "failed_cases": failed,
        "median_abs_error_pct": round(statistics.median(abs(e) for e in errs), 2),
        "max_abs_error_pct": round(max(abs(e) for e in errs), 2),
        "worst_under_prediction_pct": round(min(min(errs), 0.0), 2),
        "allocated_median_abs_error_pct": round(statistics.median(abs(r["allocated_error_pct"]) for r in ok), 2),
        "allocated_max_abs_error_pct": round(max(abs(r["allocated_error_pct"]) for r in ok), 2),
        "in_low_high_range": sum(bool(r["in_range"]) for r in ok),
        "allocator_modes": sorted({r["allocator"]["budget_mode"] for r in ok}),
        "input_grads_as_assumed": all(
            r["first_block_input_requires_grad"] == (r["checkpointing"] and r["budget_assumes_input_grads"])
            for r in ok if r["first_block_input_requires_grad"] is not None
        ),
        "kernels_as_assumed": all(r["kernels"]["applied"] == r["kernels"]["budget"] for r in ok),
        "kernels": sorted({r["kernels"]["applied"] for r in ok}),
        # The LoRA forward the engine took (layers on train.fast_lora's path) against the budget's;
        # records from before train.fast_lora have neither (their runs took peft's forward).
        "fast_lora_as_assumed": all(
            bool(r["fast_lora_layers"]) == r["predicted"]["fast_lora"]
            for r in ok if "fast_lora_layers" in r and "fast_lora" in r["predicted"]
        ),
    }  # fmt: skip
    summary["goals_met"] = (
        summary["kernels_as_assumed"]
        and summary["fast_lora_as_assumed"]
        and summary["max_abs_error_pct"] <= GOALS["max_abs_pct"]
        and summary["median_abs_error_pct"] <= GOALS["median_abs_pct"]
        and -summary["worst_under_prediction_pct"] <= GOALS["max_under_pct"]
        and summary["failed_cases"] == 0
    )
    return summary


def table(results: list[dict]) -> str:
    head = (f"{'case':<30} {'meas res':>9} {'pred res':>9} {'err %':>7} {'meas alloc':>10} {'pred alloc':>10} "
            f"{'err %':>7} {'slack':>6} {'pred':>6}  peak phase")  # fmt: skip
    lines = [head, "-" * len(head)]
    for r in results:
        if "error" in r:
            lines.append(f"{r['case']:<30} ERROR {r['error'][:90]}")
            continue
        if "measured" not in r:
            continue
        m, p = r["measured"], r["predicted"]
        lines.append(
            f"{r['case']:<30} {m['peak_reserved_gib']:>9.2f} {p['torch_reserved_gib']:>9.2f} {r['reserved_error_pct']:>+7.1f} "
            f"{m['peak_allocated_gib']:>10.2f} {p['torch_allocated_gib']:>10.2f} {r['allocated_error_pct']:>+7.1f} "
            f"{m['slack_gib']:>6.2f} {p['slack_gib']:>6.2f}  {p['peak_phase']}"
        )
    return "\n".join(lines)
