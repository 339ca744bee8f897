"""Loss weights in the step: the gradient is the weighted mean's, computed by hand in float32.

A real NF4 Llama on the CPU. The engine applies the weights to the gradient leaving the loss for
the decoder's last hidden state (qlora_engine.loss_weights); the reference computes every token's
cross-entropy itself and takes ``sum(w * loss) / sum(w)``. They must agree on every path the
step can take (fast LoRA or peft's, checkpointing or not, packed rows, split micro-batches),
while the loss the step reports stays the plain mean.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from tiny import build_tiny_llama
from train_support import make_trainer, rel_err

from qlora_engine import loss_weights
from qlora_engine.data import IGNORE_INDEX, collate
from qlora_engine.data.store import SampleBuilder, pack
from qlora_engine.events import ListSink, RunFinished, StepMetrics
from qlora_engine.runner import run

SEQ = 48


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return build_tiny_llama(tmp_path_factory.mktemp("tiny-llama-lw"), layers=3)


def weighted_rows(seed: int = 0, n: int = 3) -> list[dict]:
    """Rows of random ids of varied lengths: the second half labelled, each label a weight of 0.2, 1 or 3."""
    gen = np.random.default_rng(seed)
    rows = []
    for k in range(n):
        length = SEQ - 7 * k
        ids = gen.integers(3, 200, length).tolist()
        trained = [i >= length // 2 for i in range(length)]
        weights = [float(gen.choice([0.2, 1.0, 3.0])) if t else 0.0 for t in trained]
        rows.append({"input_ids": ids, "labels": [i if t else IGNORE_INDEX for i, t in zip(ids, trained, strict=True)],
                     "weights": weights})
    return rows


def packed_rows(rows: list[dict]) -> list[dict]:
    b = SampleBuilder()
    for r in rows:
        b.add(r["input_ids"], [lab != IGNORE_INDEX for lab in r["labels"]], r["weights"])
    packed = pack(b.build(), 2 * SEQ)
    return [packed[i] for i in range(len(packed))]


def grads(trainer) -> dict[str, torch.Tensor]:
    return {n: p.grad.float().clone() for n, p in trainer.model.named_parameters() if p.requires_grad}


def zero(trainer) -> None:
    for p in trainer.model.parameters():
        p.grad = None


def engine_step(trainer, batches: list[dict]) -> tuple[float, dict[str, torch.Tensor]]:
    """The trainer's own forward and backward of one optimizer step made of ``batches``."""
    zero(trainer)
    n_labels = sum(int((b["labels"][:, 1:] != IGNORE_INDEX).sum()) for b in batches)
    loss = trainer._forward_backward([dict(b) for b in batches], n_labels, loss_weights.step_total(batches))
    return float(loss), grads(trainer)


def reference(trainer, rows: list[dict]) -> tuple[float, float, dict[str, torch.Tensor]]:
    """(plain mean loss, weighted mean loss, gradients of the weighted mean), every token's loss by hand."""
    zero(trainer)
    batch = collate(rows, trainer.tokenizer.pad_token_id)
    w = batch.pop("loss_weights")[:, 1:]
    logits = trainer.model(**batch, use_cache=False).logits[:, :-1].float()
    nll = torch.nn.functional.cross_entropy(
        logits.reshape(-1, logits.shape[-1]), batch["labels"][:, 1:].reshape(-1), ignore_index=IGNORE_INDEX,
        reduction="none",
    )
    labelled = batch["labels"][:, 1:].reshape(-1) != IGNORE_INDEX
    weighted = (nll * w.reshape(-1)).sum() / w.sum()
    weighted.backward()
    return float(nll[labelled].mean().detach()), float(weighted.detach()), grads(trainer)


PATHS = {
    "fast-lora-checkpointed": [],
    "fast-lora": ["train.gradient_checkpointing=false"],
    "peft": ["train.fast_lora=false"],
    "peft-half-checkpointed": ["train.fast_lora=false", "train.gradient_checkpointing=true", "train.checkpoint_layers=1"],
}


@pytest.mark.parametrize("packed", [False, True], ids=["rows", "packed"])
@pytest.mark.parametrize("path", list(PATHS))
def test_the_gradient_is_the_weighted_mean_s_and_the_loss_the_plain_mean(model_dir, tmp_path, path, packed):
    rows = weighted_rows()
    rows = packed_rows(rows) if packed else rows
    trainer, _ = make_trainer(model_dir, rows, tmp_path, "quant.compute_dtype=float32", *PATHS[path], max_length=2 * SEQ)
    plain_loss, weighted_loss, want = reference(trainer, rows)
    assert abs(weighted_loss - plain_loss) > 1e-3  # the weights matter to this loss
    loss, got = engine_step(trainer, [collate(rows, trainer.tokenizer.pad_token_id)])
    assert rel_err(got, want) < 1e-5
    assert loss == pytest.approx(plain_loss, rel=1e-5)
    # and the unweighted step's gradient is far from it: the weights act
    _, unweighted = engine_step(trainer, [collate(rows, trainer.tokenizer.pad_token_id, weights=False)])
    assert rel_err(unweighted, want) > 0.05


def test_a_step_split_into_micro_batches_has_the_same_gradient(model_dir, tmp_path):
    rows = weighted_rows(seed=1, n=4)
    trainer, _ = make_trainer(model_dir, rows, tmp_path, "quant.compute_dtype=float32")
    pad = trainer.tokenizer.pad_token_id
    _, whole = engine_step(trainer, [collate(rows, pad)])
    _, split = engine_step(trainer, [collate(rows[:1], pad), collate(rows[1:3], pad), collate(rows[3:], pad)])
    assert rel_err(split, whole) < 1e-5


@pytest.mark.parametrize("scale", [0.01, 0.5, 1.0, 3.0, 40.0])
def test_the_same_weight_on_every_token_is_the_unweighted_step(model_dir, tmp_path, scale):
    rows = weighted_rows(seed=2)
    for r in rows:
        r["weights"] = [scale if lab != IGNORE_INDEX else 0.0 for lab in r["labels"]]
    trainer, _ = make_trainer(model_dir, rows, tmp_path, "quant.compute_dtype=float32")
    pad = trainer.tokenizer.pad_token_id
    loss_w, weighted = engine_step(trainer, [collate(rows, pad)])
    loss_p, plain = engine_step(trainer, [collate(rows, pad, weights=False)])
    assert rel_err(weighted, plain) < 1e-5 and loss_w == pytest.approx(loss_p, rel=1e-6)


def test_a_weighted_chat_dataset_trains_end_to_end_with_evaluation(tiny_cfg, tmp_path):
    """The whole run from a file: weighted answers (a turn weight, part weights, a weight 0 turn),
    packing, accumulation and a validation split; the reported losses are finite and fall."""
    rows = []
    for i in range(24):
        answer = [{"type": "text", "text": "Arr!", "weight": 0.2}, {"type": "text", "text": f" The answer is {i % 5}."}]
        rows.append({"messages": [{"role": "user", "content": f"What is {i % 5}?"},
                                  {"role": "assistant", "content": answer, "weight": 1 + i % 3},
                                  {"role": "user", "content": "Again?"},
                                  {"role": "assistant", "content": "No.", "weight": 0}]})
    path = tmp_path / "weighted.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = tiny_cfg(f"data.path={path}", "data.packing=true", "data.validation_split=0.2",
                   "train.gradient_accumulation_steps=2", "train.micro_batch_size=2", "train.max_steps=6")
    sink = ListSink()
    finished = run(cfg, sink)
    losses = [e.loss for e in sink.events if isinstance(e, StepMetrics)]
    assert isinstance(finished, RunFinished) and finished.step == 6 and (cfg.output_dir / "adapter").is_dir()
    assert all(np.isfinite(losses)) and losses[-1] < losses[0]
    assert finished.final_eval_loss is not None and np.isfinite(finished.final_eval_loss)


def test_weights_on_a_model_whose_decoder_is_not_found_are_refused_by_name():
    from qlora_engine.errors import DataError

    weights = torch.ones(1, 4)
    with pytest.raises(DataError, match="loss weights") as e, loss_weights.weighted(None, weights, 3, 3.0):
        pass
    assert e.value.field == "data.path"
    with loss_weights.weighted(None, None, 3, None):  # no weights: nothing is asked of the model
        pass
