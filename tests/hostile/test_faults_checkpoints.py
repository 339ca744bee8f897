"""Off the happy path, faults: one table row per fault, its exact outcome asserted.

Damaged checkpoints (every file x flipped / same-size / truncated / missing), setups changed
before a resume, pruning after a resume from an older checkpoint, sweeps of interrupted writes.
The base run they start from is the ``faults_base`` fixture (conftest.py).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))  # --import-mode=importlib: the helper module beside this file

from faults_support import (  # noqa: E402
    DAMAGE,
    copy_run,
    dead_pid,
    engine_env,
    leftovers,
    make_cfg,
    snapshot,
    unchanged_but_events,
)

from qlora_engine import checkpoint as ckpt  # noqa: E402
from qlora_engine.errors import ResumeError  # noqa: E402
from qlora_engine.events import CheckpointSaved, ListSink, StepMetrics  # noqa: E402

pytestmark = pytest.mark.usefixtures("private_cache")


# -- 1. damaged checkpoints --------------------------------------------------------------------

CHECKPOINT_FILES = [
    "adapter_model.safetensors",
    "adapter_config.json",
    "optimizer.pt",
    "scheduler.pt",
    "rng.pt",
    "trainer_state.json",
]
DAMAGE_ROWS = [(name, how) for name in CHECKPOINT_FILES for how in DAMAGE]


@pytest.mark.parametrize(("name", "how"), DAMAGE_ROWS, ids=[f"{n}-{h}" for n, h in DAMAGE_ROWS])
def test_a_damaged_checkpoint_file_is_named_and_the_newest_intact_one_offered(faults_base, tmp_path, name, how):
    from qlora_engine.runner import run

    run_dir, cfg = copy_run(faults_base, tmp_path)
    newest = run_dir / "checkpoints" / "step-000003"
    DAMAGE[how](newest / name)
    before = snapshot(run_dir)
    with pytest.raises(ResumeError) as info:
        run(cfg, ListSink(), resume=True)
    e = info.value
    assert Path(e.checkpoint) == newest and Path(e.file) == newest / name
    assert e.what.startswith(f"damaged checkpoint: {name} is ")
    assert e.fix == f"Resume from the newest intact checkpoint: --resume {run_dir / 'checkpoints' / 'step-000002'}"
    assert "weights_only" not in str(e) + e.fix
    unchanged_but_events(before, snapshot(run_dir))
    assert leftovers(run_dir) == []


@pytest.mark.parametrize("how", ["missing", "garbled"])
def test_a_damaged_manifest_refuses_the_checkpoint(faults_base, tmp_path, how):
    from qlora_engine.runner import run

    run_dir, cfg = copy_run(faults_base, tmp_path)
    newest = run_dir / "checkpoints" / "step-000003"
    marker = newest / ckpt.MARKER
    marker.unlink() if how == "missing" else marker.write_text('{"complete": tru')
    before = snapshot(run_dir)
    with pytest.raises(ResumeError) as info:
        run(cfg, ListSink(), resume=True)
    assert Path(info.value.checkpoint) == newest and Path(info.value.file) == marker
    assert "not a complete checkpoint" in info.value.what
    assert str(run_dir / "checkpoints" / "step-000002") in info.value.fix
    unchanged_but_events(before, snapshot(run_dir))


def test_every_checkpoint_damaged_says_start_a_new_run(faults_base, tmp_path):
    from qlora_engine.runner import run

    run_dir, cfg = copy_run(faults_base, tmp_path)
    for step in (1, 2, 3):
        DAMAGE["flipped"](run_dir / "checkpoints" / f"step-00000{step}" / "optimizer.pt")
    with pytest.raises(ResumeError) as info:
        run(cfg, ListSink(), resume=str(run_dir / "checkpoints" / "step-000002"))
    assert Path(info.value.checkpoint).name == "step-000002"
    assert info.value.fix.startswith("No other intact checkpoint is left")


def test_the_offered_checkpoint_resumes_and_a_pickle_in_a_forged_checkpoint_never_runs(faults_base, tmp_path):
    """Following the fix works; and a checkpoint whose manifest was forged to match a pickle is refused
    by the loader (tensors and plain data only), with no advice to switch that check off."""
    import pickle

    from qlora_engine.runner import run

    run_dir, cfg = copy_run(faults_base, tmp_path)
    newest = run_dir / "checkpoints" / "step-000003"
    DAMAGE["flipped"](newest / "rng.pt")
    with pytest.raises(ResumeError) as info:
        run(cfg, ListSink(), resume=True)
    offered = info.value.fix.rsplit("--resume ", 1)[1]
    sink = ListSink()
    run(cfg, sink, resume=offered)
    assert [e.step for e in sink.of(StepMetrics)] == [3, 4]

    flag = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {flag}",))

    forged = run_dir / "checkpoints" / "step-000004"
    (forged / "rng.pt").write_bytes(pickle.dumps(Evil()))
    ckpt.write_marker(forged, {"step": 4})  # the manifest now matches the pickle
    with pytest.raises(ResumeError) as info:
        run(make_cfg(faults_base["model"], faults_base["data"], run_dir, "train.max_steps=5"), ListSink(), resume=True)
    assert not flag.exists()
    assert Path(info.value.file) == forged / "rng.pt" and "weights_only" not in str(info.value) + info.value.fix


# -- 2. the setup changed before --resume -----------------------------------------------------

CHANGE_ROWS = [
    ("optim.optimizer=adamw_8bit", "optim.optimizer"),
    ("optim.optimizer=paged_adamw_32bit", "optim.optimizer"),
    ("lora.rank=8", "lora"),
    ("lora.alpha=64", "lora"),
    ("quant.quant_type=fp4", "quant"),
    ("train.seed=7", "train.seed"),
    ("train.micro_batch_size=2", "train.micro_batch_size x gradient_accumulation_steps"),
    ("model.ref=OTHER", "model.ref"),
]


@pytest.mark.parametrize(
    ("override", "field"), CHANGE_ROWS, ids=[r[0].split("=")[0] + "-" + r[0].split("=")[1][:8] for r in CHANGE_ROWS]
)
def test_a_changed_setup_is_refused_before_any_file_is_rewritten(
    faults_base, tmp_path, tiny_model_no_template_dir, override, field
):
    from qlora_engine.runner import run

    override = override.replace("OTHER", str(tiny_model_no_template_dir))
    run_dir, cfg = copy_run(faults_base, tmp_path, override)
    before = snapshot(run_dir)
    with pytest.raises(ResumeError) as info:
        run(cfg, ListSink(), resume=True)
    assert info.value.field == field and Path(info.value.checkpoint).name == "step-000003"
    assert info.value.what.startswith("cannot resume, the setup changed since this checkpoint")
    unchanged_but_events(before, snapshot(run_dir))


# -- 3. pruning after a resume from an older checkpoint -----------------------------------------


class ExistsOnSave(ListSink):
    """Records, at the moment each checkpoint is announced, which checkpoints exist."""

    def __init__(self, ckpt_dir: Path) -> None:
        super().__init__()
        self.ckpt_dir, self.seen = ckpt_dir, []

    def emit(self, e) -> None:
        super().emit(e)
        if isinstance(e, CheckpointSaved):
            self.seen.append((Path(e.path).name, sorted(p.name for p in self.ckpt_dir.iterdir())))


def test_pruning_never_deletes_the_checkpoint_just_written_nor_the_resumed_one(faults_base, tmp_path):
    from qlora_engine.runner import run

    run_dir, cfg = copy_run(faults_base, tmp_path, "train.save_total_limit=2", "train.max_steps=3")
    resumed_from = run_dir / "checkpoints" / "step-000001"
    sink = ExistsOnSave(run_dir / "checkpoints")
    run(cfg, sink, resume=str(resumed_from))
    # step-000002 and step-000003 are rewritten by the resumed run; the old step-000002/3 of the
    # first line go first (written before), never the one just saved or the one resumed from
    assert [name for name, _ in sink.seen] == ["step-000002", "step-000003"]
    for name, present in sink.seen:
        assert name in present and "step-000001" in present
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["step-000001", "step-000003"]
    assert all(ckpt.verify(p) is None for p in (run_dir / "checkpoints").iterdir())


# -- 4. interrupted writes are swept at the next start --------------------------------------------

SWEEP_ROWS = [  # (where, name pattern; {pid} is a dead or a live process)
    ("run", ".tmp-adapter-{pid}"),
    ("run", ".old-adapter-{pid}"),
    ("checkpoints", ".tmp-step-000009-{pid}"),
    ("cache/gguf", "model-0123456789ab.tmp-{pid}"),
    ("cache/data", ".0a1b2c3d.{pid}.12345.tmp"),
    ("cache/archives", ".deadbeef.{pid}.12345.partial"),
    ("cache", ".tmp-anything-{pid}"),
]


@pytest.fixture(scope="module")
def swept(faults_base, tmp_path_factory):
    """Plant every kind of leftover, of a dead and of a live process, then start: a run (which fails
    fast on a changed setup, after its start) and a new process's first use of the cache."""
    from qlora_engine.runner import run

    root = tmp_path_factory.mktemp("sweep")
    run_dir = root / "run"
    shutil.copytree(faults_base["run"], run_dir)
    cache = root / "cache"
    places = {
        "run": run_dir,
        "checkpoints": run_dir / "checkpoints",
        "cache": cache,
        "cache/gguf": cache / "gguf",
        "cache/data": cache / "data",
        "cache/archives": cache / "archives",
    }
    gone, live = dead_pid(), os.getppid()
    planted = {}
    for where, pattern in SWEEP_ROWS:
        for who, pid in (("dead", gone), ("live", live)):
            p = places[where] / pattern.format(pid=pid)
            p.mkdir(parents=True)
            (p / "part.bin").write_bytes(os.urandom(4096))
            planted[(where, pattern, who)] = p
    with pytest.raises(ResumeError):  # the start happens; the changed rank then stops it
        run(make_cfg(faults_base["model"], faults_base["data"], run_dir, "lora.rank=8"), ListSink(), resume=True)
    out = subprocess.run(
        [sys.executable, "-c", "from qlora_engine.paths import cache_dir; cache_dir()"],
        env=engine_env(QLORA_STUDIO_CACHE=str(cache)),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    return planted


@pytest.mark.parametrize(("where", "pattern"), SWEEP_ROWS, ids=[r[0] + ":" + r[1].split("{")[0] for r in SWEEP_ROWS])
def test_leftovers_of_dead_writers_are_swept_and_live_ones_kept(swept, where, pattern):
    assert not swept[(where, pattern, "dead")].exists()
    assert (swept[(where, pattern, "live")] / "part.bin").is_file()  # a live process may be writing it now
