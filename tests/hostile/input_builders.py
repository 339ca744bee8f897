"""Builders of the hostile-input table (tests/hostile/test_inputs.py): cases by kind, damaged files, checks."""

from __future__ import annotations

import gzip
import io
import json
import os
import struct
import tarfile
import zipfile
from pathlib import Path

from hostile_harness import Case, Outcome, Workspace, config_text, line_of

# -- builders -------------------------------------------------------------------------------------


def train_yaml(content: str | bytes, *extra: str):
    """``train`` on a config file holding exactly ``content``."""
    return lambda ws: ["train", str(ws.write("run.yaml", content)), *extra]


def yaml_case(name: str, content: str | bytes, *, line: int | None = None, field: str | None = None, says=()):
    return Case(name, train_yaml(content), "ConfigError", field=field, file="run.yaml", line=line, says=tuple(says))


def value_case(name: str, setting: str, *, says=(), field: str | None = None, max_steps: int | None = 1):
    """One bad ``section.field: value`` line in an otherwise valid config: the error names that
    field and its line, and says what is allowed."""
    fld = field or setting.partition(":")[0].strip()
    line = line_of(config_text(setting, max_steps=max_steps), fld)
    return Case(
        name,
        lambda ws: ["train", str(ws.config(setting, max_steps=max_steps))],
        "ConfigError",
        field=fld,
        file="run.yaml",
        line=line,
        says=tuple(says),
    )


def override_case(name: str, *overrides: str, field: str | None = None, says=()):
    return Case(name, lambda ws: ["train", str(ws.config()), *overrides], "ConfigError", field=field, says=tuple(says))


def data_case(name: str, filename: str, content: str | bytes, *, line=None, says=(), error="DataError", settings=()):
    return Case(
        name,
        lambda ws: ["train", str(ws.config(*settings, data=ws.write(filename, content)))],
        error,
        file=filename,
        line=line,
        says=tuple(says),
    )


def model_case(name: str, edit, *, file: str | None = None, line=None, says=(), command: str = "train", code=None):
    """A private copy of the tiny model, damaged by ``edit(folder)``; ``train`` or ``inspect-model`` on it."""

    def build(ws: Workspace) -> list[str]:
        folder = ws.model_copy(edit)
        if command == "inspect-model":
            return ["inspect-model", str(folder)]
        return ["train", str(ws.config(model=folder))]

    error = None if code == 3 else "ModelError"
    return Case(name, build, error, file=file, line=line, says=tuple(says), code=code)


# -- inputs ---------------------------------------------------------------------------------------


def gz(data: bytes) -> bytes:
    return gzip.compress(data)


# Rows that do not compress to nothing, so half of their gzip stream is truly half.
VARIED = "".join(json.dumps({"text": f"row {i} {i * 7919 % 104729} {i**3}"}) + "\n" for i in range(400)).encode()
TRUNCATED_GZ = gz(VARIED)[: len(gz(VARIED)) // 2]


ALIAS_BOMB = (
    "a: &a [x, x, x, x, x, x, x, x, x]\n"
    + "".join(f"{c}: &{c} [{', '.join([f'*{p}'] * 9)}]\n" for p, c in zip("abcdefgh", "bcdefghi", strict=True))
    + "model:\n  ref: *i\n"
)


def deep_flow(n: int) -> str:
    return "lora:\n  target_modules: " + "[" * n + "]" * n + "\n"


def deep_block(n: int) -> str:
    return "".join("  " * i + f"k{i}:\n" for i in range(n)) + "  " * n + "v: 1\n"


def parquet_bytes(rows: int = 200) -> bytes:
    import pyarrow as pa
    import pyarrow.parquet as pq

    buf = io.BytesIO()
    table = pa.table({"text": [f"row {i} " + "words " * 20 for i in range(rows)]})
    pq.write_table(table, buf, row_group_size=50, compression="NONE")
    return buf.getvalue()


def damage_middle(data: bytes) -> bytes:
    """Overwrite a run of bytes in the middle: the footer still parses, a data page does not."""
    mid = len(data) // 2
    return data[:mid] + b"\xff" * 64 + data[mid + 64 :]


def fifo(ws: Workspace, name: str) -> Path:
    path = ws.tmp / name
    os.mkfifo(path)
    return path


def zip_bytes(members: dict[str, str]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        for n, t in members.items():
            zf.writestr(n, t)
    return buf.getvalue()


def tar_gz_bytes(members: dict[str, str]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tf:
        for n, t in members.items():
            info = tarfile.TarInfo(n)
            info.size = len(t.encode())
            tf.addfile(info, io.BytesIO(t.encode()))
    return buf.getvalue()


# -- damaging a model folder ----------------------------------------------------------------------


def _rewrite(path: Path, fn) -> None:
    path.write_bytes(fn(path.read_bytes()))


def header_length_huge(f: Path) -> None:
    _rewrite(f / "model.safetensors", lambda b: struct.pack("<Q", 1 << 40) + b[8:])


def header_json_flipped(f: Path) -> None:
    _rewrite(f / "model.safetensors", lambda b: b[:8] + b"#" + b[9:])  # the header's opening '{'


def weights_truncated(f: Path) -> None:
    _rewrite(f / "model.safetensors", lambda b: b[:-1000])


def weights_padded(f: Path) -> None:
    _rewrite(f / "model.safetensors", lambda b: b + b"\0" * 4096)


def weights_empty(f: Path) -> None:
    (f / "model.safetensors").write_bytes(b"")


def drop_tensor(name: str):
    def edit(f: Path) -> None:
        from safetensors.torch import load_file, save_file

        tensors = load_file(f / "model.safetensors")
        del tensors[name]
        save_file(tensors, f / "model.safetensors", metadata={"format": "pt"})

    return edit


def damage_file(name: str, content: bytes | str):
    def edit(f: Path) -> None:
        target = f / name
        if isinstance(content, bytes):
            target.write_bytes(content)
        else:
            target.write_text(content, encoding="utf-8")

    return edit


def cut_file(name: str, keep: float = 0.5):
    return lambda f: _rewrite(f / name, lambda b: b[: int(len(b) * keep)])


def remove(*names: str):
    def edit(f: Path) -> None:
        for n in names:
            (f / n).unlink()

    return edit


def pickle_only(f: Path) -> None:
    (f / "model.safetensors").unlink()
    (f / "pytorch_model.bin").write_bytes(b"never opened")


def sharded_index_missing_shard(f: Path) -> None:
    (f / "model.safetensors").rename(f / "model-00001-of-00002.safetensors")
    weight_map = {"lm_head.weight": "model-00002-of-00002.safetensors"}
    (f / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))


# -- checks beyond the error ------------------------------------------------------------------------


def problems_are(*fields: str):
    def check(ws: Workspace, out: Outcome) -> None:
        got = [p["field"] for p in out.error["problems"]]
        assert got == list(fields), got

    return check


def warns(*fragments: str):
    """The run trained (exit 0) and a warning on stderr names the field."""

    def check(ws: Workspace, out: Outcome) -> None:
        warnings = [ln for ln in out.stderr.splitlines() if "warning" in ln.lower() or "skipped" in ln.lower()]
        for f in fragments:
            assert any(f in ln for ln in warnings), f"{f!r} not in the warnings: {warnings}"
        assert (ws.tmp / "run" / "adapter").is_dir()

    return check


SURROGATE_ROWS = '{"text": "hello there"}\n{"text": "bad \\ud800 row"}\n' + '{"text": "general kenobi"}\n' * 10
