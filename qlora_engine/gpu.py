"""Facts about the machine's NVIDIA GPUs, read through NVML (``pynvml`` from ``nvidia-ml-py``).

NVML answers in well under a millisecond and never creates a CUDA context, so the app can
list cards and sample their memory twice a second without touching torch. On a machine
without an NVIDIA driver every function gives a clean answer instead of raising:
:func:`query_gpus` returns an empty report whose ``reason`` says why, and :func:`sample`
returns ``None``.
"""

from __future__ import annotations

import threading
from dataclasses import asdict, dataclass
from typing import Any

__all__ = ["GpuInfo", "GpuReport", "MemorySample", "query_gpus", "sample", "shutdown"]

_lock = threading.Lock()
_state: dict[str, Any] = {"initialized": False, "error": None, "module": None}


@dataclass(frozen=True)
class GpuInfo:
    """One NVIDIA GPU as NVML sees it. Memory in bytes; ``utilization`` in percent (None if unknown)."""

    index: int
    name: str
    total_bytes: int
    free_bytes: int
    used_bytes: int
    utilization: int | None = None
    uuid: str | None = None

    @property
    def cuda_visible_id(self) -> str:
        """What to put in ``CUDA_VISIBLE_DEVICES`` to run on exactly this card.

        The UUID, because CUDA numbers cards fastest-first while NVML numbers them by PCI bus.
        """
        return self.uuid or str(self.index)

    def label(self) -> str:
        gib = 2**30
        return (
            f"GPU {self.index}: {self.name} ({self.free_bytes / gib:.1f} GiB free of {self.total_bytes / gib:.1f} GiB)"
        )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class GpuReport:
    """All GPUs found, or none and the reason (``"no NVIDIA GPU: ..."``)."""

    gpus: tuple[GpuInfo, ...] = ()
    driver_version: str | None = None
    reason: str | None = None

    @property
    def available(self) -> bool:
        return bool(self.gpus)

    def to_dict(self) -> dict[str, Any]:
        return {
            "available": self.available,
            "driver_version": self.driver_version,
            "reason": self.reason,
            "gpus": [g.to_dict() for g in self.gpus],
        }


@dataclass(frozen=True)
class MemorySample:
    """One reading of a card's memory; ``process_bytes`` is one process's share when asked for and known."""

    index: int
    used_bytes: int
    total_bytes: int
    process_bytes: int | None = None
    utilization: int | None = None


def _text(value: Any) -> str:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)


def _nvml() -> Any | None:
    """The initialized pynvml module, or None (and the reason kept in ``_state['error']``)."""
    with _lock:
        if _state["initialized"]:
            return _state["module"]
        if _state["error"] is not None:
            return None
        try:
            # lazy: absent without the nvidia-ml-py package (ImportError below); the app imports this module at start-up
            import pynvml
        except ImportError:
            _state["error"] = "no NVIDIA GPU: the nvidia-ml-py package is not installed"
            return None
        try:
            pynvml.nvmlInit()
        except Exception as e:  # NVMLError_LibraryNotFound, DriverNotLoaded, NoPermission, ...
            _state["error"] = f"no NVIDIA GPU: {_describe_nvml_error(e)}"
            return None
        _state["initialized"] = True
        _state["module"] = pynvml
        return pynvml


def _describe_nvml_error(e: Exception) -> str:
    name = type(e).__name__
    if "LibraryNotFound" in name:
        return "the NVIDIA driver library (NVML) was not found on this machine"
    if "DriverNotLoaded" in name:
        return "the NVIDIA driver is not loaded"
    if "NoPermission" in name:
        return "no permission to query the NVIDIA driver"
    return f"NVML could not start ({e})"


def shutdown() -> None:
    """Release NVML (optional; the next call initializes it again)."""
    with _lock:
        module = _state["module"]
        if _state["initialized"] and module is not None:
            try:
                module.nvmlShutdown()
            except Exception:
                pass
        _state.update(initialized=False, error=None, module=None)


def _utilization(nv: Any, handle: Any) -> int | None:
    try:
        return int(nv.nvmlDeviceGetUtilizationRates(handle).gpu)
    except Exception:  # not supported on some cards (and under MIG)
        return None


def query_gpus(nvml: Any = None) -> GpuReport:
    """List every NVIDIA GPU with its name, memory and utilization.

    ``nvml``: an NVML-like object to read instead of ``pynvml`` (the app's tests describe cards with one).

    Returns:
        A report; on a machine without a usable NVIDIA driver its ``gpus`` is empty and
        ``reason`` says why. Never raises for a missing GPU.
    """
    nv = nvml or _nvml()
    if nv is None:
        return GpuReport(reason=_state["error"])
    try:
        count = int(nv.nvmlDeviceGetCount())
        driver = _text(nv.nvmlSystemGetDriverVersion())
    except Exception as e:
        return GpuReport(reason=f"no NVIDIA GPU: {_describe_nvml_error(e)}")
    gpus = []
    for i in range(count):
        try:
            h = nv.nvmlDeviceGetHandleByIndex(i)
            mem = nv.nvmlDeviceGetMemoryInfo(h)
            try:
                uuid = _text(nv.nvmlDeviceGetUUID(h))
            except Exception:
                uuid = None
            gpus.append(
                GpuInfo(
                    index=i,
                    name=_text(nv.nvmlDeviceGetName(h)),
                    total_bytes=int(mem.total),
                    free_bytes=int(mem.free),
                    used_bytes=int(mem.used),
                    utilization=_utilization(nv, h),
                    uuid=uuid,
                )
            )
        except Exception:  # a card that fell off the bus or is in a bad state: list the others
            continue
    reason = None if gpus else "no NVIDIA GPU: the driver reports no usable device"
    return GpuReport(gpus=tuple(gpus), driver_version=driver, reason=reason)


def sample(index: int, pid: int | None = None, nvml: Any = None) -> MemorySample | None:
    """Read one card's memory now (cheap: meant to be called about twice a second).

    Args:
        index: NVML index of the card (``GpuInfo.index``).
        pid: if given, also report the memory that process holds on the card, where the
            driver tells it (not inside some containers).
        nvml: an NVML-like object to read instead of ``pynvml`` (as for :func:`query_gpus`).

    Returns:
        The sample, or None when there is no such card or no NVIDIA driver.
    """
    nv = nvml or _nvml()
    if nv is None:
        return None
    try:
        h = nv.nvmlDeviceGetHandleByIndex(index)
        mem = nv.nvmlDeviceGetMemoryInfo(h)
    except Exception:
        return None
    process_bytes = None
    if pid is not None:
        try:
            for proc in nv.nvmlDeviceGetComputeRunningProcesses(h):
                if int(proc.pid) == pid and proc.usedGpuMemory is not None:
                    process_bytes = int(proc.usedGpuMemory)
                    break
        except Exception:
            process_bytes = None
    return MemorySample(
        index=index,
        used_bytes=int(mem.used),
        total_bytes=int(mem.total),
        process_bytes=process_bytes,
        utilization=_utilization(nv, h),
    )
