"""Which files hold training data, by name: the one table both the readers (``sources``) and the
archive picker (``archives``) use, so neither has to import the other."""

from __future__ import annotations

from pathlib import Path

FILE_KINDS = {
    ".jsonl": "jsonl",
    ".ndjson": "jsonl",
    ".json": "json",
    ".csv": "csv",
    ".tsv": "tsv",
    ".parquet": "parquet",
    ".pq": "parquet",
    ".txt": "text",
    ".text": "text",
    ".md": "text",
}
ACCEPTED_FILES = (
    "JSONL, JSON, CSV, TSV, Parquet, plain text (.txt), one of those in a .zip or tar archive, "
    "a datasets.save_to_disk folder or a hub dataset id"
)


def kind_by_name(name: str) -> str | None:
    """The kind of data a file name says (``train.jsonl.gz``: jsonl), or None."""
    suffixes = [s.lower() for s in Path(name).suffixes]
    if suffixes and suffixes[-1] == ".gz":
        suffixes = suffixes[:-1]
    return FILE_KINDS.get(suffixes[-1]) if suffixes else None
