"""How much of an unpacked run's compute is padding, and when to suggest packing (numpy only).

The data page and ``qlora-engine inspect-data`` both say it, from this one function, so the
window (which never imports torch) and the CLI cannot disagree.
"""

from __future__ import annotations

import numpy as np

PACKING_HINT = 0.3
"""Suggest packing when this share of the computed tokens would be padding."""


def padding_share(lengths: np.ndarray, micro_batch_size: int, max_length: int, seed: int = 0) -> float:
    """The share of the tokens an unpacked run computes that are padding.

    Samples (cut to ``max_length``) go into micro-batches of ``micro_batch_size`` in a seeded
    random order, as training draws them, and each micro-batch is padded to its longest sample
    (the engine's ``collate``). Packing leaves only the end of each sequence unfilled.
    """
    n = np.minimum(np.asarray(lengths, dtype=np.int64), max_length)
    if n.size == 0 or micro_batch_size < 1:
        return 0.0
    n = n[np.random.default_rng(seed).permutation(n.size)]
    computed = sum(int(n[i : i + micro_batch_size].max()) * len(n[i : i + micro_batch_size])
                   for i in range(0, n.size, micro_batch_size))  # fmt: skip
    return 1.0 - int(n.sum()) / computed


def packing_hint(lengths: np.ndarray, micro_batch_size: int, max_length: int) -> str | None:
    """A sentence offering packing when padding would be ``PACKING_HINT`` or more of the work; else None."""
    share = padding_share(lengths, micro_batch_size, max_length)
    if share < PACKING_HINT:
        return None
    return (
        f"In micro-batches of {micro_batch_size}, {share:.0%} of the tokens computed would be "
        f"padding; packing puts several samples in each sequence (about {1 / (1 - share):.1f}× less work)."
    )
