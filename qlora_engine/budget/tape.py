"""Live bytes over time, for replaying a decoder block (``timeline``) tensor by tensor.

A :class:`Tape` tracks which tensors a Python frame or an autograd node holds, the bytes
alive, and the peak; a :class:`BlockTrace` is what a replay reports about one block.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass


class EarlyStop(Exception):
    """Non-reentrant checkpointing's early stop: every saved tensor has been recomputed."""


class Tape:
    """Live bytes over time. A tensor lives while a Python frame holds it (``free`` lets go)
    or an autograd node saved it (``save(node, ...)``; ``release(node)`` when that node ran)."""

    def __init__(self) -> None:
        self.size: dict[str, int] = {}
        self.frame: set[str] = set()
        self.holders: dict[str, set[str]] = {}
        self.nodes: dict[str, list[str]] = {}
        self.level = 0
        self.peak = 0
        self.saves = 0
        self.stop_after: int | None = None
        self.on_unpack: Callable[[], None] | None = None

    def external(self, name: str) -> str:
        """A tensor that lives outside the block anyway (the checkpoint keeps the block's input)."""
        self.size[name] = 0
        self.frame.add(name)
        return name

    def new(self, name: str, nbytes: int) -> str:
        if name in self.size:
            raise ValueError(f"{name} allocated twice")
        self.size[name] = nbytes
        self.frame.add(name)
        self.level += nbytes
        self.peak = max(self.peak, self.level)
        return name

    def spike(self, nbytes: int) -> None:
        """A temporary that comes and goes inside one call (a dequantized weight, a workspace)."""
        self.peak = max(self.peak, self.level + nbytes)

    def _forget(self, name: str) -> None:
        if name in self.size and name not in self.frame and not self.holders.get(name):
            self.level -= self.size.pop(name)
            self.holders.pop(name, None)

    def free(self, *names: str | None) -> None:
        """The frames let go of these (a name rebound, a call returned); saved tensors stay."""
        for name in names:
            if name is not None:
                self.frame.discard(name)
                self._forget(name)

    def save(self, node: str, *names: str | None) -> None:
        """Autograd node ``node`` keeps these tensors for its backward."""
        for name in names:
            if name is None or name not in self.size:
                continue
            self.holders.setdefault(name, set()).add(node)
            self.nodes.setdefault(node, []).append(name)
            self.saves += 1
            if self.stop_after is not None and self.saves >= self.stop_after:
                raise EarlyStop

    def unpack(self) -> None:
        """The backward reads a saved tensor; under checkpointing the first read recomputes."""
        if self.on_unpack is not None:
            hook, self.on_unpack = self.on_unpack, None
            hook()

    def release(self, *nodes: str) -> None:
        """These backward nodes ran: autograd drops what they saved."""
        for node in nodes:
            for name in self.nodes.pop(node, []):
                self.holders.get(name, set()).discard(node)
                self._forget(name)

    def hold(self, name: str) -> None:
        """A frame (a gradient buffer) takes hold of an existing tensor: liger's backward
        writes gradients over the tensors it saved and returns them."""
        if name in self.size:
            self.frame.add(name)

    @property
    def saved_bytes(self) -> int:
        return sum(self.size[n] for n in self.size if self.holders.get(n))


@dataclass(frozen=True)
class BlockTrace:
    """One block's memory, in bytes, each relative to what lives outside the block.

    ``saved``: what autograd keeps after the block's forward (its input too, when only the
    block keeps it). ``forward_peak``: the peak of its forward without checkpointing, counting
    its input (alive in the caller) and what it saves as it goes. ``backward_peak``: the peak
    of its backward, counting the incoming gradient and the saved tensors (without
    checkpointing from the start; with checkpointing from the recomputation on, which is
    part of it).
    """

    saved: int
    forward_peak: int
    backward_peak: int
