"""Off the happy path, faults: one table row per fault, its exact outcome asserted.

Damaged checkpoints (every file x flipped / same-size / truncated / missing), setups changed
before a resume, pruning after a resume from an older checkpoint, sweeps of interrupted
writes, signals to a live training process, a real full disk (the kernel's EFBIG under
RLIMIT_FSIZE, ENOSPC on a small tmpfs), read-only and file-in-the-way outputs, and hub tokens
given every way a token can be given, searched for in every byte the engine wrote.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))  # --import-mode=importlib: the helper module beside this file

from faults_support import (  # noqa: E402
    DAMAGE,
    LiveRun,
    dead_pid,
    engine_env,
    every_file,
    fake_hub_snapshot,
    file_size_limit,
    leftovers,
    limited_child,
    make_cfg,
    snapshot,
    try_mount,
    unmount,
    write_data,
)

from qlora_engine import checkpoint as ckpt  # noqa: E402
from qlora_engine.errors import ConfigError, DiskFullError, ExportError, ResumeError, WriteError  # noqa: E402
from qlora_engine.events import CheckpointSaved, ListSink, StepMetrics  # noqa: E402

pytestmark = pytest.mark.usefixtures("private_cache")


@pytest.fixture(scope="module")
def base(tmp_path_factory, tiny_model_dir):
    """One finished run of the tiny model: checkpoints at steps 1, 2, 3 and the adapter."""
    from qlora_engine.runner import run

    root = tmp_path_factory.mktemp("faults-base")
    data = write_data(root)
    cfg = make_cfg(tiny_model_dir, data, root / "run")
    run(cfg, ListSink())
    return {"root": root, "data": data, "run": root / "run", "model": tiny_model_dir}


def copy_run(base, tmp_path: Path, *overrides: str):
    """A fresh copy of the base run in ``tmp_path`` and its config (with ``overrides``)."""
    dst = tmp_path / "run"
    shutil.copytree(base["run"], dst)
    return dst, make_cfg(base["model"], base["data"], dst, "train.max_steps=4", *overrides)


def unchanged_but_events(before: dict[str, bytes], after: dict[str, bytes]) -> None:
    """Nothing rewritten or deleted; events.jsonl only appended to (the failure is logged there)."""
    ev_before, ev_after = before.pop("events.jsonl", b""), after.pop("events.jsonl", b"")
    assert ev_after.startswith(ev_before)
    assert after == before


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
def test_a_damaged_checkpoint_file_is_named_and_the_newest_intact_one_offered(base, tmp_path, name, how):
    from qlora_engine.runner import run

    run_dir, cfg = copy_run(base, tmp_path)
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
def test_a_damaged_manifest_refuses_the_checkpoint(base, tmp_path, how):
    from qlora_engine.runner import run

    run_dir, cfg = copy_run(base, tmp_path)
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


def test_every_checkpoint_damaged_says_start_a_new_run(base, tmp_path):
    from qlora_engine.runner import run

    run_dir, cfg = copy_run(base, tmp_path)
    for step in (1, 2, 3):
        DAMAGE["flipped"](run_dir / "checkpoints" / f"step-00000{step}" / "optimizer.pt")
    with pytest.raises(ResumeError) as info:
        run(cfg, ListSink(), resume=str(run_dir / "checkpoints" / "step-000002"))
    assert Path(info.value.checkpoint).name == "step-000002"
    assert info.value.fix.startswith("No other intact checkpoint is left")


def test_the_offered_checkpoint_resumes_and_a_pickle_in_a_forged_checkpoint_never_runs(base, tmp_path):
    """Following the fix works; and a checkpoint whose manifest was forged to match a pickle is refused
    by the loader (tensors and plain data only), with no advice to switch that check off."""
    import pickle

    from qlora_engine.runner import run

    run_dir, cfg = copy_run(base, tmp_path)
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
        run(make_cfg(base["model"], base["data"], run_dir, "train.max_steps=5"), ListSink(), resume=True)
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
    base, tmp_path, tiny_model_no_template_dir, override, field
):
    from qlora_engine.runner import run

    override = override.replace("OTHER", str(tiny_model_no_template_dir))
    run_dir, cfg = copy_run(base, tmp_path, override)
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


def test_pruning_never_deletes_the_checkpoint_just_written_nor_the_resumed_one(base, tmp_path):
    from qlora_engine.runner import run

    run_dir, cfg = copy_run(base, tmp_path, "train.save_total_limit=2", "train.max_steps=3")
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
def swept(base, tmp_path_factory):
    """Plant every kind of leftover, of a dead and of a live process, then start: a run (which fails
    fast on a changed setup, after its start) and a new process's first use of the cache."""
    from qlora_engine.runner import run

    root = tmp_path_factory.mktemp("sweep")
    run_dir = root / "run"
    shutil.copytree(base["run"], run_dir)
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
        run(make_cfg(base["model"], base["data"], run_dir, "lora.rank=8"), ListSink(), resume=True)
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


# -- 5. signals to a live run -------------------------------------------------------------------


def kept_text(run_dir: Path) -> str:
    kept = ckpt.latest_checkpoint(run_dir / "checkpoints")
    return f"kept: {kept} (continue with --resume)" if kept else "nothing was saved (no checkpoint yet)"


def _step(e):
    return e.get("event") == "step"


def _phase(name):
    return lambda e: e.get("event") == "phase" and e.get("phase") == name


ABORT_LINE = "abort"  # not a signal: the 'abort' control line the desktop app sends on stdin

SIGNAL_ROWS = {
    # name: (when to signal, signals, exit code, adapter expected, outcome event)
    "SIGTERM while training": (_step, [signal.SIGTERM], 0, True, "run_finished"),
    "SIGTERM while loading the model": (_phase("loading_model"), [signal.SIGTERM], 143, False, "run_finished"),
    "SIGTERM while saving a checkpoint": (_phase("saving"), [signal.SIGTERM], 0, True, "run_finished"),
    "Ctrl-C twice": (_step, [signal.SIGINT, signal.SIGINT], 130, False, "run_failed"),
    "SIGTERM twice while saving": (_phase("saving"), [signal.SIGTERM, signal.SIGTERM], 143, False, "run_failed"),
    "SIGTERM then Ctrl-C": (_step, [signal.SIGTERM, signal.SIGINT], 130, False, "run_failed"),
    "Ctrl-C then SIGTERM": (_step, [signal.SIGINT, signal.SIGTERM], 143, False, "run_failed"),
    "abort on the control line": (lambda e: _step(e) and e["step"] >= 3, [ABORT_LINE], 130, False, "run_finished"),
}


def _signal_scenario(name: str, folder: Path, model: Path, data: Path) -> dict:
    when, signals, *_ = SIGNAL_ROWS[name]
    # 8 micro-batches a step: a step lasts long enough for the second signal to land inside the run
    cfg = make_cfg(
        model,
        data,
        folder / "run",
        "train.max_steps=100000",
        "train.save_steps=2",
        "train.save_total_limit=3",
        "train.gradient_accumulation_steps=8",
    )
    config = folder / "run.yaml"
    cfg.save(config)
    live = LiveRun(config, *(["--control-stdin"] if ABORT_LINE in signals else []), stdin=ABORT_LINE in signals)
    try:
        live.wait_event(when)
        for i, signum in enumerate(signals):
            if signum == ABORT_LINE:
                live.proc.stdin.write("abort\n")
                live.proc.stdin.flush()
                continue
            live.signal(signum)
            if i + 1 < len(signals):  # the next one only once this one is taken (signals do not queue)
                live.wait_stderr("stopping after this step and saving")
    except BaseException:
        live.proc.kill()
        raise
    code, stderr = live.finish()
    return {"code": code, "stderr": stderr, "events": live.events, "run": folder / "run", "live": live}


@pytest.fixture(scope="module")
def signalled(base, tmp_path_factory):
    """Every signal scenario, two at a time (each a real ``qlora_engine train`` process)."""
    from concurrent.futures import ThreadPoolExecutor

    root = tmp_path_factory.mktemp("signals")
    folders = {name: root / f"case{i}" for i, name in enumerate(SIGNAL_ROWS)}
    for f in folders.values():
        f.mkdir()
    with ThreadPoolExecutor(max_workers=2) as pool:
        futures = {n: pool.submit(_signal_scenario, n, f, base["model"], base["data"]) for n, f in folders.items()}
        return {n: f.result() for n, f in futures.items()}


@pytest.mark.parametrize("name", list(SIGNAL_ROWS))
def test_a_signal_stops_or_aborts_cleanly(signalled, name):
    _, signals, code, adapter, outcome = SIGNAL_ROWS[name]
    r = signalled[name]
    run_dir = r["run"]
    assert r["code"] == code, r["stderr"]
    assert leftovers(run_dir, run_dir / "checkpoints") == []  # no lock, no half-written folder
    checkpoints = sorted((run_dir / "checkpoints").iterdir()) if (run_dir / "checkpoints").exists() else []
    assert all(ckpt.verify(p) is None for p in checkpoints)  # every checkpoint kept intact
    last = r["live"].of(outcome)
    assert len(last) == 1, [e["event"] for e in r["events"]][-5:]
    assert (run_dir / "adapter").is_dir() == adapter
    assert "adapter: None" not in r["stderr"]
    if adapter:  # stopped at a step boundary: saved there, resumable
        assert last[0]["stopped_early"] and checkpoints[-1].name == ckpt.checkpoint_name(last[0]["step"])
    elif signals == [ABORT_LINE]:  # aborted between steps: exit 130, and it says what it kept
        assert last[0]["adapter_dir"] is None
        assert f"aborted at step {last[0]['step']}; {kept_text(run_dir)}." in r["stderr"]
    elif outcome == "run_finished":  # stopped before the first step: nothing to save, and it says so
        assert last[0]["adapter_dir"] is None and checkpoints == []
        assert "stopped before the first step at step 0; nothing was saved" in r["stderr"]
    else:  # aborted by a second signal: a run_failed event, the exit names what was kept
        assert last[0]["error_type"] == "Aborted"
        assert f"aborted; {kept_text(run_dir)}." in r["stderr"]


# -- 6. a real full disk ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def trainer(base, tmp_path_factory):
    """A set-up trainer of its own run folder with one good checkpoint and an adapter."""
    from qlora_engine.runner import build_trainer

    root = tmp_path_factory.mktemp("disk")
    t = build_trainer(make_cfg(base["model"], base["data"], root / "run", "train.max_steps=1"), ListSink())
    t.setup()
    t.train()
    yield t
    t.cleanup()


def assert_disk_full(e: DiskFullError, target: Path) -> None:
    assert Path(e.file) == target
    assert e.what.startswith(f"disk full at {target}, about ") and " needed (" in e.what
    assert "file-size limit" in e.what or "no space left" in e.what
    assert not [p for p in target.parent.iterdir() if p.name.startswith(".tmp-")]


def test_efbig_while_checkpointing_keeps_the_earlier_checkpoint(trainer):
    good = trainer.ckpt_dir / "step-000001"
    before = snapshot(good)
    trainer.step = 2
    with file_size_limit(2048), pytest.raises(DiskFullError) as info:
        trainer.save_checkpoint()
    trainer.step = 1
    assert_disk_full(info.value, trainer.ckpt_dir / "step-000002")
    assert "file-size limit" in info.value.what and not (trainer.ckpt_dir / "step-000002").exists()
    assert snapshot(good) == before and ckpt.verify(good) is None


def test_efbig_while_saving_the_adapter_keeps_the_old_adapter(trainer):
    adapter = trainer.run_dir / "adapter"
    before = snapshot(adapter)
    with file_size_limit(2048), pytest.raises(DiskFullError) as info:
        trainer.save_adapter()
    assert_disk_full(info.value, adapter)
    assert f"{adapter} is unchanged" in info.value.what and snapshot(adapter) == before


@pytest.mark.parametrize("fmt", ["adapter", "merged", "gguf"])
def test_efbig_during_an_export_leaves_no_partial_folder(base, tmp_path, fmt):
    from qlora_engine.export import export

    out = tmp_path / f"out-{fmt}"
    with file_size_limit(4096), pytest.raises(DiskFullError) as info:
        export(base["run"], fmt, out)
    assert_disk_full(info.value, out)
    assert not out.exists() and f"nothing was written to {out}" in info.value.what


def test_efbig_in_a_cli_run_exits_2_naming_the_checkpoint_and_keeps_the_earlier_ones(base, tmp_path):
    run_dir, cfg = copy_run(base, tmp_path, "train.max_steps=5")
    config = tmp_path / "run.yaml"
    cfg.save(config)
    before = snapshot(run_dir / "checkpoints")
    limit = max(p.stat().st_size for p in every_file(run_dir / "checkpoints", run_dir / "adapter")) // 2
    live = LiveRun(config, "--resume", preexec_fn=limited_child(limit))
    code, stderr = live.finish(timeout=120)
    failed = live.of("run_failed")
    assert code == 2, stderr
    assert failed and failed[0]["error"]["type"] == "DiskFullError"
    assert Path(failed[0]["error"]["file"]) == run_dir / "checkpoints" / "step-000004"
    assert f"error: {run_dir / 'checkpoints' / 'step-000004'}: disk full at" in stderr
    assert snapshot(run_dir / "checkpoints") == before  # every earlier checkpoint intact
    assert leftovers(run_dir, run_dir / "checkpoints") == []


@pytest.fixture
def small_tmpfs(tmp_path):
    where = tmp_path / "tmpfs"
    why = try_mount(where, "size=2m")
    if why:
        pytest.skip(f"ENOSPC variant needs a small tmpfs: {why}; the RLIMIT_FSIZE (EFBIG) cases cover a full disk")
    yield where
    unmount(where)


def test_enospc_on_a_full_tmpfs_while_checkpointing(base, small_tmpfs):
    from qlora_engine.runner import run

    run_dir = small_tmpfs / "run"
    shutil.copytree(base["run"], run_dir, ignore=shutil.ignore_patterns("step-000001", "step-000002"))
    filler = small_tmpfs / "filler"
    free = shutil.disk_usage(small_tmpfs).free
    filler.write_bytes(b"\0" * max(0, free - 64 * 1024))  # leave room for the logs, not for a checkpoint
    before = snapshot(run_dir / "checkpoints")
    with pytest.raises(DiskFullError) as info:
        run(make_cfg(base["model"], base["data"], run_dir, "train.max_steps=4"), ListSink(), resume=True)
    assert_disk_full(info.value, run_dir / "checkpoints" / "step-000004")
    assert "no space left on the device" in info.value.what
    assert snapshot(run_dir / "checkpoints") == before
    filler.unlink()


def test_a_disk_already_full_at_the_start_is_named_not_a_traceback(base, small_tmpfs):
    from qlora_engine.runner import run

    filler = small_tmpfs / "filler"
    with open(filler, "wb") as fh, pytest.raises(OSError) as full:  # fill it to the last block
        while True:
            fh.write(b"\0" * 65536)
    assert full.value.errno == errno.ENOSPC
    with pytest.raises(DiskFullError) as info:
        run(make_cfg(base["model"], base["data"], small_tmpfs / "run"), ListSink())
    assert Path(info.value.file) == small_tmpfs / "run" / "run.lock"
    assert info.value.what.startswith(f"disk full at {small_tmpfs / 'run' / 'run.lock'}, about ")
    assert leftovers(small_tmpfs / "run") == []


def test_enospc_on_a_full_tmpfs_during_an_adapter_export(base, small_tmpfs):
    from qlora_engine.export import export

    filler = small_tmpfs / "filler"
    filler.write_bytes(b"\0" * (shutil.disk_usage(small_tmpfs).free - 16 * 1024))
    with pytest.raises(DiskFullError) as info:
        export(base["run"], "adapter", small_tmpfs / "out")
    assert_disk_full(info.value, small_tmpfs / "out")
    assert not (small_tmpfs / "out").exists()


# -- 7. outputs that cannot be written ------------------------------------------------------------


def test_an_output_dir_that_is_a_file_is_named(base, tmp_path):
    from qlora_engine.runner import run

    target = tmp_path / "run"
    target.write_text("not a folder")
    with pytest.raises(ConfigError) as info:
        run(make_cfg(base["model"], base["data"], target), ListSink())
    assert info.value.field == "output.dir" and Path(info.value.file) == target
    assert "is a file, not a folder; nothing was written" in info.value.what
    assert target.read_text() == "not a folder"


def test_an_output_dir_that_is_a_file_exits_2_from_the_cli(base, tmp_path):
    target = tmp_path / "run"
    target.write_text("not a folder")
    config = tmp_path / "run.yaml"
    make_cfg(base["model"], base["data"], target).save(config)
    out = subprocess.run(
        [sys.executable, "-m", "qlora_engine", "train", str(config)],
        env=engine_env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 2
    assert f"error: {target}: output.dir: {target} is a file, not a folder; nothing was written." in out.stderr
    assert "Traceback" not in out.stderr and target.read_text() == "not a folder"


@pytest.fixture
def read_only(tmp_path):
    where = tmp_path / "ro"
    why = try_mount(where, "ro,size=1m")
    if why:
        pytest.skip(f"read-only output needs a read-only mount (root ignores file modes): {why}")
    yield where
    unmount(where)


def test_a_read_only_output_dir_is_named(base, read_only):
    from qlora_engine.runner import run

    with pytest.raises(ConfigError) as info:
        run(make_cfg(base["model"], base["data"], read_only / "run"), ListSink())
    assert info.value.field == "output.dir" and Path(info.value.file) == read_only
    assert "cannot be written" in info.value.what and not (read_only / "run").exists()


def test_an_export_into_a_read_only_folder_is_named(base, read_only):
    from qlora_engine.export import export

    with pytest.raises(WriteError) as info:
        export(base["run"], "adapter", read_only / "out")
    assert Path(info.value.file) == read_only and "read-only file system" in info.value.what


def test_an_export_onto_an_existing_file_is_refused(base, tmp_path):
    from qlora_engine.export import export

    target = tmp_path / "out"
    target.write_text("keep me")
    with pytest.raises(ExportError):
        export(base["run"], "adapter", target)
    with pytest.raises(ExportError, match="is not a folder"):
        export(base["run"], "adapter", target, overwrite=True)
    assert target.read_text() == "keep me"


# -- 8. secrets never on disk ---------------------------------------------------------------------

TOKENS = {  # one distinct fake token per way a token can be given; none shaped like hf_..., so
    # only knowing the token (not a pattern) can mask it
    "HF_TOKEN env": "ZqEnvHfTokenValue000111222333",
    "HUGGING_FACE_HUB_TOKEN env": "ZqEnvHubTokenValue444555666777",
    "model ref URL": "ZqRefUrlTokenValue888999000aaa",
    "config model.token": "ZqConfigTokenValuebbbcccdddeee",
    "CLI model.token=": "ZqCliTokenValuefff000111222333",
}

DRIVER = r"""
import json, sys
from qlora_engine.cli import main
codes = {}
for name, argv in json.loads(sys.argv[1]):
    print(f"== {name}", flush=True)
    print(f"== {name}", file=sys.stderr, flush=True)
    codes[name] = main(argv)
print("CODES " + json.dumps(codes), flush=True)
"""


@pytest.fixture(scope="module")
def secrets_sweep(base, tmp_path_factory):
    """A run, a resume, an export of each kind, a failed run and ``inspect-model --json``, with a
    token given every way at once; every command through the CLI's ``main()`` in one process."""
    root = tmp_path_factory.mktemp("secrets")
    hub = root / "hub-cache"
    fake_hub_snapshot(hub, "acme/tiny", base["model"])
    ref = f"https://user:{TOKENS['model ref URL']}@huggingface.co/acme/tiny"
    run_dir = root / "run"
    first = make_cfg(base["model"], base["data"], run_dir, f"model.ref={ref}", "train.max_steps=2")
    first.save(root / "first.yaml")
    resume = make_cfg(base["model"], base["data"], run_dir, f"model.ref={ref}", "train.max_steps=3")
    text = (root / "first.yaml").read_text()  # the config file the user wrote holds a token too
    (root / "first.yaml").write_text(text.replace("token: null", f"token: {TOKENS['config model.token']}"))
    resume.save(root / "resume.yaml")
    (root / "resume.yaml").write_text(
        (root / "resume.yaml").read_text().replace("token: null", f"token: {TOKENS['config model.token']}")
    )
    bad = root / "bad.yaml"
    make_cfg(
        base["model"],
        base["data"],
        root / "failed-run",
        f"model.ref=https://user:{TOKENS['model ref URL']}@huggingface.co/acme/missing",
    ).save(bad)
    exports = {fmt: root / f"export-{fmt}" for fmt in ("adapter", "merged", "gguf")}
    commands = [
        ("train", ["train", str(root / "first.yaml"), f"model.token={TOKENS['CLI model.token=']}", "--events", "-"]),
        ("resume", ["train", str(root / "resume.yaml"), "--resume"]),
        *[
            (f"export {fmt}", ["export", str(run_dir), "--format", fmt, "--out", str(out)])
            for fmt, out in exports.items()
        ],
        ("failed run", ["train", str(bad), "--events", "-"]),
        ("inspect-model", ["inspect-model", ref, "--json"]),
    ]
    cache = root / "cache"
    env = engine_env(
        HF_TOKEN=TOKENS["HF_TOKEN env"],
        HUGGING_FACE_HUB_TOKEN=TOKENS["HUGGING_FACE_HUB_TOKEN env"],
        HF_HUB_CACHE=str(hub),
        QLORA_STUDIO_CACHE=str(cache),
    )
    out = subprocess.run(
        [sys.executable, "-c", DRIVER, json.dumps(commands)],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        cwd=root,
    )
    codes = json.loads(out.stdout.rsplit("CODES ", 1)[1])
    written = every_file(run_dir, root / "failed-run", cache, *exports.values())
    return {
        "codes": codes,
        "stdout": out.stdout,
        "stderr": out.stderr,
        "written": written,
        "run": run_dir,
        "exports": exports,
    }


def test_the_sweep_ran_every_command(secrets_sweep):
    codes = secrets_sweep["codes"]
    assert {k: v for k, v in codes.items() if k != "failed run"} == {
        "train": 0,
        "resume": 0,
        "export adapter": 0,
        "export merged": 0,
        "export gguf": 0,
        "inspect-model": 0,
    }, secrets_sweep["stderr"][-3000:]
    assert codes["failed run"] == 2
    written = secrets_sweep["written"]
    assert len(written) > 40
    # the token-bearing values were written, masked: the reference in the config and the cards
    cfg_text = (secrets_sweep["run"] / "config.yaml").read_text()
    assert "ref: https://hf_***@huggingface.co/acme/tiny" in cfg_text and "token: hf_***" in cfg_text
    assert "hf_***" in (secrets_sweep["exports"]["adapter"] / "README.md").read_text()


@pytest.mark.parametrize("channel", list(TOKENS))
def test_a_token_given_this_way_is_in_no_byte_written(secrets_sweep, channel):
    token = TOKENS[channel].encode()
    assert token not in secrets_sweep["stdout"].encode() and token not in secrets_sweep["stderr"].encode()
    found = [str(p) for p in secrets_sweep["written"] if token in p.read_bytes()]
    assert found == []


def test_the_failed_run_logged_its_error_masked(secrets_sweep):
    failed = [
        json.loads(line)
        for line in secrets_sweep["stdout"].splitlines()
        if line.startswith("{") and '"run_failed"' in line
    ]
    assert failed and failed[0]["error_type"] == "ModelError" and "'acme/missing'" in failed[0]["message"]
    events = (secrets_sweep["run"].parent / "failed-run" / "events.jsonl").read_text()
    assert '"run_failed"' in events and "Traceback" in events  # the traceback was written, scrubbed


def test_a_token_inside_the_model_path_is_scrubbed_from_checkpoints_that_still_resume(base, tmp_path, monkeypatch):
    """peft writes the model's path into adapter_config.json and README.md: scrubbed before the
    manifest is written, so the scrubbed checkpoint still verifies and resumes."""
    from qlora_engine.runner import run

    token = "ZqPathTokenValue4444555566667777"
    monkeypatch.setenv("HF_TOKEN", token)
    model = tmp_path / token / "model"
    shutil.copytree(base["model"], model)
    cfg = make_cfg(model, base["data"], tmp_path / "run", "train.max_steps=1")
    run(cfg, ListSink())
    sink = ListSink()
    run(make_cfg(model, base["data"], tmp_path / "run", "train.max_steps=2"), sink, resume=True)
    assert [e.step for e in sink.of(StepMetrics)] == [2]
    assert [str(p) for p in every_file(tmp_path / "run") if token.encode() in p.read_bytes()] == []
    assert "hf_***" in (tmp_path / "run" / "checkpoints" / "step-000001" / "adapter_config.json").read_text()


COALESCE = r"""
import hashlib, sys
from qlora_engine.cli import _install_signals
from qlora_engine.control import Aborted, RunControl
control = RunControl()
_install_signals(control)
print("in C", flush=True)
try:
    hashlib.pbkdf2_hmac("sha256", b"p", b"s", 6_000_000)  # seconds in C: Python handlers wait until it returns
    sum(range(10))
    print("not aborted", control.stop_requested, flush=True)
except Aborted:
    print("aborted", control.abort_requested, flush=True)
"""


def test_two_ctrl_c_during_a_long_c_call_are_two_not_one():
    """CPython runs a handler once for a signal that arrived twice while the main thread was in C
    (a long forward pass): the second Ctrl-C used to be swallowed. Counted through the wakeup fd."""
    import time

    proc = subprocess.Popen([sys.executable, "-c", COALESCE], env=engine_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "in C"
    time.sleep(0.3)
    proc.send_signal(signal.SIGINT)
    time.sleep(0.3)  # apart, as a person presses twice; both land while the C call runs
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    assert out.strip() == "aborted True", err
