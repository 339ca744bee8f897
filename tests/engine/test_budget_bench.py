"""bench/budget_accuracy.py works with the current engine, without a GPU.

The GPU run itself is the lead's (one call, ~7 minutes); these tests make sure that call is
not wasted: the cases span the issue's axes, the dry run builds every case's config and
prediction and its worker command, and a smoke run sends one tiny case through the whole
chain (driver, checkpoint subprocess, worker subprocess, the engine's Trainer) on the CPU.
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "bench" / "budget_accuracy.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("budget_accuracy", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_cases_span_the_issues_axes(bench):
    cases = bench.CASES.values()
    assert len(bench.CASES) >= 12
    assert {c[0] for c in cases} == {"llama3-8b", "llama-1b"}
    assert {512, 2048, 8192} <= {c[1] for c in cases}
    assert {1, 4} <= {c[2] for c in cases}
    assert {True, False} == {c[3] for c in cases}
    assert {"paged_adamw_8bit", "paged_adamw_32bit"} <= {c[4] for c in cases}
    # The engine's defaults (train.kernels auto: Liger on the GPU), and the plain code on both shapes.
    plain = [c for c in cases if "train.kernels=none" in c[6]]
    assert 2 <= len(plain) <= len(bench.CASES) // 3 and {c[0] for c in plain} == {"llama3-8b", "llama-1b"}
    assert not any("train.kernels=liger" in c[6] for c in cases)


def test_dry_run_builds_every_case_without_a_gpu(bench, tmp_path, monkeypatch):
    monkeypatch.setattr(sys, "argv", [str(SCRIPT), "--dry-run", "--workdir", str(tmp_path)])
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        bench.main()
    lines = out.getvalue().splitlines()
    rows = [json.loads(line) for line in lines if line.startswith("{")]
    assert [r["case"] for r in rows] == list(bench.CASES)
    for r in rows:
        assert f"--worker {r['case']}" in r["worker"]
        assert r["fits_h100_80gb"]  # every case runs on either card the lead may get
        assert 0 < r["predicted_allocated_gib"] < r["predicted_reserved_gib"] < r["predicted_total_gib"]
        assert r["kernels"] == ("none" if "train.kernels=none" in r["extra"] else "liger")
        assert r["fast_lora"]  # the engine's default LoRA forward: no case sets dropout or DoRA
    plan = next(line for line in lines if line.startswith("# rough plan"))
    assert float(plan.split()[3]) <= 7.0  # minutes
    assert any("expandable_segments" in line for line in lines if line.startswith("# budget allocator"))


def test_smoke_run_goes_through_the_engine_on_the_cpu(tmp_path):
    env = {**os.environ, "OUT": str(tmp_path / "out")}
    env.pop("PYTORCH_CUDA_ALLOC_CONF", None)
    cmd = [sys.executable, str(SCRIPT), "--smoke", "--workdir", str(tmp_path / "work")]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    [record_file] = (tmp_path / "out").glob("*-CPU-smoke-budget.json")
    record = json.loads(record_file.read_text())
    [res] = record["results"]
    assert "error" not in res, res
    assert res["steps"] == 2 and res["loss"] > 0
    # The worker saw the engine's allocator default, and the budget assumed the same mode.
    assert res["allocator"]["alloc_conf_seen"] == "expandable_segments:True"
    assert res["allocator"]["budget_mode"] == "expandable_segments"
    # The backward pass reached the first block exactly as the budget assumes, and the kernels
    # are the ones the budget assumed (on the CPU: none).
    assert res["first_block_input_requires_grad"] == res["budget_assumes_input_grads"]
    assert res["kernels"]["applied"] == res["kernels"]["budget"] == "none"
    # The record says which LoRA forward ran (what --recheck estimates it with): train.fast_lora's
    # on every adapted layer (7 per block, 2 blocks), as the budget assumed.
    assert res["fast_lora_layers"] == 14 and res["predicted"]["fast_lora"] is True
    assert record["calibration"]["allocator"]["expandable_segments"]["measured"] is True
    assert record["not_run"] == []
