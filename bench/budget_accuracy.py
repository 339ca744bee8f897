"""Accuracy of the VRAM budget: predicted vs measured peak memory of real engine runs, on one GPU.

    python bench/budget_accuracy.py [--shapes llama3-8b,llama-1b] [--cases NAME,...] [--steps 4]
                                    [--deadline-s 420] [--workdir /tmp/budget-bench] [--resume]
                                    [--alloc-conf expandable_segments:False]
    python bench/budget_accuracy.py --dry-run      # the cases, their predictions and commands; no GPU
    python bench/budget_accuracy.py --smoke        # one tiny case through the whole chain, on the CPU
    python bench/budget_accuracy.py --recheck bench/results/<date>-<card>-budget.json
                                                   # the recorded cases re-estimated by the current
                                                   # budget against their measurements; no GPU

Builds random-weight checkpoints of two shapes (BENCHMARKS.md's Llama-3-8B and a ~1B Llama,
both through ``save_pretrained`` as real safetensors), then runs every case through the
engine's trainer (``qlora_engine.train.Trainer``: the real 4-bit load, LoRA, optimizer and
steps, fed random tokens), each case in a fresh subprocess so that peaks do not mix. For
each case it prints one JSON line comparing ``budget.estimate`` with what torch measured:

* ``torch.cuda.max_memory_reserved()`` of the training steps (the trainer resets the peak
  every step; the max over steps is taken) against the estimate's ``torch_reserved``
  (its total less the CUDA context and the paged optimizer state, which live outside
  torch's allocator) -- the number the issue's accuracy goal is about;
* peak allocated against the estimate's ``torch_allocated`` (the formulas without the
  allocator's slack), to tell formula errors from fragmentation;
* measured slack (reserved - allocated) next to the estimate's dynamic part, the input of
  the allocator-slack fit printed last for the allocator mode the cases ran in;
* device memory outside torch at the last step (``mem_get_info`` used - reserved) against the
  estimate's CUDA context + paged optimizer state.

The allocator mode is the engine's default (expandable segments) unless ``--alloc-conf`` sets
``PYTORCH_CUDA_ALLOC_CONF`` for the workers; each result records the mode the budget assumed
and the value the worker saw. Kernels are the engine's default too (``train.kernels: auto``:
Liger Kernel on the GPU when liger-kernel is installed, which the driver requires), with a
few cases at ``train.kernels=none``; each result records what the engine applied
(``Trainer.kernels``) next to what the budget assumed. So is the LoRA forward
(``train.fast_lora``, on by default): ``fast_lora_layers`` is the trainer's count of layers on
the fast path (0: peft's forward), next to the budget's ``predicted.fast_lora``; ``--recheck``
estimates a record's cases with the path they ran (records without the field predate
train.fast_lora and ran peft's).

On the GPU, with the wheels carried in ``.whl/`` (bitsandbytes, platformdirs, datasets, dill,
multiprocess, liger_kernel)::

    pip install -q --no-deps .whl/*.whl && python bench/budget_accuracy.py

A table, a summary against the goals (every case within +-7%, median |error| <= 3%, no
under-prediction beyond 5%) and the slack fit come last; the record goes to
``bench/results/<date>-<card>-budget.json`` and to $OUT when set, rewritten after every case
so that a run cut short still leaves its numbers. Results are appended to
``<workdir>/budget-partial.jsonl`` as they come, so ``--resume`` continues a run that hit the
deadline (the checkpoints stay in ``<workdir>`` while the machine is warm). No case starts
unless the slowest case of its shape so far would still end before the deadline.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(HERE))  # also when loaded by path (the tests do)

from budget_cases import ALL_CASES, CASES, GOALS, SHAPES, SMOKE_CASES  # noqa: E402
from budget_report import fit_slack, summarize, table  # noqa: E402

GiB = 1 << 30


def gib(n: float | None) -> float | None:
    return None if n is None else round(n / GiB, 3)


# -- the checkpoint ------------------------------------------------------------------------------


def make_checkpoint(shape: str, path: Path, device: str = "cuda") -> None:
    """Random bf16 weights of the shape, saved as safetensors, plus a small tokenizer (pad id only)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    if not (path / "config.json").exists():
        t = time.time()
        cfg = LlamaConfig(**SHAPES[shape], dtype="bfloat16")
        with torch.device(device):
            model = LlamaForCausalLM(cfg).to(torch.bfloat16)
        tmp = path.with_name(path.name + ".tmp")
        model.save_pretrained(tmp, max_shard_size="5GB")
        tmp.rename(path)
        del model
        gc.collect()
        if device == "cuda":
            torch.cuda.empty_cache()
        print(f"# saved {shape} in {time.time() - t:.0f}s", file=sys.stderr, flush=True)
    if not (path / "tokenizer_config.json").exists():
        sys.path.insert(0, str(ROOT / "tests"))
        from tiny import build_tokenizer

        build_tokenizer(path)  # the engine loads a tokenizer with the model; random ids need only its pad id


# -- one case, in its own process ----------------------------------------------------------------


def synthetic_data(kind: str, seq: int, n: int, vocab: int) -> tuple[list[dict], dict]:
    """Samples of random ids and the token statistics the data module would report for them."""
    import torch

    gen = torch.Generator().manual_seed(0)
    samples = []
    for k in range(n):
        length = seq - (k % 4) if kind == "padded" else seq
        ids = torch.randint(0, vocab, (length,), generator=gen).tolist()
        sample = {"input_ids": ids, "labels": ids}
        if kind == "packed":
            cut = seq // 3
            sample["position_ids"] = list(range(cut)) + list(range(seq - cut))
        samples.append(sample)
    lengths = [len(s["input_ids"]) for s in samples]
    stats = {"min": min(lengths), "max": max(lengths), "median": sorted(lengths)[len(lengths) // 2],
             "p95": max(lengths), "longest_sequence": max(lengths)}  # fmt: skip
    return samples, stats


def case_config(name: str, workdir: Path, steps: int, fast_lora: bool | None = None):
    """The run config of a case (pure: also used by --dry-run, which touches no GPU).

    ``fast_lora``: None leaves ``train.fast_lora`` at the engine's default (a new run);
    True or False sets it, as a recorded run had it (:func:`recorded_fast_lora`).
    """
    from qlora_engine.config import TrainConfig, apply_overrides

    shape, seq, mbs, ckpt, optimizer, kind, extra = ALL_CASES[name]
    base = TrainConfig()
    return apply_overrides(
        base,
        [
            f"model.ref={workdir / f'ckpt-{shape}'}",
            "data.path=synthetic",
            f"data.max_length={seq}",
            f"data.packing={'true' if kind == 'packed' else 'false'}",
            f"output.dir={workdir / f'run-{name}-{os.getpid()}'}",
            f"train.max_steps={steps}",
            f"train.micro_batch_size={mbs}",
            "train.gradient_accumulation_steps=1",
            f"train.gradient_checkpointing={'true' if ckpt else 'false'}",
            "train.save_steps=null",
            "train.logging_steps=1",  # every step's peaks (the trainer resets them each step)
            "lora.rank=16",
            "lora.alpha=16",
            "lora.target_modules=[all-linear]",
            f"optim.optimizer={optimizer}",
            *extra,
            *([] if fast_lora is None else [f"train.fast_lora={'true' if fast_lora else 'false'}"]),
        ],
    )


def recorded_fast_lora(result: dict) -> bool:
    """Whether a recorded case ran ``train.fast_lora``'s LoRA forward: its ``fast_lora_layers``
    (the trainer's count of layers on the fast path) is above 0. Records without the field
    predate train.fast_lora: their runs took peft's LoRA forward."""
    return bool(result.get("fast_lora_layers"))


def case_estimate(
    name: str, workdir: Path, steps: int, gpu_bytes: int | None = None, gpu_name: str | None = None,
    device: str = "cuda", liger_installed: bool | None = None, fast_lora: bool | None = None,
):  # fmt: skip
    """(config, samples, budget estimate) of a case: the estimate from the shape's config alone.

    ``liger_installed``: None looks liger-kernel up here (the worker, on the GPU); the dry run
    passes True, since the GPU run installs the carried wheel. ``fast_lora``: as in
    :func:`case_config`.
    """
    from qlora_engine.budget import model_spec
    from qlora_engine.budget.estimate import estimate_from_spec, resolve_spec

    shape, seq, mbs, _, _, kind, _ = ALL_CASES[name]
    cfg = case_config(name, workdir, steps, fast_lora)
    if device != "cuda":
        cfg.train.device = "cpu"
        cfg.quant.compute_dtype = "bfloat16"
    ga = cfg.train.gradient_accumulation_steps
    samples, stats = synthetic_data(kind, seq, mbs * ga * steps, SHAPES[shape]["vocab_size"])
    if (workdir / f"ckpt-{shape}" / "config.json").exists():
        spec = resolve_spec(cfg)  # the checkpoint's own config.json
    else:
        spec = model_spec({"model_type": "llama", "architectures": ["LlamaForCausalLM"], **SHAPES[shape]})
    est = estimate_from_spec(
        cfg, spec, data_stats=stats, gpu_bytes=gpu_bytes, gpu_name=gpu_name, liger_installed=liger_installed
    )
    return cfg, samples, est


def run_case(name: str, workdir: Path, steps: int, device: str = "cuda") -> dict:
    import torch

    from qlora_engine.data import PreparedData
    from qlora_engine.events import ListSink, PhaseChanged, StepMetrics
    from qlora_engine.runner import build_trainer  # sets the engine's allocator default, before CUDA starts

    cuda = device == "cuda"
    alloc_conf = os.environ.get("PYTORCH_CUDA_ALLOC_CONF")
    total = context_at_start = card = backend = None
    if cuda:
        torch.cuda.init()
        torch.ones(1, device="cuda")
        free, total = torch.cuda.mem_get_info()
        context_at_start = total - free - torch.cuda.memory_reserved()
        card, backend = torch.cuda.get_device_name(0), torch.cuda.get_allocator_backend()

    shape, seq, mbs, ckpt, optimizer, kind, extra = ALL_CASES[name]
    cfg, samples, est = case_estimate(name, workdir, steps, gpu_bytes=total, gpu_name=card, device=device)
    ga = cfg.train.gradient_accumulation_steps

    class Probe(ListSink):
        """Reads torch's and the driver's counters as events arrive (same process, same thread)."""

        def __init__(self) -> None:
            super().__init__()
            self.load_peak_reserved = None
            self.static_allocated = None
            self.outside_torch = None

        def emit(self, event) -> None:
            super().emit(event)
            if not cuda:
                return
            if isinstance(event, PhaseChanged) and event.phase == "training" and self.static_allocated is None:
                self.static_allocated = torch.cuda.memory_allocated()
                self.load_peak_reserved = torch.cuda.max_memory_reserved()
            if isinstance(event, StepMetrics):
                torch.cuda.synchronize()
                f, t = torch.cuda.mem_get_info()
                self.outside_torch = (t - f) - torch.cuda.memory_reserved()

    sink = Probe()
    trainer = build_trainer(cfg, sink, data=PreparedData(train=samples, validation=None, report={}, fingerprint="synthetic"))
    trainer.setup()
    trainer.save_checkpoint = lambda: None  # measure training, not disk writes
    trainer.save_adapter = lambda: None
    # Whether the backward pass reaches the first block (budget.formulas.CHECKPOINTING_INPUT_GRADS).
    first_input_grad: list[bool] = []
    first_block = trainer.model.get_base_model().model.layers[0]
    hook = first_block.register_forward_pre_hook(
        lambda m, a, kw: first_input_grad.append((a[0] if a else kw["hidden_states"]).requires_grad), with_kwargs=True
    )
    t0 = time.time()
    trainer.train()
    hook.remove()
    step_s = (time.time() - t0) / steps
    metrics = sink.of(StepMetrics)
    d = est.details
    pred_reserved, pred_allocated = d["torch_reserved"], d["torch_allocated"]
    pred_outside = est.components["cuda_context"] + d["paged_optimizer_bytes"]
    res = dict(
        case=name, card=card, device=device, shape=shape, seq=seq, micro_batch=mbs, grad_accum=ga, checkpointing=ckpt,
        optimizer=optimizer, data=kind, rank=cfg.lora.rank, targets=cfg.lora.target_modules, steps=steps,
        step_s=round(step_s, 2), loss=round(metrics[-1].loss, 3),
        allocator=dict(alloc_conf_seen=alloc_conf, budget_mode=d["allocator"], budget_calibrated=d["allocator_calibrated"],
                       backend=backend),
        kernels=dict(requested=cfg.train.kernels, applied=getattr(trainer, "kernels", None),
                     budget=d["kernels"], budget_reason=d["kernels_reason"], loss=d["loss"]),
        fast_lora_layers=trainer.fast_lora,  # 0: peft's LoRA forward on every layer (--recheck reads it)
        flat_lora=hasattr(trainer.optimizer, "flat_groups"),  # one flat LoRA buffer (optim.FLAT; --recheck reads it)
        first_block_input_requires_grad=first_input_grad[0] if first_input_grad else None,
        budget_assumes_input_grads=d["checkpointing_input_grads"],
        predicted=dict(
            torch_reserved_gib=gib(pred_reserved), torch_allocated_gib=gib(pred_allocated),
            outside_torch_gib=gib(pred_outside), total_gib=gib(est.total), low_gib=gib(est.low),
            high_gib=gib(est.high), peak_phase=d["peak_phase"], attention_mask=d["attention_mask"],
            fast_lora=d["fast_lora"],
            static_gib=gib(d["static_bytes"]), dynamic_gib=gib(d["dynamic_bytes"]),
            slack_gib=gib(est.components["allocator_slack"]),
            logits_fp32_gib=gib(4 * seq * mbs * SHAPES[shape]["vocab_size"] if d["loss"] == "plain" else 0),
            phases_gib={k: gib(v) for k, v in d["phases"].items()},
            components_gib={k: gib(v) for k, v in est.components.items()},
            approximate=est.approximate,
        ),
    )  # fmt: skip
    if not cuda:
        return res
    reserved = [m.cuda_reserved for m in metrics]
    allocated = [m.cuda_allocated for m in metrics]
    peak_reserved, peak_allocated = max(reserved), max(allocated)
    res.update(
        measured=dict(
            peak_reserved_gib=gib(peak_reserved), peak_allocated_gib=gib(peak_allocated),
            slack_gib=gib(peak_reserved - peak_allocated),
            reserved_per_step_gib=[gib(r) for r in reserved], allocated_per_step_gib=[gib(a) for a in allocated],
            load_peak_reserved_gib=gib(sink.load_peak_reserved), static_allocated_gib=gib(sink.static_allocated),
            outside_torch_gib=gib(sink.outside_torch), context_at_start_gib=gib(context_at_start),
        ),
        reserved_error_pct=round(100 * (pred_reserved - peak_reserved) / peak_reserved, 2),
        allocated_error_pct=round(100 * (pred_allocated - peak_allocated) / peak_allocated, 2),
        in_range=est.low - pred_outside <= peak_reserved <= est.high - pred_outside,
    )  # fmt: skip
    return res


# -- a recorded run against the current budget ----------------------------------------------------


def recheck(record: dict) -> list[dict]:
    """The record's measured cases with their predictions recomputed by the budget as it is now.

    The estimate needs only the config (the shapes' config.json as in SHAPES, the synthetic data's
    lengths), so this runs anywhere; each case is estimated under the allocator setting its worker
    saw, with liger-kernel assumed installed, as on the GPU, and with the LoRA forward it ran
    (:func:`recorded_fast_lora`: peft's for records from before train.fast_lora, whatever today's
    default). A case whose definition, kernels or LoRA path no longer match what was run is an
    error, not a silently different comparison.
    """
    out = []
    for r in record["results"]:
        if "measured" not in r:
            out.append(r)
            continue
        shape, seq, mbs, ckpt, optimizer, kind, _ = ALL_CASES[r["case"]]
        ran = (r["shape"], r["seq"], r["micro_batch"], r["checkpointing"], r["optimizer"], r["data"])
        if ran != (shape, seq, mbs, ckpt, optimizer, kind):
            raise ValueError(f"{r['case']}: the case is now {ALL_CASES[r['case']][:6]}, the record ran {ran}")
        saved = os.environ.get("PYTORCH_CUDA_ALLOC_CONF")
        conf = r["allocator"]["alloc_conf_seen"]
        os.environ["PYTORCH_CUDA_ALLOC_CONF"] = conf if conf is not None else ""
        from qlora_engine.budget import formulas

        flat = formulas.FLAT_LORA
        formulas.FLAT_LORA = bool(r.get("flat_lora", False))  # records from before optim.FLAT: tensor by tensor
        try:
            _, _, est = case_estimate(
                r["case"], Path("/nonexistent"), r["steps"], liger_installed=True, fast_lora=recorded_fast_lora(r)
            )
        finally:
            formulas.FLAT_LORA = flat
            if saved is None:
                os.environ.pop("PYTORCH_CUDA_ALLOC_CONF", None)
            else:
                os.environ["PYTORCH_CUDA_ALLOC_CONF"] = saved
        d = est.details
        if d["kernels"] != r["kernels"]["applied"] or d["allocator"] != r["allocator"]["budget_mode"]:
            raise ValueError(f"{r['case']}: the budget now assumes {d['kernels']}/{d['allocator']}, the run had "
                             f"{r['kernels']['applied']}/{r['allocator']['budget_mode']}")  # fmt: skip
        if d["fast_lora"] != recorded_fast_lora(r):  # e.g. a case with LoRA dropout, which keeps peft's path
            raise ValueError(f"{r['case']}: the budget now assumes fast_lora={d['fast_lora']}, the run had "
                             f"{r.get('fast_lora_layers')} layers on it")  # fmt: skip
        m = r["measured"]
        pred_reserved, pred_allocated = d["torch_reserved"], d["torch_allocated"]
        pred_outside = est.components["cuda_context"] + d["paged_optimizer_bytes"]
        meas_reserved, meas_allocated = m["peak_reserved_gib"] * GiB, m["peak_allocated_gib"] * GiB
        predicted = dict(
            r["predicted"], torch_reserved_gib=gib(pred_reserved), torch_allocated_gib=gib(pred_allocated),
            outside_torch_gib=gib(pred_outside), total_gib=gib(est.total), low_gib=gib(est.low),
            high_gib=gib(est.high), peak_phase=d["peak_phase"], static_gib=gib(d["static_bytes"]),
            dynamic_gib=gib(d["dynamic_bytes"]), slack_gib=gib(est.components["allocator_slack"]),
            fast_lora=d["fast_lora"],
        )  # fmt: skip
        out.append(dict(
            r, predicted=predicted,
            reserved_error_pct=round(100 * (pred_reserved - meas_reserved) / meas_reserved, 2),
            allocated_error_pct=round(100 * (pred_allocated - meas_allocated) / meas_allocated, 2),
            in_range=est.low - pred_outside <= meas_reserved <= est.high - pred_outside,
        ))  # fmt: skip
    return out


# -- the driver ------------------------------------------------------------------------------------


def versions() -> dict:
    import importlib.metadata as md

    out = {}
    for name in ("torch", "transformers", "peft", "bitsandbytes", "accelerate", "liger-kernel", "triton"):
        try:
            out[name] = md.version(name)
        except md.PackageNotFoundError:
            out[name] = None
    return out


def check_imports(gpu: bool = True) -> None:
    """Fail early, naming what to carry. Looks modules up without importing them: importing
    bitsandbytes creates a CUDA context, and this process must hold none (see main). On the GPU
    liger-kernel is required: without it 'auto' would quietly measure the plain code."""
    import importlib.util

    wanted = ("torch", "transformers", "peft", "accelerate", "bitsandbytes", "safetensors", "tokenizers", "yaml",
              "numpy", "platformdirs") + (("liger_kernel", "triton") if gpu else ())  # fmt: skip
    missing = [mod for mod in wanted if importlib.util.find_spec(mod) is None]
    if missing:
        sys.exit(f"missing on this machine: {', '.join(missing)} (carry their wheels and pip install them first)")


# Rough seconds per case for --dry-run's plan and the deadline: worker start and imports, load
# and 4-bit quantization, plus the steps at tokens/s seen on an H200 (bench/NOTES.md: Liger
# 7,250 tok/s with checkpointing at 2048x4, kernels=none 6,366; ~1B: a guess).
_PLAN = {"llama3-8b": (20, 6000, 9000), "llama-1b": (12, 20000, 30000), "tiny": (8, 1000, 1000)}
_PLAN_CHECKPOINTS_S = {"llama3-8b": 75, "llama-1b": 15, "tiny": 2}


def plan_seconds(name: str, steps: int) -> float:
    shape, seq, mbs, ckpt, _, _, extra = ALL_CASES[name]
    ga = 2 if "train.gradient_accumulation_steps=2" in extra else 1
    overhead, ckpt_tps, plain_tps = _PLAN[shape]
    return overhead + steps * seq * mbs * ga / (ckpt_tps if ckpt else plain_tps)


def dry_run(names: list[str], args: argparse.Namespace, workdir: Path) -> None:
    """The cases with their predictions (from the shapes' configs, no GPU), the commands, a rough plan."""
    from qlora_engine import budget

    print(f"# allocator for the workers: PYTORCH_CUDA_ALLOC_CONF={args.alloc_conf or '(unset: engine default)'}")
    env = dict(os.environ)
    if args.alloc_conf:
        env["PYTORCH_CUDA_ALLOC_CONF"] = args.alloc_conf
    else:
        env.pop("PYTORCH_CUDA_ALLOC_CONF", None)
    mode = budget.allocator_mode(env)
    print(f"# budget allocator mode: {mode} (calibrated: {budget.CALIBRATION['allocator'][mode]['measured']})")
    total_s = sum(_PLAN_CHECKPOINTS_S[s] for s in {ALL_CASES[n][0] for n in names})
    print("# kernels: as on the GPU, where the carried liger-kernel wheel is installed (train.kernels auto -> liger)")
    for name in names:
        _, _, est = case_estimate(name, workdir, args.steps, liger_installed=True)
        d = est.details
        secs = plan_seconds(name, args.steps)
        total_s += secs
        print(json.dumps(dict(
            case=name, spec=list(ALL_CASES[name][:6]), extra=ALL_CASES[name][6], kernels=d["kernels"],
            fast_lora=d["fast_lora"], peak_phase=d["peak_phase"],
            predicted_total_gib=gib(est.total), predicted_reserved_gib=gib(d["torch_reserved"]),
            predicted_allocated_gib=gib(d["torch_allocated"]), fits_h100_80gb=est.total <= budget.KNOWN_GPUS["h100"],
            rough_s=round(secs), worker=" ".join(worker_command(name, args, workdir)),
        )))  # fmt: skip
    print(
        f"# rough plan: {total_s / 60:.1f} min for {len(names)} cases and their checkpoints (a guess, not a measurement)"
    )


def worker_command(name: str, args: argparse.Namespace, workdir: Path) -> list[str]:
    cmd = [sys.executable, __file__, "--worker", name, "--workdir", str(workdir), "--steps", str(args.steps)]
    return cmd + (["--device", "cpu"] if args.smoke else [])


def write_record(names: list[str], results: list[dict], args: argparse.Namespace, final: bool) -> Path | None:
    from qlora_engine.budget import CALIBRATION

    card = next((r["card"] for r in results if r.get("card")), None) or ("CPU-smoke" if args.smoke else "unknown-GPU")
    record = dict(
        date=datetime.date.today().isoformat(), card=card, versions=versions(), steps=args.steps, final=final,
        alloc_conf=args.alloc_conf, calibration=CALIBRATION, summary=summarize(results), slack_fit=fit_slack(results),
        goals=GOALS, results=results, not_run=[n for n in names if n not in {r["case"] for r in results}],
    )  # fmt: skip
    mode = "fixed-segments" if args.alloc_conf and "expandable_segments:false" in args.alloc_conf.lower() else ""
    fname = "-".join(filter(None, [record["date"], card.replace(" ", "-"), "budget", mode])) + ".json"
    folders = [Path(os.environ["OUT"])] if os.environ.get("OUT") else []
    if not args.smoke:
        folders.insert(0, HERE / "results")
    for folder in folders:
        folder.mkdir(parents=True, exist_ok=True)
        (folder / fname).write_text(json.dumps(record, indent=1))
    return folders[0] / fname if folders else None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shapes", default="llama3-8b,llama-1b")
    ap.add_argument("--cases", default="", help="comma-separated case names (default: all of the shapes)")
    ap.add_argument("--steps", type=int, default=4, help="optimizer steps per case (the peak settles after 2-3)")
    ap.add_argument(
        "--deadline-s", type=float, default=420, help="start no case that would end after this many seconds"
    )
    ap.add_argument("--case-timeout-s", type=float, default=240)
    ap.add_argument("--workdir", default="/tmp/budget-bench")
    ap.add_argument("--resume", action="store_true", help="skip cases already in <workdir>/budget-partial.jsonl")
    ap.add_argument("--alloc-conf", default="", help="PYTORCH_CUDA_ALLOC_CONF for the workers (default: the engine's)")
    ap.add_argument("--list", action="store_true", help="list the cases and exit")
    ap.add_argument("--dry-run", action="store_true", help="print cases, predictions and commands; run nothing")
    ap.add_argument("--smoke", action="store_true", help="run one tiny case through the whole chain on the CPU")
    ap.add_argument("--recheck", metavar="RECORD", help="re-estimate a recorded run's cases with the current budget")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--device", default="cuda", help=argparse.SUPPRESS)
    ap.add_argument("--make-checkpoint", help=argparse.SUPPRESS)
    args = ap.parse_args()
    workdir = Path(args.workdir)

    if args.recheck:
        record = json.loads(Path(args.recheck).read_text())
        results = recheck(record)
        print(f"# {args.recheck} ({record['card']}), re-estimated by the current budget")
        print(table(results))
        summary = summarize(results)
        print("\n" + json.dumps({"summary": summary, "goals": GOALS}))
        print(json.dumps({"slack_fit": fit_slack(results)}))
        sys.exit(0 if summary.get("goals_met") else 1)
    if args.list:
        for name, spec in CASES.items():
            print(name, spec)
        return
    if args.make_checkpoint:
        make_checkpoint(args.make_checkpoint, workdir / f"ckpt-{args.make_checkpoint}", args.device)
        return
    if args.worker:
        try:
            res = run_case(args.worker, workdir, args.steps, args.device)
        except Exception as e:  # an OOM is a result too: the estimate should have said so
            import traceback

            res = dict(
                case=args.worker, error=f"{type(e).__name__}: {str(e)[:400]}", traceback=traceback.format_exc()[-1500:]
            )
        print("RESULT " + json.dumps(res), flush=True)
        return

    if args.smoke:
        shapes, names, device = ["tiny"], list(SMOKE_CASES), "cpu"
        args.steps = min(args.steps, 2)
    else:
        shapes = [s for s in args.shapes.split(",") if s]
        names = [n for n in (args.cases.split(",") if args.cases else CASES) if n and ALL_CASES[n][0] in shapes]
        device = "cuda"
    if args.dry_run:
        dry_run(names, args, workdir)
        return

    # This process never touches CUDA: the workers read device-wide free memory, and a context
    # held here would count as theirs. Checkpoints are built in a subprocess, and the card's
    # name comes back with the results.
    t_start = time.time()
    check_imports(gpu=not args.smoke)
    print(f"# {versions()}", file=sys.stderr, flush=True)
    env = dict(os.environ)
    if args.alloc_conf:
        env["PYTORCH_CUDA_ALLOC_CONF"] = args.alloc_conf
    workdir.mkdir(parents=True, exist_ok=True)
    partial = workdir / "budget-partial.jsonl"
    done: dict[str, dict] = {}
    if args.resume and partial.exists():
        for line in partial.read_text().splitlines():
            r = json.loads(line)
            done[r["case"]] = r
    elif partial.exists():
        partial.unlink()
    for shape in shapes:
        if any(ALL_CASES[n][0] == shape and n not in done for n in names):
            cmd = [sys.executable, __file__, "--make-checkpoint", shape, "--workdir", str(workdir), "--device", device]
            subprocess.run(cmd, check=True, cwd=ROOT, env=env)

    results = [done[n] for n in names if n in done]
    slowest: dict[str, float] = {}  # seconds of the slowest case so far, per shape
    for name in names:
        if name in done:
            continue
        shape = ALL_CASES[name][0]
        expected = slowest.get(shape, plan_seconds(name, args.steps))
        if time.time() - t_start + expected > args.deadline_s:
            print(f"# deadline: {name} not run (use --resume in the next call)", file=sys.stderr, flush=True)
            continue
        t_case = time.time()
        try:
            proc = subprocess.run(
                worker_command(name, args, workdir), capture_output=True, text=True, timeout=args.case_timeout_s,
                cwd=ROOT, env=env,
            )  # fmt: skip
            lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
            res = json.loads(lines[-1][7:]) if lines else dict(case=name, error=proc.stderr[-800:])
        except subprocess.TimeoutExpired:
            res = dict(case=name, error=f"timed out after {args.case_timeout_s:.0f}s")
        res["wall_s"] = round(time.time() - t_case, 1)
        slowest[shape] = max(slowest.get(shape, 0.0), res["wall_s"])
        print(json.dumps(res), flush=True)
        with open(partial, "a") as fh:
            fh.write(json.dumps(res) + "\n")
        results.append(res)
        write_record(names, results, args, final=False)

    print("\n" + table(results))
    print("\n" + json.dumps({"summary": summarize(results), "goals": GOALS}))
    print(json.dumps({"slack_fit": fit_slack(results)}))
    path = write_record(names, results, args, final=True)
    print(f"# record: {path or 'not written (a smoke run writes only to $OUT)'}", file=sys.stderr, flush=True)
    if args.smoke and any("error" in r for r in results):
        sys.exit(1)



if __name__ == "__main__":
    main()
