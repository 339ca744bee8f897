"""Where rows come from: local files of every common kind, saved ``datasets`` folders, hub ids.

Every reader streams: rows are produced one at a time with the place they came from
(``line 12``, ``row 7``) so a later problem can name it. JSONL, CSV and text are read line
by line in binary and decoded per line, so one stray non-UTF-8 byte costs one row (skipped,
counted) instead of the file, and a 1 GB file never sits in memory whole. A row that cannot
be read at all (malformed JSON) stops the read with a :class:`DataError` naming the line.

We parse with the standard library's ``json``/``csv`` and with ``pyarrow`` rather than
``datasets.load_dataset`` for local files: those report the exact line of a problem and do
not copy the file into the Hugging Face cache first. ``datasets`` reads what only it can:
``save_to_disk`` folders and hub ids.
"""

from __future__ import annotations

import csv
import gzip
import hashlib
import io
import json
import os
import stat
import sys
import zlib
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

from qlora_engine.data import archives
from qlora_engine.data.kinds import ACCEPTED_FILES, kind_by_name
from qlora_engine.errors import DataError

_BOMS = {b"\xff\xfe": "UTF-16 LE", b"\xfe\xff": "UTF-16 BE"}


@dataclass
class Row:
    """One row as read: ``data`` is a dict, or ``problem`` says why the row is unusable."""

    where: str
    data: dict[str, Any] | None = None
    problem: str | None = None


@dataclass
class Source:
    """A readable data source. ``rows()`` streams; ``fraction_done()`` reports progress."""

    label: str
    kind: str
    path: Path | None = None
    size_bytes: int | None = None
    dataset: Any = None  # a datasets.Dataset for saved folders and hub ids
    note: str = ""  # how the file was read, when that is a choice (plain text)
    _pos: Any = field(default=None, repr=False)

    def rows(self) -> Iterator[Row]:
        readers = {
            "jsonl": _jsonl_rows,
            "json": _json_rows,
            "csv": _csv_rows,
            "tsv": _csv_rows,
            "parquet": _parquet_rows,
            "text": _text_rows,
            "saved": _dataset_rows,
            "hub": _dataset_rows,
        }
        return readers[self.kind](self)

    def fraction_done(self) -> float | None:
        return self._pos() if self._pos is not None else None

    def content_hash(self) -> str:
        """A hash of the data itself (file bytes, or the dataset's own fingerprint)."""
        h = hashlib.sha256(self.kind.encode())
        if self.dataset is not None:
            h.update(str(getattr(self.dataset, "_fingerprint", "")).encode())
            h.update(str(len(self.dataset)).encode())
        if self.path is not None and self.path.is_file():
            with open(self.path, "rb") as fh:
                for chunk in iter(lambda: fh.read(1 << 22), b""):
                    h.update(chunk)
        return h.hexdigest()


def open_source(spec: str, path: Path, *, subset: str | None = None, split: str = "train") -> Source:
    """Open ``path`` (``spec`` as resolved against the config folder); a hub id if no such path.

    An archive (.zip, .tar, .tar.gz, ...) is checked and extracted once into the engine's cache
    (see :mod:`qlora_engine.data.archives`); the one data file or saved dataset inside is read,
    with a label naming both (``train.zip › data/train.jsonl``).
    """
    if not spec or not spec.strip():
        raise DataError("no training data chosen; set a file, a folder or a hub dataset id.", field="data.path")
    if path.is_dir():
        return _open_saved(path, split)
    if path.exists() and not path.is_file():
        raise DataError(
            f"is {_special_kind(path)}, not a data file; only regular files are read.", file=path, field="data.path"
        )
    if path.is_file():
        if not os.access(path, os.R_OK):
            raise DataError("cannot be read (permission denied).", file=path, fix="Check the file's permissions.")
        if path.stat().st_size == 0:
            raise DataError(f"the file is empty (0 bytes). Accepted inputs: {ACCEPTED_FILES}.", file=path)
        return _open_archive(path, split) if archives.is_archive(path) else _open_file(path, str(path))
    if _looks_like_path(spec):
        raise DataError("no such file or folder.", hint=f"Accepted inputs: {ACCEPTED_FILES}.", file=path)
    return _open_hub(spec, subset, split)


def _special_kind(path: Path) -> str:
    mode = path.stat().st_mode
    for test, name in (
        (stat.S_ISFIFO, "a FIFO (named pipe)"),
        (stat.S_ISCHR, "a character device"),
        (stat.S_ISBLK, "a block device"),
        (stat.S_ISSOCK, "a socket"),
    ):
        if test(mode):
            return name
    return "not a regular file"


def _open_file(path: Path, label: str) -> Source:
    kind = _file_kind(path, label)
    size = path.stat().st_size
    if size == 0:
        raise DataError(f"the file is empty (0 bytes). Accepted inputs: {ACCEPTED_FILES}.", file=label)
    return Source(label=label, kind=kind, path=path, size_bytes=size)


def _open_archive(archive: Path, split: str) -> Source:
    folder = archives.extract(archive)
    inner = archives.data_inside(folder, archive)
    member = inner.relative_to(folder).as_posix()
    label = str(archive) if member == "." else f"{archive} › {member}"
    return _open_saved(inner, split, label) if inner.is_dir() else _open_file(inner, label)


def _looks_like_path(spec: str) -> bool:
    s = spec.strip()
    if s.startswith((".", "/", "~", "\\")) or os.sep in s.replace("/", "") or ":" in s[:3]:
        return True
    if s.count("/") > 1:
        return True
    return kind_by_name(s) is not None or s.lower().endswith(archives.ARCHIVE_SUFFIXES)


def _file_kind(path: Path, label: str) -> str:
    kind = kind_by_name(path.name)
    if kind is not None:
        return kind
    # No telling extension: look at the first bytes.
    with _damage_is_data_error(label), _open_binary(path) as fh:
        head = fh.read(4096).lstrip(b"\xef\xbb\xbf \t\r\n")
    if head.startswith(b"{"):
        return "jsonl"
    if head.startswith(b"["):
        return "json"
    if head.startswith(b"PAR1"):
        return "parquet"
    raise DataError(
        f"unknown file type {path.suffix or '(no extension)'!r}.",
        hint=f"Accepted inputs: {ACCEPTED_FILES}. Rename the file with the extension that fits its content.",
        file=label,
    )


MAX_ROW_BYTES = 64 << 20
"""Longest line read as one row: far past any sample a model can take, short of exhausting RAM."""


@contextmanager
def _damage_is_data_error(label: str, where: Callable[[], str] = lambda: "") -> Iterator[None]:
    """A truncated or corrupt compressed file (or a read error) as a DataError naming the file."""
    try:
        yield
    except (EOFError, zlib.error, OSError) as e:
        at = where()
        what = "truncated" if isinstance(e, EOFError) else "damaged or unreadable"
        raise DataError(
            f"the file is {what}{f' ({at})' if at else ''}: {type(e).__name__}: {str(e)[:200]}.",
            file=label,
            fix="Download or copy the file again; nothing was trained.",
        ) from None


def _open_binary(path: Path) -> BinaryIO:
    if path.suffix.lower() == ".gz":
        return gzip.open(path, "rb")  # type: ignore[return-value]
    return open(path, "rb")  # noqa: SIM115 - the caller closes it


def _raw_position(fh: Any) -> int:
    raw = getattr(fh, "fileobj", None)  # gzip: position in the compressed file
    return (raw or fh).tell()


def _check_utf16(label: str, first: bytes) -> None:
    for bom, name in _BOMS.items():
        if first.startswith(bom):
            raise DataError(
                f"the file is encoded as {name}, not UTF-8.",
                hint="Save it as UTF-8 (in most editors: Save As, encoding UTF-8) and try again.",
                file=label,
            )


def _decode(line: bytes | None) -> tuple[str | None, str | None]:
    if line is None:
        size = f"{MAX_ROW_BYTES >> 20} MiB" if MAX_ROW_BYTES >= 1 << 20 else f"{MAX_ROW_BYTES:,} bytes"
        return None, f"longer than {size} on one line"
    try:
        return line.decode("utf-8"), None
    except UnicodeDecodeError as e:
        bad = line[e.start : e.start + 1].hex()
        return None, f"not UTF-8 text (byte 0x{bad} at column {e.start + 1}); save the file as UTF-8"


def _binary_lines(src: Source) -> Iterator[tuple[int, bytes | None]]:
    """(line number, line without its ending) for every line; BOM removed, progress tracked.

    A line longer than :data:`MAX_ROW_BYTES` comes as None (the caller skips it as a row).
    """
    assert src.path is not None
    n = 0
    with _damage_is_data_error(src.label, lambda: f"at line {n + 1}"), _open_binary(src.path) as fh:
        src._pos = lambda: _raw_position(fh) / max(src.size_bytes or 1, 1) if not fh.closed else 1.0
        while True:
            line = fh.readline(MAX_ROW_BYTES + 1)
            if not line:
                return
            n += 1
            if len(line) > MAX_ROW_BYTES:  # skip the rest of the line without holding it
                while line and not line.endswith(b"\n"):
                    line = fh.readline(1 << 20)
                yield n, None
                continue
            if n == 1:
                _check_utf16(src.label, line)
                line = line.removeprefix(b"\xef\xbb\xbf")
            yield n, line.rstrip(b"\r\n")


# -- readers --------------------------------------------------------------------------------


def _jsonl_rows(src: Source) -> Iterator[Row]:
    for n, raw in _binary_lines(src):
        if raw is not None and not raw.strip():
            continue
        where = f"line {n}"
        text, problem = _decode(raw)
        if text is None:
            yield Row(where, problem=problem)
            continue
        try:
            obj = json.loads(text)
        except json.JSONDecodeError as e:
            raise DataError(
                f"not valid JSON ({e.msg} at column {e.colno}). Nothing was written.",
                hint="Each line of a JSONL file must hold one complete JSON object; fix or delete that line.",
                file=src.label,
                line=n,
            ) from None
        except RecursionError:
            raise DataError("JSON nested too deeply to read.", file=src.label, line=n) from None
        if isinstance(obj, dict):
            yield Row(where, data=obj)
        else:
            yield Row(where, problem=f"a JSON {type(obj).__name__}, not an object with named fields")


def _json_rows(src: Source) -> Iterator[Row]:
    """A JSON array (items are read one by one, each with its line) or an object holding one."""
    assert src.path is not None
    with _damage_is_data_error(src.label), _open_binary(src.path) as fh:
        data = fh.read()
    _check_utf16(src.label, data)
    data = data.removeprefix(b"\xef\xbb\xbf")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        raise DataError(
            f"not UTF-8 text (byte 0x{data[e.start : e.start + 1].hex()}).",
            hint="Save the file as UTF-8 and try again.",
            file=src.label,
            line=line,
        ) from None
    del data
    stripped = text.lstrip()
    if not stripped:
        raise DataError(f"the file holds only whitespace. Accepted inputs: {ACCEPTED_FILES}.", file=src.label)
    decoder = json.JSONDecoder()
    if stripped[0] == "{":
        # Either one object holding a list of rows, or JSON Lines saved with a .json name.
        first = text.lstrip().split("\n", 1)
        try:
            obj = json.loads(text)
        except json.JSONDecodeError as e:
            if e.msg == "Extra data" and len(first) > 1:
                src.kind = "jsonl"
                yield from _jsonl_rows(src)
                return
            raise DataError(f"not valid JSON ({e.msg} at column {e.colno}).", file=src.label, line=e.lineno) from None
        except RecursionError:
            raise DataError("JSON nested too deeply to read.", file=src.label) from None
        yield from _rows_in_object(src, obj)
        return
    if stripped[0] != "[":
        raise DataError(
            f"expected a JSON array of rows or an object holding one, found {stripped[:20]!r}.", file=src.label, line=1
        )
    pos = text.index("[") + 1
    line = text.count("\n", 0, pos) + 1
    item = 0
    src._pos = lambda: pos / max(len(text), 1)
    while True:
        start = pos
        while pos < len(text) and text[pos] in " \t\r\n,":
            pos += 1
        line += text.count("\n", start, pos)
        if pos >= len(text):
            raise DataError("the JSON array is not closed with ']'.", file=src.label, line=line)
        if text[pos] == "]":
            break
        item += 1
        try:
            obj, end = decoder.raw_decode(text, pos)
        except json.JSONDecodeError as e:
            raise DataError(f"not valid JSON ({e.msg} at column {e.colno}).", file=src.label, line=e.lineno) from None
        except RecursionError:
            raise DataError("JSON nested too deeply to read.", file=src.label, line=line) from None
        where = f"line {line}"
        if isinstance(obj, dict):
            yield Row(where, data=obj)
        else:
            yield Row(where, problem=f"array item {item} is a JSON {type(obj).__name__}, not an object")
        line += text.count("\n", pos, end)
        pos = end
    if text[pos + 1 :].strip():
        raise DataError("unexpected text after the closing ']'.", file=src.label, line=line)


def _rows_in_object(src: Source, obj: dict[str, Any]) -> Iterator[Row]:
    lists = {k: v for k, v in obj.items() if isinstance(v, list) and v and all(isinstance(x, dict) for x in v)}
    if not lists:
        # A single row saved as a whole file.
        yield Row("line 1", data=obj)
        return
    if len(lists) > 1:
        keys = ", ".join(repr(k) for k in lists)
        raise DataError(
            f"the JSON object holds several lists of rows ({keys}); cannot tell which to train on.",
            hint="Save the rows you want as a JSON array or as JSONL.",
            file=src.label,
        )
    key, items = next(iter(lists.items()))
    for i, item in enumerate(items, 1):
        yield Row(f"item {i} of {key!r}", data=item)


def _csv_rows(src: Source) -> Iterator[Row]:
    assert src.path is not None
    csv.field_size_limit(min(sys.maxsize, 2**31 - 1))  # the default (128 KiB) rejects long answers
    with _damage_is_data_error(src.label), _open_binary(src.path) as raw:
        head = raw.read(4)
        _check_utf16(src.label, head)
    with _damage_is_data_error(src.label), _open_binary(src.path) as raw:
        fh = io.TextIOWrapper(raw, encoding="utf-8-sig", errors="surrogateescape", newline="")
        src._pos = lambda: _raw_position(raw) / max(src.size_bytes or 1, 1) if not raw.closed else 1.0
        if src.kind == "tsv":
            delimiter = "\t"
        else:
            first = fh.readline()
            delimiter = ";" if first.count(";") > first.count(",") else ","
            fh.seek(0)
        reader = csv.reader(fh, delimiter=delimiter)
        try:
            header = next(reader, None)
            if header is None:
                raise DataError(f"the file has no header row. Accepted inputs: {ACCEPTED_FILES}.", file=src.label)
            header = [h.strip() for h in header]
            if any(_has_surrogates(h) for h in header):
                raise DataError("the header is not UTF-8 text; save the file as UTF-8.", file=src.label, line=1)
            line = reader.line_num + 1
            for fields in reader:
                where, line = f"line {line}", reader.line_num + 1
                if not fields or all(not f.strip() for f in fields):
                    continue
                if len(fields) != len(header):
                    yield Row(where, problem=f"{len(fields)} fields where the header has {len(header)}")
                elif any(_has_surrogates(f) for f in fields):
                    yield Row(where, problem="not UTF-8 text; save the file as UTF-8")
                else:
                    yield Row(where, data=dict(zip(header, fields, strict=True)))
        except csv.Error as e:
            raise DataError(f"not valid CSV ({e}).", file=src.label, line=reader.line_num) from None


def _has_surrogates(s: str) -> bool:
    try:
        s.encode("utf-8")
        return False
    except UnicodeEncodeError:
        return True


def _parquet_rows(src: Source) -> Iterator[Row]:
    # lazy: pyarrow is slow to import and only parquet files need it; qlora_engine.data is imported at the CLI's start-up
    import pyarrow as pa
    import pyarrow.parquet as pq  # lazy: with pyarrow, above

    assert src.path is not None
    try:
        pf = pq.ParquetFile(src.path)
    except Exception as e:
        raise DataError(f"not a readable Parquet file ({e}).", file=src.label) from None
    total = max(pf.metadata.num_rows, 1)
    done = 0
    src._pos = lambda: done / total
    batches = pf.iter_batches(batch_size=1024)
    while True:
        try:
            batch = next(batches, None)
            rows = batch.to_pylist() if batch is not None else None
        except (pa.ArrowException, OSError, ValueError) as e:  # a damaged page or column chunk
            raise DataError(
                f"the Parquet file is damaged after row {done:,} ({type(e).__name__}: {str(e)[:200]}).",
                file=src.label,
                fix="Write or copy the file again; nothing was trained.",
            ) from None
        if rows is None:
            return
        for obj in rows:
            done += 1
            yield Row(f"row {done}", data=obj)


def _text_rows(src: Source) -> Iterator[Row]:
    """Samples separated by blank lines if the file has any, else one sample per line."""
    assert src.path is not None
    with _damage_is_data_error(src.label), _open_binary(src.path) as fh:
        head = fh.read(1 << 20)
    by_block = b"\n\n" in head.replace(b"\r\n", b"\n").strip()
    src.note = "samples are blocks separated by blank lines" if by_block else "one sample per line"
    block: list[str] = []
    first = 0
    for n, raw in _binary_lines(src):
        text, problem = _decode(raw)
        if text is None:
            yield Row(f"line {n}", problem=problem)
            continue
        if not by_block:
            if text.strip():
                yield Row(f"line {n}", data={"text": text})
            continue
        if text.strip():
            if not block:
                first = n
            block.append(text)
        elif block:
            yield Row(f"lines {first}-{n - 1}", data={"text": "\n".join(block)})
            block = []
    if block:
        yield Row(f"lines {first}-{first + len(block) - 1}", data={"text": "\n".join(block)})


def _dataset_rows(src: Source) -> Iterator[Row]:
    ds = src.dataset
    total = max(len(ds), 1)
    done = 0
    src._pos = lambda: done / total
    for obj in ds:
        done += 1
        yield Row(f"row {done}", data=obj)


# -- datasets: saved folders and hub ids ------------------------------------------------------


def _open_saved(path: Path, split: str, label: str | None = None) -> Source:
    label = label or str(path)
    if not ((path / "dataset_info.json").exists() or (path / "dataset_dict.json").exists()):
        raise DataError(
            "a folder, but not one written by datasets.save_to_disk (no dataset_info.json).",
            hint=f"Point data.path at a data file inside it. Accepted inputs: {ACCEPTED_FILES}.",
            file=label,
        )
    import datasets  # lazy: `datasets` costs seconds to import; only hub datasets need it

    try:
        ds = datasets.load_from_disk(str(path))
    except Exception as e:
        raise DataError(f"could not read the saved dataset ({type(e).__name__}: {e}).", file=label) from None
    ds = _pick_split(ds, split, label)
    return Source(label=label, kind="saved", path=path, dataset=ds)


def _open_hub(spec: str, subset: str | None, split: str) -> Source:
    import datasets  # lazy: `datasets` costs seconds to import; only hub datasets need it

    offline = any(
        os.environ.get(v, "").lower() in ("1", "true", "yes") for v in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")
    )
    try:
        ds = datasets.load_dataset(spec, subset, split=split)
    except Exception as e:
        why = "this machine is offline (HF_HUB_OFFLINE is set)" if offline else f"{type(e).__name__}: {str(e)[:300]}"
        raise DataError(
            f"{spec!r} is not a local file or folder, and loading it as a hub dataset failed: {why}.",
            hint="Check the path, or download the dataset on a connected machine (datasets.save_to_disk) "
            f"and point data.path at that folder. Accepted inputs: {ACCEPTED_FILES}.",
        ) from None
    label = spec + (f" ({subset})" if subset else "") + f" [{split}]"
    return Source(label=label, kind="hub", dataset=ds)


def _pick_split(ds: Any, split: str, label: str) -> Any:
    import datasets  # lazy: `datasets` costs seconds to import; only hub datasets need it

    if isinstance(ds, datasets.DatasetDict):
        if split not in ds:
            raise DataError(f"no split {split!r}; splits: {', '.join(ds)}.", hint="Set data.split.", file=label)
        return ds[split]
    return ds
