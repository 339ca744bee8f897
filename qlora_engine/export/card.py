"""The model card (README.md) every export carries: what was trained, on what, how, and how well.

Everything comes from the run's ``config.yaml`` and ``events.jsonl``; nothing secret is in
either (hub tokens live in the hub's own credential store and are never read here), and the
card writes only what those files say.
"""

from __future__ import annotations

import dataclasses
import datetime
from pathlib import Path
from typing import Any

from qlora_engine.export.source import RunInfo, is_hub_id

KIND_TITLES = {
    "adapter": "LoRA adapter",
    "merged": "merged model (16-bit)",
    "gguf": "GGUF model for llama.cpp and Ollama",
}


def _fmt_seconds(s: float | None) -> str:
    if s is None:
        return "unknown"
    s = int(round(s))
    h, rem = divmod(s, 3600)
    m, sec = divmod(rem, 60)
    return f"{h} h {m:02d} min {sec:02d} s" if h else f"{m} min {sec:02d} s"


def _fmt_loss(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.4f}"


def _value(v: Any) -> str:
    if isinstance(v, (list, tuple)):
        return ", ".join(str(x) for x in v) or "(none)"
    if isinstance(v, dict):
        return ", ".join(f"{k}: {x}" for k, x in v.items()) or "(none)"
    return "null" if v is None else str(v)


def hyperparameter_rows(info: RunInfo) -> list[tuple[str, str]]:
    """Every field of the run's config except where files went (model and data have their own sections)."""
    cfg = info.config
    rows = []
    skip = {"model.ref", "data.path", "output.dir"}
    for section in dataclasses.fields(cfg):
        if section.metadata.get("internal") or section.name == "schema_version":
            continue
        obj = getattr(cfg, section.name)
        for f in dataclasses.fields(obj):
            key = f"{section.name}.{f.name}"
            if key not in skip:
                rows.append((key, _value(getattr(obj, f.name))))
    t = cfg.train
    rows.append(("effective batch size", f"{t.micro_batch_size * t.gradient_accumulation_steps} sequences"))
    return rows


def _front_matter(info: RunInfo, kind: str) -> list[str]:
    ref = info.config.model.ref
    lines = ["---"]
    if is_hub_id(ref):
        lines.append(f"base_model: {ref}")
    lines.append(
        {"adapter": "library_name: peft", "merged": "library_name: transformers", "gguf": "library_name: gguf"}[kind]
    )
    lines.append("tags:\n- qlora\n- lora\n- qlora-studio" + ("\n- gguf" if kind == "gguf" else ""))
    lines.append("---")
    return lines


def _data_lines(info: RunInfo) -> list[str]:
    cfg, d = info.config, info.facts.data
    lines = [f"- source: `{cfg.data.path or d.get('source', 'unknown')}`"]
    if d:
        lines.append(f"- format: {d.get('format', cfg.data.format)} (chat template: {d.get('template', 'n/a')})")
        train = d.get("train") or {}
        if d.get("rows") is not None:
            lines.append(
                f"- rows read: {d['rows']:,}"
                + (f", skipped: {d.get('skipped_total', 0):,}" if d.get("skipped_total") else "")
            )
        if train:
            lines.append(
                f"- training set: {train.get('samples', 0):,} samples, {train.get('tokens', 0):,} tokens "
                f"({train.get('trained_tokens', 0):,} carry loss)"
            )
        val = d.get("validation") or {}
        if val:
            lines.append(f"- validation set: {val.get('samples', 0):,} samples, {val.get('tokens', 0):,} tokens")
    else:
        lines.append("- size: unknown (no events.jsonl with the run)")
    return lines


def _training_lines(info: RunInfo) -> list[str]:
    f = info.facts
    steps = f"{f.steps} of {f.total_steps}" if f.steps is not None and f.total_steps else str(f.steps or "unknown")
    lines = [
        f"- optimizer steps: {steps}" + (" (stopped early)" if f.stopped_early else ""),
        f"- final training loss: {_fmt_loss(f.final_loss)}",
        f"- final evaluation loss: {_fmt_loss(f.final_eval_loss)}",
        f"- training time: {_fmt_seconds(f.training_seconds)}"
        + (" (over several resumed sessions)" if f.resumed else ""),
        f"- hardware: {f.device or 'unknown'}",
    ]
    if f.model.get("trainable_parameters"):
        lines.append(
            f"- trainable (LoRA) parameters: {f.model['trainable_parameters']:,} of {f.model.get('num_parameters', 0):,}"
        )
    return lines


def build_card(
    info: RunInfo,
    kind: str,
    *,
    notes: list[str] | None = None,
    files: dict[str, str] | None = None,
    usage: str | None = None,
) -> str:
    """The README.md text of an export of ``kind`` ('adapter', 'merged' or 'gguf')."""
    cfg = info.config
    lines = _front_matter(info, kind)
    lines += ["", f"# {info.export_name}: {KIND_TITLES[kind]}", ""]
    lines.append(
        f"A QLoRA fine-tune of `{cfg.model.ref}`, trained with QLoRA Studio: the base model was loaded in 4-bit "
        f"{cfg.quant.quant_type.upper()} and a rank-{cfg.lora.rank} LoRA adapter was trained on top of it."
    )
    if notes:
        lines += [""] + [f"> **Note:** {n}" for n in notes]
    lines += [
        "",
        "## Base model",
        "",
        f"- `{cfg.model.ref}`" + (f" (revision {cfg.model.revision})" if cfg.model.revision else ""),
    ]
    m = info.facts.model
    if m:
        lines.append(
            f"- {m.get('architecture', '?')}, {m.get('num_layers', '?')} layers, hidden size {m.get('hidden_size', '?')}, "
            f"{m.get('num_parameters', 0):,} parameters"
        )
    lines += ["", "## Dataset", ""] + _data_lines(info)
    lines += ["", "## Training results", ""] + _training_lines(info)
    lines += ["", "## Hyperparameters", "", "| setting | value |", "| --- | --- |"]
    lines += [f"| `{k}` | {v.replace('|', '/')} |" for k, v in hyperparameter_rows(info)]
    if files:
        lines += ["", "## Files", ""] + [f"- `{name}`: {what}" for name, what in files.items()]
    if usage:
        lines += ["", "## Use", "", usage.strip()]
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    lines += [
        "",
        f"_Exported by QLoRA Studio on {stamp}{'' if info.has_config else '; no config.yaml was found, so the settings above are defaults'}._",
        "",
    ]
    return "\n".join(lines)


FILE_USES: dict[str, str] = {
    "README.md": "this card: what was trained, on what data, how, and how to use each file",
    "config.yaml": "the QLoRA Studio run configuration: `qlora-engine train config.yaml` repeats the run "
    "(with model.ref and data.path pointing at your copies)",
    "adapter_model.safetensors": "the LoRA weights (safetensors); `PeftModel.from_pretrained(base, folder)` loads "
    "them together with adapter_config.json",
    "adapter_config.json": "the LoRA configuration peft reads (rank, alpha, target modules, base model)",
    "tokenizer.json": "the tokenizer; `AutoTokenizer.from_pretrained(folder)` loads it with tokenizer_config.json",
    "tokenizer_config.json": "the tokenizer's settings (special tokens, chat template); read with tokenizer.json",
    "special_tokens_map.json": "the tokenizer's special tokens; read with tokenizer.json",
    "chat_template.jinja": "the chat template the run trained with; transformers reads it with the tokenizer",
    "vocab.json": "the tokenizer's vocabulary; read with tokenizer.json",
    "merges.txt": "the tokenizer's merge rules; read with tokenizer.json",
    "tokenizer.model": "the SentencePiece tokenizer model; read with tokenizer_config.json",
    "added_tokens.json": "tokens added to the vocabulary; read with the tokenizer",
    "generation_config.json": "default generation settings (end-of-turn tokens, repetition penalty); "
    "transformers' `generate` reads it",
    "config.json": "the model configuration; `AutoModelForCausalLM.from_pretrained(folder)` reads it",
    "model.safetensors.index.json": "which weight file holds which tensor; transformers reads it",
}


def describe_files(folder: Path, specific: dict[str, str]) -> dict[str, str]:
    """Every file in ``folder`` (and README.md, written last) with what it is and how to use it."""
    names = sorted({p.name for p in folder.iterdir() if p.is_file()} | {"README.md"})
    out = {}
    for name in names:
        what = specific.get(name) or FILE_USES.get(name)
        if what is None and name.startswith("model") and name.endswith(".safetensors"):
            what = "the merged weights; `AutoModelForCausalLM.from_pretrained(folder)` loads them with config.json"
        out[name] = what or "a file of this export"
    return out


def write_card(folder: Path, text: str) -> None:
    (folder / "README.md").write_text(text, encoding="utf-8")
