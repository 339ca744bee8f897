"""Token samples in flat arrays: compact in memory, memory-mapped from the cache, packable.

A :class:`SampleSet` is a read-only sequence of samples; ``set[i]`` is a dict of plain lists
(``input_ids``, ``labels`` and, for packed sets, ``position_ids``). Underneath it holds one
``int32`` array of all token ids, one ``bool`` array saying which tokens carry loss, and the
offsets where samples start: 5 bytes a token instead of the ~60 of Python lists, so a large
dataset fits in RAM, and a cached one is mapped from disk without being read. Data with loss
weights adds one ``float32`` array of each token's weight (and ``set[i]["weights"]``).
"""

from __future__ import annotations

import bisect
from array import array
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

IGNORE_INDEX = -100


class SampleSet(Sequence):
    """Samples as flat arrays. ``starts`` (packed sets only) marks where each packed sample begins;
    ``weights`` (data with loss weights only) is each token's weight, 0 where it is not trained."""

    def __init__(
        self,
        ids: np.ndarray,
        trained: np.ndarray,
        offsets: np.ndarray,
        starts: np.ndarray | None = None,
        weights: np.ndarray | None = None,
    ):
        self.ids = ids
        self.trained = trained
        self.offsets = offsets
        self.starts = starts
        self.weights = weights

    @property
    def packed(self) -> bool:
        return self.starts is not None

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def __getitem__(self, i: int | slice) -> Any:  # type: ignore[override]
        if isinstance(i, slice):
            return [self[k] for k in range(*i.indices(len(self)))]
        if not isinstance(i, (int, np.integer)):
            raise TypeError(f"SampleSet indices are integers or slices, not {type(i).__name__}")
        n = len(self)
        if i < 0:
            i += n
        if not 0 <= i < n:
            raise IndexError(i)
        a, b = int(self.offsets[i]), int(self.offsets[i + 1])
        ids = np.asarray(self.ids[a:b], dtype=np.int64)
        labels = np.where(np.asarray(self.trained[a:b], dtype=bool), ids, IGNORE_INDEX)
        out = {"input_ids": ids.tolist(), "labels": labels.tolist()}
        if self.weights is not None:
            out["weights"] = np.asarray(self.weights[a:b], dtype=np.float32).tolist()
        if self.starts is not None:
            lo, hi = np.searchsorted(self.starts, [a, b])
            seg = np.asarray(self.starts[lo:hi], dtype=np.int64) - a
            pos = np.arange(b - a, dtype=np.int64)
            owner = np.searchsorted(seg, pos, side="right") - 1
            out["position_ids"] = (pos - seg[owner]).tolist()
        return out

    @property
    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)

    @property
    def num_tokens(self) -> int:
        return int(self.offsets[-1] - self.offsets[0])

    @property
    def num_trained(self) -> int:
        return int(np.count_nonzero(self.trained))

    def select(self, indices: Sequence[int] | np.ndarray) -> SampleSet:
        """A new (unpacked) set of the samples at ``indices``, in that order."""
        indices = np.asarray(indices, dtype=np.int64)
        lengths = self.lengths[indices]
        offsets = np.zeros(len(indices) + 1, dtype=np.int64)
        np.cumsum(lengths, out=offsets[1:])
        ids = np.empty(int(offsets[-1]), dtype=np.int32)
        trained = np.empty(int(offsets[-1]), dtype=bool)
        weights = None if self.weights is None else np.empty(int(offsets[-1]), dtype=np.float32)
        for k, i in enumerate(indices):
            a, b = self.offsets[i], self.offsets[i + 1]
            ids[offsets[k] : offsets[k + 1]] = self.ids[a:b]
            trained[offsets[k] : offsets[k + 1]] = self.trained[a:b]
            if weights is not None:
                weights[offsets[k] : offsets[k + 1]] = self.weights[a:b]
        return SampleSet(ids, trained, offsets, weights=weights)

    # -- files ------------------------------------------------------------------------------

    def save(self, folder: Path, name: str) -> None:
        """Plain ``.npy`` arrays: loaded with ``allow_pickle=False``, so never code, only numbers."""
        folder.mkdir(parents=True, exist_ok=True)
        np.save(folder / f"{name}.ids.npy", np.ascontiguousarray(self.ids, dtype=np.int32), allow_pickle=False)
        np.save(folder / f"{name}.trained.npy", np.ascontiguousarray(self.trained, dtype=bool), allow_pickle=False)
        np.save(folder / f"{name}.offsets.npy", np.asarray(self.offsets, dtype=np.int64), allow_pickle=False)
        if self.starts is not None:
            np.save(folder / f"{name}.starts.npy", np.asarray(self.starts, dtype=np.int64), allow_pickle=False)
        if self.weights is not None:
            np.save(folder / f"{name}.weights.npy", np.asarray(self.weights, dtype=np.float32), allow_pickle=False)

    @classmethod
    def load(cls, folder: Path, name: str) -> SampleSet:
        def arr(kind: str) -> np.ndarray:
            return np.load(folder / f"{name}.{kind}.npy", mmap_mode="r", allow_pickle=False)

        def optional(kind: str) -> np.ndarray | None:
            return arr(kind) if (folder / f"{name}.{kind}.npy").exists() else None

        return cls(arr("ids"), arr("trained"), arr("offsets"), optional("starts"), optional("weights"))


class SampleBuilder:
    """Appends encoded samples into growing compact arrays."""

    def __init__(self) -> None:
        self.ids = array("i")
        self.trained = array("b")
        self.offsets = array("q", [0])
        self.weights: array | None = None  # from the first sample with weights on

    def add(self, ids: list[int], trained: list[bool], weights: list[float] | None = None) -> None:
        if weights is not None and self.weights is None:
            self.weights = array("f", map(float, self.trained))  # the samples before: weight 1 where trained
        if self.weights is not None:
            self.weights.extend(weights if weights is not None else map(float, trained))
        self.ids.extend(ids)
        self.trained.extend(trained)
        self.offsets.append(len(self.ids))

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def build(self) -> SampleSet:
        return SampleSet(
            np.frombuffer(self.ids, dtype=np.int32).copy() if self.ids else np.zeros(0, np.int32),
            np.frombuffer(self.trained, dtype=np.int8).astype(bool) if self.trained else np.zeros(0, bool),
            np.frombuffer(self.offsets, dtype=np.int64).copy(),
            weights=None if self.weights is None else np.frombuffer(self.weights, dtype=np.float32).copy(),
        )


def split_indices(n: int, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(train, validation) indices: a seeded shuffle, so the same seed always holds out the same rows."""
    if fraction <= 0 or n < 2:
        return np.arange(n), np.arange(0)
    order = np.random.default_rng(seed).permutation(n)
    n_val = min(max(1, round(n * fraction)), n - 1)
    return np.sort(order[n_val:]), np.sort(order[:n_val])


def pack(samples: SampleSet, max_length: int) -> SampleSet:
    """Pack samples into sequences of at most ``max_length`` tokens (best fit, longest first).

    Position ids restart at 0 for every packed sample, and the first token of each sample
    carries no label: its "next token" loss would be predicted from the previous sample.
    """
    lengths = samples.lengths
    order = np.argsort(-lengths, kind="stable")
    bins: list[list[int]] = []
    free: list[tuple[int, int]] = []  # (room left, bin number), sorted
    for i in order.tolist():
        need = int(lengths[i])
        k = bisect.bisect_left(free, (need, -1))
        if k < len(free):
            room, b = free.pop(k)
            bins[b].append(i)
            bisect.insort(free, (room - need, b))
        else:
            bins.append([i])
            bisect.insort(free, (max_length - need, len(bins) - 1))
    flat_order = np.asarray([i for b in bins for i in b], dtype=np.int64)
    flat = samples.select(flat_order)
    starts = flat.offsets[:-1].copy()
    trained = np.array(flat.trained, dtype=bool)
    firsts = starts[lengths[flat_order] > 0]
    trained[firsts] = False
    if flat.weights is not None:
        flat.weights[firsts] = 0.0
    seq_offsets = np.zeros(len(bins) + 1, dtype=np.int64)
    np.cumsum([int(lengths[b].sum()) for b in map(np.asarray, bins)], out=seq_offsets[1:])
    return SampleSet(flat.ids, trained, seq_offsets, starts, flat.weights)


def token_stats(lengths: np.ndarray, max_length: int) -> dict[str, Any]:
    """min / median / p95 / max / total of sample lengths, and how many exceed ``max_length``."""
    if len(lengths) == 0:
        return {"count": 0, "min": 0, "median": 0, "p95": 0, "max": 0, "mean": 0.0, "total": 0, "over_max_length": 0}
    return {
        "count": int(len(lengths)),
        "min": int(lengths.min()),
        "median": int(np.median(lengths)),
        "p95": int(np.percentile(lengths, 95)),
        "max": int(lengths.max()),
        "mean": round(float(lengths.mean()), 1),
        "total": int(lengths.sum()),
        "over_max_length": int((lengths > max_length).sum()),
        "max_length": max_length,
    }


def collate(
    samples: Sequence[dict[str, list[int]]],
    pad_token_id: int,
    multiple: int = 1,
    cap: int | None = None,
    *,
    weights: bool = True,
) -> dict[str, torch.Tensor]:
    """Right-pad samples into a batch; padding never carries a label.

    ``multiple``: the batch's width is rounded up to a multiple of it (compiled layers: few
    shapes), but not past ``cap`` (``data.max_length``) unless the longest sample is.

    Labels come from the samples, never from comparing ids with ``pad_token_id``, so a
    tokenizer whose pad token is its EOS still trains on EOS.

    Unpacked samples give ``input_ids``, ``labels`` and ``attention_mask``. Packed samples
    give ``input_ids``, ``labels`` and ``position_ids`` and deliberately *no*
    ``attention_mask``: transformers then reads the sample boundaries from the position ids
    (they restart at 0) and builds a block-diagonal causal mask, so no packed sample attends
    to another. Call the model with ``use_cache=False`` for packed batches: with a KV cache
    transformers skips that detection. Count real tokens with :func:`count_tokens`.

    Samples with loss weights add ``loss_weights`` (each token's, float32; 0 on padding), which
    the trainer takes out of the batch before the model sees it; ``weights=False`` leaves them out.
    """
    if not samples:
        raise ValueError("collate needs at least one sample")
    longest = max(len(s["input_ids"]) for s in samples)
    width = -(-longest // multiple) * multiple
    if cap is not None:
        width = max(longest, min(width, cap))
    n = len(samples)
    packed = "position_ids" in samples[0]
    weighted = weights and any("weights" in s for s in samples)
    if weighted:
        loss_weights = torch.zeros((n, width), dtype=torch.float32)
    input_ids = torch.full((n, width), pad_token_id, dtype=torch.long)
    labels = torch.full((n, width), IGNORE_INDEX, dtype=torch.long)
    if packed:
        # Padding gets positions 0, 1, ... of its own: a separate "sample" nothing attends to.
        position_ids = torch.arange(width, dtype=torch.long).repeat(n, 1)
    else:
        attention_mask = torch.zeros((n, width), dtype=torch.long)
    for i, s in enumerate(samples):
        k = len(s["input_ids"])
        input_ids[i, :k] = torch.tensor(s["input_ids"], dtype=torch.long)
        labels[i, :k] = torch.tensor(s["labels"], dtype=torch.long)
        if weighted:
            w = s.get("weights")
            loss_weights[i, :k] = torch.tensor(w) if w is not None else (labels[i, :k] != IGNORE_INDEX).float()
        if packed:
            position_ids[i, :k] = torch.tensor(s["position_ids"], dtype=torch.long)
            position_ids[i, k:] = torch.arange(width - k, dtype=torch.long)
        else:
            attention_mask[i, :k] = 1
    batch = {"input_ids": input_ids, "labels": labels}
    batch.update({"position_ids": position_ids} if packed else {"attention_mask": attention_mask})
    if weighted:
        batch["loss_weights"] = loss_weights
    return batch


def count_tokens(batch: dict[str, torch.Tensor], pad_token_id: int | None = None) -> int:
    """Real (non-padding) tokens in a batch from :func:`collate`, packed or not."""
    if "attention_mask" in batch:
        return int(batch["attention_mask"].sum())
    # Packed: a row's padding is its last run of positions restarting at 0 after real tokens.
    pos = batch["position_ids"]
    total = 0
    for row_ids, row_pos in zip(batch["input_ids"], pos, strict=True):
        zeros = (row_pos == 0).nonzero().flatten().tolist()
        end = len(row_pos)
        if pad_token_id is not None and len(zeros) > 1 and bool((row_ids[zeros[-1] :] == pad_token_id).all()):
            end = zeros[-1]
        total += end
    return total
