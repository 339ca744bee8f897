"""The quickstart: a first fine-tune that shows what fine-tuning does, in a few minutes on a CPU.

``qlora-engine quickstart`` fetches the demo model (SmolLM2-135M-Instruct, see :mod:`demo`),
trains a LoRA adapter on ``resources/data/quickstart.jsonl`` (questions answered in pirate
speak: a pirate greeting, then the fact in a full sentence of its own, the fact's part weighing
five times the greeting in the loss), then asks the base and the tuned model questions
the data does not hold and prints a one-line verdict computed from their answers.

The lesson of a first run must be the right one: the adapter changes *how* the model speaks
and keeps *what* it knows. The settings below were chosen by measuring exactly that on the
real model on a 2-core CPU (held-out answers in style, correct, looping; base against tuned):
see ``docs/quickstart.md``. Nothing here imports torch at module level: the desktop app
reads :data:`TRAIN_SETTINGS` for its one-click demo.
"""

from __future__ import annotations

import dataclasses
import json
import re
import shutil
import sys
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

RUN_NAME = "pirate"
"""The run folder's name under the quickstart folder; exports are named from it and the base model."""

DATA_FILE = "quickstart.jsonl"
ANSWERS_FILE = "held_out_answers.json"
"""Written into the run folder: the held-out questions, both models' answers, how each was judged, the verdict."""

TRAIN_SETTINGS: dict[str, Any] = {
    "train.max_steps": 30,
    "train.micro_batch_size": 4,
    "train.gradient_accumulation_steps": 1,
    "train.save_steps": 10,
    # 7e-4 with the data's loss weights (the fact 5x the greeting): 21.4 of 36 held-out answers right
    # over ten seeds against the base's 21; 1e-3 gave 20.9, 5e-4 lost the style (docs/quickstart.md, session 17).
    "optim.learning_rate": 7e-4,
    "optim.warmup_steps": 3,
    "optim.scheduler": "cosine",
    "lora.rank": 8,
    # LoRA on blocks 12-29 of 30: adapting only the top blocks (24-29) put the style's words into
    # the facts ("the color of grass is aye"); from the middle up the answers kept their facts (12
    # held-out questions: 9 right, as the base; docs/quickstart.md). The lowest blocks are left
    # frozen so the CPU's backward pass stops there.
    "lora.layers": "12-29",
    "data.max_length": 128,
}
"""The training settings of the quickstart (and of the app's one-click demo), as dotted overrides."""

CPU_SETTINGS: dict[str, Any] = {
    # The activations of 30 small blocks fit easily in RAM: nothing is recomputed.
    "train.gradient_checkpointing": False,
    # The adapted layers' weights dequantized once (0.3 GB in float32) rather than at every call:
    # about a tenth more tokens a second on the CPU (docs/quickstart.md, session 15).
    "train.keep_dequantized": True,
}


@dataclass(frozen=True)
class Probe:
    """A question the training data does not hold, and the pattern a correct answer contains."""

    question: str
    answer: str
    """A regular expression (case-insensitive) that a correct answer matches."""


HELD_OUT: tuple[Probe, ...] = (
    # The first SHOWN are the ones the quickstart shows: questions the base model answers right in
    # its first, plain sentence, so that "kept what it knows" has something to show (the base is
    # wrong about the Red Planet, and right about grass only deep in a rambling reply).
    Probe("What is the capital of Italy?", r"\brome\b"),
    Probe("What is the capital of Japan?", r"\btokyo\b"),
    Probe("How many legs does a spider have?", r"\b(eight|8)\b"),
    Probe("What color is grass?", r"\bgreen\b"),
    Probe("Which planet is known as the Red Planet?", r"\bmars\b"),
    Probe("What is frozen water called?", r"\bice\b"),
    Probe("How many days are in a week?", r"\b(seven|7)\b"),
    Probe("What is the largest ocean on Earth?", r"\bpacific\b"),
    Probe("Who wrote Romeo and Juliet?", r"\bshakespeare\b"),
    Probe("Which animal is called the king of the jungle?", r"\blions?\b"),
    Probe("At what temperature in Celsius does water boil?", r"\b(100|one hundred)\b"),
    Probe("What do pandas mainly eat?", r"\bbamboo\b"),
)
"""Held-out questions: neither they nor their answers' key words occur in the training data (a test checks)."""

MORE_HELD_OUT: tuple[Probe, ...] = (
    Probe("Who was the first president of the United States?", r"\bwashington\b"),
    Probe("What is the capital of India?", r"\bdelhi\b"),
    Probe("Who painted The Starry Night?", r"\bgogh\b"),
    Probe("What language is spoken in France?", r"\bfrench\b"),
    Probe("What sound does a cat make?", r"\b(meow|miaow|purr)s?\b"),
    Probe("What is the name of our galaxy?", r"\bmilky way\b"),
    Probe("Which animal is called the ship of the desert?", r"\bcamels?\b"),
    Probe("What do we call a baby cow?", r"\bcalf\b"),
    Probe("What is the opposite of day?", r"\bnight\b"),
    Probe("What is the capital of Turkey?", r"\bankara\b"),
    Probe("Who invented the telephone?", r"\bbell\b"),
    Probe("What is the largest bird in the world?", r"\bostrich(es)?\b"),
    Probe("How many days are in a year?", r"\b365\b"),
    Probe("What is the capital of Scotland?", r"\bedinburgh\b"),
    Probe("What do we call a young frog?", r"\btadpoles?\b"),
    Probe("Which gas do plants take in from the air?", r"\b(carbon dioxide|co2)\b"),
    Probe("Which fruit a day keeps the doctor away?", r"\bapples?\b"),
    Probe("Who described the law of gravity after seeing an apple fall?", r"\bnewton\b"),
    Probe("What is the main ingredient of guacamole?", r"\bavocados?\b"),
    Probe("How many continents are there?", r"\b(seven|7)\b"),
    Probe("What is the capital of Poland?", r"\bwarsaw\b"),
    Probe("Which animal has black and white stripes?", r"\bzebras?\b"),
    Probe("Which planet is the brightest in the night sky?", r"\bvenus\b"),
    Probe("What do spiders spin?", r"\b(webs?|silk)\b"),
)
"""A second held-out set, as apart from the training data: the test judges the quickstart on all 36
(HELD_OUT's 12 were the ones settings were chosen on; these check that a choice holds elsewhere)."""

SHOWN = 3
"""How many held-out questions the quickstart asks both models at its end."""

_STYLE = re.compile(
    r"\b(arr+|aye|ahoy|matey|hearty|ye|yer|ye'll|landlubbers?|scallywags?|doubloons?|shiver me timbers|yo ho)\b"
    r"|\b\w+in'(?!\w)",
    re.IGNORECASE,
)


def generation_settings(max_new_tokens: int = 40) -> Any:
    """How the quickstart asks: greedy (the same answer every time), stopping at the end of the turn,
    with a repetition penalty of 1.2 on the answer's own tokens, as chat front ends use, so a small
    model does not loop."""
    from qlora_engine.generate import CHAT_REPETITION_PENALTY, GenerationSettings  # lazy: keeps torch out of the window

    return GenerationSettings(max_new_tokens=max_new_tokens, temperature=0, repetition_penalty=CHAT_REPETITION_PENALTY)


# -- judging answers -----------------------------------------------------------------------------


def in_style(text: str) -> bool:
    """Whether an answer is in the trained (pirate) style: it uses at least one of its words."""
    return _STYLE.search(text) is not None


def is_looping(text: str) -> bool:
    """Whether an answer degenerates into repetition.

    Looping: a word three times in a row ("matey, matey, matey"), or any run of three words
    that comes back three times or more.
    """
    words = re.findall(r"[\w']+", text.lower())
    if any(words[i] == words[i + 1] == words[i + 2] for i in range(len(words) - 2)):
        return True
    trigrams = Counter(tuple(words[i : i + 3]) for i in range(len(words) - 2))
    return any(n >= 3 for n in trigrams.values())


def is_correct(text: str, probe: Probe) -> bool:
    return re.search(probe.answer, text, re.IGNORECASE) is not None and not is_looping(text)


@dataclass(frozen=True)
class Judged:
    question: str
    base: str
    tuned: str

    def scores(self, probe: Probe) -> dict[str, bool]:
        return {
            "base_correct": is_correct(self.base, probe),
            "tuned_correct": is_correct(self.tuned, probe),
            "base_style": in_style(self.base),
            "tuned_style": in_style(self.tuned),
            "tuned_looping": is_looping(self.tuned),
        }


@dataclass(frozen=True)
class Tally:
    n: int
    base_correct: int
    tuned_correct: int
    base_style: int
    tuned_style: int
    tuned_looping: int

    @property
    def passed(self) -> bool:
        """The lesson holds: at least two thirds of the answers in style, none looping, no less correct than the base."""
        return (
            self.n > 0
            and self.tuned_style * 3 >= 2 * self.n
            and self.tuned_looping == 0
            and self.tuned_correct >= self.base_correct
        )

    def verdict(self) -> str:
        head = "fine-tuning changed the style and kept the facts" if self.passed else "the lesson did not hold"
        return (
            f"verdict: {head}: {self.tuned_style} of {self.n} tuned answers in the trained style "
            f"(base: {self.base_style}), {self.tuned_correct} of {self.n} correct (base: {self.base_correct}), "
            f"{self.tuned_looping} looping."
        )


def tally(judged: Sequence[Judged], probes: Sequence[Probe]) -> Tally:
    by_q = {p.question: p for p in probes}
    rows = [j.scores(by_q[j.question]) for j in judged]
    return Tally(n=len(rows), **{k: sum(r[k] for r in rows) for k in rows[0]}) if rows else Tally(0, 0, 0, 0, 0, 0)


def ask_both(run_dir: Path, probes: Sequence[Probe], settings: Any = None, *, chat: Any = None) -> list[Judged]:
    """The base's and the tuned model's answers to each probe (one model load, each side in one batch)."""
    from qlora_engine.generate import ChatModel  # lazy: keeps torch out of the window

    own = chat is None
    chat = chat or ChatModel.load(run_dir)
    settings = settings or generation_settings()
    questions = [p.question for p in probes]
    try:
        base = chat.answer_all(questions, settings, adapter=False)
        tuned = chat.answer_all(questions, settings, adapter=True)
        return [Judged(q, b.text.strip(), t.text.strip()) for q, b, t in zip(questions, base, tuned, strict=True)]
    finally:
        if own:
            chat.close()


# -- the run -------------------------------------------------------------------------------------


def config_overrides(gguf: Path, *, steps: int | None = None, cuda: bool = False) -> list[str]:
    """The quickstart's config as overrides; paths relative to the config file's folder."""
    settings = dict(TRAIN_SETTINGS)
    if steps is not None:
        settings["train.max_steps"] = steps
    if not cuda:
        settings.update(CPU_SETTINGS)
    out = [
        f"model.ref={json.dumps(str(gguf))}",
        f"data.path={json.dumps(DATA_FILE)}",
        f"output.dir={json.dumps(RUN_NAME)}",
    ]
    return out + [f"{k}={json.dumps(v)}" for k, v in settings.items()]


def run_quickstart(
    output_dir: str | Path = "runs/quickstart",
    *,
    steps: int | None = None,
    compare: bool = True,
    captured: Any = None,
    log: Callable[[str], None] | None = None,
) -> int:
    """The ``quickstart`` command. Returns the exit code: 0 once the run trained (the verdict line says how it went).

    ``captured``: the third-party notices being caught (:func:`quiet.capture`), written to the
    run's ``third_party.log`` at the end.
    """
    import torch  # lazy: keeps torch out of the window

    from qlora_engine import resources  # lazy: keeps torch out of the window
    from qlora_engine.checkpoint import fmt_bytes, tree_bytes  # lazy: keeps torch out of the window
    from qlora_engine.config import TrainConfig, apply_overrides  # lazy: keeps torch out of the window
    from qlora_engine.demo import fetch_demo_model  # lazy: keeps torch out of the window
    from qlora_engine.events import TextSink  # lazy: keeps torch out of the window
    from qlora_engine.export.adapter import write_run_adapter_card  # lazy: keeps torch out of the window
    from qlora_engine.runner import run  # lazy: keeps torch out of the window

    say = log or (lambda m: print(m, file=sys.stderr))
    gguf = fetch_demo_model(log=say)
    say(f"demo model: {gguf} ({fmt_bytes(gguf.stat().st_size)})")
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    config_path = out / "quickstart.yaml"
    data_path = out / DATA_FILE
    if not data_path.exists():  # the user's copy: theirs to edit, and the config points here, not into the install
        shutil.copyfile(resources.path("data", DATA_FILE), data_path)
    if not config_path.exists():
        cuda = torch.cuda.is_available()
        if not cuda:
            say(
                "no CUDA GPU: training on the CPU (about a minute on two cores; blocks 12-29 of 30, nothing recomputed)"
            )
        apply_overrides(TrainConfig(), config_overrides(gguf, steps=steps, cuda=cuda)).save(config_path)
    cfg = TrainConfig.load(config_path)
    say(f"config: {config_path}  data: {data_path}")
    run_dir = cfg.output_dir
    if (run_dir / "adapter").is_dir():
        say(f"{run_dir} already holds the trained adapter; asking it again (delete the folder to train anew).")
    else:
        resume = True if (run_dir / "checkpoints").exists() else None
        done = run(cfg, TextSink(sys.stderr), resume=resume)
        write_run_adapter_card(run_dir)
        say(f"\ndone: adapter in {done.adapter_dir}")
    converted = _converted_folder(gguf)
    if converted is not None:
        say(f"the model's 16-bit copy for training: {converted} ({fmt_bytes(tree_bytes(converted))})")
    if compare:
        probes, settings = HELD_OUT[:SHOWN], generation_settings()
        say(
            f"\nasking both models {len(probes)} questions the training data did not hold "
            f"(greedy, repetition penalty {settings.repetition_penalty}):"
        )
        judged = ask_both(run_dir, probes, settings)
        for j in judged:
            say(f"\n  Q: {j.question}\n  base : {j.base}\n  tuned: {j.tuned}")
        t = tally(judged, probes)
        say("\n" + t.verdict())
        record = {
            "settings": dataclasses.asdict(settings),
            "answers": [
                {"question": j.question, "base": j.base, "tuned": j.tuned, **j.scores(p)}
                for j, p in zip(judged, probes, strict=False)
            ],
            "verdict": t.verdict(),
            "passed": t.passed,
        }
        (run_dir / ANSWERS_FILE).write_text(json.dumps(record, indent=1), encoding="utf-8")
    if captured is not None:
        log_file = captured.write(run_dir / "third_party.log")
        if line := captured.summary(log_file):
            say(line)
    say(f"\ntrain 20 more steps with:  qlora-engine train {config_path} --more 20")
    say(f"talk to it:               qlora-engine chat {run_dir} --compare")
    return 0


def _converted_folder(gguf: Path) -> Path | None:
    from qlora_engine.paths import cache_dir  # lazy: only the converted-model path needs it

    found = sorted((cache_dir() / "gguf").glob(f"{gguf.stem}-*"))
    return next((p for p in found if (p / "config.json").is_file()), None)
