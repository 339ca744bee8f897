"""Loss weights in the data: a turn's ``weight`` and its content parts' weights, read, encoded token
by token, stored, cached, packed and collated (the gradient side is test_loss_weights_train.py)."""

from __future__ import annotations

import json
import math
import random

import numpy as np
import pytest
from data_support import make_cfg

from qlora_engine.data import IGNORE_INDEX, collate, inspect_data, prepare_data
from qlora_engine.data.encode import Encoder, resolve_template
from qlora_engine.data.formats import AnswerWeights, BadRow, ChatSample, normalize
from qlora_engine.data.store import SampleBuilder, SampleSet, pack

pytestmark = pytest.mark.usefixtures("private_cache")


def chat(*answer_content, weight=None, question="What is the capital of France?"):
    turn = {"role": "assistant", "content": list(answer_content) if len(answer_content) > 1 else answer_content[0]}
    if weight is not None:
        turn["weight"] = weight
    return {"messages": [{"role": "user", "content": question}, turn]}


def part(text, weight=None):
    return {"type": "text", "text": text} if weight is None else {"type": "text", "text": text, "weight": weight}


# -- reading ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("weight", "trained", "turn"),
    [(0, False, None), (0.0, False, None), (False, False, None), (1, True, None), (1.0, True, None),
     (True, True, None), (None, True, None), (2, True, 2.0), (0.25, True, 0.25), (1e-3, True, 1e-3), (7.5, True, 7.5)],
)
def test_a_turn_weight_is_a_number_and_zero_means_untrained(weight, trained, turn):
    s = normalize(chat("Paris.", weight=weight), "chat", False)
    assert isinstance(s, ChatSample) and s.train == [False, trained]
    got = s.weights[-1] if s.weights else None
    assert got == (AnswerWeights(turn) if turn is not None else None)


@pytest.mark.parametrize(
    "bad", [-1, -0.5, -1e-9, "1", "heavy", "", [], [1], {}, {"w": 1}, math.nan, math.inf, -math.inf], ids=repr
)
@pytest.mark.parametrize("where", ["turn", "part"])
def test_a_bad_weight_is_a_bad_row_naming_the_turn(bad, where):
    row = chat(part("Arr, matey!", bad), part(" Paris.")) if where == "part" else chat("Paris.", weight=bad)
    with pytest.raises(BadRow, match=r"turn 2.*weight must be a number >= 0") as e:
        normalize(row, "chat", False)
    assert ("part 1" in str(e.value)) is (where == "part")


@pytest.mark.parametrize("bad", [-1, "heavy", math.nan, [1]], ids=repr)
def test_weights_outside_answers_are_not_read(bad):
    row = {"messages": [{"role": "system", "content": "Be brief.", "weight": bad},
                        {"role": "user", "content": [part("Capital of", bad), part(" France?")], "weight": bad},
                        {"role": "assistant", "content": "Paris."}]}
    s = normalize(row, "chat", False)
    assert s.weights is None and s.messages[1]["content"] == "Capital of France?"


def test_parts_are_joined_as_written_and_carry_their_weights_times_the_turn_s():
    s = normalize(chat(part("Arr, matey!", 0.2), part(" The capital of France is Paris."), weight=2), "chat", False)
    assert s.messages[-1]["content"] == "Arr, matey! The capital of France is Paris."
    assert s.weights[-1] == AnswerWeights(2.0, ((11, 0.2), (43, 1.0)))
    unweighted = normalize(chat(part("Arr, matey!"), part(" Paris.")), "chat", False)
    assert unweighted.weights is None and unweighted.messages[-1]["content"] == "Arr, matey! Paris."


def test_sharegpt_and_conversational_prompt_completion_read_weights_of_trained_answers_only():
    s = normalize({"conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello.", "weight": 3}]},
                  "sharegpt", False)
    assert s.weights[-1] == AnswerWeights(3.0)
    row = {"prompt": json.dumps([{"role": "user", "content": "1+1?"}, {"role": "assistant", "content": "2", "weight": 5},
                                 {"role": "user", "content": "2+2?"}]),
           "completion": json.dumps([{"role": "assistant", "content": "4", "weight": 0.5}])}
    s = normalize(row, "prompt_completion", False)
    assert s.train == [False, False, False, True]
    assert s.weights == [None, None, None, AnswerWeights(0.5)]


# -- tokens -------------------------------------------------------------------------------------


def by_hand(tok, pieces):
    """ChatML built piece by piece: (ids, weights) from (text, weight) pieces."""
    ids, weights = [], []
    for text, w in pieces:
        piece = tok(text, add_special_tokens=False)["input_ids"]
        ids += piece
        weights += [w] * len(piece)
    return ids, weights


@pytest.mark.parametrize("fast", [True, False], ids=["offsets", "pieces"])
@pytest.mark.parametrize(("turn", "greeting", "fact"), [(1, 0.2, 1), (2, 0.5, 3), (1, 0, 1), (0.5, 1, 0)])
def test_every_token_weighs_its_part_times_its_turn_and_the_end_of_turn_the_turn(tok, fast, turn, greeting, fact):
    enc = Encoder(tok, resolve_template(tok, None)[0])
    enc.fast = fast
    row = chat(part("Arr, matey!", greeting), part(" The capital of France is Paris.", fact), weight=turn)
    (got,) = enc.encode_many([normalize(row, "chat", False)])
    ids, weights = by_hand(tok, [("<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n", 0),
                                 ("Arr, matey!", turn * greeting), (" The capital of France is Paris.", turn * fact),
                                 ("<|im_end|>", turn)])
    assert got.input_ids == ids
    assert got.weights == pytest.approx(weights)
    assert got.trained == [w > 0 for w in weights]


WORDS = ["the", "capital", "of", "France", "is", "Paris", "and", "a", "spider", "has", "eight", "legs", "while", "water", "boils", "at", "one", "hundred"]


def random_chat(rng: random.Random, weighted: bool):
    messages = [{"role": "system", "content": "Answer briefly."}] if rng.random() < 0.3 else []
    for _ in range(rng.randint(1, 3)):
        messages.append({"role": "user", "content": " ".join(rng.choices(WORDS, k=rng.randint(2, 6))) + "?"})
        words = rng.choices(WORDS, k=rng.randint(1, 9))
        cuts = sorted(rng.sample(range(1, len(words)), k=min(len(words) - 1, rng.randint(0, 3)))) if len(words) > 1 else []
        texts = [" ".join(words[a:b]) for a, b in zip([0, *cuts], [*cuts, len(words)], strict=True)]
        texts = [t if i == 0 else " " + t for i, t in enumerate(texts)]
        turn = {"role": "assistant", "content": [part(t, rng.choice([0.1, 1, 2.5]) if weighted else None) for t in texts]}
        if weighted and rng.random() < 0.5:
            turn["weight"] = rng.choice([0, 0.5, 1, 4])
        messages.append(turn)
    return {"messages": messages}


@pytest.mark.parametrize("seed", range(30))
def test_weights_never_move_what_is_trained_only_how_much(tok, seed):
    """Thirty random conversations (systems, several answers, parts cut at random words): with every
    weight 1 the ids and labels are those of the unweighted data; with random weights the trained
    tokens are those of positive weight, each weight is one the row gave (times its turn's), and the
    prompt tokens weigh nothing."""
    rng = random.Random(seed)
    row = random_chat(rng, weighted=True)
    enc = Encoder(tok, resolve_template(tok, None)[0])
    plain_row = json.loads(json.dumps(row))
    for m in plain_row["messages"]:
        m.pop("weight", None)
        if isinstance(m["content"], list):
            for p in m["content"]:
                p.pop("weight", None)
    ones = json.loads(json.dumps(plain_row))
    for m in ones["messages"]:
        if m["role"] == "assistant":
            m["weight"] = 1
            m["content"] = [dict(p, weight=1) for p in m["content"]]
    plain, all_ones, weighted = enc.encode_many([normalize(r, "chat", False) for r in (plain_row, ones, row)])
    assert plain.weights is None and all_ones.weights is not None
    assert all_ones.input_ids == plain.input_ids and all_ones.trained == plain.trained
    assert all_ones.weights == [float(t) for t in plain.trained]
    assert weighted.input_ids == plain.input_ids
    # every answer of weight 0: nothing weighted is left, and nothing is trained
    weights = weighted.weights if weighted.weights is not None else [0.0] * len(weighted.trained)
    assert weighted.trained == [w > 0 for w in weights]
    allowed = {0.0} | {t * p for t in (0.5, 1, 4) for p in (0.1, 1, 2.5)} | {0.5, 1.0, 4.0}
    assert all(any(math.isclose(w, a, rel_tol=1e-6) for a in allowed) for w in weights)
    # nothing outside the unweighted data's answers is trained
    assert not any(w and not t for w, t in zip(weighted.trained, plain.trained, strict=True))


def test_a_template_that_rewrites_the_answer_refuses_to_guess_its_weights(tok):
    chatml = resolve_template(tok, None)[0]
    upper = chatml.replace("message['content']", "(message['content'] | upper)")
    assert upper != chatml
    enc = Encoder(tok, upper)
    (got,) = enc.encode_many([normalize(chat(part("Arr!", 0.2), part(" Paris.")), "chat", False)])
    assert isinstance(got, BadRow) and "changed the answer's text" in str(got)
    (plain,) = enc.encode_many([normalize(chat("Arr! Paris."), "chat", False)])
    assert not isinstance(plain, BadRow)  # without weights the template's answer span is enough


# -- the store, the cache, packing, batches -------------------------------------------------------


def test_the_store_keeps_weights_through_select_pack_save_and_load(tmp_path):
    b = SampleBuilder()
    b.add([1, 2, 3], [True, True, True])  # before any weighted sample: weight 1 where trained
    b.add([4, 5, 6, 7], [False, True, False, True], [0.0, 0.2, 0.0, 3.0])
    b.add([8, 9], [False, True])
    s = b.build()
    assert s.weights.tolist() == pytest.approx([1, 1, 1, 0, 0.2, 0, 3, 0, 1])
    assert s[1]["weights"] == pytest.approx([0, 0.2, 0, 3])
    assert s.select([2, 1])[1]["weights"] == pytest.approx([0, 0.2, 0, 3])
    packed = pack(s, 16)
    assert packed.packed and len(packed) == 1
    w = np.asarray(packed[0]["weights"])
    lab = np.asarray(packed[0]["labels"])
    assert ((w > 0) == (lab != IGNORE_INDEX)).all()  # packing drops each first token's label, and its weight
    assert w.sum() == pytest.approx(3 + 0.2 + 3 + 1 - 1)  # the first sample's first token, of weight 1, dropped
    packed.save(tmp_path, "train")
    back = SampleSet.load(tmp_path, "train")
    assert back[0] == packed[0]
    unweighted = SampleBuilder()
    unweighted.add([1, 2], [False, True])
    plain = unweighted.build()
    plain.save(tmp_path, "plain")
    assert SampleSet.load(tmp_path, "plain").weights is None and "weights" not in plain[0]


def test_a_batch_carries_weights_aligned_with_labels_and_zero_on_padding():
    rows = [{"input_ids": [5, 6, 7], "labels": [-100, 6, 7], "weights": [0, 0.5, 2]},
            {"input_ids": [5, 6, 7, 8, 9], "labels": [-100, -100, 7, 8, 9], "weights": [0, 0, 1, 1, 4]}]
    b = collate(rows, pad_token_id=0, multiple=8)
    assert b["loss_weights"].shape == b["labels"].shape == (2, 8)
    assert b["loss_weights"][0].tolist() == pytest.approx([0, 0.5, 2, 0, 0, 0, 0, 0])
    assert ((b["loss_weights"] > 0) == (b["labels"] != IGNORE_INDEX)).all()
    assert "loss_weights" not in collate(rows, pad_token_id=0, weights=False)
    assert "loss_weights" not in collate([{k: v for k, v in r.items() if k != "weights"} for r in rows], 0)


@pytest.mark.parametrize("packing", [False, True])
def test_prepared_data_is_weighted_and_the_cache_gives_the_same_back(tmp_path, tok, packing):
    rows = [chat(part("Arr, matey!", 0.2), part(f" The answer is {i}.")) for i in range(20)] + [chat("Plain answer.")]
    path = tmp_path / "weighted.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = make_cfg(path, packing=packing, validation_split=0.2)
    first = prepare_data(cfg, tok)
    second = prepare_data(cfg, tok)
    assert first.fingerprint == second.fingerprint
    for a, b in ((first.train, second.train), (first.validation, second.validation)):
        assert a.weights is not None and np.array_equal(np.asarray(a.weights), np.asarray(b.weights))
        assert all(((np.asarray(a[i]["weights"]) > 0) == (np.asarray(a[i]["labels"]) != IGNORE_INDEX)).all()
                   for i in range(len(a)))
    weights = set(np.round(np.asarray(first.train.weights, dtype=np.float64), 4).tolist())
    assert weights == {0.0, 0.2, 1.0}


def test_inspect_data_shows_each_run_s_weight(tmp_path, tok):
    path = tmp_path / "weighted.jsonl"
    path.write_text(json.dumps(chat(part("Arr, matey!", 0.2), part(" Paris."))) + "\n")
    report = inspect_data(path, tok, samples=1)
    sample = report["samples"][0]
    assert "[[Arr, matey!]](x0.2)[[ Paris.<|im_end|>]]" in sample["text"]
    assert [s["weight"] for s in sample["segments"] if s["trained"]] == pytest.approx([0.2, 1.0])


@pytest.mark.parametrize("overlong", ["truncate", "drop"])
def test_an_answer_longer_than_max_length_keeps_its_weights_up_to_the_cut(tmp_path, tok, overlong):
    """A very long weighted answer is cut before tokenizing (memory bounded by max_length) and then
    truncated or dropped; what is kept weighs what its part said."""
    long_fact = " and".join(["the capital of France is Paris"] * 400)
    rows = [chat(part("Arr, matey! ", 0.2), part(long_fact, 2)), chat(part("Ahoy! ", 0.5), part("Paris."))]
    path = tmp_path / "long.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    data = prepare_data(make_cfg(path, max_length=64, overlong=overlong, validation_split=0), tok)
    kept = [data.train[i] for i in range(len(data.train))]
    assert len(kept) == (2 if overlong == "truncate" else 1)
    for s in kept:
        assert ((np.asarray(s["weights"]) > 0) == (np.asarray(s["labels"]) != IGNORE_INDEX)).all()
    if overlong == "truncate":
        long = max(kept, key=lambda s: len(s["input_ids"]))
        assert len(long["input_ids"]) == 64 and set(np.round(long["weights"], 4)) == {0.0, 0.2, 2.0}


def test_inspect_data_on_the_command_line_says_the_weights_range(tmp_path, tiny_model_dir, capsys):
    from qlora_engine.cli import main

    path = tmp_path / "weighted.jsonl"
    path.write_text(json.dumps(chat(part("Arr, matey! ", 0.25), part("Paris is the capital.", 3))) + "\n")
    assert main(["inspect-data", str(path), "--model", str(tiny_model_dir)]) == 0
    out = capsys.readouterr().out
    assert "loss weights: 0.25 to 3 (" in out and "[[Arr, matey!]](x0.25)" in out


@pytest.mark.parametrize("turn", [0.5, 1.0, 3.0])
def test_an_eos_the_template_does_not_write_is_added_with_the_last_answer_s_weight(tiny_model_no_template_dir, turn):
    """ChatML (the default for a tokenizer without a template) ends turns with <|im_end|>, which is
    not this tokenizer's EOS: the closing EOS is appended, trained, weighing the last turn's weight."""
    from transformers import AutoTokenizer

    plain = AutoTokenizer.from_pretrained(tiny_model_no_template_dir)
    enc = Encoder(plain, resolve_template(plain, None)[0])
    (got,) = enc.encode_many([normalize(chat(part("Arr! ", 0.2), part("Paris."), weight=turn), "chat", False)])
    assert got.input_ids[-1] == plain.eos_token_id and got.input_ids[-2] != plain.eos_token_id
    assert got.trained[-1] and got.weights[-1] == pytest.approx(turn)
    assert got.weights[-2] == pytest.approx(turn)  # <|im_end|>, the template's end of turn, weighs the turn too
