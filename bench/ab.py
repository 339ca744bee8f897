"""Engine switches side by side in one process, one model load: what each change buys, unprofiled.

    python bench/ab.py [--shape llama3-8b] [--seq 2048] [--steps 8] [--only A,B] [--set train.kernels=none]

Loads the engine's Trainer once (every layer checkpointed, the standard case) and times the
training step (the trainer's own ``_forward_backward``, gradient clipping, optimizer and
scheduler step, as ``Trainer.train`` runs them) under each setting of the switches:
``optim.FLAT`` (one flat buffer, one optimizer launch), ``fast_lora.LEAN_4BIT`` (bitsandbytes'
dequantization kernels called directly), ``varlen.VARLEN`` (packed rows without a mask), at
micro-batch 1 and 4, fixed-length and packed rows, with and without checkpointing, and each
decoder block through ``torch.compile`` (``fast_lora.compile_blocks``; the ``mbs1-compiled-*``
settings, each with what the compiler made of it: graphs, breaks, skipped CUDA graphs). Every
setting runs ``--steps`` steps after 2 warm-up steps; the median step counts; the first setting
runs again last, to show the drift. Also checks that the direct dequantization is bit-identical
to bitsandbytes' own (and the compiled path's op to the eager matmul) and that packed rows give the same loss under SDPA's mask and varlen attention.
Prints one JSON line per setting; writes ``bench/results/<date>-<card>-ab-<shape>-<HHMM>.json``
(and to $OUT when set). Peak memory is only meaningful in ``bench/speed.py`` (a process per case).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))


def main() -> None:
    import torch
    from speed import build_trainer, prepare_checkpoint, varlen_samples, versions

    from qlora_engine import fast_lora, optim, varlen
    from qlora_engine.data import collate, count_tokens
    from qlora_engine.data.store import SampleBuilder, pack

    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", default="llama3-8b")
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument(
        "--only", default="", help="comma-separated setting names (and 'profile') to run (default: all but autotune)"
    )
    ap.add_argument("--set", action="append", default=[], help="a config override for the trainer (train.kernels=none)")
    ap.add_argument("--model", help="a model folder instead of the shape's random checkpoint (a CPU smoke test)")
    args = ap.parse_args()
    settings = [
        # name, flat, lean, attention, mbs, rows, checkpointing, torch.compile mode of each block (None: eager)
        ("mbs4-new", True, True, "sdpa", 4, "fixed", True, None),
        ("mbs4-old", False, False, "sdpa", 4, "fixed", True, None),
        ("mbs1-new", True, True, "sdpa", 1, "fixed", True, None),
        ("mbs1-old", False, False, "sdpa", 1, "fixed", True, None),
        ("mbs1-flat-only", True, False, "sdpa", 1, "fixed", True, None),
        ("mbs1-lean-only", False, True, "sdpa", 1, "fixed", True, None),
        ("mbs4-packed-sdpa", True, True, "sdpa", 4, "packed", True, None),
        ("mbs4-packed-varlen", True, True, "varlen", 4, "packed", True, None),
        ("mbs4-new-no-checkpointing", True, True, "sdpa", 4, "fixed", False, None),
        ("mbs4-packed-varlen-no-checkpointing", True, True, "varlen", 4, "packed", False, None),
        ("mbs4-new-again", True, True, "sdpa", 4, "fixed", True, None),
        # each decoder block through torch.compile (fast_lora.compile_blocks: launches fused; a
        # checkpointed block's checkpoint compiled with it), micro-batch 1 where host work bounds the
        # step: bitsandbytes' own registered ops (a graph break per projection), the frozen 4-bit
        # matmul as one op (qlora::frozen4bit_linear: one graph a block), that with CUDA graphs (one
        # replay a block and pass), and with autotuned kernels instead (a long compile: not in 'all')
        ("mbs1-compiled-bnb-ops", True, False, "sdpa", 1, "fixed", True, "default"),
        ("mbs1-compiled-op", True, True, "sdpa", 1, "fixed", True, "default"),
        ("mbs1-compiled-op-graphs", True, True, "sdpa", 1, "fixed", True, "reduce-overhead"),
        ("mbs1-compiled-op-autotune", True, True, "sdpa", 1, "fixed", True, "max-autotune-no-cudagraphs"),
        ("mbs4-compiled-op", True, True, "sdpa", 4, "fixed", True, "default"),
        ("mbs4-compiled-op-graphs", True, True, "sdpa", 4, "fixed", True, "reduce-overhead"),
        # torch's default hint inside the compiled checkpoint (prefer recompute) instead of must-recompute:
        # session 9's 38.9 GiB at micro-batch 4 (run it alone: its peak is then its own)
        ("mbs4-compiled-op-prefer", True, True, "sdpa", 4, "fixed", True, "default"),
    ]
    only = set(filter(None, args.only.split(",")))
    unknown = only - {s[0] for s in settings} - {"profile"}
    if unknown:
        raise SystemExit(f"unknown setting(s) {sorted(unknown)}; known: {[s[0] for s in settings]} and profile")
    if not only:
        only = {s[0] for s in settings if s[0] != "mbs1-compiled-op-autotune"} | {"profile"}
    path = args.model or f"/tmp/ckpt-{args.shape}"
    if not args.model:
        prepare_checkpoint(args.shape, path)
    cuda = torch.cuda.is_available()

    def sync() -> None:
        if cuda:
            torch.cuda.synchronize()

    seq = args.seq
    trainer, _, cfg = build_trainer(path, seq, 4, 1, args.set, warmup=0)
    model, pad = trainer.model, trainer.tokenizer.pad_token_id
    vocab = model.config.vocab_size
    card = torch.cuda.get_device_name(0) if cuda else "cpu"
    out: dict = dict(
        date=datetime.date.today().isoformat(),
        card=card,
        shape=args.shape,
        seq=seq,
        versions=versions(),
        checkpointed_layers=trainer.checkpointed,
        kernels=trainer.kernels,
        overrides=args.set,
        results=[],
    )
    fname = f"{out['date']}-{card.replace(' ', '-')}-ab-{args.shape}-{datetime.datetime.now().strftime('%H%M')}.json"

    def save() -> None:  # after every setting: a later crash (a broken CUDA context) keeps what was measured
        for folder in filter(None, [HERE / "results", Path(os.environ["OUT"]) if os.environ.get("OUT") else None]):
            folder.mkdir(parents=True, exist_ok=True)
            (folder / fname).write_text(json.dumps(out, indent=1))

    try:
        from torch.nn.attention.varlen import varlen_attn  # noqa: F401

        out["torch_varlen_attn"] = True
    except ImportError:
        out["torch_varlen_attn"] = False  # varlen.py falls back to SDPA sample by sample
    # 1. The direct dequantization is bitsandbytes' own, bit for bit.
    import bitsandbytes.functional as bnbf

    bases = [m.base_layer for m in model.modules() if hasattr(m, "base_layer") and hasattr(m, "lora_A")][:14]
    out["dequant_bit_identical"] = all(
        torch.equal(fast_lora.dequantize(b.weight), bnbf.dequantize_4bit(b.weight, b.weight.quant_state)) for b in bases
    )

    # ... and the op a compiled block runs for each frozen 4-bit matmul is the eager matmul, forward and backward.
    def op_vs_eager(base) -> bool:
        dt = base.compute_dtype
        x = torch.randn(3, base.in_features, device=base.weight.device, dtype=dt, requires_grad=True)
        x2 = x.detach().clone().requires_grad_()
        y = fast_lora.frozen4bit_linear(x, base.bias, *fast_lora.quant_parts(base.weight))
        y2 = fast_lora._Frozen4bit.apply(x2, base)
        y.backward(torch.ones_like(y))
        y2.backward(torch.ones_like(y2))
        return torch.equal(y, y2) and torch.equal(x.grad, x2.grad)

    try:  # a failure here is the compiled settings' to report; the eager ones still run
        out["op_bit_identical"] = all(op_vs_eager(b) for b in bases)
    except Exception as e:
        out["op_bit_identical"] = f"{type(e).__name__}: {str(e)[:300]}"

    gen = torch.Generator().manual_seed(0)
    # Every setting starts from the same LoRA weights and draws the same batches, so its first
    # loss (before any update) checks its arithmetic against the others' (compiled against eager).
    initial = [p.detach().clone() for p in trainer.params]

    def fixed(mbs: int) -> dict:
        ids = torch.randint(0, vocab, (mbs, seq), generator=gen)
        return {"input_ids": ids, "labels": ids.clone(), "attention_mask": torch.ones_like(ids)}

    rows = varlen_samples(vocab, seq, 400)
    builder = SampleBuilder()
    for ids in rows:
        builder.add(ids, [True] * len(ids))
    packed_rows = list(pack(builder.build(), seq))

    def packed(mbs: int, k: int) -> dict:
        return collate([packed_rows[(k * mbs + i) % len(packed_rows)] for i in range(mbs)], pad)

    def set_opt(flat: bool) -> None:
        optim.FLAT = flat
        trainer.optimizer = optim.build_optimizer(cfg.optim, trainer.params)
        trainer.scheduler = optim.build_scheduler(cfg.optim, trainer.optimizer, 10_000)

    def set_attn(name: str) -> None:
        model.get_base_model().set_attn_implementation(varlen.register() if name == "varlen" else name)

    blocks = [m for m in model.modules() if type(m).__name__.endswith("DecoderLayer")]

    def set_ckpt(on: bool) -> None:
        for b in blocks:
            b.gradient_checkpointing = on

    def one_step(batch: dict) -> tuple[float, float, int]:
        sync()
        t = time.perf_counter()
        n_labels = int((batch["labels"][:, 1:] != -100).sum())
        loss = trainer._forward_backward([batch], n_labels)
        torch.nn.utils.clip_grad_norm_(trainer.params, 1.0)
        loss = float(loss)
        trainer.optimizer.step()
        trainer.scheduler.step()
        trainer.optimizer.zero_grad(set_to_none=True)
        sync()
        return time.perf_counter() - t, loss, count_tokens(batch, pad)

    from torch._dynamo.utils import counters

    for name, flat, lean, attn, mbs, kind, ckpt, mode in settings:
        if name not in only:
            continue
        set_opt(flat)
        with torch.no_grad():
            for p, p0 in zip(trainer.params, initial, strict=True):
                p.copy_(p0)
        gen.manual_seed(0)
        fast_lora.LEAN_4BIT = lean
        fast_lora.MUST_RECOMPUTE = not name.endswith("-prefer")
        set_attn(attn)
        set_ckpt(ckpt)
        torch._dynamo.reset()
        counters.clear()
        if cuda:  # each setting's own peak (results up to session 9 hold the running peak of the process)
            torch.cuda.reset_peak_memory_stats()
        undo = None
        times, toks, losses, warm = [], [], [], []
        first_loss = None
        try:
            if mode is not None:
                undo = fast_lora.compile_blocks(model, mode=mode, dynamic=False)
            for k in range(2 + args.steps):
                batch = fixed(mbs) if kind == "fixed" else packed(mbs, k)
                if mode == "reduce-overhead":
                    torch.compiler.cudagraph_mark_step_begin()  # a new step: the last step's graph outputs are done
                dt, loss, n = one_step(batch)
                first_loss = loss if first_loss is None else first_loss
                if k < 2:
                    warm.append(round(dt, 2))
                else:
                    times.append(dt)
                    toks.append(n)
                    losses.append(loss)
            order = sorted(range(len(times)), key=lambda i: times[i])
            mid = order[len(order) // 2]
            res = dict(
                name=name,
                flat=flat,
                lean=lean,
                attention=attn,
                mbs=mbs,
                rows=kind,
                checkpointing=ckpt,
                step_s=round(times[mid], 4),
                tok_s=round(toks[mid] / times[mid]),
                tok_s_total=round(sum(toks) / sum(times)),
                steps=[round(t, 4) for t in times],
                warmup_s=warm,
                loss=round(losses[-1], 4),
                first_loss=first_loss,
                peak_alloc_gib=round(torch.cuda.max_memory_allocated() / 2**30, 2) if cuda else None,
            )
        except Exception as e:  # one setting failing must not lose the others
            res = dict(name=name, error=f"{type(e).__name__}: {str(e)[:300]}")
            trainer.optimizer.zero_grad(set_to_none=True)
            if cuda:
                torch.cuda.empty_cache()
        finally:
            if undo is not None:
                undo()
        if mode is not None:  # what the compiler made of the blocks (a break or a skipped CUDA graph is host work back)
            res["compile"] = dict(
                mode=mode,
                graphs=counters["stats"]["unique_graphs"],
                graph_breaks=sum(counters["graph_break"].values()),
                break_reasons=[r[:200] for r in list(counters["graph_break"])[:3]],
                cudagraph_skips=counters["inductor"]["cudagraph_skips"],
            )
        print(json.dumps(res), flush=True)
        out["results"].append(res)
        save()

    # 2b. Where a micro-batch-1 step goes now (profiled: the waits are a map of host work, not of lost time).
    if cuda and "profile" in only:
        from profile_step import summarize
        from torch.profiler import ProfilerActivity, profile

        set_opt(True)
        fast_lora.LEAN_4BIT = True
        set_attn("sdpa")
        set_ckpt(True)
        for _ in range(2):
            one_step(fixed(1))
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            t0 = time.perf_counter()
            for _ in range(2):
                one_step(fixed(1))
            wall = time.perf_counter() - t0
        kernels = [
            (e.name, e.time_range.start, e.time_range.end)
            for e in prof.events()
            if e.device_type == torch.autograd.DeviceType.CUDA and not e.name.startswith("ProfilerStep")
        ]
        prof_res = summarize(kernels, 2, wall)
        prof_res.pop("top", None)
        out["profile_mbs1_new"] = prof_res
        print(json.dumps({"profile_mbs1_new": prof_res}), flush=True)

    # 3. Packed rows: the same loss under SDPA's mask and varlen attention (no gradients: a forward each).
    set_ckpt(True)
    batch = {k: v.to(trainer.device) for k, v in packed(4, 0).items()}
    fast_lora.LEAN_4BIT = True
    losses = {}
    for attn in ("sdpa", "varlen"):
        set_attn(attn)
        with torch.no_grad():
            losses[attn] = float(model(**batch, use_cache=False).loss)
    out["packed_loss_sdpa_vs_varlen"] = losses
    print(
        json.dumps(
            {
                "dequant_bit_identical": out["dequant_bit_identical"],
                "op_bit_identical": out["op_bit_identical"],
                "packed_loss": losses,
                "torch_varlen_attn": out["torch_varlen_attn"],
            }
        ),
        flush=True,
    )

    save()


if __name__ == "__main__":
    main()
