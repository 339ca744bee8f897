"""Bad input: a clear DataError naming the file and the line, or skipped rows counted, never a crash."""

from __future__ import annotations

import csv
import json
import re
import tempfile
from pathlib import Path

import pytest
from data_support import make_cfg
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from qlora_engine.data import IGNORE_INDEX, inspect_data, prepare_data
from qlora_engine.data.cache import cache_root
from qlora_engine.errors import DataError

pytestmark = pytest.mark.usefixtures("private_cache")


def cache_entries() -> list[Path]:
    root = cache_root()
    return list(root.iterdir()) if root.exists() else []


def test_malformed_json_line_names_the_file_and_line_and_writes_nothing(data_dir, tok):
    with pytest.raises(DataError) as e:
        prepare_data(make_cfg(data_dir / "bad_malformed.jsonl"), tok)
    assert str(e.value).startswith(f"{data_dir / 'bad_malformed.jsonl'}:3: not valid JSON")
    assert "Nothing was written" in str(e.value)
    assert cache_entries() == []


def test_malformed_json_array_names_the_line(tmp_path):
    path = tmp_path / "rows.json"
    path.write_text('[\n  {"text": "a"},\n  {"text": "b"},\n  {"text": "c" "d"}\n]\n')
    with pytest.raises(DataError, match=r"rows\.json:4: not valid JSON"):
        inspect_data(path)


@pytest.mark.parametrize(
    ("name", "message"),
    [
        ("bad_empty.jsonl", r"the file is empty \(0 bytes\)\. Accepted inputs: JSONL, JSON, CSV"),
        ("bad_blank_lines.jsonl", r"no rows found \(only blank lines\)\. Accepted formats: text \('text'\), alpaca"),
        (
            "bad_unknown_format.jsonl",
            r"cannot tell the data format\. The first 2 rows have the keys 'foo' \(2\), 'bar' \(2\)\. "
            r"Accepted formats: text",
        ),
        (
            "bad_no_usable_rows.jsonl",
            r"no usable rows as alpaca data; all 3 rows were skipped: 2 missing or empty 'output' "
            r"\(line 1, line 2\); 1 missing or empty 'instruction' \(line 3\)\. Accepted formats",
        ),
        ("bad_utf16.jsonl", r"encoded as UTF-16 LE, not UTF-8"),
        ("bad_header_only.csv", r"no rows found \(only a header\)\. Accepted formats"),
        ("bad_empty_array.json", r"no rows found \(an empty array\)\. Accepted formats"),
    ],
)
def test_files_without_usable_rows_say_what_was_found_and_what_is_accepted(data_dir, tok, name, message):
    with pytest.raises(DataError, match=message) as e:
        prepare_data(make_cfg(data_dir / name), tok)
    assert str(e.value).startswith(str(data_dir / name))
    assert cache_entries() == []


def test_rows_with_missing_fields_are_skipped_counted_and_located(data_dir, tok):
    prepared = prepare_data(make_cfg(data_dir / "bad_missing_fields.jsonl"), tok)
    assert len(prepared.train) == 37 and prepared.report["rows"] == 40
    assert prepared.report["skipped"] == {
        "missing or empty 'output'": {"count": 2, "where": ["line 4", "line 9"]},
        "missing or empty 'instruction'": {"count": 1, "where": ["line 16"]},
    }


def test_too_many_bad_rows_stop_the_run(data_dir, tok):
    with pytest.raises(
        DataError,
        match=r"5 of 10 rows \(50%\) are unusable, more than data.max_bad_fraction \(10%\): "
        r"5 missing or empty 'output' \(line 1, line 3, line 5, line 7, line 9\)",
    ) as e:
        prepare_data(make_cfg(data_dir / "bad_mostly_empty.jsonl"), tok)
    assert "raise data.max_bad_fraction" in e.value.hint
    assert len(prepare_data(make_cfg(data_dir / "bad_mostly_empty.jsonl", max_bad_fraction=0.5), tok).train) == 5


def test_a_non_utf8_line_is_skipped_with_its_place(data_dir, tok):
    prepared = prepare_data(make_cfg(data_dir / "bad_non_utf8.jsonl"), tok)
    assert len(prepared.train) == 11
    ((reason, entry),) = prepared.report["skipped"].items()
    assert reason.startswith("not UTF-8 text (byte 0xe9 at column 22)") and entry["where"] == ["line 5"]


def test_a_latin1_file_stops_with_save_as_utf8(tmp_path, tok):
    path = tmp_path / "latin1.jsonl"
    path.write_bytes(
        "".join(json.dumps({"text": f"caf\u00e9 {i}"}, ensure_ascii=False) + "\n" for i in range(5)).encode("latin-1")
    )
    with pytest.raises(
        DataError,
        match=r"none of the first 5 rows can be read: 5 not UTF-8 text \(byte 0xe9 at column 14\); save the file as UTF-8 "
        r"\(line 1, line 2, line 3, line 4, line 5\)",
    ):
        prepare_data(make_cfg(path), tok)


def test_a_ragged_csv_row_is_skipped_with_its_line(data_dir, tok):
    prepared = prepare_data(make_cfg(data_dir / "bad_ragged.csv", max_bad_fraction=0.5), tok)
    assert prepared.report["skipped"] == {"3 fields where the header has 2": {"count": 1, "where": ["line 3"]}}


def test_chat_rows_with_bad_turns_are_skipped_with_reasons(tmp_path, tok):
    good = {"messages": [{"role": "user", "content": "Count to 3."}, {"role": "assistant", "content": "1 2 3"}]}
    rows = [good] * 8 + [
        {"messages": [{"role": "narrator", "content": "Once."}, {"role": "assistant", "content": "1"}]},
        {"messages": [{"role": "user", "content": "Hi"}]},
        {"messages": "not a list"},
        {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": ""}]},
    ]
    path = tmp_path / "chat.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    report = prepare_data(make_cfg(path, max_bad_fraction=0.5), tok).report
    assert report["skipped"] == {
        "turn 1: unknown role 'narrator'": {"count": 1, "where": ["line 9"]},
        "no assistant turn": {"count": 1, "where": ["line 10"]},
        "'messages' is a str, not a list of turns": {"count": 1, "where": ["line 11"]},
        "turn 2 (assistant): missing or empty content": {"count": 1, "where": ["line 12"]},
    }


def test_a_template_that_refuses_a_conversation_skips_that_row(tmp_path, tok):
    template = (
        "{% for m in messages %}{% if m['role'] == 'system' %}{{ raise_exception('System role not supported') }}"
        "{% endif %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}{% if add_generation_prompt %}assistant: {% endif %}"
    )
    rows = [{"instruction": "Count to 3.", "output": "1 2 3"}] * 9 + [
        {"instruction": "x", "output": "y", "system": "s"}
    ]
    path = tmp_path / "a.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    report = prepare_data(make_cfg(path, chat_template=template), tok).report
    assert report["skipped"] == {
        "the chat template refused it: System role not supported": {"count": 1, "where": ["line 10"]}
    }


# -- property-based: random rows never crash the loader ------------------------------------------

KEYS = ["text", "instruction", "input", "output", "system", "messages", "conversations", "prompt", "completion", "id"]
scalars = st.none() | st.booleans() | st.integers(-5, 5) | st.floats(allow_nan=False) | st.text(max_size=30)
turn = st.fixed_dictionaries(
    {},
    optional={
        "role": st.sampled_from(["user", "assistant", "system", "tool", "gpt", "human", "alien"]) | scalars,
        "content": st.text(max_size=30)
        | scalars
        | st.lists(st.dictionaries(st.sampled_from(["type", "text"]), scalars)),
        "from": st.sampled_from(["human", "gpt", "system"]),
        "value": st.text(max_size=30),
        "weight": st.sampled_from([0, 1]),
    },
)
values = (
    scalars
    | st.lists(turn, max_size=4)
    | st.lists(scalars, max_size=3)
    | st.dictionaries(st.text(max_size=3), scalars, max_size=2)
)
garbage_row = (
    st.dictionaries(st.sampled_from(KEYS) | st.text(max_size=4), values, max_size=5)
    | scalars
    | st.lists(scalars, max_size=2)
)
# Text with the awkward parts of real data: unicode, whitespace-only, control characters, template tokens.
texty = st.text(max_size=40) | st.sampled_from(
    ["", "  ", "\r\n", "<|im_end|>", "<|im_start|>user", "\u00e9\u4e2d\U0001f600", "\x00"]
)
good_turn = st.fixed_dictionaries({"role": st.sampled_from(["user", "assistant", "system", "tool"]), "content": texty})
plausible_row = st.one_of(
    st.fixed_dictionaries({"text": texty}),
    st.fixed_dictionaries(
        {"instruction": texty, "output": texty}, optional={"input": texty | st.none(), "system": texty}
    ),
    st.fixed_dictionaries({"messages": st.lists(good_turn, min_size=1, max_size=5)}),
    st.fixed_dictionaries(
        {
            "conversations": st.lists(
                st.fixed_dictionaries({"from": st.sampled_from(["human", "gpt", "system"]), "value": texty}),
                min_size=1,
                max_size=5,
            )
        }
    ),
    st.fixed_dictionaries({"prompt": texty, "completion": texty}),
)
rows_strategy = st.lists(st.one_of(plausible_row, plausible_row, plausible_row, garbage_row), min_size=0, max_size=8)


def _check_outcome(path: Path, tok, **data) -> bool:
    """Either a DataError that names the file, or samples that hold what a sample must hold."""
    cfg = make_cfg(path, max_length=48, cache=False, **data)
    try:
        prepared = prepare_data(cfg, tok)
    except DataError as e:
        assert str(e).strip() and (str(path) in str(e) or str(e).startswith("data."))
        return False
    for s in prepared.train:
        ids, labels = s["input_ids"], s["labels"]
        assert 0 < len(ids) == len(labels) <= 48
        assert all(lab in (IGNORE_INDEX, i) for i, lab in zip(ids, labels, strict=True))
        assert any(lab != IGNORE_INDEX for lab in labels)
        if len(ids) < 48:
            assert ids[-1] == tok.eos_token_id
    json.dumps(prepared.report.to_dict())
    return True


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    rows=rows_strategy,
    fmt=st.sampled_from(["auto", "auto", "auto", "chat", "alpaca", "text", "sharegpt", "prompt_completion"]),
    bad=st.sampled_from([0.1, 1.0]),
    packing=st.booleans(),
)
def test_random_jsonl_rows_never_crash(tok, rows, fmt, bad, packing):
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "rows.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
        _check_outcome(path, tok, format=fmt, max_bad_fraction=bad, packing=packing)


def test_the_random_rows_also_reach_training_samples(tok):
    """The property above is only worth something if random rows often make it through."""
    outcomes = []

    @settings(max_examples=60, deadline=None, database=None, derandomize=True)
    @given(rows=rows_strategy)
    def collect(rows):
        with tempfile.TemporaryDirectory() as d:
            path = Path(d) / "rows.jsonl"
            path.write_text("".join(json.dumps(r) + "\n" for r in rows))
            outcomes.append(_check_outcome(path, tok, max_bad_fraction=1.0))

    collect()
    assert sum(outcomes) >= len(outcomes) / 8, f"{sum(outcomes)} of {len(outcomes)} random files prepared"


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    header=st.lists(st.sampled_from(KEYS) | st.text(max_size=6), min_size=1, max_size=4),
    cells=st.lists(st.lists(st.text(max_size=20), min_size=0, max_size=5), max_size=6),
)
def test_random_csv_never_crashes(tok, header, cells):
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "rows.csv"
        with open(path, "w", newline="", encoding="utf-8") as fh:
            w = csv.writer(fh)
            w.writerow(header)
            w.writerows(cells)
        _check_outcome(path, tok)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    data=st.binary(max_size=300),
    suffix=st.sampled_from([".jsonl", ".json", ".csv", ".txt", ".tsv", ".parquet"]),
)
def test_random_bytes_never_crash(tok, data, suffix):
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / f"rows{suffix}"
        path.write_bytes(data)
        _check_outcome(path, tok)


def test_error_messages_never_leak_a_traceback_type(data_dir, tok):
    for f in sorted(data_dir.glob("bad_*")):
        try:
            prepare_data(make_cfg(f, max_bad_fraction=0.0), tok)
        except DataError as e:
            assert not re.search(r"Traceback|Error:", str(e)), str(e)
