"""What the VRAM budget predicts for the Llama-3-8B shape at 350k and 500k tokens, micro-batch 1,
every layer checkpointed, inputs offloaded, 4096-token MLP chunks (issue 21, goal 3): CPU only.

    PYTHONPATH=$PWD python bench/budget_500k.py

Writes the 8B config.json (the budget reads the config alone) and prints, per length, the
budget's total, its range, whether it fits an 80 GB card, and the host RAM the offloaded layer
inputs take (length x hidden x 2 bytes x layers). Not a measurement.
"""

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import random_weights as rw  # noqa: E402  (bench/ is not a package)
from budget_70b import GiB, card, cfg  # noqa: E402

from qlora_engine import budget  # noqa: E402

cfg8 = dict(rw.LLAMA3_70B)  # its max positions are raised; the 8B shape otherwise
cfg8.update(
    hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8
)
Path("/tmp/llama8b").mkdir(exist_ok=True)
Path("/tmp/llama8b/config.json").write_text(json.dumps(cfg8))
for seq in (350000, 500000):
    c = cfg("/tmp/llama8b", seq, "train.offload_activations=true", "train.mlp_chunk_tokens=4096", "train.kernels=liger")
    e = budget.estimate(c, data_stats={"max": seq, "p95": seq, "median": seq}, gpu_bytes=card)
    print(
        seq,
        round(e.total / GiB, 2),
        round(e.low / GiB, 2),
        round(e.high / GiB, 2),
        e.fits,
        "offloaded host GiB",
        round(seq * 4096 * 2 * 32 / GiB, 1),
    )
