"""Export 3: GGUF files for llama.cpp and Ollama, with a Modelfile and a model card.

The folder holds the merged model in each asked type (``<name>-f16.gguf``, ``<name>-q8_0.gguf``; the
K-quants ``<name>-q4_k_m.gguf`` and ``<name>-q5_k_m.gguf`` through llama.cpp's quantizer, see
:mod:`qlora_engine.export.gguf_quantize`),
the adapter as a GGUF LoRA file (``<name>-lora.gguf``, for a GGUF of the base model), an Ollama
``Modelfile`` for the merged model, ``README.md`` and the run's ``config.yaml``.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from qlora_engine.checkpoint import write_atomic_folder
from qlora_engine.export.adapter import config_source, training_template
from qlora_engine.export.card import build_card, describe_files, write_card
from qlora_engine.export.common import ExportError, Reporter, check_output, untrained_notes
from qlora_engine.export.gguf_lora import check_adapter_supported, write_lora_gguf
from qlora_engine.export.gguf_model import (
    TYPES,
    arch_spec,
    model_metadata,
    plan_model_tensors,
    state_dict_tensors,
    write_gguf,
)
from qlora_engine.export.gguf_quantize import DESCRIPTIONS as K_DESCRIPTIONS
from qlora_engine.export.gguf_quantize import K_TYPES, check_available, quantize
from qlora_engine.export.gguf_vocab import source_gguf_pre, vocab_metadata
from qlora_engine.export.merged import load_export_tokenizer, merge
from qlora_engine.export.ollama import modelfile
from qlora_engine.export.source import RunInfo, base_origin, resolve_base

DEFAULT_TYPES = ("f16", "q8_0")


def _usage(name: str, model_file: str, lora_file: str | None, base_file: str | None) -> str:
    text = (
        f"llama.cpp: `llama-cli -m {model_file} -cnv`\n\n"
        f"Ollama: `ollama create {name} -f Modelfile`, then `ollama run {name}`."
    )
    if lora_file and base_file:
        text += (
            f"\n\nThe small way: the base model's own GGUF (`{base_file}`) with the adapter applied at run time: "
            f"`llama-cli -m {base_file} --lora {lora_file} -cnv`, or "
            f"`ollama create {name}-lora -f Modelfile.lora`, then `ollama run {name}-lora`."
        )
    elif lora_file:
        text += (
            f"\n\nThe LoRA file `{lora_file}` applies the adapter to a GGUF of the *base* model at run time "
            f"(same architecture and tensor names): `llama-cli -m base.gguf --lora {lora_file}`, or `ADAPTER ./{lora_file}` "
            "in a Modelfile whose FROM is the base model."
        )
    return text


def _place_base(src: Path, dst: Path) -> None:
    """The base GGUF beside the Modelfile.lora: a hard link where the file system allows (no extra disk), else a copy."""
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def export_gguf(
    info: RunInfo,
    out: str | Path,
    rep: Reporter,
    overwrite: bool,
    *,
    types: tuple[str, ...] | list[str] = DEFAULT_TYPES,
    lora: bool = True,
    dtype: str = "auto",
) -> Path:
    """Write the GGUF export to ``out`` (its types checked before ``out``, which may not exist unless ``overwrite``).

    ``types``: any of 'f16', 'q8_0' (and 'f32'), written by our own writer, and the K-quants
    'q4_k_m', 'q5_k_m' (and 'q4_k_s', 'q5_k_s', 'q6_k'), made from an F16 file by llama.cpp.
    """
    from transformers import AutoConfig  # lazy: transformers takes seconds to import

    types = tuple(dict.fromkeys(types))
    bad = [t for t in types if t not in TYPES and t not in K_TYPES]
    if not types or bad:
        raise ExportError(
            f"gguf types: {bad or '(none)'} not allowed; choose from {', '.join([*TYPES, *K_TYPES])}.",
            field="gguf_types",
        )
    check_available(types)
    out = check_output(out, info, overwrite=overwrite)

    # Everything that can refuse does so before the slow merge.
    folder = resolve_base(info, sink=rep.sink)
    config = AutoConfig.from_pretrained(folder, trust_remote_code=info.config.model.trust_remote_code)
    spec = arch_spec(config)
    if lora:
        check_adapter_supported(info.adapter_config)
    tokenizer = load_export_tokenizer(info)
    template = training_template(info, tokenizer)
    origin = base_origin(folder)
    vocab = vocab_metadata(
        tokenizer, int(config.vocab_size), chat_template=template, source_gguf_pre=source_gguf_pre(origin.get("gguf"))
    )

    notes = list(vocab.notes) + untrained_notes(info.adapter_dir, rep)
    merged, merge_notes, _ = merge(info, dtype=dtype, rep=rep)
    notes += merge_notes
    name = info.export_name
    model_files = {t: f"{name}-{t}.gguf" for t in types}
    lora_file = f"{name}-lora.gguf" if lora else None
    # The Modelfile takes what Ollama users pull by default when it was asked for (Q4_K_M), else Q8_0.
    main_file = next((model_files[t] for t in ("q4_k_m", "q5_k_m", "q8_0") if t in model_files), model_files[types[0]])
    mf_text, mf_warnings = modelfile(main_file, tokenizer, template, name=name)
    for w in mf_warnings:
        rep.log(w, "warning")
    notes += mf_warnings
    cfg_file = config_source(info)
    base_file = Path(origin["gguf"]).name if origin["kind"] == "gguf" and lora_file else None
    if base_file is not None and (base_file in model_files.values() or base_file == lora_file):
        base_file = "base-" + base_file

    def write_own(path: Path, t: str) -> None:
        plan = plan_model_tensors(spec, merged.config, state_dict_tensors(merged), t)
        rep.phase(f"gguf: writing {path.name} ({len(plan)} tensors)")
        write_gguf(
            path,
            spec,
            model_metadata(spec, merged.config, vocab, t, name=name),
            plan,
            progress=rep.tensor_progress(path.name),
            should_stop=rep.should_stop,
        )

    def write(tmp: Path) -> None:
        for t, fname in model_files.items():
            if t not in K_TYPES:
                write_own(tmp / fname, t)
        k_types = [t for t in types if t in K_TYPES]
        if k_types:
            # llama.cpp quantizes from 16-bit weights: the F16 file of this export, or a scratch one.
            f16 = tmp / model_files["f16"] if "f16" in model_files else tmp / f".{name}-f16-for-quantizing.gguf"
            if not f16.is_file():
                write_own(f16, "f16")
            for t in k_types:
                rep.phase(f"gguf: quantizing to {t.upper()} with llama.cpp ({model_files[t]})")
                quantize(f16, tmp / model_files[t], t, should_stop=rep.should_stop)
            if "f16" not in model_files:
                f16.unlink()
        if lora_file:
            rep.phase(f"gguf: writing the LoRA adapter {lora_file}")
            write_lora_gguf(
                tmp / lora_file, spec, config, info.adapter_dir, info.adapter_config, name=name, should_stop=rep.should_stop
            )
        (tmp / "Modelfile").write_text(mf_text, encoding="utf-8")
        if base_file:
            # The base's own GGUF file plus the LoRA file: the small way to run it in Ollama. The base
            # goes beside the Modelfile, so every path in it is relative and the folder can move.
            _place_base(Path(origin["gguf"]).resolve(), tmp / base_file)
            lora_mf, _ = modelfile(
                base_file, tokenizer, template, name=name + "-lora", adapter_file=lora_file, file_name="Modelfile.lora"
            )
            (tmp / "Modelfile.lora").write_text(lora_mf, encoding="utf-8")
        if cfg_file is not None:
            shutil.copy2(cfg_file, tmp / "config.yaml")
        files = {
            fname: f"the merged model, {t.upper()} ({spec.name} architecture): `llama-cli -m {fname}`"
            + (f"; {K_DESCRIPTIONS[t]}, quantized by llama.cpp" if t in K_DESCRIPTIONS else "")
            for t, fname in model_files.items()
        }
        if lora_file:
            files[lora_file] = f"the adapter alone, as a GGUF LoRA file: `llama-cli -m BASE.gguf --lora {lora_file}`"
        files["Modelfile"] = f"Ollama recipe for {main_file} with the chat template and stop tokens: `ollama create {name} -f Modelfile`"
        if base_file:
            files[base_file] = "the base model's own GGUF, as the run started from it (for Modelfile.lora and --lora)"
            files["Modelfile.lora"] = (
                f"Ollama recipe for {base_file} with {lora_file} applied: `ollama create {name}-lora -f Modelfile.lora`"
            )
        files = describe_files(tmp, files)
        usage = _usage(name, main_file, lora_file, base_file)
        write_card(tmp, build_card(info, "gguf", notes=notes, files=files, usage=usage))
        rep.check()

    path = write_atomic_folder(out, write, replace=overwrite)
    rep.phase(f"gguf: done: {path}")
    return path
