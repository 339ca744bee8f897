"""Off the happy path, faults: one table row per fault, its exact outcome asserted.

A real full disk (the kernel's EFBIG under RLIMIT_FSIZE, ENOSPC on a small tmpfs), read-only and
file-in-the-way outputs.
The base run they start from is the ``faults_base`` fixture (conftest.py).
"""

from __future__ import annotations

import errno
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))  # --import-mode=importlib: the helper module beside this file

from faults_support import (  # noqa: E402
    LiveRun,
    copy_run,
    engine_env,
    every_file,
    file_size_limit,
    leftovers,
    limited_child,
    make_cfg,
    snapshot,
    try_mount,
    unmount,
)

from qlora_engine import checkpoint as ckpt  # noqa: E402
from qlora_engine.errors import ConfigError, DiskFullError, ExportError, WriteError  # noqa: E402
from qlora_engine.events import ListSink  # noqa: E402

pytestmark = pytest.mark.usefixtures("private_cache")


# -- 6. a real full disk ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def trainer(faults_base, tmp_path_factory):
    """A set-up trainer of its own run folder with one good checkpoint and an adapter."""
    from qlora_engine.runner import build_trainer

    root = tmp_path_factory.mktemp("disk")
    t = build_trainer(
        make_cfg(faults_base["model"], faults_base["data"], root / "run", "train.max_steps=1"), ListSink()
    )
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
def test_efbig_during_an_export_leaves_no_partial_folder(faults_base, tmp_path, fmt):
    from qlora_engine.export import export

    out = tmp_path / f"out-{fmt}"
    with file_size_limit(4096), pytest.raises(DiskFullError) as info:
        export(faults_base["run"], fmt, out)
    assert_disk_full(info.value, out)
    assert not out.exists() and f"nothing was written to {out}" in info.value.what


def test_efbig_in_a_cli_run_exits_2_naming_the_checkpoint_and_keeps_the_earlier_ones(faults_base, tmp_path):
    run_dir, cfg = copy_run(faults_base, tmp_path, "train.max_steps=5")
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


def test_enospc_on_a_full_tmpfs_while_checkpointing(faults_base, small_tmpfs):
    from qlora_engine.runner import run

    run_dir = small_tmpfs / "run"
    shutil.copytree(faults_base["run"], run_dir, ignore=shutil.ignore_patterns("step-000001", "step-000002"))
    filler = small_tmpfs / "filler"
    free = shutil.disk_usage(small_tmpfs).free
    filler.write_bytes(b"\0" * max(0, free - 64 * 1024))  # leave room for the logs, not for a checkpoint
    before = snapshot(run_dir / "checkpoints")
    with pytest.raises(DiskFullError) as info:
        run(make_cfg(faults_base["model"], faults_base["data"], run_dir, "train.max_steps=4"), ListSink(), resume=True)
    assert_disk_full(info.value, run_dir / "checkpoints" / "step-000004")
    assert "no space left on the device" in info.value.what
    assert snapshot(run_dir / "checkpoints") == before
    filler.unlink()


def test_a_disk_already_full_at_the_start_is_named_not_a_traceback(faults_base, small_tmpfs):
    from qlora_engine.runner import run

    filler = small_tmpfs / "filler"
    with open(filler, "wb") as fh, pytest.raises(OSError) as full:  # fill it to the last block
        while True:
            fh.write(b"\0" * 65536)
    assert full.value.errno == errno.ENOSPC
    with pytest.raises(DiskFullError) as info:
        run(make_cfg(faults_base["model"], faults_base["data"], small_tmpfs / "run"), ListSink())
    assert Path(info.value.file) == small_tmpfs / "run" / "run.lock"
    assert info.value.what.startswith(f"disk full at {small_tmpfs / 'run' / 'run.lock'}, about ")
    assert leftovers(small_tmpfs / "run") == []


def test_enospc_on_a_full_tmpfs_during_an_adapter_export(faults_base, small_tmpfs):
    from qlora_engine.export import export

    filler = small_tmpfs / "filler"
    filler.write_bytes(b"\0" * (shutil.disk_usage(small_tmpfs).free - 16 * 1024))
    with pytest.raises(DiskFullError) as info:
        export(faults_base["run"], "adapter", small_tmpfs / "out")
    assert_disk_full(info.value, small_tmpfs / "out")
    assert not (small_tmpfs / "out").exists()


# -- 7. outputs that cannot be written ------------------------------------------------------------


def test_an_output_dir_that_is_a_file_is_named(faults_base, tmp_path):
    from qlora_engine.runner import run

    target = tmp_path / "run"
    target.write_text("not a folder")
    with pytest.raises(ConfigError) as info:
        run(make_cfg(faults_base["model"], faults_base["data"], target), ListSink())
    assert info.value.field == "output.dir" and Path(info.value.file) == target
    assert "is a file, not a folder; nothing was written" in info.value.what
    assert target.read_text() == "not a folder"


def test_an_output_dir_that_is_a_file_exits_2_from_the_cli(faults_base, tmp_path):
    target = tmp_path / "run"
    target.write_text("not a folder")
    config = tmp_path / "run.yaml"
    make_cfg(faults_base["model"], faults_base["data"], target).save(config)
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


def test_a_read_only_output_dir_is_named(faults_base, read_only):
    from qlora_engine.runner import run

    with pytest.raises(ConfigError) as info:
        run(make_cfg(faults_base["model"], faults_base["data"], read_only / "run"), ListSink())
    assert info.value.field == "output.dir" and Path(info.value.file) == read_only
    assert "cannot be written" in info.value.what and not (read_only / "run").exists()


def test_an_export_into_a_read_only_folder_is_named(faults_base, read_only):
    from qlora_engine.export import export

    with pytest.raises(WriteError) as info:
        export(faults_base["run"], "adapter", read_only / "out")
    assert Path(info.value.file) == read_only and "read-only file system" in info.value.what


def test_an_export_onto_an_existing_file_is_refused(faults_base, tmp_path):
    from qlora_engine.export import export

    target = tmp_path / "out"
    target.write_text("keep me")
    with pytest.raises(ExportError):
        export(faults_base["run"], "adapter", target)
    with pytest.raises(ExportError, match="is not a folder"):
        export(faults_base["run"], "adapter", target, overwrite=True)
    assert target.read_text() == "keep me"
