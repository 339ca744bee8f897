"""GPU facts through NVML: a clean answer without a GPU, and correct listing with one.

The second half uses a stand-in ``pynvml`` module: CI machines have no NVIDIA driver, and
what is tested here is our reading of NVML's answers (bytes names, missing utilization,
a card that errors), not NVML itself.
"""

from __future__ import annotations

import sys
import types
from types import SimpleNamespace

import pytest

from qlora_engine import gpu


@pytest.fixture(autouse=True)
def fresh_nvml():
    gpu.shutdown()
    yield
    gpu.shutdown()


def test_no_gpu_answer_is_clean(monkeypatch):
    class NVMLError(Exception):
        pass

    class NVMLError_LibraryNotFound(NVMLError):
        pass

    def init():
        raise NVMLError_LibraryNotFound("NVML Shared Library Not Found")

    monkeypatch.setitem(sys.modules, "pynvml", types.SimpleNamespace(nvmlInit=init, nvmlShutdown=lambda: None))
    report = gpu.query_gpus()
    assert not report.available
    assert report.gpus == ()
    assert report.reason.startswith("no NVIDIA GPU")
    assert "NVML" in report.reason
    assert gpu.sample(0) is None
    assert report.to_dict()["available"] is False


def test_real_pynvml_never_raises():
    """Whatever this machine has, the real module answers without an exception."""
    report = gpu.query_gpus()
    assert report.available or report.reason.startswith("no NVIDIA GPU")
    if not report.available:
        assert gpu.sample(0) is None


def _fake_nvml(cards):
    class NVMLError(Exception):
        pass

    def handle(i):
        if i >= len(cards):
            raise NVMLError("invalid argument")
        if cards[i].get("broken"):
            raise NVMLError("GPU is lost")
        return i

    def util(h):
        if cards[h].get("util") is None:
            raise NVMLError("not supported")
        return SimpleNamespace(gpu=cards[h]["util"], memory=0)

    return types.SimpleNamespace(
        NVMLError=NVMLError,
        nvmlInit=lambda: None,
        nvmlShutdown=lambda: None,
        nvmlDeviceGetCount=lambda: len(cards),
        nvmlSystemGetDriverVersion=lambda: b"570.86",
        nvmlDeviceGetHandleByIndex=handle,
        nvmlDeviceGetName=lambda h: cards[h]["name"],
        nvmlDeviceGetUUID=lambda h: f"GPU-{h:04d}",
        nvmlDeviceGetMemoryInfo=lambda h: SimpleNamespace(
            total=cards[h]["total"], free=cards[h]["total"] - cards[h]["used"], used=cards[h]["used"]
        ),
        nvmlDeviceGetUtilizationRates=util,
        nvmlDeviceGetComputeRunningProcesses=lambda h: [SimpleNamespace(pid=4242, usedGpuMemory=3 * 2**30)],
    )


def test_lists_cards_with_memory_and_utilization(monkeypatch):
    cards = [
        {"name": b"NVIDIA H100 80GB HBM3", "total": 80 * 2**30, "used": 2 * 2**30, "util": 7},
        {"name": "NVIDIA GeForce RTX 4090", "total": 24 * 2**30, "used": 0, "util": None},
        {"name": "lost", "total": 1, "used": 0, "util": 0, "broken": True},
    ]
    monkeypatch.setitem(sys.modules, "pynvml", _fake_nvml(cards))
    report = gpu.query_gpus()
    assert report.available and report.driver_version == "570.86"
    assert [g.name for g in report.gpus] == ["NVIDIA H100 80GB HBM3", "NVIDIA GeForce RTX 4090"]
    h100, rtx = report.gpus
    assert h100.total_bytes == 80 * 2**30 and h100.free_bytes == 78 * 2**30 and h100.utilization == 7
    assert rtx.utilization is None
    assert h100.cuda_visible_id == "GPU-0000"
    assert "78.0 GiB free of 80.0 GiB" in h100.label()
    s = gpu.sample(0, pid=4242)
    assert s.used_bytes == 2 * 2**30 and s.process_bytes == 3 * 2**30
    assert gpu.sample(0, pid=1).process_bytes is None
    assert gpu.sample(7) is None
