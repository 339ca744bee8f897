"""Loss weights from the data: each trained token's weight scales its share of the gradient.

Data can weigh answers (a turn's ``weight``, its content parts' weights; see
``qlora_engine.data.formats``). The step then optimizes the weighted mean of the tokens' losses,
``sum(w_i * loss_i) / sum(w_i)``, while the model computes its loss as always (the fused
cross-entropy of Liger included, which takes no weights): the weights act on the gradient that
leaves the loss for the decoder's last hidden state. Everything after that state (the final norm,
the output layer and the loss) works on each position alone, so the gradient reaching position
``j`` comes from token ``j``'s loss only, and scaling it by that token's weight is exactly the
weighted loss's gradient for every parameter below; no LoRA layer sits after it.

The loss reported (the step's, the evaluation's) stays the plain mean over the trained tokens,
so runs with and without weights read the same way.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch

from qlora_engine.errors import DataError

KEY = "loss_weights"  # the batch entry ``collate`` adds for weighted data


class _ScaleGrad(torch.autograd.Function):
    """The identity forward; the backward multiplies the gradient by ``scale`` (broadcast)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        ctx.save_for_backward(scale)
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:  # type: ignore[override]
        (scale,) = ctx.saved_tensors
        return grad * scale.to(grad.dtype), None


def step_total(batches: Sequence[dict[str, torch.Tensor]]) -> float | None:
    """The weights' sum over a step's labelled positions; None when the data has no weights."""
    if not any(KEY in b for b in batches):
        return None
    return float(sum(float(b[KEY][:, 1:].sum()) for b in batches if KEY in b))


@contextmanager
def weighted(
    body: torch.nn.Module | None, weights: torch.Tensor | None, n_labels: int, total: float | None
) -> Iterator[None]:
    """Within the block, the body's forward passes carry ``weights`` (one per token of the batch)
    into the backward: position ``j`` (which predicts token ``j + 1``) gets ``w[j + 1] * n_labels /
    total``, so that with the model's loss (a sum over ``n_labels``) the gradient is the weighted
    mean's. Nothing happens without weights; a model whose decoder body was not found refuses them."""
    if weights is None or not total:
        yield
        return
    if body is None:
        raise DataError(
            "the data has loss weights, and this model's decoder blocks, where they apply, were not found.",
            hint="Remove the 'weight' fields from the data's answers.",
            field="data.path",
        )
    scale = torch.zeros_like(weights)
    scale[:, :-1] = weights[:, 1:] * (n_labels / total)
    scale = scale.unsqueeze(-1)

    def hook(module: torch.nn.Module, args: object, output: object) -> object:
        if isinstance(output, tuple):
            return (_ScaleGrad.apply(output[0], scale), *output[1:])
        output.last_hidden_state = _ScaleGrad.apply(output.last_hidden_state, scale)  # type: ignore[attr-defined]
        return output

    handle = body.register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()
