"""Off the happy path, faults: one table row per fault, its exact outcome asserted.

Signals to a live training process (SIGINT, SIGTERM, SIGKILL, the app's abort line), and two
Ctrl-C in a long C call counted as two.
The base run they start from is the ``faults_base`` fixture (conftest.py).
"""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))  # --import-mode=importlib: the helper module beside this file

from faults_support import (  # noqa: E402
    LiveRun,
    engine_env,
    leftovers,
    make_cfg,
)

from qlora_engine import checkpoint as ckpt  # noqa: E402

pytestmark = pytest.mark.usefixtures("private_cache")


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
def signalled(faults_base, tmp_path_factory):
    """Every signal scenario, two at a time (each a real ``qlora_engine train`` process)."""
    from concurrent.futures import ThreadPoolExecutor

    root = tmp_path_factory.mktemp("signals")
    folders = {name: root / f"case{i}" for i, name in enumerate(SIGNAL_ROWS)}
    for f in folders.values():
        f.mkdir()
    with ThreadPoolExecutor(max_workers=2) as pool:
        futures = {
            n: pool.submit(_signal_scenario, n, f, faults_base["model"], faults_base["data"])
            for n, f in folders.items()
        }
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

    proc = subprocess.Popen(
        [sys.executable, "-c", COALESCE], env=engine_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    assert proc.stdout.readline().strip() == "in C"
    time.sleep(0.3)
    proc.send_signal(signal.SIGINT)
    time.sleep(0.3)  # apart, as a person presses twice; both land while the C call runs
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    assert out.strip() == "aborted True", err
