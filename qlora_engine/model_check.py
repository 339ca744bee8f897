"""Is a model folder whole? Checked from its files' headers before anything loads.

A damaged download or a hand-assembled folder fails late and obscurely when loaded (a
``SafetensorError`` deep in transformers) or, worse, not at all: transformers initializes a
parameter missing from the weight files at random with only a log warning, so a folder
without its embedding weights trains on random embeddings. :func:`folder_problems` reads
only headers and small JSON files and returns every problem, each naming its file:

- ``config.json``: present, UTF-8 JSON, an object naming a ``model_type``;
- the tokenizer: its JSON files parse, and there is a tokenizer at all;
- each ``*.safetensors`` file: its header (an 8-byte length and a JSON table of tensors)
  is sane and every tensor's byte range lies inside the file, and the file is exactly as long
  as the table says (a truncated or padded copy is refused);
- a sharded folder's index names only files that exist;
- every parameter the architecture needs is in some weight file: the names are compared with
  a model built on the meta device (no memory, no weights) from ``config.json``. Tied weights
  count as present when any of their names is.

``inspect-model`` reports the same list, so it never calls a damaged model usable.
"""

from __future__ import annotations

import json
import math
import re
import struct
from pathlib import Path
from typing import Any

import torch
from transformers import AutoConfig

from qlora_engine.errors import ModelError, Problem

MAX_HEADER_BYTES = 100 << 20  # the safetensors format's own limit
_DTYPE_BYTES = {
    "BOOL": 1, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E5M2": 1, "F8_E8M0": 1,
    "I16": 2, "U16": 2, "F16": 2, "BF16": 2,
    "I32": 4, "U32": 4, "F32": 4,
    "I64": 8, "U64": 8, "F64": 8,
}  # fmt: skip
SHOW = 3  # names listed in one problem


def _json_file(path: Path, problems: list[Problem], what: str) -> Any:
    """The parsed JSON of ``path``, or None with a problem naming the file (and line)."""
    try:
        text = path.read_bytes().decode("utf-8-sig")
        return json.loads(text)
    except UnicodeDecodeError as e:
        problems.append(Problem(f"{what} is not UTF-8 text (byte {e.start}); the file is damaged.", file=str(path)))
    except json.JSONDecodeError as e:
        problems.append(
            Problem(
                f"{what} is not valid JSON ({e.msg} at column {e.colno}); the file is damaged.",
                file=str(path),
                line=e.lineno,
            )
        )
    except RecursionError:
        problems.append(Problem(f"{what} is nested too deeply to read.", file=str(path)))
    except OSError as e:
        problems.append(Problem(f"{what} cannot be read ({e.strerror or e}).", file=str(path)))
    return None


def safetensors_names(path: Path) -> tuple[set[str], Problem | None]:
    """The tensor names in a safetensors file's header, or a problem saying why it is damaged."""

    def bad(why: str) -> tuple[set[str], Problem]:
        return set(), Problem(
            f"damaged safetensors file: {why}.", file=str(path), fix="Download or convert the model again."
        )

    try:
        size = path.stat().st_size
        with open(path, "rb") as fh:
            head = fh.read(8)
            if len(head) < 8:
                return bad(f"{size} bytes, shorter than its 8-byte header length")
            (n,) = struct.unpack("<Q", head)
            if n > MAX_HEADER_BYTES or n > size - 8:
                return bad(f"the header claims {n:,} bytes but the file has {size:,}")
            raw = fh.read(n)
    except OSError as e:
        return set(), Problem(f"cannot be read ({e.strerror or e}).", file=str(path))
    try:
        table = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError):
        return bad("its header is not valid JSON")
    if not isinstance(table, dict):
        return bad("its header is not a table of tensors")
    data_bytes = size - 8 - n
    end_max = 0
    names = set()
    for name, info in table.items():
        if name == "__metadata__":
            continue
        try:
            begin, end = (int(x) for x in info["data_offsets"])
            width = _DTYPE_BYTES[info["dtype"]]
            count = math.prod(int(d) for d in info["shape"])
        except (KeyError, TypeError, ValueError):
            return bad(f"the entry of tensor {name[:80]!r} is malformed")
        if not 0 <= begin <= end <= data_bytes or end - begin != count * width:
            return bad(f"tensor {name[:80]!r} lies outside the file or does not match its shape (truncated?)")
        end_max = max(end_max, end)
        names.add(name)
    if end_max != data_bytes:
        return bad(f"{data_bytes - end_max:,} bytes more than its tensors hold")
    return names, None


def _expected_groups(config: Any, trust_remote_code: bool) -> tuple[list[list[str]], str]:
    """The architecture's persistent tensors, grouped by tied aliases (built on the meta device)."""
    # lazy: the auto model classes cost seconds; only this tensor comparison builds a model
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
    groups: dict[int, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        groups.setdefault(id(p), []).append(name)
    persistent = set(model.state_dict())
    for name, b in model.named_buffers(remove_duplicate=False):
        if name in persistent:
            groups.setdefault(id(b), []).append(name)
    ignore = [str(k) for k in (getattr(model, "_keys_to_ignore_on_load_missing", None) or [])]
    out = [names for names in groups.values() if not any(_matches(n, ignore) for n in names)]
    return out, getattr(model, "base_model_prefix", "") or ""


def _matches(name: str, patterns: list[str]) -> bool:
    return any(re.search(p, name) for p in patterns)


def folder_problems(folder: Path, *, config: Any = None, trust_remote_code: bool = False) -> list[Problem]:
    """Every problem of a local Hugging Face model folder (see the module docstring); [] if whole.

    Args:
        config: the folder's transformers config if already read (None: read it here).
    """
    problems: list[Problem] = []
    config_file = folder / "config.json"
    if not config_file.exists():
        problems.append(Problem("no config.json: not a Hugging Face model folder.", file=str(folder)))
    else:
        cfg_json = _json_file(config_file, problems, "config.json")
        if cfg_json is not None and not (isinstance(cfg_json, dict) and isinstance(cfg_json.get("model_type"), str)):
            problems.append(Problem("config.json names no model_type; the file is damaged.", file=str(config_file)))
    files = [p for p in folder.iterdir() if p.is_file()]
    tokenizer_files = [p for p in files if p.name.startswith(("tokenizer", "vocab", "merges", "special_tokens"))]
    for p in tokenizer_files:
        if p.suffix == ".json":
            _json_file(p, problems, p.name)
    tokenizer_names = ("tokenizer.json", "tokenizer.model", "vocab.json", "vocab.txt", "spiece.model")
    if not any(p.name in tokenizer_names for p in tokenizer_files):
        problems.append(Problem("no tokenizer files (tokenizer.json, tokenizer.model or vocab.json).", file=str(folder)))
    weight_files = sorted(p for p in files if p.name.endswith(".safetensors"))
    present: set[str] = set()
    for p in weight_files:
        names, problem = safetensors_names(p)
        if problem is not None:
            problems.append(problem)
        present |= names
    index = folder / "model.safetensors.index.json"
    if index.exists():
        table = _json_file(index, problems, index.name)
        wanted = (
            sorted({str(v) for v in (table or {}).get("weight_map", {}).values()}) if isinstance(table, dict) else []
        )
        missing_files = [w for w in wanted if not (folder / w).is_file()]
        if missing_files:
            problems.append(
                Problem(
                    f"the index names weight files that are missing: {', '.join(missing_files[:SHOW])}.",
                    file=str(index),
                )
            )
    if problems or not weight_files:
        return problems  # the tensor comparison needs a readable config and whole weight files
    if config is None:
        try:
            config = AutoConfig.from_pretrained(folder, trust_remote_code=trust_remote_code)
        except Exception:  # the caller reports an unreadable config its own way
            return problems
    try:
        groups, prefix = _expected_groups(config, trust_remote_code)
    except Exception:  # an architecture transformers cannot build: nothing to compare against
        return problems
    stripped = {n.removeprefix(prefix + ".") for n in present} if prefix else present

    def found(name: str) -> bool:
        return name in present or (bool(prefix) and name.removeprefix(prefix + ".") in stripped)

    missing = [names[0] for names in groups if not any(found(n) for n in names)]
    if missing:
        more = f" and {len(missing) - SHOW} more" if len(missing) > SHOW else ""
        problems.append(
            Problem(
                f"the weight files lack {len(missing)} tensor(s) the architecture needs: "
                f"{', '.join(missing[:SHOW])}{more}; loading would fill them with random values.",
                file=str(folder),
                fix="Download or convert the model again; every weight file of the model must be in the folder.",
            )
        )
    return problems


def check_model_folder(folder: Path, *, config: Any = None, trust_remote_code: bool = False) -> None:
    """Raise a :class:`ModelError` listing every problem of ``folder`` (none: return)."""
    problems = folder_problems(folder, config=config, trust_remote_code=trust_remote_code)
    if problems:
        first = problems[0]
        fix = first.fix or "Download or convert the model again."
        raise ModelError(first.what, file=first.file, line=first.line, fix=fix, problems=problems)
