"""What the window keeps of a run stays bounded however long the run (issue 7: load).

The record keeps each chart series under a fixed number of points (exact at first, then
decimated to the first, lowest, highest and last point of equal-width buckets), the newest
log lines and the latest values; the full record is the run's events.jsonl on disk.
"""

from __future__ import annotations

import math
import random
import weakref
from dataclasses import replace

import numpy as np
import pytest

from app import run_record
from app.charts import RunCharts
from app.run_record import KEPT_LOG_LINES, MEMORY_SERIES, STEP_SERIES, RunRecord, write_events
from app.series import BoundedSeries
from qlora_engine.events import LogLine, RunStarted, StepMetrics

SERIES_BOUND = 4 * 1024 + 512
"""Most points one series keeps with the defaults (4 per bucket and the exact tail)."""


def step_event(step: int, loss: float, total: int, t0: float = 1_000_000.0) -> StepMetrics:
    return StepMetrics(
        step=step,
        total_steps=total,
        epoch=step / 1000,
        loss=loss,
        learning_rate=1e-4 * (1 - step / total),
        grad_norm=1.0 + (step % 7) / 10,
        tokens=100,
        tokens_per_second=1000.0 + step % 13,
        elapsed=step * 0.1,
        eta=(total - step) * 0.1,
        cuda_allocated=2**30 + (step % 101) * 2**20,
        cuda_reserved=2**31,
        paged_out=(step % 3) * 2**28,
        time=t0 + step * 0.1,
    )


def test_series_is_exact_until_its_buckets_fill_then_stays_bounded():
    s = BoundedSeries(buckets=8, exact=4)
    exact_up_to = 4 * 8 + 4 - 1  # buckets of up to 4 points lose nothing; the 36th point merges to 8
    for i in range(exact_up_to):
        s.append(i, (i * 37) % 11)
    assert s.data() == ([float(i) for i in range(exact_up_to)], [float((i * 37) % 11) for i in range(exact_up_to)])
    for i in range(exact_up_to, 10_000):
        s.append(i, (i * 37) % 11)
        assert len(s) <= 4 * 8 + 4
    xs, _ = s.data()
    assert xs[0] == 0 and xs[-4:] == [9996, 9997, 9998, 9999]  # the first point and the exact tail
    assert xs == sorted(xs) and len(set(xs)) == len(xs)


def test_series_drops_relogged_and_resumed_points_also_past_its_exact_tail():
    s = BoundedSeries(buckets=8, exact=4)
    for i in range(1, 1001):
        s.append(i, float(i))
    s.drop_from(999)  # step 999 logged again
    assert s.last == (998.0, 998.0)
    s.drop_after(500)  # resumed from the checkpoint of step 500: the cut reaches into the buckets
    xs, _ = s.data()
    assert xs[-1] <= 500 and xs[0] == 1
    for i in range(501, 2001):
        s.append(i, float(i))
    xs, ys = s.data()
    assert xs == sorted(xs) and xs[-1] == 2000 and ys[-1] == 2000
    assert len(s) <= 4 * 8 + 4


def test_a_record_of_200k_steps_and_vram_samples_stays_bounded_and_draws_the_whole_run(qtbot):
    total = 200_000
    rng = random.Random(7)
    losses = [2.0 * math.exp(-i / 50_000) + rng.random() * 0.05 for i in range(total)]
    spike, dip = rng.randrange(1_000, total - 1_000), rng.randrange(1_000, total - 1_000)
    losses[spike], losses[dip] = 9.5, 0.01  # a divergence spike and the best loss, deep in the decimated part
    rec = RunRecord()
    rec.apply(RunStarted(run_dir="/tmp/run", config={}, model={}, device="cuda:0", total_steps=total, time=999_999.0))
    for i in range(total):
        rec.apply(step_event(i + 1, losses[i], total))
        rec.add_vram(3 * 2**30 + (i % 97) * 2**20, 2**30, at=1_000_000.0 + i * 0.1)
        if i % 50 == 0:
            rec.apply(LogLine(level="info", message=f"note {i}"))

    for name in (*STEP_SERIES, "eval_loss", *MEMORY_SERIES):
        assert len(rec._series[name]) <= SERIES_BOUND, name
    assert rec.kept_points() <= len(rec._series) * SERIES_BOUND
    assert len(rec.logs) == KEPT_LOG_LINES and rec.logs[-1].message == f"note {total - 50}"
    assert rec.latest.step == rec.step == total and rec.total_steps == total

    xs, ys = rec.series("loss")
    assert xs[0] == 1 and ys[0] == pytest.approx(losses[0])  # the first point
    assert xs[-1] == total and ys[-1] == pytest.approx(losses[-1])  # the last point
    assert xs[-512:] == [float(s) for s in range(total - 511, total + 1)]  # the newest points are exact
    assert max(ys) == pytest.approx(9.5) and xs[ys.index(max(ys))] == spike + 1
    assert min(ys) == pytest.approx(0.01) and xs[ys.index(min(ys))] == dip + 1
    assert np.all(np.diff(xs) > 0)
    mem = rec.memory_series()
    assert set(mem) == set(MEMORY_SERIES.values())
    t_used, gib_used = mem["GPU used (NVML)"]
    assert t_used[0] == pytest.approx(1.0) and t_used[-1] == pytest.approx(1.0 + (total - 1) * 0.1)
    assert max(gib_used) == pytest.approx(3 + 96 / 1024) and min(gib_used) == pytest.approx(3.0)

    charts = RunCharts()
    qtbot.addWidget(charts)
    charts.draw(rec)
    for name in ("train loss", "learning rate", "grad norm", "tokens/s"):
        cx, _ = charts.curves[name].getData()
        assert cx[0] == 1 and cx[-1] == total and len(cx) <= SERIES_BOUND, name  # the whole x range
    cx, cy = charts.curves["train loss"].getData()
    assert np.nanmax(cy) == pytest.approx(9.5) and np.nanmin(cy) == pytest.approx(0.01)
    vx, _ = charts.curves["GPU used (NVML)"].getData()
    assert vx[0] == pytest.approx(1.0) and vx[-1] == pytest.approx(t_used[-1]) and len(vx) <= SERIES_BOUND


def test_a_resumed_run_redraws_from_its_checkpoint_after_decimation():
    rec = RunRecord()
    rec.apply(RunStarted(run_dir="/tmp/run", config={}, model={}, device="cpu", total_steps=20_000))
    for i in range(1, 12_001):
        rec.apply(step_event(i, 1.0, 20_000))
    # killed at 12,000; the newest checkpoint is step 10,000: the steps after it are done again
    rec.apply(
        RunStarted(
            run_dir="/tmp/run",
            config={},
            model={},
            device="cpu",
            total_steps=20_000,
            resumed_from="ckpt",
            start_step=10_000,
        )
    )
    assert rec.step == 10_000 and rec.latest is None
    assert rec.series("loss")[0][-1] <= 10_000
    for i in range(10_001, 20_001):
        rec.apply(step_event(i, 0.5, 20_000))
    xs, ys = rec.series("loss")
    assert np.all(np.diff(xs) > 0) and xs[0] == 1 and xs[-1] == 20_000
    assert ys[-1] == 0.5 and rec.step == 20_000


def test_opening_a_long_run_from_the_history_reads_it_line_by_line(tmp_path, monkeypatch):
    total = 10_000
    events = [RunStarted(run_dir=str(tmp_path), config={}, model={}, device="cpu", total_steps=total)]
    events += [step_event(i, 1.0 / i, total) for i in range(1, total + 1)]
    write_events(tmp_path / "events.jsonl", events)
    del events
    alive = most_alive = read = 0
    real = run_record.iter_events

    def freed() -> None:
        nonlocal alive
        alive -= 1

    def watched(path):
        nonlocal alive, most_alive, read
        for e in real(path):
            most_alive = max(most_alive, alive)
            alive += 1
            weakref.finalize(e, freed)
            read += 1
            yield e

    monkeypatch.setattr(run_record, "iter_events", watched)
    rec = RunRecord.from_dir(tmp_path)
    assert read == total + 1  # every line went through the reader ...
    assert most_alive <= 3  # ... one at a time: the record keeps the start and the latest step, not the stream
    assert alive <= 3
    assert rec.step == total and rec.series("loss")[0][-1] == total


@pytest.mark.parametrize(
    "paged, drawn",
    [
        ([None] * 6, 0),  # no paged optimizer (a CPU run, or a plain one)
        ([0.0] * 6, 0),  # a paged optimizer that never spilled: no line at zero
        ([0.0, 0.0, 2**30, 2**30, 0.0, 2**29], 4),  # from the first spill on, zeros included
        ([2**31] * 6, 6),
    ],
)
def test_the_vram_chart_shows_optimizer_state_paged_out_once_any_is(qtbot, paged, drawn):
    rec = RunRecord()
    rec.apply(RunStarted(run_dir="/tmp/run", config={}, model={}, device="cuda:0", total_steps=6, time=999_999.0))
    for i, out in enumerate(paged, start=1):
        rec.apply(replace(step_event(i, 1.0, 6), paged_out=out))
    charts = RunCharts()
    qtbot.addWidget(charts)
    charts.draw(rec)
    x, y = charts.curves["paged out to CPU RAM"].getData()
    assert len(x if x is not None else []) == drawn
    if drawn:
        first = next(i for i, v in enumerate(paged) if v)
        assert list(y) == pytest.approx([(v or 0) / 2**30 for v in paged[first:]])
    labels = [label.text for _sample, label in charts.vram.legend.items]
    assert ("paged out to CPU RAM" in labels) == bool(drawn)
