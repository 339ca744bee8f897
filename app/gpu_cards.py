"""Which cards a run trains on (no Qt): NVML's cards, the saved choice, the launch, the chart's lines.

One card runs as it always has: the child sees only that card (``CUDA_VISIBLE_DEVICES`` is its
UUID) and no ``--gpus``. Several cards run through the engine's launcher, ``train --gpus 0,2``
(torchrun, one process per card). The numbers are NVML's, which counts cards by PCI bus; CUDA
counts them fastest-first unless ``CUDA_DEVICE_ORDER=PCI_BUS_ID``, which the launch sets so
that ``0,2`` names the same two cards in the engine as in the selector.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

from qlora_engine import gpu

SETTING = "gpus/selected"
"""The settings key of the chosen cards (``"0,2"``)."""

reader: Any = None
"""The NVML the app reads: None for ``pynvml``; the tests put an NVML-like object with their cards here."""


def list_cards() -> gpu.GpuReport:
    """The cards NVML sees now (none, and the reason, on a machine without an NVIDIA driver)."""
    return gpu.query_gpus(reader)


def sample_cards(indices: Sequence[int], pid: int | None) -> list[gpu.MemorySample]:
    """One memory reading of each card; the run's own share only for one card (``pid`` holds it there).

    Several cards are held by torchrun's workers, not by the launcher ``pid``: each line is the card's use.
    """
    one = len(indices) == 1
    samples = (gpu.sample(i, pid=pid if one else None, nvml=reader) for i in indices)
    return [s for s in samples if s is not None]


def line_name(index: int) -> str:
    """The live chart's line of one card on a run over several."""
    return f"GPU {index}"


def to_setting(indices: Iterable[int]) -> str:
    return ",".join(str(i) for i in indices)


def restore(saved: object, present: Iterable[int]) -> list[int]:
    """The saved cards (``"0,2"``) that this machine still has, in order; [] when none."""
    have = set(present)
    try:
        wanted = [int(x) for x in str(saved or "").split(",") if x.strip()]
    except ValueError:  # a hand-edited settings file
        return []
    return sorted(i for i in set(wanted) if i in have)


def gpus_args(cards: Sequence[gpu.GpuInfo]) -> list[str]:
    """The launch's extra arguments: ``--gpus 0,2`` for several cards, nothing for one or none."""
    return ["--gpus", to_setting(c.index for c in cards)] if len(cards) > 1 else []


def launch_env(env: dict[str, str], cards: Sequence[gpu.GpuInfo], device: str) -> dict[str, str]:
    """The child's environment for these cards (``device``: the config's ``train.device``)."""
    env = dict(env)
    if len(cards) == 1:
        env["CUDA_VISIBLE_DEVICES"] = cards[0].cuda_visible_id
    elif cards:
        env["CUDA_DEVICE_ORDER"] = "PCI_BUS_ID"  # --gpus numbers are NVML's; the launcher sets the visible cards
    elif device != "cuda":
        env["CUDA_VISIBLE_DEVICES"] = ""  # the CPU was chosen: keep the child off every GPU
    return env
