"""What the VRAM budget predicts for the Llama-3-70B shape on an 80 GB card (issue 21, goal 4): CPU only.

    python bench/budget_70b.py

Writes the 70B config.json (random weights are never needed: the budget reads the config
alone) and prints the estimate at 2048 x 1, every layer checkpointed, with and without the
checkpointed inputs offloaded, and the longest context that fits. Not a measurement.
"""

import json
import sys
from pathlib import Path

from qlora_engine import budget
from qlora_engine.budget.fit import fit
from qlora_engine.config import TrainConfig, apply_overrides

sys.path.insert(0, str(Path(__file__).resolve().parent))
from random_weights import LLAMA3_70B  # noqa: E402  (bench/ is not a package)

GiB = 2**30
card = int(78.6 * GiB)  # an 80 GB card as usable_vram reports it (bench/NOTES.md session 4)


def cfg(ref, seq, *extra):
    return apply_overrides(
        TrainConfig(),
        [
            f"model.ref={ref}",
            "data.path=synthetic",
            f"data.max_length={seq}",
            "train.micro_batch_size=1",
            "train.gradient_accumulation_steps=1",
            "lora.rank=16",
            "lora.alpha=16",
            "lora.target_modules=[all-linear]",
            "optim.optimizer=paged_adamw_8bit",
            "train.gradient_checkpointing=true",
            *extra,
        ],
    )


def main() -> None:
    Path("/tmp/llama70b").mkdir(exist_ok=True)
    Path("/tmp/llama70b/config.json").write_text(
        json.dumps(LLAMA3_70B)
    )  # max positions raised: the search is not capped at 8192
    for seq, extra in [(2048, []), (2048, ["train.offload_activations=true"]), (8192, [])]:
        c = cfg("/tmp/llama70b", seq, *extra)
        e = budget.estimate(c, data_stats={"max": seq, "p95": seq, "median": seq}, gpu_bytes=card)
        print(
            seq,
            extra,
            "total",
            round(e.total / GiB, 2),
            "low",
            round(e.low / GiB, 2),
            "high",
            round(e.high / GiB, 2),
            "fits",
            e.fits,
        )
    for extra in [[], ["train.offload_activations=true", "train.mlp_chunk_tokens=4096"]]:
        a = fit(cfg("/tmp/llama70b", 2048, *extra), card)
        print("longest context (every layer checkpointed)", extra, a.max_sequence_length)


if __name__ == "__main__":
    main()
