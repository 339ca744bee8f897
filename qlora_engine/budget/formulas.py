"""Byte counts of one QLoRA training step, each written from what the libraries actually allocate.

Sources read for each formula (versions: bitsandbytes 0.50, peft 0.21, transformers 5.24,
torch 2.13, liger-kernel 0.8.5); the comments say what was read and why the formula is what it
is. What autograd keeps is here; the order in which a step allocates and frees, which decides
the peaks, is in ``timeline``.

Notation: ``T = micro_batch * seq`` tokens in the longest micro-batch, ``h`` hidden size,
``i`` intermediate size, ``a``/``kv`` attention/key-value heads, ``d`` head dim, ``V``
vocabulary, ``r`` LoRA rank, ``e`` bytes per element of the compute dtype (2 for bf16).
"""

from __future__ import annotations

from dataclasses import dataclass

from qlora_engine.budget.spec import LinearShape, ModelSpec, ceil_div

# bitsandbytes 4-bit layout (functional.quantize_4bit, nn.Params4bit): weights are cut into
# blocks of 64 values, on CUDA and on the CPU alike (Params4bit defaults blocksize=64 and
# transformers' Linear4bit never passes another). With double quantization the fp32 absmax
# of every block is itself quantized to uint8 with quantize_blockwise(blocksize=256).
BLOCKSIZE = 64
NESTED_BLOCKSIZE = 256
CODE_4BIT_BYTES = 16 * 4  # get_4bit_type(): the 16 NF4/FP4 levels in fp32, one tensor per layer
CODE_8BIT_BYTES = 256 * 4  # create_dynamic_map(): 256 fp32 levels, copied per layer (copy=True)
OFFSET_BYTES = 4  # the fp32 mean subtracted from absmax before nesting (a 0-dim tensor)

# bitsandbytes optimizers (optim/optimizer.py, Optimizer2State): tensors smaller than
# min_8bit_size keep 32-bit state; state buffers of at least 1e5 elements of a paged optimizer
# live in CUDA managed memory (cudaMallocManaged), outside torch's allocator, and can be
# evicted to CPU RAM when the GPU runs short.
MIN_8BIT_SIZE = 4096
PAGED_MIN_NUMEL = 100_000
OPT_8BIT_BLOCK = 256
# qlora_engine.optim.FLAT (not imported here: the budget runs where torch is not): every LoRA
# weight a view of one flat buffer, each starting on a 256-element block, the tensors under
# MIN_8BIT_SIZE of an 8-bit optimizer in a second one held at 32 bits; the optimizer sees those
# one or two tensors, and the gradients are views of a flat buffer that lives through the run.
FLAT_LORA = True



def quantized_linear_bytes(numel: int, *, double_quant: bool) -> tuple[int, int]:
    """(packed weight bytes, quantization-constant bytes) of one 4-bit linear layer.

    Packed: two 4-bit codes per byte, ``(n + 1) // 2`` (the CUDA kernel and the CPU path both
    round an odd count up). Constants: one absmax per 64-value block (fp32, or uint8 with
    double quantization plus one fp32 absmax per 256 of those, the 256-entry fp32 dynamic map
    and the fp32 offset), and the 16-entry code of the 4-bit type.
    """
    packed = (numel + 1) // 2
    blocks = ceil_div(numel, BLOCKSIZE)
    if double_quant:
        nested = ceil_div(blocks, NESTED_BLOCKSIZE)
        consts = blocks + 4 * nested + CODE_8BIT_BYTES + OFFSET_BYTES + CODE_4BIT_BYTES
    else:
        consts = 4 * blocks + CODE_4BIT_BYTES
    return packed, consts


def lora_tensor_sizes(lin: LinearShape, rank: int, dora: bool) -> list[int]:
    """Element counts of the trainable tensors peft adds to one linear layer.

    lora_A is ``r x in``, lora_B is ``out x r`` (peft tuners/lora/layer.py update_layer); DoRA
    adds a magnitude vector of ``out`` elements. No bias (bias='none').
    """
    sizes = [rank * lin.in_features, lin.out_features * rank]
    if dora:
        sizes.append(lin.out_features)
    return sizes


def optimizer_state_bytes(sizes: list[int], optimizer: str) -> tuple[int, int, int]:
    """(bytes in torch's allocator, bytes in paged managed memory, step-time transient bytes).

    AdamW keeps two states per parameter: fp32 (8 bytes/param) for 'adamw' and the 32-bit
    bitsandbytes optimizers; uint8 plus one fp32 absmax per 256 values for each state in the
    8-bit ones (tensors under 4096 elements stay 32-bit). torch's foreach AdamW allocates a
    temporary as large as all exp_avg_sq (the sqrt) during step().
    """
    resident = paged = 0
    eight_bit_used = False
    transient = 4 * sum(sizes) if optimizer == "adamw" else 0
    # (elements, may it take 8-bit state) of each tensor the optimizer sees
    seen = [(n, n >= MIN_8BIT_SIZE) for n in sizes]
    if FLAT_LORA and sizes:
        padded = [(ceil_div(n, OPT_8BIT_BLOCK) * OPT_8BIT_BLOCK, n >= MIN_8BIT_SIZE) for n in sizes]
        if optimizer.endswith("8bit"):
            seen = [(sum(p for p, big in padded if big), True), (sum(p for p, big in padded if not big), False)]
            seen = [(n, big) for n, big in seen if n]
        else:
            seen = [(sum(p for p, _ in padded), True)]
    for n, may_be_8bit in seen:
        if optimizer == "adamw":
            resident += 8 * n
            continue
        eight = optimizer.endswith("8bit") and may_be_8bit
        state = 2 * n if eight else 8 * n
        if eight:
            eight_bit_used = True
            resident += 2 * 4 * ceil_div(n, OPT_8BIT_BLOCK)
        if optimizer.startswith("paged") and n >= PAGED_MIN_NUMEL:
            paged += state
        else:
            resident += state
    if eight_bit_used:
        resident += 2 * 256 * 4  # the signed and unsigned dynamic maps, one copy per optimizer
    return resident, paged, transient


# Whether the engine's gradient checkpointing makes the embedding output require grad, so
# that the backward pass runs through (and recomputes) every block down to the first one.
# transformers' ``activation_checkpointing_enable`` turns input gradients on for every model
# whose main input is ``input_ids``; ``models.enable_gradient_checkpointing`` turns them off
# again, so the backward pass stops at the lowest adapted layer. tests/engine/test_budget.py
# checks this on the engine's real code path and fails when it changes; the formulas for True
# are tested there too, and bench/budget_accuracy.py records what the GPU's transformers does.
CHECKPOINTING_INPUT_GRADS = False


@dataclass(frozen=True)
class StepShape:
    """The shape of the largest micro-batch and the switches that change what autograd keeps."""

    batch: int
    seq: int
    elem: int
    """Bytes per element of the compute dtype (2 for bf16/fp16, 4 for fp32)."""
    checkpointing: bool
    mask: bool
    """A 4-D attention mask reaches SDPA (padding in the micro-batch, or packed samples)."""
    packed: bool
    attn: str
    """'sdpa' or 'eager'."""
    rank: int
    dropout: bool
    dora: bool
    dropout_mask_bytes: int = 1
    """CUDA's fused dropout keeps a bool mask; the CPU's keeps a noise tensor in the input dtype."""
    input_grads: bool = False
    """The embedding output requires grad (``enable_input_require_grads`` is in effect), so the
    first block's input needs a gradient even where that block has no adapter."""
    kernels: str = "none"
    """'liger' when Liger Kernel's RMSNorm, RoPE and gated-MLP kernels replace transformers' code."""
    loss: str = "plain"
    """'plain' (transformers' ForCausalLMLoss over the logits), 'fused_linear_cross_entropy'
    (liger's chunked lm_head + loss) or 'cross_entropy' (liger's loss over materialized logits)."""
    norm_in_place: bool = True
    """Liger's RMSNorm backward writes dX over dY (False for Gemma 2/3: a new dX)."""
    checkpoint_layers: int | None = None
    """Under checkpointing, how many of the blocks the backward pass reaches are checkpointed
    (the lowest ones); None: all of them. The others keep their activations."""
    offload: bool = False
    """Checkpointed blocks keep their input in pinned host memory, not on the GPU; each comes
    back for its block's recomputation."""
    mlp_chunk: int | None = None
    """The MLP runs over the sequence in chunks of this many tokens (each under non-reentrant
    checkpointing: only the chunk's input is kept; recomputed chunk by chunk in the backward)."""
    fast_lora: bool = False
    """The adapted layers run ``train.fast_lora``'s forward (``qlora_engine.fast_lora``: the LoRA
    matmuls in the compute dtype beside the 4-bit one, the block's last LoRA layer with its
    LoRA half first); False: peft's own (fp32 copies). Never with dropout, DoRA or float16:
    those layers keep peft's forward (:func:`fast_lora_applies`)."""

    @property
    def mlp_chunked(self) -> bool:
        return self.mlp_chunk is not None and self.mlp_chunk < self.seq

    @property
    def liger(self) -> bool:
        return self.kernels == "liger"

    @property
    def tokens(self) -> int:
        return self.batch * self.seq


def _norm_saved(T: int, width: int) -> int:
    # LlamaRMSNorm: x.to(float32) is saved by pow() and by the multiply with rsqrt (4 bytes per
    # element), plus rsqrt's output (one fp32 per row). The final `weight * x.to(dtype)` saves
    # nothing: the weight is frozen, and autograd only keeps what a needed gradient uses.
    return 4 * T * width + 4 * T


def _liger_norm_saved(T: int, width: int, elem: int, input_alive: bool) -> int:
    # LigerRMSNormFunction.forward (ops/rms_norm.py) saves its input X as it came (the compute
    # dtype, a view of the same storage) and RSTD, one fp32 per row (casting modes 'llama' and
    # 'gemma'). X costs nothing extra when something else keeps that tensor alive anyway.
    return (0 if input_alive else elem * T * width) + 4 * T


def fast_lora_applies(enabled: bool, compute_dtype: str, dropout: float, dora: bool) -> bool:
    """Whether ``train.fast_lora`` takes the adapted layers' forward, decided from the config as
    ``fast_lora.why_not`` decides it per layer: not with LoRA dropout, DoRA or float16 compute.
    'auto' is planned as bf16 (a CUDA card with bf16; older cards get float16 and peft's path)."""
    return enabled and dropout == 0 and not dora and compute_dtype != "float16"


def lora_saved(lin: LinearShape, s: StepShape, input_grad: bool = True) -> int:
    """What autograd keeps for one adapted linear layer in the forward pass (peft's forward;
    :func:`fast_lora_saved` for ``train.fast_lora``'s).

    peft's Linear4bit.forward casts x to the adapter's fp32 (``_cast_input_dtype``) and runs
    ``lora_B(lora_A(dropout(x))) * scaling``: lora_A keeps its fp32 input (4 bytes per input
    element; every adapted layer makes its own copy, so q, k and v hold three) and lora_B
    keeps lora_A's fp32 output (T x r). With dropout, CUDA's fused dropout keeps a 1-byte mask
    (the CPU keeps a 4-byte noise tensor instead), but only when x itself needs a gradient.
    The 4-bit base matmul (bitsandbytes MatMul4Bit) keeps no activation: its input gradient
    needs only the packed weight, and the frozen weight has no gradient.
    """
    T = s.tokens
    saved = 4 * T * lin.in_features + 4 * T * s.rank
    if s.dropout and input_grad:
        saved += s.dropout_mask_bytes * T * lin.in_features
    if s.dora:
        saved += 4 * T * lin.out_features  # DoRA's extra fp32 product; see the estimate's reasons
    return saved


def fast_lora_saved(lin: LinearShape, s: StepShape, input_grad: bool = True) -> int:
    """What autograd keeps for one adapted linear layer on ``train.fast_lora``'s path, beside
    its input.

    ``qlora_engine.fast_lora._LoraProduct`` keeps x (the layer's input in the compute dtype,
    one tensor for every layer that reads it: :func:`block_saved` counts it once per input),
    ``x @ A`` (T x r) and the adapter weights split into two compute-dtype halves each
    (2r x in and out x 2r). The 4-bit matmul keeps nothing, as in peft's path.
    """
    T, e, r = s.tokens, s.elem, s.rank
    return e * T * r + e * 2 * r * (lin.in_features + lin.out_features)


def attention_core_saved(spec: ModelSpec, s: StepShape) -> int:
    """What attention keeps between the projections and o_proj.

    SDPA without a mask (transformers passes ``is_causal`` and ``enable_gqa``) runs flash
    attention, which keeps q, k, v (after RoPE), its output and the fp32 log-sum-exp
    (b x a x s). With a mask, transformers first repeats k and v to all heads (``repeat_kv``),
    SDPA turns the boolean mask into an additive one in the compute dtype, and the
    memory-efficient kernel keeps all of those (its log-sum-exp is padded to 32 rows).
    RoPE keeps only cos/sin, which all layers share. Eager attention keeps the fp32 softmax
    output and its compute-dtype copy: two b x a x s x s tensors per layer.
    """
    T, e, b, n = s.tokens, s.elem, s.batch, s.seq
    a, kv, d = spec.num_heads, spec.num_kv_heads, spec.head_dim
    q = e * T * a * d
    out = e * T * a * d
    if s.attn == "eager":
        return q + 2 * e * T * a * d + (4 + e) * b * a * n * n
    if not s.mask:
        return q + 2 * e * T * kv * d + out + 4 * T * a
    kv_saved = 2 * e * T * (a if kv < a else kv) * d
    lse = 4 * b * a * ceil_div(n, 32) * 32
    return q + kv_saved + out + lse + e * b * n * n


def block_saved(spec: ModelSpec, s: StepShape, adapted: list[LinearShape], input_grad: bool = True) -> int:
    """Bytes autograd keeps for one decoder block.

    An op keeps tensors only when one of its inputs needs a gradient, so this follows the
    block in order and tracks which tensors do: the block's input (``input_grad``), and
    everything downstream of an adapter. ``input_grad`` is False for the blocks up to and
    including the lowest adapted one unless the embedding output requires grad (see
    :func:`grad_flow`): the lowest adapted block is then kept only from its first adapter on.
    The same holds for a block recomputed under non-reentrant checkpointing, which runs with
    the requires-grad state of the forward pass.
    """
    T, e, h, i = s.tokens, s.elem, spec.hidden_size, spec.intermediate_size
    names = {lin.name for lin in adapted}

    def group(name: str) -> list[LinearShape]:
        return [lin for lin in spec.block_linears if lin.input_group == name]

    def linears(name: str, x_grad: bool, input_kept: bool = False) -> tuple[int, bool]:
        """(bytes kept by the adapted layers reading this input, whether any output needs grad).

        ``input_kept``: another node keeps this very input anyway (SDPA its output, o_proj's input)."""
        lins = [lin for lin in group(name) if lin.name in names]
        if s.fast_lora:
            # The input itself, in the compute dtype: one tensor for all the layers reading it.
            kept = sum(fast_lora_saved(lin, s, x_grad) for lin in lins)
            if lins and not input_kept:
                kept += e * T * lins[0].in_features
        else:
            kept = sum(lora_saved(lin, s, x_grad) for lin in lins)
            if e == 4 and lins and not s.dropout:
                # In fp32 peft's cast to the adapter dtype is a no-op: the layers reading the
                # same input share one saved tensor (none of their own when it is kept anyway;
                # with dropout each keeps its own dropped copy).
                kept -= (len(lins) - (0 if input_kept else 1)) * 4 * T * lins[0].in_features
        return kept, x_grad or bool(lins)

    if s.liger:
        # The block's input is kept by checkpointing (non-reentrant: the recomputation reads
        # the same tensor); without checkpointing only this norm keeps it. Every other norm's
        # input (the residual sums, o_proj's output) is a tensor of its own.
        norm = _liger_norm_saved(T, h, e, input_alive=False)
        saved = _liger_norm_saved(T, h, e, input_alive=s.checkpointing) if input_grad else 0
    else:
        norm = _norm_saved(T, h)
        # In fp32 the upcast is a no-op: the first norm keeps the block's input itself, which
        # under checkpointing the checkpoint keeps anyway.
        first = norm - (4 * T * h if e == 4 and s.checkpointing else 0)
        saved = first if input_grad else 0
    kept, qkv_grad = linears("attn_in", input_grad)
    saved += kept
    if qkv_grad:
        saved += attention_core_saved(spec, s)
        if len(group("attn_in")) == 1 and not s.mask and s.attn != "eager":
            # Phi-3's fused qkv_proj: flash attention keeps v, a view into the fused output, and
            # with it the whole output (q and k went on as rotated copies).
            saved += e * T * (spec.num_heads + spec.num_kv_heads) * spec.head_dim
        if spec.head_norms and s.liger:  # X is q_proj's / k_proj's output, kept alive by this
            saved += _liger_norm_saved(T * spec.num_heads, spec.head_dim, e, False)
            saved += _liger_norm_saved(T * spec.num_kv_heads, spec.head_dim, e, False)
        elif spec.head_norms:
            saved += _norm_saved(T * spec.num_heads, spec.head_dim) + _norm_saved(T * spec.num_kv_heads, spec.head_dim)
    # SDPA keeps its output (flash and memory-efficient kernels alike), which is o_proj's input;
    # eager attention's output is a transposed copy that nothing else keeps.
    kept, attn_grad = linears("o_in", qkv_grad, input_kept=qkv_grad and s.attn != "eager")
    saved += kept
    extra_norms = spec.norms_per_block - 2  # Gemma 2/3: post-attention and post-feedforward norms
    if attn_grad and extra_norms > 0:
        saved += norm
    mid_grad = input_grad or attn_grad
    if mid_grad:
        saved += norm
    kept, _ = linears("mlp_in", mid_grad)
    saved += kept
    gate_up = group("mlp_in")
    gate_grad = mid_grad or any(lin.name in names and lin.name != "up_proj" for lin in gate_up)
    up_grad = mid_grad or any(lin.name in names and lin.name != "gate_proj" for lin in gate_up)
    if s.liger:
        # LigerSiLUMulFunction (ops/swiglu.py; GeGLU alike) saves both of its inputs, gate's
        # and up's outputs, whenever either needs a gradient (its backward overwrites them
        # with the two gradients). Phi-3's fused gate_up output is split by chunk() and made
        # contiguous first: two copies of the same size.
        saved += 2 * e * T * i if (gate_grad or up_grad) else 0
    else:
        # Gated MLP: act(gate) keeps gate's output; act * up keeps up (for act's gradient) and
        # act (for up's gradient).
        saved += e * T * i * (2 * gate_grad + up_grad)
    kept, down_grad = linears("down_in", gate_grad or up_grad)
    saved += kept
    if down_grad and extra_norms > 1:
        saved += norm
    return saved


def grad_flow(num_layers: int, layers: set[int], input_grads: bool) -> list[tuple[bool, bool]]:
    """For each block: (whether it has adapters, whether its input needs a gradient).

    A block's input needs a gradient when the embedding output does (``input_grads``) or when
    an adapted block lies below it. Blocks where neither holds take no part in the backward
    pass: they keep nothing, and under checkpointing they are not recomputed either.
    """
    flow, grad = [], input_grads
    for i in range(num_layers):
        here = i in layers
        flow.append((here, grad))
        grad = grad or here
    return flow


def blocks_saved(spec: ModelSpec, s: StepShape, adapted: list[LinearShape], layers: set[int]) -> int:
    """What all blocks keep without checkpointing (``layers``: the adapted block indices).

    Without checkpointing nothing makes the embedding output require grad (``s.input_grads``
    is False: transformers calls enable_input_require_grads only when checkpointing is turned
    on), so the blocks before the first adapter keep nothing and the first adapted block only
    what follows its adapters.
    """
    flow = grad_flow(spec.num_layers, layers, s.input_grads)
    return sum(block_saved(spec, s, adapted if here else [], grad) for here, grad in flow)


def checkpointed_blocks(
    spec: ModelSpec, s: StepShape, adapted: list[LinearShape], layers: set[int]
) -> tuple[int, list[int]]:
    """(bytes kept through the whole step, what each recomputed block keeps), with checkpointing.

    Non-reentrant checkpointing keeps each block's input (``e x T x h``) for the blocks that
    take part in the backward pass (an adapter in the block, or an input that needs a
    gradient); in the backward it recomputes those blocks one at a time, from the top, and
    each recomputed block keeps what :func:`block_saved` says for its requires-grad state. The
    blocks below the lowest adapted one keep nothing and are not recomputed unless
    ``s.input_grads`` (see ``CHECKPOINTING_INPUT_GRADS``).
    """
    flow = [(here, grad) for here, grad in grad_flow(spec.num_layers, layers, s.input_grads) if here or grad]
    kept = len(flow) * s.elem * s.tokens * spec.hidden_size
    recomputed = [block_saved(spec, s, adapted if here else [], grad) for here, grad in reversed(flow)]
    return kept, recomputed


def shared_saved(spec: ModelSpec, s: StepShape) -> int:
    """Tensors of one forward pass that all blocks share.

    cos/sin of RoPE (one row of positions, or one per sequence when packed samples pass
    position_ids), the 4-D boolean mask when there is one, and the batch itself on the GPU
    (input_ids, labels, attention_mask or position_ids: int64) plus the shifted labels the
    loss keeps.
    """
    T, e = s.tokens, s.elem
    rows = s.batch if s.packed else 1
    cos_sin = 2 * e * rows * s.seq * spec.head_dim
    mask = s.batch * s.seq * s.seq if s.mask else 0
    batch = 3 * 8 * T + 8 * T
    return cos_sin + mask + batch


def final_saved(spec: ModelSpec, s: StepShape) -> int:
    """The final norm keeps its fp32 input (Liger's: the last block's output itself); lm_head
    (frozen, not adapted) keeps nothing, and neither does liger's fused loss beyond its result."""
    if s.liger:
        return _liger_norm_saved(s.tokens, spec.hidden_size, s.elem, input_alive=False)
    return _norm_saved(s.tokens, spec.hidden_size)


def logits_bytes(spec: ModelSpec, s: StepShape) -> tuple[int, int]:
    """(backward-of-loss peak, forward-of-loss peak), in bytes.

    transformers' ForCausalLMLoss upcasts the full ``T x V`` logits to fp32 and calls
    cross_entropy = log_softmax + nll_loss. Of the loss, the graph keeps only log_softmax's
    fp32 output (4TV; plus the int64 shifted labels, counted with the batch). In the backward,
    nll_loss's gradient (4TV) and log_softmax's input gradient (4TV) exist together with it:
    12 x T x V. The compute-dtype logits are not part of it: lm_head is frozen, so autograd
    does not keep its output, and the trainer takes ``.loss`` and drops the model output
    before ``backward()``, so nothing else holds them either. The forward peak is the
    compute-dtype logits, their fp32 copy and log_softmax's output together.
    """
    TV = s.tokens * spec.vocab_size
    e = s.elem
    softcap = 2 * e * TV if spec.logit_softcap else 0  # logits / cap and tanh's output (kept)
    backward = 12 * TV
    upcast = 0 if e == 4 else 4 * TV
    forward = e * TV + upcast + 4 * TV + softcap
    return backward + softcap, forward


def flce_chunk_rows(tokens: int, hidden: int, vocab: int) -> int:
    """Rows of the logits chunk liger's fused linear + cross-entropy materializes at a time.

    ops/fused_linear_cross_entropy.py: ``inc_factor = cdiv(V, H)`` (chunk_mem_const 1),
    ``chunk_size = min(next_power_of_2(cdiv(BT, inc_factor)), BT)``: about ``BT x H`` logits.
    """
    inc = ceil_div(vocab, hidden)
    rows = ceil_div(tokens, inc)
    return min(1 << (rows - 1).bit_length(), tokens)


def loss_bytes(spec: ModelSpec, s: StepShape) -> tuple[int, int]:
    """(backward-of-loss peak, forward-of-loss peak) above what the blocks and the final norm keep.

    Plain: :func:`logits_bytes`. Liger's fused linear + cross-entropy (LigerForCausalLMLoss ->
    fused_linear_cross_entropy_forward): the logits are never whole. In the forward, next to the
    final norm's output (its input, ``e x T x h``), it allocates ``grad_input = zeros_like``
    (``e x T x h``), the fp32 per-token loss (4T) and the label mask (T), and one buffer for a
    chunk of logits (``e x chunk x V``, reused for every chunk; the cross-entropy kernel writes
    the logits' gradient over it and ``grad_input`` rows are filled by ``mm(out=...)``). lm_head
    is frozen, so no ``grad_weight`` is made. It saves only ``grad_input``; its backward scales
    it in place, and liger's RMSNorm backward writes dX over it: the backward peak is that one
    ``e x T x h`` tensor. Liger's plain cross-entropy (Granite's default) keeps transformers'
    fp32 upcast of the logits and writes the gradient over it: 4TV kept, the bf16 logits (eTV)
    beside it in the forward and the gradient cast back (eTV) in the backward.
    """
    T, h, e = s.tokens, spec.hidden_size, s.elem
    if s.loss == "fused_linear_cross_entropy":
        chunk = flce_chunk_rows(T, h, spec.vocab_size)
        forward = e * T * h + e * T * h + 4 * T + T + e * chunk * spec.vocab_size
        return e * T * h, forward
    if s.loss == "cross_entropy":
        TV = T * spec.vocab_size
        return 4 * TV + e * TV, e * TV + 4 * TV + 4 * T
    return logits_bytes(spec, s)
