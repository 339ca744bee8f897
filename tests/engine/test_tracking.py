"""Experiment tracking: a run with ``output.report_to: [tensorboard]`` leaves TensorBoard event files
that TensorBoard's own reader reads back with the run's numbers; a broken tracker warns, the run goes on."""

from __future__ import annotations

import json

import pytest

from qlora_engine.config import TrainConfig, apply_overrides
from qlora_engine.errors import ConfigError
from qlora_engine.events import ListSink, LogLine, RunFinished, StepMetrics, read_events
from qlora_engine.runner import run
from qlora_engine.tracking import TENSORBOARD_DIR, available, check_trackers


def _cfg(model_dir, data, out, *extra: str) -> TrainConfig:
    return apply_overrides(
        TrainConfig(),
        [
            f"model.ref={model_dir}",
            f"data.path={data}",
            f"data.validation_path={data}",
            f"output.dir={out}",
            "train.max_steps=6",
            "train.eval_steps=3",
            "train.micro_batch_size=2",
            "train.save_steps=null",
            "train.gradient_checkpointing=false",
            "optim.learning_rate=1e-2",
            "optim.warmup_steps=0",
            *extra,
        ],
    )


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    path = tmp_path_factory.mktemp("tracking-data") / "train.jsonl"
    rows = ["The capital of France is Paris.", "1 2 3 4 5 6 7 8 9 10", "Translate: good morning. Bonjour."]
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in rows), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def tb_run(tiny_model_dir, data, tmp_path_factory):
    out = tmp_path_factory.mktemp("tracking") / "run"
    sink = ListSink()
    run(_cfg(tiny_model_dir, data, out, "output.report_to=[tensorboard]"), sink)
    return out, sink


def test_tensorboard_event_files_read_back_with_the_runs_numbers(tb_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out, sink = tb_run
    files = list((out / TENSORBOARD_DIR).glob("events.out.tfevents.*"))
    assert files, "no TensorBoard event file in the run folder"
    acc = EventAccumulator(str(out / TENSORBOARD_DIR))
    acc.Reload()
    tags = acc.Tags()["scalars"]
    assert {"train/loss", "train/learning_rate", "train/grad_norm", "eval/loss"} <= set(tags)
    steps = sink.of(StepMetrics)
    logged = {s.step: s.value for s in acc.Scalars("train/loss")}
    assert sorted(logged) == [s.step for s in steps] == list(range(1, 7))
    for s in steps:  # float32 in the event file
        assert logged[s.step] == pytest.approx(s.loss, rel=1e-6)
    # the same stream as events.jsonl: both views of the run agree
    jsonl = [e for e in read_events(out / "events.jsonl") if isinstance(e, StepMetrics)]
    assert [e.loss for e in jsonl] == [s.loss for s in steps]
    assert [s.step for s in acc.Scalars("eval/loss")] == [3, 6]
    assert "lora.rank" in acc.Tensors("config/text_summary")[0].tensor_proto.string_val[0].decode()


def test_a_tracker_that_fails_warns_once_and_the_run_goes_on(tiny_model_dir, data, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / TENSORBOARD_DIR).write_text("a file where the tracker wants its folder")
    sink = ListSink()
    run(_cfg(tiny_model_dir, data, out, "output.report_to=[tensorboard]", "train.max_steps=2"), sink)
    warnings = [e for e in sink.of(LogLine) if e.message.startswith("tensorboard: stopped logging")]
    assert len(warnings) == 1
    assert sink.of(RunFinished) and (out / "adapter" / "adapter_model.safetensors").is_file()
    assert [e for e in read_events(out / "events.jsonl") if isinstance(e, LogLine) and e in warnings]


def test_a_tracker_that_is_not_installed_is_refused_naming_the_field():
    if available("mlflow"):
        pytest.skip("mlflow is installed here")  # the refusal is what is tested; covered where it is absent
    with pytest.raises(ConfigError) as info:
        check_trackers(["tensorboard", "mlflow"])
    assert info.value.field == "output.report_to" and "pip install mlflow" in info.value.fix


def test_report_to_round_trips_and_refuses_unknown_trackers():
    cfg = apply_overrides(TrainConfig(), ["output.report_to=[tensorboard, wandb]"])
    assert TrainConfig.from_yaml(cfg.to_yaml()).output.report_to == ["tensorboard", "wandb"]
    with pytest.raises(ConfigError):
        apply_overrides(TrainConfig(), ["output.report_to=[comet]"])
