"""Packing: every token kept, positions restart per sample, and no sample attends to another."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from data_support import make_cfg
from transformers import LlamaForCausalLM

from qlora_engine.data import IGNORE_INDEX, collate, count_tokens, prepare_data
from qlora_engine.data.store import SampleBuilder, pack

pytestmark = pytest.mark.usefixtures("private_cache")


def random_set(seed: int, n: int, max_len: int):
    rng = np.random.default_rng(seed)
    b = SampleBuilder()
    for _ in range(n):
        k = int(rng.integers(1, max_len + 1))
        b.add(rng.integers(3, 300, size=k).tolist(), (rng.random(k) < 0.5).tolist())
    return b.build()


def test_packing_keeps_every_token_and_restarts_positions():
    samples = random_set(0, 300, 60)
    packed = pack(samples, 128)
    assert packed.num_tokens == samples.num_tokens
    assert len(packed) < len(samples) / 2 and packed.lengths.max() <= 128
    assert packed.num_tokens / (len(packed) * 128) > 0.9  # best-fit packing leaves little room unused
    seen = []
    for seq in packed:
        pos, ids, labels = seq["position_ids"], seq["input_ids"], seq["labels"]
        starts = [i for i, p in enumerate(pos) if p == 0]
        assert starts[0] == 0
        for a, b in zip(starts, starts[1:] + [len(pos)], strict=True):
            assert pos[a:b] == list(range(b - a))
            assert labels[a] == IGNORE_INDEX, "a sample's first token is never predicted from the previous sample"
            seen.append(tuple(ids[a:b]))
    assert sorted(seen) == sorted(tuple(s["input_ids"]) for s in samples)


def test_packed_labels_are_the_samples_labels_but_the_first_token(data_dir, tok):
    plain = prepare_data(make_cfg(data_dir / "chat.jsonl", max_length=256), tok)
    packed = prepare_data(make_cfg(data_dir / "chat.jsonl", max_length=256, packing=True), tok)
    assert len(packed.train) == 1 and packed.report["train"]["samples"] == 4
    seq = packed.train[0]
    by_ids = {tuple(s["input_ids"]): s["labels"] for s in plain.train}
    starts = [i for i, p in enumerate(seq["position_ids"]) if p == 0] + [len(seq["input_ids"])]
    for a, b in zip(starts, starts[1:], strict=False):
        want = by_ids[tuple(seq["input_ids"][a:b])]
        assert seq["labels"][a:b] == [IGNORE_INDEX] + want[1:]
    assert packed.report["train"]["packing_fill"] == round(len(seq["input_ids"]) / 256, 3)


@pytest.mark.parametrize("attn", ["sdpa", "eager", "qlora_varlen"])
def test_no_packed_sample_attends_to_another(data_dir, tok, tiny_model_dir, attn):
    # qlora_varlen: the engine's attention for packed rows on a GPU (qlora_engine.varlen): no mask,
    # samples cut at their position ids; on the CPU each sample runs alone through SDPA.
    if attn == "qlora_varlen":
        from qlora_engine import varlen

        varlen.register()
    model = LlamaForCausalLM.from_pretrained(tiny_model_dir, attn_implementation=attn, dtype=torch.float32).eval()
    plain = prepare_data(make_cfg(data_dir / "chat.jsonl", max_length=100), tok)
    packed = prepare_data(make_cfg(data_dir / "chat.jsonl", max_length=100, packing=True), tok)
    assert len(packed.train) == 2  # 4 samples in 2 rows of different length: padding is exercised too
    batch = collate(list(packed.train), tok.pad_token_id)
    assert "attention_mask" not in batch
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False).logits
        alone = {
            tuple(s["input_ids"]): model(input_ids=torch.tensor([s["input_ids"]]), use_cache=False).logits[0]
            for s in plain.train
        }
        checked = 0
        for r, seq in enumerate(packed.train):
            pos = seq["position_ids"]
            starts = [i for i, p in enumerate(pos) if p == 0] + [len(pos)]
            for a, b in zip(starts, starts[1:], strict=False):
                ref = alone[tuple(seq["input_ids"][a:b])]
                torch.testing.assert_close(logits[r, a:b], ref, atol=1e-5, rtol=1e-4)
                checked += 1
        assert checked == 4
        # The control: the same rows without the position-id boundaries do mix the samples.
        mixed = model(input_ids=batch["input_ids"], use_cache=False).logits
        seq = packed.train[0]
        second = [i for i, p in enumerate(seq["position_ids"]) if p == 0][1]
        assert not torch.allclose(mixed[0, second:], logits[0, second:], atol=1e-3)


def test_packed_loss_equals_the_sum_of_the_samples_losses(data_dir, tok, tiny_model_dir):
    model = LlamaForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    plain = prepare_data(make_cfg(data_dir / "chat.jsonl", max_length=100), tok)
    packed = prepare_data(make_cfg(data_dir / "chat.jsonl", max_length=100, packing=True), tok)
    with torch.no_grad():
        b = collate(list(packed.train), tok.pad_token_id)
        n = int((b["labels"][:, 1:] != IGNORE_INDEX).sum())
        total = model(**b, use_cache=False).loss * n
        parts = 0.0
        for s in plain.train:
            one = collate([s], tok.pad_token_id)
            k = int((one["labels"][:, 1:] != IGNORE_INDEX).sum())
            parts += float(model(**one).loss) * k
    assert float(total) == pytest.approx(parts, rel=1e-4)


def test_collate_pads_right_and_counts_tokens(tok):
    samples = [{"input_ids": [5, 6, 7], "labels": [-100, 6, 7]}, {"input_ids": [8], "labels": [8]}]
    b = collate(samples, pad_token_id=0)
    assert b["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert b["labels"].tolist() == [[-100, 6, 7], [8, -100, -100]]
    assert b["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert count_tokens(b) == 4
    packed = [
        {"input_ids": [5, 6, 7, 8], "labels": [-100, 6, -100, 8], "position_ids": [0, 1, 0, 1]},
        {"input_ids": [9, 10], "labels": [-100, 10], "position_ids": [0, 1]},
    ]
    b = collate(packed, pad_token_id=0)
    assert b["position_ids"].tolist() == [[0, 1, 0, 1], [0, 1, 0, 1]]
    assert b["labels"][1].tolist() == [-100, 10, -100, -100]
    assert count_tokens(b, pad_token_id=0) == 6


def test_varlen_attention_on_padded_rows_is_sdpa_s(tok, tiny_model_dir):
    # Rows that are not packed (a padding mask, no position ids) under qlora_varlen take SDPA
    # with the causal padding mask: the same logits as SDPA's own path on the real tokens.
    from qlora_engine import varlen

    varlen.register()
    ours = LlamaForCausalLM.from_pretrained(tiny_model_dir, attn_implementation="qlora_varlen", dtype=torch.float32).eval()
    sdpa = LlamaForCausalLM.from_pretrained(tiny_model_dir, attn_implementation="sdpa", dtype=torch.float32).eval()
    b = collate([{"input_ids": [5, 6, 7, 8, 9], "labels": [5, 6, 7, 8, 9]}, {"input_ids": [10, 11, 12], "labels": [10, 11, 12]}],
                tok.pad_token_id)
    with torch.no_grad():
        a = ours(input_ids=b["input_ids"], attention_mask=b["attention_mask"], use_cache=False).logits
        want = sdpa(input_ids=b["input_ids"], attention_mask=b["attention_mask"], use_cache=False).logits
    torch.testing.assert_close(a[0], want[0], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(a[1, :3], want[1, :3], atol=1e-5, rtol=1e-4)
