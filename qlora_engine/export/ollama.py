"""The Ollama ``Modelfile``: the model file, the chat template in Go-template form, and stop tokens.

Ollama formats chats with Go templates, while models ship Jinja templates. Rather than
translating Jinja, we learn the template's shape by rendering probe conversations with marker
texts through it: the text before and after each role's content, a default system block the
template adds when there is none, the generation prompt. From those pieces we write a Go
template, and we check the shape by re-rendering other conversations both ways (the Jinja
template and a Python rendering of the same pieces). A template whose output the pieces
cannot reproduce (system text folded into the first user turn, say) gets no TEMPLATE line:
Ollama then falls back to the chat template stored in the GGUF file, and a warning says so.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

_S, _U1, _A1, _U2 = "QSSYSMARK", "QSUSERONE", "QSASSTONE", "QSUSERTWO"


@dataclass
class TurnFormat:
    lead: str
    """Text at the very start (a BOS written by the template)."""
    default_system: str
    """The system block the template adds when the conversation has none ('' if none)."""
    prefix: dict[str, str]
    suffix: dict[str, str]
    generation: str

    def render(self, messages: list[dict[str, str]], generation: bool) -> str:
        """What the Go template produces, rendered in Python (used to check the pieces)."""
        out = self.lead
        if not any(m["role"] == "system" for m in messages):
            out += self.default_system
        for m in messages:
            out += self.prefix[m["role"]] + m["content"] + self.suffix[m["role"]]
        if generation and messages[-1]["role"] != "assistant":
            out += self.generation
        return out

    def go_template(self) -> str:
        lines = [
            '{{- $system := false }}{{- $last := "" }}',
            '{{- range .Messages }}{{- if eq .Role "system" }}{{- $system = true }}{{- end }}{{- $last = .Role }}{{- end }}',
        ]
        if self.lead:
            lines.append("{{- " + _go_str(self.lead) + " }}")
        if self.default_system:
            lines.append("{{- if not $system }}{{ " + _go_str(self.default_system) + " }}{{ end }}")
        lines.append("{{- range .Messages }}")
        for i, role in enumerate(("system", "user", "assistant")):
            kw = "else if" if i else "if"
            lines.append(
                f'{{{{- {kw} eq .Role "{role}" }}}}{_go_piece(self.prefix[role])}{{{{ .Content }}}}{_go_piece(self.suffix[role])}'
            )
        lines += ["{{- end }}", "{{- end }}"]
        if self.generation:
            lines.append('{{- if ne $last "assistant" }}' + _go_piece(self.generation) + "{{ end }}")
        return "\n".join(lines)


def _go_str(s: str) -> str:
    """A Go string literal (JSON's escaping is valid Go: \\n, \\", \\\\, \\uXXXX)."""
    return json.dumps(s, ensure_ascii=False)


def _go_piece(s: str) -> str:
    return "{{ " + _go_str(s) + " }}" if s else ""


def _between(text: str, start: str | None, end: str | None) -> str:
    i = 0 if start is None else text.index(start) + len(start)
    j = len(text) if end is None else text.index(end, i)
    return text[i:j]


def derive_turn_format(render: Any, bos: str | None = None) -> TurnFormat | None:
    """The pieces of a chat template, or None if its output cannot be rebuilt from pieces.

    ``render(messages, generation)`` renders the Jinja template.
    """
    u1, a1, u2, s = (
        {"role": r, "content": c} for r, c in (("user", _U1), ("assistant", _A1), ("user", _U2), ("system", _S))
    )
    try:
        full = render([u1, a1, u2], False)
        gen = render([u1, a1, u2], True)
        with_sys = render([s, u1, a1], False)
    except Exception:
        return None
    try:
        between_a_u = _between(full, _A1, _U2)  # assistant suffix + user prefix
        head = _between(full, None, _U1)
        user_suffix_and_assistant_prefix = _between(full, _U1, _A1)
        generation = gen[len(full) :] if gen.startswith(full) else None
        if generation is None:
            return None
        sys_head = _between(with_sys, None, _S)
        sys_to_user = _between(with_sys, _S, _U1)
    except ValueError:
        return None
    # Split "user suffix + assistant prefix" using the generation prompt (= the assistant prefix).
    if not user_suffix_and_assistant_prefix.endswith(generation):
        return None
    user_suffix = user_suffix_and_assistant_prefix[: len(user_suffix_and_assistant_prefix) - len(generation)]
    # Split "assistant suffix + user prefix" (between A1 and U2): the user prefix must also end the text
    # before the first user turn, with and without a system message. Several splits can fit those texts;
    # those whose pieces re-render every probe conversation exactly are candidates.
    found: list[TurnFormat] = []
    for k in range(len(between_a_u) + 1):
        a_suffix, u_prefix = between_a_u[:k], between_a_u[k:]
        if not (head.endswith(u_prefix) and sys_to_user.endswith(u_prefix)):
            continue
        first_extra = head[: len(head) - len(u_prefix)]
        system_suffix = sys_to_user[: len(sys_to_user) - len(u_prefix)]
        for lead in ([bos] if bos else []) + [""]:
            if not sys_head.startswith(lead) or not first_extra.startswith(lead):
                continue
            fmt = TurnFormat(
                lead=lead,
                default_system=first_extra[len(lead) :],
                prefix={"system": sys_head[len(lead) :], "user": u_prefix, "assistant": generation},
                suffix={"system": system_suffix, "user": user_suffix, "assistant": a_suffix},
                generation=generation,
            )
            if _reproduces(fmt, render):
                found.append(fmt)
    # Prefer the reading where a system turn is shaped like a user turn (a BOS then goes to `lead`).
    natural = [f for f in found if f.prefix["system"].replace("system", "user") == f.prefix["user"]]
    return (natural or found or [None])[0]


def _reproduces(fmt: TurnFormat, render: Any) -> bool:
    convs = [
        ([{"role": "user", "content": "Hi there"}], True),
        ([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}], True),
        (
            [
                {"role": "system", "content": "S"},
                {"role": "user", "content": "one"},
                {"role": "assistant", "content": "two"},
                {"role": "user", "content": "three"},
            ],
            True,
        ),
        ([{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}], False),
        (
            [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}, {"role": "user", "content": "z"}],
            True,
        ),
    ]
    try:
        return all(render(m, g) == fmt.render(m, g) for m, g in convs)
    except Exception:
        return False


def stop_tokens(fmt: TurnFormat | None, tokenizer: Any) -> list[str]:
    """EOS, plus the special tokens that end an assistant turn or start the next one."""
    specials = [t for t in (getattr(tokenizer, "all_special_tokens", None) or []) if t]
    specials += [t for t in tokenizer.get_added_vocab() if t not in specials]
    stops: list[str] = []
    if isinstance(tokenizer.eos_token, str):
        stops.append(tokenizer.eos_token)
    if fmt is not None:
        for piece in (fmt.suffix["assistant"], fmt.prefix["user"]):
            for tok in sorted(specials, key=lambda t: piece.find(t) if t in piece else 1 << 30):
                if tok in piece and tok not in stops:
                    stops.append(tok)
    return stops


def _adds_bos(tokenizer: Any) -> bool:
    try:
        ids = tokenizer("a", add_special_tokens=True)["input_ids"]
    except Exception:
        return False
    return bool(ids) and ids[0] == getattr(tokenizer, "bos_token_id", None)


def modelfile(
    model_file: str,
    tokenizer: Any,
    template: str | None,
    *,
    name: str,
    adapter_file: str | None = None,
    file_name: str = "Modelfile",
) -> tuple[str, list[str]]:
    """The Modelfile text and warnings.

    ``model_file``: a file name beside the Modelfile (written ``./name``, so the folder can move), or an
    absolute path. ``template``: the Jinja chat template (None: a plain text model, whose prompt goes in
    as is). ``file_name``: what this Modelfile is called, for the ``ollama create`` line in its header.
    """
    warnings: list[str] = []
    fmt = None
    if template:
        bos = tokenizer.bos_token if isinstance(tokenizer.bos_token, str) else None

        def render(messages: list[dict[str, str]], generation: bool) -> str:
            return tokenizer.apply_chat_template(
                messages, chat_template=template, tokenize=False, add_generation_prompt=generation
            )

        fmt = derive_turn_format(render, bos)
        if fmt is not None and bos and fmt.lead == bos and _adds_bos(tokenizer):
            # The runtime tokenizer adds BOS itself (tokenizer.ggml.add_bos_token): writing it again would double it.
            fmt.lead = ""
        if fmt is None:
            warnings.append(
                "the chat template could not be rewritten as an Ollama (Go) template; the Modelfile has no TEMPLATE "
                "line, so Ollama will use the template stored in the GGUF file if it recognizes it."
            )
    lines = [
        f"# Ollama Modelfile for {name}, written by QLoRA Studio.",
        f"# Create the model with:  ollama create {name} -f {file_name}",
        f"FROM {model_file if Path(model_file).is_absolute() else './' + model_file}",
    ]
    if adapter_file:
        lines.append(f"ADAPTER ./{adapter_file}")
    if fmt is not None:
        lines.append('TEMPLATE """' + fmt.go_template() + '"""')
    elif not template:
        lines.append('TEMPLATE """{{ .Prompt }}"""')
    lines += [f"PARAMETER stop {json.dumps(stop, ensure_ascii=False)}" for stop in stop_tokens(fmt, tokenizer)]
    return "\n".join(lines) + "\n", warnings
