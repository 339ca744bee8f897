"""The app reads the engine's errors and decisions by their attributes, never by their words.

Each test rewords the engine's text at one former parse site (``errors.render`` is the one
place an error becomes text; ``ResumeBlocker.__str__`` the one place a blocker does) and shows
the app still marks the right field, offers the right fix, or shows the right message. With
the old code (a regex over the message, a split on ':', stderr scraping) each of them fails.
"""

from __future__ import annotations

import json
import sys
import textwrap
from pathlib import Path

import pytest

from app.failure_fixes import why_new_run
from qlora_engine import errors
from qlora_engine.checkpoint import resume_blockers
from qlora_engine.config import TrainConfig, apply_overrides
from qlora_engine.decisions import ResumeBlocker

REWORDED = "Etwas stimmt nicht."


@pytest.fixture
def reworded(monkeypatch):
    """Every engine error renders as the same sentence, naming no field, file or fix."""
    monkeypatch.setattr(errors, "render", lambda e: REWORDED)
    monkeypatch.setattr(errors.QLoRAError, "__init__", _reworded_init(errors.QLoRAError.__init__))
    monkeypatch.setattr(errors.Problem, "__init__", _reworded_init(errors.Problem.__init__))  # each bad field's


def _reworded_init(real):
    def init(self, what, *args, **kw):
        real(self, f"{REWORDED} ({len(what)})", *args, **kw)  # the words change, the attributes stay

    return init


def test_form_marks_every_bad_field_whatever_the_words(window, reworded):
    m = window.config_model
    m.set_values({("lora", "rank"): 0, ("data", "validation_split"): 2.0, ("train", "micro_batch_size"): 0})
    assert set(m.errors) == {"lora.rank", "data.validation_split", "train.micro_batch_size"}
    assert all(text.startswith(REWORDED) for text in m.errors.values())
    assert m.general_error is None
    m.set_values({("lora", "rank"): 8, ("data", "validation_split"): 0.1, ("train", "micro_batch_size"): 2})
    assert m.valid and m.config.lora.rank == 8


@pytest.mark.parametrize(
    ("values", "page"),
    [({("data", "path"): "x.jsonl"}, "model"), ({("model", "ref"): "some/model"}, "data")],
)
def test_start_shows_the_field_check_ready_names(window, reworded, values, page):
    window.config_model.set_values(values)
    window.show_page("training")
    assert not window.runs.start()
    assert window.current_page == page  # model.ref or data.path, read from the error's field
    assert window.runs.job is None


def test_why_a_fix_starts_a_new_run_reads_the_blockers_fields(monkeypatch):
    monkeypatch.setattr(ResumeBlocker, "__str__", lambda self: REWORDED)
    before = TrainConfig()
    rank = why_new_run(resume_blockers(before, apply_overrides(before, ["lora.rank=4"])))
    assert "the adapter's shape" in rank and REWORDED not in rank
    length = why_new_run(resume_blockers(before, apply_overrides(before, ["data.max_length=128"])))
    assert "the training data" in length and f"data.max_length: {before.data.max_length!r} -> 128" in length


def test_data_page_offers_the_column_mapping_from_the_errors_field(qtbot, window, reworded, tmp_path):
    data = tmp_path / "odd.jsonl"
    data.write_text("".join(json.dumps({"question": f"q{i}", "reply": f"a{i}"}) + "\n" for i in range(4)))
    page = window.data_page
    window.config_model.set_value("data", "path", str(data))
    page.inspect_now()
    qtbot.waitUntil(lambda: page.keys == ["question", "reply"], timeout=60_000)
    assert page.error is not None and page.error.field == "data.format"
    assert page.problems.text().startswith(REWORDED)


FAKE_ENGINE = textwrap.dedent(
    """
    import json, sys
    # what the engine prints on stderr for a user error, worded to mislead a parser
    print("error: model.ref: THE WRONG MESSAGE", file=sys.stderr)
    print("hint: THE WRONG HINT", file=sys.stderr)
    if sys.argv[1] == "event":
        print(json.dumps({"event": "run_failed", "time": 0, "error_type": "DataError",
                          "message": "the engine's own message", "traceback": "", "hint": "the engine's own fix",
                          "error": {"type": "DataError", "what": "w", "field": "data.path", "file": None,
                                    "line": None, "checkpoint": None, "fix": "the engine's own fix", "problems": []}}),
              flush=True)
    sys.exit(2)
    """
)


@pytest.mark.parametrize("mode", ["event", "silent"])
def test_a_failed_engine_is_read_from_its_event_never_from_stderr(qtbot, window, tmp_path, mode):
    script = tmp_path / "fake_engine.py"
    script.write_text(FAKE_ENGINE)
    window.runs.command_factory = lambda config, resume=None: [sys.executable, str(script), mode]
    window.config_model.set_values(
        {("model", "ref"): str(tmp_path), ("data", "path"): str(script), ("output", "dir"): str(tmp_path / "out")}
    )
    shown = []
    window.runs.error_shown.connect(shown.append)
    with qtbot.waitSignal(window.runs.ended, timeout=30_000) as ended:
        assert window.runs.start()
    assert ended.args == ["failed"] and len(shown) == 1
    dialog = shown[0]
    if mode == "event":  # a user error: its message and fix, the details behind a click
        assert dialog.failure.message == "the engine's own message"
        assert dialog.failure.user_error().field == "data.path"
        assert dialog.traceback.isHidden() and dialog.details_button.isVisible()
    else:  # no event: a plain exit message, and stderr only as the details
        assert dialog.failure.message == "The engine process ended unexpectedly (exit code 2)."
        assert "THE WRONG MESSAGE" in dialog.traceback.toPlainText() and dialog.traceback.isVisible()
    assert "WRONG" not in dialog.failure.message
    assert "WRONG" not in window.run_view.state_label.text()


def test_no_app_module_parses_engine_text():
    """A guard for the review: no regex or split over an error's text or stderr in the app."""
    root = Path(__file__).resolve().parents[2] / "app"
    suspicious = ("_FIELD_RE", 'startswith("error: ")', 'split(":", 1)[0]', "in str(exc)", "in str(e)")
    found = [f"{p.name}: {needle}" for p in root.rglob("*.py") for needle in suspicious if needle in p.read_text()]
    assert found == []
