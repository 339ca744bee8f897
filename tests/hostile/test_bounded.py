"""Inputs that must not blow up: memory bounded by max_length, rows bounded in size, errors as data.

The table in ``test_inputs.py`` checks what the user reads; these check the bounds behind it
with numbers (peak memory of a child process) and the error records a form reads.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest
from hostile_harness import ROOT

from qlora_engine.config import TrainConfig, apply_overrides, validate
from qlora_engine.config_sections import LoraSettings
from qlora_engine.errors import ConfigError

HUGE_LINE_MB = 24

MEASURE = textwrap.dedent(
    """
    import json, resource, sys
    from transformers import AutoTokenizer
    from qlora_engine.config import TrainConfig, apply_overrides
    from qlora_engine.data import prepare_data

    model, data = sys.argv[1], sys.argv[2]
    tok = AutoTokenizer.from_pretrained(model)
    cfg = apply_overrides(TrainConfig(), [f"data.path={data}", "data.max_length=64", "data.cache=false"])
    tok("warm up the tokenizer " * 100)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    prepared = prepare_data(cfg, tok)
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({"grew_kib": after - before, "overlong": prepared.report.to_dict()["overlong"],
                      "samples": len(prepared.train)}))
    """
)


def test_one_huge_line_costs_memory_bounded_by_max_length(tmp_path, tiny_model_dir):
    """A 24 MB line used to be tokenized whole (gigabytes of offsets); now its text is cut by
    characters first, so preparing it costs about what holding the line costs."""
    data = tmp_path / "huge.jsonl"
    with open(data, "w", encoding="utf-8") as fh:
        fh.write(json.dumps({"text": "hello there"}) + "\n")
        fh.write('{"text": "' + "general kenobi " * (HUGE_LINE_MB * (1 << 20) // 15) + '"}\n')
    proc = subprocess.run(
        [sys.executable, "-c", MEASURE, str(tiny_model_dir), str(data)],
        capture_output=True,
        text=True,
        timeout=300,
        env={"PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"},
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["samples"] == 2
    assert result["overlong"]["truncated"] == 1 and result["overlong"]["cut_before_tokenizing"] == 1
    # The line itself: 24 MB read as bytes, decoded, parsed (a few copies at once). Tokenized
    # whole it took over 2 GB; the bound leaves room for the copies, not for that.
    assert result["grew_kib"] < 400 * 1024, result


def test_a_row_past_the_size_limit_is_skipped_not_read(tmp_path, tok, monkeypatch):
    """A line longer than MAX_ROW_BYTES is never held whole: skipped and counted with its line."""
    from qlora_engine.data import prepare_data, sources

    monkeypatch.setenv("QLORA_STUDIO_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(sources, "MAX_ROW_BYTES", 4096)  # the same code path as 64 MiB, at test size
    rows = [json.dumps({"text": f"row {i}"}) for i in range(20)]
    rows[3] = json.dumps({"text": "x" * 10_000})
    path = tmp_path / "d.jsonl"
    path.write_text("\n".join(rows) + "\n", encoding="utf-8")
    cfg = apply_overrides(TrainConfig(), [f"data.path={path}", "data.max_length=64"])
    prepared = prepare_data(cfg, tok)
    assert len(prepared.train) == 19
    assert prepared.report.skipped == {"longer than 4,096 bytes on one line": {"count": 1, "where": ["line 4"]}}


def test_every_bad_field_is_one_problem_with_its_path():
    """A form marks every bad field at once from ``problems``; ``field`` is the first one's."""
    with pytest.raises(ConfigError) as e:
        TrainConfig.from_dict(
            {"lora": {"rank": 0, "dropout": 2.0}, "optim": {"learning_rate": float("inf")}, "nope": {}},
            source="form",
        )
    fields = [p.field for p in e.value.problems]
    assert fields == ["lora.rank", "lora.dropout", "optim.learning_rate", "nope"]
    assert e.value.field == "lora.rank" and e.value.file == "form"
    assert all(p.file == "form" for p in e.value.problems)
    assert "at least 1 and at most 4096" in e.value.problems[0].what


def test_a_section_validates_itself_when_built():
    with pytest.raises(ConfigError) as e:
        LoraSettings(rank=0, alpha=float("nan"))
    assert [p.field for p in e.value.problems] == ["lora.rank", "lora.alpha"]


def test_validate_sees_fields_set_after_construction():
    cfg = TrainConfig()
    cfg.optim.learning_rate = float("inf")
    cfg.train.epochs = -1.0
    with pytest.raises(ConfigError) as e:
        validate(cfg)
    assert [p.field for p in e.value.problems] == ["optim.learning_rate", "train.epochs"]


def test_an_error_about_a_huge_value_is_short():
    """The value is shown through a bounded repr: an error message never grows with the input."""
    with pytest.raises(ConfigError) as e:
        TrainConfig.from_dict({"lora": {"target_modules": [["x" * 100_000] * 1000]}})
    assert len(str(e.value)) < 500
