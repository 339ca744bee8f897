"""``train.compile`` (off | blocks | graphs): the config field, the batches it pads and the run it trains.

The run tests train a real 1-layer NF4 Llama on the CPU through ``runner.run`` with the blocks
compiled by torch.compile. The backend is ``aot_eager`` (``CompiledBlocks.BACKEND``): dynamo's
graphs and AOT autograd's forward/backward partition as on a GPU, without inductor's code
generation, which takes minutes on these CPUs; what inductor and CUDA graphs buy is measured on a
card (bench/NOTES.md). The compiled run must train the eager run's losses, with no graph break, a
bounded number of graphs whatever the sample lengths, and evaluate without compiling anything more.
"""

from __future__ import annotations

import json

import pytest
import torch
from conftest import write_jsonl
from tiny import build_tiny_llama
from torch._dynamo.utils import counters

from qlora_engine import fast_lora
from qlora_engine.config import TrainConfig, apply_overrides
from qlora_engine.data import collate
from qlora_engine.errors import ConfigError
from qlora_engine.events import ListSink, LogLine, StepMetrics
from qlora_engine.runner import build_trainer, run

# --- the field --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [("off", "off"), ("'off'", "off"), ("blocks", "blocks"), ("graphs", "graphs"), ('"graphs"', "graphs"),
     ("false", "off"), ("no", "off"), ("Off", "off"), ("OFF", "off")],
)  # fmt: skip
def test_yaml_values_read_as_meant(text, expected):
    # YAML 1.1 reads off/no/false as false: the choice called 'off' is what the user meant.
    cfg = TrainConfig.from_yaml(f"train:\n  compile: {text}\n")
    assert cfg.train.compile == expected
    assert apply_overrides(TrainConfig(), [f"train.compile={text}"]).train.compile == expected


@pytest.mark.parametrize(
    "text",
    ["on", "true", "yes", "Blocks", "GRAPHS", "fast", "cudagraphs", "reduce-overhead", "inductor", "1", "0", "2.5",
     "''", "null", "[blocks]", "{a: 1}", "block", "graph", "max-autotune"],
)  # fmt: skip
def test_other_values_are_refused_at_the_field_with_the_choices(text):
    with pytest.raises(ConfigError) as e:
        TrainConfig.from_yaml(f"train:\n  max_steps: 3\n  compile: {text}\n", source="run.yaml")
    msg = str(e.value)
    assert "train.compile" in msg and "'blocks'" in msg and "'graphs'" in msg, msg
    assert msg.startswith("run.yaml:3:"), msg  # where to look


CONFLICTS = [
    ["train.offload_activations=true"],
    ["train.offload_activations=true", "train.gradient_checkpointing=true"],
    ["train.mlp_chunk_tokens=64"],
    ["train.mlp_chunk_tokens=4096"],
    ["train.mlp_chunk_tokens=1048576"],
    ["train.mlp_chunk_tokens=512", "train.offload_activations=true"],
]


@pytest.mark.parametrize("how", ["blocks", "graphs"])
@pytest.mark.parametrize("others", CONFLICTS, ids=lambda o: ",".join(o))
def test_compiling_refuses_the_memory_switches_it_cannot_run_with(how, others):
    with pytest.raises(ConfigError) as e:
        apply_overrides(TrainConfig(), [f"train.compile={how}", *others])
    msg = str(e.value)
    assert "train.compile" in msg and "off" in msg, msg
    named = {o.split("=")[0] for o in others} & {"train.offload_activations", "train.mlp_chunk_tokens"}
    assert any(n in msg for n in named), msg
    apply_overrides(TrainConfig(), ["train.compile=off", *others])  # eager: allowed


@pytest.mark.parametrize("how", ["off", "blocks", "graphs"])
def test_the_choice_survives_a_save_and_load(tmp_path, how):
    cfg = apply_overrides(TrainConfig(), [f"train.compile={how}"])
    cfg.save(tmp_path / "c.yaml")
    assert TrainConfig.load(tmp_path / "c.yaml").train.compile == how


# --- the batches ------------------------------------------------------------------------------


@pytest.mark.parametrize("longest", [1, 5, 100, 255, 256, 257, 511, 512, 700, 999, 1000, 1001, 2048, 3000])
@pytest.mark.parametrize("cap", [None, 8, 256, 1000, 2048])
@pytest.mark.parametrize("packed", [False, True])
def test_padding_to_a_multiple_stops_at_the_cap(longest, cap, packed):
    rows = [{"input_ids": [7] * n, "labels": [7] * n} for n in (longest, max(1, longest // 3))]
    if packed:
        for r in rows:
            r["position_ids"] = list(range(len(r["input_ids"])))
    batch = collate(rows, 0, multiple=256, cap=cap)
    width = batch["input_ids"].shape[1]
    rounded = -(-longest // 256) * 256
    assert width == max(longest, min(rounded, cap if cap is not None else rounded))
    assert width >= longest and (width % 256 == 0 or width in (cap, longest))
    # the padding carries no label and no attention (or positions of its own when packed)
    assert int((batch["labels"] != -100).sum()) == sum(len(r["input_ids"]) for r in rows)
    if packed:
        assert "attention_mask" not in batch and batch["position_ids"][0, longest:].tolist() == list(
            range(width - longest)
        )
    else:
        assert int(batch["attention_mask"].sum()) == sum(len(r["input_ids"]) for r in rows)
    plain = collate(rows, 0)
    assert plain["input_ids"].shape[1] == longest
    assert torch.equal(batch["input_ids"][:, :longest], plain["input_ids"])


# --- the run ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def one_layer(tmp_path_factory):
    return build_tiny_llama(tmp_path_factory.mktemp("tiny-llama-1"), layers=1)


@pytest.fixture
def aot_eager(monkeypatch):
    monkeypatch.setattr(fast_lora.CompiledBlocks, "BACKEND", "aot_eager")
    torch._dynamo.reset()
    counters.clear()
    yield
    torch._dynamo.reset()


def varied_data(path, varied=True):
    """Samples from 6 to 140 words (several padded widths under data.max_length=300), or all of 40."""
    rows = [
        {"text": " ".join(f"w{(i * j) % 89}" for j in range(6 + 19 * (i % 8) if varied else 40))} for i in range(16)
    ]
    return write_jsonl(path, rows)


def config(model, tmp_path, name, *overrides, varied=True):
    return apply_overrides(
        TrainConfig(),
        [f"model.ref={model}", f"data.path={varied_data(tmp_path / 'd.jsonl', varied)}", f"output.dir={tmp_path / name}",
         "data.max_length=300", "train.max_steps=4", "train.micro_batch_size=2", "train.gradient_accumulation_steps=2",
         "train.save_steps=null", "optim.warmup_steps=0", "optim.learning_rate=1e-2", *overrides],
    )  # fmt: skip


def losses(sink):
    return [e.loss for e in sink.of(StepMetrics)]


@pytest.mark.usefixtures("aot_eager")
def test_a_compiled_run_trains_the_eager_losses_in_few_graphs_and_evaluates_eagerly(one_layer, tmp_path):
    # 'graphs' on the CPU: the layers compiled without CUDA graphs, and a note that says so
    eager = ListSink()
    run(config(one_layer, tmp_path, "eager", "data.validation_split=0.2"), eager)
    torch._dynamo.reset()
    counters.clear()
    compiled = ListSink()
    trainer = build_trainer(
        config(one_layer, tmp_path, "compiled", "data.validation_split=0.2", "train.compile=graphs"), compiled
    )
    trainer.setup()
    widths = {trainer.micro_batch(k)["input_ids"].shape[1] for k in range(8)}
    assert widths and all(w % 256 == 0 or w == 300 for w in widths), widths
    trainer.train()
    notes = [e.message for e in compiled.of(LogLine) if "train.compile" in e.message]
    assert notes == ["train.compile graphs: CUDA graphs need a GPU; compiling the layers only"], notes
    graphs = counters["stats"]["unique_graphs"]
    assert not counters["graph_break"], dict(counters["graph_break"])
    # Per input kind (a batch with padding has an attention mask, a full one has none): a static
    # graph for the first width, then one for any width (automatic dynamic shapes). Never one per width.
    assert 1 <= graphs <= 4, graphs
    torch.testing.assert_close(losses(compiled), losses(eager), rtol=1e-5, atol=0)
    assert len(losses(compiled)) == 4
    # evaluation ran (validation split) in eval mode: the eager blocks, nothing compiled for it
    assert trainer.evaluate() is not None
    assert counters["stats"]["unique_graphs"] == graphs
    # and the run's record says it was compiled
    cfg = json.loads(json.dumps(trainer.plan.requested.to_dict()))
    assert cfg["train"]["compile"] == "graphs" and trainer.facts["compiled"] == "graphs"
    trainer.cleanup()


@pytest.mark.usefixtures("aot_eager")
def test_checkpointing_every_layer_after_an_out_of_memory_step_keeps_the_layers_compiled(one_layer, tmp_path):
    # What the trainer does after a CUDA out-of-memory step under gradient_checkpointing auto,
    # called directly (the CPU cannot run out of GPU memory): the layers are checkpointed and
    # still compiled, and the step gives the eager step's loss.
    sink = ListSink()
    trainer = build_trainer(
        config(
            one_layer,
            tmp_path,
            "grow",
            "train.compile=blocks",
            "train.gradient_checkpointing=false",
            "train.max_steps=2",
            varied=False,  # one width: one graph to compile
        ),
        sink,
    )
    trainer.setup()
    block = trainer.model.get_base_model().model.layers[0]
    before = block._gradient_checkpointing_func
    trainer._checkpoint_every_layer()
    assert trainer.checkpointed == 1 and block.gradient_checkpointing
    assert block._gradient_checkpointing_func is not before  # the checkpointed compiled function now
    assert type(block._gradient_checkpointing_func).__name__ != "partial"  # not transformers' eager checkpoint
    trainer.train()
    assert counters["stats"]["unique_graphs"] >= 1 and not counters["graph_break"]
    eager = ListSink()
    torch._dynamo.reset()
    run(
        config(
            one_layer, tmp_path, "eager-ckpt", "train.gradient_checkpointing=true", "train.max_steps=2", varied=False
        ),
        eager,
    )
    torch.testing.assert_close(losses(sink), losses(eager), rtol=1e-5, atol=0)
    trainer.cleanup()


def test_a_compiler_that_fails_leaves_the_run_eager_with_a_warning_and_the_eager_losses(
    one_layer, tmp_path, monkeypatch
):
    # A real torch.compile failure: the backend (the compiler dynamo hands each graph to) compiles the
    # first graph and raises on the next one, which comes mid-run (another width or mask kind). The
    # step that met it runs again eagerly from zeroed gradients, and the run goes on uncompiled.
    compiles = []

    def flaky_compiler(gm, _example_inputs):
        compiles.append(gm)
        if len(compiles) > 1:
            raise RuntimeError("this compiler gives up on its second graph")
        return gm.forward

    monkeypatch.setattr(fast_lora.CompiledBlocks, "BACKEND", staticmethod(flaky_compiler))
    torch._dynamo.reset()
    sink = ListSink()
    run(config(one_layer, tmp_path, "flaky", "train.compile=blocks", "train.max_steps=4"), sink)
    torch._dynamo.reset()
    warnings = [e.message for e in sink.of(LogLine) if e.level == "warning" and "train.compile" in e.message]
    assert len(compiles) == 2 and len(warnings) == 1, (len(compiles), warnings)
    assert "compiling the layers failed at step" in warnings[0] and "second graph" in warnings[0]
    assert "train.compile to off" in warnings[0]
    eager = ListSink()
    run(config(one_layer, tmp_path, "flaky-eager", "train.max_steps=4"), eager)
    torch.testing.assert_close(losses(sink), losses(eager), rtol=1e-5, atol=0)


@pytest.mark.parametrize("processes", [2, 3, 8])
def test_compiled_layers_are_refused_for_several_processes_before_anything_compiles(one_layer, tmp_path, processes):
    trainer = build_trainer(config(one_layer, tmp_path, "one", "train.max_steps=1"), ListSink())
    trainer.setup()
    block = trainer.model.get_base_model().model.layers[0]
    before = (block.gradient_checkpointing, block.__dict__.get("_gradient_checkpointing_func"))
    with pytest.raises(ConfigError) as e:
        fast_lora.CompiledBlocks(trainer.model, "graphs", torch.device("cpu"), processes)
    assert e.value.field == "train.compile" and f"{processes} GPUs" in str(e.value) and "off" in str(e.value)
    assert (block.gradient_checkpointing, block.__dict__.get("_gradient_checkpointing_func")) == before
    trainer.cleanup()
