"""The run config: YAML round trip, overrides, and a clear error for every bad value."""

from __future__ import annotations

import subprocess
import sys

import pytest
import yaml

from qlora_engine.config import TrainConfig, apply_overrides, check_ready, parse_layers
from qlora_engine.errors import ConfigError


def test_yaml_round_trip_keeps_every_field(tmp_path):
    cfg = apply_overrides(
        TrainConfig(),
        ["model.ref=some/model", "lora.rank=32", "lora.target_modules=[q_proj, v_proj]", "data.columns={text: body}",
         "optim.learning_rate=3e-4", "train.max_steps=100", "lora.layers=0-3,7"],
    )
    path = tmp_path / "run.yaml"
    cfg.save(path)
    text = path.read_text()
    assert "schema_version: 1" in text
    assert "# LoRA rank r." in text  # help text becomes comments
    again = TrainConfig.load(path)
    assert again == cfg
    assert again.to_dict() == cfg.to_dict()
    assert yaml.safe_load(text)["lora"]["target_modules"] == ["q_proj", "v_proj"]


def test_overrides_parse_values_as_yaml():
    cfg = apply_overrides(
        TrainConfig(), ["lora.rank=64", "train.max_steps=null", "train.gradient_checkpointing=false", "lora.alpha=32"]
    )
    assert cfg.lora.rank == 64 and cfg.train.max_steps is None
    assert cfg.train.gradient_checkpointing is False
    assert cfg.lora.alpha == 32.0 and isinstance(cfg.lora.alpha, float)


def test_relative_paths_resolve_from_the_config_folder(tmp_path):
    (tmp_path / "sub").mkdir()
    path = tmp_path / "sub" / "run.yaml"
    apply_overrides(TrainConfig(), ["output.dir=out", "data.path=d.jsonl"]).save(path)
    cfg = TrainConfig.load(path)
    assert cfg.output_dir == tmp_path / "sub" / "out"
    assert cfg.resolve(cfg.data.path) == tmp_path / "sub" / "d.jsonl"


BAD = [
    ("lora.rank=0", "lora.rank: 0"),
    ("lora.rank=abc", "lora.rank: 'abc'"),
    ("lora.rank=1.5", "lora.rank: 1.5"),
    ("lora.alpha=-1", "lora.alpha: -1.0"),
    ("lora.dropout=1.0", "lora.dropout"),
    ("lora.target_modules=[]", "lora.target_modules"),
    ("lora.target_modules=[all-linear, q_proj]", "must stand alone"),
    ("lora.layers=3-1", "runs backwards"),
    ("lora.layers=first", "not a layer range"),
    ("quant.quant_type=int8", "one of 'nf4', 'fp4'"),
    ("quant.double_quant=maybe", "quant.double_quant"),
    ("optim.optimizer=sgd", "optim.optimizer: 'sgd'"),
    ("optim.learning_rate=0", "optim.learning_rate"),
    ("optim.adam_beta2=1.0", "optim.adam_beta2"),
    ("optim.max_grad_norm=-1", "optim.max_grad_norm"),
    ("optim.scheduler=step", "optim.scheduler"),
    ("optim.warmup_steps=-5", "optim.warmup_steps"),
    ("train.micro_batch_size=0", "train.micro_batch_size"),
    ("train.gradient_accumulation_steps=0", "train.gradient_accumulation_steps"),
    ("train.epochs=0", "train.epochs"),
    ("train.max_steps=0", "train.max_steps"),
    ("train.save_steps=0", "train.save_steps"),
    ("train.device=tpu", "train.device"),
    ("data.max_length=2", "data.max_length"),
    ("data.validation_split=1.5", "data.validation_split"),
    ("data.overlong=wrap", "data.overlong"),
    ("output.dir=''", "output.dir"),
    ("lora.nope=1", "lora has no field 'nope'"),
    ("nosection.x=1", "unknown section 'nosection'"),
    ("rank=8", "write section.field=value"),
]


@pytest.mark.parametrize(("override", "expected"), BAD, ids=[b[0] for b in BAD])
def test_each_bad_value_names_the_field(override, expected):
    with pytest.raises(ConfigError) as info:
        apply_overrides(TrainConfig(), [override])
    assert expected in str(info.value)


def test_yaml_errors_name_the_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("lora:\n  rank: 8\n  bogus: 1\n")
    with pytest.raises(ConfigError, match=r"bad.yaml.*lora.bogus: unknown field"):
        TrainConfig.load(bad)
    bad.write_text("schema_version: 99\n")
    with pytest.raises(ConfigError, match="schema_version 99"):
        TrainConfig.load(bad)
    bad.write_text("lora: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        TrainConfig.load(bad)
    with pytest.raises(ConfigError, match="not found"):
        TrainConfig.load(tmp_path / "missing.yaml")


def test_python_object_tags_are_refused(tmp_path):
    evil = tmp_path / "evil.yaml"
    evil.write_text("model: !!python/object/apply:os.system ['echo pwned']\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        TrainConfig.load(evil)


def test_check_ready_requires_model_and_data():
    with pytest.raises(ConfigError, match="model.ref"):
        check_ready(TrainConfig())
    with pytest.raises(ConfigError, match="data.path"):
        check_ready(apply_overrides(TrainConfig(), ["model.ref=x"]))


def test_parse_layers():
    assert parse_layers("0-2,5") == [0, 1, 2, 5]
    assert parse_layers(None) is None


def test_init_writes_a_complete_commented_config(tmp_path, tiny_model_dir):
    out = tmp_path / "run.yaml"
    cmd = [sys.executable, "-m", "qlora_engine", "init", "--model", str(tiny_model_dir), "--data", "d.jsonl",
           "--output-dir", str(tmp_path / "runs" / "a"), "-o", str(out), "lora.rank=8"]
    subprocess.run(cmd, check=True, capture_output=True)
    text = out.read_text()
    cfg = TrainConfig.load(out)
    assert cfg.lora.rank == 8 and cfg.model.ref == str(tiny_model_dir)
    # every field of every section is spelled out
    for section, fields in TrainConfig().to_dict().items():
        if isinstance(fields, dict):
            for name in fields:
                assert f"\n  {name}:" in text, f"{section}.{name} missing from init's output"
    again = subprocess.run(cmd, capture_output=True, text=True)
    assert again.returncode == 2 and "already exists" in again.stderr
