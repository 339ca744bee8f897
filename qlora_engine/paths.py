"""Where the engine keeps files of its own (per user, per platform, via platformdirs)."""

from __future__ import annotations

import os
from pathlib import Path

import platformdirs


def cache_dir() -> Path:
    """Converted models and tokenized data. ``QLORA_STUDIO_CACHE`` overrides the platform default."""
    env = os.environ.get("QLORA_STUDIO_CACHE")
    path = Path(env).expanduser() if env else Path(platformdirs.user_cache_dir("qlora-studio", appauthor=False))
    path.mkdir(parents=True, exist_ok=True)
    return path
