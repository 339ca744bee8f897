"""One 4-bit linear layer of a decoder block on a :class:`~qlora_engine.budget.tape.Tape`.

Three ways a layer runs, each replayed in the order its code allocates, saves and frees:

* bitsandbytes' ``MatMul4Bit`` alone (a layer without an adapter): it keeps no tensor for
  the backward (``ctx.tensors`` holds only the frozen packed weight), so its backward reads
  nothing that checkpointing would have to recompute;
* peft's 4-bit LoRA layer (``peft.tuners.lora.bnb.Linear4bit.forward``; ``train.fast_lora``
  off, or the layers it does not cover: LoRA dropout, DoRA, float16): the base output
  cloned, the input cast to the adapters' fp32, both LoRA matmuls and the scaling in fp32,
  cast back and added;
* ``train.fast_lora`` (``qlora_engine.fast_lora``): one autograd function for the LoRA half,
  the adapter weights split into two compute-dtype halves (rank-wide copies), ``x @ A``
  beside the 4-bit matmul and ``addmm_`` adding ``(x @ A) @ B^T`` into the base output in one
  GEMM, in place; in the last LoRA layer of a block the LoRA half first and the base output added
  after, so that under non-reentrant checkpointing the recomputation stops (torch's early
  stop) before that layer's 4-bit matmul.

autograd's generated code saves an op's inputs before the kernel runs (so an early stop at
a save comes before the op's output exists) and keeps only what a needed gradient reads:
``mm`` keeps its first input when the second needs a gradient and the second when the first
does. In the backward, among the nodes that are ready, the newest runs first.
"""

from __future__ import annotations

from qlora_engine.budget.formulas import BLOCKSIZE, StepShape
from qlora_engine.budget.spec import LinearShape, ceil_div
from qlora_engine.budget.tape import Tape


class Linears:
    """The linear layers of a block (mixed into ``timeline._Block``, which sets these)."""

    s: StepShape
    T: int
    e: int
    names: set[str]
    last: str | None
    """The block's last adapted layer on the fast path (its LoRA half runs first); None on peft's."""

    def dequant(self, lin: LinearShape) -> int:
        """bitsandbytes 0.50's 4-bit matmul past 1536 rows on CUDA (``_dequant_linear_fallback``)
        and always on the CPU (``_gemm_4bit_default_impl``), and its backward's
        ``dequantize_4bit``: the weight in the compute dtype and the nested absmax decoded to
        fp32 (twice: before and after adding the offset)."""
        return self.e * lin.numel + 8 * ceil_div(lin.numel, BLOCKSIZE)

    @staticmethod
    def accumulate(t: Tape, into: str | None, g: str | None) -> str | None:
        """A second gradient of the same tensor is added into the first, in place."""
        if into is None:
            return g
        t.free(g)
        return into

    def linear(self, t: Tape, lin: LinearShape, x: str, xg: bool) -> str:
        """The layer's forward from its input ``x`` (``xg``: x needs a gradient); returns its output."""
        if lin.name not in self.names:
            base = t.new(f"{lin.name}.base", self.e * self.T * lin.out_features)
            t.spike(self.dequant(lin))
            return base
        return self._fast(t, lin, x, xg) if self.s.fast_lora else self._peft(t, lin, x, xg)

    def linear_backward(self, t: Tape, lin: LinearShape, g: str, need: bool, last_use: bool = False) -> str | None:
        """The backward of :meth:`linear` from its output's gradient ``g`` (the caller lets it
        go; ``last_use``: nothing else holds it, so it goes as soon as the graph is done with
        it); returns the input's gradient, or None when the input needs none."""
        if lin.name not in self.names:
            return self._base_backward(t, lin, need)
        if self.s.fast_lora:
            return self._fast_backward(t, lin, g, need, last_use)
        return self._peft_backward(t, lin, g, need, last_use)

    def _base_backward(self, t: Tape, lin: LinearShape, need: bool) -> str | None:
        """MatMul4Bit's backward: ``grad @ dequantize_4bit(W)``; it reads no saved tensor."""
        if not need:
            return None
        gb = t.new(f"{lin.name}.gb", self.e * self.T * lin.in_features)
        t.spike(self.dequant(lin))
        return gb

    # -- peft's LoRA layer -------------------------------------------------------------------------

    def _peft(self, t: Tape, lin: LinearShape, x: str, xg: bool) -> str:
        s, T, e = self.s, self.T, self.e
        o, n, p = lin.out_features, lin.in_features, lin.name
        base = t.new(f"{p}.base", e * T * o)
        t.spike(self.dequant(lin))
        res = t.new(f"{p}.res", e * T * o)  # result = result.clone()
        t.free(base)
        x32 = x if e == 4 else t.new(f"{p}.x32", 4 * T * n)  # _cast_input_dtype
        xin = x32
        if s.dropout:
            mask = t.new(f"{p}.mask", s.dropout_mask_bytes * T * n)
            xin = t.new(f"{p}.xd", 4 * T * n)
            if xg:
                t.save(f"{p}.drop", mask)
            t.free(mask, None if x32 == x else x32)
        t.save(f"{p}.lora_A", xin)
        a = t.new(f"{p}.A", 4 * T * s.rank)
        t.save(f"{p}.lora_B", a)
        b = t.new(f"{p}.B", 4 * T * o)
        if s.dora:  # roughly: one more kept fp32 product the size of the output
            t.save(f"{p}.dora", t.new(f"{p}.dora", 4 * T * o))
        sc = t.new(f"{p}.sc", 4 * T * o)  # lora_B(...) * scaling: both fp32 outputs alive here
        t.free(b)
        ob = sc if e == 4 else t.new(f"{p}.ob", e * T * o)  # .to(expected_dtype)
        t.free(sc)
        out = t.new(f"{p}.out", e * T * o)  # result + output
        t.free(res, ob, a, f"{p}.dora", None if xin == x else xin)
        return out

    def _peft_backward(self, t: Tape, lin: LinearShape, g: str, need: bool, last_use: bool) -> str | None:
        s, T, e = self.s, self.T, self.e
        o, n, p = lin.out_features, lin.in_features, lin.name
        gx = None
        # Newer nodes first: the LoRA branch runs before the base matmul.
        g1 = g if e == 4 else t.new(f"{p}.g1", 4 * T * o)  # .to(expected_dtype)'s backward
        if last_use and not need and g1 != g:
            t.free(g)  # the base matmul needs no gradient: only the LoRA branch read it
        g2 = t.new(f"{p}.g2", 4 * T * o)  # * scaling
        t.free(None if g1 == g else g1)
        t.unpack()  # lora_B's MmBackward reads lora_A's output
        ga = t.new(f"{p}.gA", 4 * T * s.rank)
        t.free(g2)
        t.release(f"{p}.lora_B", f"{p}.dora")
        if need:
            gx32 = t.new(f"{p}.gx32", 4 * T * n)
            t.free(ga)
            t.release(f"{p}.lora_A")
            if s.dropout:
                gd = t.new(f"{p}.gd", 4 * T * n)
                t.free(gx32)
                t.release(f"{p}.drop")
                gx32 = gd
            gx = gx32 if e == 4 else t.new(f"{p}.gx", e * T * n)
            t.free(None if gx == gx32 else gx32)
        else:
            t.free(ga)
            t.release(f"{p}.lora_A", f"{p}.drop")
        return self.accumulate(t, gx, self._base_backward(t, lin, need))

    # -- train.fast_lora ---------------------------------------------------------------------------

    def _fast(self, t: Tape, lin: LinearShape, x: str, xg: bool) -> str:
        T, e, o, p = self.T, self.e, lin.out_features, lin.name
        if lin.name == self.last:
            # lora = _LoraProduct(x, ...); base(x) + lora. The product's saves (packed when it
            # returns, its output alive) are the block's last: a recomputation stops there,
            # before the 4-bit matmul.
            lora = self._product(t, lin, x, None)
            base = t.new(f"{p}.base", e * T * o)  # the 4-bit matmul with the LoRA output alive
            t.spike(self.dequant(lin))
            out = t.new(f"{p}.out", e * T * o)  # base + lora
            t.free(lora, base)
            return out
        base = t.new(f"{p}.base", e * T * o)
        t.spike(self.dequant(lin))
        return self._product(t, lin, x, base)  # addmm_ into base (fast_lora.ADD_IN_PLACE): no new output

    def _product(self, t: Tape, lin: LinearShape, x: str, base: str | None) -> str:
        """``fast_lora._LoraProduct``'s forward: the split weights, x @ A, its output; saves on return."""
        T, e, r = self.T, self.e, self.s.rank
        o, n, p = lin.out_features, lin.in_features, lin.name
        a = t.new(f"{p}.a", e * 2 * r * n)  # lora_A split in two halves (their temporaries: rank-wide, left out)
        b32 = t.new(f"{p}.b32", 4 * o * r)  # lora_B * scaling, then split
        b = t.new(f"{p}.b", e * o * 2 * r)
        t.free(b32)
        xa2 = t.new(f"{p}.xa2", e * T * 2 * r)
        xa = t.new(f"{p}.xa", e * T * r)
        twice = t.new(f"{p}.twice", e * T * 2 * r)
        # the product's own output, or the LoRA half added in place into the base output (fresh:
        # the 4-bit matmul's; under torch.compile the op qlora::add_lora_, reinplaced)
        out = t.new(f"{p}.lora", e * T * o) if base is None else base
        t.free(xa2, twice)  # the forward returned; autograd packs what it saved
        t.save(f"{p}.product", x, xa, a, b)
        t.free(xa, a, b)
        return out

    def _fast_backward(self, t: Tape, lin: LinearShape, g: str, need: bool, last_use: bool) -> str | None:
        T, e, r = self.T, self.e, self.s.rank
        n, p = lin.in_features, lin.name
        gx = None
        if lin.name == self.last and need:
            # the sum's backward hands g to both halves; the 4-bit matmul's node is the newest and
            # reads no saved tensor, so its input gradient comes before any recomputation.
            gx = self._base_backward(t, lin, need)
        # _LoraProduct's backward: g @ b, the gradient of x @ A, of x (gxa @ a), of A and B
        # (rank-wide); it hands g on as the base output's gradient, for the 4-bit matmul.
        t.unpack()
        gb = t.new(f"{p}.g_b", e * T * 2 * r)
        gxa = t.new(f"{p}.gxa", e * T * r)
        gl = None
        if need:
            twice = t.new(f"{p}.gtwice", e * T * 2 * r)
            gl = t.new(f"{p}.gx", e * T * n)
            t.free(twice)
        t.free(gb, gxa)
        t.release(f"{p}.product")
        if last_use and (lin.name == self.last or not need):
            t.free(g)  # no other reader is left
        if need:
            gx = self.accumulate(t, gx, gl)
            if lin.name != self.last:
                gx = self.accumulate(t, gx, self._base_backward(t, lin, need))
        return gx
