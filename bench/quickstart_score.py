"""How well the base demo model already knows each training fact: its loss on the fact's tokens.

For every (question, fact) of ``quickstart_facts.FACTS + MORE_FACTS``, the base model (the cached
SmolLM2-135M-Instruct, plain transformers, fp32, CPU) reads the chat-templated question and the
lead2 answer (greeting + fact); the loss is taken over the fact's tokens only: mean and largest
per-token negative log-likelihood. Written as JSON, one row per fact in data order, for the
sweep's ``facts=known:N`` (the N facts the base knows best).

    PYTHONPATH=$PWD python bench/quickstart_score.py --out bench/results/2026-12-07-cpu-quickstart-fact-nll.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from quickstart_facts import FACTS, MORE_FACTS  # noqa: E402
from quickstart_sweep import LEADS2  # noqa: E402


def main() -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from qlora_engine.demo import fetch_demo_model
    from qlora_engine.model_ref import gguf_to_folder

    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, required=True)
    a = ap.parse_args()
    folder = gguf_to_folder(fetch_demo_model(log=lambda m: None))
    tok = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    rows = []
    for i, (q, fact) in enumerate(FACTS + MORE_FACTS):
        greeting = LEADS2[i % len(LEADS2)]
        prompt = tok.apply_chat_template([{"role": "user", "content": q}], tokenize=False, add_generation_prompt=True)
        head = tok(prompt + greeting + " ", add_special_tokens=False)["input_ids"]
        ids = tok(prompt + greeting + " " + fact, add_special_tokens=False)["input_ids"]
        with torch.no_grad():
            logits = model(torch.tensor([ids])).logits[0]
        nll = torch.nn.functional.cross_entropy(logits[:-1], torch.tensor(ids[1:]), reduction="none")
        fact_nll = nll[len(head) - 1 :]
        rows.append(
            {
                "i": i,
                "q": q,
                "fact": fact,
                "mean_nll": round(fact_nll.mean().item(), 4),
                "max_nll": round(fact_nll.max().item(), 4),
            }
        )
        print(f"{rows[-1]['mean_nll']:6.3f} {rows[-1]['max_nll']:6.3f}  {q} | {fact}", flush=True)
    a.out.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
