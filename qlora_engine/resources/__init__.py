"""Resources shipped with QLoRA Studio: sample data, icons, style sheets."""

from pathlib import Path

ROOT = Path(__file__).resolve().parent


def path(*parts: str) -> Path:
    """Absolute path of a shipped resource, e.g. ``path("data", "sample.jsonl")``."""
    return ROOT.joinpath(*parts)
