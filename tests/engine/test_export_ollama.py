"""The Ollama Modelfile: its Go template must format chats exactly as the model's Jinja template does.

There is no Go toolchain in the test environment, so a small interpreter of the Go-template
subset the exporter writes (variables, ``range``, ``if/else if``, ``eq/ne/not``, string
literals, trim markers) renders the template text itself, and its output is compared with the
Jinja template's on conversations the exporter never probed.
"""

from __future__ import annotations

import json
import re

import pytest
from transformers.utils.chat_template_utils import _compile_jinja_template

from qlora_engine.export.ollama import derive_turn_format, modelfile, stop_tokens

CHATML = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
CHATML_DEFAULT_SYSTEM = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\\nYou are a careful assistant.<|im_end|>\\n' }}{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
LLAMA3_LIKE = (
    "{{ bos_token }}{% for m in messages %}{{ '<|start_header_id|>' + m['role'] + '<|end_header_id|>\\n\\n' + "
    "m['content'] | trim + '<|eot_id|>' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}"
)
ZEPHYR_LIKE = (
    "{% for m in messages %}{{ '<|' + m['role'] + '|>\\n' + m['content'] + eos_token + '\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% endif %}"
)
LLAMA2_LIKE = (  # the system text goes inside the first user turn: not expressible as per-role pieces
    "{% if messages[0]['role'] == 'system' %}{% set sys = '<<SYS>>\\n' + messages[0]['content'] + '\\n<</SYS>>\\n\\n' %}"
    "{% set msgs = messages[1:] %}{% else %}{% set sys = '' %}{% set msgs = messages %}{% endif %}"
    "{% for m in msgs %}{% if m['role'] == 'user' %}{{ bos_token + '[INST] ' + (sys if loop.first else '') + m['content'] + ' [/INST]' }}"
    "{% else %}{{ ' ' + m['content'] + ' ' + eos_token }}{% endif %}{% endfor %}"
)
SPECIALS = {"bos_token": "<s>", "eos_token": "</s>"}


def jinja(template: str, bos: str = "<s>", eos: str = "</s>"):
    compiled = _compile_jinja_template(template)

    def render(messages, generation):
        return compiled.render(messages=messages, add_generation_prompt=generation, bos_token=bos, eos_token=eos)

    return render


# -- a tiny Go text/template interpreter for the subset the exporter writes ----------------------------

_ACTION = re.compile(r"\{\{(-?)\s*(.*?)\s*(-?)\}\}", re.S)


def _tokens(src: str) -> list[tuple[str, str]]:
    out: list[tuple[str, str]] = []
    pos = 0
    for m in _ACTION.finditer(src):
        text = src[pos : m.start()]
        if m.group(1):
            text = text.rstrip()
        if out and out[-1][0] == "trim_next":
            out.pop()
            text = text.lstrip()
        out.append(("text", text))
        out.append(("action", m.group(2)))
        if m.group(3):
            out.append(("trim_next", ""))
        pos = m.end()
    text = src[pos:]
    if out and out[-1][0] == "trim_next":
        out.pop()
        text = text.lstrip()
    out.append(("text", text))
    return out


def _value(expr: str, dot: dict, env: dict):
    expr = expr.strip()
    if expr.startswith('"'):
        return json.loads(expr)
    if expr in ("true", "false"):
        return expr == "true"
    if expr.startswith("$"):
        return env[expr]
    if expr.startswith("."):
        return dot[expr[1:].lower()]  # .Role, .Content -> the message fields
    raise ValueError(f"unsupported expression {expr!r}")


def _args(s: str) -> list[str]:
    return re.findall(r'"(?:[^"\\]|\\.)*"|\S+', s)


def _cond(expr: str, dot: dict, env: dict) -> bool:
    parts = _args(expr)
    if parts[0] in ("eq", "ne"):
        same = _value(parts[1], dot, env) == _value(parts[2], dot, env)
        return same if parts[0] == "eq" else not same
    if parts[0] == "not":
        return not _value(parts[1], dot, env)
    return bool(_value(expr, dot, env))


def go_render(src: str, messages: list[dict]) -> str:
    toks = _tokens(src)
    env: dict = {}

    def block(i: int, dot: dict, out: list[str], run: bool) -> tuple[int, str]:
        """Run tokens from i until an else/end at this level; return (index of it, its action)."""
        while i < len(toks):
            kind, a = toks[i]
            if kind == "text":
                if run:
                    out.append(a)
                i += 1
                continue
            if a == "end" or a.startswith("else"):
                return i, a
            if a.startswith("range "):
                assert a == "range .Messages"
                if run and messages:
                    for m in messages:
                        end, _ = block(i + 1, m, out, True)
                else:
                    end, _ = block(i + 1, dot, [], False)
                i = end + 1
            elif a.startswith("if "):
                taken = False
                cond = a[3:]
                while True:
                    hit = run and not taken and _cond(cond, dot, env)
                    j, stop = block(i + 1, dot, out, hit)
                    taken = taken or hit
                    i = j
                    if stop == "end":
                        i += 1
                        break
                    cond = stop[len("else if ") :] if stop.startswith("else if ") else "true"
            elif ":=" in a or re.match(r"^\$\w+ = ", a):
                name, _, expr = a.partition(":=") if ":=" in a else a.partition("=")
                if run:
                    env[name.strip()] = _value(expr, dot, env)
                i += 1
            else:
                if run:
                    out.append(str(_value(a, dot, env)))
                i += 1
        return i, ""

    out: list[str] = []
    block(0, {}, out, True)
    return "".join(out)


# -- tests ----------------------------------------------------------------------------------------------

CONVERSATIONS = [
    [{"role": "user", "content": "Tell me a joke."}],
    [{"role": "system", "content": "You answer in French."}, {"role": "user", "content": "Hello!"}],
    [
        {"role": "user", "content": "2+2?"},
        {"role": "assistant", "content": "4"},
        {"role": "user", "content": "And 3+3?"},
    ],
    [
        {"role": "system", "content": "Short answers."},
        {"role": "user", "content": "Capital of Italy?"},
        {"role": "assistant", "content": "Rome."},
        {"role": "user", "content": "Of Spain?"},
    ],
    [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello, how can I help?"}],
]


@pytest.mark.parametrize(
    "template, bos",
    [
        (CHATML, "<s>"),
        (CHATML_DEFAULT_SYSTEM, "<|im_start|>"),
        (LLAMA3_LIKE, "<|begin_of_text|>"),
        (ZEPHYR_LIKE, "<s>"),
    ],
    ids=["chatml", "chatml-default-system", "llama3-like", "zephyr-like"],
)
def test_go_template_renders_every_conversation_like_the_jinja_template(template, bos):
    render = jinja(template, bos=bos)
    fmt = derive_turn_format(render, bos)
    assert fmt is not None
    go = fmt.go_template()
    assert '"""' not in go  # it goes inside TEMPLATE """..."""
    for conv in CONVERSATIONS:
        generation = conv[-1]["role"] != "assistant"  # Ollama asks for the next assistant turn after a user turn
        assert go_render(go, conv) == render(conv, generation), conv


def test_a_template_that_folds_the_system_text_into_a_user_turn_gets_no_template_line():
    assert derive_turn_format(jinja(LLAMA2_LIKE), "<s>") is None


class FakeTokenizer:
    """Just what the Modelfile writer asks of a tokenizer; rendering goes through our compiled templates."""

    def __init__(self, template: str, bos: str, eos: str, specials: list[str], adds_bos: bool = False) -> None:
        self.render = jinja(template, bos, eos)
        self.adds_bos = adds_bos
        self.bos_token, self.eos_token = bos, eos
        self.all_special_tokens = specials

    def __call__(self, text, add_special_tokens=True):
        ids = [ord(c) for c in text]
        return {"input_ids": ([0] if add_special_tokens and self.adds_bos else []) + ids}

    @property
    def bos_token_id(self) -> int:
        return 0

    def get_added_vocab(self) -> dict[str, int]:
        return {t: i for i, t in enumerate(self.all_special_tokens)}

    def apply_chat_template(self, messages, chat_template, tokenize, add_generation_prompt):
        return self.render(messages, add_generation_prompt)


def test_modelfile_lines_and_stop_tokens():
    tok = FakeTokenizer(
        LLAMA3_LIKE,
        "<|begin_of_text|>",
        "<|end_of_text|>",
        ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"],
    )
    text, warnings = modelfile("m-q8_0.gguf", tok, LLAMA3_LIKE, name="m")
    assert not warnings
    lines = text.splitlines()
    assert "FROM ./m-q8_0.gguf" in lines
    assert text.count('TEMPLATE """') == 1 and text.rstrip().endswith('"')
    stops = [json.loads(line.split(" ", 2)[2]) for line in lines if line.startswith("PARAMETER stop ")]
    assert stops[:2] == ["<|end_of_text|>", "<|eot_id|>"] and "<|start_header_id|>" in stops
    assert '{{- "<|begin_of_text|>" }}' in text  # the template writes BOS, the tokenizer does not add one
    tok.adds_bos = True
    text_bos, _ = modelfile("m-q8_0.gguf", tok, LLAMA3_LIKE, name="m")
    assert "<|begin_of_text|>" not in text_bos.split("PARAMETER")[0]  # the runtime adds BOS: not twice

    tok2 = FakeTokenizer(LLAMA2_LIKE, "<s>", "</s>", ["<s>", "</s>"])
    text2, warnings2 = modelfile("m.gguf", tok2, LLAMA2_LIKE, name="m")
    assert "TEMPLATE" not in text2 and warnings2 and "GGUF" in warnings2[0]
    assert 'PARAMETER stop "</s>"' in text2

    text3, _ = modelfile("/abs/base.gguf", tok2, None, name="m", adapter_file="m-lora.gguf")
    assert (
        "FROM /abs/base.gguf" in text3 and "ADAPTER ./m-lora.gguf" in text3 and 'TEMPLATE """{{ .Prompt }}"""' in text3
    )
    fmt = derive_turn_format(jinja(CHATML), None)
    assert stop_tokens(fmt, FakeTokenizer(CHATML, "<s>", "<|im_end|>", ["<|im_start|>", "<|im_end|>"])) == [
        "<|im_end|>",
        "<|im_start|>",
    ]
