"""Fixtures of the hostile-input corpus; the case format lives in ``hostile_harness.py``.

A test file here writes a table of :class:`hostile_harness.Case` rows and one test::

    @pytest.mark.parametrize("case", CASES, ids=ids(CASES))
    def test_case(case, run_case):
        run_case(case)

``run_case`` builds the case's input in a fresh folder, runs the command (in this process, or in
a child with a timeout when ``case.subprocess``), and checks the outcome
(:func:`hostile_harness.check_outcome`).
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from faults_support import make_cfg, write_data  # noqa: E402
from hostile_harness import Case, Workspace, check_outcome, run_in_process, run_subprocess, snapshot  # noqa: E402

from qlora_engine.events import ListSink  # noqa: E402


@pytest.fixture
def workspace(tmp_path, tiny_model_dir, monkeypatch) -> Workspace:
    """A fresh folder with the engine's cache inside it (archives and tokenized data land there)."""
    monkeypatch.setenv("QLORA_STUDIO_CACHE", str(tmp_path / "cache"))
    return Workspace(tmp_path, tiny_model_dir)


@pytest.fixture
def run_case(workspace, monkeypatch):
    """Run one :class:`Case` and check its outcome; returns the :class:`Outcome`."""

    def run(case: Case):
        args = case.build(workspace)
        before = snapshot(workspace.tmp)
        if case.subprocess:
            env = {"QLORA_STUDIO_CACHE": str(workspace.tmp / "cache"), **case.env}
            outcome = run_subprocess(args, case.timeout, env)
        else:
            for k, v in case.env.items():
                monkeypatch.setenv(k, v)
            outcome = run_in_process(args, monkeypatch)
        check_outcome(case, workspace, outcome, before)
        return outcome

    return run


@pytest.fixture(scope="session")
def faults_base(tmp_path_factory, tiny_model_dir):
    """One finished run of the tiny model: checkpoints at steps 1, 2, 3 and the adapter."""
    from qlora_engine.runner import run

    root = tmp_path_factory.mktemp("faults-base")
    data = write_data(root)
    cfg = make_cfg(tiny_model_dir, data, root / "run")
    run(cfg, ListSink())
    return {"root": root, "data": data, "run": root / "run", "model": tiny_model_dir}
