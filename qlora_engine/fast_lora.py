"""LoRA on 4-bit layers in the compute dtype, without peft's per-call copies (``train.fast_lora``).

peft's 4-bit LoRA layer (``peft.tuners.lora.bnb.Linear4bit``) clones the base output, casts
the input to the adapter weights' fp32, runs both LoRA matmuls in fp32, scales the fp32
result, casts it back and adds it. At thousands of tokens each of those is a full-width
tensor read and written (the fp32 ones twice as wide as the bf16 activations), so the
LoRA part costs more memory traffic than the 4-bit matmul beside it, and autograd keeps the
fp32 copy of every input for the weight gradients.

Here the adapter weights stay fp32 (what the optimizer updates) and the two LoRA matmuls run
in the compute dtype on the layer's own input, in one autograd function. Rounding A and B to
bf16 for that (what torch's autocast does) loses enough that the lowest layers' LoRA
gradients, sums that nearly cancel, can land several times their own size away from fp32
(measured on SmolLM2 with real text: 583% against peft's 63%; ``bench/same_math_cpu.py``).
So each weight goes in as two bf16 halves, its rounding and what the rounding lost, side by
side in one GEMM of twice the rank (``x @ [A_hi; A_lo].T``, ``[xa, xa] @ [B_hi, B_lo].T``):
the products keep about 16 bits of the weights and still read the activations once (these
GEMMs are rank-wide and bound by memory, so twice the rank should cost about the same time;
not yet measured on a GPU). With that the same case measured 39%, nearer fp32 than peft's
path. What autograd keeps per layer
is the bf16 input (which the layers around it keep anyway), the rank-wide ``x @ A`` and the
split weights.

The order of the two halves matters under non-reentrant checkpointing. The backward of a
checkpointed block first recomputes its forward, and torch stops that recomputation as soon
as every tensor the backward needs is back. bitsandbytes' 4-bit matmul keeps no tensor (its
backward needs only the frozen weight), so in the last linear of a block (``down_proj``
in Llama-like models) the LoRA half runs first: the recomputation then stops before that
layer's 4-bit matmul, whose output only fed the residual sum. That skips about a quarter of
a block's recomputed matmul work. Elsewhere the 4-bit matmul runs first, inside the LoRA
function (dequantize, then one GEMM, as bitsandbytes does under training), and the LoRA product
is added into its output, in place, by the same GEMM that computes it (``addmm_``: an
out-of-place ``addmm`` first copies the whole output, 386 device copies in a 2048 x 4 step on
the 8B shape). Its backward likewise adds the LoRA half's input gradient into the frozen
matmul's: apart, autograd sums two full-width input gradients per projection.
Under ``torch.compile`` the 4-bit matmul stays the base layer's (an op, below) and the LoRA
product is added into its output through the op ``qlora::add_lora_``, which inductor
reinplaces; never into a view, which bitsandbytes may hand back of its own weight.

Anything this does not cover falls back to peft's own forward, per call: no gradients
(evaluation, generation: bitsandbytes' inference kernels are faster there), adapters
disabled or merged, several adapters, DoRA or another LoRA variant, dropout, float16.

With ``train.keep_dequantized`` every such layer's weight is dequantized once at setup and kept
(:func:`keep_dense`): no step dequantizes, and the LoRA function reads the kept weight, in the
last projection of a block too (nothing to skip there: the weight is no longer dequantized).

Under ``torch.compile`` (``train.compile``: :class:`CompiledBlocks`) the frozen 4-bit
matmul is one opaque op, ``qlora::frozen4bit_linear`` (its input gradient a second op), taking
the packed weight and its quant state as tensors: the same kernels, and a decoder block traces
into one graph with no break.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch.utils.checkpoint import CheckpointPolicy, checkpoint, create_selective_checkpoint_contexts

FAST_DTYPES = (torch.bfloat16, torch.float32)


def why_not(module: Any) -> str | None:
    """Why ``module`` (a peft LoRA layer) cannot take the fast path at all; None when it can."""
    if type(module).__name__ != "Linear4bit" or not hasattr(module, "lora_A"):
        return "not a 4-bit LoRA layer"
    if len(module.lora_A) != 1:
        return "several adapters"
    (name,) = module.lora_A.keys()
    if getattr(module, "lora_variant", {}).get(name) is not None or getattr(module, "use_dora", {}).get(name):
        return "DoRA or another LoRA variant"
    if not isinstance(module.lora_dropout[name], torch.nn.Identity):
        return "LoRA dropout"
    if module.base_layer.compute_dtype not in FAST_DTYPES:
        return f"compute dtype {module.base_layer.compute_dtype}"
    return None


def _split(w: torch.Tensor, dtype: torch.dtype, dim: int) -> torch.Tensor:
    """fp32 ``w`` as two ``dtype`` tensors side by side along ``dim``: ``w`` rounded, and what rounding lost."""
    hi = w.to(dtype)
    return torch.cat([hi, (w - hi.float()).to(dtype)], dim=dim)


ADD_IN_PLACE = True
"""Whether :class:`_LoraProduct` adds into the base layer's output in place (a switch for benchmarks)."""


def _fresh(t: torch.Tensor) -> bool:
    """Whether ``t`` owns its contiguous storage (not a view: bitsandbytes may hand back one of its weight)."""
    return t._base is None and t.is_contiguous()


def _addmm_into(out: torch.Tensor, xa: torch.Tensor, b: torch.Tensor) -> None:
    """``out += xa @ b.T`` in place (``out`` contiguous, its last dimension ``b``'s first): one GEMM, no copy."""
    out.view(-1, out.shape[-1]).addmm_(xa, b.t())


@torch.library.custom_op("qlora::add_lora_", mutates_args=("out",))
def add_lora_(out: torch.Tensor, xa: torch.Tensor, b: torch.Tensor) -> None:
    """:func:`_addmm_into` as an op (what a compiled graph calls: inductor reinplaces it)."""
    _addmm_into(out, xa, b)


@add_lora_.register_fake
def _(out: torch.Tensor, xa: torch.Tensor, b: torch.Tensor) -> None:
    return None


MERGE_DENSE = True
"""Whether a layer whose weight is kept dequantized runs its frozen matmul inside :class:`_LoraProduct`
(a switch for benchmarks)."""

MERGE_4BIT = True
"""Whether a 4-bit layer (not kept dequantized) runs its frozen matmul inside :class:`_LoraProduct` too,
dequantizing in its forward and again in its backward (a switch for benchmarks)."""


def _add_into(out: torch.Tensor, xa: torch.Tensor, b: torch.Tensor) -> None:
    """``out += xa @ b.T`` in place, eager or compiled (the op: inductor reinplaces it, see :class:`_LoraProduct`)."""
    (add_lora_ if torch.compiler.is_compiling() else _addmm_into)(out, xa, b)


class _LoraProduct(torch.autograd.Function):
    """``out + x @ A.T @ (scale * B).T`` with the adapter weights in split precision (module docstring).

    Keeps ``x``, ``x @ A.T`` (tokens x rank) and the split weights (2 x rank x features each).
    With ``dense`` (the frozen weight kept dequantized, :func:`keep_dense`) or ``base`` (a 4-bit
    layer: its weight dequantized here, in the forward and again in the backward, as
    :class:`_Frozen4bit` does) ``out`` is the frozen matmul ``x @ W.T (+ bias)``, computed here, and
    the backward adds the LoRA half's input gradient into the frozen matmul's in place: apart,
    autograd would sum the two full-width input gradients (one more tensor written and an add
    reading two, in each of a layer's seven projections).
    """

    @staticmethod
    def forward(
        ctx: Any,
        x: torch.Tensor,
        A: torch.Tensor,
        B: torch.Tensor,
        scale: float,
        out: torch.Tensor | None,
        dense: torch.Tensor | None = None,
        bias: torch.Tensor | None = None,
        base: Any = None,
    ):
        ctx.base = base
        if base is not None:
            dense_now = dequantize(base.weight).to(x.dtype)  # freed when this returns
            out = torch.nn.functional.linear(x, dense_now, None if bias is None else bias.to(x.dtype))
            del dense_now
        elif dense is not None:
            out = torch.nn.functional.linear(x, dense, None if bias is None else bias.to(x.dtype))
        r = A.shape[0]
        x2 = x.reshape(-1, x.shape[-1])
        a = _split(A, x.dtype, 0)  # rank*2 x in
        b = _split(B * scale, x.dtype, 1)  # out x rank*2
        xa2 = x2 @ a.t()
        xa = xa2[:, :r] + xa2[:, r:]
        xa_twice = torch.cat([xa, xa], dim=1)  # meets b's two halves: xa @ (hi + lo).T in one GEMM
        ctx.save_for_backward(x, xa, a, b, dense)
        ctx.scale, ctx.r = scale, r
        if dense is not None or base is not None:
            _add_into(out, xa_twice, b)  # a fresh output, never an input of this function
            return out
        if out is not None and ADD_IN_PLACE and (torch.compiler.is_compiling() or _fresh(out)):
            # into the base's output: an out-of-place addmm first copies it whole (a projection's
            # output, 6 of 7 per layer and pass: 26 ms of a 2048 x 4 step on the 8B shape). Under
            # torch.compile an in-place addmm_ is functionalized back into that copy; the op below
            # is reinplaced by inductor instead (its argument is a fresh op output used nowhere else).
            _add_into(out, xa_twice, b)
            ctx.mark_dirty(out)
            return out
        y = xa_twice @ b.t() if out is None else torch.addmm(out.reshape(-1, out.shape[-1]), xa_twice, b.t())
        return y.view(*x.shape[:-1], y.shape[-1])

    @staticmethod
    def backward(ctx: Any, g: torch.Tensor):
        x, xa, a, b, dense = ctx.saved_tensors
        r = ctx.r
        g2 = g.reshape(-1, g.shape[-1])
        gb = g2 @ b
        g_xa = gb[:, :r] + gb[:, r:]  # the gradient of x @ A.T: g @ (scale * B)
        grad_x = grad_a = grad_b = None
        if ctx.needs_input_grad[0]:
            if dense is None and ctx.base is None:
                grad_x = (torch.cat([g_xa, g_xa], dim=1) @ a).view(x.shape)
            else:  # the frozen matmul's input gradient, the LoRA half's added into it by the same GEMM
                grad_x = g2 @ (dense if ctx.base is None else dequantize(ctx.base.weight).to(g.dtype))
                _add_into(grad_x, torch.cat([g_xa, g_xa], dim=1), a.t())
                grad_x = grad_x.view(x.shape)
        if ctx.needs_input_grad[1]:
            grad_a = (g_xa.t() @ x.reshape(-1, x.shape[-1])).float()
        if ctx.needs_input_grad[2]:
            grad_b = (g2.t() @ xa).float().mul_(ctx.scale)
        return grad_x, grad_a, grad_b, None, g if ctx.needs_input_grad[4] else None, None, None, None


LEAN_4BIT = True
"""Whether the frozen 4-bit matmul under training takes :class:`_Frozen4bit` (a switch for benchmarks and tests)."""


def dequantize(weight: Any, dtype: torch.dtype | None = None) -> torch.Tensor:
    """The 4-bit ``weight`` (a bitsandbytes ``Params4bit``) dequantized into ``dtype`` (None: the dtype it was
    quantized from): the kernels bitsandbytes' own dequantization runs, called straight on CUDA (no op
    dispatch, no per-call checks), its registered ops elsewhere. Straight into ``dtype`` is what
    bitsandbytes' CPU matmul computes; dequantizing first and casting after can round differently."""
    parts = quant_parts(weight)
    return _dequantize(*parts[:-1], parts[-1] if dtype is None else dtype)


def quant_parts(weight: Any) -> tuple:
    """A 4-bit weight and its quant state as tensors and plain values (what :func:`_dequantize` and the
    ``qlora::frozen4bit_linear`` op take): packed weight, absmax, the nested absmax, its code and offset
    (None when not nested), the nested block size, the shape, the block size, the quant type, the dtype."""
    qs = weight.quant_state
    nested = (qs.state2.absmax, qs.state2.code, qs.offset, qs.state2.blocksize) if qs.nested else (None, None, None, 0)
    return (weight, qs.absmax, *nested, list(qs.shape), qs.blocksize, qs.quant_type, qs.dtype)


def _dequantize(
    packed: torch.Tensor,
    absmax: torch.Tensor,
    absmax2: torch.Tensor | None,
    code2: torch.Tensor | None,
    offset: torch.Tensor | None,
    blocksize2: int,
    shape: list[int],
    blocksize: int,
    quant_type: str,
    dtype: torch.dtype,
) -> torch.Tensor:
    """:func:`dequantize` from :func:`quant_parts`: the absmax decoded (when nested), then the 4-bit weight."""
    if packed.device.type != "cuda":  # bitsandbytes' registered ops, as its dequantize_4bit calls them
        import bitsandbytes  # noqa: F401  (lazy: registers torch.ops.bitsandbytes)

        if absmax2 is not None:
            absmax = torch.ops.bitsandbytes.dequantize_blockwise.default(
                absmax, absmax2, code2, blocksize2, torch.float32
            )
            absmax += offset
        return torch.ops.bitsandbytes.dequantize_4bit.default(packed, absmax, blocksize, quant_type, shape, dtype)
    from bitsandbytes.backends.cuda import ops  # lazy: bitsandbytes' CUDA backend, for the CUDA path only

    if absmax2 is not None:
        decoded = torch.empty(absmax.shape, dtype=torch.float32, device=absmax.device)
        ops._dequantize_blockwise_impl(absmax, absmax2, code2, blocksize2, torch.float32, decoded)
        absmax = decoded.add_(offset)
    out = torch.empty(shape, dtype=dtype, device=packed.device)
    ops._dequantize_4bit_impl(packed, absmax, blocksize, quant_type, dtype, out)
    return out


class _Frozen4bit(torch.autograd.Function):
    """``x @ W.T (+ bias)`` for a frozen 4-bit ``W``: what bitsandbytes' ``MatMul4Bit`` computes under training
    (dequantize, then one GEMM; the input gradient dequantizes again), without its per-call Python.

    Saves no tensor (the weight lives on the module), so a checkpointed block's recomputation
    still stops before a matmul whose output only the forward needed (module docstring).
    """

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, base: Any) -> torch.Tensor:
        ctx.base = base
        bias = base.bias
        return torch.nn.functional.linear(
            x, dequantize(base.weight).to(x.dtype), None if bias is None else bias.to(x.dtype)
        )

    @staticmethod
    def backward(ctx: Any, g: torch.Tensor):
        if not ctx.needs_input_grad[0]:
            return None, None
        return g @ dequantize(ctx.base.weight).to(g.dtype), None


# --- the same matmul as one opaque op, for torch.compile ----------------------------------------
# Dynamo cannot trace bitsandbytes' kernel calls (a ctypes library, a raw stream pointer), and the
# module-holding autograd function above is no graph input. Under torch.compile the frozen matmul is
# this op instead: tensors and plain values in (quant_parts), its backward a second op (g @ W, no
# weight gradient), so a decoder block compiles into one graph. Eager calls keep _Frozen4bit (no
# op dispatch per call; a checkpoint's recomputation stops before the last block's matmul).
_QUANT_SCHEMA = "Tensor packed, Tensor absmax, Tensor? absmax2, Tensor? code2, Tensor? offset, int blocksize2, int[] shape, int blocksize, str quant_type, ScalarType dtype"


@torch.library.custom_op(
    "qlora::frozen4bit_linear", mutates_args=(), schema=f"(Tensor x, Tensor? bias, {_QUANT_SCHEMA}) -> Tensor"
)
def frozen4bit_linear(x: torch.Tensor, bias: torch.Tensor | None, *quant: Any) -> torch.Tensor:
    """``x @ W.T (+ bias)`` for the frozen 4-bit ``W`` given by ``quant`` (:func:`quant_parts`)."""
    return torch.nn.functional.linear(x, _dequantize(*quant).to(x.dtype), None if bias is None else bias.to(x.dtype))


@torch.library.custom_op(
    "qlora::frozen4bit_linear_grad", mutates_args=(), schema=f"(Tensor g, {_QUANT_SCHEMA}) -> Tensor"
)
def frozen4bit_linear_grad(g: torch.Tensor, *quant: Any) -> torch.Tensor:
    """The input gradient of :func:`frozen4bit_linear`: ``g @ W``."""
    return g @ _dequantize(*quant).to(g.dtype)


@frozen4bit_linear.register_fake
def _(x: torch.Tensor, bias: torch.Tensor | None, *quant: Any) -> torch.Tensor:
    return x.new_empty((*x.shape[:-1], quant[6][0]))


@frozen4bit_linear_grad.register_fake
def _(g: torch.Tensor, *quant: Any) -> torch.Tensor:
    return g.new_empty((*g.shape[:-1], quant[6][1]))


def _frozen4bit_setup(ctx: Any, inputs: tuple, output: torch.Tensor) -> None:
    ctx.save_for_backward(*inputs[2:7])
    ctx.rest = inputs[7:]


def _frozen4bit_backward(ctx: Any, g: torch.Tensor) -> tuple:
    grad_x = frozen4bit_linear_grad(g, *ctx.saved_tensors, *ctx.rest) if ctx.needs_input_grad[0] else None
    return (grad_x,) + (None,) * 11


frozen4bit_linear.register_autograd(_frozen4bit_backward, setup_context=_frozen4bit_setup)


def keep_dense(base: Any) -> None:
    """Dequantize ``base``'s 4-bit weight once and keep it beside the packed one (``train.keep_dequantized``):
    the training matmuls then read it and dequantize nothing; the same values as dequantizing per call."""
    with torch.no_grad():
        dense = dequantize(base.weight).to(base.compute_dtype)
    if dense.device.type == "cuda":
        torch._dynamo.mark_static_address(dense)  # CUDA graphs read it where it is rather than copy it per replay
    base._qlora_dense = dense


def drop_dense(model: torch.nn.Module) -> int:
    """Let go of every weight :func:`keep_dense` kept; returns how many."""
    dropped = 0
    for module in model.modules():
        if getattr(module, "_qlora_dense", None) is not None:
            module._qlora_dense, dropped = None, dropped + 1
    return dropped


def _lean(base: Any, x: torch.Tensor) -> bool:
    """Whether the frozen 4-bit matmul of ``base`` (a bitsandbytes ``Linear4bit``) on ``x`` can run here
    as dequantize-then-GEMM (:class:`_Frozen4bit`, :func:`frozen4bit_linear`, :class:`_LoraProduct`)."""
    quant = getattr(base.weight, "quant_state", None)
    return (
        x.dtype == base.compute_dtype
        and (base.bias is None or not base.bias.requires_grad)
        # FSDP gathers the weight as a plain tensor: bitsandbytes' own forward restores its state
        and quant is not None
        and not getattr(quant, "packing_format_for_cpu", False)
        and quant.quant_type in ("nf4", "fp4")
    )


def _lean_base_forward(base: Any, original: Any) -> Any:
    """``base``'s forward (a bitsandbytes ``Linear4bit``): :class:`_Frozen4bit` while training, else its own."""

    def forward(x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if not LEAN_4BIT or args or kwargs or not torch.is_grad_enabled() or not _lean(base, x):
            return original(x, *args, **kwargs)
        dense = base._qlora_dense
        if dense is not None:
            return torch.nn.functional.linear(x, dense, None if base.bias is None else base.bias.to(x.dtype))
        if torch.compiler.is_compiling():
            return frozen4bit_linear(x, base.bias, *quant_parts(base.weight))
        return _Frozen4bit.apply(x, base)

    return forward


def _fast_forward(module: Any, original: Any, *, lora_first: bool) -> Any:
    (name,) = module.lora_A.keys()
    base = module.base_layer

    def forward(x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if (
            args
            or kwargs
            or not torch.is_grad_enabled()
            or module.disable_adapters
            or module.merged
            or module.active_adapters != [name]
            or x.dtype != base.compute_dtype
        ):
            return original(x, *args, **kwargs)
        scale = module.scaling[name]
        # Looked up per call: FSDP swaps the parameters (sharded between uses, gathered for this forward).
        lora_A, lora_B = module.lora_A[name].weight, module.lora_B[name].weight
        dense, bias = base._qlora_dense, base.bias
        if dense is not None and MERGE_DENSE and (bias is None or not bias.requires_grad):
            return _LoraProduct.apply(x, lora_A, lora_B, scale, None, dense, bias)  # one input gradient, no sum
        if (
            dense is None
            and MERGE_4BIT
            and LEAN_4BIT
            and not lora_first  # there the recomputation must stop before the frozen matmul: apart
            and not torch.compiler.is_compiling()  # the compiled block's frozen matmul is an op
            and _lean(base, x)
        ):
            return _LoraProduct.apply(x, lora_A, lora_B, scale, None, None, bias, base)
        if lora_first:
            lora = _LoraProduct.apply(x, lora_A, lora_B, scale, None)  # keeps its tensors: the last the backward needs
            # bitsandbytes keeps nothing, so a recomputation stops before this. Not in place: after
            # an evaluation on the CPU bitsandbytes may hand back a view of its packed weight.
            return base(x) + lora
        return _LoraProduct.apply(x, lora_A, lora_B, scale, base(x))

    return forward


def enable(model: torch.nn.Module, *, dense: bool = False) -> tuple[int, dict[str, int]]:
    """Give every eligible 4-bit LoRA layer the fast forward (``dense``: its weight kept dequantized,
    :func:`keep_dense`); returns (fast, {reason: count} of the rest)."""
    # lazy: transformers.modeling_layers loads its whole modeling stack (seconds); only training needs it
    from transformers.modeling_layers import GradientCheckpointingLayer

    last = set()  # the last LoRA layer of each decoder block: its LoRA half runs first
    for block in model.modules():
        if isinstance(block, GradientCheckpointingLayer):
            layers = [m for m in block.modules() if hasattr(m, "lora_A")]
            if layers:
                last.add(id(layers[-1]))
    fast, skipped = 0, {}
    for module in model.modules():
        if not hasattr(module, "lora_A") or not hasattr(module, "base_layer"):
            continue
        reason = why_not(module)
        if reason is not None:
            skipped[reason] = skipped.get(reason, 0) + 1
            continue
        module.forward = _fast_forward(module, module.forward, lora_first=id(module) in last)
        base = module.base_layer
        base.forward = _lean_base_forward(base, base.forward)
        base._qlora_dense = None
        if dense:
            keep_dense(base)
        fast += 1
    return fast, skipped


MUST_RECOMPUTE = True
"""Whether a compiled checkpoint tells the partitioner to recompute every op (else torch's default hint)."""


def _must_recompute(_ctx: Any, _op: Any, *_args: Any, **_kwargs: Any) -> Any:
    return CheckpointPolicy.MUST_RECOMPUTE


def _recompute_everything() -> Any:
    return create_selective_checkpoint_contexts(_must_recompute)


def compile_blocks(model: torch.nn.Module, **options: Any) -> Callable[[], None]:
    """``torch.compile`` each decoder block with ``options`` (``mode``, ``backend``...); returns what undoes it.

    With the frozen 4-bit matmul as one op (:func:`frozen4bit_linear`) a block is one graph. A
    checkpointed block compiles its checkpoint too (transformers' checkpoint function, which every
    version calls with the block's forward): the compiled backward recomputes the block (and leaves
    out what it does not need, such as the last 4-bit matmul), and no compiled call runs inside an
    eager checkpoint's recomputation, which CUDA graphs do not survive (pytorch#154306). Every op
    of a checkpointed block is marked must-recompute: the partitioner then keeps only the block's
    inputs for the backward, as eager checkpointing does. A block left out of checkpointing gets a
    compiled function that only calls it, through the same hook, so evaluation and generation
    (``model.eval()``, no gradients) run the eager blocks and compile nothing more. Not with
    ``train.offload_activations`` (its checkpoint function is the one this replaces) or
    ``train.mlp_chunk_tokens`` (a checkpoint inside the block).
    """
    # lazy: transformers.modeling_layers loads its whole modeling stack (seconds); only training needs it
    from transformers.modeling_layers import GradientCheckpointingLayer

    # With the `kernels` package, transformers' attention sets a context variable per forward (and
    # resets it before returning); dynamo refuses a checkpointed region with a side effect unless it
    # may skip replaying it in the backward, which here changes nothing.
    if hasattr(torch._dynamo.config, "skip_fwd_side_effects_in_bwd_under_checkpoint"):
        torch._dynamo.config.skip_fwd_side_effects_in_bwd_under_checkpoint = True

    # (torch's default hint, MUST_RECOMPUTE off, is for the benchmarks' comparison: under compile a
    # context_fn must make a selective checkpoint, so the hint is left out rather than made a no-op)
    policy = {"context_fn": _recompute_everything} if MUST_RECOMPUTE else {}

    def checkpointed(function: Any, *args: Any, **kwargs: Any) -> Any:
        return checkpoint(function, *args, use_reentrant=False, **policy, **kwargs)

    def plain(function: Any, *args: Any, **kwargs: Any) -> Any:
        return function(*args, **kwargs)

    # one compiled function for all checkpointed blocks, one for the rest: one cache each, one graph per input kind
    compiled = {True: torch.compile(checkpointed, **options), False: torch.compile(plain, **options)}
    blocks = [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]
    before = [(b, b.gradient_checkpointing, b.__dict__.get("_gradient_checkpointing_func")) for b in blocks]
    for block in blocks:
        block._gradient_checkpointing_func = compiled[bool(block.gradient_checkpointing)]
        block.gradient_checkpointing = True  # the flag that routes a training forward through the function

    def undo() -> None:
        for block, flag, function in before:
            block.gradient_checkpointing = flag
            if function is None:
                block.__dict__.pop("_gradient_checkpointing_func", None)
            else:
                block._gradient_checkpointing_func = function

    return undo


class CompiledBlocks:
    """``train.compile`` for one training run: the blocks compiled, CUDA graphs marked per micro-batch.

    ``how``: 'blocks' (inductor's fused kernels) or 'graphs' (those replayed as CUDA graphs:
    'reduce-overhead'; on a CPU the same as 'blocks'). Shapes are left to torch's automatic
    dynamic shapes: the first length compiles a static graph, a second one a graph for any
    length (the trainer pads rows to a multiple of :data:`PAD_MULTIPLE` so CUDA graphs are
    recorded for few lengths).
    """

    PAD_MULTIPLE = 256
    BACKEND = "inductor"
    """torch.compile's backend (the tests take 'aot_eager': the same graphs and partition, no code generation)."""

    def __init__(self, model: torch.nn.Module, how: str, device: torch.device, processes: int = 1) -> None:
        if processes > 1:
            from qlora_engine.errors import ConfigError  # lazy: kept out of the op's import path

            raise ConfigError(
                f"compiled layers run in one process for now; set train.compile to off to train on {processes} GPUs.",
                field="train.compile",
            )
        self.how = how
        self.graphs = how == "graphs" and device.type == "cuda"
        cpu_graphs = how == "graphs" and not self.graphs
        self.note = "train.compile graphs: CUDA graphs need a GPU; compiling the layers only" if cpu_graphs else None
        self.model = model
        self.apply()

    def give_up(self, failure: str, step: int) -> str:
        """The layers eager again after the compiler failed on them; what to tell the user."""
        self.undo()
        return (
            f"train.compile {self.how}: compiling the layers failed at step {step} ({failure}); they run without "
            "compiling from now on and the step runs again. Set train.compile to off to skip the attempt."
        )

    def apply(self) -> None:
        """Compile the blocks as they are checkpointed now (again after :meth:`undo` and a change)."""
        if self.BACKEND == "inductor":
            options: dict[str, Any] = {"mode": "reduce-overhead" if self.graphs else "default"}
        else:
            options = {"backend": self.BACKEND}
        self.undo = compile_blocks(self.model, **options)

    def step_begins(self) -> None:
        """Before each micro-batch's forward: the last one's graph outputs are no longer read."""
        if self.graphs:
            torch.compiler.cudagraph_mark_step_begin()
