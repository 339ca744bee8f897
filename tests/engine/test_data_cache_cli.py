"""The tokenized-data cache and fingerprint, and the ``inspect-data`` command."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from data_support import make_cfg
from transformers import AutoTokenizer

from qlora_engine.cli import main
from qlora_engine.data import inspect_data, prepare_data
from qlora_engine.data.cache import cache_root
from qlora_engine.events import ListSink, LogLine
from qlora_engine.padding import padding_share

pytestmark = pytest.mark.usefixtures("private_cache")


def test_a_second_run_takes_the_tokens_from_the_cache(tmp_path, data_dir, tok):
    path = tmp_path / "chat.jsonl"
    shutil.copy(data_dir / "chat.jsonl", path)
    cfg = make_cfg(path, packing=True, validation_split=0.25)
    first = prepare_data(cfg, tok)
    assert first.report["cache"] == "written"
    assert len(list(cache_root().iterdir())) == 1
    sink = ListSink()
    second = prepare_data(cfg, tok, sink)
    assert second.report["cache"] == "hit" and second.fingerprint == first.fingerprint
    assert list(second.train) == list(first.train) and list(second.validation) == list(first.validation)
    assert any("from the cache" in e.message for e in sink.of(LogLine))
    # Any change of the content is a different key.
    path.write_text(
        path.read_text() + '{"messages": [{"role": "user", "content": "1"}, {"role": "assistant", "content": "2"}]}\n'
    )
    third = prepare_data(cfg, tok)
    assert third.report["cache"] == "written" and third.fingerprint != first.fingerprint
    assert third.report["rows"] == 5


def test_the_fingerprint_follows_data_settings_and_tokenizer(data_dir, tok, tiny_model_no_template_dir):
    base = prepare_data(make_cfg(data_dir / "alpaca.jsonl", cache=False), tok).fingerprint
    same = prepare_data(make_cfg(data_dir / "alpaca.jsonl", cache=False, max_bad_fraction=0.5), tok).fingerprint
    assert same == base  # whether bad rows are tolerated does not change the tokens
    changed = {
        "max_length": make_cfg(data_dir / "alpaca.jsonl", cache=False, max_length=512),
        "train_on_prompt": make_cfg(data_dir / "alpaca.jsonl", cache=False, train_on_prompt=True),
        "packing": make_cfg(data_dir / "alpaca.jsonl", cache=False, packing=True),
        "template": make_cfg(data_dir / "alpaca.jsonl", cache=False, chat_template="chatml"),
        "file": make_cfg(data_dir / "alpaca_array.json", cache=False),
    }
    prints = {k: prepare_data(c, tok).fingerprint for k, c in changed.items()}
    prints["tokenizer"] = prepare_data(
        make_cfg(data_dir / "alpaca.jsonl", cache=False), AutoTokenizer.from_pretrained(tiny_model_no_template_dir)
    ).fingerprint
    assert base not in prints.values() and len(set(prints.values())) == len(prints)
    # The seed matters only when it chooses a validation split.
    a = make_cfg(data_dir / "alpaca.jsonl", cache=False)
    a.train.seed = 7
    assert prepare_data(a, tok).fingerprint == base
    b = make_cfg(data_dir / "alpaca.jsonl", cache=False, validation_split=0.25)
    c = make_cfg(data_dir / "alpaca.jsonl", cache=False, validation_split=0.25)
    c.train.seed = 7
    assert prepare_data(b, tok).fingerprint != prepare_data(c, tok).fingerprint


def test_a_damaged_cache_entry_is_rebuilt(tmp_path, data_dir, tok):
    cfg = make_cfg(data_dir / "alpaca.jsonl")
    first = prepare_data(cfg, tok)
    (entry,) = cache_root().iterdir()  # named by the cache key (the fingerprint with the tokenization's version)
    (entry / "train.ids.npy").write_bytes(b"garbage")
    again = prepare_data(cfg, tok)
    assert again.report["cache"] == "written" and list(again.train) == list(first.train)


def test_cache_off_writes_nothing(data_dir, tok):
    prepare_data(make_cfg(data_dir / "alpaca.jsonl", cache=False), tok)
    assert not cache_root().exists() or not any(cache_root().iterdir())


def test_inspect_data_with_a_model_reports_lengths_and_marks_the_trained_part(data_dir, tok):
    info = inspect_data(data_dir / "chat.jsonl", tok, max_length=40, samples=2)
    st = info["token_stats"]
    assert (st["count"], st["min"], st["max"], st["over_max_length"]) == (4, 28, 61, 2)
    assert st["min"] <= st["median"] <= st["p95"] <= st["max"] and st["total"] == 28 + 31 + 45 + 61
    assert st["longest_sequence"] == 40 and sorted(info["lengths"]) == [28, 31, 45, 61]
    dropped = inspect_data(data_dir / "chat.jsonl", tok, max_length=40, overlong="drop")
    assert dropped["token_stats"]["longest_sequence"] == 31
    assert len(info["samples"]) == 2
    first = info["samples"][0]
    assert first["where"] == "line 1" and first["ends_with_eos"] and first["over_max_length"]
    assert "[[Paris.<|im_end|>]]" in first["text"] and "[[4 5 6<|im_end|>]]" in first["text"]
    assert "[[" not in first["text"].split("assistant")[0]  # nothing before the first answer is trained
    assert [s["trained"] for s in first["segments"]] == [False, True, False, True]
    assert any("longer than max_length 40" in p for p in info["problems"])
    json.dumps(info)


def test_inspect_data_reads_a_run_config(tmp_path, data_dir, tok):
    cfg = make_cfg("train.jsonl", format="alpaca", max_length=64)
    cfg.base_dir = tmp_path
    shutil.copy(data_dir / "alpaca.jsonl", tmp_path / "train.jsonl")
    info = inspect_data(cfg, tok)
    assert info["format"] == "alpaca" and info["evidence"]["given"] == "data.format"
    assert info["settings"]["max_length"] == 64 and info["token_stats"]["max_length"] == 64


def test_padding_share_counts_each_micro_batch_padded_to_its_longest_sample():
    lengths = np.array([10, 2, 2, 2])
    assert padding_share(lengths, 4, 100) == 1 - 16 / 40
    assert padding_share(lengths, 4, 4) == 1 - 10 / 16  # cut to max_length first
    assert padding_share(lengths, 1, 100) == 0.0  # a batch of one is never padded
    assert padding_share(np.array([5, 5, 5, 5]), 2, 100) == 0.0
    pairs = padding_share(lengths, 2, 100)  # the long sample pads its partner, whichever it is
    assert pairs == 1 - 16 / 24


def test_inspect_data_offers_packing_when_padded_batches_waste_compute(tmp_path, data_dir, tok):
    cfg = make_cfg(data_dir / "chat.jsonl", max_length=100)  # lengths 28, 31, 45, 61
    cfg.train.micro_batch_size = 4  # one batch padded to 61: 1 - 165/244 of it is padding
    assert "32% of the tokens computed would be padding" in inspect_data(cfg, tok)["packing_hint"]
    cfg.train.micro_batch_size = 1
    assert inspect_data(cfg, tok)["packing_hint"] is None
    cfg.data.packing = True
    assert "packing_hint" not in inspect_data(cfg, tok)


def test_cli_inspect_data_json(data_dir, tiny_model_dir, capsys):
    assert main(["inspect-data", str(data_dir / "alpaca.jsonl"), "--model", str(tiny_model_dir), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["format"] == "alpaca" and out["rows"] == 4 and out["token_stats"]["count"] == 4
    assert out["samples"][0]["text"].endswith("[[The capital of France is Paris.<|im_end|>]]")


def test_cli_inspect_data_text_and_options(data_dir, tiny_model_dir, tmp_path, capsys):
    assert main(["inspect-data", str(data_dir / "bad_missing_fields.jsonl")]) == 0
    out = capsys.readouterr().out
    assert "format: alpaca" in out and "rows: 40  usable: 37  skipped: 3" in out
    assert "missing or empty 'output'  (line 4, line 9)" in out
    assert "warning:" not in out  # 3 of 40 rows is under the 10% limit

    args = ["inspect-data", str(data_dir / "custom_columns.jsonl"), "--column", "instruction=question"]
    assert main([*args, "--column", "output=answer", "--model", str(tiny_model_dir), "--samples", "1"]) == 0
    out = capsys.readouterr().out
    assert "format: alpaca" in out and "tokens per sample" in out and "[[Paris.<|im_end|>]]" in out

    # A run config: its data section and its model are used.
    shutil.copy(data_dir / "chat.jsonl", tmp_path / "train.jsonl")
    cfg = make_cfg("train.jsonl", max_length=40)
    cfg.model.ref = str(tiny_model_dir)
    cfg.save(tmp_path / "run.yaml")
    assert main(["inspect-data", str(tmp_path / "run.yaml"), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["format"] == "chat" and out["token_stats"]["over_max_length"] == 2


def test_cli_inspect_data_errors_exit_2_with_the_line(data_dir, capsys):
    assert main(["inspect-data", str(data_dir / "bad_malformed.jsonl")]) == 2
    assert "bad_malformed.jsonl:3: not valid JSON" in capsys.readouterr().err
    assert main(["inspect-data", str(data_dir / "alpaca.jsonl"), "--column", "nonsense"]) == 2
    assert "write OURS=THEIRS" in capsys.readouterr().err


def test_inspect_data_can_read_only_the_first_rows(data_dir, tok):
    quick = inspect_data(data_dir / "bad_missing_fields.jsonl", max_rows=5)
    assert quick["rows"] == 5 and quick["usable_rows"] == 4 and quick["limited_to_rows"] == 5
    assert quick["skipped"] == {"missing or empty 'output'": {"count": 1, "where": ["line 4"]}}
    measured = inspect_data(data_dir / "bad_missing_fields.jsonl", tok, max_rows=10)
    assert measured["rows"] == 10 and measured["token_stats"]["count"] == 8 and len(measured["lengths"]) == 8


def test_a_change_of_tokenization_rebuilds_the_cache_and_a_run_still_resumes(tiny_cfg, monkeypatch):
    """A run started before the engine tokenized its data another way (DATA_FORMAT_VERSION) resumes
    on the same file: the data's fingerprint, which its checkpoint records, does not carry the
    version; the cache's key does, so the tokens are made again, not taken from the old entry."""
    from qlora_engine.data import pipeline
    from qlora_engine.runner import run

    with monkeypatch.context() as older:  # (monkeypatch.undo() would also undo the private cache)
        older.setattr(pipeline, "DATA_FORMAT_VERSION", pipeline.DATA_FORMAT_VERSION - 1)
        run(tiny_cfg("train.max_steps=2", "train.save_steps=1"), ListSink())
    cfg = tiny_cfg("train.max_steps=3", "train.save_steps=1")
    second = ListSink()
    finished = run(cfg, second, resume=True)
    assert finished.step == 3
    messages = [e.message for e in second.of(LogLine)]
    assert any("resumed from" in m for m in messages)
    assert not any("from the cache" in m for m in messages)  # the older version's entry is not used
    assert len(list(cache_root().iterdir())) == 2  # one entry per version
