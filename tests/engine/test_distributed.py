"""Several processes, one run: real torchrun processes on the CPU (gloo) training the tiny NF4 model.

Each test starts real processes; the reference is the same run in one process. Kept to a few
steps: a torchrun start costs seconds (every process imports torch and loads the model).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from qlora_engine import checkpoint as ckpt
from qlora_engine.events import CheckpointSaved, RunFailed, RunFinished, RunStarted, StepMetrics, from_json, read_events

TEXTS = [
    "The quick brown fox jumps over the lazy dog.",
    "What is the capital of France? The capital of France is Paris.",
    "1 2 3 4 5 6 7 8 9 10",
    "def add(a, b): return a + b",
    "Translate to French: good morning. Bonjour.",
    "QLoRA trains low-rank adapters.",
]
STEPS = 4
# Six micro-batches of one sample per step: two processes take three each, three take two
# (FSDP needs the same count on every process), one process all six.
BASE = [
    "train.micro_batch_size=1",
    "train.gradient_accumulation_steps=6",
    "train.save_steps=null",
    "optim.learning_rate=1e-2",
    "optim.warmup_steps=0",
    "optim.scheduler=constant",
    "optim.optimizer=adamw",  # FSDP's sharded weights take torch's AdamW; keep one optimizer for every leg
    "train.device=cpu",
]
pytestmark = pytest.mark.timeout(600)  # each leg also has its own timeout; a loaded CI box is slow


@pytest.fixture(scope="module")
def setup(tiny_model_dir, tmp_path_factory):
    """The config writer, the environment for child processes, and the one-process reference losses."""
    root = tmp_path_factory.mktemp("dist")
    data = root / "train.jsonl"
    data.write_text("".join(json.dumps({"text": t}) + "\n" for t in TEXTS), encoding="utf-8")
    env = {
        **os.environ,
        "QLORA_STUDIO_CACHE": str(root / "cache"),
        "OMP_NUM_THREADS": "1",
        "PYTHONUNBUFFERED": "1",
        "QLORA_DIST_TIMEOUT": "60",
    }

    def config(name: str, *extra: str) -> Path:
        from qlora_engine.config import TrainConfig, apply_overrides

        cfg = apply_overrides(
            TrainConfig(),
            [f"model.ref={tiny_model_dir}", f"data.path={data}", f"output.dir={root / name}", *BASE, *extra],
        )
        path = root / f"{name}.yaml"
        cfg.save(path)
        return path

    from qlora_engine.config import TrainConfig
    from qlora_engine.events import ListSink
    from qlora_engine.runner import run

    with cache_at(env["QLORA_STUDIO_CACHE"]):
        sink = ListSink()
        run(TrainConfig.load(config("reference", f"train.max_steps={STEPS}")), sink)
    losses = [e.loss for e in sink.of(StepMetrics)]
    assert len(losses) == STEPS
    return config, env, losses, root


@contextlib.contextmanager
def cache_at(folder: str):
    """The engine's data cache in this module's folder, for runs in this process."""
    old = os.environ.get("QLORA_STUDIO_CACHE")
    os.environ["QLORA_STUDIO_CACHE"] = folder
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("QLORA_STUDIO_CACHE", None)
        else:
            os.environ["QLORA_STUDIO_CACHE"] = old


def torchrun(*args: str) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", *args]


def engine(config: Path, *args: str) -> list[str]:
    return ["-m", "qlora_engine", "train", str(config), *args, "--events", "-"]


def step_losses(run_dir: Path) -> dict[int, float]:
    return {e.step: e.loss for e in read_events(run_dir / "events.jsonl") if isinstance(e, StepMetrics)}


def adapter_fingerprint(folder: Path) -> str:
    from safetensors.torch import load_file

    return ckpt.tensors_fingerprint(load_file(folder / "adapter_model.safetensors"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def read_until(proc, predicate, seen):
    for line in proc.stdout:
        event = from_json(line)
        seen.append(event)
        if predicate(event):
            return event
    return None


def test_two_nodes_then_three_processes_sharded_train_the_one_process_run(setup):
    """Two 'nodes' of one process meet at a c10d rendezvous (DDP); three processes resume it with FSDP2."""
    config, env, reference, root = setup
    path = config("nodes", "train.max_steps=2", "train.strategy=ddp")
    port = free_port()
    nodes = [
        subprocess.Popen(
            torchrun("--nnodes=2", "--nproc-per-node=1", "--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{port}",
                     "--rdzv-id=t", *engine(path)),
            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )
        for _ in range(2)
    ]
    outs = [p.communicate(timeout=200) for p in nodes]
    assert [p.returncode for p in nodes] == [0, 0], outs[0][1][-3000:] + outs[1][1][-3000:]
    # Rank 0 alone writes the event stream: exactly one of the two agents printed events.
    assert sorted(bool(out.strip()) for out, _ in outs) == [False, True]
    run_dir = root / "nodes"
    losses = step_losses(run_dir)
    assert list(losses) == [1, 2]
    assert [losses[1], losses[2]] == pytest.approx(reference[:2], rel=1e-5)
    events = read_events(run_dir / "events.jsonl")
    started = next(e for e in events if isinstance(e, RunStarted))
    assert [p["rank"] for p in started.processes] == [0, 1]
    # every process held the weights rank 0 saved, and one checkpoint was written
    (line,) = [e.message for e in events if getattr(e, "message", "").startswith("adapter identical on 2 processes")]
    assert line.endswith(adapter_fingerprint(run_dir / "checkpoints" / "step-000002"))
    assert [p.name for p in (run_dir / "checkpoints").iterdir()] == ["step-000002"]

    # Resume under three processes, sharded (FSDP2): the 4-bit weights stored in the compute dtype.
    done = subprocess.run(
        torchrun("--standalone", "--nproc-per-node=3",
                 *engine(path, f"train.max_steps={STEPS}", "train.strategy=fsdp", "--resume")),
        env=env, capture_output=True, text=True, timeout=200,
    )
    assert done.returncode == 0, done.stderr[-4000:]
    losses = step_losses(run_dir)
    assert [losses[s] for s in range(1, STEPS + 1)] == pytest.approx(reference, rel=1e-5)
    started = [e for e in read_events(run_dir / "events.jsonl") if isinstance(e, RunStarted)][-1]
    assert started.model["quant_storage"] == "float32" and len(started.processes) == 3
    # the adapter is saved whole: the same tensors, by name and shape, as the one-process run's
    from safetensors.torch import load_file

    ours, theirs = load_file(run_dir / "adapter" / "adapter_model.safetensors"), load_file(
        root / "reference" / "adapter" / "adapter_model.safetensors"
    )
    assert {k: v.shape for k, v in ours.items()} == {k: v.shape for k, v in theirs.items()}


def test_ctrl_c_on_the_gpus_launcher_stops_every_process_after_one_step_and_saves_once(setup):
    config, env, _, root = setup
    path = config("launcher", "train.max_steps=5000")
    proc = subprocess.Popen(
        [sys.executable, "-m", "qlora_engine", "train", str(path), "--gpus", "2", "--events", "-"],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    seen: list = []
    assert read_until(proc, lambda e: isinstance(e, StepMetrics), seen), proc.stderr.read()[-3000:]
    proc.send_signal(signal.SIGINT)  # what a terminal's Ctrl-C sends the launcher
    finished = read_until(proc, lambda e: isinstance(e, (RunFinished, RunFailed)), seen)
    assert proc.wait(timeout=120) == 0, proc.stderr.read()[-3000:]
    assert isinstance(finished, RunFinished) and finished.stopped_early and finished.step < 5000
    steps = [e.step for e in seen if isinstance(e, StepMetrics)]
    assert steps == list(range(1, finished.step + 1))  # one stream: each step once, from rank 0
    saved = [e.step for e in seen if isinstance(e, CheckpointSaved)]
    assert saved == [finished.step]
    assert [p.name for p in (root / "launcher" / "checkpoints").iterdir()] == [f"step-{finished.step:06d}"]


def test_sigterm_to_torchrun_stops_every_rank_at_the_same_step_with_one_save(setup):
    config, env, _, root = setup
    path = config("sigterm", "train.max_steps=5000")
    proc = subprocess.Popen(
        torchrun("--standalone", "--nproc-per-node=2", *engine(path)),
        env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    seen: list = []
    assert read_until(proc, lambda e: isinstance(e, StepMetrics), seen), proc.stderr.read()[-3000:]
    proc.send_signal(signal.SIGTERM)  # what SLURM sends before a time limit; torchrun passes it on
    finished = read_until(proc, lambda e: isinstance(e, (RunFinished, RunFailed)), seen)
    proc.wait(timeout=120)  # torchrun itself exits non-zero after a signal; its workers finished cleanly
    err = proc.stderr.read()
    assert isinstance(finished, RunFinished) and finished.stopped_early, err[-3000:]
    assert "exitcode" not in err  # no worker failed (torchrun lists failed workers with their exit codes)
    assert [e.step for e in seen if isinstance(e, CheckpointSaved)] == [finished.step]
    assert ckpt.latest_checkpoint(root / "sigterm" / "checkpoints").name == f"step-{finished.step:06d}"


def test_a_dead_rank_ends_the_run_with_an_error_naming_it_not_a_hang(setup):
    config, env, _, root = setup
    path = config("dead", "train.max_steps=5000")
    proc = subprocess.Popen(
        torchrun("--standalone", "--nproc-per-node=2", *engine(path)),
        env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    seen: list = []
    assert read_until(proc, lambda e: isinstance(e, StepMetrics), seen), proc.stderr.read()[-3000:]
    started = next(e for e in seen if isinstance(e, RunStarted))
    victim = next(p for p in started.processes if p["rank"] == 1)
    t0 = time.monotonic()
    os.kill(victim["pid"], signal.SIGKILL)
    failed = read_until(proc, lambda e: isinstance(e, (RunFailed, RunFinished)), seen)
    assert proc.wait(timeout=90) != 0
    assert time.monotonic() - t0 < 60  # no hang: the dead peer's closed connection ends the collective
    assert isinstance(failed, RunFailed)
    error = failed.user_error()
    assert type(error).__name__ == "DistributedError"
    assert f"rank 1 (process {victim['pid']})" in error.what and "--resume" in error.fix


def test_ddp_and_fsdp_of_one_process_run_the_single_engine_run(setup):
    """World size 1 through the DDP and the FSDP2 paths (a process group of one), in this process."""
    from qlora_engine.config import TrainConfig
    from qlora_engine.events import ListSink
    from qlora_engine.runner import run

    config, env, reference, root = setup
    with cache_at(env["QLORA_STUDIO_CACHE"]):
        for strategy in ("ddp", "fsdp"):
            sink = ListSink()
            run(TrainConfig.load(config(f"one-{strategy}", "train.max_steps=2", f"train.strategy={strategy}")), sink)
            losses = [e.loss for e in sink.of(StepMetrics)]
            assert losses == pytest.approx(reference[:2], rel=1e-5), strategy
            (started,) = sink.of(RunStarted)
            assert started.model["quant_storage"] == ("float32" if strategy == "fsdp" else "uint8")
    assert json.loads((root / "one-fsdp" / "checkpoints" / "step-000002" / ckpt.MARKER).read_text())["complete"]


def test_loss_weights_over_two_processes_train_as_one_process(setup):
    """Weighted answers (a part of weight 0.1, a turn of weight 3): two DDP processes, each with its
    share of a step's micro-batches, take the same steps as one process (the weights' sum is the
    whole step's on each), and those steps are not the unweighted data's."""
    from qlora_engine.config import TrainConfig
    from qlora_engine.events import ListSink
    from qlora_engine.runner import run

    config, env, _, root = setup

    def write(name: str, weighted: bool) -> Path:
        rows = []
        for i, t in enumerate(TEXTS):
            parts = [{"type": "text", "text": "Well, "}, {"type": "text", "text": t}]
            turn = {"role": "assistant", "content": parts}
            if weighted:
                parts[0]["weight"] = 0.1
                turn["weight"] = 1 + 2 * (i % 2)
            rows.append({"messages": [{"role": "user", "content": f"Say line {i}."}, turn]})
        path = root / f"{name}.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
        return path

    one = {}
    with cache_at(env["QLORA_STUDIO_CACHE"]):
        for name, weighted in (("w-one", True), ("w-plain", False)):
            sink = ListSink()
            run(TrainConfig.load(config(name, f"data.path={write(name, weighted)}", "train.max_steps=3")), sink)
            one[name] = [e.loss for e in sink.of(StepMetrics)]
    assert one["w-one"][0] == pytest.approx(one["w-plain"][0], rel=1e-6)  # the reported loss is the plain mean
    assert abs(one["w-one"][2] - one["w-plain"][2]) > 1e-4  # the weighted steps differ
    path = config("w-two", f"data.path={root / 'w-one.jsonl'}", "train.max_steps=3", "train.strategy=ddp")
    done = subprocess.run(torchrun("--standalone", "--nproc-per-node=2", *engine(path)),
                          env=env, capture_output=True, text=True, timeout=200)
    assert done.returncode == 0, done.stderr[-4000:]
    losses = step_losses(root / "w-two")
    assert [losses[s] for s in (1, 2, 3)] == pytest.approx(one["w-one"], rel=1e-5)
