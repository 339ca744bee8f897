"""Checkpointed layer inputs in host RAM (``train.offload_activations``), without rounding waste.

torch's ``save_on_cpu(pin_memory=True)`` (what transformers' own ``offload`` uses) takes every
copy from the caching host allocator, which rounds each pinned block up to a power of two: a
layer input of 350,000 tokens x 4096 x 2 bytes (2.7 GiB) takes a 4 GiB block, so the 32
layers of an 8B model ask for 128 GiB of pinned RAM to hold 85 GiB (the process was killed
on a 128 GiB machine). Here each tensor goes into pinned pieces whose sizes are the powers
of two its byte count is made of (2 GiB + 512 MiB + ...): nothing is rounded up but a last
piece under 1 MiB, the allocator reuses the same pieces every step, and the copies stay
asynchronous, overlapping the computation. Without CUDA (tests) the pieces are plain memory.
"""

from __future__ import annotations

from typing import Any

import torch
from torch.utils.checkpoint import checkpoint

MIN_PIECE = 1 << 20


def piece_sizes(nbytes: int) -> list[int]:
    """Byte sizes that sum to ``nbytes``: powers of two of at least MIN_PIECE, largest first, then the rest."""
    sizes = [1 << b for b in range(nbytes.bit_length() - 1, -1, -1) if nbytes >> b & 1 and 1 << b >= MIN_PIECE]
    rest = nbytes - sum(sizes)
    return sizes + ([rest] if rest else [])


def to_host(t: torch.Tensor, pin: bool) -> list[torch.Tensor]:
    """``t``'s elements, in order, in host pieces of :func:`piece_sizes` (pinned when ``pin``)."""
    flat = t.detach().contiguous().view(-1)
    elem = flat.element_size()
    pieces, start = [], 0
    for size in piece_sizes(flat.numel() * elem):
        n = size // elem  # a power of two of at least 1 MiB, and the rest, are whole elements
        piece = torch.empty(n, dtype=flat.dtype, pin_memory=pin)
        piece.copy_(flat[start : start + n], non_blocking=pin)
        pieces.append(piece)
        start += n
    return pieces


def from_host(pieces: list[torch.Tensor], shape: torch.Size, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    out = torch.empty(shape, dtype=dtype, device=device)
    flat, start = out.view(-1), 0
    for piece in pieces:
        flat[start : start + piece.numel()].copy_(piece, non_blocking=piece.is_pinned())
        start += piece.numel()
    return out


class HostOffload(torch.autograd.graph.saved_tensors_hooks):
    """Tensors saved for the backward pass inside this context wait in host RAM (see the module docstring)."""

    def __init__(self) -> None:
        pin = torch.cuda.is_available()

        def pack(t: torch.Tensor) -> Any:
            return t if t.device.type == "cpu" else (t.device, t.shape, t.dtype, to_host(t, pin))

        def unpack(packed: Any) -> torch.Tensor:
            if isinstance(packed, torch.Tensor):
                return packed
            device, shape, dtype, pieces = packed
            return from_host(pieces, shape, dtype, device)

        super().__init__(pack, unpack)


def offloaded_checkpoint(function: Any, *args: Any, **kwargs: Any) -> Any:
    """Non-reentrant checkpointing whose saved inputs wait in host RAM (a decoder layer's checkpoint function)."""
    with HostOffload():
        return checkpoint(function, *args, use_reentrant=False, **kwargs)
