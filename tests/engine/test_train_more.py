"""Training more after a run ended: `--more N` runs N more steps on a schedule stretched to the new end.

Also: `--resume` never takes the next argument, a finished run's plain `--resume` says how to
train more instead of training nothing, and a warmup longer than the run is scaled with a
warning that names the field.
"""

from __future__ import annotations

import subprocess
import sys

import pytest

from qlora_engine.events import CheckpointSaved, ListSink, LogLine, RunFinished, StepMetrics, from_json
from qlora_engine.optim import lr_factor, warmup_for
from qlora_engine.runner import run

PEAK = 1e-2


def cli(*args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "qlora_engine", "train", *args], capture_output=True, text=True, timeout=timeout
    )


@pytest.fixture
def finished_run(tiny_cfg, tmp_path):
    """A tiny run of 8 cosine steps (warmup 2), finished: its learning rate has decayed to 0."""
    cfg = tiny_cfg("optim.scheduler=cosine", "optim.warmup_steps=2", f"optim.learning_rate={PEAK}")
    config = tmp_path / "run.yaml"
    cfg.save(config)
    sink = ListSink()
    run(cfg, sink)
    steps = sink.of(StepMetrics)
    assert [s.step for s in steps] == list(range(1, 9))
    return cfg, config, steps


def test_more_trains_n_more_steps_on_the_stretched_schedule(finished_run):
    cfg, config, before = finished_run
    out = cli(str(config), "--more", "5", "--events", "-")
    assert out.returncode == 0, out.stderr
    events = [from_json(line) for line in out.stdout.splitlines()]
    steps = [e for e in events if isinstance(e, StepMetrics)]
    assert [s.step for s in steps] == [9, 10, 11, 12, 13]
    assert all(s.total_steps == 13 for s in steps)
    # The schedule is the one a 13-step run would have had: the first extra step trains at the
    # stretched cosine's value for step 9, not at the 0 the 8-step run ended on, and it decays.
    expected = [PEAK * lr_factor("cosine", k, 2, 13) for k in range(8, 13)]
    assert [s.learning_rate for s in steps] == pytest.approx(expected, rel=1e-6)
    assert steps[0].learning_rate > 0.3 * PEAK and steps[-1].learning_rate < steps[0].learning_rate
    # and the extra steps really train: the loss keeps falling from where the run stopped
    assert sum(s.loss for s in steps[-2:]) / 2 < before[-1].loss
    finished = [e for e in events if isinstance(e, RunFinished)][-1]
    assert finished.step == 13 and not finished.stopped_early
    assert [e.step for e in events if isinstance(e, CheckpointSaved)][-1] == 13
    assert "max_steps: 13" in (cfg.output_dir / "config.yaml").read_text()

    # --more again continues from 13
    again = cli(str(config), "--more", "2", "--events", "-")
    assert again.returncode == 0, again.stderr
    assert [e.step for e in map(from_json, again.stdout.splitlines()) if isinstance(e, StepMetrics)] == [14, 15]


def test_plain_resume_of_a_finished_run_says_how_to_train_more(finished_run):
    _, config, _ = finished_run
    out = cli(str(config), "--resume")
    assert out.returncode == 2
    assert "already trained its 8 steps" in out.stderr and "--more N" in out.stderr


def test_resume_never_takes_the_next_argument(finished_run):
    """`--resume train.max_steps=10`: the override is an override, not a checkpoint name."""
    _, config, _ = finished_run
    out = cli(str(config), "--resume", "train.max_steps=10", "--events", "-")
    assert out.returncode == 0, out.stderr
    steps = [e.step for e in map(from_json, out.stdout.splitlines()) if isinstance(e, StepMetrics)]
    assert steps == [9, 10]


def test_more_needs_a_checkpoint_and_a_positive_number(tiny_cfg, tmp_path):
    config = tmp_path / "run.yaml"
    tiny_cfg().save(config)
    out = cli(str(config), "--more", "5")
    assert out.returncode == 2 and "no complete checkpoint" in out.stderr
    out = cli(str(config), "--more", "5", "--resume")
    assert out.returncode == 2 and "use one of them" in out.stderr


def test_a_warmup_longer_than_the_run_is_scaled_and_named(tiny_cfg):
    """The default 10 warmup steps in an 8-step run: one step of warmup, and a warning naming the field."""
    sink = ListSink()
    run(tiny_cfg("optim.warmup_steps=10", "optim.scheduler=cosine", f"optim.learning_rate={PEAK}"), sink)
    notes = [e.message for e in sink.of(LogLine) if e.level == "warning" and "optim.warmup_steps" in e.message]
    assert len(notes) == 1 and "10 warmup steps" in notes[0] and "1 step" in notes[0]
    lrs = [s.learning_rate for s in sink.of(StepMetrics)]
    assert lrs[0] == pytest.approx(PEAK / 2) and lrs[1] == pytest.approx(PEAK)  # warmed up after one step
    assert warmup_for(3, 8) == (3, None) and warmup_for(0, 8) == (0, None)
    assert warmup_for(10, 100)[1] is None and warmup_for(60, 100)[0] == 10
