"""``inspect-data``: what a data file holds and what training would make of it.

One function, :func:`inspect_data`, serves the CLI, the desktop app's data page and the VRAM
budget: detected format and evidence, rows read and skipped (why, where), and with a
tokenizer the token-length statistics and the first samples rendered as text with the
trained part marked. It writes nothing, except that an archive is extracted once into the cache.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path
from typing import Any

import numpy as np

from qlora_engine.config import TrainConfig, validate
from qlora_engine.data.encode import Encoded, Encoder, resolve_template
from qlora_engine.data.formats import preview
from qlora_engine.data.pipeline import RowReader, open_configured, tokenize_rows
from qlora_engine.data.store import token_stats
from qlora_engine.errors import DataError, ModelError
from qlora_engine.events import EventSink, NullSink
from qlora_engine.padding import packing_hint
from qlora_engine.scrub import print_json

MARK_OPEN, MARK_CLOSE = "[[", "]]"
MAX_LENGTHS_LISTED = 100_000  # per-sample lengths returned for a histogram: plenty for its shape, small as JSON


def _config(path_or_cfg: str | Path | TrainConfig, overrides: dict[str, Any]) -> TrainConfig:
    if isinstance(path_or_cfg, TrainConfig):
        cfg = TrainConfig.from_dict(path_or_cfg.to_dict())
        cfg.base_dir = path_or_cfg.base_dir
    else:
        cfg = TrainConfig()
        cfg.data.path = str(path_or_cfg)
    for k, v in overrides.items():
        if v is not None:
            setattr(cfg.data, k, v)
    validate(cfg)
    return cfg


def load_tokenizer_for(ref: str, *, trust_remote_code: bool = False, revision: str | None = None) -> Any:
    """A tokenizer from a model reference (folder, hub id, .gguf), without loading or converting weights."""
    # lazy: models and model_ref import transformers; qlora_engine.data is imported at the CLI's start-up
    from qlora_engine import model_ref, models

    if model_ref.is_gguf(ref):
        # lazy: transformers costs seconds and qlora_engine.data is imported at the CLI's start-up
        from transformers import AutoTokenizer

        path = Path(ref).expanduser()
        if not path.is_file():
            raise ModelError("GGUF file not found.", file=path)
        # The same tokenizer the GGUF conversion saves next to the converted weights.
        tok = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
        if tok.pad_token_id is None:
            tok.pad_token = tok.unk_token if tok.unk_token is not None else tok.eos_token
        return tok
    folder = model_ref.resolve_model(ref, weights=False, revision=revision)
    return models.load_tokenizer(folder, trust_remote_code=trust_remote_code)


def render_marked(tokenizer: Any, enc: Encoded) -> tuple[str, list[dict[str, Any]]]:
    """The sample as text with trained runs between [[ and ]], and as (text, trained) segments.

    With loss weights, a run ends where its weight changes, each segment says its ``weight`` and a
    run whose weight is not 1 is marked ``[[text]](x0.2)``."""
    weights = enc.weights if enc.weights is not None else [float(t) for t in enc.trained]
    segments: list[dict[str, Any]] = []
    start = 0
    for i in range(1, len(enc.input_ids) + 1):
        if i == len(enc.input_ids) or enc.trained[i] != enc.trained[start] or weights[i] != weights[start]:
            text = tokenizer.decode(enc.input_ids[start:i], skip_special_tokens=False)
            segment = {"text": text, "trained": bool(enc.trained[start]), "tokens": i - start}
            if enc.weights is not None:
                segment["weight"] = weights[start]
            segments.append(segment)
            start = i

    def mark(s: dict[str, Any]) -> str:
        if not s["trained"]:
            return s["text"]
        w = s.get("weight", 1.0)
        return f"{MARK_OPEN}{s['text']}{MARK_CLOSE}" + (f"(x{w:g})" if w != 1 else "")

    return "".join(map(mark, segments)), segments


def inspect_data(
    path_or_cfg: str | Path | TrainConfig,
    tokenizer: Any = None,
    *,
    format: str | None = None,
    columns: dict[str, str] | None = None,
    max_length: int | None = None,
    overlong: str | None = None,
    train_on_prompt: bool | None = None,
    chat_template: str | None = None,
    subset: str | None = None,
    split: str | None = None,
    samples: int = 3,
    max_rows: int | None = None,
    sink: EventSink | None = None,
) -> dict[str, Any]:
    """Describe a dataset as training would see it; raises DataError only when it cannot be read at all.

    Args:
        path_or_cfg: a data file / folder / hub id, or a run config (its data section is used).
        tokenizer: a tokenizer, a model reference to load one from, or None for a format-only look.
        format, columns, max_length, overlong, train_on_prompt, chat_template, subset, split: override the
            data settings (of the config, or of the defaults for a bare path).
        samples: how many of the first samples to render.
        max_rows: read only this many rows (statistics then describe those rows).
        sink: receives progress events.

    Returns:
        A JSON-serializable dict: ``format``, ``evidence``, ``rows``, ``usable_rows``, ``skipped``,
        ``problems``, ``samples`` and, with a tokenizer, ``token_stats`` (with ``longest_sequence``, the
        longest sample after the max_length policy), ``overlong`` and ``lengths`` (the token
        length of each measured sample, at most 100,000 of them; a sample whose text was cut
        before tokenizing, ``overlong.cut_before_tokenizing``, counts only what was tokenized).
    """
    sink = sink or NullSink()
    given = dict(format=format, columns=columns, max_length=max_length, overlong=overlong,
                 train_on_prompt=train_on_prompt, chat_template=chat_template, subset=subset, split=split)  # fmt: skip
    cfg = _config(path_or_cfg, given)
    dc = cfg.data
    if isinstance(tokenizer, (str, Path)):
        tokenizer = load_tokenizer_for(
            str(tokenizer), trust_remote_code=cfg.model.trust_remote_code, revision=cfg.model.revision
        )
    src = open_configured(cfg, dc.path)
    reader = RowReader(src, cfg)
    result: dict[str, Any] = {
        "source": src.label,
        "source_kind": src.kind,
        "format": reader.format,
        "evidence": reader.evidence,
        "settings": {k: v for k, v in dataclasses.asdict(dc).items() if k != "cache"},
    }
    if src.note:
        result["note"] = src.note
    problems: list[str] = []
    if tokenizer is None:
        previews = []
        usable = 0
        for usable, (where, sample) in enumerate(reader.samples(max_rows), 1):  # noqa: B007 - used after the loop
            if len(previews) < samples:
                previews.append({"where": where, **preview(sample)})
        result["samples"] = previews
    else:
        template, template_source = resolve_template(tokenizer, dc.chat_template)
        encoder = Encoder(tokenizer, template, train_on_prompt=dc.train_on_prompt)
        tok = tokenize_rows(reader, encoder, cfg, sink, limit=max_rows, keep_first=samples, progress_label="reading")
        usable = len(tok.lengths)
        result["tokenizer"] = getattr(tokenizer, "name_or_path", type(tokenizer).__name__)
        result["template"] = template_source if encoder.rendered_chats else None
        if result["template"] and result["template"].startswith("chatml (default"):
            problems.append(
                "the tokenizer has no chat template; ChatML is used (set data.chat_template if the model "
                "expects another)"
            )
        result["token_stats"] = token_stats(tok.lengths, dc.max_length)
        result["token_stats"]["trained_total"] = tok.samples.num_trained
        if tok.samples.weights is not None:  # loss weights: their range over the trained tokens
            trained = np.asarray(tok.samples.weights)[np.asarray(tok.samples.trained, dtype=bool)]
            result["loss_weights"] = {
                "min": float(trained.min()) if trained.size else 0.0,
                "max": float(trained.max()) if trained.size else 0.0,
                "tokens_not_1": int((trained != 1).sum()),
            }
        # What a batch will hold after the max_length policy (what the VRAM budget needs).
        result["token_stats"]["longest_sequence"] = int(tok.samples.lengths.max(initial=0))
        result["lengths"] = tok.lengths[:MAX_LENGTHS_LISTED].tolist()  # for a histogram
        if not dc.packing:
            result["packing_hint"] = packing_hint(tok.lengths, cfg.train.micro_batch_size, dc.max_length)
        result["overlong"] = {
            "policy": dc.overlong,
            "max_length": dc.max_length,
            "truncated": tok.truncated,
            "dropped": tok.dropped_overlong,
            "no_answer_left": tok.no_answer_left,
            "cut_before_tokenizing": tok.cut,
        }
        rendered = []
        for where, enc in tok.first:
            marked, segments = render_marked(tokenizer, enc)
            rendered.append(
                {
                    "where": where,
                    "tokens": len(enc.input_ids),
                    "trained_tokens": int(sum(enc.trained)),
                    "ends_with_eos": bool(enc.input_ids) and enc.input_ids[-1] == tokenizer.eos_token_id,
                    "over_max_length": len(enc.input_ids) > dc.max_length,
                    "text": marked,
                    "segments": segments,
                }
            )
        result["samples"] = rendered
        over = result["token_stats"]["over_max_length"]
        if over:
            problems.append(
                f"{over} samples are longer than max_length {dc.max_length} and would be "
                f"{'truncated' if dc.overlong == 'truncate' else 'dropped'}"
            )
    result["rows"] = reader.rows_read
    result["usable_rows"] = usable
    result["skipped"] = reader.skipped
    result["skipped_total"] = reader.skipped_total
    if reader.rows_read and reader.skipped_total / reader.rows_read > dc.max_bad_fraction:
        problems.append(
            f"{reader.skipped_total} of {reader.rows_read} rows are unusable, more than "
            f"data.max_bad_fraction ({dc.max_bad_fraction:.0%}): training would stop"
        )
    if reader.rows_read and usable == 0:
        problems.append("no usable rows")
    if max_rows is not None:
        result["limited_to_rows"] = max_rows
    result["problems"] = problems
    return result


# -- the command ----------------------------------------------------------------------------------


def add_cli(sub: Any) -> None:
    """Register ``qlora-engine inspect-data`` (the CLI calls this for every module that has it)."""
    s = sub.add_parser(
        "inspect-data", help="detect a dataset's format, count rows; with --model, token lengths and samples"
    )
    s.add_argument("path", help="data file, saved datasets folder, hub dataset id, or a run config (.yaml)")
    s.add_argument("--model", help="model folder, .gguf or hub id whose tokenizer to use (a config's model by default)")
    s.add_argument("--format", choices=["auto", "text", "alpaca", "chat", "sharegpt", "prompt_completion"])
    s.add_argument(
        "--column", action="append", default=[], metavar="OURS=THEIRS", help="map a column, e.g. output=answer"
    )
    s.add_argument("--max-length", type=int, help="tokens per sample before truncation (default 1024 or the config's)")
    s.add_argument("--overlong", choices=["truncate", "drop"], help="samples over max-length: truncate or drop")
    s.add_argument("--train-on-prompt", action="store_true", default=None, help="show the loss on prompts too")
    s.add_argument("--chat-template", help="Jinja template, or 'chatml'")
    s.add_argument("--subset", help="hub datasets: configuration name")
    s.add_argument("--split", help="hub datasets and saved folders: split")
    s.add_argument("--samples", type=int, default=3, help="samples to render (default 3)")
    s.add_argument("--max-rows", type=int, help="read only the first N rows")
    s.add_argument("--json", action="store_true", help="print the result as JSON")
    s.set_defaults(func=inspect_data_main)


def inspect_data_main(args: argparse.Namespace) -> int:
    target: str | TrainConfig = args.path
    model = args.model
    if str(args.path).lower().endswith((".yaml", ".yml")) and Path(args.path).is_file():
        target = TrainConfig.load(args.path)
        model = model or target.model.ref or None
    columns = {} if args.column else None
    for item in args.column:
        ours, sep, theirs = item.partition("=")
        if not sep or not ours or not theirs:
            raise DataError(f"--column {item!r}: write OURS=THEIRS, e.g. --column output=answer.")
        columns[ours.strip()] = theirs.strip()
    settings = ("format", "max_length", "overlong", "train_on_prompt", "chat_template", "subset", "split")
    kw = {name: getattr(args, name) for name in (*settings, "samples", "max_rows")}
    result = inspect_data(target, model, columns=columns, **kw)
    if args.json:
        print_json(result)
    else:
        print_human(result, sys.stdout)
    return 0


def print_human(r: dict[str, Any], out: Any) -> None:
    w = out.write
    w(f"{r['source']}  ({r['source_kind']}{', ' + r['note'] if r.get('note') else ''})\n")
    ev = r["evidence"]
    w(f"format: {r['format']}  ({ev.get('reason') or 'given in data.format'})\n")
    w(f"rows: {r['rows']:,}  usable: {r['usable_rows']:,}  skipped: {r['skipped_total']:,}\n")
    for reason, e in sorted(r["skipped"].items(), key=lambda kv: -kv[1]["count"]):
        more = ", ..." if e["count"] > len(e["where"]) else ""
        w(f"  {e['count']:>6,}  {reason}  ({', '.join(e['where'])}{more})\n")
    if "token_stats" in r:
        st, ov = r["token_stats"], r["overlong"]
        w(
            f"tokens per sample ({r.get('tokenizer')}): min {st['min']}  median {st['median']}  p95 {st['p95']}  "
            f"max {st['max']}  total {st['total']:,}  (trained {st['trained_total']:,})\n"
        )
        w(f"longer than max_length {ov['max_length']}: {st['over_max_length']:,} (policy: {ov['policy']})\n")
        if lw := r.get("loss_weights"):
            w(
                f"loss weights: {lw['min']:g} to {lw['max']:g} ({lw['tokens_not_1']:,} trained tokens weigh other than 1)\n"
            )
        if r.get("packing_hint"):
            w(f"hint: {r['packing_hint']}\n")
        if r.get("template"):
            w(f"chat template: {r['template']}\n")
        for s in r["samples"]:
            w(
                f"\n--- {s['where']}: {s['tokens']} tokens, {s['trained_tokens']} trained "
                f"(between {MARK_OPEN} and {MARK_CLOSE}){'' if s['ends_with_eos'] else ', NO EOS at the end'}\n"
            )
            w(s["text"] + "\n")
    else:
        for s in r["samples"]:
            w(f"\n--- {s['where']}\n")
            for m in s.get("messages", []):
                w(f"{m['role']}{' (trained)' if m['trained'] else ''}: {m['content']}\n")
            for key in ("text", "prompt", "completion"):
                if key in s:
                    w(f"{key}: {s[key]}\n" if key != "text" else f"{s[key]}\n")
        w("\n(give --model to see token lengths and the trained part of each sample)\n")
    for p in r["problems"]:
        w(f"warning: {p}\n")
