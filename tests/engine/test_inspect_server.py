"""The app's inspecting child answers each request in order, with typed errors as data."""

from __future__ import annotations

import io
import json

from qlora_engine.errors import ConfigError, ModelError
from qlora_engine.events import InspectFailed, InspectResult, ListSink, from_json
from qlora_engine.inspect_server import serve


def ask(*requests) -> list:
    sink = ListSink()
    lines = [json.dumps(r) if isinstance(r, dict) else r for r in requests]
    assert serve(io.StringIO("\n".join(lines) + "\n"), sink) == 0
    return sink.events


def test_answers_in_order_with_typed_errors_and_survives_bad_requests(tiny_model_dir, tmp_path):
    data = tmp_path / "rows.jsonl"
    data.write_text('{"question": "q", "reply": "a"}\n')
    missing = tmp_path / "no-model"
    events = ask(
        {"request": 1, "kind": "model", "ref": str(tiny_model_dir)},
        {"request": 2, "kind": "model", "ref": str(missing)},
        "not json",
        {"request": 3, "kind": "keys", "config": {"data": {"path": str(data)}}},
        {"request": 4, "kind": "budget", "config": {"model": {"ref": str(tiny_model_dir)}, "lora": {"rank": 0}}},
        "quit",
        {"request": 5, "kind": "keys", "config": {"data": {"path": str(data)}}},
    )
    assert [(type(e).__name__, e.request) for e in events] == [
        ("InspectResult", 1), ("InspectFailed", 2), ("InspectFailed", -1), ("InspectResult", 3), ("InspectFailed", 4),
    ]  # fmt: skip
    assert events[0].result["num_layers"] == 2
    assert isinstance(events[1].user_error(), ModelError) and events[1].traceback == ""
    assert events[2].user_error() is None and "JSONDecodeError" in events[2].traceback  # a bug's details
    assert events[3].result == ["question", "reply"]
    error = events[4].user_error()
    assert isinstance(error, ConfigError) and error.field == "lora.rank"
    for e in events:  # every answer crosses the pipe as one JSON line and comes back equal
        assert from_json(e.to_json()) == e
    assert all(isinstance(e, (InspectResult, InspectFailed)) for e in events)
