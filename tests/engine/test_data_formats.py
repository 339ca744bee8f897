"""Every input kind and row format is read, detected with evidence, and turned into samples."""

from __future__ import annotations

import json
import tracemalloc
from pathlib import Path

import pytest
from data_support import make_cfg
from transformers import AutoTokenizer

from qlora_engine.data import inspect_data, prepare_data
from qlora_engine.data.sources import open_source
from qlora_engine.errors import DataError
from qlora_engine.events import ListSink, LogLine, PhaseChanged

pytestmark = pytest.mark.usefixtures("private_cache")


CASES = [
    # file, kind, format, rows, evidence key that must be named
    ("text.jsonl", "jsonl", "text", 4, "text"),
    ("alpaca.jsonl", "jsonl", "alpaca", 4, "instruction"),
    ("alpaca_array.json", "json", "alpaca", 3, "instruction"),
    ("alpaca_object.json", "json", "alpaca", 2, "output"),
    ("alpaca_quoted_newlines.csv", "csv", "alpaca", 3, "instruction"),
    ("chat.jsonl", "jsonl", "chat", 4, "messages"),
    ("chat.parquet", "parquet", "chat", 2, "messages"),
    ("sharegpt.json", "json", "sharegpt", 2, "conversations"),
    ("prompt_completion.jsonl", "jsonl", "prompt_completion", 3, "prompt"),
    ("prompt_completion.tsv", "tsv", "prompt_completion", 2, "completion"),
    ("plain.txt", "text", "text", 3, "text"),
    ("plain_lines.txt", "text", "text", 3, "text"),
    ("bom_crlf.jsonl", "jsonl", "alpaca", 3, "instruction"),
    ("bom_crlf.csv", "csv", "alpaca", 2, "instruction"),
    ("long_line.jsonl", "jsonl", "alpaca", 2, "output"),
    ("long_cell.csv", "csv", "alpaca", 2, "output"),
]


@pytest.mark.parametrize(("name", "kind", "fmt", "rows", "key"), CASES, ids=[c[0] for c in CASES])
def test_each_input_is_detected_with_evidence_and_tokenized(data_dir, tok, name, kind, fmt, rows, key):
    info = inspect_data(data_dir / name)
    assert (info["source_kind"], info["format"], info["rows"], info["usable_rows"]) == (kind, fmt, rows, rows)
    assert info["skipped_total"] == 0 and info["problems"] == []
    assert info["evidence"]["rows_fitting"][fmt] == rows
    assert key in info["evidence"]["keys"]
    assert f"in {rows} of {rows} rows" in info["evidence"]["reason"]

    prepared = prepare_data(make_cfg(data_dir / name, max_length=4096), tok)
    assert len(prepared.train) == rows
    cut = 0
    for s in prepared.train:
        assert len(s["input_ids"]) == len(s["labels"]) <= 4096
        if len(s["input_ids"]) == 4096:
            cut += 1  # truncated: the end (and its EOS) is cut off, and counted
            continue
        assert s["input_ids"][-1] == tok.eos_token_id, "every sample ends with EOS"
        assert s["labels"][-1] == tok.eos_token_id, "and EOS carries loss"
    assert cut == prepared.report["overlong"]["truncated"] == (1 if name.startswith("long") else 0)
    json.dumps(prepared.report.to_dict())  # the report is plain JSON


def test_bom_and_windows_line_endings_leave_no_trace_in_the_text(data_dir):
    for name in ("bom_crlf.jsonl", "bom_crlf.csv"):  # the fixtures hold what they claim to
        raw = (data_dir / name).read_bytes()
        assert raw.startswith(b"\xef\xbb\xbf") and raw.count(b"\r\n") == raw.count(b"\n")
    for name in ("bom_crlf.jsonl", "bom_crlf.csv"):
        info = inspect_data(data_dir / name)
        first = info["samples"][0]["messages"]
        assert first[0]["content"] == "Say yes." and first[1]["content"] == "yes"
        assert "\r" not in json.dumps(info["samples"]) and "\ufeff" not in json.dumps(info["samples"])
    assert inspect_data(data_dir / "bom_crlf.csv")["samples"][1]["messages"][0]["content"] == 'Say "no".'


def test_csv_quoted_newlines_stay_inside_the_cell_and_lines_are_counted_right(data_dir):
    info = inspect_data(data_dir / "alpaca_quoted_newlines.csv")
    code = info["samples"][1]
    assert code["where"] == "line 3"
    assert code["messages"][1]["content"] == "def add(a, b):\n    return a + b\n"
    assert info["samples"][2]["where"] == "line 6"  # the quoted cell spans lines 3-5


def test_a_very_long_single_line_is_read_whole(data_dir, tok):
    # Read whole, then cut by characters before tokenizing (memory bounded by max_length):
    # it still counts as one sample over max_length, truncated.
    for name in ("long_line.jsonl", "long_cell.csv"):
        info = inspect_data(data_dir / name, tok, max_length=512)
        assert info["token_stats"]["max"] > 512
        assert info["token_stats"]["over_max_length"] == 1
        assert info["overlong"]["truncated"] == 1 and info["overlong"]["cut_before_tokenizing"] == 1


def test_text_files_split_on_blank_lines_or_by_line(data_dir):
    blocks = inspect_data(data_dir / "plain.txt")
    assert blocks["note"] == "samples are blocks separated by blank lines"
    assert blocks["samples"][2]["text"] == "def add(a, b):\n    return a + b"
    assert blocks["samples"][0]["where"] == "lines 1-2"
    lines = inspect_data(data_dir / "plain_lines.txt")
    assert lines["note"] == "one sample per line" and lines["samples"][1]["where"] == "line 2"


def test_columns_are_mapped_and_the_format_can_be_forced(data_dir, tok):
    with pytest.raises(DataError, match="'question' \\(2\\), 'answer' \\(2\\)"):
        inspect_data(data_dir / "custom_columns.jsonl")
    info = inspect_data(data_dir / "custom_columns.jsonl", columns={"instruction": "question", "output": "answer"})
    assert info["format"] == "alpaca" and info["usable_rows"] == 2
    assert info["samples"][0]["messages"][1]["content"] == "Paris."
    # Forcing 'text' on alpaca rows: no 'text' field, so every row is skipped and the run refuses.
    with pytest.raises(
        DataError, match="no usable rows as text data; all 4 rows were skipped: 4 missing or empty 'text'"
    ):
        prepare_data(make_cfg(data_dir / "alpaca.jsonl", format="text"), tok)
    with pytest.raises(DataError, match="column 'reply' \\(data.columns.output\\) not found"):
        inspect_data(data_dir / "custom_columns.jsonl", columns={"output": "reply"})
    with pytest.raises(DataError, match="data.columns: 'answer' is not a field we read"):
        inspect_data(data_dir / "custom_columns.jsonl", columns={"answer": "answer"})


def test_turn_keys_can_be_mapped_too(tmp_path, tok):
    path = tmp_path / "speakers.jsonl"
    row = {"messages": [{"speaker": "user", "text": "Count to 3."}, {"speaker": "assistant", "text": "1 2 3"}]}
    path.write_text(json.dumps(row) + "\n")
    info = inspect_data(path, tok, format="chat", columns={"role": "speaker", "content": "text"})
    assert info["usable_rows"] == 1
    assert "[[1 2 3<|im_end|>]]" in info["samples"][0]["text"]


def test_saved_datasets_folder_and_its_splits(tmp_path, data_dir, tok):
    import datasets

    rows = [json.loads(line) for line in (data_dir / "alpaca.jsonl").read_text().splitlines()]
    datasets.DatasetDict(
        {"train": datasets.Dataset.from_list(rows), "test": datasets.Dataset.from_list(rows[:1])}
    ).save_to_disk(str(tmp_path / "saved"))
    assert inspect_data(tmp_path / "saved")["rows"] == 4
    assert inspect_data(tmp_path / "saved", split="test")["rows"] == 1
    with pytest.raises(DataError, match="no split 'valid'; splits: train, test"):
        inspect_data(tmp_path / "saved", split="valid")
    prepared = prepare_data(make_cfg(tmp_path / "saved"), tok)
    assert len(prepared.train) == 4 and prepared.report["source_kind"] == "saved"
    (tmp_path / "plain_folder").mkdir()
    with pytest.raises(DataError, match="not one written by datasets.save_to_disk"):
        inspect_data(tmp_path / "plain_folder")


def test_hub_id_offline_gets_a_clear_message(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(
        DataError, match="not a local file or folder, and loading it as a hub dataset failed: this machine is offline"
    ):
        inspect_data("someone/no-such-dataset")
    with pytest.raises(DataError, match="no such file or folder"):
        inspect_data("missing/file.jsonl")


def test_events_say_what_happens(data_dir, tiny_model_no_template_dir):
    plain = AutoTokenizer.from_pretrained(tiny_model_no_template_dir)
    sink = ListSink()
    prepared = prepare_data(make_cfg(data_dir / "chat.jsonl"), plain, sink)
    assert prepared.report["template"].startswith("chatml (default")
    assert any(e.phase == "preparing_data" for e in sink.of(PhaseChanged))
    warnings = [e.message for e in sink.of(LogLine) if e.level == "warning"]
    assert any("no chat template; using ChatML" in w for w in warnings)
    assert any("chat data" in e.message and "4 rows" in e.message for e in sink.of(LogLine))


def test_jsonl_and_csv_stream_without_reading_the_file_whole(tmp_path):
    rows = 5_000
    line = json.dumps({"text": "The quick brown fox jumps over the lazy dog. " * 30}) + "\n"
    big = tmp_path / "big.jsonl"
    with open(big, "w") as fh:
        fh.write(line * rows)  # ~7 MB
    csv_big = tmp_path / "big.csv"
    with open(csv_big, "w") as fh:
        fh.write("text\n" + ('"' + "The quick brown fox, jumps.\n" * 50 + '"\n') * rows)
    for path in (big, csv_big):
        src = open_source(str(path), path)
        tracemalloc.start()
        n = sum(1 for _ in src.rows())
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        assert n == rows
        assert peak < path.stat().st_size / 10, f"{path.name}: peak {peak} bytes while reading"
        assert src.fraction_done() == 1.0


def test_prepared_samples_are_plain_lists_the_trainer_can_use(data_dir, tok):
    prepared = prepare_data(make_cfg(data_dir / "alpaca.jsonl"), tok)
    s = prepared.train[0]
    assert set(s) == {"input_ids", "labels"}
    assert all(type(x) is int for x in s["input_ids"] + s["labels"])
    assert prepared.train[-1] == prepared.train[len(prepared.train) - 1]
    assert [x["input_ids"] for x in prepared.train] == [prepared.train[i]["input_ids"] for i in range(4)]
    assert prepared.train[1:3] == [prepared.train[1], prepared.train[2]]  # the trainer slices for evaluation
    with pytest.raises(IndexError):
        prepared.train[4]


def test_relative_paths_resolve_against_the_config_folder(tmp_path, data_dir, tok):
    (tmp_path / "cfg").mkdir()
    (tmp_path / "cfg" / "train.jsonl").write_bytes((data_dir / "text.jsonl").read_bytes())
    cfg = make_cfg("train.jsonl")
    cfg.base_dir = tmp_path / "cfg"
    assert len(prepare_data(cfg, tok).train) == 4
    assert Path(inspect_data(cfg)["source"]) == tmp_path / "cfg" / "train.jsonl"


def test_long_preparation_reports_progress(tmp_path, tok, monkeypatch):
    from qlora_engine.data import pipeline

    monkeypatch.setattr(pipeline, "PROGRESS_EVERY_S", 0.0)
    path = tmp_path / "many.jsonl"
    path.write_text("".join(json.dumps({"text": f"Count {i}: 1 2 3"}) + "\n" for i in range(3 * pipeline.CHUNK)))
    sink = ListSink()
    prepare_data(make_cfg(path), tok, sink)
    details = [e.detail for e in sink.of(PhaseChanged) if e.detail.startswith("tokenizing")]
    assert len(details) >= 2 and "rows" in details[0] and "%" in details[0]
