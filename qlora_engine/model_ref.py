"""Model references: a local folder, a hub id or a ``.gguf`` file, made into a local safetensors folder.

GGUF files are dequantized once by transformers and cached as a safetensors folder
(``cache_dir()/gguf/...``), so every later load is a plain safetensors load. Pickled weights
are refused; hub downloads take only the files a load needs.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from pathlib import Path
from typing import Any

import torch
from huggingface_hub import snapshot_download

from qlora_engine.checkpoint import disk_errno, disk_full, tree_bytes
from qlora_engine.errors import ConfigError, ModelError
from qlora_engine.events import PhaseChanged
from qlora_engine.model_check import check_model_folder
from qlora_engine.paths import cache_dir
from qlora_engine.scrub import is_masked, ref_tokens, remember

SAFE_WEIGHTS = (".safetensors",)
PICKLE_WEIGHTS = (".bin", ".pt", ".pth", ".pkl", ".ckpt")
HUB_FILES = ["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja", "tokenizer*"]


# -- resolving a reference -----------------------------------------------------------------------


def is_gguf(ref: str) -> bool:
    return ref.lower().endswith(".gguf")


def _looks_like_path(ref: str) -> bool:
    return ref.startswith((".", "/", "~")) or os.sep in ref and Path(ref).expanduser().exists() or Path(ref).exists()


def weights_format(folder: Path) -> str:
    """'safetensors', 'pickle-only' or 'none' for a local model folder."""
    names = [p.name for p in folder.iterdir() if p.is_file()]
    if any(n.endswith(SAFE_WEIGHTS) for n in names):
        return "safetensors"
    return "pickle-only" if any(n.endswith(PICKLE_WEIGHTS) for n in names) else "none"


def check_weights_safe(folder: Path) -> None:
    fmt = weights_format(folder)
    if fmt == "pickle-only":
        raise ModelError(
            "the weights are only in pickle files (.bin/.pt), which can run arbitrary code when loaded. "
            "QLoRA Studio loads safetensors or GGUF only.",
            file=folder,
            hint="Use a copy of the model in safetensors format (most hub models have one), "
            "or convert it on a machine you trust with `model.save_pretrained(dir, safe_serialization=True)`.",
        )
    if fmt == "none":
        raise ModelError("no weight files (*.safetensors) found in this folder.", file=folder)


def _offline_error(ref: str, exc: Exception) -> ModelError:
    return ModelError(
        f"{ref!r} is not a local folder or file, and it could not be downloaded from the Hugging Face hub "
        f"({type(exc).__name__}). If you are offline, download the model on a connected machine and point "
        "model.ref at the folder, or use a local .gguf file.",
        hint="Check the spelling of the hub id and your network; for gated models log in with `hf auth login`.",
    )


_HUB_URL = re.compile(
    r"^https?://(?:(?P<cred>[^/@\s]+)@)?(?:www\.)?(?:huggingface\.co|hf\.co)/(?P<repo>[^/?#\s]+/[^/?#\s]+)"
)


def hub_reference(ref: str) -> tuple[str, str | None]:
    """A hub model URL (``https://[user:TOKEN@]huggingface.co/org/name[?token=TOKEN]``) as its repo id
    and the token inside it; any other reference unchanged, with no token."""
    m = _HUB_URL.match(ref.strip())
    if not m:
        return ref, None
    tokens = ref_tokens(ref)
    return m.group("repo"), tokens[-1] if tokens else None


def resolve_model(
    ref: str, *, revision: str | None = None, weights: bool = True, sink: Any = None, token: str | None = None
) -> Path:
    """A local folder holding the model: the folder itself, the GGUF conversion, or a hub snapshot.

    With ``weights=False`` only config and tokenizer files are fetched (``inspect-model``).
    ``token``: a hub token (``model.token``); a hub URL may carry one too (:func:`hub_reference`).
    """
    if not ref or not ref.strip():
        raise ConfigError("no model chosen; set a local folder, a .gguf file or a hub id.", field="model.ref")
    ref, ref_token = hub_reference(ref)
    token = token if token and not is_masked(token) else ref_token
    remember(token)
    path = Path(ref).expanduser()
    if is_gguf(ref):
        if not path.is_file():
            what = "is not a regular file" if path.exists() else "GGUF file not found"
            raise ModelError(f"{what}.", file=path, field="model.ref")
        return gguf_to_folder(path, sink=sink) if weights else path
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelError("not a Hugging Face model folder (no config.json).", file=path, field="model.ref")
        if weights:
            check_weights_safe(path)
            check_model_folder(path)
        return path
    if path.exists():
        raise ModelError(
            "is a file, but not a .gguf file; model.ref takes a model folder, a .gguf file or a hub id.",
            file=path,
            field="model.ref",
        )
    if _looks_like_path(ref) or ref.count("/") > 1:
        raise ModelError("no such model folder or file.", file=path, field="model.ref")
    return _download(ref, revision=revision, weights=weights, token=token)


def _download(repo_id: str, *, revision: str | None, weights: bool, token: str | None = None) -> Path:
    patterns = HUB_FILES if weights else [p for p in HUB_FILES if p != "*.safetensors"]
    try:
        folder = Path(snapshot_download(repo_id, revision=revision, allow_patterns=patterns, token=token or None))
    except Exception as e:  # offline, unknown id, gated: all end in the same message
        raise _offline_error(repo_id, e) from e
    if weights:
        check_weights_safe(folder)
        check_model_folder(folder)
    return folder


# -- GGUF -----------------------------------------------------------------------------------------


def _gguf_cache_key(path: Path) -> str:
    st = path.stat()
    raw = f"v2|{path.resolve()}|{st.st_size}|{st.st_mtime_ns}".encode()
    return hashlib.sha256(raw).hexdigest()[:12]


def gguf_to_folder(path: Path, *, sink: Any = None) -> Path:
    """Dequantize a GGUF file once (transformers does the work) and cache it as safetensors."""
    target = cache_dir() / "gguf" / f"{path.stem}-{_gguf_cache_key(path)}"
    if (target / "config.json").is_file():
        return target
    # lazy: transformers' auto model classes cost seconds; the budget imports this module only to read a config
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if sink is not None:
        sink.emit(PhaseChanged(phase="converting", detail=f"dequantizing {path.name} once (cached afterwards)"))
    tmp = target.with_name(target.name + f".tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tok = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
        model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.bfloat16)
        model.hf_quantizer = None  # transformers refuses to save a GGUF-loaded model otherwise
        model.save_pretrained(tmp, safe_serialization=True)
        # The saved weights are plain bf16: drop the GGUF quantization note from the config,
        # or a later 4-bit load would see two quantization configs.
        config_file = tmp / "config.json"
        config = json.loads(config_file.read_text(encoding="utf-8"))
        config.pop("quantization_config", None)
        config_file.write_text(json.dumps(config, indent=2), encoding="utf-8")
        tok.save_pretrained(tmp)
        (tmp / "qlora_source.json").write_text(json.dumps({"gguf": str(path.resolve())}))
        tmp.rename(target)
    except Exception as e:
        if (target / "config.json").is_file():  # another process converted it first (rename: ENOTEMPTY)
            shutil.rmtree(tmp, ignore_errors=True)
            return target
        code, written = disk_errno(e, target.parent), tree_bytes(tmp)
        shutil.rmtree(tmp, ignore_errors=True)
        if code is not None:  # a full cache disk is not a bad GGUF file
            raise disk_full(target, code, max(written, path.stat().st_size * 4)) from None
        raise ModelError(f"could not read this GGUF file ({type(e).__name__}: {str(e)[:300]}).", file=path) from e
    return target
