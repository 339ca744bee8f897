"""Loss masks, token by token: only answers (and the EOS that ends them) carry labels."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from data_support import make_cfg
from transformers import AutoTokenizer

from qlora_engine.data import IGNORE_INDEX, collate, prepare_data

CHAT = [json.loads(line) for line in (Path(__file__).parents[1] / "data" / "chat.jsonl").read_text().splitlines()]


pytestmark = pytest.mark.usefixtures("private_cache")


@pytest.fixture(scope="module")
def plain_tok(tiny_model_no_template_dir):
    return AutoTokenizer.from_pretrained(tiny_model_no_template_dir)


def chatml_by_hand(tok, messages):
    """The expected ids and labels, built piece by piece from the ChatML layout (no template code)."""
    ids, labels = [], []

    def add(text, trained):
        piece = tok(text, add_special_tokens=False)["input_ids"]
        ids.extend(piece)
        labels.extend(piece if trained else [IGNORE_INDEX] * len(piece))

    for i, m in enumerate(messages):
        answer = m["role"] == "assistant"
        add(f"<|im_start|>{m['role']}\n", False)
        add(m["content"], answer)
        add("<|im_end|>", answer)
        if i < len(messages) - 1:
            add("\n", False)
    return ids, labels


def trained_text(tok, sample):
    return tok.decode([i for i, lab in zip(sample["input_ids"], sample["labels"], strict=True) if lab != IGNORE_INDEX])


def test_multi_turn_chat_trains_every_answer_and_nothing_else(data_dir, tok):
    prepared = prepare_data(make_cfg(data_dir / "chat.jsonl"), tok)
    s = prepared.train[0]
    ids, labels = chatml_by_hand(tok, CHAT[0]["messages"])
    assert s["input_ids"] == ids
    for k, (got, want) in enumerate(zip(s["labels"], labels, strict=True)):
        assert got == want, f"token {k} ({tok.decode([ids[k]])!r}): label {got}, expected {want}"
    # Both answers, each closed by its end-of-turn (here the EOS), and nothing of the system or user turns.
    assert trained_text(tok, s) == "Paris.<|im_end|>4 5 6<|im_end|>"
    assert s["input_ids"][-1] == tok.eos_token_id and s["labels"][-1] == tok.eos_token_id
    assert sum(lab == tok.eos_token_id for lab in s["labels"]) == 2  # EOS of both answers


def test_trailing_user_turn_is_dropped_and_content_parts_are_joined(data_dir, tok):
    prepared = prepare_data(make_cfg(data_dir / "chat.jsonl"), tok)
    ids, labels = chatml_by_hand(tok, CHAT[2]["messages"][:2])
    assert prepared.train[2]["input_ids"] == ids and prepared.train[2]["labels"] == labels
    parts = CHAT[3]["messages"]
    ids, _ = chatml_by_hand(tok, [{"role": "user", "content": parts[0]["content"][0]["text"]}, parts[1]])
    assert prepared.train[3]["input_ids"] == ids


def test_no_template_gets_chatml_and_a_separate_eos_that_the_pad_does_not_hide(data_dir, plain_tok):
    # This tokenizer's EOS is <|endoftext|>, which is also its pad token.
    assert plain_tok.eos_token_id == plain_tok.pad_token_id
    prepared = prepare_data(make_cfg(data_dir / "chat.jsonl"), plain_tok)
    s = prepared.train[1]
    ids, labels = chatml_by_hand(plain_tok, CHAT[1]["messages"])
    assert s["input_ids"] == ids + [plain_tok.eos_token_id]
    assert s["labels"] == labels + [plain_tok.eos_token_id]
    batch = collate([prepared.train[0], s], pad_token_id=plain_tok.pad_token_id)
    row = batch["labels"][1]
    n = len(s["input_ids"])
    assert int(row[n - 1]) == plain_tok.eos_token_id, "EOS keeps its label although it equals the pad id"
    assert (row[n:] == IGNORE_INDEX).all() and int(batch["attention_mask"][1].sum()) == n


def test_alpaca_trains_only_the_output(data_dir, tok):
    prepared = prepare_data(make_cfg(data_dir / "alpaca.jsonl"), tok)
    rows = [json.loads(line) for line in (data_dir / "alpaca.jsonl").read_text().splitlines()]
    for s, row in zip(prepared.train, rows, strict=True):
        assert trained_text(tok, s) == row["output"] + "<|im_end|>"
    # 'input' joins the instruction in the user turn; 'system' becomes a system turn.
    msgs = [
        {"role": "user", "content": "Translate to French.\n\ngood morning"},
        {"role": "assistant", "content": "Bonjour."},
    ]
    assert prepared.train[1]["input_ids"] == chatml_by_hand(tok, msgs)[0]
    assert tok.decode(prepared.train[3]["input_ids"]).startswith("<|im_start|>system\nYou write Python.<|im_end|>")


def test_sharegpt_roles_are_mapped_and_every_gpt_turn_is_trained(data_dir, tok):
    prepared = prepare_data(make_cfg(data_dir / "sharegpt.json"), tok)
    assert trained_text(tok, prepared.train[1]) == "1 2 3<|im_end|>1 2 3 4 5<|im_end|>"
    assert "<|im_start|>user\nCount to 3." in tok.decode(prepared.train[1]["input_ids"])


def test_prompt_completion_trains_the_completion_and_eos(data_dir, tok):
    prepared = prepare_data(make_cfg(data_dir / "prompt_completion.jsonl"), tok)
    s = prepared.train[0]
    prompt = tok("Translate to French: good morning.")["input_ids"]
    completion = tok(" Bonjour.", add_special_tokens=False)["input_ids"]
    assert s["input_ids"] == prompt + completion + [tok.eos_token_id]
    assert s["labels"] == [IGNORE_INDEX] * len(prompt) + completion + [tok.eos_token_id]


def test_text_trains_every_token(data_dir, tok):
    s = prepare_data(make_cfg(data_dir / "text.jsonl"), tok).train[0]
    assert s["labels"] == s["input_ids"] and s["input_ids"][-1] == tok.eos_token_id


def test_train_on_prompt_switches_the_mask_off(data_dir, tok):
    s = prepare_data(make_cfg(data_dir / "chat.jsonl", train_on_prompt=True), tok).train[0]
    assert s["labels"] == s["input_ids"]
    pc = prepare_data(make_cfg(data_dir / "prompt_completion.jsonl", train_on_prompt=True), tok).train[0]
    assert pc["labels"] == pc["input_ids"]


def test_turn_weight_zero_is_not_trained(tmp_path, tok):
    row = {
        "messages": [
            {"role": "user", "content": "Count to 3."},
            {"role": "assistant", "content": "1 2", "weight": 0},
            {"role": "user", "content": "Again."},
            {"role": "assistant", "content": "1 2 3"},
        ]
    }
    (tmp_path / "w.jsonl").write_text(json.dumps(row) + "\n")
    s = prepare_data(make_cfg(tmp_path / "w.jsonl"), tok).train[0]
    assert trained_text(tok, s) == "1 2 3<|im_end|>"


def test_conversational_prompt_completion_trains_only_the_completion_turns(tmp_path, tok):
    row = {
        "prompt": [
            {"role": "user", "content": "Count to 3."},
            {"role": "assistant", "content": "1 2 3"},
            {"role": "user", "content": "Now to 5."},
        ],
        "completion": [{"role": "assistant", "content": "1 2 3 4 5"}],
    }
    (tmp_path / "pc.jsonl").write_text(json.dumps(row) + "\n")
    s = prepare_data(make_cfg(tmp_path / "pc.jsonl"), tok).train[0]
    assert trained_text(tok, s) == "1 2 3 4 5<|im_end|>"


def test_a_template_in_the_config_replaces_the_tokenizers(data_dir, tok):
    template = (
        "{% for m in messages %}{% if m['role'] == 'user' %}Q: {{ m['content'] }}\n"
        "{% else %}A: {{ m['content'] }}{{ eos_token }}\n{% endif %}{% endfor %}"
        "{% if add_generation_prompt %}A: {% endif %}"
    )
    s = prepare_data(make_cfg(data_dir / "alpaca.jsonl", chat_template=template), tok).train[2]
    assert tok.decode(s["input_ids"]) == "Q: Count from 1 to 5.\nA: 1 2 3 4 5<|im_end|>"
    # The template's "A: " ends in a space that the tokenizer merges with the answer's first
    # character into " 1": that token holds answer text, so it is trained.
    assert trained_text(tok, s) == " 1 2 3 4 5<|im_end|>"


def test_truncate_and_drop_are_counted(data_dir, tok):
    lengths = [len(s["input_ids"]) for s in prepare_data(make_cfg(data_dir / "chat.jsonl"), tok).train]
    limit = 40
    assert sum(n > limit for n in lengths) == 2  # two samples fit, two do not (and keep answer tokens below 40)
    cut = prepare_data(make_cfg(data_dir / "chat.jsonl", max_length=limit), tok)
    assert cut.report["overlong"]["truncated"] == 2 and len(cut.train) == 4
    assert max(len(s["input_ids"]) for s in cut.train) == limit
    assert cut.report["token_stats"]["over_max_length"] == 2 and cut.report["token_stats"]["max"] == max(lengths)
    dropped = prepare_data(make_cfg(data_dir / "chat.jsonl", max_length=limit, overlong="drop"), tok)
    assert dropped.report["overlong"]["dropped"] == 2 and len(dropped.train) == 2
    # A sample whose answer lies wholly beyond the limit has nothing left to learn: it goes, counted.
    tiny = prepare_data(make_cfg(data_dir / "chat.jsonl", max_length=20), tok)
    assert tiny.report["overlong"]["no_answer_left"] >= 1
    assert all(any(lab != IGNORE_INDEX for lab in s["labels"]) for s in tiny.train)


def test_validation_split_is_deterministic_for_a_seed(data_dir, tok):
    def split(seed):
        cfg = make_cfg(data_dir / "bad_missing_fields.jsonl", validation_split=0.25)
        cfg.train.seed = seed
        p = prepare_data(cfg, tok)
        return [tuple(s["input_ids"]) for s in p.train], [tuple(s["input_ids"]) for s in p.validation]

    train_a, val_a = split(1)
    assert len(val_a) == round(37 * 0.25) and len(train_a) + len(val_a) == 37
    assert not set(train_a) & set(val_a)
    assert split(1) == (train_a, val_a)
    assert split(2)[1] != val_a


def test_separate_validation_file(data_dir, tok):
    p = prepare_data(make_cfg(data_dir / "alpaca.jsonl", validation_path=str(data_dir / "alpaca_array.json")), tok)
    assert len(p.train) == 4 and len(p.validation) == 3
    assert p.report["validation"]["samples"] == 3 and p.report["validation_source"].endswith("alpaca_array.json")


def test_the_direct_template_render_is_checked_against_apply_chat_template(data_dir, tok):
    from qlora_engine.data.encode import Encoder, resolve_template
    from qlora_engine.data.formats import ChatSample

    sample = ChatSample(
        [{"role": "user", "content": "Count to 3."}, {"role": "assistant", "content": "1 2 3"}], [False, True]
    )
    good = Encoder(tok, resolve_template(tok, None)[0])
    want = good.encode_many([sample])[0]
    assert good._fast_render is not None  # the fast path is in use when it agrees
    broken = Encoder(tok, resolve_template(tok, None)[0])
    broken._fast_render = lambda messages, generation: "something else"
    got = broken.encode_many([sample])[0]
    assert broken._fast_render is None  # disagreement: back to apply_chat_template for good
    assert (got.input_ids, got.trained) == (want.input_ids, want.trained)


LAYOUTS = {
    # Llama 3 layout: header tokens around the role, content trimmed, <|eot_id|> ends a turn.
    "llama3": (
        "{{- bos_token }}{% for m in messages %}{{ '<|start_header_id|>' + m['role'] + '<|end_header_id|>\\n\\n'"
        " + m['content'] | trim + '<|eot_id|>' }}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}",
        "<|eot_id|>",
    ),
    # Mistral v1 layout: no generation prompt at all; the answer follows [/INST] and ends with EOS.
    "mistral": (
        "{{ bos_token }}{% for m in messages %}{% if (m['role'] == 'user') != (loop.index0 % 2 == 0) %}"
        "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
        "{% if m['role'] == 'user' %}{{ '[INST] ' + m['content'] + ' [/INST]' }}"
        "{% elif m['role'] == 'assistant' %}{{ m['content'] + eos_token }}{% endif %}{% endfor %}",
        "<|im_end|>",
    ),
    # Gemma layout: 'model' turns, <end_of_turn> markers.
    "gemma": (
        "{{ bos_token }}{% for m in messages %}{% set role = 'model' if m['role'] == 'assistant' else m['role'] %}"
        "{{ '<start_of_turn>' + role + '\\n' + m['content'] | trim + '<end_of_turn>\\n' }}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<start_of_turn>model\\n' }}{% endif %}",
        "<end_of_turn>",
    ),
}


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_common_template_layouts_mask_each_answer_and_its_end_marker(tmp_path, tok, layout):
    template, end = LAYOUTS[layout]
    turns = [("Count to 3.", "1 2 3"), ("Now to 5.", "1 2 3 4 5")]
    messages = [m for q, a in turns for m in ({"role": "user", "content": q}, {"role": "assistant", "content": a})]
    (tmp_path / "c.jsonl").write_text(json.dumps({"messages": messages}) + "\n")
    s = prepare_data(make_cfg(tmp_path / "c.jsonl", chat_template=template), tok).train[0]
    assert trained_text(tok, s) == f"1 2 3{end}1 2 3 4 5{end}" + ("" if end == tok.eos_token else tok.eos_token)
    assert s["input_ids"][-1] == tok.eos_token_id and s["labels"][-1] == tok.eos_token_id
    for q, _ in turns:
        assert q not in trained_text(tok, s)
