"""Errors and decisions are data: attributes survive every crossing, and text is rendered once.

The app and every other reader branch on an error's attributes (field, file, line, checkpoint,
fix); these tests pin that the attributes reach them intact: through pickling, through the
event stream of a real run, and through the CLI's ``--events -`` before a run starts, and that
a bug (not a user error) reaches the user as one line naming a log file.
"""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import pytest

from qlora_engine import cli, errors
from qlora_engine.config import TrainConfig
from qlora_engine.decisions import Decision, ResumeBlocker
from qlora_engine.events import ListSink, RunFailed, RunStarted, describe, from_json, read_events
from qlora_engine.runner import run
from qlora_engine.train import Trainer

ALL_TYPES = list(errors.ERROR_TYPES.values())

PLACES = [
    {},
    {"field": "lora.rank"},
    {"file": "data/train.jsonl", "line": 17},
    {"file": "run.yaml", "field": "optim.learning_rate"},
    {"checkpoint": "runs/a/checkpoints/step-000010"},
    {"file": "x/optimizer.pt", "checkpoint": "x", "fix": "resume from step-000005"},
]


@pytest.mark.parametrize("cls", ALL_TYPES, ids=lambda c: c.__name__)
@pytest.mark.parametrize("place", PLACES, ids=lambda p: ",".join(p) or "none")
def test_every_error_keeps_its_attributes_through_dict_and_pickle(cls, place):
    e = cls("something is wrong", **place)
    for back in (errors.from_dict(json.loads(json.dumps(e.to_dict()))), pickle.loads(pickle.dumps(e))):
        assert type(back) is cls
        assert back.to_dict() == e.to_dict()
        assert str(back) == str(e)
    assert isinstance(e, errors.QLoRAError) and e.exit_code == 2


def test_render_puts_the_place_first_in_a_fixed_order_and_counts_the_other_problems():
    e = errors.ConfigError(
        "0 is not allowed; use at least 1",
        field="lora.rank",
        file="run.yaml",
        line=4,
        problems=[errors.Problem("0 is not allowed", field="lora.rank"), errors.Problem("bad", field="lora.alpha"),
                  errors.Problem("bad", field="optim.learning_rate")],
    )
    assert str(e) == "run.yaml:4: lora.rank: 0 is not allowed; use at least 1 (and 2 more problems)"
    assert str(errors.Problem("bad", field="lora.alpha", file="f.yaml")) == "f.yaml: lora.alpha: bad"
    # a checkpoint that is also the file is named once
    same = errors.ResumeError("damaged", file="ck", checkpoint="ck")
    assert str(same) == "ck: damaged"


def test_a_reworded_message_leaves_every_attribute_alone():
    a = errors.DataError("row is not JSON", file="t.jsonl", line=3, fix="fix the row")
    b = errors.DataError("line cannot be parsed as JSON", file="t.jsonl", line=3, fix="fix the row")
    assert str(a) != str(b)
    assert {k: v for k, v in a.to_dict().items() if k != "what"} == {k: v for k, v in b.to_dict().items() if k != "what"}


def test_decisions_and_resume_blockers_are_records_with_one_rendering():
    d = Decision("train.gradient_checkpointing", "auto", 21, "the fewest that fit 24.0 GiB", "the lowest 21 of 32 layers")
    assert Decision.from_dict(json.loads(json.dumps(d.to_dict()))) == d
    assert str(d) == "train.gradient_checkpointing auto: the lowest 21 of 32 layers (the fewest that fit 24.0 GiB)"
    r = ResumeBlocker("lora.rank", 8, 16)
    assert r.section == "lora" and str(r) == "lora.rank: 8 -> 16"


# -- the CLI ----------------------------------------------------------------------------------------


def bad_config(tmp_path, tiny_cfg):
    path = tmp_path / "run.yaml"
    text = tiny_cfg().to_yaml().replace("rank: 16", "rank: 0")
    assert "rank: 0" in text
    path.write_text(text)
    return path


def test_a_bad_config_is_one_error_line_and_with_events_a_run_failed_event(tiny_cfg, tmp_path, capsys):
    path = bad_config(tmp_path, tiny_cfg)
    assert cli.main(["train", str(path)]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.startswith("error: ") and "lora.rank" in err

    assert cli.main(["train", str(path), "--events", "-"]) == 2
    out = capsys.readouterr().out.strip().splitlines()
    (event,) = [from_json(line) for line in out]
    assert isinstance(event, RunFailed) and event.error_type == "ConfigError"
    problem = event.user_error()
    assert isinstance(problem, errors.ConfigError) and problem.field == "lora.rank"


def test_a_bug_is_one_line_naming_a_log_with_the_traceback(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("QLORA_STUDIO_CACHE", str(tmp_path / "cache"))

    def buggy(args):
        return {}["no such key"]  # a genuine KeyError from our own code path

    monkeypatch.setattr(cli, "cmd_init", buggy)
    assert cli.main(["init", "--model", "m", "--data", "d"]) == 1
    err = capsys.readouterr().err
    assert "Traceback" not in err
    first = err.splitlines()[0]
    assert first.startswith("error: internal error (KeyError") and "details in " in first
    log = tmp_path / "cache" / "logs"
    (written,) = list(log.iterdir())
    assert str(written) in first and "Traceback" in written.read_text() and "buggy" in written.read_text()

    assert cli.main(["--debug", "init", "--model", "m", "--data", "d"]) == 1
    assert "Traceback" in capsys.readouterr().err


# -- a real run ---------------------------------------------------------------------------------------


def test_a_user_error_in_a_run_reaches_the_event_file_with_its_attributes(tiny_cfg, tmp_path):
    cfg = tiny_cfg(f"data.path={tmp_path / 'missing.jsonl'}")
    sink = ListSink()
    with pytest.raises(errors.DataError):
        run(cfg, sink)
    (failed,) = sink.of(RunFailed)
    user = failed.user_error()
    assert isinstance(user, errors.DataError) and user.what and failed.log_file is None
    assert "missing.jsonl" in str(user.file or user.what)
    on_disk = [e for e in read_events(cfg.output_dir / "events.jsonl") if isinstance(e, RunFailed)]
    assert on_disk and on_disk[0].error == failed.error


def test_a_bug_in_a_run_is_an_internal_error_with_its_traceback_in_the_run_folder(tiny_cfg, monkeypatch):
    cfg = tiny_cfg("train.max_steps=3")

    def broken(self, k):
        raise ZeroDivisionError(f"a bug at micro-batch {k}")

    monkeypatch.setattr(Trainer, "micro_batch", broken)
    sink = ListSink()
    with pytest.raises(ZeroDivisionError):
        run(cfg, sink)
    (failed,) = sink.of(RunFailed)
    assert failed.error is None and failed.user_error() is None
    assert failed.message.startswith("internal error (ZeroDivisionError")
    log = cfg.output_dir / "logs"
    assert failed.log_file and str(log) in failed.log_file
    assert "a bug at micro-batch 0" in Path(failed.log_file).read_text()
    assert f"details: {failed.log_file}" in describe(failed)


def test_the_run_started_event_carries_the_plans_decisions(tiny_cfg):
    sink = ListSink()
    run(tiny_cfg("train.max_steps=1"), sink)
    (started,) = sink.of(RunStarted)
    decisions = {d.field: d for d in started.decision_list()}
    ckpt = decisions["train.gradient_checkpointing"]
    assert ckpt.requested == "auto" and ckpt.summary == "every layer checkpointed" and "no GPU" in ckpt.reason
    assert started.config["train"]["gradient_checkpointing"] == "auto"  # the config as the user wrote it
    assert "decided: train.gradient_checkpointing auto" in describe(started)
    saved = TrainConfig.load(tiny_cfg().output_dir / "config.yaml")
    assert saved.train.gradient_checkpointing == "auto"


@pytest.mark.parametrize("where", ["model", "data"])
def test_a_failure_inside_the_run_is_told_once_on_the_terminal(tiny_cfg, tmp_path, capsys, where):
    """run() reports its failure as a run_failed event, which the terminal prints; the CLI adds nothing."""
    cfg = tiny_cfg()
    missing = tmp_path / "missing"
    path = tmp_path / "run.yaml"
    cfg.save(path)
    field = "model.ref" if where == "model" else "data.path"
    assert cli.main(["train", str(path), f"{field}={missing}"]) == 2
    err = capsys.readouterr().err
    said = [ln for ln in err.splitlines() if "no such" in ln]
    assert len(said) == 1 and said[0].startswith("error: "), err
