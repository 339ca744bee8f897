"""Every bad input we could think of, in one table: each gets a clear error naming what is wrong.

Each case builds its input in a temporary folder, runs the `qlora-engine` command a user
would run (in-process, through the same `main()`), and checks the exit code and that the
message names the file, line or field at fault. Nothing here may crash with a traceback.
"""

from __future__ import annotations

import io
import json
import shutil
import tarfile
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

from qlora_engine.cli import main
from qlora_engine.config import TrainConfig, apply_overrides


@dataclass
class Case:
    name: str
    build: Callable[[Path, Path], list[str]]
    """(tmp, tiny_model_dir) -> the command's arguments"""
    expect: tuple[str, ...]
    code: int = 2


def cfg_file(tmp: Path, model: Path | str, *overrides: str, data: Path | None = None) -> str:
    data = data or write(tmp / "train.jsonl", '{"text": "hello there"}\n{"text": "general kenobi"}\n')
    cfg = apply_overrides(
        TrainConfig(),
        [f"model.ref={model}", f"data.path={data}", f"output.dir={tmp / 'run'}", "train.max_steps=1", *overrides],
    )
    path = tmp / "run.yaml"
    cfg.save(path)
    return str(path)


def write(path: Path, text: str | bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(text, bytes):
        path.write_bytes(text)
    else:
        path.write_text(text, encoding="utf-8")
    return path


def train_yaml(text: str) -> Callable[[Path, Path], list[str]]:
    return lambda tmp, model: ["train", str(write(tmp / "run.yaml", text))]


def train_with(*overrides: str) -> Callable[[Path, Path], list[str]]:
    return lambda tmp, model: ["train", cfg_file(tmp, model), *overrides]


def train_data(name: str, text: str | bytes, *overrides: str) -> Callable[[Path, Path], list[str]]:
    return lambda tmp, model: ["train", cfg_file(tmp, model, *overrides, data=write(tmp / name, text))]


ROW = '{"text": "hello there"}\n'


def train_zip(name: str, members: dict[str, str]) -> Callable[[Path, Path], list[str]]:
    """Train on a zip holding ``members`` (names stored as given, '..' and all)."""

    def build(tmp: Path, model: Path) -> list[str]:
        path = tmp / name
        with zipfile.ZipFile(path, "w") as zf:
            for member, text in members.items():
                zf.writestr(member, text)
        return ["train", cfg_file(tmp, model, data=path)]

    return build


def train_tar_with(kind: bytes, linkname: str = "") -> Callable[[Path, Path], list[str]]:
    """Train on a tar whose member 'data' is a link or special file, followed by a data file through it."""

    def build(tmp: Path, model: Path) -> list[str]:
        path = tmp / "evil.tar"
        with tarfile.open(path, "w") as tf:
            odd = tarfile.TarInfo("data")
            odd.type, odd.linkname = kind, linkname
            tf.addfile(odd)
            rows = tarfile.TarInfo("data/rows.jsonl")
            rows.size = len(ROW)
            tf.addfile(rows, io.BytesIO(ROW.encode()))
        return ["train", cfg_file(tmp, model, data=path)]

    return build


def model_folder(edit: Callable[[Path], None]) -> Callable[[Path, Path], list[str]]:
    def build(tmp: Path, model: Path) -> list[str]:
        folder = tmp / "model"
        shutil.copytree(model, folder)
        edit(folder)
        return ["train", cfg_file(tmp, folder)]

    return build


def pickle_only(folder: Path) -> None:
    (folder / "model.safetensors").unlink()
    write(folder / "pytorch_model.bin", b"never opened")


def remote_code(folder: Path) -> None:
    write(folder / "config.json", json.dumps({"model_type": "custom_arch", "auto_map": {"AutoConfig": "x.XConfig"}}))


CASES = [
    # -- the config file ------------------------------------------------------------------
    Case("config file missing", lambda tmp, m: ["train", str(tmp / "nope.yaml")], ("nope.yaml", "not found")),
    Case("config not YAML", train_yaml("lora: [unclosed\n"), ("run.yaml", "not valid YAML")),
    Case("python object tag", train_yaml("model: !!python/object/apply:os.system ['true']\n"), ("not valid YAML",)),
    Case("config is a list", train_yaml("- a\n- b\n"), ("run.yaml", "expected a mapping")),
    Case("unknown section", train_yaml("modle:\n  ref: x\n"), ("run.yaml", "unknown section", "modle")),
    Case("unknown field", train_yaml("lora:\n  rnak: 8\n"), ("run.yaml", "lora.rnak", "unknown field")),
    Case("section not a mapping", train_yaml("lora: 8\n"), ("lora", "expected a mapping")),
    Case("wrong type", train_yaml("lora:\n  rank: abc\n"), ("lora.rank", "'abc'", "whole number")),
    Case("future schema", train_yaml("schema_version: 99\n"), ("schema_version 99",)),
    Case("no model chosen", train_yaml("data:\n  path: d.jsonl\n"), ("model.ref", "no model chosen")),
    Case("no data chosen", train_yaml("model:\n  ref: m\n"), ("data.path", "no training data")),
    # -- values ---------------------------------------------------------------------------
    Case("rank zero", train_with("lora.rank=0"), ("lora.rank: 0",)),
    Case("dropout one", train_with("lora.dropout=1.5"), ("lora.dropout",)),
    Case("preset mixed with names", train_with("lora.target_modules=[mlp, q_proj]"), ("must stand alone",)),
    Case("layer range backwards", train_with("lora.layers=5-2"), ("lora.layers", "backwards")),
    Case("layer range nonsense", train_with("lora.layers=all"), ("lora.layers", "not a layer range")),
    Case("quant type", train_with("quant.quant_type=int8"), ("quant.quant_type", "'nf4', 'fp4'")),
    Case("optimizer", train_with("optim.optimizer=sgd"), ("optim.optimizer", "paged_adamw_8bit")),
    Case("negative learning rate", train_with("optim.learning_rate=-1e-4"), ("optim.learning_rate",)),
    Case("micro-batch zero", train_with("train.micro_batch_size=0"), ("train.micro_batch_size",)),
    Case("max length tiny", train_with("data.max_length=2"), ("data.max_length",)),
    Case("validation everything", train_with("data.validation_split=1"), ("data.validation_split",)),
    Case("liger without a GPU", train_with("train.kernels=liger"), ("train.kernels", "liger")),
    Case("override without =", train_with("lora.rank"), ("section.field=value",)),
    Case("override unknown section", train_with("loar.rank=8"), ("unknown section 'loar'",)),
    Case("override unknown field", train_with("lora.rnak=8"), ("lora has no field 'rnak'",)),
    # -- model references -----------------------------------------------------------------
    Case("model folder missing", lambda tmp, m: ["train", cfg_file(tmp, tmp / "no-model")], ("no-model", "no such")),
    Case("folder without config.json", model_folder(lambda f: (f / "config.json").unlink()), ("no config.json",)),
    Case("pickle-only weights", model_folder(pickle_only), ("pickle", "safetensors")),
    Case("no weights at all", model_folder(lambda f: (f / "model.safetensors").unlink()), ("no weight files",)),
    Case("remote code needed", model_folder(remote_code), ("trust_remote_code",)),
    Case("gguf file missing", lambda tmp, m: ["train", cfg_file(tmp, tmp / "x.gguf")], ("x.gguf", "not found")),
    Case(
        "hub id offline",
        lambda tmp, m: ["train", cfg_file(tmp, "no-such-org/no-such-model")],
        ("could not be downloaded", "offline"),
    ),
    Case("unknown target module", train_with("lora.target_modules=[qkv_proj]"), ("qkv_proj", "q_proj")),
    Case("layers past the model", train_with("lora.layers=0-40"), ("lora.layers", "2 layers")),
    Case("inspect pickle-only", lambda tmp, m: ["inspect-model", str(_pickled(tmp, m))], ("pickle",), 3),
    # -- data files -----------------------------------------------------------------------
    Case("data file missing", lambda tmp, m: ["train", cfg_file(tmp, m, data=tmp / "gone.jsonl")], ("gone.jsonl",)),
    Case("malformed JSON line", train_data("d.jsonl", '{"text": "ok"}\n{"text": broken\n'), ("d.jsonl:2:",)),
    Case("empty file", train_data("d.jsonl", ""), ("d.jsonl", "empty")),
    Case("no usable rows", train_data("d.jsonl", '{"text": ""}\n{"text": "  "}\n'), ("d.jsonl",)),
    Case("unknown format", train_data("d.jsonl", '{"foo": 1, "bar": 2}\n'), ("d.jsonl", "format")),
    Case("not UTF-8", train_data("d.jsonl", b'{"text": "caf\xe9"}\n'), ("d.jsonl", "UTF-8")),
    Case("too many bad rows", train_data("d.jsonl", '{"text": "ok"}\n' + '{"text": ""}\n' * 9), ("d.jsonl",)),
    Case("CSV header only", train_data("d.csv", "text\n"), ("d.csv",)),
    Case("format forced wrong", train_data("d.jsonl", '{"text": "hi"}\n', "data.format=alpaca"), ("d.jsonl",)),
    # -- data archives ----------------------------------------------------------------------
    Case(
        "archive member climbs out",
        train_zip("evil.zip", {"../../evil.jsonl": ROW}),
        ("evil.zip", "refused to extract member '../../evil.jsonl'", "climbs out"),
    ),
    Case(
        "archive member absolute",
        train_zip("evil.zip", {"/qlora-evil/rows.jsonl": ROW}),
        ("evil.zip", "'/qlora-evil/rows.jsonl'", "absolute path"),
    ),
    Case("archive symlink member", train_tar_with(tarfile.SYMTYPE, "/etc"), ("evil.tar", "'data'", "symbolic link")),
    Case(
        "archive hardlink member", train_tar_with(tarfile.LNKTYPE, "/etc/passwd"), ("evil.tar", "'data'", "hard link")
    ),
    Case("archive fifo member", train_tar_with(tarfile.FIFOTYPE), ("evil.tar", "'data'", "fifo")),
    Case(
        "archive with several data sets",
        train_zip("many.zip", {"a.jsonl": ROW, "b.csv": "text\nhi\n"}),
        ("many.zip", "a.jsonl, b.csv", "point data.path at one of them"),
    ),
    Case(
        "archive without data",
        train_zip("docs.zip", {"README.md": "hi", "paper.pdf": "%PDF"}),
        ("docs.zip", "no data file", "paper.pdf"),
    ),
    Case("archive damaged", train_data("cut.zip", b"PK\x03\x04\x14\x00"), ("cut.zip", "not a readable")),
    # -- resuming ---------------------------------------------------------------------------
    Case(
        "resume with nothing saved", lambda tmp, m: ["train", cfg_file(tmp, m), "--resume"], ("no complete checkpoint",)
    ),
    Case(
        "resume from a non-checkpoint",
        lambda tmp, m: ["train", cfg_file(tmp, m), "--resume-from", str(tmp)],
        ("not a complete checkpoint",),
    ),
    # -- command-line arguments -----------------------------------------------------------
    Case("unknown command", lambda tmp, m: ["trian", "x.yaml"], ("invalid choice",)),
    Case("train without config", lambda tmp, m: ["train"], ("config",)),
    Case("events bad choice", lambda tmp, m: ["train", "x.yaml", "--events", "json"], ("--events",)),
    Case(
        "init over an existing file",
        lambda tmp, m: ["init", "--model", "m", "--data", "d", "-o", str(write(tmp / "run.yaml", "x: 1\n"))],
        ("already exists",),
    ),
    Case("estimate nonsense GPU size", lambda tmp, m: ["estimate", cfg_file(tmp, m), "--gpu", "lots"], ("lots",)),
]


def _pickled(tmp: Path, model: Path) -> Path:
    folder = tmp / "pickled"
    shutil.copytree(model, folder)
    pickle_only(folder)
    return folder


@pytest.fixture(autouse=True)
def _private_cache(tmp_path, monkeypatch):
    """Archives are extracted into the engine's cache: keep it inside the test's folder."""
    monkeypatch.setenv("QLORA_STUDIO_CACHE", str(tmp_path / "cache"))


def test_the_table_is_large_enough():
    assert len(CASES) >= 40


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_bad_input_gets_a_clear_error(case, tmp_path, tiny_model_dir, capsys):
    args = case.build(tmp_path, tiny_model_dir)
    try:
        code = main(args)
    except SystemExit as e:  # argparse's own usage errors
        code = e.code
    err = capsys.readouterr().err
    assert code == case.code, err
    assert "Traceback" not in err
    for fragment in case.expect:
        assert fragment.lower() in err.lower(), f"{fragment!r} not in: {err}"
    assert not (tmp_path / "run" / "adapter").exists()
