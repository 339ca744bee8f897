"""The budget against a recorded GPU accuracy run, recomputed here without a GPU.

bench/results/2026-11-27-NVIDIA-H200-budget.json holds 14 engine cases measured on an H200
with expandable segments (peak allocated and reserved per case, and each case's config). The
estimate needs only the config, so ``bench/budget_accuracy.py --recheck`` re-estimates every
case with the budget as it is now and compares it with the measurements. This test asserts
the issue's goals on that recomputation: every case within +-7% of peak reserved, median
|error| <= 3%, never under by more than 5%, and peak allocated within 0.5% (the formulas). It
fails if the formulas or the calibration drift away from what was measured.

The record predates ``train.fast_lora``: its runs took peft's LoRA forward, and its results
have no ``fast_lora_layers``. The script's recheck estimates each case with the LoRA path it
ran (``recorded_fast_lora``): here ``train.fast_lora=false`` for every case, whatever today's
default.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "bench" / "budget_accuracy.py"
RECORD = ROOT / "bench" / "results" / "2026-11-27-NVIDIA-H200-budget.json"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("budget_accuracy", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def rechecked(bench):
    record = json.loads(RECORD.read_text())
    return record, bench.recheck(record)


def test_the_record_is_rechecked_on_peft_s_lora_path(bench, rechecked):
    record, results = rechecked
    assert all("fast_lora" not in json.dumps(r) for r in record["results"])  # before train.fast_lora existed
    assert not any(bench.recorded_fast_lora(r) for r in record["results"])
    name = record["results"][0]["case"]
    assert bench.case_config(name, Path("/nonexistent"), 1).train.fast_lora is True  # today's default
    assert bench.case_config(name, Path("/nonexistent"), 1, fast_lora=False).train.fast_lora is False
    assert not any(r["predicted"]["fast_lora"] for r in results)


def test_a_record_with_fast_lora_layers_is_rechecked_on_the_fast_path(bench, rechecked, monkeypatch):
    # A record written since train.fast_lora holds the trainer's count of layers on the fast
    # path: the same measurement, marked as run with it, is estimated with it (lower: no fp32
    # copies), and a count the budget cannot take (0 where it assumes the fast path) is an error.
    monkeypatch.delenv("PYTORCH_CUDA_ALLOC_CONF", raising=False)
    record, peft = rechecked
    r = next(r for r in record["results"] if r["case"] == "8b-2048x4-ckpt-p8")
    [fast] = bench.recheck({"results": [dict(r, fast_lora_layers=224)]})
    [off] = bench.recheck({"results": [dict(r, fast_lora_layers=0)]})
    [before] = [p for p in peft if p["case"] == r["case"]]
    assert fast["predicted"]["fast_lora"] and not off["predicted"]["fast_lora"]
    assert off["predicted"] == before["predicted"]
    assert fast["predicted"]["torch_allocated_gib"] < before["predicted"]["torch_allocated_gib"] - 0.5
    assert bench.summarize([fast, off])["fast_lora_as_assumed"]
    assert not bench.summarize([dict(fast, fast_lora_layers=0)])["fast_lora_as_assumed"]
    dropout = (*bench.ALL_CASES[r["case"]][:6], ["lora.dropout=0.05"])  # peft's path, whatever train.fast_lora says
    monkeypatch.setitem(bench.ALL_CASES, "8b-2048x4-ckpt-p8-dropout", dropout)
    with pytest.raises(ValueError, match="fast_lora=False, the run had 224 layers"):
        bench.recheck({"results": [dict(r, case="8b-2048x4-ckpt-p8-dropout", fast_lora_layers=224)]})


def test_the_record_is_a_full_run(rechecked):
    record, results = rechecked
    assert record["card"] == "NVIDIA H200" and record["final"] and not record["not_run"]
    assert len(results) == 14 and all("measured" in r for r in results)


def test_the_recomputed_budget_meets_the_goals_on_the_h200_record(bench, rechecked, monkeypatch):
    monkeypatch.delenv("PYTORCH_CUDA_ALLOC_CONF", raising=False)
    _, results = rechecked
    summary = bench.summarize(results)
    assert summary["cases"] == 14 and summary["failed_cases"] == 0 and summary["kernels_as_assumed"]
    assert summary["max_abs_error_pct"] <= bench.GOALS["max_abs_pct"] == 7.0
    assert summary["median_abs_error_pct"] <= bench.GOALS["median_abs_pct"] == 3.0
    assert -summary["worst_under_prediction_pct"] <= bench.GOALS["max_under_pct"] == 5.0
    assert summary["goals_met"]
    assert summary["allocated_max_abs_error_pct"] <= 0.5
    assert summary["in_low_high_range"] == 14
    for r in results:  # the errors come from the recomputed prediction, not the recorded one
        m, p = r["measured"], r["predicted"]
        assert r["reserved_error_pct"] == pytest.approx(
            100 * (p["torch_reserved_gib"] - m["peak_reserved_gib"]) / m["peak_reserved_gib"], abs=0.05
        )


def test_recheck_on_the_command_line(tmp_path):
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--recheck", str(RECORD)], cwd=ROOT, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    summary = json.loads(next(ln for ln in proc.stdout.splitlines() if ln.startswith('{"summary"')))["summary"]
    assert summary["goals_met"] and summary["cases"] == 14
    assert all(
        name in proc.stdout
        for name in json.loads(RECORD.read_text())["slack_fit"]["expandable_segments"]["measured_slack_gib"]
    )
