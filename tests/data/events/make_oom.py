"""Writes ``oom.jsonl``: a GPU run that runs out of memory at step 6 (no GPU is needed to write it).

``normal.jsonl`` and ``stop.jsonl`` were recorded from real CPU runs of the tiny test Llama
through ``qlora-engine train --events - --control-stdin`` (paths rewritten to /home/user).
An out-of-memory failure cannot be recorded on a CPU, so this script builds that stream from
the engine's own event dataclasses, the budget's real estimate for the SmolLM2-135M shape on
an 8 GiB card, and the engine's own out-of-memory hint, in the order the trainer emits them.

Run: python tests/data/events/make_oom.py
"""

from __future__ import annotations

import json
from pathlib import Path

from qlora_engine import budget
from qlora_engine.config import TrainConfig, apply_overrides
from qlora_engine.events import CheckpointSaved, LogLine, PhaseChanged, RunFailed, RunStarted, StepMetrics
from qlora_engine.vram import oom_hint

SMOLLM2_135M = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "hidden_size": 576,
    "intermediate_size": 1536,
    "num_hidden_layers": 30,
    "num_attention_heads": 9,
    "num_key_value_heads": 3,
    "vocab_size": 49152,
    "max_position_embeddings": 8192,
    "tie_word_embeddings": True,
    "torch_dtype": "bfloat16",
}
T0 = 1795770000.0
RUN = "/home/user/runs/smol-oom"


def main() -> None:
    cfg = apply_overrides(
        TrainConfig(),
        [
            "model.ref=/home/user/models/SmolLM2-135M-Instruct",
            "data.path=/home/user/data/chat.jsonl",
            f"output.dir={RUN}",
            "train.micro_batch_size=4",
            "data.max_length=1024",
            "train.save_steps=4",
            "train.max_steps=200",
            "train.gradient_checkpointing=false",
        ],
    )
    est = budget.estimate(cfg, SMOLLM2_135M, gpu_bytes=8 * 2**30, gpu_name="NVIDIA GeForce RTX 4060")
    t = T0
    events = [
        PhaseChanged(phase="resolving", detail=cfg.model.ref, time=t),
        PhaseChanged(phase="preparing_data", detail=cfg.data.path, time=t + 2),
        LogLine(level="info", message="chat.jsonl: chat data; 5000 rows, 5000 training samples", time=t + 3),
        PhaseChanged(phase="loading_model", detail=f"{cfg.model.ref} in 4-bit nf4 on cuda:0", time=t + 3),
        RunStarted(
            run_dir=RUN,
            config=cfg.to_dict(),
            device="NVIDIA GeForce RTX 4060",
            total_steps=200,
            model={"architecture": "LlamaForCausalLM", "num_parameters": 134515008, "trainable_parameters": 4884480},
            vram_estimate=est.to_dict(),
            data={"format": "chat", "rows": 5000},
            time=t + 9,
        ),
        PhaseChanged(phase="training", detail="steps 1-200", time=t + 9),
    ]
    t += 9
    for step in range(1, 6):
        t += 4.2
        reserved = (3.1 + 0.9 * step) * 2**30
        events.append(
            StepMetrics(
                step=step,
                total_steps=200,
                epoch=step * 4 * 4 / 5000,
                loss=2.9 - 0.21 * step + 0.03 * (step % 2),
                learning_rate=2e-4 * min(1.0, step / 10),
                grad_norm=1.8 - 0.2 * step,
                tokens=4000,
                tokens_per_second=4000 / 4.2,
                elapsed=4.2 * step,
                eta=4.2 * (200 - step),
                cuda_allocated=reserved * 0.86,
                cuda_reserved=reserved,
                time=t,
            )
        )
        if step == 4:
            path = f"{RUN}/checkpoints/step-000004"
            events.append(PhaseChanged(phase="saving", detail="checkpoint at step 4", time=t))
            events.append(CheckpointSaved(step=4, path=path, time=t + 0.4))
            events.append(PhaseChanged(phase="training", detail="", time=t + 0.4))
            t += 0.4
    tb = (
        "Traceback (most recent call last):\n"
        '  File "qlora_engine/train.py", line 426, in run\n    return trainer.train()\n'
        '  File "qlora_engine/train.py", line 231, in train\n    loss.backward()\n'
        "torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 1.50 GiB. GPU 0 has a total capacity of "
        "7.63 GiB of which 1.12 GiB is free. Of the allocated memory 5.87 GiB is allocated by PyTorch, and "
        "412.00 MiB is reserved by PyTorch but unallocated.\n"
    )
    events.append(
        RunFailed(
            error_type="OutOfMemoryError",
            message="CUDA out of memory during training.",
            traceback=tb,
            step=5,
            last_checkpoint=f"{RUN}/checkpoints/step-000004",
            hint=oom_hint(cfg),
            time=t + 2.0,
        )
    )
    out = Path(__file__).with_name("oom.jsonl")
    out.write_text("".join(json.dumps(e.to_dict()) + "\n" for e in events), encoding="utf-8")
    print(f"wrote {out}: {len(events)} events; estimate {est.total / 2**30:.2f} GiB, fits={est.fits}")


if __name__ == "__main__":
    main()
