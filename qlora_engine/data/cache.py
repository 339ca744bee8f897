"""The tokenized-data cache: a second run with the same data, tokenizer and settings skips the work.

An entry is a folder named by the data fingerprint (file content, tokenizer, template and
every setting that changes the tokens) holding ``.npy`` arrays and ``report.json``. It is
written to a temporary folder and renamed, so a crash never leaves half an entry; arrays
are loaded with ``allow_pickle=False`` and memory-mapped, so a hit costs almost nothing.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path
from typing import Any

from qlora_engine.data.report import DataReport
from qlora_engine.data.store import SampleSet

KEEP_ENTRIES = 8  # newest entries kept: a few datasets x settings, without filling the disk


def cache_root() -> Path:
    from qlora_engine.paths import cache_dir  # lazy: platformdirs; data is on the CLI's start-up

    return cache_dir() / "data"


def load(key: str) -> tuple[SampleSet, SampleSet | None, DataReport] | None:
    folder = cache_root() / key
    if not (folder / "report.json").is_file():
        return None
    try:
        report = DataReport.from_dict(json.loads((folder / "report.json").read_text(encoding="utf-8")))
        train = SampleSet.load(folder, "train")
        validation = SampleSet.load(folder, "validation") if (folder / "validation.ids.npy").exists() else None
        os.utime(folder)  # recently used: pruned last
    except (OSError, ValueError, TypeError, KeyError, AttributeError):
        shutil.rmtree(folder, ignore_errors=True)  # a damaged or older entry is rebuilt, never trusted
        return None
    return train, validation, report


def save(key: str, train: SampleSet, validation: SampleSet | None, report: dict[str, Any]) -> Path | None:
    """Write an entry; a cache that cannot be written (full disk, read-only) is not an error."""
    root = cache_root()
    final = root / key
    tmp = root / f".{key}.{os.getpid()}.{time.monotonic_ns()}.tmp"
    try:
        train.save(tmp, "train")
        if validation is not None:
            validation.save(tmp, "validation")
        (tmp / "report.json").write_text(json.dumps(report, default=str), encoding="utf-8")
        if final.exists():
            shutil.rmtree(final, ignore_errors=True)
        tmp.rename(final)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
        return None
    prune(root)
    return final


def prune(root: Path, keep: int = KEEP_ENTRIES) -> None:
    entries = [p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")]
    entries.sort(key=lambda p: p.stat().st_mtime, reverse=True)
    for old in entries[keep:]:
        shutil.rmtree(old, ignore_errors=True)
