"""What the data tests (tests/engine/test_data_*.py) share besides fixtures: a data config maker.

Imported like ``tiny`` (``from data_support import make_cfg``); the fixtures they share,
``tok`` and ``private_cache``, are in tests/conftest.py.
"""

from __future__ import annotations

from qlora_engine.config import TrainConfig, validate


def make_cfg(path, **data) -> TrainConfig:
    """A default run config reading ``path``, with ``data`` set on its ``data`` section, validated."""
    cfg = TrainConfig()
    cfg.data.path = str(path)
    for k, v in data.items():
        setattr(cfg.data, k, v)
    validate(cfg)
    return cfg
