"""Several GPUs in the app: the card selector, the launch's ``--gpus``, a VRAM line per card, one record.

This machine has no GPU and no NVML. The cards come from a fake NVML library (:class:`FakeNvml`)
put where the app reads NVML (``app.gpu_cards.reader``): what is tested is the app's handling of
what NVML says, and the engine's own reading of it (``qlora_engine.gpu``), not NVML.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
from PySide6.QtGui import QColor

from app import gpu_cards
from app.budget_panel import SEVERAL
from app.charts import GPU_LINE_SCHEMES, RunCharts
from app.run_record import MEMORY_SERIES, RunRecord
from app.theme import contrast_ratio
from qlora_engine.events import RunStarted, StepMetrics
from tests.app.test_real_run import fill_form

GIB = 2**30
REPLAY = Path(__file__).with_name("replay_engine.py")


def points(curve) -> int:
    xs = curve.getData()[0]
    return 0 if xs is None else len(xs)


class FakeNvml:
    """The part of ``pynvml`` the app reads, describing ``count`` cards of 24 GiB; card i uses i+1 GiB."""

    def __init__(self, count: int) -> None:
        self.count = count
        self.run_pid: int | None = None
        """The pid whose memory each card reports as a compute process (one card: "this run")."""

    def nvmlDeviceGetCount(self) -> int:  # noqa: N802 - NVML's names
        return self.count

    def nvmlSystemGetDriverVersion(self) -> str:  # noqa: N802
        return "555.42"

    def nvmlDeviceGetHandleByIndex(self, i: int) -> int:  # noqa: N802
        if not 0 <= i < self.count:
            raise RuntimeError("NVMLError_InvalidArgument")
        return i

    def nvmlDeviceGetMemoryInfo(self, h: int) -> SimpleNamespace:  # noqa: N802
        used = (h + 1) * GIB
        return SimpleNamespace(total=24 * GIB, used=used, free=24 * GIB - used)

    def nvmlDeviceGetName(self, h: int) -> bytes:  # noqa: N802
        return b"Fake RTX 24G"

    def nvmlDeviceGetUUID(self, h: int) -> str:  # noqa: N802
        return f"GPU-fake-{h}"

    def nvmlDeviceGetUtilizationRates(self, h: int) -> SimpleNamespace:  # noqa: N802
        return SimpleNamespace(gpu=50)

    def nvmlDeviceGetComputeRunningProcesses(self, h: int) -> list[SimpleNamespace]:  # noqa: N802
        return [SimpleNamespace(pid=self.run_pid, usedGpuMemory=GIB // 2)] if self.run_pid else []


@pytest.fixture
def cards(monkeypatch):
    """``cards(n)``: this machine has n fake cards from now on (set before the window is made)."""

    def have(n: int) -> FakeNvml:
        fake = FakeNvml(n)
        monkeypatch.setattr(gpu_cards, "reader", fake)
        return fake

    return have


# -- the plain part: no window ---------------------------------------------------------------


def test_which_cards_and_the_launch_without_a_window(cards):
    fake = cards(3)
    listed = gpu_cards.list_cards().gpus
    assert [g.index for g in listed] == [0, 1, 2] and listed[2].uuid == "GPU-fake-2"
    assert gpu_cards.gpus_args([]) == gpu_cards.gpus_args(listed[:1]) == []
    assert gpu_cards.gpus_args([listed[0], listed[2]]) == ["--gpus", "0,2"]
    assert gpu_cards.gpus_args(listed) == ["--gpus", "0,1,2"]
    base = {"CUDA_VISIBLE_DEVICES": "7", "PATH": "/bin"}
    assert gpu_cards.launch_env(base, listed[1:2], "auto")["CUDA_VISIBLE_DEVICES"] == "GPU-fake-1"  # as before
    several = gpu_cards.launch_env(base, [listed[0], listed[2]], "auto")
    assert several["CUDA_DEVICE_ORDER"] == "PCI_BUS_ID"  # --gpus 0,2 names NVML's cards 0 and 2
    assert gpu_cards.launch_env(base, [], "cpu")["CUDA_VISIBLE_DEVICES"] == ""
    assert gpu_cards.launch_env(base, [], "cuda")["CUDA_VISIBLE_DEVICES"] == "7"
    assert gpu_cards.restore("0,2", [0, 1, 2]) == [0, 2]
    assert gpu_cards.restore("2,0,9", [0, 1, 2]) == [0, 2]  # a card that is gone is left out
    assert gpu_cards.restore(None, [0]) == gpu_cards.restore("x,1", [0, 1]) == []
    fake.run_pid = 4242
    one = gpu_cards.sample_cards([1], 4242)
    assert [(s.index, s.used_bytes, s.process_bytes) for s in one] == [(1, 2 * GIB, GIB // 2)]
    two = gpu_cards.sample_cards([0, 2], 4242)  # the launcher's pid holds no card: no "this run" share
    assert [(s.index, s.used_bytes, s.process_bytes) for s in two] == [(0, GIB, None), (2, 3 * GIB, None)]
    assert gpu_cards.sample_cards([5], None) == []


def test_one_record_holds_a_line_per_chosen_card_and_the_chart_draws_those(qtbot):
    rec = RunRecord(run_dir=Path("/tmp/r"), gpus=[0, 2])
    rec.apply(RunStarted(run_dir="/tmp/r", config={}, model={}, device="cuda:0", total_steps=3, time=100.0))
    for t in range(4):
        for card in (0, 2):
            rec.add_vram((card + 1 + t / 10) * GIB, None, at=100.0 + t, card=card)
    mem = rec.memory_series()
    assert set(mem) == {"GPU 0", "GPU 2"}  # each chosen card, and no card-wide line mixing them
    assert mem["GPU 2"] == ([0.0, 1.0, 2.0, 3.0], pytest.approx([3.0, 3.1, 3.2, 3.3]))
    # a new run in the same folder starts over; the record still knows its cards
    rec.apply(RunStarted(run_dir="/tmp/r", config={}, model={}, device="cuda:0", total_steps=3, time=200.0))
    assert rec.gpus == [0, 2] and rec.memory_series() == {}
    rec.add_vram(GIB, None, at=201.0, card=2)

    charts = RunCharts()
    qtbot.addWidget(charts)
    charts.draw(rec)
    drawn = {name for name, c in charts.curves.items() if points(c)}
    assert drawn == {"GPU 2"}
    light = QColor("#ffffff")
    assert all(contrast_ratio(QColor(c), light) >= 3.0 for c in GPU_LINE_SCHEMES["light"])
    assert all(contrast_ratio(QColor(c), QColor("#111111")) >= 3.0 for c in GPU_LINE_SCHEMES["dark"])


def test_one_card_keeps_the_lines_of_one_card():
    rec = RunRecord(gpus=[1])
    rec.add_vram(2 * GIB, GIB, at=5.0, card=1)
    assert set(rec.memory_series()) == {MEMORY_SERIES["vram_used"], MEMORY_SERIES["vram_process"]}


# -- the selector ----------------------------------------------------------------------------


@pytest.mark.parametrize("count", [0, 1, 2, 3])
def test_the_selector_lists_the_cards_nvml_sees(qtbot, make_window, cards, count):
    cards(count)
    panel = make_window().budget
    items = [panel.gpu_combo.itemData(i) for i in range(panel.gpu_combo.count())]
    assert [d for d in items if isinstance(d, int) and d >= 0] == list(range(count))
    assert (SEVERAL in items) == (count >= 2)  # ticking several is offered only where there are several
    assert sorted(panel.card_boxes) == (list(range(count)) if count >= 2 else [])
    assert panel.cards_row.isHidden()
    # the default is today's: the first card alone, or the CPU without one
    assert [g.index for g in panel.selected_gpus()] == ([0] if count else [])
    assert panel.gpu_combo.currentText().startswith("GPU 0" if count else "CPU")


def test_ticking_cards_and_the_budget_per_gpu(qtbot, make_window, cards, tiny_model_dir):
    cards(3)
    window = make_window()
    panel = window.budget
    with qtbot.waitSignal(panel.updated, timeout=60_000):
        window.config_model.set_value("model", "ref", str(tiny_model_dir))
    one_card = panel.result["estimate"].total
    assert panel.result["world_size"] == 1 and "per GPU" not in panel.headline.text()
    with qtbot.waitSignal(panel.updated, timeout=60_000):
        panel.gpu_combo.setCurrentIndex(panel.gpu_combo.findData(SEVERAL))
    assert not panel.cards_row.isHidden()
    assert [g.index for g in panel.selected_gpus()] == [0, 1, 2]  # first time: every card
    assert panel.result["world_size"] == 3
    with qtbot.waitSignal(panel.updated, timeout=60_000):
        panel.card_boxes[1].click()  # cards 0 and 2
    assert [g.index for g in panel.selected_gpus()] == [0, 2] and panel.selected_gpu() is None
    result = panel.result
    assert result["world_size"] == 2 and "per GPU" in panel.headline.text()
    assert result["strategy"].field == "train.strategy" and result["strategy"].chosen == "ddp"
    assert "ddp_buckets" in result["estimate"].components  # one GPU's budget under DDP
    assert result["estimate"].total >= one_card
    assert "Strategy (auto)" in panel.status.text()
    panel.card_boxes[0].click()  # one card left ticked: it cannot be unticked
    assert not panel.card_boxes[2].isEnabled() and panel.card_boxes[2].isChecked()
    assert [g.index for g in panel.selected_gpus()] == [2]
    panel.card_boxes[0].click()
    panel.refresh_gpus()  # looking for the cards again keeps the choice
    assert panel.gpu_combo.currentData() == SEVERAL and [g.index for g in panel.selected_gpus()] == [0, 2]


def test_the_chosen_cards_are_remembered(qtbot, make_window, cards):
    cards(3)
    first = make_window()
    first.budget.select_cards([0, 2])
    assert first.budget.gpu_combo.currentData() == SEVERAL
    second = make_window()  # the same settings file: the next start of the app
    assert second.budget.gpu_combo.currentData() == SEVERAL
    assert [g.index for g in second.budget.selected_gpus()] == [0, 2]
    second.budget.select_cards([1])
    assert [g.index for g in make_window().budget.selected_gpus()] == [1]
    second.budget.select_cards([1, 2])
    cards(2)  # card 2 is gone: the chosen cards still here are chosen
    assert [g.index for g in make_window().budget.selected_gpus()] == [1]
    cards(0)  # none left: the CPU, as on any machine without a card
    assert make_window().budget.selected_gpus() == []


# -- launching -------------------------------------------------------------------------------


def test_one_card_launches_as_before(qtbot, make_window, cards, tmp_path, events_dir):
    fake = cards(1)
    window = make_window()
    ctl = window.runs
    ctl.command_factory = lambda config, resume=None: [
        sys.executable, str(REPLAY), str(events_dir / "stop.jsonl"), "--hang"
    ]  # fmt: skip
    window.config_model.set_values(
        {
            ("model", "ref"): str(tmp_path / "m"),
            ("data", "path"): str(tmp_path / "d.jsonl"),
            ("output", "dir"): str(tmp_path / "runs" / "one"),
        }
    )
    with qtbot.waitSignal(ctl.event, timeout=20_000):
        assert ctl.start()
    fake.run_pid = ctl.job.pid
    assert "--gpus" not in ctl.job._worker.cmd
    assert ctl.job._worker.env["CUDA_VISIBLE_DEVICES"] == "GPU-fake-0"
    assert ctl.job._worker.env.get("CUDA_DEVICE_ORDER") == os.environ.get("CUDA_DEVICE_ORDER")
    qtbot.waitUntil(lambda: len(ctl.record.memory_series().get("this run (NVML)", ([], []))[0]) >= 2, timeout=20_000)
    with qtbot.waitSignal(ctl.ended, timeout=20_000):
        ctl.stop()
    assert ctl.record.gpus == [0]
    window.run_view.redraw()
    curves = window.run_view.charts.curves
    assert set(ctl.record.memory_series()) == {"GPU used (NVML)", "this run (NVML)"}
    assert list(curves["GPU used (NVML)"].getData()[1][:1]) == [1.0]
    assert "GPU 0" not in curves


def test_two_of_three_cards_run_one_job_over_both_and_abort_ends_every_process(
    qtbot, make_window, cards, tiny_model_dir, text_data, tmp_path
):
    """The real engine, on the CPU: ``--gpus 0,2`` starts two processes over gloo, one run with a
    chart line per chosen card. Abort goes through the launcher (killing it would leave torchrun's
    workers to stop and save): every process ends, nothing is saved. (A finished several-process
    run is tested on the engine side, tests/engine/test_distributed.py.)"""
    cards(3)
    window = make_window()
    window.budget.select_cards([0, 2])
    out = tmp_path / "runs" / "two"
    fill_form(qtbot, window, tiny_model_dir, text_data, out, steps=300, save_steps=None)
    assert window.run_view.summary.text().endswith("· on GPU 0, GPU 2")  # what Start trains on
    ctl = window.runs
    with qtbot.waitSignal(ctl.event, timeout=180_000, check_params_cb=lambda e: isinstance(e, StepMetrics)):
        assert ctl.start()
    argv = Path(f"/proc/{ctl.job.pid}/cmdline").read_bytes().split(b"\0")[:-1]
    assert [a.decode() for a in argv[-2:]] == ["--gpus", "0,2"]  # what the child got
    assert [a.decode() for a in argv[2:4]] == ["qlora_engine", "train"]
    rec = ctl.record
    assert rec.gpus == [0, 2] and rec.run_dir == out
    assert [p["rank"] for p in rec.started.processes] == [0, 1]  # one run of two processes, one record
    workers = [p["pid"] for p in rec.started.processes]

    def drawn() -> set[str]:
        window.run_view.redraw()
        return {name for name, c in window.run_view.charts.curves.items() if name.startswith("GPU") and points(c)}

    qtbot.waitUntil(lambda: drawn() == {"GPU 0", "GPU 2"}, timeout=30_000)  # none for card 1 nor a card-wide one
    curves = window.run_view.charts.curves
    assert set(curves["GPU 2"].getData()[1]) == {3.0} and set(curves["GPU 0"].getData()[1]) == {1.0}

    with qtbot.waitSignal(ctl.ended, timeout=60_000) as ended:
        window.run_view.abort_button.click()
    assert ended.args == ["aborted"] and ctl.state == "aborted"  # not "stopped": nothing was saved
    assert not (out / "adapter").exists() and not (out / "checkpoints").exists()
    assert ctl.record.step < 300
    assert not [pid for pid in workers if Path(f"/proc/{pid}").exists()]  # the job ended when they did
