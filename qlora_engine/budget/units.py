"""GPU sizes as people write them ("24GiB", "80GB", "24", "rtx4090") and bytes as people read them."""

from __future__ import annotations

import math
import re

from qlora_engine.errors import ConfigError

_UNITS = {
    "": 1 << 30,  # a bare number is GiB: "24" means a 24 GiB card
    "b": 1,
    "k": 1 << 10, "kb": 1 << 10, "kib": 1 << 10,
    "m": 1 << 20, "mb": 1 << 20, "mib": 1 << 20,
    "g": 1 << 30, "gb": 1 << 30, "gib": 1 << 30,
    "t": 1 << 40, "tb": 1 << 40, "tib": 1 << 40,
}  # fmt: skip

# Card memory as the driver reports it (NVML total), for names typed instead of a size.
KNOWN_GPUS: dict[str, int] = {
    "t4": 15360 << 20,
    "rtx3060": 12288 << 20,
    "rtx3090": 24576 << 20,
    "rtx4060ti": 16380 << 20,
    "rtx4070": 12282 << 20,
    "rtx4080": 16376 << 20,
    "rtx4090": 24564 << 20,
    "rtx5090": 32607 << 20,
    "a10": 23028 << 20,
    "l4": 23034 << 20,
    "a100-40gb": 40960 << 20,
    "a100-80gb": 81920 << 20,
    "l40s": 46068 << 20,
    "h100": 81559 << 20,
    "h200": 143771 << 20,
}

_SIZE_RE = re.compile(r"^\s*([0-9]*\.?[0-9]+(?:e[0-9]+)?)\s*([a-z]*)\s*$", re.IGNORECASE)
_MAX_BYTES = 16 << 40


def parse_gpu_size(text: str | int | float) -> int:
    """Bytes of GPU memory from '24GiB', '80GB', '24' (GiB), '22000MiB' or a card name ('rtx4090').

    GPU makers write GB for GiB (a "24 GB" card has 24 GiB), so GB and GiB both mean 2**30.

    Raises:
        ConfigError: the text is not a size, or the size is zero, negative or implausibly large.
    """
    if isinstance(text, bool):
        raise ConfigError(f"GPU size: {text!r} is not a size; write e.g. 24GiB, 80GB or 24.")
    if isinstance(text, (int, float)):
        value, unit = float(text), ""
    else:
        raw = str(text).strip()
        key = raw.lower().replace(" ", "").replace("_", "")
        if key in KNOWN_GPUS:
            return KNOWN_GPUS[key]
        m = _SIZE_RE.match(raw)
        if not m or m.group(2).lower() not in _UNITS:
            raise ConfigError(
                f"GPU size: {text!r} is not a size; write e.g. 24GiB, 80GB, 24 (GiB) or a card name "
                f"({', '.join(sorted(KNOWN_GPUS))})."
            )
        value, unit = float(m.group(1)), m.group(2).lower()
    if not math.isfinite(value) or value <= 0:
        raise ConfigError(f"GPU size: {text!r} must be a positive size.")
    n = int(value * _UNITS[unit])
    if n < 256 << 20:
        raise ConfigError(f"GPU size: {text!r} is under 256 MiB; did you mean {value:g}GiB?")
    if n > _MAX_BYTES:
        raise ConfigError(f"GPU size: {text!r} is more than 16 TiB; no single GPU has that much memory.")
    return n


def format_bytes(n: int | float) -> str:
    """'21.43 GiB', '512 MiB', '3.1 KiB'."""
    n = float(n)
    for unit, size in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if abs(n) >= size:
            return f"{n / size:.2f} {unit}" if unit == "GiB" else f"{n / size:.0f} {unit}"
    return f"{n:.0f} B"
