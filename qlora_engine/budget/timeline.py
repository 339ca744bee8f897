"""The order in which one decoder block allocates and frees: where its peaks are.

``formulas`` says what autograd keeps; the peak of a step also depends on what is alive
for a moment next to it. This module replays one block, tensor by tensor, in the order the
code runs (transformers' Llama decoder layer and SDPA, or Liger Kernel's RMSNorm, RoPE and
SwiGLU; the linear layers, bitsandbytes' MatMul4Bit with peft's LoRA forward or
``train.fast_lora``'s, in ``linears``), on a :class:`Tape` that counts live bytes: its
forward, and its backward, which under non-reentrant checkpointing starts by recomputing the
forward (up to the last tensor the backward needs: torch's early stop) when the first saved
tensor is unpacked.

What the replay found that a sum of saved tensors misses, on peft's LoRA forward
(``train.fast_lora`` off, and every GPU measurement so far): ``lora_B(lora_A(x)) * scaling``
holds lora_B's fp32 output and its scaled copy at once (8 bytes x tokens x out_features),
and for gate_proj/up_proj that is the widest tensor of the block. Under checkpointing the
recomputation of the top block reaches it with the block's saved tensors, the incoming
gradient and lora_B's gradient of down_proj (where the recomputation was triggered) alive:
that moment is the peak of a Liger run (checked on an H200 to 0.01% of the per-token slope;
see CALIBRATION) and of the plain one at small vocabularies.

On ``train.fast_lora``'s forward there are no fp32 temporaries, and down_proj's backward
begins with its 4-bit matmul's input gradient, which reads no saved tensor; the first read
then recomputes the block up to down_proj's ``x @ A``, before its 4-bit matmul. The peak of
a Liger run comes right after: the recomputed block's saved tensors, the incoming gradient
and down_proj's two input gradients (4-bit and LoRA, tokens x intermediate size each) before
they are summed; at long context with chunked MLPs, the attention's backward. On an H200
(Llama-3-8B, 2048 x 4 tokens, Liger) the estimate's peak allocated is the measured one to
0.1%; at 131,072 and 350,000 tokens with offloaded activations and 4,096-token MLP chunks (the
attention's backward), to 0.2%. tests/engine/test_budget.py replays both paths against the
engine's step on the CPU.

Not replayed: the chunked MLP's input gradients, one per chunk, wait for split's backward,
which concatenates them, so for a moment after the last chunk the pieces and their
concatenation (2 x tokens x hidden) are alive where one is counted. In Llama-3-8B's block
that moment stays gigabytes below the attention's backward, which comes after it
(tests/engine/test_budget_liger.py checks a bound at 131k and 350k tokens).

Moments that are never the peak of a Llama-shaped block are modelled more coarsely, and say
so: the plain RMSNorm's backward, RoPE's backward, eager attention.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace

from qlora_engine.budget.formulas import StepShape
from qlora_engine.budget.linears import Linears
from qlora_engine.budget.spec import LinearShape, ModelSpec, ceil_div
from qlora_engine.budget.tape import BlockTrace, EarlyStop, Tape


def _out(lin: LinearShape, adapted: set[str]) -> str:
    return f"{lin.name}.out" if lin.name in adapted else f"{lin.name}.base"


class _Block(Linears):
    """One decoder block's forward and backward on a tape (see the module docstring)."""

    def __init__(self, spec: ModelSpec, s: StepShape, adapted: list[LinearShape], input_grad: bool) -> None:
        self.spec, self.s = spec, s
        self.adapted = adapted
        self.names = {lin.name for lin in adapted}
        self.xg = input_grad
        self.T, self.e = s.tokens, s.elem
        self.group: dict[str, list[LinearShape]] = {}
        for lin in spec.block_linears:
            self.group.setdefault(lin.input_group, []).append(lin)
        self.fused = len(self.group["attn_in"]) == 1
        anyg = {g: any(lin.name in self.names for lin in lins) for g, lins in self.group.items()}
        # Which tensors need a gradient (formulas.block_saved follows the same rules).
        self.qkv_grad = self.xg or anyg.get("attn_in", False)
        self.attn_grad = self.qkv_grad or anyg.get("o_in", False)
        self.mid_grad = self.xg or self.attn_grad
        mlp = self.group["mlp_in"]
        self.gate_grad = self.mid_grad or any(lin.name in self.names and lin.name != "up_proj" for lin in mlp)
        self.up_grad = self.mid_grad or any(lin.name in self.names and lin.name != "gate_proj" for lin in mlp)
        self.down_in_grad = self.gate_grad or self.up_grad
        self.down_out_grad = self.down_in_grad or anyg.get("down_in", False)
        self.extra_norms = spec.norms_per_block - 2
        # fast_lora.enable: the last LoRA layer of the block in module order runs its LoRA half first.
        self.last = adapted[-1].name if s.fast_lora and adapted else None

    # -- pieces ------------------------------------------------------------------------------------

    def norm(self, t: Tape, x: str, rows: int, width: int, need: bool, p: str) -> str:
        e = self.e
        if self.s.liger:
            # LigerRMSNormFunction: Y and RSTD; X (as it came) and RSTD saved.
            y = t.new(f"{p}.y", e * rows * width)
            rs = t.new(f"{p}.rs", 4 * rows)
            if need:
                t.save(p, x, rs)
            t.free(rs)
            return y
        # LlamaRMSNorm: h = x.to(fp32); var = h.pow(2).mean(-1); h = h * rsqrt(var + eps);
        # weight * h.to(dtype). pow and the product save h, the product saves rsqrt's output.
        h32 = x if e == 4 else t.new(f"{p}.h32", 4 * rows * width)
        pw = t.new(f"{p}.pow", 4 * rows * width)
        var = t.new(f"{p}.var", 4 * rows)
        t.free(pw)
        ve = t.new(f"{p}.ve", 4 * rows)
        rs = t.new(f"{p}.rs", 4 * rows)
        t.free(ve)
        if need:
            t.save(p, h32, rs)
        hn = t.new(f"{p}.hn", 4 * rows * width)
        t.free(rs, None if h32 == x else h32)
        hb = hn if e == 4 else t.new(f"{p}.hb", e * rows * width)
        y = t.new(f"{p}.y", e * rows * width)
        t.free(hb, hn, var)
        return y

    def norm_backward(self, t: Tape, gin: str, rows: int, width: int, p: str, shared: bool = False) -> str:
        """The gradient of a norm's input from its output's; ``gin`` is let go unless ``shared``
        (a residual's gradient, still needed: Gemma 2/3's extra norms, which liger therefore
        runs out of place)."""
        t.unpack()
        if self.s.liger and self.s.norm_in_place and not shared:  # dX written over dY
            t.release(p)
            return gin
        if not self.s.liger:
            # Coarse: fp32 gradients of h and of pow's input with their temporaries, about four
            # fp32 copies of the input at once; never the peak of a Llama-shaped block.
            t.spike(16 * rows * width)
        gx = t.new(f"{p}.gx", self.e * rows * width)
        t.release(p)
        if not shared:
            t.free(gin)
        return gx

    # -- forward -----------------------------------------------------------------------------------

    def forward(self, t: Tape, x: str) -> str:
        spec, T, e = self.spec, self.T, self.e
        h, a, kv, d = spec.hidden_size, spec.num_heads, spec.num_kv_heads, spec.head_dim
        y1 = self.norm(t, x, T, h, self.xg, "n1")
        outs = [self.linear(t, lin, y1, self.xg) for lin in self.group["attn_in"]]
        q, k, v = outs * 3 if self.fused else outs  # a fused qkv_proj: three views of one output
        if spec.head_norms:
            q, k = self.norm(t, q, T * a, d, self.qkv_grad, "qn"), self.norm(t, k, T * kv, d, self.qkv_grad, "kn")
            t.free(*outs[:2])  # (liger's norm saved them)
        q0, k0 = q, k
        q, k = self.rope(t, q, k)
        if q != q0 and not self.fused:
            t.free(q0, k0)  # query_states and key_states rebound to the rotated copies
        attn = self.attention(t, q, k, v)
        t.free(q, k, v, q0, k0, *outs)
        [o_lin] = self.group["o_in"]
        o = self.linear(t, o_lin, attn, self.qkv_grad)
        t.free(attn, y1)
        if self.extra_norms > 0:  # Gemma 2/3: post_attention_layernorm of the attention's output
            o, o_in = self.norm(t, o, T, h, self.attn_grad, "n_pa"), o
            t.free(o_in)
        hmid = t.new("hmid", e * T * h)  # residual + attention
        t.free(o)
        y2 = self.norm(t, hmid, T, h, self.mid_grad, "n2")
        if self.s.mlp_chunked:
            m = self.chunked_mlp(t, y2)
            t.free(y2)
        else:
            c = self.mlp(t, y2)
            m = self.linear(t, self.group["down_in"][0], c, self.down_in_grad)
            t.free(c, y2)
        if self.extra_norms > 1:  # Gemma 2/3: post_feedforward_layernorm
            m, m_in = self.norm(t, m, T, h, self.down_out_grad, "n_pf"), m
            t.free(m_in)
        out = t.new("out", e * T * h)
        t.free(m, hmid)
        return out

    def rope(self, t: Tape, q: str, k: str) -> tuple[str, str]:
        spec, T, e = self.spec, self.T, self.e
        sizes = ((q, spec.num_heads), (k, spec.num_kv_heads))
        if self.s.liger:
            if not self.fused:
                return q, k  # rotated in place; keeps only cos/sin, which all layers share
            # views into qkv_proj's output are not contiguous: rope_forward copies them first
            return tuple(t.new(f"{name}.{i}.c", e * T * heads * spec.head_dim) for i, (name, heads) in enumerate(sizes))
        out = []
        for i, (name, heads) in enumerate(sizes):  # q * cos + rotate_half(q) * sin
            size, p = e * T * heads * spec.head_dim, f"{name}.{i}"
            c1 = t.new(f"{p}.cos", size)
            neg = t.new(f"{p}.neg", size // 2)
            cat = t.new(f"{p}.cat", size)
            t.free(neg)
            c2 = t.new(f"{p}.sin", size)
            t.free(cat)
            out.append(t.new(f"{p}.rope", size))
            t.free(c1, c2)
        return out[0], out[1]

    def attention(self, t: Tape, q: str, k: str, v: str) -> str:
        spec, s, T, e = self.spec, self.s, self.T, self.e
        a, kv, d, b, n = spec.num_heads, spec.num_kv_heads, spec.head_dim, s.batch, s.seq
        need = self.qkv_grad
        if s.attn == "eager" or s.mask:
            k2, v2 = k, v
            if kv < a:  # repeat_kv copies k and v to every head
                k2, v2 = t.new("k.rep", e * T * a * d), t.new("v.rep", e * T * a * d)
            if s.attn == "eager":
                w = t.new("attn.scores", e * b * a * n * n)
                p32 = t.new("attn.softmax", 4 * b * a * n * n)
                t.free(w)
                w2 = t.new("attn.probs", e * b * a * n * n)
                o = t.new("attn.o", e * T * a * d)
                if need:
                    t.save("attn", q, k2, v2, p32, w2)
                out = t.new("attn.out", e * T * a * d)  # transpose(1, 2).contiguous()
                t.free(p32, w2, o, k2, v2)
                return out
            # The memory-efficient kernel; SDPA makes the boolean mask additive, in the compute dtype.
            m = t.new("attn.mask", e * b * n * n)
            out = t.new("attn.out", e * T * a * d)
            lse = t.new("attn.lse", 4 * b * a * ceil_div(n, 32) * 32)
            if need:
                t.save("attn", q, k2, v2, out, lse, m)
            t.free(m, lse, k2, v2)
            return out
        # Flash attention (no mask; GQA inside the kernel): the output and the fp32 log-sum-exp.
        out = t.new("attn.out", e * T * a * d)
        lse = t.new("attn.lse", 4 * T * a)
        if need:
            t.save("attn", q, k, v, out, lse)
        t.free(lse)
        return out

    def mlp(self, t: Tape, y2: str) -> str:
        T, e, i = self.T, self.e, self.spec.intermediate_size
        lins = self.group["mlp_in"]
        any_grad = self.gate_grad or self.up_grad
        if len(lins) == 1:  # Phi-3: gate_up_proj, then chunk(2)
            gu = self.linear(t, lins[0], y2, self.mid_grad)
            if self.s.liger:  # ensure_contiguous copies the two halves
                ga, up = t.new("gate.c", e * T * i), t.new("up.c", e * T * i)
                t.free(gu)
                c = t.new("act.c", e * T * i)
                if any_grad:
                    t.save("act", ga, up)
                t.free(ga, up)
                return c
            act = t.new("act.s", e * T * i)  # silu of the gate half (a view keeps gu alive)
            if self.gate_grad:
                t.save("act.silu", gu)
                t.save("act.mul", gu)
            if self.up_grad:
                t.save("act.mul", act)
            c = t.new("act.c", e * T * i)
            t.free(gu, act)
            return c
        gate, up_lin = lins
        if self.s.liger:  # down_proj(LigerSiLUMulFunction(gate_proj(x), up_proj(x)))
            g = self.linear(t, gate, y2, self.mid_grad)
            u = self.linear(t, up_lin, y2, self.mid_grad)
            c = t.new("act.c", e * T * i)
            if any_grad:
                t.save("act", g, u)
            t.free(g, u)
            return c
        # down_proj(act_fn(gate_proj(x)) * up_proj(x)): silu keeps its input, the product both.
        g = self.linear(t, gate, y2, self.mid_grad)
        act = t.new("act.s", e * T * i)
        if self.gate_grad:
            t.save("act.silu", g)
        t.free(g)
        u = self.linear(t, up_lin, y2, self.mid_grad)
        if self.gate_grad:
            t.save("act.mul", u)
        if self.up_grad:
            t.save("act.mul", act)
        c = t.new("act.c", e * T * i)
        t.free(act, u)
        return c

    def chunk_block(self) -> _Block:
        """This block at the size of one MLP chunk (the same rows of every sequence in the batch)."""
        return _Block(self.spec, replace(self.s, seq=self.s.mlp_chunk, mlp_chunk=None), self.adapted, self.xg)

    def chunked_mlp(self, t: Tape, y2: str) -> str:
        """The MLP chunk by chunk: one chunk's gate, up, activation and down projection live at a
        time (what they would save is dropped by the chunk's checkpoint: counted as a spike
        anyway, a little high); the output is whole, and only the input is kept."""
        sub, ct = self.chunk_block(), Tape()
        c = sub.mlp(ct, ct.external("y2"))
        sub.linear(ct, sub.group["down_in"][0], c, sub.down_in_grad)
        t.spike(ct.peak)
        m = t.new("m.chunked", self.e * self.T * self.spec.hidden_size)
        if self.down_out_grad:
            t.save("mlp.chunks", y2)
        return m

    def chunked_mlp_backward(self, t: Tape, gm: str) -> str | None:
        """Each chunk differentiated in turn (its peak a spike): the chunk's checkpoint recomputes
        it when its backward first reads a saved tensor, up to the last one it saved; the
        input's gradient is whole (None when it needs none)."""
        t.unpack()
        sub, ct = self.chunk_block(), Tape()
        down = sub.group["down_in"][0]

        def forward(tape: Tape) -> None:
            sub.linear(tape, down, sub.mlp(tape, tape.external("y2")), sub.down_in_grad)

        g = ct.new("g", self.e * sub.T * self.spec.hidden_size)
        _recompute_on_unpack(ct, forward)
        gc = sub.linear_backward(ct, down, g, sub.down_in_grad)
        ct.free(g)
        sub.mlp_backward(ct, gc)
        t.spike(ct.peak)
        gy2 = t.new("g.y2", self.e * self.T * self.spec.hidden_size) if self.mid_grad else None
        t.release("mlp.chunks")
        return gy2

    # -- backward ----------------------------------------------------------------------------------

    def backward(self, t: Tape, g: str) -> str | None:
        """From the gradient of the block's output to its input's (None when not needed)."""
        T, e, h = self.T, self.e, self.spec.hidden_size
        # out = hmid + mlp: one gradient for both; the residual's part waits in its buffer.
        gm = g
        if self.extra_norms > 1 and self.down_out_grad:
            gm = self.norm_backward(t, g, T, h, "n_pf", shared=True)
        down = self.group["down_in"][0]
        chunked = self.s.mlp_chunked and self.down_out_grad
        if chunked:  # down_proj's backward and the rest of the MLP's, chunk by chunk
            gy2 = self.chunked_mlp_backward(t, gm)
        else:
            # down_proj is the last reader of gm when the residual needs no gradient (or gm is
            # the extra norm's gradient of its output).
            last = gm != g or not self.mid_grad
            gc = self.linear_backward(t, down, gm, self.down_in_grad, last_use=last) if self.down_out_grad else None
        t.free(None if gm == g else gm)
        if not self.mid_grad:  # the residual needs no gradient: only the MLP's branch read it
            t.free(g)
        if not chunked:
            gy2 = self.mlp_backward(t, gc)
        if gy2 is not None:
            g = self.accumulate(t, g, self.norm_backward(t, gy2, T, h, "n2"))
        go = g
        if self.extra_norms > 0 and self.attn_grad:
            go = self.norm_backward(t, g, T, h, "n_pa", shared=True)
        [o_lin] = self.group["o_in"]
        gattn = self.linear_backward(t, o_lin, go, self.qkv_grad) if self.attn_grad else None
        t.free(None if go == g else go)
        if not self.xg:  # nor does the block's input
            t.free(g)
        gy1 = None
        if gattn is not None and self.qkv_grad:
            grads = self.attention_backward(t, gattn)
            lins = self.group["attn_in"]
            if self.fused:
                gqkv = t.new("g.qkv", e * T * lins[0].out_features)  # cat of the three
                t.free(*grads)
                grads = [gqkv]
            for lin, gl in zip(reversed(lins), reversed(grads), strict=True):
                gy1 = self.accumulate(t, gy1, self.linear_backward(t, lin, gl, self.xg, last_use=True))
                t.free(gl)
        if not self.xg:
            t.free(g, gy1)
            return None
        gx = self.norm_backward(t, gy1, T, h, "n1") if gy1 is not None else None
        return self.accumulate(t, g, gx)

    def mlp_backward(self, t: Tape, gc: str | None) -> str | None:
        T, e, i = self.T, self.e, self.spec.intermediate_size
        if gc is None:
            return None
        lins = self.group["mlp_in"]
        t.unpack()
        if len(lins) == 1:  # Phi-3: the two halves' gradients are joined into one tensor
            if self.s.liger:
                t.hold("gate.c")
                t.hold("up.c")
                t.release("act")
                t.free(gc)
                ggu = t.new("g.gu", 2 * e * T * i)
                t.free("gate.c", "up.c")
            else:
                gs, gu = t.new("g.act", e * T * i), t.new("g.up", e * T * i)
                t.free(gc)
                t.release("act.mul")
                gg = t.new("g.gate", e * T * i)
                t.free(gs)
                t.release("act.silu")
                ggu = t.new("g.gu", 2 * e * T * i)
                t.free(gg, gu)
            gy2 = self.linear_backward(t, lins[0], ggu, self.mid_grad, last_use=True)
            t.free(ggu)
            return gy2
        gate, up_lin = lins
        gate_out, up_out = _out(gate, self.names), _out(up_lin, self.names)
        if self.s.liger:  # the kernel writes d(gate) and d(up) over the saved gate and up outputs
            t.hold(gate_out)
            t.hold(up_out)
            t.release("act")
            t.free(gc)
            gg = gate_out if self.gate_grad else None
            gu = up_out if self.up_grad else None
            t.free(None if self.gate_grad else gate_out, None if self.up_grad else up_out)
        else:
            gs = t.new("g.act", e * T * i) if self.gate_grad else None  # dc * up
            gu = t.new("g.up", e * T * i) if self.up_grad else None  # dc * act
            t.free(gc)
            t.release("act.mul")
            gg = None
        gy2 = None
        # up_proj's nodes are newer than silu's: up first, then the activation and gate.
        if gu is not None:
            gy2 = self.accumulate(t, gy2, self.linear_backward(t, up_lin, gu, self.mid_grad, last_use=True))
            t.free(gu)
        if not self.s.liger and gs is not None:
            gg = t.new("g.gate", e * T * i)
            t.free(gs)
            t.release("act.silu")
        if gg is not None:
            gy2 = self.accumulate(t, gy2, self.linear_backward(t, gate, gg, self.mid_grad, last_use=True))
            t.free(gg)
        return gy2

    def attention_backward(self, t: Tape, gattn: str) -> list[str]:
        spec, s, T, e = self.spec, self.s, self.T, self.e
        a, kv, d = spec.num_heads, spec.num_kv_heads, spec.head_dim
        t.unpack()
        gq = t.new("g.q", e * T * a * d)
        if s.attn == "eager" or s.mask or kv == a:
            gk, gv = t.new("g.k", e * T * a * d), t.new("g.v", e * T * a * d)
            t.spike(4 * T * a * d)  # fp32 accumulation; eager and memory-efficient, about as much
            if kv < a:  # back through repeat_kv
                gk2, gv2 = t.new("g.k2", e * T * kv * d), t.new("g.v2", e * T * kv * d)
                t.free(gk, gv)
                gk, gv = gk2, gv2
        else:
            # FlashAttention-2's mha_bwd with GQA: dk/dv for every head, summed per group after;
            # dq accumulated in fp32, and softmax_d.
            gk, gv = t.new("g.k", e * T * kv * d), t.new("g.v", e * T * kv * d)
            gke, gve = t.new("g.k.exp", e * T * a * d), t.new("g.v.exp", e * T * a * d)
            t.spike(4 * T * a * d + 4 * T * a)
            t.free(gke, gve)
        t.release("attn")
        t.free(gattn)
        if not s.liger:  # back through RoPE: about two temporaries the size of each gradient
            t.spike(2 * e * T * a * d)
        if spec.head_norms:
            gq = self.norm_backward(t, gq, T * a, d, "qn")
            gk = self.norm_backward(t, gk, T * kv, d, "kn")
        return [gq, gk, gv]


def _recompute_on_unpack(t: Tape, forward: Callable[[Tape], object]) -> Tape:
    """Non-reentrant checkpointing on ``t``: the backward's first read of a saved tensor replays
    ``forward`` (which takes its input as an external tensor) up to the last tensor it saves
    (torch's early stop); what the replay's frames hold is let go, what it saved stays.
    Returns the dry run of ``forward`` that counted those saves."""
    dry = Tape()
    forward(dry)

    def recompute() -> None:
        before = set(t.frame)
        t.stop_after, t.saves = dry.saves, 0
        try:
            forward(t)
        except EarlyStop:
            pass
        t.stop_after = None
        t.free(*(n for n in list(t.frame) if n not in before))

    t.on_unpack = recompute
    return dry


def _trace(spec: ModelSpec, s: StepShape, adapted: list[LinearShape], input_grad: bool) -> BlockTrace:
    blk = _Block(spec, s, adapted, input_grad)
    g_bytes = s.elem * s.tokens * spec.hidden_size
    if s.checkpointing:
        t = Tape()
        t.external("x")  # the checkpoint keeps the block's input
        g = t.new("g", g_bytes)
        dry = _recompute_on_unpack(t, lambda tape: blk.forward(tape, tape.external("x")))
        blk.backward(t, g)
        return BlockTrace(saved=dry.saved_bytes, forward_peak=0, backward_peak=t.peak)
    t = Tape()
    t.new("x", g_bytes)  # the caller's hidden_states
    out = blk.forward(t, "x")
    forward_peak = t.peak
    t.free("x", out)  # the next block holds its input; this one keeps it only if it saved it
    saved = t.saved_bytes
    t.peak = t.level
    blk.backward(t, t.new("g", g_bytes))
    return BlockTrace(saved=saved, forward_peak=forward_peak, backward_peak=t.peak)


def final_norm_peak(spec: ModelSpec, s: StepShape) -> int:
    """The peak of the model's final norm over the last block's output (counted): the plain
    RMSNorm's fp32 temporaries, or Liger's output. Never a peak of the step (the logits come
    right after and are larger), but the last moment of the blocks' forward."""
    t = Tape()
    _Block(spec, s, [], False).norm(t, t.new("x", s.elem * s.tokens * spec.hidden_size), s.tokens,
                                     spec.hidden_size, True, "final")  # fmt: skip
    return t.peak


_CACHE: dict[tuple, BlockTrace] = {}


def block_trace(spec: ModelSpec, s: StepShape, adapted: list[LinearShape], input_grad: bool) -> BlockTrace:
    """The :class:`BlockTrace` of one block (cached: an estimate asks for a few kinds of block,
    and the fit search asks for many estimates)."""
    shape = (spec.hidden_size, spec.num_heads, spec.num_kv_heads, spec.head_dim, spec.intermediate_size,
             spec.block_linears, spec.norms_per_block, spec.head_norms)  # fmt: skip
    key = (shape, s, tuple(adapted), input_grad)
    hit = _CACHE.get(key)
    if hit is None:
        if len(_CACHE) > 1024:
            _CACHE.clear()
        hit = _CACHE[key] = _trace(spec, s, adapted, input_grad)
    return hit
