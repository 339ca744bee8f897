"""The scrubber treats text files and the headers of binary files alike (tokens masked, names kept)."""

from __future__ import annotations

import json
import struct
from pathlib import Path
from types import SimpleNamespace

import pytest

from qlora_engine import scrub


@pytest.fixture
def fresh(monkeypatch):
    """The scrubber's process-wide memory, empty for one test."""
    monkeypatch.setattr(scrub, "_known", set())
    monkeypatch.setattr(scrub, "_names", set())
    for name in scrub.TOKEN_VARIABLES:
        monkeypatch.delenv(name, raising=False)


def safetensors_with(path: Path, metadata: dict[str, str]) -> bytes:
    header = json.dumps({"__metadata__": metadata, "w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}})
    raw = struct.pack("<Q", len(header)) + header.encode() + struct.pack("<2f", 1.0, 2.0)
    path.write_bytes(raw)
    return raw


@pytest.mark.parametrize("suffix", [".safetensors", ".gguf", ".bin", ".json"])
def test_a_token_shaped_model_folder_is_kept_and_every_token_masked(fresh, tmp_path, monkeypatch, suffix):
    name = "hf_" + "JustAFolderName" * 2
    model = tmp_path / name / "model"
    model.mkdir(parents=True)
    secret = "hf_" + "RealSecretToken" * 2
    stray = "hf_" + "SomeoneElsesToken" * 2
    monkeypatch.setenv("HF_TOKEN", secret)
    scrub.remember_config(SimpleNamespace(model=SimpleNamespace(ref=str(model), token=None)))

    f = tmp_path / f"weights{suffix}"
    meta = {"base": str(model), "token": secret, "other": stray}
    if suffix == ".json":  # a text file, scrubbed whole
        f.write_text(json.dumps(meta))
    before = f.read_bytes() if suffix == ".json" else safetensors_with(f, meta)
    assert scrub.scrub_file(f)
    after = f.read_bytes()
    assert name.encode() in after  # the model's folder, as written in config.yaml
    assert secret.encode() not in after and stray.encode() not in after
    if suffix != ".json":  # weights: same length, every offset valid
        assert len(after) == len(before) and after[-8:] == before[-8:]
        header = json.loads(after[8 : 8 + struct.unpack("<Q", after[:8])[0]])
        assert header["__metadata__"]["base"] == str(model)


def test_a_name_is_kept_only_for_a_path_that_exists(fresh, tmp_path):
    name = "hf_" + "NotThereFolder" * 2
    scrub.remember_config(SimpleNamespace(model=SimpleNamespace(ref=str(tmp_path / name), token=None)))
    f = tmp_path / "w.safetensors"
    safetensors_with(f, {"base": str(tmp_path / name)})
    assert scrub.scrub_file(f) and name.encode() not in f.read_bytes()
    assert scrub.scrub(str(tmp_path / name)) == str(tmp_path / scrub.MASK)
