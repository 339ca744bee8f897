"""A 70B shape on one GPU (issue 21, goal 4): train at 2048 x 1, then find the longest context that fits.

    python bench/big_shape.py [--shape llama3-70b] [--steps 3] [--warmup 1] [--search-s 240]

No checkpoint is written (a 70B one is ~140 GB; the GPU machine has 64 GiB of disk): the
model folder holds config.json and a tokenizer, and the weights are drawn on the GPU one
tensor at a time as the engine's own loader asks for them (``bench/random_weights.py`` through
``models.load_quantized_model(weights=...)``): transformers quantizes each to NF4 before it
draws the next, as it does with a real checkpoint's tensors.

1. The engine's Trainer (``speed.build_trainer``: the standard settings, r=16 on all linear
   layers, paged AdamW 8-bit, every layer checkpointed) trains ``--warmup`` + ``--steps`` steps
   at 2048 x 1; tokens/s (median of the measured steps) and peak memory, next to the budget's
   estimate for the same config on this card.
2. The longest context, in the same process (a fresh load is ~a minute): for each mode (every
   layer checkpointed; then with the inputs offloaded to host RAM and 4096-token MLP chunks,
   capped at what 70% of the host's available RAM holds), one
   step at 2048 tokens, doubling while it fits, then bisecting down to ``--resolution`` tokens,
   each try after ``empty_cache`` so its peak is its own. A try that runs out of memory is cleaned
   up (gradients dropped, cache emptied) before the next; the search stops at ``--search-s``.
   Next to each: the budget's estimate at that length and its own longest context (``fit``).

Prints one JSON line per measurement; writes ``bench/results/<date>-<card>-big-shape-<shape>-<HHMM>.json``
(also to $OUT when set). ``--shape tiny`` runs the same code on the CPU in seconds (the test).
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

import random_weights  # noqa: E402

SHAPES = {
    "llama3-70b": random_weights.LLAMA3_70B,
    "tiny": dict(
        random_weights.LLAMA3_70B,
        vocab_size=384,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
    ),
}
MODES = {  # name -> the overrides that set it up; the budget's sharpest check first
    "checkpointing": [],
    "offload+mlp4096": ["train.offload_activations=true", "train.mlp_chunk_tokens=4096"],
}
GiB = 2**30


def gib(n: float | None) -> float | None:
    return None if n is None else round(n / GiB, 2)


def budget_at(cfg: Any, seq: int, card: int | None, mode: list[str]) -> dict:
    """The budget's estimate for ``cfg`` in ``mode`` at ``seq`` x 1 on ``card`` bytes."""
    from qlora_engine import budget
    from qlora_engine.config import apply_overrides

    try:
        c = apply_overrides(cfg, [*mode, f"data.max_length={seq}"])
        e = budget.estimate(c, data_stats={"max": seq, "p95": seq, "median": seq}, gpu_bytes=card)
        return {"total_gib": gib(e.total), "low_gib": gib(e.low), "high_gib": gib(e.high),
                "torch_reserved_gib": gib(e.torch_reserved), "fits": e.fits}  # fmt: skip
    except Exception as ex:  # the budget is what is checked here, not a reason to stop
        return {"error": f"{type(ex).__name__}: {ex}"[:200]}


def host_cap(cfg: Any, mode: list[str], share: float = 0.7) -> int | None:
    """The longest context whose offloaded layer inputs fit ``share`` of the host's available RAM
    (the GPU machine has 128 GiB; a 70B shape offloads 80 x 8192 x 2 bytes a token): None
    without offloading. Past it the search would swap or be killed, not learn about the GPU."""
    if "train.offload_activations=true" not in mode:
        return None
    from qlora_engine import budget
    from qlora_engine.config import apply_overrides

    try:
        meminfo = Path("/proc/meminfo").read_text().splitlines()
        avail = next(int(ln.split()[1]) * 1024 for ln in meminfo if ln.startswith("MemAvailable:"))
        seq = 4096
        e = budget.estimate(apply_overrides(cfg, [*mode, f"data.max_length={seq}"]), data_stats={"max": seq, "p95": seq, "median": seq})
        per_token = e.details.get("host_activation_bytes", 0) / seq
        return int(share * avail / per_token) if per_token else None
    except Exception:
        return None


def budget_longest(cfg: Any, card: int | None, mode: list[str]) -> int | None:
    from qlora_engine.budget import fit
    from qlora_engine.config import apply_overrides

    if card is None:
        return None
    try:
        return fit(apply_overrides(cfg, [*mode, f"data.max_length={cfg.data.max_length}"]), card).max_sequence_length
    except Exception:
        return None


class Searcher:
    """One training step at a given length on the loaded trainer, out-of-memory caught and cleaned up."""

    def __init__(self, trainer: Any, deadline: float) -> None:
        import torch

        self.trainer, self.deadline, self.torch = trainer, deadline, torch
        self.cuda = torch.cuda.is_available()
        self.vocab = trainer.model.config.vocab_size
        self.last: tuple[int, float] | None = None  # (length, seconds) of the last try that ran

    def set_mode(self, mode: list[str]) -> None:
        from qlora_engine import models

        offload = "train.offload_activations=true" in mode and self.cuda
        models.enable_gradient_checkpointing(self.trainer.model, None, offload=offload)
        blocks = [m for m in self.trainer.model.modules() if hasattr(m, "mlp") and hasattr(m, "self_attn")]
        for b in blocks:  # undo an earlier mode's tiling (tile_mlps sets an instance attribute)
            b.mlp.__dict__.pop("forward", None)
        chunk = next((int(o.split("=")[1]) for o in mode if o.startswith("train.mlp_chunk_tokens=")), None)
        if chunk:
            models.tile_mlps(self.trainer.model, chunk)

    def would_overrun(self, seq: int) -> bool:
        """Whether a try at ``seq`` would end past the deadline (steps grow a little faster than linearly)."""
        if self.last is None:
            return time.monotonic() > self.deadline
        n, s = self.last
        return time.monotonic() + s * (seq / n) ** 1.3 > self.deadline

    def step(self, seq: int) -> dict:
        torch, t = self.torch, self.trainer
        if self.cuda:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
            torch.cuda.synchronize()
        ids = torch.randint(0, self.vocab, (1, seq))
        batch = {"input_ids": ids, "labels": ids.clone(), "attention_mask": torch.ones_like(ids)}
        t0 = time.perf_counter()
        oom = None
        try:
            loss = t._forward_backward([batch], seq - 1)
            torch.nn.utils.clip_grad_norm_(t.params, 1.0)
            loss = float(loss)
            t.optimizer.step()
            if self.cuda:
                torch.cuda.synchronize()
        except torch.OutOfMemoryError as e:
            oom = str(e).split("\n")[0][:160]
        dt = time.perf_counter() - t0
        t.optimizer.zero_grad(set_to_none=True)
        res = {"seq": seq, "fits": oom is None, "seconds": round(dt, 2)}
        if oom is None:
            self.last = (seq, dt)
            res.update(tok_s=round(seq / dt), loss=round(loss, 3))
        else:
            res["error"] = oom
            gc.collect()  # the failed step's graph (and its offloaded host copies) go before the next try
        if self.cuda:
            res.update(peak_alloc_gib=gib(torch.cuda.max_memory_allocated()),
                       peak_reserved_gib=gib(torch.cuda.max_memory_reserved()))  # fmt: skip
            torch.cuda.empty_cache()
        return res

    def search(self, start: int, resolution: int, cap: int, on_try: Any) -> dict:
        """Doubling from ``start`` while it fits, then bisecting; returns the bracket found."""
        fits, fails, tries = 0, None, []

        def run(seq: int) -> bool | None:
            if self.would_overrun(seq):
                return None
            r = self.step(seq)
            tries.append(r)
            on_try(r)
            return r["fits"]

        seq = start
        while seq <= cap:
            ok = run(seq)
            if ok is None:
                return {"longest_fit": fits, "first_fail": fails, "timed_out": True, "tries": tries}
            if not ok:
                fails = seq
                break
            fits, seq = seq, seq * 2
        while fails is not None and fails - fits > resolution:
            mid = (fits + fails) // 2 // 256 * 256 or (fits + fails) // 2  # whole 256-token blocks
            ok = run(mid)
            if ok is None:
                return {"longest_fit": fits, "first_fail": fails, "timed_out": True, "tries": tries}
            fits, fails = (mid, fails) if ok else (fits, mid)
        return {"longest_fit": fits, "first_fail": fails, "timed_out": False, "tries": tries}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", default="llama3-70b", choices=sorted(SHAPES))
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--search-s", type=float, default=200.0, help="seconds for the context search (0: none)")
    ap.add_argument("--resolution", type=int, default=2048, help="bisect until the bracket is this narrow")
    ap.add_argument("--max-len", type=int, default=262144)
    ap.add_argument("--modes", default=",".join(MODES), help=f"context-search modes, of {list(MODES)}")
    ap.add_argument("--folder", help="where the config and tokenizer go (default /tmp/shape-<shape>)")
    args = ap.parse_args()

    import torch
    from speed import build_trainer, card_bytes, versions

    from qlora_engine.events import StepMetrics

    cuda = torch.cuda.is_available()
    card = torch.cuda.get_device_name(0) if cuda else "cpu"
    folder = random_weights.write_folder(Path(args.folder or f"/tmp/shape-{args.shape}"), SHAPES[args.shape])
    weights = random_weights.RandomWeights(SHAPES[args.shape], "cuda" if cuda else "cpu")
    random_weights.use_in_engine(folder, weights)
    out: dict[str, Any] = dict(date=datetime.date.today().isoformat(), card=card, shape=args.shape,
                               versions=versions(), bf16_checkpoint_gib=gib(weights.nbytes()), results=[])  # fmt: skip
    stamp = datetime.datetime.now().strftime("%H%M")

    def record(item: dict) -> None:
        print(json.dumps(item), flush=True)
        out["results"].append(item)
        name = f"{out['date']}-{card.replace(' ', '-')}-big-shape-{args.shape}-{stamp}.json"
        for where in filter(None, [HERE / "results", Path(os.environ["OUT"]) if os.environ.get("OUT") else None]):
            where.mkdir(parents=True, exist_ok=True)
            (where / name).write_text(json.dumps(out, indent=1))  # after every item: a cut call keeps what ran

    # 1. Build in memory through the engine's load, then train at seq x 1.
    t0 = time.perf_counter()
    trainer, sink, _ = build_trainer(str(folder), args.seq, 1, args.steps, [], warmup=args.warmup)
    load_s = time.perf_counter() - t0
    after_load = torch.cuda.memory_allocated() if cuda else None
    ran = trainer.plan.config
    cardb = card_bytes()
    trainer.train()
    steps = sink.of(StepMetrics)[args.warmup:]
    tps = sorted(e.tokens_per_second for e in steps)
    record(dict(
        case=f"train {args.seq} x 1, every layer checkpointed",
        load_s=round(load_s, 1),
        allocated_after_setup_gib=gib(after_load),
        checkpointed_layers=trainer.checkpointed,
        kernels=trainer.kernels,
        step_s=[round(e.tokens / e.tokens_per_second, 2) for e in steps if e.tokens_per_second],
        tok_s=round(tps[len(tps) // 2]) if tps else None,
        loss=round(steps[-1].loss, 3) if steps else None,
        peak_alloc_gib=gib(max((e.cuda_allocated or 0) for e in steps)) if steps else None,
        peak_reserved_gib=gib(max((e.cuda_reserved or 0) for e in steps)) if steps else None,
        process_peak_reserved_gib=gib(torch.cuda.max_memory_reserved()) if cuda else None,
        card_gib=gib(cardb),
        budget=budget_at(ran, args.seq, cardb, []),
        budget_plan_total_gib=gib((trainer.plan.vram_estimate or {}).get("total")),
    ))  # fmt: skip

    # 2. The longest context, each mode in turn, within the time given.
    if args.search_s <= 0:
        return
    searcher = Searcher(trainer, time.monotonic() + args.search_s)
    for name in filter(None, args.modes.split(",")):
        mode = MODES[name]
        searcher.set_mode(mode)
        predicted = budget_longest(ran, cardb, mode)

        def on_try(r: dict, mode: list[str] = mode, name: str = name) -> None:
            print(json.dumps({"mode": name, **r, "budget": budget_at(ran, r["seq"], cardb, mode)}), flush=True)

        host = host_cap(ran, mode) if cuda else None
        found = searcher.search(args.seq, args.resolution, min(args.max_len, host or args.max_len), on_try)
        for r in found["tries"]:
            r["budget"] = budget_at(ran, r["seq"], cardb, mode)
        record(dict(case=f"longest context, {name}", mode=mode, budget_longest=predicted, host_ram_cap=host, **found))


if __name__ == "__main__":
    main()
