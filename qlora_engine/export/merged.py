"""Export 2: the adapter merged into a 16-bit copy of the base, saved as a plain transformers model.

The base is loaded again from its own safetensors in 16 bit (not the 4-bit copy used in
training): adding the LoRA product to 4-bit weights and saving the result would bake the 4-bit
rounding into every merged weight. Where the base exists only in a quantized form (a GGUF file,
or a pre-quantized bitsandbytes checkpoint), it is dequantized first and the card says so.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import torch

from qlora_engine.checkpoint import write_atomic_folder
from qlora_engine.errors import ModelError
from qlora_engine.export.adapter import config_source, training_template, usage_snippet
from qlora_engine.export.card import build_card, describe_files, write_card
from qlora_engine.export.common import Reporter, untrained_notes
from qlora_engine.export.source import RunInfo, base_origin, resolve_base, tokenizer_dir

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def pick_dtype(choice: str, origin: dict[str, Any]) -> torch.dtype:
    """'auto' keeps the dtype the base is stored in (bfloat16 if unknown or quantized)."""
    if choice != "auto":
        if choice not in DTYPES:
            raise ModelError(f"dtype: {choice!r} is not allowed; use auto, bfloat16, float16 or float32.")
        return DTYPES[choice]
    stored = str(origin.get("dtype") or "")
    return DTYPES.get(stored.replace("torch.", ""), torch.bfloat16)


def origin_notes(origin: dict[str, Any]) -> list[str]:
    if origin["kind"] == "gguf":
        q = origin.get("quantization") or "a quantized type"
        return [
            f"the base model was available only as a GGUF file ({Path(origin['gguf']).name}, {q}). It was "
            "dequantized to 16 bit for the merge, so the merged weights carry that file's quantization error; "
            "they are not the original full-precision weights."
        ]
    if origin["kind"] == "prequantized":
        return [
            f"the base model was available only as a pre-quantized ({origin['method']}) 4-bit checkpoint. It was "
            "dequantized for the merge, so the merged weights carry the 4-bit quantization error."
        ]
    return []


def _dequantize_bnb4(model: torch.nn.Module, dtype: torch.dtype) -> None:
    """Replace every bitsandbytes 4-bit linear layer by a plain linear layer holding its dequantized weight."""
    import bitsandbytes as bnb  # lazy: heavy import, only a merged export needs it

    for name, module in list(model.named_modules()):
        if not isinstance(module, bnb.nn.Linear4bit):
            continue
        weight = bnb.functional.dequantize_4bit(module.weight.data, module.weight.quant_state).to(dtype)
        linear = torch.nn.Linear(module.in_features, module.out_features, bias=module.bias is not None, dtype=dtype)
        linear.weight.data.copy_(weight)
        if module.bias is not None:
            linear.bias.data.copy_(module.bias.data.to(dtype))
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, linear)
    model.hf_quantizer = None
    model.is_quantized = False
    # Saving would otherwise try to re-serialize the weights in the 4-bit layout they were read from.
    conversions = getattr(model, "_weight_conversions", None) or []
    model._weight_conversions = [
        c
        for c in conversions
        if not any(type(op).__module__.endswith(".bitsandbytes") for op in getattr(c, "operations", []))
    ]
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config


def load_base_16bit(info: RunInfo, dtype: str, rep: Reporter) -> tuple[torch.nn.Module, dict[str, Any], torch.dtype]:
    from transformers import AutoModelForCausalLM  # lazy: heavy import, only a merged export needs it

    folder = resolve_base(info, sink=rep.sink)
    origin = base_origin(folder)
    dt = pick_dtype(dtype, origin)
    kw = dict(
        dtype=dt, use_safetensors=True, trust_remote_code=info.config.model.trust_remote_code, device_map={"": "cpu"}
    )
    if origin["kind"] == "prequantized":
        if origin["method"] != "bitsandbytes" or not origin["config"].get("load_in_4bit"):
            raise ModelError(
                f"{folder}: the base is a pre-quantized {origin['method']} checkpoint; merging into it is not supported yet.",
                hint="Point model.ref at the full-precision base model and export again.",
            )
        rep.phase(f"merge: loading the 4-bit base {folder} to dequantize it")
        model = AutoModelForCausalLM.from_pretrained(folder, **kw)
        _dequantize_bnb4(model, dt)
    else:
        rep.phase(f"merge: loading the base {folder} in {str(dt).replace('torch.', '')}")
        model = AutoModelForCausalLM.from_pretrained(folder, **kw)
    return model, origin, dt


def merge(info: RunInfo, *, dtype: str = "auto", rep: Reporter) -> tuple[torch.nn.Module, list[str], torch.dtype]:
    """The base in 16 bit with the adapter merged in, and notes for the card."""
    from peft import PeftModel  # lazy: heavy import, only a merged export needs it

    model, origin, dt = load_base_16bit(info, dtype, rep)
    notes = origin_notes(origin)
    for n in notes:
        rep.log(n, "warning")
    rep.check()
    rep.phase("merge: adding the adapter to the weights")
    peft_model = PeftModel.from_pretrained(model, str(info.adapter_dir), is_trainable=False)
    merged = peft_model.merge_and_unload(safe_merge=True)  # safe_merge: refuse NaN/inf weights
    merged.eval()
    return merged, notes, dt


def load_export_tokenizer(info: RunInfo) -> Any:
    """The tokenizer the run trained with, carrying the chat template its data went through."""
    from transformers import AutoTokenizer  # lazy: heavy import, only a merged export needs it

    tok = AutoTokenizer.from_pretrained(tokenizer_dir(info))
    template = training_template(info, tok)
    if template:
        tok.chat_template = template
    return tok


def export_merged(info: RunInfo, out: Path, rep: Reporter, overwrite: bool, *, dtype: str = "auto") -> Path:
    """Write the merged model (safetensors + tokenizer + card + run config) to ``out`` (checked by ``export()``)."""
    notes = untrained_notes(info.adapter_dir, rep)
    merged, origin_n, dt = merge(info, dtype=dtype, rep=rep)
    notes += origin_n
    tokenizer = load_export_tokenizer(info)
    cfg_file = config_source(info)

    def write(tmp: Path) -> None:
        rep.phase(f"merged: saving {sum(p.numel() for p in merged.parameters()):,} parameters as safetensors")
        merged.save_pretrained(tmp, max_shard_size="5GB")
        tokenizer.save_pretrained(tmp)
        if cfg_file is not None:
            shutil.copy2(cfg_file, tmp / "config.yaml")
        weights = {p.name for p in tmp.glob("model*.safetensors")}
        what = f"the merged weights ({str(dt).replace('torch.', '')}); `AutoModelForCausalLM.from_pretrained(folder)` loads them"
        files = describe_files(tmp, dict.fromkeys(weights, what))
        write_card(tmp, build_card(info, "merged", notes=notes, files=files, usage=usage_snippet(info, "merged")))
        rep.check()

    path = write_atomic_folder(out, write, replace=overwrite)
    rep.phase(f"merged: done: {path}")
    return path
