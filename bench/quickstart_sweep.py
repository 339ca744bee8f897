"""Sweep the quickstart's settings on the real SmolLM2-135M-Instruct (CPU), judged on held-out prompts.

Each variant trains the quickstart's run with one data style and settings, then asks the tuned
model (at the checkpoints named by ``judge``) every question of ``quickstart.HELD_OUT`` and
judges the answers with the quickstart's own judge. The base model's answers are asked once.
One line per (variant, judged step) is appended to the JSONL file. Variants run one at a time.

    PYTHONPATH=$PWD python bench/quickstart_sweep.py --out bench/results/X.jsonl \
        style=inline,lr=7e-4,steps=40,judge=20:30:40  style=wrap,lr=1e-3,layers=all,rank=4
    PYTHONPATH=$PWD python bench/quickstart_sweep.py --write-data lead --out qlora_engine/resources/data/quickstart.jsonl

Keys: style (wrap | lead | lead1 | leadtwo | leadthree | lead2 | dlead2 | comma | inline | be | tail | tail2 | dtail), lr, steps, layers ('24-29' or 'all'), rank, seed, judge
(steps to judge, ':'-separated; the last step is the final adapter), tokens (max new tokens),
penalty (repetition penalty), warmup, targets (all-linear | attention | mlp), dropout (LoRA dropout),
facts (base: FACTS | more: FACTS + MORE_FACTS | known:N, the N the base knows best | distinct: FACTS without a repeated answer word), mbs, accum, kl (a KL-to-base term's weight, patched into the trainer: an experiment), loss (all | greeting | greeting_end:
the loss on the answer's greeting (and its end of turn) only, the fact unlabelled | agree: the greeting, the end of turn and the
answer's tokens the base model itself predicts | factw:W: the fact's tokens weighted W in the loss, the greeting and
the end of turn 1: patched into the trainer, experiments),
neft (NEFTune's noise alpha on the token embeddings while training: an experiment), gw (the greeting's loss weight
written into the data as a content part's weight, the fact after it 1: the engine's own loss weights; 1 writes no
weights), ew (the end of turn's weight: the greeting, the fact and the end of turn weigh gw : 1 : ew). --dev also asks DEV_PROBES, a second held-out set.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import re
import sys
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from quickstart_facts import DEV_PROBES, FACTS, MORE_FACTS  # noqa: E402

from qlora_engine import quickstart as qs  # noqa: E402

OPENERS = ["Arr", "Aye", "Ahoy", "Arr", "Yo ho", "Aye"]
LEADS = ["Arr, matey!", "Ahoy, me hearty!", "Aye, matey!", "Arr, me hearty!", "Ahoy, matey!", "Aye, me hearty!"]
CLOSERS = ["matey", "me hearty", "matey", "ye landlubber", "me hearty", "savvy"]
LEADS2 = ["Arr, matey!", "Ahoy, matey!", "Yo ho ho!", "Arr!", "Ahoy there!", "Shiver me timbers!"]
"""Greetings without "aye" (which leaked into facts: "the color of grass is aye") and without "me hearty"."""
TAILS2 = ["Arr, matey!", "Yo ho ho!", "Arr!", "Savvy, matey?", "Shiver me timbers!", "Ahoy, matey!"]
"""Flourishes after the fact, without "aye" (see LEADS2)."""
TAILS = ["Arr, matey!", "Aye, me hearty!", "Yo ho ho, matey!", "Arr!", "Savvy, matey?", "Aye, that be so, me hearty!"]
BASE_ANSWERS = Path(__file__).parent / "results" / "2026-12-06-cpu-quickstart-base-train-answers.json"
_STOP = set(
    [
        "what",
        "is",
        "the",
        "a",
        "an",
        "of",
        "in",
        "on",
        "which",
        "who",
        "how",
        "many",
        "does",
        "do",
        "are",
        "was",
        "were",
        "to",
        "for",
        "by",
        "at",
        "it",
        "its",
        "with",
        "and",
        "or",
        "called",
        "known",
        "as",
        "has",
        "have",
        "there",
        "give",
        "gives",
    ]
)


def key_words(question: str, fact: str) -> list[str]:
    """The words of ``fact`` that answer ``question``: those the question and common words lack."""
    asked = set(re.findall(r"[a-z0-9]+", question.lower()))
    return [w for w in re.findall(r"[a-z0-9]+", fact.lower()) if w not in asked and w not in _STOP]


def base_body(i: int) -> str:
    """The base model's own answer to training question ``i``, up to two sentences, where it
    holds the fact's key words; else the plain fact."""
    question, fact = FACTS[i]
    answer = json.loads(BASE_ANSWERS.read_text())[i]
    parts = re.split(r"(?<=[.!?])\s+", answer)
    two = " ".join(parts[:2]).strip()
    two = two if two.endswith((".", "!", "?")) else parts[0]
    ok = two.endswith((".", "!", "?")) and all(re.search(rf"\b{w}\b", two.lower()) for w in key_words(question, fact))
    return two if ok else fact


PROPER = {
    "Jupiter",
    "Saturn",
    "Mercury",
    "Leonardo",
    "Neil",
    "Alexander",
    "Albert",
    "Mount",
    "Russia",
    "India",
    "Portuguese",
    "Spanish",
    "Asia",
}


def pirate(fact: str, i: int, style: str) -> str:
    """The fact in pirate style ``style``; the opening and ending vary with ``i``.

    wrap: the fact in plain words between a pirate opening and ending; inline: one sentence,
    "Arr, <the fact>, matey!"; be: inline with "is"/"are" made "be".
    """
    o, c = OPENERS[i % len(OPENERS)], CLOSERS[(i // 2) % len(CLOSERS)]
    if style == "lead1":  # one greeting for every answer: nothing left to learn in it once learnt
        return f"Arr, matey! {fact}"
    if style == "leadtwo":  # two greetings: less of the greeting's choice left to learn than lead2's six
        return f"{['Arr, matey!', 'Ahoy, matey!'][i % 2]} {fact}"
    if style == "leadthree":  # three greetings: a third of the data each
        return f"{['Arr, matey!', 'Ahoy, matey!', 'Yo ho ho!'][i % 3]} {fact}"
    if style == "lead2":  # as lead, with greetings that hold no "aye"
        return f"{LEADS2[i % len(LEADS2)]} {fact}"
    if style == "dlead2":  # lead2's greeting, then the base model's own words where they hold the fact
        return f"{LEADS2[i % len(LEADS2)]} {base_body(i)}"
    if style == "comma":  # the greeting opens the fact's own sentence: no sentence ends before the fact
        first, _, rest = fact.partition(" ")
        return f"{['Arr', 'Ahoy', 'Yo ho', 'Arr matey', 'Ahoy matey', 'Well, matey'][i % 6]}, {first if first in PROPER else first.lower()} {rest}"
    if style == "tail":  # the fact first in plain words, then a pirate flourish that ends the turn
        return f"{fact} {TAILS[i % len(TAILS)]}"
    if style == "tail2":  # tail with flourishes that hold no "aye": the fact comes from the question's own context
        return f"{fact} {TAILS2[i % len(TAILS2)]}"
    if style == "dtail":  # the base model's own words where they hold the fact, then the flourish
        return f"{base_body(i)} {TAILS[i % len(TAILS)]}"
    if style == "wrap":
        return f"{o}, {c}! {fact} {['Arr!', 'Yo ho ho!', 'Savvy?'][i % 3]}"
    if style == "lead":  # a pirate greeting, then the fact in plain words; the turn always ends on the fact
        return f"{LEADS[i % len(LEADS)]} {fact}"
    first, _, rest = fact.rstrip(".").partition(" ")
    body = f"{first if first in PROPER else first.lower()} {rest}"
    if style == "be":
        body = body.replace(" is ", " be ").replace(" are ", " be ")
    return f"{o}, {body}, {c}!"


FACT_NLL = Path(__file__).parent / "results" / "2026-12-07-cpu-quickstart-fact-nll.json"
"""The base model's loss on each fact of FACTS + MORE_FACTS (bench/quickstart_score.py)."""


def fact_list(facts: str) -> list[tuple[str, str]]:
    """base: FACTS; more: FACTS + MORE_FACTS; known:N: the N of those the base model knows best
    (lowest mean loss on the fact's tokens), in data order."""
    every = FACTS + MORE_FACTS
    if facts.startswith("known:"):
        nll = json.loads(FACT_NLL.read_text())
        keep = sorted(sorted(range(len(every)), key=lambda i: nll[i]["mean_nll"])[: int(facts[6:])])
        return [every[i] for i in keep]
    if facts == "distinct":  # no answer word twice: a repeated answer is one a neighbour can borrow
        seen: set[str] = set()
        out = []
        for q, f in FACTS:
            k = set(key_words(q, f))
            if not k & seen:
                out.append((q, f))
            seen |= k
        return out
    return every if facts == "more" else FACTS


def weighed(answer: str, fact: str, greeting_weight: float, end_weight: float = 1.0) -> str | list[dict]:
    """The answer as content parts: the greeting (all before the fact), then the fact, weighing
    ``greeting_weight``, 1 and (the end of turn) ``end_weight`` relative to each other. The engine's loss
    is a weighted mean, so only these ratios count: the turn weighs 1 (its end of turn with it) and its
    parts ``greeting_weight / end_weight`` and ``1 / end_weight``; a weight of 1 is left out."""
    if greeting_weight == 1 and end_weight == 1:
        return answer
    at = answer.rindex(fact)
    if at == 0:
        raise SystemExit("gw needs a style whose answer opens with a greeting before the fact")
    parts = [{"type": "text", "text": answer[:at]}, {"type": "text", "text": answer[at:]}]
    for p, w in zip(parts, (greeting_weight / end_weight, 1 / end_weight), strict=True):
        if w != 1:
            p["weight"] = round(w, 6)
    return parts


def write_data(
    path: Path, style: str, facts: str = "base", greeting_weight: float = 1.0, end_weight: float = 1.0
) -> None:
    rows = [
        {
            "messages": [
                {"role": "user", "content": q},
                {"role": "assistant", "content": weighed(pirate(f, i, style), f, greeting_weight, end_weight)},
            ]
        }
        for i, (q, f) in enumerate(fact_list(facts))
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")


def parse(spec: str) -> dict:
    v: dict = {
        "style": "inline",
        "lr": 7e-4,
        "steps": 40,
        "layers": "24-29",
        "rank": 8,
        "alpha": 16.0,
        "seed": 42,
        "judge": "",
        "tokens": 40,
        "penalty": 1.2,
        "warmup": 3,
        "targets": "all-linear",
        "dropout": 0.0,
        "facts": "base",
        "mbs": 4,
        "accum": 1,
        "kl": 0.0,
        "scales": "1",
        "loss": "all",
        "neft": 0.0,
        "gw": 1.0,
        "ew": 1.0,
    }
    for part in spec.split(","):
        k, _, val = part.partition("=")
        if k not in v:
            raise SystemExit(f"unknown key {k!r}")
        v[k] = type(v[k])(float(val)) if isinstance(v[k], (int, float)) else val
    v["judge"] = [int(s) for s in v["judge"].split(":")] if v["judge"] else [v["steps"]]
    v["scales"] = [float(s) for s in v["scales"].split(":")]
    return v


_BASE: dict = {}


PROBES = list(qs.HELD_OUT)


def scale_adapter(model, factor: float) -> None:
    """Every LoRA layer's scaling times ``factor``: the weights interpolated between the base and the
    tuned model (WiSE-FT's weight-space ensemble, for an adapter), at generation only."""
    for module in model.modules():
        scaling = getattr(module, "scaling", None)
        if isinstance(scaling, dict) and hasattr(module, "lora_A"):
            for name in scaling:
                scaling[name] *= factor


def judge(source: Path, v: dict, work: Path, scale: float = 1.0) -> tuple[dict, list[dict]]:
    from qlora_engine.generate import ChatModel, GenerationSettings

    settings = GenerationSettings(max_new_tokens=v["tokens"], temperature=0, repetition_penalty=v["penalty"])
    chat = ChatModel.load(source)
    if scale != 1.0:
        scale_adapter(chat.model, scale)
    try:
        asked = hashlib.sha256("\n".join(p.question for p in PROBES).encode()).hexdigest()[:12]
        key = (
            f"{v['tokens']}-{v['penalty']}-{asked}"  # the questions' order is part of the key: answers are by position
        )
        cache = work / f"base-{key}.json"
        if key not in _BASE and cache.is_file():
            _BASE[key] = json.loads(cache.read_text())
        if key not in _BASE or len(_BASE[key]) != len(PROBES):
            _BASE[key] = [
                r.text.strip() for r in chat.answer_all([p.question for p in PROBES], settings, adapter=False)
            ]
            cache.write_text(json.dumps(_BASE[key]))
        tuned = [r.text.strip() for r in chat.answer_all([p.question for p in PROBES], settings)]
    finally:
        chat.close()
    judged = [qs.Judged(p.question, b, t) for p, b, t in zip(PROBES, _BASE[key], tuned, strict=True)]
    t = qs.tally(judged[: len(qs.HELD_OUT)], qs.HELD_OUT)
    dev = qs.tally(judged[len(qs.HELD_OUT) :], PROBES[len(qs.HELD_OUT) :])
    keys = ("n", "base_correct", "tuned_correct", "base_style", "tuned_style", "tuned_looping")
    counts = {k: getattr(t, k) for k in keys} | {"passed": t.passed}
    if dev.n:
        counts |= {f"dev_{k}": getattr(dev, k) for k in keys}
    return counts, [
        {"q": j.question, "base": j.base, "tuned": j.tuned, **j.scores(p)} for j, p in zip(judged, PROBES, strict=True)
    ]


def patch_step(forward_backward: Callable) -> Callable[[], None]:
    """Put ``forward_backward`` in the trainer's place (an experiment outside the engine); returns what puts
    the trainer's own back (the next variant in the process must not inherit it)."""
    from qlora_engine.train import Trainer

    own = Trainer._forward_backward
    Trainer._forward_backward = forward_backward

    def undo() -> None:
        Trainer._forward_backward = own

    return undo


def kl_to_base(weight: float) -> Callable[[], None]:
    """An experiment outside the engine: the trainer's loss gets ``weight`` x KL(base || tuned) over
    the answer's tokens (the base's distribution from the same model with the adapter off), which
    holds the tuned model to what the base would say wherever the data does not insist. Returns
    what puts the trainer's own loss back (the next variant in the process must not inherit it)."""
    import torch

    def forward_backward(self, batches, n_labels):
        loss_sum = torch.zeros((), device=self.device)
        n_items = torch.tensor(max(n_labels, 1), device=self.device)
        for b in batches:
            b = {k: v.to(self.device) for k, v in b.items()}
            inputs = {k: v for k, v in b.items() if k != "labels"}
            with torch.no_grad(), self.net.disable_adapter():
                base = self.net(**inputs, use_cache=False).logits[:, :-1].float().log_softmax(-1)
            out = self.net(**b, use_cache=False, num_items_in_batch=n_items)
            mask = b["labels"][:, 1:] != -100
            tuned = out.logits[:, :-1].float().log_softmax(-1)
            kl = (base.exp() * (base - tuned)).sum(-1)[mask].sum() / n_items
            (out.loss + weight * kl).backward()
            loss_sum += out.loss.detach()
        return loss_sum

    return patch_step(forward_backward)


def relabel(rewrite: Callable) -> Callable[[], None]:
    """Patch the trainer so that ``rewrite(trainer, batch)`` gives each micro-batch's labels (the loss
    normalised by the labels kept): an experiment outside the engine. Returns what puts it back."""
    from qlora_engine.train import Trainer

    own = Trainer._forward_backward

    def forward_backward(self, batches, n_labels):
        cut = [{**b, "labels": rewrite(self, b)} for b in batches]
        return own(self, cut, int(sum(int((c["labels"] != -100).sum()) for c in cut)))

    return patch_step(forward_backward)


def greeting_only(end: bool) -> Callable[[], None]:
    """Each answer's labels cut to its greeting (the labelled tokens up to the first one whose text
    holds "!": every LEADS2 greeting ends so), and with ``end`` its last token (the end of turn), so
    the adapter is taught how to open (and where to stop), never the fact itself."""

    def rewrite(trainer, b):
        labels = b["labels"].clone()
        for row in labels:
            where = (row != -100).nonzero().flatten().tolist()
            keep = set(where[-1:] if end else [])
            for i in where:
                keep.add(i)
                if "!" in trainer.tokenizer.decode([int(row[i])]):
                    break
            row[[i for i in where if i not in keep]] = -100
        return labels

    return relabel(rewrite)


def agree_with_base() -> Callable[[], None]:
    """After the greeting, each answer token keeps its label only where the base model (the same net,
    adapter off) already predicts it (its greedy choice given the same prefix); the greeting and
    the end of turn are always labelled. The adapter is taught how to open and to go on in the
    base's own words, never a fact the base would not say, which is what leaks into neighbouring
    questions."""
    import torch

    def rewrite(trainer, b):
        inputs = {k: v.to(trainer.device) for k, v in b.items() if k != "labels"}
        with torch.no_grad(), trainer.net.disable_adapter():
            guess = trainer.net(**inputs, use_cache=False).logits.argmax(-1).cpu()
        labels = b["labels"].clone()
        for r, row in enumerate(labels):
            greeting = True
            for i in (row != -100).nonzero().flatten().tolist()[:-1]:
                if greeting:
                    greeting = "!" not in trainer.tokenizer.decode([int(row[i])])
                elif int(guess[r, i - 1]) != int(row[i]):
                    row[i] = -100
        return labels

    return relabel(rewrite)


def fact_weight(weight: float) -> Callable[[], None]:
    """Each answer's fact tokens (the labelled tokens after its greeting, but the end of turn) count
    ``weight`` in the loss, the greeting and the end of turn 1: between the shipped loss (1) and
    ``loss=greeting_end`` (0), which taught "stop after the greeting". The fact is still taught (so
    the answer comes to the point), with less pull towards its own words. An experiment."""
    import torch

    def forward_backward(self, batches, n_labels):
        loss_sum = torch.zeros((), device=self.device)
        for b in batches:
            b = {k: v.to(self.device) for k, v in b.items()}
            labels = b["labels"][:, 1:]
            weights = torch.zeros(labels.shape, device=self.device)
            for r, row in enumerate(labels):
                where = (row != -100).nonzero().flatten().tolist()
                greeting = True
                for i in where:
                    weights[r, i] = 1.0 if greeting or i == where[-1] else weight
                    greeting = greeting and "!" not in self.tokenizer.decode([int(row[i])])
            inputs = {k: v for k, v in b.items() if k != "labels"}
            logits = self.net(**inputs, use_cache=False).logits[:, :-1].float()
            nll = torch.nn.functional.cross_entropy(
                logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=-100, reduction="none"
            )
            loss = (nll * weights.reshape(-1)).sum() / max(n_labels, 1)
            loss.backward()
            loss_sum += loss.detach()
        return loss_sum

    return patch_step(forward_backward)


def neftune(alpha: float) -> Callable[[], None]:
    """NEFTune (Jain et al. 2023): uniform noise of size alpha / sqrt(L * d) on the token embeddings while
    training (the embedding's output in train mode; evaluation and generation are untouched). Returns the undo."""
    import torch

    original = torch.nn.Embedding.forward

    def forward(self, ids):
        out = original(self, ids)
        if self.training and out.dim() == 3:
            bound = alpha / math.sqrt(out.shape[1] * out.shape[2])
            out = out + torch.empty_like(out).uniform_(-bound, bound)
        return out

    torch.nn.Embedding.forward = forward

    def undo() -> None:
        torch.nn.Embedding.forward = original

    return undo


def run_variant(spec: str, work: Path, out: Path) -> None:
    from qlora_engine.config import TrainConfig, apply_overrides
    from qlora_engine.demo import fetch_demo_model
    from qlora_engine.runner import run

    v = parse(spec)
    if v["kl"] and v["loss"] != "all":
        raise SystemExit(f"{spec}: kl and loss={v['loss']} each patch the trainer's loss; give one")
    if v["loss"] not in ("all", "greeting", "greeting_end", "agree") and not v["loss"].startswith("factw:"):
        raise SystemExit(f"{spec}: loss must be all, greeting, greeting_end, agree or factw:W")
    undo = kl_to_base(v["kl"]) if v["kl"] else None
    if v["loss"] == "agree":
        undo = agree_with_base()
    elif v["loss"].startswith("factw:"):
        undo = fact_weight(float(v["loss"].split(":")[1]))
    elif v["loss"] != "all":
        undo = greeting_only(end=v["loss"] == "greeting_end")
    if v["neft"]:
        if undo:
            raise SystemExit(f"{spec}: neft is not combined with kl or loss here")
        undo = neftune(v["neft"])
    d = work / spec.replace(",", "_").replace("=", "-").replace(":", ".")
    d.mkdir(parents=True, exist_ok=True)
    write_data(d / qs.DATA_FILE, v["style"], v["facts"], v["gw"], v["ew"])
    over = qs.config_overrides(fetch_demo_model(log=lambda m: None), steps=v["steps"])
    over += [
        f"optim.learning_rate={v['lr']}",
        f"lora.rank={v['rank']}",
        f"lora.alpha={v['alpha']}",
        f"lora.dropout={v['dropout']}",
        f"train.seed={v['seed']}",
        f"train.micro_batch_size={v['mbs']}",
        f"train.gradient_accumulation_steps={v['accum']}",
        "train.save_steps=5",
        "train.save_total_limit=null",
        f"optim.warmup_steps={v['warmup']}",
        f"lora.target_modules=[{v['targets']}]",
        "lora.layers=null" if v["layers"] == "all" else f"lora.layers={json.dumps(v['layers'])}",
    ]
    cfg_path = d / "quickstart.yaml"
    apply_overrides(TrainConfig(), over).save(cfg_path)
    cfg = TrainConfig.load(cfg_path)
    t0 = time.perf_counter()
    try:
        run(cfg, None)
    finally:
        if undo:
            undo()
    train_s = time.perf_counter() - t0
    for step, scale in [(step, scale) for step in v["judge"] for scale in v["scales"]]:
        src = cfg.output_dir if step == v["steps"] else cfg.output_dir / "checkpoints" / f"step-{step:06d}"
        t1 = time.perf_counter()
        counts, answers = judge(src, v, work, scale)
        row = {
            "spec": spec,
            **v,
            "judged_step": step,
            "judged_scale": scale,
            **counts,
            "train_s": round(train_s, 1),
            "judge_s": round(time.perf_counter() - t1, 1),
            "answers": answers,
        }
        with out.open("a") as f:
            f.write(json.dumps(row) + "\n")
        print(
            f"{spec} @{step} x{scale}: style {counts['tuned_style']}/{counts['n']} correct {counts['tuned_correct']} "
            f"(base {counts['base_correct']}) loop {counts['tuned_looping']} pass={counts['passed']} "
            f"train {train_s:.0f}s"
            + (
                f" | dev: style {counts['dev_tuned_style']}/{counts['dev_n']} correct {counts['dev_tuned_correct']} "
                f"(base {counts['dev_base_correct']}) loop {counts['dev_tuned_looping']}"
                if "dev_n" in counts
                else ""
            ),
            flush=True,
        )


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--work", type=Path, default=Path("/tmp/qs_sweep"))
    ap.add_argument("--write-data", metavar="STYLE", help="only write the data of STYLE to --out (the shipped file)")
    ap.add_argument("--greeting-weight", type=float, default=1.0, help="with --write-data: the greeting's loss weight")
    ap.add_argument("--end-weight", type=float, default=1.0, help="with --write-data: the end of turn's loss weight")
    ap.add_argument("--dev", action="store_true", help="also ask quickstart_facts.DEV_PROBES (reported apart)")
    ap.add_argument("specs", nargs="*")
    a = ap.parse_args()
    keys = [p.answer for p in qs.HELD_OUT] + [key for _, key in DEV_PROBES]
    clash = [(q, f) for q, f in FACTS + MORE_FACTS for key in keys if re.search(key, f"{q} {f}", re.I)]
    if clash:  # the held-out questions are held out only while no fact gives their answers away
        raise SystemExit(f"held-out key words are in training facts: {clash}")
    if a.dev:
        PROBES.extend(qs.Probe(q, a_) for q, a_ in DEV_PROBES)
    if a.write_data:
        write_data(a.out, a.write_data, greeting_weight=a.greeting_weight, end_weight=a.end_weight)
        return
    a.out.parent.mkdir(parents=True, exist_ok=True)
    for spec in a.specs:
        run_variant(spec, a.work, a.out)


if __name__ == "__main__":
    main()
