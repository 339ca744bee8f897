"""Load (issue 7): a 200,000-row dataset and a 1,000-step run keep the window's memory flat.

The real window starts the real engine as a child process on the tiny NF4 Llama (CPU), on a
JSONL file of 200,000 short rows. The child tokenizes and trains; the window reads 1,000
step events, draws them and logs. What the window's process holds must not grow with the
run: its resident memory at the end is measured against its memory at step 200.
"""

from __future__ import annotations

import gc
import json
import time
from pathlib import Path

import pytest
from PySide6.QtWidgets import QApplication

from app.run_record import KEPT_LOG_LINES
from app.run_view import LOG_BLOCKS
from qlora_engine.events import StepMetrics, iter_events

ROWS = 200_000
STEPS = 1_000
EARLY_STEP = 200
GROWTH_LIMIT = 16 * 2**20
"""Allowed growth of the window's resident memory from step 200 to the end (measured: under 1 MiB).

The record and the views hold under 1 MiB for these 1,000 steps (four series of 1,000 points,
a short log), and allocator noise (memory Python and Qt keep for reuse) is a few MiB. Anything
the window kept per step at 20 KB or more (a chart item, a log widget, a copy of the curve)
breaks the limit. Slower growth, such as keeping every step's event, is below what RSS can show
in 1,000 steps: the 200,000-step tests in test_bounded_buffers.py catch that.
"""


def rss_bytes() -> int:
    """This process's resident memory, after a full collection (Linux: /proc)."""
    status = Path("/proc/self/status")
    if not status.is_file():
        pytest.skip("needs /proc to read the resident memory")
    gc.collect()
    for line in status.read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS in /proc/self/status")


def settle(qtbot) -> None:
    """Let the view redraw what it has (its redraws are throttled) and collect."""
    qtbot.wait(400)
    QApplication.processEvents()


def test_a_200k_row_dataset_and_a_1000_step_run_keep_the_window_memory_flat(
    qtbot, window, tiny_model_dir, tmp_path, monkeypatch
):
    t_start = time.perf_counter()
    data = tmp_path / "big.jsonl"
    with open(data, "w", encoding="utf-8") as fh:
        for i in range(ROWS):
            fh.write(json.dumps({"text": f"Row {i}: the quick brown fox jumps."}) + "\n")
    # The engine child on a busy two-core machine: torch's default of one thread per core
    # spins against the other processes and makes a tiny step ten times slower.
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    out = tmp_path / "runs" / "load"
    window.config_model.set_values(
        {
            ("model", "ref"): str(tiny_model_dir),
            ("data", "path"): str(data),
            ("data", "max_length"): 32,
            ("data", "cache"): False,
            ("lora", "rank"): 8,
            ("train", "max_steps"): STEPS,
            ("train", "micro_batch_size"): 1,
            ("train", "gradient_accumulation_steps"): 1,
            ("train", "gradient_checkpointing"): False,
            ("train", "logging_steps"): 1,
            ("train", "eval_steps"): None,
            ("train", "save_steps"): 500,
            ("train", "device"): "cpu",
            ("output", "dir"): str(out),
        }
    )
    assert window.config_model.valid, window.config_model.errors
    ctl = window.runs
    view = window.run_view
    rss_before = rss_bytes()

    with qtbot.waitSignal(ctl.ended, timeout=600_000) as ended:
        assert window.runs.start()
        qtbot.waitUntil(lambda: ctl.record.step >= EARLY_STEP, timeout=300_000)
        t_early = time.perf_counter()
        settle(qtbot)
        rss_early = rss_bytes()
    t_end = time.perf_counter()
    assert ended.args == ["finished"], view.log.toPlainText()[-3000:]
    settle(qtbot)
    rss_end = rss_bytes()

    rec = ctl.record
    assert rec.step == STEPS
    xs, _ = view.charts.curves["train loss"].getData()
    assert list(xs) == list(range(1, STEPS + 1))  # 1,000 points are below the decimation: all drawn
    # what the window holds is bounded: series points, kept log lines, lines in the log pane
    assert all(len(series) <= STEPS for series in rec._series.values())
    assert len(rec.logs) <= KEPT_LOG_LINES and view.log.blockCount() <= LOG_BLOCKS
    steps_on_disk = sum(isinstance(e, StepMetrics) for e in iter_events(out / "events.jsonl"))
    assert steps_on_disk == STEPS  # the full record is the run's events.jsonl

    mib = 2**20
    report = (
        f"window RSS before the run {rss_before / mib:.1f} MiB, at step {EARLY_STEP} {rss_early / mib:.1f} MiB, "
        f"at step {STEPS} {rss_end / mib:.1f} MiB (growth {(rss_end - rss_early) / mib:+.1f} MiB); "
        f"{ROWS:,} rows written and run to step {EARLY_STEP} in {t_early - t_start:.0f} s, "
        f"steps {EARLY_STEP}-{STEPS} in {t_end - t_early:.0f} s"
    )
    print(report)
    assert rss_end - rss_early < GROWTH_LIMIT, report
