"""The `train` command as the desktop app and a terminal use it: JSON events, stdin control, Ctrl-C, resume."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

from qlora_engine.events import CheckpointSaved, EvalResult, ListSink, RunFinished, StepMetrics, from_json
from qlora_engine.runner import run


def start(config, *args):
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen(
        [sys.executable, "-m", "qlora_engine", "train", str(config), *args],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
    )


def read_until(proc, predicate):
    """Events from the child's stdout until one satisfies ``predicate`` (or the stream ends)."""
    seen = []
    for line in proc.stdout:
        event = from_json(line)
        seen.append(event)
        if predicate(event):
            break
    return seen


def test_stop_over_stdin_saves_and_resume_continues(tiny_cfg, tmp_path):
    cfg = tiny_cfg("train.max_steps=200")  # long enough that only a stop ends it
    config = tmp_path / "run.yaml"
    cfg.save(config)
    proc = start(config, "--events", "-", "--control-stdin")
    seen = read_until(proc, lambda e: isinstance(e, StepMetrics) and e.step >= 2)
    assert seen[0].kind == "phase"
    proc.stdin.write("stop\n")
    proc.stdin.flush()
    rest = read_until(proc, lambda e: isinstance(e, RunFinished))
    proc.stdin.close()
    assert proc.wait(timeout=120) == 0, proc.stderr.read()
    finished = rest[-1]
    assert isinstance(finished, RunFinished) and finished.stopped_early and finished.step < 200
    saved = [e for e in rest if isinstance(e, CheckpointSaved)]
    assert saved and saved[-1].step == finished.step
    assert (cfg.output_dir / "adapter" / "adapter_model.safetensors").is_file()

    # --resume continues from the saved step, with an override on the command line
    done = subprocess.run(
        [sys.executable, "-m", "qlora_engine", "train", str(config), f"train.max_steps={finished.step + 2}",
         "--events", "-", "--resume"],
        capture_output=True, text=True, timeout=300,
    )
    assert done.returncode == 0, done.stderr
    events = [from_json(line) for line in done.stdout.splitlines()]
    steps = [e.step for e in events if isinstance(e, StepMetrics)]
    assert steps == [finished.step + 1, finished.step + 2]


def test_ctrl_c_stops_at_a_step_boundary_and_saves(tiny_cfg, tmp_path):
    cfg = tiny_cfg("train.max_steps=500")
    config = tmp_path / "run.yaml"
    cfg.save(config)
    proc = start(config, "--events", "-")
    read_until(proc, lambda e: isinstance(e, StepMetrics))
    proc.send_signal(signal.SIGINT)
    rest = read_until(proc, lambda e: isinstance(e, RunFinished))
    assert proc.wait(timeout=120) == 0
    assert isinstance(rest[-1], RunFinished) and rest[-1].stopped_early
    assert (cfg.output_dir / "checkpoints" / f"step-{rest[-1].step:06d}" / "qlora_checkpoint.json").is_file()


def test_refusals_exit_2_before_loading_anything(tiny_cfg, tmp_path):
    config = tmp_path / "run.yaml"
    tiny_cfg(f"model.ref={tmp_path / 'missing-model'}").save(config)
    out = subprocess.run([sys.executable, "-m", "qlora_engine", "train", str(config)], capture_output=True, text=True)
    assert out.returncode == 2 and "no such model folder" in out.stderr
    out = subprocess.run([sys.executable, "-m", "qlora_engine", "train", str(config), "lora.rank=0"],
                         capture_output=True, text=True)
    assert out.returncode == 2 and "lora.rank: 0" in out.stderr


def test_failures_are_reported_as_an_event_with_the_traceback(tiny_cfg, tmp_path):
    cfg = tiny_cfg(f"model.ref={tmp_path / 'nope'}")
    config = tmp_path / "run.yaml"
    cfg.save(config)
    out = subprocess.run([sys.executable, "-m", "qlora_engine", "train", str(config), "--events", "-"],
                         capture_output=True, text=True)
    events = [json.loads(line) for line in out.stdout.splitlines()]
    failed = [e for e in events if e["event"] == "run_failed"]
    assert failed and failed[0]["error_type"] == "ModelError" and "Traceback" in failed[0]["traceback"]


def test_validation_is_evaluated_every_n_steps_and_at_the_end(tiny_cfg, tmp_path):
    rows = [{"text": f"sample number {i} says hello"} for i in range(10)]
    data = tmp_path / "ten.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    sink = ListSink()
    run(tiny_cfg(f"data.path={data}", "data.validation_split=0.2", "train.eval_steps=2", "train.max_steps=5"), sink)
    evals = sink.of(EvalResult)
    assert [e.step for e in evals] == [2, 4, 5]
    assert all(e.tokens > 0 and e.loss > 0 for e in evals)
    assert evals[-1].loss < evals[0].loss


def test_packed_training_counts_real_tokens_and_learns(tiny_cfg):
    sink = ListSink()
    run(tiny_cfg("data.packing=true", "data.max_length=64", "train.max_steps=20", "train.micro_batch_size=1"), sink)
    steps = sink.of(StepMetrics)
    assert all(0 < s.tokens <= 64 for s in steps)
    assert steps[-1].loss < 0.6 * steps[0].loss
