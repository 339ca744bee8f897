"""Training data: files in, token samples out.

Minimal first version: JSONL rows of ``{"text": ...}``. The data issue replaces the
inside of :func:`prepare_data`; the interface (``PreparedData``, ``collate``) stays.
"""

from __future__ import annotations

import hashlib
import json
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from qlora_engine.config import TrainConfig
from qlora_engine.errors import DataError
from qlora_engine.events import EventSink, LogLine, NullSink

IGNORE_INDEX = -100


@dataclass
class PreparedData:
    """Tokenized samples ready for batching.

    Each sample is a dict with ``input_ids`` and ``labels`` (lists of ints, labels -100 where
    no loss is taken) and, for packed samples, ``position_ids`` that restart at 0 for every
    sample packed into the sequence.
    """

    train: list[dict[str, list[int]]]
    validation: list[dict[str, list[int]]] | None
    report: dict[str, Any] = field(default_factory=dict)
    fingerprint: str = ""


def _read_text_jsonl(path: Path) -> list[str]:
    rows = []
    with open(path, encoding="utf-8-sig") as fh:
        for n, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}, line {n}: not valid JSON ({e.msg}).") from None
            text = obj.get("text") if isinstance(obj, dict) else None
            if isinstance(text, str) and text.strip():
                rows.append(text)
    if not rows:
        raise DataError(f"{path}: no rows with a non-empty 'text' field.")
    return rows


def _tokenize(text: str, tokenizer: Any, max_length: int) -> dict[str, list[int]]:
    ids = tokenizer(text, add_special_tokens=True)["input_ids"]
    if tokenizer.eos_token_id is not None and (not ids or ids[-1] != tokenizer.eos_token_id):
        ids = ids + [tokenizer.eos_token_id]
    ids = ids[:max_length]
    return {"input_ids": ids, "labels": list(ids)}


def file_fingerprint(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()[:16]


def prepare_data(cfg: TrainConfig, tokenizer: Any, sink: EventSink | None = None) -> PreparedData:
    sink = sink or NullSink()
    path = cfg.resolve(cfg.data.path)
    if not path.exists():
        raise DataError(f"{path}: data file not found.")
    texts = _read_text_jsonl(path)
    samples = [_tokenize(t, tokenizer, cfg.data.max_length) for t in texts]
    validation = None
    if cfg.data.validation_split > 0 and len(samples) > 1:
        order = list(range(len(samples)))
        random.Random(cfg.train.seed).shuffle(order)
        n_val = max(1, int(len(samples) * cfg.data.validation_split))
        validation = [samples[i] for i in order[:n_val]]
        samples = [samples[i] for i in order[n_val:]]
    sink.emit(LogLine(level="info", message=f"{path.name}: {len(samples)} training samples"))
    return PreparedData(
        train=samples,
        validation=validation,
        report={"format": "text", "rows": len(texts)},
        fingerprint=file_fingerprint(path),
    )


def collate(samples: list[dict[str, list[int]]], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Right-pad a list of samples into tensors; padding never carries a label."""
    width = max(len(s["input_ids"]) for s in samples)
    n = len(samples)
    input_ids = torch.full((n, width), pad_token_id, dtype=torch.long)
    labels = torch.full((n, width), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((n, width), dtype=torch.long)
    packed = "position_ids" in samples[0]
    position_ids = torch.zeros((n, width), dtype=torch.long) if packed else None
    for i, s in enumerate(samples):
        k = len(s["input_ids"])
        input_ids[i, :k] = torch.tensor(s["input_ids"])
        labels[i, :k] = torch.tensor(s["labels"])
        attention_mask[i, :k] = 1
        if position_ids is not None:
            position_ids[i, :k] = torch.tensor(s["position_ids"])
    batch = {"input_ids": input_ids, "labels": labels, "attention_mask": attention_mask}
    if position_ids is not None:
        batch["position_ids"] = position_ids
    return batch
