"""torch.compile of the decoder blocks on the fast LoRA path (fast_lora.frozen4bit_linear, compile_blocks).

A real 2-layer NF4 Llama on the CPU (bitsandbytes' CPU kernels), trained through the engine's
Trainer. Each block must compile into one graph (``fullgraph=True``: a graph break raises) in
which every frozen 4-bit matmul is the one opaque op, forward and backward (its input gradient
a second op, no weight gradient), and the compiled forward and backward (``aot_eager``: the same
aten ops, no code generation) must give eager's loss and LoRA gradients, under gradient
checkpointing (the compiled backward recomputes the block) and without it.
"""

from __future__ import annotations

from collections import Counter

import pytest
import torch
from tiny import build_tiny_llama
from torch._dynamo.utils import counters

from qlora_engine import fast_lora
from qlora_engine.config import TrainConfig, apply_overrides
from qlora_engine.data import PreparedData, collate
from qlora_engine.events import ListSink
from qlora_engine.runner import build_trainer

SEQ = 64
OP, GRAD = torch.ops.qlora.frozen4bit_linear.default, torch.ops.qlora.frozen4bit_linear_grad.default


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return build_tiny_llama(tmp_path_factory.mktemp("tiny-llama-2"), layers=2)


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def make_trainer(model_dir, tmp_path, *overrides: str):
    ids = torch.randint(0, 200, (2, SEQ), generator=torch.Generator().manual_seed(0))
    samples = [{"input_ids": row.tolist(), "labels": row.tolist()} for row in ids]
    cfg = apply_overrides(
        TrainConfig(),
        [f"model.ref={model_dir}", "data.path=synthetic", f"output.dir={tmp_path / 'run'}", f"data.max_length={SEQ}",
         *overrides],
    )  # fmt: skip
    trainer = build_trainer(
        cfg, ListSink(), data=PreparedData(train=samples, validation=None, report={}, fingerprint="x")
    )
    trainer.setup()
    gen = torch.Generator().manual_seed(1234)  # peft starts B at zero (every A gradient zero): give B values
    with torch.no_grad():
        for name, p in sorted(trainer.model.named_parameters()):
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.02)
    return trainer, collate(samples, trainer.tokenizer.pad_token_id)


def step(model, batch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    model.zero_grad(set_to_none=True)
    loss = model(**batch, use_cache=False).loss
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def recording_backend(graphs: list[tuple[str, torch.fx.GraphModule]]):
    """aot_eager with inductor's partitioner (min-cut) that keeps each forward and backward graph it runs."""
    import functools

    from functorch.compile import make_boxed_func, min_cut_rematerialization_partition
    from torch._dynamo.backends.common import aot_autograd

    def keep(kind: str):
        def compiler(gm: torch.fx.GraphModule, _inputs):
            graphs.append((kind, gm))
            return make_boxed_func(gm.forward)

        return compiler

    partition = functools.partial(min_cut_rematerialization_partition, compiler="inductor")
    return aot_autograd(fw_compiler=keep("forward"), bw_compiler=keep("backward"), partition_fn=partition)


def computed_saves(gm: torch.fx.GraphModule) -> list[torch.fx.Node]:
    """What a forward graph hands its backward besides its own inputs (the values it computed)."""
    (output,) = [n for n in gm.graph.nodes if n.op == "output"]
    inputs = {n for n in gm.graph.nodes if n.op == "placeholder"}
    return [n for n in output.args[0][1:] if isinstance(n, torch.fx.Node) and n not in inputs]


def calls(gm: torch.fx.GraphModule) -> Counter:
    return Counter(n.target for m in gm.modules() if isinstance(m, torch.fx.GraphModule) for n in m.graph.nodes)


@pytest.mark.parametrize(
    ("dtype", "checkpointing"),
    [("bfloat16", True), ("float32", False)],
    ids=["bf16-checkpointed", "fp32-no-checkpointing"],
)
def test_compiled_blocks_are_one_graph_each_with_eager_s_loss_and_lora_gradients(
    model_dir, tmp_path, monkeypatch, dtype, checkpointing
):
    # Compiled, the frozen matmul's input gradient is the op's, summed with the LoRA half's by
    # autograd; eager does the same with MERGE_4BIT off (on, it adds the two in one GEMM: other rounding).
    monkeypatch.setattr(fast_lora, "MERGE_4BIT", False)
    trainer, batch = make_trainer(
        model_dir,
        tmp_path,
        f"quant.compute_dtype={dtype}",
        f"train.gradient_checkpointing={str(checkpointing).lower()}",
    )
    assert trainer.fast_lora == 2 * 7 and trainer.checkpointed == (2 if checkpointing else 0)
    model = trainer.model
    loss_eager, grads_eager = step(model, batch)

    graphs: list[tuple[str, torch.fx.GraphModule]] = []
    counters.clear()
    undo = fast_lora.compile_blocks(model, backend=recording_backend(graphs), fullgraph=True, dynamic=False)
    loss, grads = step(model, batch)
    loss_again, grads_again = step(model, batch)  # compiled once, run again: no new graph
    undo()
    assert not counters["graph_break"]  # fullgraph=True would have raised at one, too
    assert step(model, batch)[0] == loss_eager and len(graphs) == 4  # eager again

    # Two graphs each way: layer 0's input needs no gradient (the embeddings are frozen), layer 1's does.
    # Forward: every frozen 4-bit matmul is the op. Backward: each projection's input gradient is the
    # second op (all 7 in layer 1; 4 in layer 0, whose q, k, v need none). Checkpointed, the compiled
    # backward recomputes the block's 4-bit matmuls but the last (down_proj's output only fed the
    # residual sum); without checkpointing it recomputes none.
    recomputed = 6 if checkpointing else 0
    summary = sorted((kind, calls(gm)[OP], calls(gm)[GRAD]) for kind, gm in graphs)
    assert summary == [("backward", recomputed, 4), ("backward", recomputed, 7), ("forward", 7, 0), ("forward", 7, 0)]
    assert not any("bitsandbytes" in str(target) for _, gm in graphs for target in calls(gm))

    # Checkpointed, the compiled forward keeps only the block's inputs (hidden states, position
    # embeddings, weights, quant state) and SDPA's RNG state, nothing the block computed: every op is
    # marked must-recompute. Session 9's card (torch 2.11, the default "prefer" hint) kept the six
    # 4-bit projections' outputs, 77 KB a token and layer at 8B. Without checkpointing it keeps
    # activations of its own (what makes that mode fast and heavy).
    for kind, gm in graphs:
        if kind != "forward":
            continue
        computed = computed_saves(gm)
        if checkpointing:
            assert len(computed) <= 1 and all(n.meta["val"].dtype == torch.uint8 for n in computed), computed
            tags = {n.meta.get("recompute") for n in gm.graph.nodes if n.target == OP}
            assert tags == {torch.utils.checkpoint.CheckpointPolicy.MUST_RECOMPUTE}, tags
        else:
            assert len(computed) > 10, computed

    torch.testing.assert_close(loss, loss_eager, rtol=0, atol=0)
    torch.testing.assert_close(loss_again, loss_eager, rtol=0, atol=0)
    assert grads.keys() == grads_eager.keys() and len(grads) == 2 * 7 * 2
    for name, g in grads.items():
        torch.testing.assert_close(g, grads_eager[name], rtol=0, atol=0, msg=name)
        torch.testing.assert_close(grads_again[name], g, rtol=0, atol=0, msg=name)


def test_the_op_is_the_eager_matmul_bit_for_bit(model_dir, tmp_path):
    # The op's own implementation (what a compiled graph runs) against the eager autograd function.
    trainer, _ = make_trainer(model_dir, tmp_path, "quant.compute_dtype=bfloat16")
    base = trainer.model.get_base_model().model.layers[1].mlp.down_proj.base_layer
    x = torch.randn(5, base.in_features, dtype=torch.bfloat16, generator=torch.Generator().manual_seed(0))
    g = torch.randn(5, base.out_features, dtype=torch.bfloat16, generator=torch.Generator().manual_seed(1))
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    y1 = fast_lora.frozen4bit_linear(x1, base.bias, *fast_lora.quant_parts(base.weight))
    y2 = fast_lora._Frozen4bit.apply(x2, base)
    y1.backward(g)
    y2.backward(g)
    assert torch.equal(y1, y2) and torch.equal(x1.grad, x2.grad)
    torch.library.opcheck(
        fast_lora.frozen4bit_linear, (x1.detach().requires_grad_(), None, *fast_lora.quant_parts(base.weight))
    )
