"""Hostile inputs, one table row each: configs, command-line overrides, data files, model folders.

Each row builds its input, runs the ``qlora-engine`` command a user would type and states the
exact outcome (see ``hostile_harness.py``): the error type, the field or file (and line) it
names, the exit code. Every row is also checked for no traceback, no "internal error" for a
user's mistake, nothing on disk changed or lost, and no adapter from a failed command. Rows
that could hang or eat memory (a FIFO, an alias bomb) run in a child process with a timeout.
"""

from __future__ import annotations

import json

import pytest
from hostile_harness import ROWS, Case, ids
from input_builders import (
    ALIAS_BOMB,
    SURROGATE_ROWS,
    TRUNCATED_GZ,
    VARIED,
    cut_file,
    damage_file,
    damage_middle,
    data_case,
    deep_block,
    deep_flow,
    drop_tensor,
    fifo,
    gz,
    header_json_flipped,
    header_length_huge,
    model_case,
    override_case,
    parquet_bytes,
    pickle_only,
    problems_are,
    remove,
    sharded_index_missing_shard,
    tar_gz_bytes,
    train_yaml,
    value_case,
    warns,
    weights_empty,
    weights_padded,
    weights_truncated,
    yaml_case,
    zip_bytes,
)

# -- the table ------------------------------------------------------------------------------------

CONFIG_FILES = [
    yaml_case("config binary", b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR", line=3, says=["binary"]),
    yaml_case("config UTF-16 with BOM", "model:\n  ref: m\n".encode("utf-16"), line=1, says=["UTF-16"]),
    yaml_case("config UTF-16 without BOM", "model:\n  ref: m\n".encode("utf-16-le"), line=1, says=["NUL"]),
    yaml_case("config UTF-32", "model:\n  ref: m\n".encode("utf-32"), line=1, says=["UTF-32"]),
    yaml_case("config latin-1 byte", b"model:\n  ref: caf\xe9\n", line=2, says=["not UTF-8"]),
    yaml_case("config too large", "# padding\n" * 200_000, says=["larger than 1024 KiB"]),
    yaml_case("config nested thousands deep (flow)", deep_flow(5000), line=2, says=["nested more than 32"]),
    yaml_case("config nested deep (block)", deep_block(200), says=["nested more than 32"]),
    yaml_case("config alias bomb", ALIAS_BOMB, says=["alias bomb"]),
    yaml_case("config alias refers to itself", "lora:\n  target_modules: &a [q_proj, *a]\n", line=2, says=["refers"]),
    yaml_case(
        "config duplicate section", "lora:\n  rank: 8\nlora:\n  rank: 64\n", line=3, says=["appears twice", "line 1"]
    ),
    yaml_case("config duplicate field", "lora:\n  rank: 8\n  rank: 64\n", line=3, says=["'rank' appears twice"]),
    yaml_case("config integer key", "1: x\nmodel:\n  ref: m\n", line=1, says=["'1' is not a name"]),
    yaml_case("config true key", "lora:\n  yes: 1\n", line=2, says=["not a name"]),
    yaml_case("config merge key", "base: &b {rank: 8}\nlora:\n  <<: *b\n", line=3, says=["merge keys"]),
    yaml_case("config complex key", "? [a, b]\n: 1\n", line=1, says=["not a name"]),
    yaml_case("config integer field key", "data:\n  columns:\n    1: text\n", line=3, says=["not a name"]),
    yaml_case("config two documents", "lora:\n  rank: 8\n---\nlora:\n  rank: 9\n", line=3, says=["single document"]),
    yaml_case("config tab indentation", "lora:\n\trank: 8\n", line=2, says=["not valid YAML"]),
    yaml_case("config unclosed bracket", "lora:\n  target_modules: [q_proj\n", says=["not valid YAML"]),
    yaml_case(
        "config python object tag", "model: !!python/object/apply:os.system ['true']\n", line=1, says=["never loaded"]
    ),
    yaml_case("config is a list", "- a\n- b\n", says=["expected a mapping of sections"]),
    yaml_case("config is a scalar", "just some words\n", says=["expected a mapping of sections", "text"]),
    yaml_case("config unknown section", "modle:\n  ref: x\n", field="modle", line=1, says=["unknown section"]),
    yaml_case("config unknown field", "lora:\n  rnak: 8\n", field="lora.rnak", line=2, says=["unknown field"]),
    yaml_case("config section not a mapping", "lora: 8\n", field="lora", line=1, says=["expected a mapping of fields"]),
    yaml_case("config future schema", "schema_version: 99\n", field="schema_version", line=1, says=["99"]),
    yaml_case("config schema as text", "schema_version: '1'\n", field="schema_version", says=["'1'"]),
    yaml_case("config empty file", "", field="model.ref", says=["no model chosen"]),
    yaml_case("config only comments", "# nothing here\n", field="model.ref", says=["no model chosen"]),
    Case(
        "config missing",
        lambda ws: ["train", str(ws.tmp / "nope.yaml")],
        "ConfigError",
        file="nope.yaml",
        says=("not found",),
    ),
    Case(
        "config is a folder",
        lambda ws: ["train", str(ws.write("folder.yaml/x", "").parent)],
        "ConfigError",
        file="folder.yaml",
        says=("is a folder",),
    ),
    Case(
        "config is /dev/zero",
        lambda ws: ["train", "/dev/zero"],
        "ConfigError",
        file="/dev/zero",
        says=("character device",),
    ),
    Case(
        "config is /dev/null",
        lambda ws: ["train", "/dev/null"],
        "ConfigError",
        file="/dev/null",
        says=("character device",),
    ),
    Case(
        "config is a FIFO (child, must not block)",
        lambda ws: ["train", str(fifo(ws, "run.yaml"))],
        "ConfigError",
        file="run.yaml",
        says=("FIFO",),
        subprocess=True,
        timeout=60,
    ),
    Case(
        "config alias bomb (child, bounded)",
        train_yaml(ALIAS_BOMB),
        "ConfigError",
        file="run.yaml",
        says=("alias bomb",),
        subprocess=True,
        timeout=60,
    ),
    Case(
        "config error as a typed run_failed event (child, --events -)",
        lambda ws: ["train", str(ws.config("lora.rank: 0", "optim.learning_rate: .inf")), "--events", "-"],
        "ConfigError",
        field="lora.rank",
        file="run.yaml",
        line=11,
        subprocess=True,
        check=problems_are("lora.rank", "optim.learning_rate"),
    ),
    Case(
        "estimate on a binary config",
        lambda ws: ["estimate", str(ws.write("run.yaml", b"\x00\x01\x02"))],
        "ConfigError",
        file="run.yaml",
        line=1,
    ),
    Case(
        "inspect-data on a config nested deep",
        lambda ws: ["inspect-data", str(ws.write("run.yaml", deep_flow(2000)))],
        "ConfigError",
        file="run.yaml",
        says=("nested",),
    ),
]

VALUES = [
    value_case("rank zero", "lora.rank: 0", says=["at least 1 and at most 4096"]),
    value_case("rank negative", "lora.rank: -5"),
    value_case("rank huge", "lora.rank: 1000000", says=["4096"]),
    value_case("rank fractional", "lora.rank: 8.5", says=["whole number"]),
    value_case("rank boolean", "lora.rank: true", says=["whole number"]),
    value_case("rank as text", "lora.rank: '16'", says=["'16'"]),
    value_case("alpha nan", "lora.alpha: .nan", says=["not a finite number"]),
    value_case("alpha negative", "lora.alpha: -1", says=["greater than 0"]),
    value_case("dropout one", "lora.dropout: 1.0", says=["less than 1"]),
    value_case("target modules empty", "lora.target_modules: []", says=["at least one"]),
    value_case("target modules preset mixed", "lora.target_modules: [mlp, q_proj]", says=["stand alone"]),
    value_case("target modules a string", "lora.target_modules: q_proj", says=["a list of text"]),
    value_case("target module empty name", "lora.target_modules: ['']", says=["cannot be empty"]),
    value_case("layers astronomically far", "lora.layers: 0-999999999999", says=["past any model"]),
    value_case("layers backwards", "lora.layers: 5-2", says=["backwards"]),
    value_case("layers nonsense", "lora.layers: all", says=["not a layer range"]),
    value_case("learning rate inf", "optim.learning_rate: .inf", says=["not a finite number", "at most 1"]),
    value_case("learning rate 1e6", "optim.learning_rate: 1e6", says=["out of range", "at most 1"]),
    value_case("learning rate 1e400", "optim.learning_rate: 1e400", says=["not a finite number"]),
    value_case("learning rate zero", "optim.learning_rate: 0", says=["greater than 0"]),
    value_case("learning rate words", "optim.learning_rate: fast", says=["'fast'", "a number"]),
    value_case("weight decay negative", "optim.weight_decay: -0.1"),
    value_case("beta2 one", "optim.adam_beta2: 1.0"),
    value_case("epsilon zero", "optim.adam_epsilon: 0"),
    value_case("grad norm inf", "optim.max_grad_norm: .inf", says=["not a finite number"]),
    value_case("warmup negative", "optim.warmup_steps: -1"),
    value_case("optimizer unknown", "optim.optimizer: sgd", says=["paged_adamw_8bit"]),
    value_case("scheduler unknown", "optim.scheduler: exponential", says=["cosine"]),
    value_case("epochs inf", "train.epochs: .inf", says=["not a finite number", "at most 1000"]),
    value_case("epochs minus inf", "train.epochs: -.inf", says=["not a finite number"]),
    value_case("epochs zero", "train.epochs: 0", says=["greater than 0"]),
    value_case(
        "grad accumulation a billion",
        "train.gradient_accumulation_steps: 1000000000",
        says=["at least 1 and at most 4096"],
    ),
    value_case("micro batch zero", "train.micro_batch_size: 0"),
    value_case("max steps zero", "train.max_steps: 0", max_steps=None),
    value_case("max steps ten billion", "train.max_steps: 10000000000", max_steps=None),
    value_case("seed negative", "train.seed: -1", says=["at least 0 and at most"]),
    value_case("seed past 32 bits", "train.seed: 1099511627776"),
    value_case("save steps zero", "train.save_steps: 0"),
    value_case("logging steps nan", "train.logging_steps: .nan", says=["whole number"]),
    value_case("checkpoint layers with auto", "train.checkpoint_layers: 2", says=["auto chooses"]),
    value_case("device unknown", "train.device: tpu", says=["'cuda'"]),
    value_case("kernels unknown", "train.kernels: triton"),
    value_case("quant type int8", "quant.quant_type: int8", says=["'nf4', 'fp4'"]),
    value_case("compute dtype unknown", "quant.compute_dtype: int4"),
    value_case("attention unknown", "model.attn_implementation: flash9"),
    value_case("max length tiny", "data.max_length: 4", says=["at least 8 and at most"]),
    value_case("max length a billion", "data.max_length: 1000000000"),
    value_case("validation split 1.5", "data.validation_split: 1.5"),
    value_case("bad fraction negative", "data.max_bad_fraction: -0.1"),
    value_case("data format unknown", "data.format: xml", says=["'alpaca'"]),
    value_case("chat template broken", 'data.chat_template: "{% for %}"', says=["not valid Jinja"]),
    value_case("data path with NUL", 'data.path: "a\\0b"', says=["NUL"]),
    value_case("model ref 5000 characters", "model.ref: " + "x" * 5000, says=["at most 4,096"]),
    value_case("columns not a mapping", "data.columns: [text]", says=["a mapping"]),
    value_case("output dir empty", "output.dir: ''", says=["name a folder"]),
    value_case("trust remote code as text", "model.trust_remote_code: 'yes'", says=["true or false"]),
    Case(
        "three bad fields at once",
        lambda ws: ["train", str(ws.config("lora.rank: 0", "optim.learning_rate: .inf", "train.epochs: -1"))],
        "ConfigError",
        field="train.epochs",  # problems come in the file's order
        file="run.yaml",
        says=("and 2 more problems",),
        check=problems_are("train.epochs", "lora.rank", "optim.learning_rate"),
    ),
    Case(
        "output dir is an existing file",
        lambda ws: ["train", str(ws.config(f"output.dir: {json.dumps(str(ws.write('taken', 'keep me')))}"))],
        "ConfigError",
        field="output.dir",
        file="taken",
        says=("is a file",),
    ),
    Case(
        "output dir below a file",
        lambda ws: ["train", str(ws.config(f"output.dir: {json.dumps(str(ws.write('taken', 'keep me')) + '/run')}"))],
        "ConfigError",
        field="output.dir",
        file="taken",
        says=("is a file",),
    ),
    Case(
        "output dir cannot be made",
        lambda ws: ["train", str(ws.config('output.dir: "/proc/qlora-hostile/run"'))],
        "ConfigError",
        field="output.dir",
        says=("cannot be made",),
    ),
]

OVERRIDES = [
    override_case("override without =", "lora.rank", says=["section.field=value"]),
    override_case("override with three parts", "lora.rank.x=1", says=["section.field=value"]),
    override_case("override unknown section", "loar.rank=8", field="loar", says=["unknown section 'loar'"]),
    override_case("override unknown field", "lora.rnak=8", field="lora.rnak", says=["no field 'rnak'"]),
    override_case("override not a number", "lora.rank=abc", field="lora.rank", says=["'abc'"]),
    override_case("override inf", "optim.learning_rate=.inf", field="optim.learning_rate", says=["finite"]),
    override_case("override nan text", "train.epochs=nan", field="train.epochs", says=["finite"]),
    override_case("override broken YAML", "lora.target_modules=[q_proj", field="lora.target_modules"),
    override_case("override alias", "lora.target_modules=*a", field="lora.target_modules"),
    override_case("override two bad", "lora.rank=0", "lora.alpha=-1", field="lora.rank", says=["and 1 more problem"]),
    Case(
        "init with a bad override",
        lambda ws: ["init", "--model", "m", "--data", "d", "-o", str(ws.tmp / "new.yaml"), "optim.learning_rate=1e6"],
        "ConfigError",
        field="optim.learning_rate",
        check=lambda ws, out: not (ws.tmp / "new.yaml").exists() or pytest.fail("init wrote a bad config"),
    ),
    Case(
        "init into a place that cannot be written",
        lambda ws: ["init", "--model", "m", "--data", "d", "-o", "/proc/qlora-hostile/run.yaml"],
        "QLoRAError",
        file="/proc/qlora-hostile/run.yaml",
        says=("cannot be written",),
    ),
    Case(
        "init below a file",
        lambda ws: ["init", "--model", "m", "--data", "d", "-o", str(ws.write("taken", "keep me")) + "/run.yaml"],
        "QLoRAError",
        file="taken/run.yaml",
        says=("a file stands where a folder must be",),
    ),
]

DATA = [
    data_case("gzip truncated", "d.jsonl.gz", TRUNCATED_GZ, says=["truncated"]),
    data_case("gzip that is not gzip", "d.jsonl.gz", ROWS, says=["damaged"]),
    data_case(
        "gzip json array truncated",
        "d.json.gz",
        gz(b"[" + VARIED.replace(b"\n", b",") + b"]")[:900],
        says=["truncated"],
    ),
    data_case("parquet damaged page", "d.parquet", damage_middle(parquet_bytes()), says=["Parquet"]),
    data_case("parquet truncated", "d.parquet", parquet_bytes()[:-200], says=["Parquet"]),
    data_case("parquet magic only", "d.parquet", b"PAR1garbagePAR1", says=["not a readable Parquet"]),
    data_case("json array not closed", "d.json", '[{"text": "a"},\n{"text": "b"}\n', line=3, says=["not closed"]),
    data_case("jsonl malformed line", "d.jsonl", '{"text": "ok"}\n{"text": broken\n', line=2, says=["not valid JSON"]),
    data_case(
        "jsonl nested deep",
        "d.jsonl",
        '{"text": "ok"}\n' + "[" * 100_000 + "]" * 100_000 + "\n",
        line=2,
        says=["nested"],
    ),
    data_case("utf-16 data", "d.jsonl", ROWS.encode("utf-16"), says=["UTF-16"]),
    data_case("all rows not UTF-8", "d.jsonl", b'{"text": "caf\xe9"}\n' * 3, says=["UTF-8", "line 1"]),
    data_case(
        "all rows lone surrogates",
        "d.jsonl",
        '{"text": "a \\ud800"}\n{"text": "b \\udfff"}\n',
        says=["lone surrogate", "line 1"],
    ),
    data_case("empty data file", "d.jsonl", "", says=["empty"]),
    data_case("only blank lines", "d.jsonl", "\n\n\n", says=["no rows"]),
    data_case("csv header only", "d.csv", "text\n", says=["no rows"]),
    data_case("wrong column mapped", "d.jsonl", ROWS, settings=["data.columns: {text: body}"], says=["'body'"]),
    data_case("unknown format", "d.jsonl", '{"foo": 1, "bar": 2}\n', says=["format"]),
    data_case("format forced wrong", "d.jsonl", ROWS, settings=["data.format: alpaca"]),
    data_case("binary file named .txt", "d.txt", bytes(range(256)) * 8, says=["UTF-8"]),
    data_case("unknown extension", "d.bin", b"\x00\x01garbage", says=["unknown file type"]),
    data_case("zip truncated", "d.zip", zip_bytes({"t.jsonl": ROWS * 50})[:100], says=["not a readable"]),
    data_case("tar.gz truncated", "d.tar.gz", tar_gz_bytes({"t.jsonl": ROWS * 50})[:60]),
    data_case("zip without data", "d.zip", zip_bytes({"README.md": "hi"}), says=["no data file"]),
    Case(
        "data path missing",
        lambda ws: ["train", str(ws.config(data=ws.tmp / "gone.jsonl"))],
        "DataError",
        file="gone.jsonl",
        says=("no such file",),
    ),
    Case(
        "data is a folder that is not a dataset",
        lambda ws: ["train", str(ws.config(data=ws.write("folder/x.md", "hi").parent))],
        "DataError",
        file="folder",
        says=("save_to_disk",),
    ),
    Case(
        "data is /dev/zero",
        lambda ws: ["train", str(ws.config(data="/dev/zero"))],
        "DataError",
        field="data.path",
        file="/dev/zero",
        says=("character device",),
    ),
    Case(
        "data is a FIFO",
        lambda ws: ["train", str(ws.config(data=fifo(ws, "d.jsonl")))],
        "DataError",
        field="data.path",
        file="d.jsonl",
        says=("FIFO",),
    ),
    Case(
        "inspect-data on a FIFO (child, must not block)",
        lambda ws: ["inspect-data", str(fifo(ws, "d.jsonl"))],
        "DataError",
        file="d.jsonl",
        says=("FIFO",),
        subprocess=True,
        timeout=60,
    ),
    Case(
        "validation file missing",
        lambda ws: ["train", str(ws.config(f"data.validation_path: {json.dumps(str(ws.tmp / 'val.jsonl'))}"))],
        "DataError",
        file="val.jsonl",
    ),
    Case(
        "inspect-data on a truncated gzip",
        lambda ws: ["inspect-data", str(ws.write("d.jsonl.gz", TRUNCATED_GZ))],
        "DataError",
        file="d.jsonl.gz",
        says=("truncated",),
    ),
]

MODELS = [
    model_case("config.json truncated", cut_file("config.json"), file="config.json", says=["not valid JSON"]),
    model_case("config.json a list", damage_file("config.json", "[]"), file="config.json", says=["model_type"]),
    model_case(
        "config.json binary", damage_file("config.json", b"\xff\xfe\x00garbage"), file="config.json", says=["not UTF-8"]
    ),
    model_case("config.json missing", remove("config.json"), file="model", says=["no config.json"]),
    model_case("tokenizer.json truncated", cut_file("tokenizer.json"), file="tokenizer.json", says=["not valid JSON"]),
    model_case(
        "tokenizer_config.json damaged", damage_file("tokenizer_config.json", "{oops"), file="tokenizer_config.json"
    ),
    model_case(
        "tokenizer files missing",
        remove("tokenizer.json", "tokenizer_config.json"),
        file="model",
        says=["no tokenizer"],
    ),
    model_case(
        "safetensors header length huge", header_length_huge, file="model.safetensors", says=["damaged safetensors"]
    ),
    model_case(
        "safetensors header byte flipped", header_json_flipped, file="model.safetensors", says=["not valid JSON"]
    ),
    model_case("safetensors truncated", weights_truncated, file="model.safetensors", says=["outside the file"]),
    model_case("safetensors padded", weights_padded, file="model.safetensors", says=["bytes more"]),
    model_case("safetensors empty", weights_empty, file="model.safetensors", says=["shorter than"]),
    model_case(
        "embedding weights missing",
        drop_tensor("model.embed_tokens.weight"),
        file="model",
        says=["model.embed_tokens.weight", "random"],
    ),
    model_case(
        "one layer's weight missing", drop_tensor("model.layers.1.mlp.up_proj.weight"), file="model", says=["up_proj"]
    ),
    model_case(
        "index names a missing shard",
        sharded_index_missing_shard,
        file="model.safetensors.index.json",
        says=["missing"],
    ),
    model_case("pickle-only weights", pickle_only, file="model", says=["pickle"]),
    model_case("no weights at all", remove("model.safetensors"), file="model", says=["no weight files"]),
    model_case(
        "inspect damaged safetensors",
        weights_truncated,
        command="inspect-model",
        code=3,
        says=["unusable", "damaged safetensors"],
    ),
    model_case(
        "inspect missing embeddings",
        drop_tensor("model.embed_tokens.weight"),
        command="inspect-model",
        code=3,
        says=["unusable", "embed_tokens"],
    ),
    model_case(
        "inspect damaged tokenizer",
        cut_file("tokenizer.json"),
        command="inspect-model",
        code=3,
        says=["unusable", "tokenizer.json"],
    ),
    Case(
        "inspect damaged config.json",
        lambda ws: ["inspect-model", str(ws.model_copy(cut_file("config.json")))],
        "ModelError",
        file="config.json",
    ),
    Case(
        "model ref is a text file",
        lambda ws: ["train", str(ws.config(model=ws.write("notes.txt", "hello")))],
        "ModelError",
        field="model.ref",
        file="notes.txt",
        says=("not a .gguf",),
    ),
    Case(
        "model ref a garbage .gguf",
        lambda ws: ["train", str(ws.config(model=ws.write("m.gguf", b"GGUF" + b"\xff" * 64)))],
        "ModelError",
        file="m.gguf",
        says=("GGUF",),
    ),
    Case(
        "model folder missing",
        lambda ws: ["train", str(ws.config(model=ws.tmp / "no-model"))],
        "ModelError",
        field="model.ref",
        file="no-model",
    ),
]

WARNINGS = [
    # Legal but suspicious, all in one run (a training run is the slow part of this table): a
    # row with a lone surrogate is skipped and counted with its line, warmup longer than the
    # run and accumulation larger than the data are trained but warned about by field name.
    Case(
        "trains, warning by field and line",
        lambda ws: [
            "train",
            str(
                ws.config(
                    "optim.warmup_steps: 10",
                    "train.micro_batch_size: 4",
                    "train.gradient_accumulation_steps: 3",
                    data=ws.write("d.jsonl", SURROGATE_ROWS),
                )
            ),
        ],
        None,
        says=("lone surrogate", "line 2"),
        check=warns("skipped 1 rows", "optim.warmup_steps", "train.gradient_accumulation_steps"),
    ),
]

CASES = CONFIG_FILES + VALUES + OVERRIDES + DATA + MODELS + WARNINGS


def test_the_corpus_is_large_enough():
    assert len(CASES) >= 90


@pytest.mark.parametrize("case", CASES, ids=ids(CASES))
def test_hostile_input(case, run_case):
    run_case(case)
