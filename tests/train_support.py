"""What the trainer-level tests share: a Trainer set up on given samples, and a gradient distance.

Imported like ``tiny`` (``from train_support import make_trainer, rel_err``).
"""

from __future__ import annotations

import torch

from qlora_engine.config import TrainConfig, apply_overrides
from qlora_engine.data import PreparedData
from qlora_engine.events import ListSink
from qlora_engine.runner import build_trainer
from qlora_engine.train import Trainer


def make_trainer(model_dir, samples, tmp_path, *overrides: str, max_length: int = 128) -> tuple[Trainer, ListSink]:
    """A set-up Trainer on ``samples`` (dicts of lists), LoRA B given small random values: peft starts
    B at zero, which would leave every A gradient zero."""
    cfg = apply_overrides(
        TrainConfig(),
        [f"model.ref={model_dir}", "data.path=synthetic", f"output.dir={tmp_path / 'run'}",
         f"data.max_length={max_length}", *overrides],
    )
    sink = ListSink()
    trainer = build_trainer(cfg, sink, data=PreparedData(train=samples, validation=None, report={}, fingerprint="x"))
    trainer.setup()
    gen = torch.Generator().manual_seed(1234)
    with torch.no_grad():
        for name, p in sorted(trainer.model.named_parameters()):
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.02)
    return trainer, sink


def rel_err(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> float:
    """The relative distance between two sets of gradients (by name), over all of them."""
    assert got.keys() == want.keys() and got
    diff = sum(float((got[k] - want[k]).pow(2).sum()) for k in want)
    return (diff / sum(float(want[k].pow(2).sum()) for k in want)) ** 0.5
