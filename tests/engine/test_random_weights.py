"""A model built in memory, one tensor at a time, is the model loaded from a checkpoint of the same weights.

``bench/big_shape.py`` trains a 70B shape whose weights never touch the disk: the engine's own
load (``models.load_quantized_model(weights=...)``) takes ``bench/random_weights.py``'s tensors,
drawn on demand, in place of the folder's safetensors files. Here the same random weights are
also saved as a real checkpoint, and both loads must give the same NF4 model, bit for bit
(packed weights, absmax, the double-quant constants, the unquantized norms and embeddings).
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))

import random_weights  # noqa: E402

from qlora_engine import models  # noqa: E402
from qlora_engine.config import TrainConfig, apply_overrides  # noqa: E402

SHAPE = dict(
    random_weights.LLAMA3_70B,  # the 70B config's fields, tiny sizes
    vocab_size=384,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
)


def _state(model: torch.nn.Module) -> dict:
    return dict(model.state_dict())


def _same(a: dict, b: dict) -> list[str]:
    assert set(a) == set(b)
    return [k for k in a if not (torch.equal(a[k], b[k]) if torch.is_tensor(a[k]) else a[k] == b[k])]


def test_the_in_memory_build_is_the_checkpoint_load(tmp_path):
    memory = random_weights.write_folder(tmp_path / "memory", SHAPE)  # config and tokenizer, no weights
    disk = random_weights.write_folder(tmp_path / "disk", SHAPE)
    weights = random_weights.RandomWeights(memory, "cpu", seed=3)
    weights.save(disk)
    cfg = apply_overrides(TrainConfig(), [f"model.ref={disk}", "data.path=synthetic"])
    cpu = torch.device("cpu")

    loaded = _state(models.load_quantized_model(cfg, disk, cpu, torch.float32))
    built = _state(models.load_quantized_model(cfg, memory, cpu, torch.float32, weights=weights))
    other = _state(
        models.load_quantized_model(
            cfg, memory, cpu, torch.float32, weights=random_weights.RandomWeights(memory, seed=4)
        )
    )

    quantized = [k for k in loaded if k.endswith("mlp.up_proj.weight")]
    assert quantized and all(loaded[k].dtype == torch.uint8 for k in quantized)  # NF4, packed
    assert _same(loaded, built) == []
    # a test that can fail: another seed's weights are another model
    differ = _same(loaded, other)
    assert any(k.endswith("q_proj.weight") for k in differ) and "model.embed_tokens.weight" in differ
