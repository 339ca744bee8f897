"""Export 1: the adapter as a PEFT folder any peft install loads, with a model card and the run's config.

Files: ``adapter_model.safetensors`` and ``adapter_config.json`` (as trained), the tokenizer
files the run trained with (with the chat template it used written in), ``README.md`` and the
run's ``config.yaml``.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from qlora_engine.checkpoint import write_atomic_folder
from qlora_engine.export.card import build_card, describe_files, write_card
from qlora_engine.export.common import Reporter, copy_files, untrained_notes
from qlora_engine.export.source import RunInfo, is_hub_id, load_run, tokenizer_dir


def training_template(info: RunInfo, tokenizer: Any) -> str | None:
    """The chat template the run's data went through, or None if it rendered no conversation.

    That is the config's ``data.chat_template``, else the tokenizer's own, else the ChatML default
    the data pipeline falls back to (only if the run's data report says a template was used).
    """
    from qlora_engine.data.encode import resolve_template  # lazy: only this step needs the data package

    template, origin = resolve_template(tokenizer, info.config.data.chat_template)
    if origin == "tokenizer" or info.config.data.chat_template:
        return template
    return template if info.facts.data.get("template") else None


def config_source(info: RunInfo) -> Path | None:
    for p in (info.adapter_dir / "config.yaml", info.run_dir / "config.yaml" if info.run_dir else None):
        if p is not None and p.is_file():
            return p
    return None


def usage_snippet(info: RunInfo, kind: str) -> str:
    ref = info.config.model.ref
    base = ref if is_hub_id(ref) else "path/to/the/base/model"
    if kind == "adapter":
        return (
            "```python\nfrom peft import PeftModel\nfrom transformers import AutoModelForCausalLM, AutoTokenizer\n\n"
            f'base = AutoModelForCausalLM.from_pretrained("{base}")\n'
            'model = PeftModel.from_pretrained(base, "path/to/this/folder")\n'
            'tokenizer = AutoTokenizer.from_pretrained("path/to/this/folder")\n```\n\n'
            "Or try it in a terminal: `qlora-engine chat path/to/this/folder --compare`."
        )
    return (
        "```python\nfrom transformers import AutoModelForCausalLM, AutoTokenizer\n\n"
        'model = AutoModelForCausalLM.from_pretrained("path/to/this/folder")\n'
        'tokenizer = AutoTokenizer.from_pretrained("path/to/this/folder")\n```'
    )


def export_adapter(info: RunInfo, out: Path, rep: Reporter, overwrite: bool) -> Path:
    """Write the adapter export to ``out`` (checked by ``export()``; replaced only with ``overwrite``)."""
    from transformers import AutoTokenizer  # lazy: transformers takes seconds to import

    rep.phase(f"adapter: checking {info.adapter_dir}")
    notes = untrained_notes(info.adapter_dir, rep)
    tok_dir = tokenizer_dir(info)
    tokenizer = AutoTokenizer.from_pretrained(tok_dir)
    template = training_template(info, tokenizer)
    if not info.has_config:
        notes.append("no config.yaml was found with this adapter, so the hyperparameters below are not the run's.")
    cfg_file = config_source(info)

    def write(tmp: Path) -> None:
        rep.phase("adapter: copying the adapter and tokenizer")
        # A checkpoint folder also holds the trainer's state: only the adapter and tokenizer files go out.
        copy_files(
            info.adapter_dir, tmp, skip={"README.md", "config.yaml", "trainer_state.json", "qlora_checkpoint.json"}
        )
        acfg = json.loads((tmp / "adapter_config.json").read_text(encoding="utf-8"))
        if is_hub_id(info.config.model.ref) and acfg.get("base_model_name_or_path") != info.config.model.ref:
            # Name the base by its hub id, so the adapter loads on another machine too.
            acfg["base_model_name_or_path"] = info.config.model.ref
            (tmp / "adapter_config.json").write_text(json.dumps(acfg, indent=2), encoding="utf-8")
        if tok_dir != info.adapter_dir or (template and template != getattr(tokenizer, "chat_template", None)):
            if template:
                tokenizer.chat_template = template
            tokenizer.save_pretrained(tmp)
        if cfg_file is not None:
            shutil.copy2(cfg_file, tmp / "config.yaml")
        rep.phase("adapter: writing the model card")
        files = describe_files(tmp, {})
        write_card(tmp, build_card(info, "adapter", notes=notes, files=files, usage=usage_snippet(info, "adapter")))
        rep.check()

    path = write_atomic_folder(out, write, replace=overwrite)
    rep.phase(f"adapter: done: {path}")
    return path


def write_run_adapter_card(run_dir: str | Path) -> Path:
    """Replace the placeholder README.md that peft writes into a run's ``adapter/`` with our model card.

    peft's ``save_pretrained`` leaves its empty template there; the card says what the adapter is:
    the base model, the data, the steps, the final loss, every file and how to load it. Called
    once a run has finished (its ``events.jsonl`` then holds the final facts).
    """

    info = load_run(run_dir)
    text = build_card(
        info, "adapter", files=describe_files(info.adapter_dir, {}), usage=usage_snippet(info, "adapter")
    )
    path = info.adapter_dir / "README.md"
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(path)
    return path
