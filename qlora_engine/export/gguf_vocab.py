"""The tokenizer as GGUF metadata (llama.cpp's ``tokenizer.ggml.*`` keys), from a Hugging Face tokenizer.

Two vocabulary kinds are written:

* byte-level BPE (``tokenizer.ggml.model = "gpt2"``): Llama 3, Qwen2, SmolLM, GPT-2 style
  tokenizers. llama.cpp also needs ``tokenizer.ggml.pre``, the name of the regex that splits
  text before BPE. We read it off the tokenizer's own pre-tokenizer (the split regex, or the
  digit splitting SmolLM does) instead of hashing a probe text; a base model that came from
  a GGUF file keeps the name that file gave.
* sentencepiece-style BPE with byte fallback (``"llama"``): Llama 2, Mistral 7B, TinyLlama.
  llama.cpp merges the pair whose result has the highest score, so each token's score is
  minus the rank of the merge that makes it (the same order BPE applies merges in).
"""

from __future__ import annotations

import json
import mmap
import re
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import gguf

from qlora_engine.errors import ModelError

# Split regexes of the common byte-level tokenizers and llama.cpp's names for them.
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
KNOWN_SPLITS = {_LLAMA3_SPLIT: "llama-bpe", _QWEN2_SPLIT: "qwen2"}
_BYTE_TOKEN = re.compile(r"^<0x[0-9A-Fa-f]{2}>$")


@dataclass
class VocabMetadata:
    model: str
    """'gpt2' or 'llama'."""
    pre: str | None
    tokens: list[str]
    token_types: list[int]
    scores: list[float] | None = None
    merges: list[str] | None = None
    special_ids: dict[str, int] = field(default_factory=dict)
    add_bos: bool = False
    add_eos: bool = False
    add_space_prefix: bool | None = None
    chat_template: str | None = None
    notes: list[str] = field(default_factory=list)

    def write(self, w: gguf.GGUFWriter) -> None:
        w.add_tokenizer_model(self.model)
        if self.pre is not None:
            w.add_tokenizer_pre(self.pre)
        w.add_token_list(self.tokens)
        w.add_token_types(self.token_types)
        if self.scores is not None:
            w.add_token_scores(self.scores)
        if self.merges:
            w.add_token_merges(self.merges)
        for kind, tid in self.special_ids.items():
            getattr(w, f"add_{kind}_token_id")(tid)
        w.add_add_bos_token(self.add_bos)
        w.add_add_eos_token(self.add_eos)
        if self.add_space_prefix is not None:
            w.add_add_space_prefix(self.add_space_prefix)
        if self.chat_template:
            w.add_chat_template(self.chat_template)


def _pre_tokenizer_name(tj: dict[str, Any]) -> tuple[str, str | None]:
    """(llama.cpp pre-tokenizer name, a note if we had to guess)."""
    pre = tj.get("pre_tokenizer") or {}
    parts = pre.get("pretokenizers", [pre]) if pre.get("type") == "Sequence" else [pre]
    types = [p.get("type") for p in parts]
    for p in parts:
        if p.get("type") == "Split":
            pattern = (p.get("pattern") or {}).get("Regex")
            if pattern in KNOWN_SPLITS:
                return KNOWN_SPLITS[pattern], None
            return (
                "default",
                "its pre-tokenizer split regex is not one llama.cpp is known to name; 'default' was written",
            )
    if types == ["ByteLevel"] and parts[0].get("use_regex", True):
        return "gpt-2", None
    if types == ["Digits", "ByteLevel"] and parts[0].get("individual_digits"):
        return "smollm", None
    return (
        "default",
        f"its pre-tokenizer ({'+'.join(str(t) for t in types)}) has no llama.cpp name; 'default' was written",
    )


def _merge_strings(merges: list[Any]) -> list[str]:
    out = []
    for m in merges:
        if isinstance(m, str):
            out.append(m)
        else:
            # A space inside a token cannot be written in "a b" form; llama.cpp reads it shifted by 256.
            out.append(" ".join("".join(chr(ord(c) + 256) if c == " " else c for c in part) for part in m))
    return out


def _adds_token(tokenizer: Any, token_id: int | None, first: bool) -> bool:
    if token_id is None:
        return False
    ids = tokenizer("a", add_special_tokens=True)["input_ids"]
    return bool(ids) and (ids[0] if first else ids[-1]) == token_id


def vocab_metadata(
    tokenizer: Any, vocab_size: int, *, chat_template: str | None = None, source_gguf_pre: str | None = None
) -> VocabMetadata:
    """llama.cpp tokenizer metadata for a fast Hugging Face tokenizer and a model with ``vocab_size`` rows."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise ModelError("GGUF export needs a fast (tokenizer.json) tokenizer; this model has only a slow one.")
    tj = json.loads(backend.to_str())
    model = tj.get("model") or {}
    if model.get("type") != "BPE":
        raise ModelError(
            f"GGUF export: a {model.get('type')} tokenizer is not supported yet (BPE tokenizers are: Llama, Mistral, "
            "Qwen2, SmolLM)."
        )
    spm = bool(model.get("byte_fallback"))
    vocab = tokenizer.get_vocab()
    if max(vocab.values()) >= vocab_size:
        raise ModelError(
            f"GGUF export: the tokenizer has ids up to {max(vocab.values())} but the model only {vocab_size} rows."
        )
    by_id = {i: t for t, i in vocab.items()}
    added = {t.content: t for t in getattr(tokenizer, "added_tokens_decoder", {}).values()}
    tokens: list[str] = []
    types: list[int] = []
    for i in range(vocab_size):
        tok = by_id.get(i)
        if tok is None:
            ttype = gguf.TokenType.UNUSED
        elif spm and _BYTE_TOKEN.match(tok):  # byte fallback pieces, however the tokenizer lists them
            ttype = gguf.TokenType.BYTE
        elif spm and tok == tokenizer.unk_token:
            ttype = gguf.TokenType.UNKNOWN
        elif tok in added:
            ttype = gguf.TokenType.CONTROL if added[tok].special else gguf.TokenType.USER_DEFINED
        else:
            ttype = gguf.TokenType.NORMAL
        tokens.append(f"[PAD{i}]" if tok is None else tok)
        types.append(ttype)

    special_ids = {}
    for kind in ("bos", "eos", "unk", "pad"):
        tid = getattr(tokenizer, f"{kind}_token_id", None)
        if isinstance(tid, int) and 0 <= tid < vocab_size:
            special_ids[kind] = tid
    meta = VocabMetadata(
        model="llama" if spm else "gpt2",
        pre=None,
        tokens=tokens,
        token_types=[int(t) for t in types],
        special_ids=special_ids,
        add_bos=_adds_token(tokenizer, special_ids.get("bos"), True),
        add_eos=_adds_token(tokenizer, special_ids.get("eos"), False),
        chat_template=chat_template,
    )
    merges = model.get("merges") or []
    if spm:
        rank = {}
        for k, m in enumerate(merges):
            a, b = m.split(" ", 1) if isinstance(m, str) else m
            rank.setdefault(a + b, k)
        meta.scores = [-float(rank[t]) if t in rank else 0.0 for t in tokens]
        meta.add_space_prefix = _prepends_space(tj)
    else:
        meta.merges = _merge_strings(merges)
        if source_gguf_pre:
            meta.pre = source_gguf_pre
        else:
            meta.pre, note = _pre_tokenizer_name(tj)
            if note:
                meta.notes.append(
                    f"tokenizer: {note}; llama.cpp may split text slightly differently than transformers."
                )
    return meta


def _prepends_space(tj: dict[str, Any]) -> bool:
    """Whether a sentencepiece-style tokenizer puts '▁' before the text (Llama 2 and Mistral do)."""

    def walk(node: Any) -> bool:
        if isinstance(node, dict):
            if node.get("type") == "Prepend" and node.get("prepend") == "\u2581":
                return True
            if node.get("type") == "Metaspace" and node.get("prepend_scheme", "always") != "never":
                return True
            return any(walk(v) for v in node.values())
        if isinstance(node, list):
            return any(walk(v) for v in node)
        return False

    return walk(tj.get("normalizer")) or walk(tj.get("pre_tokenizer"))


_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}


def read_gguf_scalars(path: str | Path, keys: set[str]) -> dict[str, Any]:
    """Scalar and string metadata values of a GGUF file, read straight from its header.

    ``gguf.GGUFReader`` builds every array (a 50k-token vocabulary takes seconds); this walks past
    arrays and returns only ``keys``.
    """
    out: dict[str, Any] = {}
    with open(path, "rb") as fh, mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as buf:
        if buf[:4] != b"GGUF":
            raise ValueError(f"{path}: not a GGUF file")
        (version,) = struct.unpack_from("<I", buf, 4)
        if version < 2:
            raise ValueError(f"{path}: GGUF version {version} is too old")
        (n_kv,) = struct.unpack_from("<Q", buf, 16)
        pos = 24

        def string(p: int) -> tuple[str, int]:
            (n,) = struct.unpack_from("<Q", buf, p)
            return bytes(buf[p + 8 : p + 8 + n]).decode("utf-8", errors="replace"), p + 8 + n

        def skip(vtype: int, p: int) -> int:
            if vtype in _SCALARS:
                return p + struct.calcsize(_SCALARS[vtype])
            if vtype == 8:
                (n,) = struct.unpack_from("<Q", buf, p)
                return p + 8 + n
            if vtype == 9:
                etype, count = struct.unpack_from("<IQ", buf, p)
                p += 12
                if etype in _SCALARS:
                    return p + count * struct.calcsize(_SCALARS[etype])
                for _ in range(count):
                    p = skip(etype, p)
                return p
            raise ValueError(f"{path}: unknown GGUF value type {vtype}")

        for _ in range(n_kv):
            key, pos = string(pos)
            (vtype,) = struct.unpack_from("<I", buf, pos)
            pos += 4
            if key in keys and vtype in _SCALARS:
                (out[key],) = struct.unpack_from(_SCALARS[vtype], buf, pos)
            elif key in keys and vtype == 8:
                out[key], _ = string(pos)
            pos = skip(vtype, pos)
            if len(out) == len(keys):
                break
    return out


def source_gguf_pre(gguf_path: str | None) -> str | None:
    """The ``tokenizer.ggml.pre`` of the GGUF file a base model came from, if it has one."""
    if not gguf_path:
        return None
    try:
        return read_gguf_scalars(gguf_path, {"tokenizer.ggml.pre"}).get("tokenizer.ggml.pre")
    except (OSError, ValueError):
        return None
