"""From a run config to training samples: read, detect, normalize, tokenize, split, pack, cache.

:func:`prepare_data` is what the trainer calls. It reports what it did (format and evidence,
rows skipped and why, truncation, token statistics) in ``PreparedData.report`` and as
events, and it refuses data where too many rows are broken rather than train on the rest
without a word.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from itertools import chain
from typing import Any

import numpy as np

from qlora_engine.config import TrainConfig
from qlora_engine.data import cache
from qlora_engine.data.encode import Encoded, Encoder, resolve_template, tokenizer_fingerprint
from qlora_engine.data.formats import (
    ACCEPTED_FORMATS,
    DETECT_ROWS,
    BadRow,
    ChatSample,
    PromptCompletion,
    Sample,
    TextSample,
    check_columns,
    detect_format,
    map_columns,
    normalize,
)
from qlora_engine.data.report import DataReport, OverlongCounts, SetReport
from qlora_engine.data.sources import Source, open_source
from qlora_engine.data.store import SampleBuilder, SampleSet, pack, split_indices, token_stats
from qlora_engine.errors import DataError
from qlora_engine.events import EventSink, LogLine, NullSink, PhaseChanged

DATA_FORMAT_VERSION = 2  # bump when the tokens produced for the same input change (the cache's key)
IDENTITY_VERSION = 1
"""The version inside the fingerprint a checkpoint records for its data: it stays at 1, so that a run
started before a change of tokenization still resumes (and trains more) on the same file, while the
cache, keyed with :data:`DATA_FORMAT_VERSION`, is rebuilt. Version 2 joined content parts as written
(they were joined with newlines) and added loss weights."""
SHOW_WHERE = 5  # places listed per skip reason
CHUNK = 512  # samples per tokenizer call
CHUNK_CHARS = 8 << 20  # ...or fewer, so one call never holds more than this much text
_SURROGATE = re.compile("[\ud800-\udfff]")
_EMPTY_WHY = {
    "jsonl": "only blank lines",
    "json": "an empty array",
    "text": "only blank lines",
    "csv": "only a header",
    "tsv": "only a header",
    "parquet": "the table has no rows",
}
PROGRESS_EVERY_S = 2.0  # progress events: often enough to look alive, rare enough not to flood the log


@dataclass
class PreparedData:
    """Tokenized samples ready for batching.

    ``train`` and ``validation`` are sequences of samples; each sample is a dict with
    ``input_ids`` and ``labels`` (lists of ints, labels ``IGNORE_INDEX`` where no loss is taken) and, for
    packed samples, ``position_ids`` that restart at 0 for every sample packed into the
    sequence. ``fingerprint`` changes whenever the data, the tokenizer or a data setting does.
    """

    train: SampleSet
    validation: SampleSet | None
    report: DataReport | None = None
    fingerprint: str = ""

    def report_dict(self) -> dict[str, Any]:
        """The report as plain JSON data (what events and the cache carry); {} when there is none."""
        if isinstance(self.report, DataReport):
            return self.report.to_dict()
        return dict(self.report or {})  # samples a caller made itself (benchmarks) may carry a dict

    @property
    def token_stats(self) -> dict[str, Any] | None:
        """The token-length statistics that size the VRAM estimate, if the data was measured."""
        return self.report_dict().get("token_stats")


class RowReader:
    """Rows of one source as normalized samples, counting what is skipped and why."""

    def __init__(self, src: Source, cfg: TrainConfig) -> None:
        self.src = src
        self.dc = cfg.data
        check_columns(self.dc.columns)
        self.rows_read = 0
        self.skipped: dict[str, dict[str, Any]] = {}
        self._rows = src.rows()
        self._head: list[Any] = []
        self.format, self.evidence = self._detect()

    def _detect(self) -> tuple[str, dict[str, Any]]:
        for row in self._rows:
            self._head.append(row)
            if sum(r.data is not None for r in self._head) >= DETECT_ROWS:
                break
        if not self._head:
            raise DataError(
                f"no rows found ({_EMPTY_WHY.get(self.src.kind, 'the data set is empty')}). "
                f"Accepted formats: {ACCEPTED_FORMATS}.",
                file=self.src.label,
            )
        data = [map_columns(r.data, self.dc.columns) for r in self._head if r.data is not None]
        if not data:
            for r in self._head:
                self.skip(r.where, r.problem or "unreadable")
            raise DataError(
                f"none of the first {len(self._head)} rows can be read: {self.skipped_summary()}.",
                hint=f"Accepted formats: {ACCEPTED_FORMATS}.",
                file=self.src.label,
            )
        missing = [
            f"{theirs!r} (data.columns.{ours})"
            for ours, theirs in self.dc.columns.items()
            if ours not in ("role", "content", "from", "value")
            and not any(theirs in r.data for r in self._head if r.data is not None)
        ]
        if missing:
            seen = sorted({k for r in self._head if r.data is not None for k in r.data})
            raise DataError(
                f"column {missing[0]} not found; the rows have {seen}.", file=self.src.label, field="data.columns"
            )
        if self.dc.format != "auto":
            return self.dc.format, {"given": "data.format", "rows_examined": len(data)}
        return detect_format(data, self.src.label)

    def skip(self, where: str, reason: str) -> None:
        entry = self.skipped.setdefault(reason, {"count": 0, "where": []})
        entry["count"] += 1
        if len(entry["where"]) < SHOW_WHERE:
            entry["where"].append(where)

    @property
    def skipped_total(self) -> int:
        return sum(e["count"] for e in self.skipped.values())

    def samples(self, limit: int | None = None) -> Iterator[tuple[str, Sample]]:
        """Usable samples with their place; reads at most ``limit`` rows (None: all)."""
        for row in chain(self._head, self._rows):
            if limit is not None and self.rows_read >= limit:
                return
            self.rows_read += 1
            if row.data is None:
                self.skip(row.where, row.problem or "unreadable")
                continue
            try:
                yield row.where, normalize(map_columns(row.data, self.dc.columns), self.format, self.dc.train_on_prompt)
            except BadRow as e:
                self.skip(row.where, str(e))

    def skipped_summary(self, limit: int = 4) -> str:
        items = sorted(self.skipped.items(), key=lambda kv: -kv[1]["count"])[:limit]
        return "; ".join(
            f"{e['count']} {reason} ({', '.join(e['where'])}{', ...' if e['count'] > len(e['where']) else ''})"
            for reason, e in items
        )

    def check(self, max_bad_fraction: float) -> None:
        """No usable rows, or too many broken ones: stop with what was found."""
        if self.rows_read == 0:
            raise DataError(f"no rows found. Accepted formats: {ACCEPTED_FORMATS}.", file=self.src.label)
        bad = self.skipped_total
        if bad == self.rows_read:
            raise DataError(
                f"no usable rows as {self.format} data; all {bad} rows were skipped: "
                f"{self.skipped_summary()}. Accepted formats: {ACCEPTED_FORMATS}.",
                hint="Fix the rows, or set data.format / data.columns if the format was guessed wrong.",
                file=self.src.label,
            )
        if bad / self.rows_read > max_bad_fraction:
            raise DataError(
                f"{bad} of {self.rows_read} rows ({bad / self.rows_read:.0%}) are unusable, more than "
                f"data.max_bad_fraction ({max_bad_fraction:.0%}): {self.skipped_summary()}.",
                hint="Fix those rows, check data.format and data.columns, or raise data.max_bad_fraction.",
                file=self.src.label,
            )


@dataclass
class Tokenized:
    samples: SampleSet
    lengths: np.ndarray  # full length of every usable sample, before truncation
    truncated: int = 0
    dropped_overlong: int = 0
    no_answer_left: int = 0
    cut: int = 0
    first: list[tuple[str, Encoded]] = field(default_factory=list)


def _texts(sample: Sample) -> list[str]:
    if isinstance(sample, TextSample):
        return [sample.text]
    if isinstance(sample, PromptCompletion):
        return [sample.prompt, sample.completion]
    return [str(m.get("content", "")) for m in sample.messages]


def cut_sample(sample: Sample, limit: int) -> tuple[Sample, bool]:
    """Every text of ``sample`` cut to ``limit`` characters; whether anything was cut.

    With ``limit`` at least (max_length + 1) x the longest token's characters, a cut text alone
    is longer than max_length tokens, so the first max_length tokens (all a sample keeps) are
    the same as without the cut: memory is bounded by max_length, not by the longest line.
    """
    if all(len(t) <= limit for t in _texts(sample)):
        return sample, False
    if isinstance(sample, TextSample):
        return TextSample(sample.text[:limit]), True
    if isinstance(sample, PromptCompletion):
        return PromptCompletion(sample.prompt[:limit], sample.completion[:limit]), True
    messages = [{**m, "content": str(m.get("content", ""))[:limit]} for m in sample.messages]
    weights = sample.weights and [
        w if w is None else dataclasses.replace(w, parts=tuple((min(end, limit), x) for end, x in w.parts))
        for w in sample.weights
    ]
    return ChatSample(messages, sample.train, weights), True


def _surrogate_problem(sample: Sample) -> str | None:
    """A lone UTF-16 surrogate (JSON's "\\ud800") is not text: no tokenizer can encode it."""
    for t in _texts(sample):
        m = _SURROGATE.search(t)
        if m:
            return f"holds a lone surrogate (\\u{ord(m.group()):04x}), which is not text"
    return None


def tokenize_rows(
    reader: RowReader,
    encoder: Encoder,
    cfg: TrainConfig,
    sink: EventSink,
    *,
    limit: int | None = None,
    keep_first: int = 0,
    progress_label: str = "tokenizing",
) -> Tokenized:
    """Encode every sample, apply the max_length policy, report progress every few seconds."""
    dc = cfg.data
    builder = SampleBuilder()
    lengths: list[int] = []
    out = Tokenized(samples=None, lengths=None)  # type: ignore[arg-type]
    last_report = time.monotonic()
    name = reader.src.label

    def flush(batch: list[tuple[str, Sample]]) -> None:
        for (where, _), enc in zip(batch, encoder.encode_many([s for _, s in batch]), strict=True):
            if isinstance(enc, BadRow):
                reader.skip(where, str(enc))
                continue
            # The first token's label is never used (nothing predicts it), so it does not count.
            if not any(enc.trained[1:]):
                reader.skip(where, "nothing to train on (no answer tokens)")
                continue
            if len(out.first) < keep_first:
                out.first.append((where, enc))
            n = len(enc.input_ids)
            lengths.append(n)
            ids, trained, weights = enc.input_ids, enc.trained, enc.weights
            if n > dc.max_length:
                if dc.overlong == "drop":
                    out.dropped_overlong += 1
                    continue
                ids, trained = ids[: dc.max_length], trained[: dc.max_length]
                weights = weights[: dc.max_length] if weights is not None else None
                if not any(trained[1:]):
                    out.no_answer_left += 1
                    continue
                out.truncated += 1
            builder.add(ids, trained, weights)

    char_limit = (dc.max_length + 1) * encoder.max_token_chars
    batch: list[tuple[str, Sample]] = []
    batch_chars = 0
    for where, sample in reader.samples(limit):
        problem = _surrogate_problem(sample)
        if problem is not None:
            reader.skip(where, problem)
            continue
        sample, was_cut = cut_sample(sample, char_limit)
        out.cut += was_cut
        batch.append((where, sample))
        batch_chars += sum(len(t) for t in _texts(sample))
        if len(batch) >= CHUNK or batch_chars >= CHUNK_CHARS:
            flush(batch)
            batch, batch_chars = [], 0
            if time.monotonic() - last_report >= PROGRESS_EVERY_S:
                last_report = time.monotonic()
                frac = reader.src.fraction_done()
                pct = f"{frac:.0%}, " if frac is not None else ""
                sink.emit(
                    PhaseChanged(
                        phase="preparing_data", detail=f"{progress_label} {name}: {pct}{reader.rows_read:,} rows"
                    )
                )
    if batch:
        flush(batch)
    out.samples = builder.build()
    out.lengths = np.asarray(lengths, dtype=np.int64)
    return out


def data_fingerprints(cfg: TrainConfig, src: Source, val_src: Source | None, tok_fp: str) -> tuple[str, str]:
    """(the data's fingerprint, its cache key): the same data, tokenizer and settings, the first with
    :data:`IDENTITY_VERSION`, the second with :data:`DATA_FORMAT_VERSION`."""
    dc = cfg.data
    settings = {
        "format": dc.format,
        "columns": dict(sorted(dc.columns.items())),
        "subset": dc.subset,
        "split": dc.split,
        "max_length": dc.max_length,
        "overlong": dc.overlong,
        "train_on_prompt": dc.train_on_prompt,
        "packing": dc.packing,
        "validation_split": dc.validation_split if val_src is None else None,
        "seed": cfg.train.seed if (val_src is None and dc.validation_split > 0) else None,
    }
    blob = {
        "data": src.content_hash(),
        "validation": val_src.content_hash() if val_src is not None else None,
        "settings": settings,
        "tokenizer": tok_fp,
    }

    def digest(version: int) -> str:
        return hashlib.sha256(json.dumps({**blob, "version": version}, sort_keys=True).encode()).hexdigest()[:24]

    return digest(IDENTITY_VERSION), digest(DATA_FORMAT_VERSION)


def open_configured(cfg: TrainConfig, spec: str) -> Source:
    """A source named in the config (paths relative to the config file's folder)."""
    return open_source(spec, cfg.resolve(spec), subset=cfg.data.subset, split=cfg.data.split)


def _set_report(s: SampleSet, n_samples: int, max_length: int) -> SetReport:
    fill = round(s.num_tokens / (len(s) * max_length), 3) if s.packed and len(s) else None
    return SetReport(n_samples, len(s), s.num_tokens, s.num_trained, fill)


def prepare_data(cfg: TrainConfig, tokenizer: Any, sink: EventSink | None = None) -> PreparedData:
    """Read, check, tokenize, split and pack the run's data (or take it from the cache)."""
    sink = sink or NullSink()
    dc = cfg.data
    sink.emit(PhaseChanged(phase="preparing_data", detail=f"reading {dc.path}"))
    src = open_configured(cfg, dc.path)
    val_src = open_configured(cfg, dc.validation_path) if dc.validation_path else None
    template, template_source = resolve_template(tokenizer, dc.chat_template)
    fingerprint, cache_key = data_fingerprints(cfg, src, val_src, tokenizer_fingerprint(tokenizer, template))

    if dc.cache:
        hit = cache.load(cache_key)
        if hit is not None:
            train, validation, report = hit
            report = dataclasses.replace(report, cache="hit")
            sink.emit(
                LogLine(
                    level="info", message=f"{src.label}: tokenized data taken from the cache ({len(train):,} sequences)"
                )
            )
            return PreparedData(train, validation, report, fingerprint)

    if tokenizer.eos_token_id is None:
        sink.emit(
            LogLine(
                level="warning",
                message="the tokenizer has no EOS token: samples cannot end with one, "
                "so the tuned model may not learn to stop",
            )
        )
    encoder = Encoder(tokenizer, template, train_on_prompt=dc.train_on_prompt)
    reader = RowReader(src, cfg)
    main = tokenize_rows(reader, encoder, cfg, sink)
    if encoder.rendered_chats and template_source.startswith("chatml (default"):
        sink.emit(
            LogLine(
                level="warning",
                message="the tokenizer has no chat template; using ChatML. Set "
                "data.chat_template to the template your model expects if it is not ChatML.",
            )
        )
    reader.check(dc.max_bad_fraction)
    readers = [reader]
    if val_src is not None:
        val_reader = RowReader(val_src, cfg)
        val = tokenize_rows(val_reader, encoder, cfg, sink)
        val_reader.check(dc.max_bad_fraction)
        readers.append(val_reader)
        train_set, val_set = main.samples, val.samples
        lengths = np.concatenate([main.lengths, val.lengths])
    else:
        val = None
        tr_idx, va_idx = split_indices(len(main.samples), dc.validation_split, cfg.train.seed)
        train_set = main.samples if len(va_idx) == 0 else main.samples.select(tr_idx)
        val_set = main.samples.select(va_idx) if len(va_idx) else None
        lengths = main.lengths
    if len(train_set) == 0:
        raise DataError(
            f"no training samples left: {main.dropped_overlong} longer than data.max_length "
            f"({dc.max_length}) were dropped, {main.no_answer_left} had no answer left after truncation.",
            hint="Raise data.max_length or set data.overlong=truncate.",
            file=src.label,
        )
    n_train, n_val = len(train_set), len(val_set) if val_set is not None else 0
    if dc.packing:
        sink.emit(PhaseChanged(phase="preparing_data", detail=f"packing {n_train:,} samples"))
        train_set = pack(train_set, dc.max_length)
        val_set = pack(val_set, dc.max_length) if val_set is not None and len(val_set) else val_set

    parts = [main] + ([val] if val is not None else [])
    report = DataReport(
        source=src.label,
        source_kind=src.kind,
        validation_source=val_src.label if val_src is not None else None,
        format=reader.format,
        evidence=reader.evidence,
        template=template_source if encoder.rendered_chats else None,
        train_on_prompt=dc.train_on_prompt,
        rows=sum(r.rows_read for r in readers),
        skipped=_merge_skipped(readers),
        skipped_total=sum(r.skipped_total for r in readers),
        overlong=OverlongCounts(
            policy=dc.overlong,
            max_length=dc.max_length,
            truncated=sum(p.truncated for p in parts),
            dropped=sum(p.dropped_overlong for p in parts),
            no_answer_left=sum(p.no_answer_left for p in parts),
            cut_before_tokenizing=sum(p.cut for p in parts),
        ),
        token_stats={
            **token_stats(lengths, dc.max_length),
            "longest_sequence": int(max(train_set.lengths.max(initial=0), 0)),
        },
        train=_set_report(train_set, n_train, dc.max_length),
        validation=_set_report(val_set, n_val, dc.max_length) if val_set is not None else None,
        packing=dc.packing,
        fingerprint=fingerprint,
        note=src.note or None,
    )
    if dc.cache:
        report.cache = "written" if cache.save(cache_key, train_set, val_set, report.to_dict()) else "not written"
    _emit_summary(sink, report)
    return PreparedData(train_set, val_set, report, fingerprint)


def _merge_skipped(readers: list[RowReader]) -> dict[str, Any]:
    if len(readers) == 1:
        return readers[0].skipped
    out: dict[str, Any] = {}
    for r in readers:
        for reason, e in r.skipped.items():
            out[f"{r.src.label}: {reason}"] = e
    return out


def _emit_summary(sink: EventSink, data_report: DataReport) -> None:
    report = data_report.to_dict()
    tr, ov, st = report["train"], report["overlong"], report["token_stats"]
    val = report["validation"]
    sink.emit(
        LogLine(
            level="info",
            message=(
                f"{report['source']}: {report['format']} data ({report['evidence'].get('reason', 'format given')}); "
                f"{report['rows']:,} rows, {tr['samples']:,} training samples"
                + (f", {val['samples']:,} validation samples" if val else "")
                + f"; tokens per sample min {st['min']}, median {st['median']}, p95 {st['p95']}, max {st['max']}"
            ),
        )
    )
    if report["skipped_total"]:
        worst = sorted(report["skipped"].items(), key=lambda kv: -kv[1]["count"])[:3]
        detail = "; ".join(f"{e['count']} {r} ({', '.join(e['where'])})" for r, e in worst)
        sink.emit(LogLine(level="warning", message=f"skipped {report['skipped_total']:,} rows: {detail}"))
    if ov["truncated"] or ov["dropped"] or ov["no_answer_left"]:
        sink.emit(
            LogLine(
                level="warning",
                message=(
                    f"{ov['truncated']:,} samples longer than {ov['max_length']} tokens were truncated, {ov['dropped']:,} dropped"
                    + (
                        f", {ov['no_answer_left']:,} dropped because no answer was left after truncation"
                        if ov["no_answer_left"]
                        else ""
                    )
                ),
            )
        )
    if report["packing"]:
        sink.emit(
            LogLine(
                level="info",
                message=f"packed into {tr['sequences']:,} sequences ({tr.get('packing_fill', 0):.0%} full)",
            )
        )


__all__ = ["PreparedData", "RowReader", "open_configured", "prepare_data", "tokenize_rows"]
