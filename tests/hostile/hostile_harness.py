"""The format of the hostile-input corpus: one :class:`Case` per bad input or fault, one runner.

A case builds its input in a fresh :class:`Workspace` (a temporary folder and the tiny test
model), names the ``qlora-engine`` command a user would type, and states the exact outcome:

- ``error``: the engine error's type name (``"ConfigError"``, ``"DataError"``, ...); ``"usage"``
  for an argparse usage error; ``None`` when no typed error is expected (a success, or a
  command that reports a verdict such as ``inspect-model``'s "unusable");
- ``field`` / ``file`` / ``line``: the place the error must carry as attributes (``file`` is
  matched against the end of the error's file, so a bare name works);
- ``code``: the exit code (default: 2 for an error, 0 otherwise);
- ``says``: fragments the user's stderr must contain (case-insensitive);
- ``subprocess``: run ``python -m qlora_engine`` in a child with ``timeout`` seconds (for what can
  hang, eat memory or die: a FIFO, an alias bomb); otherwise ``main()`` runs in this process.

Every case is also checked for what must never happen: a Python traceback on stderr, an
"internal error" for a mistake the user made, a file that existed before the command changed or
gone ("nothing lost"), or an adapter written by a command that failed.

Other test files in this folder import the format: ``from hostile_harness import Case, Workspace``
(``conftest.py`` puts this folder on ``sys.path``) and run a case with the ``run_case`` fixture.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import io
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
ROW = '{"text": "hello there"}\n'
ROWS = '{"text": "hello there"}\n{"text": "general kenobi"}\n'


@dataclass
class Workspace:
    """A case's folder: ``tmp`` (empty at the start) and ``model`` (the shared tiny model: never
    damage it in place; :meth:`model_copy` gives a private copy to break)."""

    tmp: Path
    model: Path

    def write(self, name: str, content: str | bytes) -> Path:
        path = self.tmp / name
        path.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(content, bytes):
            path.write_bytes(content)
        else:
            path.write_text(content, encoding="utf-8")
        return path

    def data(self, name: str = "train.jsonl", content: str | bytes = ROWS) -> Path:
        return self.write(name, content)

    def config(
        self,
        *lines: str,
        model: Path | str | None = None,
        data: Path | str | None = None,
        name: str = "run.yaml",
        max_steps: int | None = 1,
    ) -> Path:
        """A valid config (tiny model, two rows, one step) plus ``lines`` of ``section.field: value``
        (YAML values) that replace the defaults: the one thing a case makes wrong."""
        data = data if data is not None else self.data()
        model = model if model is not None else self.model
        text = config_text(*lines, model=model, data=data, out=self.tmp / "run", max_steps=max_steps)
        return self.write(name, text)

    def model_copy(self, edit: Callable[[Path], Any] | None = None, name: str = "model") -> Path:
        folder = self.tmp / name
        shutil.copytree(self.model, folder)
        if edit is not None:
            edit(folder)
        return folder


def config_text(*lines: str, model: Any = "m", data: Any = "d", out: Any = "o", max_steps: int | None = 1) -> str:
    """The YAML of :meth:`Workspace.config` (sections model, data, output, train, then new ones)."""
    values: dict[str, dict[str, str]] = {
        "model": {"ref": json.dumps(str(model))},
        "data": {"path": json.dumps(str(data))},
        "output": {"dir": json.dumps(str(out))},
        "train": {"device": "cpu"},
    }
    if max_steps is not None:
        values["train"]["max_steps"] = str(max_steps)
    for line in lines:
        key, _, value = line.partition(":")
        section, _, fld = key.strip().partition(".")
        values.setdefault(section, {})[fld] = value.strip()
    return "".join(
        f"{section}:\n" + "".join(f"  {k}: {v}\n" for k, v in fields.items()) for section, fields in values.items()
    )


def line_of(text: str, field_path: str) -> int:
    """The 1-based line of ``section.field`` (or a bare ``section``) in YAML written by :func:`config_text`."""
    section, _, fld = field_path.partition(".")
    rows = text.splitlines()
    start = rows.index(f"{section}:")
    if not fld:
        return start + 1
    for i in range(start + 1, len(rows)):
        if rows[i].startswith(f"  {fld}:"):
            return i + 1
    raise KeyError(field_path)


@dataclass
class Outcome:
    code: int
    stdout: str
    stderr: str
    error: dict[str, Any] | None = None
    """The engine error the command ended with (``QLoRAError.to_dict()``), when it is known."""


@dataclass(frozen=True)
class Case:
    """One hostile input or fault and its exact expected outcome (see the module docstring)."""

    name: str
    build: Callable[[Workspace], list[str]]
    error: str | None
    field: str | None = None
    file: str | None = None
    line: int | None = None
    says: tuple[str, ...] = ()
    code: int | None = None
    subprocess: bool = False
    timeout: float = 60.0
    check: Callable[[Workspace, Outcome], None] | None = None
    """Further assertions after the run (the run folder's state, a warning's wording)."""
    env: dict[str, str] = dataclasses.field(default_factory=dict)

    @property
    def exit_code(self) -> int:
        if self.code is not None:
            return self.code
        return 2 if self.error else 0


# -- running -----------------------------------------------------------------------------------


def run_in_process(args: list[str], monkeypatch: Any) -> Outcome:
    """``qlora_engine.cli.main(args)`` in this process; the error it ends with is recorded on its
    way to the one function that prints user errors (which still prints it)."""
    from qlora_engine import cli

    seen: list[Any] = []
    real_fail = cli._fail

    def recording_fail(e: Any) -> int:
        seen.append(e)
        return real_fail(e)

    monkeypatch.setattr(cli, "_fail", recording_fail)
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = cli.main(args)
        except SystemExit as e:  # argparse's usage errors
            code = e.code if isinstance(e.code, int) else 2
            seen.append("usage")
    error = None
    if seen:
        error = {"type": "usage"} if seen[-1] == "usage" else seen[-1].to_dict()
    return Outcome(int(code), out.getvalue(), err.getvalue(), error)


def run_subprocess(args: list[str], timeout: float, env: dict[str, str] | None = None) -> Outcome:
    """``python -m qlora_engine ARGS`` in a child with a wall-clock limit (a hang fails the case).

    With ``--events -`` the error comes back typed from the ``run_failed`` event; otherwise only
    the text on stderr is known (``error`` stays None and ``field``/``file`` are matched in it).
    """
    child_env = {**os.environ, "PYTHONPATH": str(ROOT), **(env or {})}
    try:
        proc = subprocess.run(
            [sys.executable, "-m", "qlora_engine", *args],
            capture_output=True,
            text=True,
            timeout=timeout,
            env=child_env,
            stdin=subprocess.DEVNULL,
        )
    except subprocess.TimeoutExpired as e:
        raise AssertionError(f"hung: still running after {timeout} s; stderr: {e.stderr!r}") from None
    error = None
    for line in proc.stdout.splitlines():
        with contextlib.suppress(ValueError):
            event = json.loads(line)
            if isinstance(event, dict) and event.get("event") == "run_failed" and event.get("error"):
                error = event["error"]
    return Outcome(proc.returncode, proc.stdout, proc.stderr, error)


def snapshot(folder: Path) -> dict[str, str]:
    """Every file under ``folder`` (the engine's cache aside) and a hash of its bytes."""
    out = {}
    for p in sorted(folder.rglob("*")):
        if "cache" in p.relative_to(folder).parts[:1] or not p.is_file() or p.is_symlink():
            continue
        with contextlib.suppress(OSError):
            out[str(p.relative_to(folder))] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def check_outcome(case: Case, ws: Workspace, outcome: Outcome, before: dict[str, str]) -> None:
    """What every case must show: its own expectation, and nothing that must never happen."""
    err = outcome.stderr
    context = f"\n--- stderr ---\n{err}\n--- error ---\n{outcome.error}"
    assert "Traceback" not in err, f"a traceback reached the user{context}"
    assert outcome.code == case.exit_code, f"exit code {outcome.code}, expected {case.exit_code}{context}"
    if case.error not in (None, "usage"):
        assert "internal error" not in err, f"a user's mistake reported as an internal error{context}"
        first = next((ln for ln in err.splitlines() if ln.startswith("error: ")), "")
        assert first, f"no 'error: ...' line{context}"
        said = [ln for ln in err.splitlines() if ln.startswith("error: ")]
        assert len(said) == 1, f"the error was told {len(said)} times{context}"
        if outcome.error is not None:
            assert outcome.error["type"] == case.error, (
                f"error type {outcome.error['type']}, expected {case.error}{context}"
            )
            if case.field is not None:
                assert outcome.error["field"] == case.field, f"field {outcome.error['field']!r}{context}"
            if case.file is not None:
                got = (outcome.error["file"] or "").replace(os.sep, "/")
                assert got.endswith(case.file), f"file {got!r}, expected ...{case.file!r}{context}"
            if case.line is not None:
                assert outcome.error["line"] == case.line, f"line {outcome.error['line']!r}{context}"
        else:  # a child without an event stream: the place must still be in the first line
            for part in (case.field, case.file):
                if part:
                    assert part in first.replace(os.sep, "/"), f"{part!r} not in {first!r}{context}"
            if case.line is not None:
                assert f":{case.line}:" in first, f"line {case.line} not in {first!r}{context}"
    elif case.error == "usage":
        assert outcome.error is None or outcome.error["type"] == "usage", context
    else:
        assert outcome.error is None, f"unexpected error{context}"
    for fragment in case.says:
        assert fragment.lower() in err.lower(), f"{fragment!r} not on stderr{context}"
    after = snapshot(ws.tmp)
    lost = sorted(k for k, h in before.items() if after.get(k) != h)
    assert not lost, f"files changed or lost: {lost}{context}"
    if case.error:
        assert not (ws.tmp / "run" / "adapter").exists(), f"a failed command wrote an adapter{context}"
    if case.check is not None:
        case.check(ws, outcome)


def ids(cases: list[Case]) -> list[str]:
    names = [c.name for c in cases]
    dup = {n for n in names if names.count(n) > 1}
    assert not dup, f"duplicate case names: {sorted(dup)}"
    return names
