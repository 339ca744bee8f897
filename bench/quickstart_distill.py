"""Self-distilled quickstart data, measured: a pirate greeting, then the BASE model's own answer.

The idea: if the training answer after the greeting is what the base model itself says, only the
greeting is new to learn, so the tuned model should keep the base's knowledge and length.

    python bench/quickstart_distill.py RUN_DIR style=distill,lr=1e-3,steps=30,judge=20:30 ...

RUN_DIR is any quickstart run folder (its base model answers the training questions once; the
answers are cached in bench/results). Styles: ``distill`` (the base answer clipped to two
sentences) and ``distillfull`` (the answer as generated, at most 40 tokens). Variants are run and
judged by ``bench/quickstart_sweep.py``; results go to ``bench/results/…-quickstart-distill.jsonl``.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))
sys.path.insert(0, str(ROOT))

import quickstart_sweep as sw  # noqa: E402
from quickstart_facts import FACTS  # noqa: E402

RESULTS = ROOT / "bench" / "results"
ANSWERS = RESULTS / "2026-12-06-cpu-quickstart-base-train-answers.json"


def base_answers(run_dir: str) -> list[str]:
    if not ANSWERS.exists():
        from qlora_engine.generate import ChatModel, GenerationSettings

        chat = ChatModel.load(run_dir)
        settings = GenerationSettings(max_new_tokens=40, temperature=0, repetition_penalty=1.2)
        answers = [chat.generate(q, settings, adapter=False).text.strip() for q, _ in FACTS]
        chat.close()
        ANSWERS.write_text(json.dumps(answers, indent=1))
    return json.loads(ANSWERS.read_text())


def clip(answer: str) -> str:
    """Up to two whole sentences."""
    parts = re.split(r"(?<=[.!?])\s+", answer)
    two = " ".join(parts[:2]).strip()
    return two if two.endswith((".", "!", "?")) else parts[0]


def main() -> None:
    answers = base_answers(sys.argv[1])

    def write_data(path: Path, style: str) -> None:
        rows = []
        for i, ((question, _fact), answer) in enumerate(zip(FACTS, answers, strict=True)):
            body = {"distill": clip(answer), "distillfull": answer}[style]
            text = f"{sw.LEADS[i % len(sw.LEADS)]} {body}"
            rows.append({"messages": [{"role": "user", "content": question}, {"role": "assistant", "content": text}]})
        path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")

    sw.write_data = write_data
    for spec in sys.argv[2:]:
        sw.run_variant(spec, Path("/tmp/qs_distill"), RESULTS / "2026-12-06-cpu-quickstart-distill.jsonl")


if __name__ == "__main__":
    main()
