"""The cases bench/budget_accuracy.py measures: model shapes, the fitted set, the held-out set."""

from __future__ import annotations

SHAPES = {
    "llama3-8b": dict(
        vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
        num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=8192, rope_theta=500000.0,
    ),
    # TinyLlama-1.1B's shape: a ~1B Llama with a 32k vocabulary, so the cases vary the
    # vocabulary against the hidden size (the logits dominate Llama-3's peaks).
    "llama-1b": dict(
        vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_hidden_layers=22,
        num_attention_heads=32, num_key_value_heads=4, max_position_embeddings=8192, rope_theta=10000.0,
    ),
    # --smoke only: the chain on the CPU in seconds (the vocabulary is the tiny tokenizer's).
    "tiny": dict(
        vocab_size=384, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512, rope_theta=10000.0,
    ),
}  # fmt: skip

# name: (shape, seq, micro-batch, checkpointing, optimizer, data kind, extra overrides)
# A spread over the axes, not the full product. Data kinds: "fixed" (every sample
# exactly seq tokens: no padding, flash attention), "padded" (lengths seq..seq-3, so every
# micro-batch is padded and a 4-D mask is built), "packed" (two samples per sequence:
# a block-diagonal mask from position_ids).
CASES: dict[str, tuple] = {
    # Llama-3-8B shape: Liger (the default) across lengths, batches, checkpointing and optimizers.
    "8b-512x4-ckpt-p8": ("llama3-8b", 512, 4, True, "paged_adamw_8bit", "fixed", []),
    "8b-2048x4-ckpt-p8": ("llama3-8b", 2048, 4, True, "paged_adamw_8bit", "fixed", []),
    "8b-8192x1-ckpt-p32": ("llama3-8b", 8192, 1, True, "paged_adamw_32bit", "fixed", []),
    "8b-2048x4-ckpt-p8-padded": ("llama3-8b", 2048, 4, True, "paged_adamw_8bit", "padded", []),
    "8b-2048x1-nockpt-p8": ("llama3-8b", 2048, 1, False, "paged_adamw_8bit", "fixed", []),
    "8b-512x4-nockpt-p32": ("llama3-8b", 512, 4, False, "paged_adamw_32bit", "fixed", []),
    # ... and the plain transformers code, where the 128k-vocabulary loss is the peak.
    "8b-2048x4-ckpt-p8-none": ("llama3-8b", 2048, 4, True, "paged_adamw_8bit", "fixed", ["train.kernels=none"]),
    # TinyLlama-1.1B shape (32k vocabulary).
    "1b-512x4-ckpt-p8": ("llama-1b", 512, 4, True, "paged_adamw_8bit", "fixed", []),
    "1b-2048x4-ckpt-p32": ("llama-1b", 2048, 4, True, "paged_adamw_32bit", "fixed", []),
    "1b-8192x1-ckpt-p8": ("llama-1b", 8192, 1, True, "paged_adamw_8bit", "fixed", []),
    "1b-2048x1-nockpt-p8": ("llama-1b", 2048, 1, False, "paged_adamw_8bit", "fixed", []),
    "1b-2048x4-ckpt-p8-packed": ("llama-1b", 2048, 4, True, "paged_adamw_8bit", "packed", []),
    "1b-8192x1-nockpt-adamw-none": ("llama-1b", 8192, 1, False, "adamw", "fixed", ["train.kernels=none"]),
    "1b-512x4-nockpt-p32-none-ga2": (
        "llama-1b", 512, 4, False, "paged_adamw_32bit", "fixed", ["train.kernels=none", "train.gradient_accumulation_steps=2"],
    ),
}  # fmt: skip

# Held out: never used to fit the calibration constants (run with --cases to check them).
HOLDOUT_CASES: dict[str, tuple] = {
    "8b-4096x2-ckpt-p8-r64": ("llama3-8b", 4096, 2, True, "paged_adamw_8bit", "fixed", ["lora.rank=64"]),
    "8b-16384x1-ckpt-p8": ("llama3-8b", 16384, 1, True, "paged_adamw_8bit", "fixed", []),
    "8b-1024x4-nockpt-p8-attn": (
        "llama3-8b", 1024, 4, False, "paged_adamw_8bit", "fixed", ["lora.target_modules=[attention]"],
    ),
    "1b-4096x2-ckpt-p8-mlp": ("llama-1b", 4096, 2, True, "paged_adamw_8bit", "fixed", ["lora.target_modules=[mlp]"]),
    "1b-1024x8-nockpt-p8-none": ("llama-1b", 1024, 8, False, "paged_adamw_8bit", "fixed", ["train.kernels=none"]),
    "1b-2048x2-ckpt-adamw-padded-r8": ("llama-1b", 2048, 2, True, "adamw", "padded", ["lora.rank=8"]),
}  # fmt: skip

SMOKE_CASES: dict[str, tuple] = {
    "smoke-tiny-64x2-ckpt": ("tiny", 64, 2, True, "adamw", "padded", []),
}  # fmt: skip

GOALS = {"max_abs_pct": 7.0, "median_abs_pct": 3.0, "max_under_pct": 5.0}

ALL_CASES = {**CASES, **HOLDOUT_CASES, **SMOKE_CASES}
