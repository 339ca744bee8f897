"""Attention for packed rows without a mask: each packed sample attends to itself only (``VARLEN``).

With ``data.packing`` a row holds several samples whose position ids restart at 0. Under SDPA
transformers turns that into a block-diagonal causal mask, and a masked SDPA cannot take the
flash kernel: it computes every masked block too (packed rows ran 12% slower than fixed-length
rows on an H200, bench/NOTES.md). Here the rows are flattened into one stream of samples with
their cumulative lengths (``cu_seqlens``, read off the position ids) and the attention is
torch's variable-length flash attention (``torch.nn.attention.varlen.varlen_attn``): causal
inside each sample, nothing across, no mask, no masked blocks computed.

Registered with transformers as the attention implementation ``qlora_varlen`` (its mask
function asks for no mask); the trainer switches to it when it wraps the model with LoRA
(``models.wrap_with_lora``), so generation never sees it. Without CUDA (tests) or without ``varlen_attn`` (older torch) the
same segments run one by one through SDPA's causal path: the same result, slower.
"""

from __future__ import annotations

import weakref
from typing import Any

import torch
import torch.nn.functional as F
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, flash_attention_mask

NAME = "qlora_varlen"
VARLEN = True
"""Whether packed rows on a GPU take this attention (a switch for benchmarks and tests)."""

_cache: dict[str, Any] = {"rows": lambda: None, "value": None}  # the last batch's position ids (a weak reference)


def cu_seqlens(position_ids: torch.Tensor) -> tuple[torch.Tensor, int]:
    """(cumulative sample lengths as int32, the longest sample's length bound) of rows whose positions restart at 0.

    A sample starts where its position is 0 and at each row's start. The bound is the row length
    (flash attention needs only an upper bound), so nothing waits for the device but the one
    ``nonzero``; its result is reused for every layer of the same batch (and its recomputation).
    """
    if _cache["rows"]() is position_ids:
        return _cache["value"]
    b, s = position_ids.shape
    starts = position_ids == 0
    starts[:, 0] = True
    idx = starts.reshape(-1).nonzero().reshape(-1)
    cu = torch.cat([idx, idx.new_tensor([b * s])]).to(torch.int32)
    _cache["rows"], _cache["value"] = weakref.ref(position_ids), (cu, s)
    return cu, s


def _segments_sdpa(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu: torch.Tensor, scale: float | None
) -> torch.Tensor:
    """The same attention, sample by sample through SDPA (q, k, v: tokens x heads x dim)."""
    rep = q.shape[1] // k.shape[1]
    out = []
    bounds = cu.tolist()
    for a, b in zip(bounds[:-1], bounds[1:], strict=True):
        qs, ks, vs = (t[a:b].transpose(0, 1) for t in (q, k, v))
        if rep > 1:
            ks, vs = ks.repeat_interleave(rep, 0), vs.repeat_interleave(rep, 0)
        out.append(F.scaled_dot_product_attention(qs, ks, vs, is_causal=True, scale=scale).transpose(0, 1))
    return torch.cat(out)


def attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """transformers' attention interface: q, k, v are batch x heads x tokens x dim; returns batch x tokens x heads x dim."""
    position_ids = kwargs.get("position_ids")
    same_length = query.shape[2] == key.shape[2]
    if (
        attention_mask is not None
        or position_ids is None
        or dropout
        or kwargs.get("softcap") is not None
        or not same_length
    ):
        # padded rows (no packing), a KV cache, or what flash attention does not cover: SDPA as usual.
        # The mask asked for (as flash attention's) is the 2D padding mask: make it SDPA's causal 4D one.
        if attention_mask is not None and attention_mask.dim() == 2 and same_length:
            s = query.shape[2]
            causal = torch.ones(s, s, dtype=torch.bool, device=query.device).tril()
            attention_mask = causal[None, None] & attention_mask[:, None, None, -s:].bool()
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs
        )
    b, hq, s, d = query.shape
    q, k, v = (t.transpose(1, 2).reshape(b * s, t.shape[1], d) for t in (query, key, value))
    cu, longest = cu_seqlens(position_ids if position_ids.shape[0] == b else position_ids.expand(b, s))
    out = None
    if q.is_cuda:
        try:
            # lazy: only newer torch builds have it (ImportError below)
            from torch.nn.attention.varlen import varlen_attn
        except ImportError:
            varlen_attn = None
        if varlen_attn is not None:
            gqa = k.shape[1] != hq
            if gqa:  # the flash backend takes grouped heads; expand them for any other
                rep = hq // k.shape[1]
                k, v = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
            out = varlen_attn(q, k, v, cu, cu, longest, longest, scale=scaling, window_size=(-1, 0))
    if out is None:
        out = _segments_sdpa(q, k, v, cu, scaling)
    return out.reshape(b, s, hq, d), None


def _no_mask(*args: Any, attention_mask: torch.Tensor | None = None, **kwargs: Any) -> torch.Tensor | None:
    """The mask transformers builds for this attention: only padding, as for flash attention (packed rows: none)."""
    return flash_attention_mask(*args, attention_mask=attention_mask, **kwargs)


def register() -> str:
    """Make ``qlora_varlen`` an attention implementation transformers knows; returns its name."""

    AttentionInterface.register(NAME, attention_forward)
    AttentionMaskInterface.register(NAME, _no_mask)
    return NAME


def use_for(model: torch.nn.Module, packing: bool, device: torch.device) -> bool:
    """Switch ``model`` to this attention when its rows are packed and it runs on a GPU; whether it did."""
    if not (VARLEN and packing and device.type == "cuda"):
        return False
    if getattr(model.config, "_attn_implementation", None) != "sdpa":
        return False  # the user chose eager (or the model needs its own): leave it
    model.set_attn_implementation(register())
    return True
