"""Generation from a trained run: the 4-bit base with the adapter on (tuned) or off (base).

The run is the tiny Llama trained on three chats (shared with the export tests): the tuned
model must answer them word for word and then stop at EOS, which the base model never does.
"""

from __future__ import annotations

import io
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from test_export_support import CHATS, trained_chat_run  # noqa: E402

from qlora_engine.errors import QLoRAError
from qlora_engine.generate import ChatModel, GenerationSettings

GREEDY = GenerationSettings(temperature=0, max_new_tokens=16)


@pytest.fixture(scope="module")
def chat_run(tmp_path_factory, tiny_model_dir) -> Path:
    return trained_chat_run(tmp_path_factory, tiny_model_dir)


@pytest.fixture(scope="module")
def chat(chat_run) -> ChatModel:
    model = ChatModel.load(chat_run, device="cpu")
    yield model
    model.close()


def test_tuned_model_answers_trained_prompts_and_stops_at_eos(chat):
    import bitsandbytes as bnb

    assert any(isinstance(m, bnb.nn.Linear4bit) for m in chat.model.modules())  # the same 4-bit base as training
    assert chat.tokenizer.convert_tokens_to_ids("<|im_end|>") in chat.stop_ids
    for question, answer in CHATS:
        tuned = chat.generate(question, GREEDY)
        assert tuned.text == answer and tuned.finish_reason == "eos", (question, tuned)
        assert tuned.token_ids and chat.tokenizer.eos_token_id not in tuned.token_ids
        base = chat.generate(question, GenerationSettings(temperature=0, max_new_tokens=10), adapter=False)
        assert base.text != answer and base.finish_reason == "length"  # the untuned model neither answers nor stops


def test_compare_streams_both_answers_in_turns_and_matches_single_runs(chat):
    settings = GenerationSettings(temperature=0.8, top_p=0.9, seed=7, max_new_tokens=12)
    events: list[tuple[str, str]] = []
    results = chat.compare(CHATS[1][0], settings, on_text=lambda side, piece: events.append((side, piece)))
    for side in ("base", "tuned"):
        assert "".join(p for s, p in events if s == side) == results[side].text
    # interleaved, not one after the other: a tuned piece arrives before the base answer is complete
    first_tuned = next(i for i, (s, _) in enumerate(events) if s == "tuned")
    last_base = max(i for i, (s, _) in enumerate(events) if s == "base")
    assert first_tuned < last_base
    # the same seed gives the same answers as generating each side alone
    assert chat.generate(CHATS[1][0], settings, adapter=False).text == results["base"].text
    assert chat.generate(CHATS[1][0], settings).text == results["tuned"].text
    pieces: list[str] = []
    single = chat.generate(CHATS[0][0], GREEDY, on_text=pieces.append)
    assert "".join(pieces) == single.text == "Paris."


def stop_after(n: int):
    """A ``should_stop`` that says stop from its (n+1)-th call on: n tokens, then cancelled."""
    calls = {"n": 0}

    def should_stop() -> bool:
        calls["n"] += 1
        return calls["n"] > n

    return should_stop


def test_cancel_and_length_limits(chat):
    r = chat.generate(
        "Tell me about foxes.", GenerationSettings(max_new_tokens=50), adapter=False, should_stop=stop_after(3)
    )
    assert r.finish_reason == "cancelled" and len(r.token_ids) == 3
    both = chat.compare("hi", GenerationSettings(max_new_tokens=50), should_stop=lambda: True)
    assert {r.finish_reason for r in both.values()} == {"cancelled"}
    short = chat.generate("Tell me about foxes.", GenerationSettings(max_new_tokens=2), adapter=False)
    assert short.finish_reason == "length" and len(short.token_ids) == 2


def test_prompt_formats_and_settings_validation(chat):
    ids = chat.prompt_ids("Hello", GenerationSettings(system="Be brief."))
    text = chat.tokenizer.decode(ids)
    assert text == "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHello<|im_end|>\n<|im_start|>assistant\n"
    raw = chat.prompt_ids("Hello", GenerationSettings(raw=True))
    assert chat.tokenizer.decode(raw) == "Hello"
    for bad in ({"temperature": -1}, {"top_p": 0}, {"max_new_tokens": 0}):
        with pytest.raises(QLoRAError):
            GenerationSettings(**bad)


def test_cli_chat_one_prompt_compare_and_stdin(chat_run, capsys, monkeypatch):
    from qlora_engine.cli import main

    assert (
        main(
            ["chat", str(chat_run), "--prompt", CHATS[0][0], "--compare", "--temperature", "0", "--max-new-tokens", "8"]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert out.index("--- base ---") < out.index("--- tuned ---") < out.index("Paris.")
    monkeypatch.setattr(sys, "stdin", io.StringIO(f"{CHATS[1][0]}\n/reset\n\n{CHATS[2][0]}\n/quit\nignored\n"))
    checkpoint = sorted((chat_run / "checkpoints").iterdir())[-1]  # no tokenizer there: the run's is used
    assert main(["chat", str(checkpoint), "--temperature", "0"]) == 0
    assert capsys.readouterr().out.splitlines() == [CHATS[1][1], CHATS[2][1]]
    assert main(["chat", str(chat_run.parent / "missing")]) == 2


PROMPTS = [q for q, _ in CHATS] + [
    "hi",
    "Tell me about foxes, their dens, what they eat and how they raise their young in the spring.",
    [
        {"role": "user", "content": "What is the capital of France?"},
        {"role": "assistant", "content": "Paris."},
        {"role": "user", "content": "And of Italy?"},
    ],
    "",
]
"""Prompts of many lengths (left padding from none to most of the batch), trained and not, a
conversation and an empty message: the batch must not change any one answer."""


@pytest.mark.parametrize(
    ("settings", "adapter"),
    [
        (GREEDY, True),
        (GREEDY, False),
        (GenerationSettings(temperature=0.8, top_p=0.9, seed=7, max_new_tokens=12, repetition_penalty=1.3), True),
        (GenerationSettings(temperature=1.0, top_p=1.0, seed=3, max_new_tokens=9, system="Be brief."), False),
        (GenerationSettings(temperature=0, max_new_tokens=5, raw=True), True),
    ],
    ids=["greedy-tuned", "greedy-base", "top-p-penalty-tuned", "sampled-system-base", "raw-tuned"],
)
def test_answers_in_a_batch_are_the_answers_alone(chat, settings, adapter):
    prompts = PROMPTS
    if settings.raw:  # an empty raw prompt has no token to continue from: refused alone and in a batch
        for ask in (lambda: chat.generate("", settings), lambda: chat.answer_all(PROMPTS, settings)):
            with pytest.raises(QLoRAError, match="prompt is empty"):
                ask()
        prompts = PROMPTS[:-1]
    alone = [chat.generate(p, settings, adapter=adapter) for p in prompts]
    for batch_size in (64, 3):  # one batch; batches of uneven fill
        together = chat.answer_all(prompts, settings, adapter=adapter, batch_size=batch_size)
        assert [r.text for r in together] == [r.text for r in alone], batch_size
        assert [r.token_ids for r in together] == [r.token_ids for r in alone]
        assert [r.finish_reason for r in together] == [r.finish_reason for r in alone]
        assert [r.prompt_tokens for r in together] == [r.prompt_tokens for r in alone]
    if settings is GREEDY:  # rows that stop early and rows that run to the limit, in one batch
        first = [(r.text, r.finish_reason) for r in together[: len(CHATS)]]
        assert first == (
            [(a, "eos") for _, a in CHATS] if adapter else [(r.text, "length") for r in alone[: len(CHATS)]]
        )


def test_a_batch_can_be_cancelled_and_may_be_empty(chat):
    out = chat.answer_all(PROMPTS[3:5], GenerationSettings(max_new_tokens=50), adapter=False, should_stop=stop_after(3))
    assert [(r.finish_reason, len(r.token_ids)) for r in out] == [("cancelled", 3)] * 2
    assert all(r.elapsed > 0 for r in out)
    assert chat.answer_all([], GREEDY) == []
