"""Row formats: detect which one a file holds (with evidence), map columns, normalize rows.

Every format becomes one of three shapes before tokenization:

* :class:`TextSample`: raw text, trained on every token;
* :class:`ChatSample`: a list of ``{"role", "content"}`` turns rendered by the chat template,
  with a flag per turn saying whether its tokens carry loss and, where the data gives any, the
  loss weights of its answers (a turn's ``weight``, and a ``weight`` on its content parts);
* :class:`PromptCompletion`: a prompt (no loss) and a completion (loss), tokenized as is.

A row that cannot be used raises :class:`BadRow` with a short reason; the loader counts
reasons and shows the first few places for each.
"""

from __future__ import annotations

import json
import math
from collections import Counter
from dataclasses import dataclass
from typing import Any

from qlora_engine.config_sections import DATA_FIELDS
from qlora_engine.errors import DataError

FORMATS = ("text", "alpaca", "chat", "sharegpt", "prompt_completion")
TURN_FIELDS = ("role", "content", "from", "value")
ACCEPTED_FORMATS = (
    "text ('text'), alpaca ('instruction', optional 'input', 'output'), chat ('messages': a list of "
    "'role'/'content' turns), sharegpt ('conversations': a list of 'from'/'value' turns), "
    "prompt_completion ('prompt', 'completion')"
)
# Role names seen in the wild, mapped to the roles chat templates know.
ROLES = {
    "system": "system",
    "user": "user",
    "human": "user",
    "assistant": "assistant",
    "gpt": "assistant",
    "model": "assistant",
    "bot": "assistant",
    "chatgpt": "assistant",
    "tool": "tool",
    "function": "tool",
    "observation": "tool",
    "ipython": "tool",
}
DETECT_ROWS = 200  # rows examined to detect the format: enough to see past a few odd rows, instant to read


class BadRow(Exception):
    """This row cannot be used; the message is the reason, short enough to group by."""


@dataclass
class TextSample:
    text: str


Segments = tuple[tuple[int, float], ...]
"""Content parts' loss weights: ``(end, weight)`` pairs over the content, in order."""


@dataclass(frozen=True)
class AnswerWeights:
    """An answer's loss weights: the turn's, and its parts' (each times the turn's; none: all 1)."""

    turn: float = 1.0
    parts: Segments = ()


@dataclass
class ChatSample:
    messages: list[dict[str, str]]
    train: list[bool]
    weights: list[AnswerWeights | None] | None = None
    """Per message, its answer's weights where any is not 1; None when no message has any."""


@dataclass
class PromptCompletion:
    prompt: str
    completion: str


Sample = TextSample | ChatSample | PromptCompletion


# -- columns ----------------------------------------------------------------------------------


def check_columns(columns: dict[str, str]) -> None:
    known = sorted({f for fs in DATA_FIELDS.values() for f in fs} | set(TURN_FIELDS))
    for ours, theirs in columns.items():
        if ours not in known:
            raise DataError(
                f"{ours!r} is not a field we read; map one of {', '.join(known)} to your column name, "
                f"e.g. {{instruction: question, output: answer}}.",
                field="data.columns",
            )
        if not isinstance(theirs, str) or not theirs:
            raise DataError("name the column of your data that holds it.", field=f"data.columns.{ours}")


def map_columns(row: dict[str, Any], columns: dict[str, str]) -> dict[str, Any]:
    """Rename the user's columns to ours (outer fields and the keys inside turns)."""
    if not columns:
        return row
    out = dict(row)
    for ours, theirs in columns.items():
        if ours in TURN_FIELDS or theirs not in row:
            continue
        out[ours] = row[theirs]
        if theirs != ours and theirs not in columns.values():
            out.pop(theirs, None)
    turn_map = {theirs: ours for ours, theirs in columns.items() if ours in TURN_FIELDS}
    if turn_map:
        for key in ("messages", "conversations"):
            turns = out.get(key)
            if isinstance(turns, list):
                out[key] = [{turn_map.get(k, k): v for k, v in t.items()} if isinstance(t, dict) else t for t in turns]
    return out


# -- detection --------------------------------------------------------------------------------


def _turns_style(value: Any) -> str | None:
    value = _maybe_json_list(value)
    if not isinstance(value, list) or not value or not all(isinstance(t, dict) for t in value):
        return None
    if all("role" in t and "content" in t for t in value):
        return "role/content"
    return "from/value" if all("from" in t and "value" in t for t in value) else None


def _present(row: dict[str, Any], key: str) -> bool:
    """The key is there (possibly empty: an empty field is a bad row of this format, not another format)."""
    return key in row and not isinstance(row[key], (dict, bool))


def matching_formats(row: dict[str, Any]) -> list[str]:
    """The formats this row fits, most specific first."""
    out = []
    if _turns_style(row.get("messages")):
        out.append("chat")
    if _turns_style(row.get("conversations")):
        out.append("sharegpt")
    if _present(row, "instruction") and _present(row, "output"):
        out.append("alpaca")
    if _present(row, "prompt") and _present(row, "completion"):
        out.append("prompt_completion")
    if _present(row, "text"):
        out.append("text")
    return out


def detect_format(rows: list[dict[str, Any]], label: str) -> tuple[str, dict[str, Any]]:
    """Pick the format most rows fit; the evidence says which keys matched in how many rows."""
    keys: Counter[str] = Counter()
    fits: Counter[str] = Counter()
    styles: Counter[str] = Counter()
    for row in rows:
        keys.update(row.keys())
        fits.update(matching_formats(row))
        for key in ("messages", "conversations"):
            style = _turns_style(row.get(key))
            if style:
                styles[f"{key}: {style}"] += 1
    evidence: dict[str, Any] = {
        "rows_examined": len(rows),
        "keys": dict(keys.most_common(20)),
        "rows_fitting": {f: fits[f] for f in FORMATS if fits[f]},
    }
    if styles:
        evidence["turn_keys"] = dict(styles)
    if not fits:
        found = ", ".join(f"{k!r} ({n})" for k, n in keys.most_common(12)) or "no named fields"
        raise DataError(
            f"cannot tell the data format. The first {len(rows)} rows have the keys {found}. "
            f"Accepted formats: {ACCEPTED_FORMATS}.",
            hint="Map your columns to ours with data.columns, e.g. {instruction: question, output: answer}, "
            "or set data.format.",
            file=label,
            field="data.format",
        )
    best = max(FORMATS, key=lambda f: (fits[f], -FORMATS.index(f)))
    evidence["reason"] = f"{_describe(best)} in {fits[best]} of {len(rows)} rows"
    return best, evidence


def _describe(fmt: str) -> str:
    return {
        "text": "'text'",
        "alpaca": "'instruction' and 'output'",
        "chat": "'messages' as a list of role/content turns",
        "sharegpt": "'conversations' as a list of from/value turns",
        "prompt_completion": "'prompt' and 'completion'",
    }[fmt]


# -- normalization ----------------------------------------------------------------------------


def _text(row: dict[str, Any], key: str, *, required: bool = True) -> str:
    v = row.get(key)
    if v is None or (isinstance(v, str) and not v.strip()):
        if required:
            raise BadRow(f"missing or empty {key!r}")
        return ""
    if isinstance(v, bool) or not isinstance(v, (str, int, float)):
        raise BadRow(f"{key!r} is a {type(v).__name__}, not text")
    return str(v)


def _maybe_json_list(value: Any) -> Any:
    """CSV cells hold lists as JSON text; read them back."""
    if isinstance(value, str) and value.lstrip().startswith("["):
        try:
            return json.loads(value)
        except (ValueError, RecursionError):
            return value
    return value


def _weight(value: Any, where: str) -> float:
    """A loss weight: a number >= 0 (OpenAI's fine-tuning data writes 0 or 1; any finite value works)."""
    if isinstance(value, bool):
        return float(value)
    if not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
        raise BadRow(f"{where}: weight must be a number >= 0, not {value!r}")
    return float(value)


def _content(value: Any, where: str = "content", weighed: bool = False) -> tuple[str, Segments | None] | None:
    """The text of a turn's content and, if ``weighed``, its parts' weights (None when none has one).

    OpenAI content parts (``[{"type": "text", "text": ...}]``) are joined as written, with nothing
    between them, as chat templates that take parts render them; a part may carry a ``weight``."""
    if isinstance(value, str):
        return value, None
    if isinstance(value, list):
        texts: list[str] = []
        ends: list[tuple[int, float]] = []
        weighted = False
        for k, p in enumerate(value, 1):
            if not isinstance(p, dict) or not isinstance(p.get("text"), str):
                continue  # an image or another kind of part: not text
            texts.append(p["text"])
            has = weighed and p.get("weight") is not None
            w = _weight(p["weight"], f"{where} part {k}") if has else 1.0
            weighted = weighted or has
            ends.append((sum(map(len, texts)), w))
        if not texts:
            return None
        return "".join(texts), (tuple(ends) if weighted else None)
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value), None
    return None


def _turns(row: dict[str, Any], key: str) -> list[dict[str, Any]]:
    raw = _maybe_json_list(row.get(key))
    if raw is None:
        raise BadRow(f"missing {key!r}")
    if not isinstance(raw, list):
        raise BadRow(f"{key!r} is a {type(raw).__name__}, not a list of turns")
    if not raw:
        raise BadRow(f"{key!r} is empty")
    return raw


def _chat(raw_turns: list[Any], system: str, train_on_prompt: bool, prompt_turns: int = 0) -> ChatSample:
    """Turns as a chat; every assistant turn is trained except the first ``prompt_turns`` turns.

    A turn's ``weight`` (a number >= 0; 0: not trained) scales its answer's loss, and its content
    parts' weights scale theirs."""
    messages: list[dict[str, str]] = []
    train: list[bool] = []
    weights: list[AnswerWeights | None] = []
    if system.strip():
        messages.append({"role": "system", "content": system})
        train.append(train_on_prompt)
        weights.append(None)
    for i, t in enumerate(raw_turns, 1):
        if not isinstance(t, dict):
            raise BadRow(f"turn {i} is a {type(t).__name__}, not an object")
        who = t.get("role", t.get("from"))
        role = ROLES.get(str(who).strip().lower()) if isinstance(who, str) else None
        if role is None:
            raise BadRow(f"turn {i}: unknown role {who!r}" if who is not None else f"turn {i}: no role")
        found = _content(t.get("content", t.get("value")), f"turn {i}", weighed=role == "assistant")
        content, segments = found if found is not None else (None, None)
        if content is None or not content.strip():
            if role == "system":
                continue  # an empty system prompt says nothing; leave it out
            raise BadRow(f"turn {i} ({role}): missing or empty content")
        # Weights matter on answers only (a null one is none); elsewhere they are not read.
        weight = _weight(t["weight"], f"turn {i}") if role == "assistant" and t.get("weight") is not None else 1.0
        messages.append({"role": role, "content": content})
        trained = role == "assistant" and weight != 0 and i > prompt_turns
        train.append(train_on_prompt or trained)
        weighted = trained and (segments is not None or weight != 1)
        weights.append(AnswerWeights(weight, segments or ()) if weighted else None)
    while messages and messages[-1]["role"] != "assistant":
        messages.pop()  # turns after the last answer teach nothing
        train.pop()
        weights.pop()
    if not messages:
        raise BadRow("no assistant turn")
    return ChatSample(messages, train, weights if any(w is not None for w in weights) else None)


def normalize(row: dict[str, Any], fmt: str, train_on_prompt: bool) -> Sample:
    """One row (columns already mapped) as a sample of ``fmt``; :class:`BadRow` if unusable."""
    if fmt == "text":
        return TextSample(_text(row, "text"))
    if fmt == "alpaca":
        instruction = _text(row, "instruction")
        extra = _text(row, "input", required=False)
        output = _text(row, "output")
        user = f"{instruction}\n\n{extra}" if extra.strip() else instruction
        turns = [{"role": "user", "content": user}, {"role": "assistant", "content": output}]
        return _chat(turns, _text(row, "system", required=False), train_on_prompt)
    if fmt in ("chat", "sharegpt"):
        key = "messages" if fmt == "chat" else "conversations"
        return _chat(_turns(row, key), _text(row, "system", required=False), train_on_prompt)
    if fmt == "prompt_completion":
        prompt, completion = _maybe_json_list(row.get("prompt")), _maybe_json_list(row.get("completion"))
        if isinstance(prompt, list) and isinstance(completion, list):
            # Conversational prompt/completion: turns in, assistant turns out.
            return _chat(list(prompt) + list(completion), "", train_on_prompt, prompt_turns=len(prompt))
        return PromptCompletion(_text(row, "prompt"), _text(row, "completion"))
    raise DataError(f"{fmt!r} is not a format we read; accepted: {', '.join(FORMATS)}.", field="data.format")


def preview(sample: Sample) -> dict[str, Any]:
    """A sample as plain data, for ``inspect-data`` without a tokenizer."""
    if isinstance(sample, TextSample):
        return {"text": sample.text}
    if isinstance(sample, PromptCompletion):
        return {"prompt": sample.prompt, "completion": sample.completion}
    weights = sample.weights or [None] * len(sample.messages)
    out = []
    for m, t, w in zip(sample.messages, sample.train, weights, strict=True):
        row: dict[str, Any] = dict(m, trained=t)
        if w is not None:
            row["weight"] = w.turn
            starts = [0] + [end for end, _ in w.parts[:-1]]
            row["parts"] = [
                {"text": m["content"][a:end], "weight": x} for a, (end, x) in zip(starts, w.parts, strict=True)
            ]
        out.append(row)
    return {"messages": out}
