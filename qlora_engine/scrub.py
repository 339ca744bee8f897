"""Hub tokens never reach a file: the one scrubber every writer of the engine goes through.

A token can reach the engine five ways: the ``HF_TOKEN`` / ``HUGGING_FACE_HUB_TOKEN``
environment variables, the config's ``model.token`` field (in the YAML or as a
``model.token=...`` override on the command line), and inside the model reference (a URL
with credentials, ``https://user:TOKEN@huggingface.co/org/name``, or ``?token=TOKEN``).
:func:`scrub` replaces all of them, plus anything shaped like a Hugging Face token, with
``hf_***``. Values that came from the config are learnt by :func:`remember_config`, which
the run, the export and the CLI call as soon as they hold a config.

What goes through it: events (:meth:`qlora_engine.events.Event.to_json`), error logs, the
run's ``config.yaml``, ``trainer_state.json``, and every folder written by
:func:`qlora_engine.checkpoint.write_atomic_folder` (checkpoints, the adapter, exports),
which :func:`scrub_tree` cleans before the folder is renamed into place: that also catches
files third-party code writes (peft's ``adapter_config.json`` and ``README.md``, which name
the base model by its reference).
"""

from __future__ import annotations

import json
import os
import re
import threading
from pathlib import Path
from typing import Any

MASK = "hf_***"
TOKEN_VARIABLES = ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HUGGINGFACE_HUB_TOKEN")
_TOKEN_PATTERN = re.compile(r"(?<![A-Za-z0-9])hf_[A-Za-z0-9]{20,}")
# user:password@ in a URL (the password is the token; a user alone can be the token too)
_URL_CREDENTIALS = re.compile(r"(?P<scheme>\b[a-zA-Z][a-zA-Z0-9+.-]*://)(?P<cred>[^/@\s]+)@")
_QUERY_TOKEN = re.compile(r"(?P<key>[?&](?:token|access_token|api_key|auth)=)(?P<value>[^&\s#\"']+)", re.IGNORECASE)
_MIN_SECRET = 8  # shorter values could be part of a number or a word: never replace those

_known: set[str] = set()
_names: set[str] = set()  # token-shaped folder names of a local model path: names, not secrets
_lock = threading.Lock()

# Files scrubbed as text; any other file is scanned in its first HEADER_BYTES only (where
# safetensors and GGUF keep their metadata), with same-length replacements so it stays valid.
TEXT_SUFFIXES = {".json", ".jsonl", ".yaml", ".yml", ".md", ".txt", ".log", ".jinja", ".cfg", ".lora", ""}
HEADER_BYTES = 16 << 20


def remember(value: str | None) -> None:
    """Treat ``value`` as a secret from now on (in this process)."""
    if value and isinstance(value, str):
        value = value.strip()
        if len(value) >= _MIN_SECRET and value != MASK:
            with _lock:
                _known.add(value)


def ref_tokens(ref: str | None) -> list[str]:
    """The tokens inside a model reference: URL credentials and ``token=`` query values."""
    if not ref:
        return []
    found = []
    for m in _URL_CREDENTIALS.finditer(ref):
        found += [part for part in m.group("cred").split(":") if part]
    found += [m.group("value") for m in _QUERY_TOKEN.finditer(ref)]
    return [t for t in found if len(t) >= _MIN_SECRET]


def remember_config(cfg: Any) -> None:
    """Learn the secrets a config carries (``model.token`` and tokens inside ``model.ref``)."""
    model = getattr(cfg, "model", None)
    if model is None:
        return
    remember(getattr(model, "token", None))
    ref = getattr(model, "ref", None)
    for t in ref_tokens(ref):
        remember(t)
    if ref and isinstance(ref, str) and Path(ref).expanduser().exists():
        with _lock:  # a real token in the path is still masked: known secrets go before the shape
            _names.update(_TOKEN_PATTERN.findall(ref))


def known_secrets() -> list[str]:
    values = [os.environ.get(name, "").strip() for name in TOKEN_VARIABLES]
    with _lock:
        values += list(_known)
    # longest first: a token that contains another is replaced whole
    return sorted({v for v in values if len(v) >= _MIN_SECRET and v != MASK}, key=len, reverse=True)


def is_masked(value: str | None) -> bool:
    """True for a value the scrubber wrote (a token field read back from a scrubbed file)."""
    return bool(value) and MASK in str(value)


def scrub(text: str) -> str:
    """``text`` with every known token, URL credential and token-shaped string replaced by ``hf_***``."""
    if not text:
        return text
    for value in known_secrets():
        if value in text:
            text = text.replace(value, MASK)
    text = _URL_CREDENTIALS.sub(lambda m: m.group("scheme") + MASK + "@", text)
    text = _QUERY_TOKEN.sub(lambda m: m.group("key") + MASK, text)
    return _TOKEN_PATTERN.sub(lambda m: m.group() if m.group() in _names else MASK, text)


def scrub_data(obj: Any) -> Any:
    """A copy of plain data (dicts, lists, strings) with every string scrubbed."""
    if isinstance(obj, str):
        return scrub(obj)
    if isinstance(obj, dict):
        return {scrub(k) if isinstance(k, str) else k: scrub_data(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(scrub_data(v) for v in obj) if isinstance(obj, list) else tuple(scrub_data(v) for v in obj)
    return obj


def print_json(obj: Any) -> None:
    """``--json`` output on stdout, scrubbed like every file the engine writes (it is often redirected to one)."""
    print(json.dumps(scrub_data(obj), indent=2, ensure_ascii=False, default=str))


def write_text(path: Path, text: str) -> None:
    """Write ``text`` (scrubbed) to ``path`` as UTF-8."""
    Path(path).write_text(scrub(text), encoding="utf-8")


def scrub_file(path: Path) -> bool:
    """Scrub one file in place; True if it changed.

    Text files are scrubbed whole. Other files (weights) only in their first
    :data:`HEADER_BYTES`, where their metadata lives, each match overwritten by as many ``*``
    so every offset stays valid.
    """
    path = Path(path)
    if path.suffix.lower() in TEXT_SUFFIXES or path.name == "Modelfile":
        try:
            raw = path.read_bytes()
            text = raw.decode("utf-8")
        except (OSError, UnicodeDecodeError):
            return _scrub_binary(path)
        clean = scrub(text)
        if clean != text:
            path.write_text(clean, encoding="utf-8")
            return True
        return False
    return _scrub_binary(path)


def _scrub_binary(path: Path) -> bool:
    with _lock:
        names = {n.encode() for n in _names}
    shape = re.compile(_TOKEN_PATTERN.pattern.encode())
    changed = False
    with open(path, "r+b") as fh:
        head = fh.read(HEADER_BYTES)
        for pat in [*(re.compile(re.escape(v.encode())) for v in known_secrets()), shape]:
            for m in pat.finditer(head):
                if pat is shape and m.group() in names:
                    continue  # a folder of the model's path, as in the text files
                fh.seek(m.start())
                fh.write(b"*" * (m.end() - m.start()))
                changed = True
    return changed


def scrub_tree(folder: Path) -> list[Path]:
    """Scrub every file under ``folder`` in place; the files that changed."""
    return [p for p in sorted(Path(folder).rglob("*")) if p.is_file() and not p.is_symlink() and scrub_file(p)]
