"""Same math on real weights, on the CPU: how far each path's LoRA gradients are from float32.

    python bench/same_math_cpu.py [--model FOLDER] [--seq 256] [--rows 2]

``bench/same_math.py`` compares the engine with the plain stack on the GPU, on random weights.
This runs the engine's code on a trained model (default: SmolLM2-135M-Instruct, the demo
model, dequantized once into the user cache) and real text (default: this repository's README), all
on the same NF4 weights, batch and LoRA initialisation (B given values), and prints each
path's LoRA gradient error against the float32 reference:

- ``baseline``: bf16 4-bit matmuls with every other weight upcast to fp32, as the plain stack's
  ``prepare_model_for_kbit_training`` does (an fp32 residual stream), peft's LoRA;
- ``peft-bf16``: the engine with ``train.fast_lora=false`` (bf16 activations, fp32 LoRA);
- ``fast-bf16``: the engine's default (``train.fast_lora``);
- ``fast-bf16-fp32-head``: the same with the output projection (logits) in fp32.

Takes a minute or two on two cores. Prints one JSON line.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))


def demo_model_folder() -> Path:
    from qlora_engine.demo import fetch_demo_model
    from qlora_engine.model_ref import gguf_to_folder

    return gguf_to_folder(fetch_demo_model())


def fp32_residual_stream(m, compute=torch.bfloat16) -> None:
    """The residual stream in float32, everything else as it was: the embeddings' output upcast, every
    norm's output (what the projections read) and the rotary tables back in ``compute``."""
    m.get_input_embeddings().register_forward_hook(lambda _m, _i, out: out.float())
    for module in m.modules():
        kind = type(module).__name__.lower()
        if "norm" in kind:
            module.register_forward_hook(lambda _m, _i, out: out.to(compute))
        elif "rotary" in kind:
            module.register_forward_hook(lambda _m, _i, out: tuple(t.to(compute) for t in out))


def grads(model: Path, samples: list[dict], seq: int, overrides: list[str], *, upcast=False, fp32_head=False,
          fp32_residual=False):
    from qlora_engine.config import TrainConfig, apply_overrides
    from qlora_engine.data import PreparedData, collate
    from qlora_engine.events import ListSink
    from qlora_engine.runner import build_trainer

    cfg = apply_overrides(TrainConfig(), [f"model.ref={model}", "data.path=synthetic", "output.dir=/tmp/same-math-cpu",
                                          f"data.max_length={seq}", "train.device=cpu", *overrides])
    trainer = build_trainer(cfg, ListSink(), data=PreparedData(train=samples, validation=None, report={}, fingerprint="x"))
    trainer.setup()
    m = trainer.model
    if upcast:  # what prepare_model_for_kbit_training does to every weight that is not 4-bit
        for p in m.parameters():
            if p.dtype in (torch.bfloat16, torch.float16):
                p.data = p.data.float()
    if fp32_residual:
        fp32_residual_stream(m)
    if fp32_head:
        head = m.get_output_embeddings()
        head.forward = lambda x, w=head.weight: F.linear(x.float(), w.float())
    gen = torch.Generator().manual_seed(1234)
    with torch.no_grad():
        for name, p in sorted(m.named_parameters()):
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.02)
    loss = m(**collate(samples, trainer.tokenizer.pad_token_id), use_cache=False).loss
    loss.backward()
    return float(loss.detach()), {n: p.grad.float().clone() for n, p in m.named_parameters() if p.requires_grad}


def rel_err(got: dict, want: dict) -> float:
    diff = sum(float((got[k] - want[k]).pow(2).sum()) for k in want)
    return (diff / sum(float(want[k].pow(2).sum()) for k in want)) ** 0.5


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", help="a Hugging Face folder; default: the SmolLM2 demo model")
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--rows", type=int, default=2)
    ap.add_argument("--text", default=str(HERE.parent / "README.md"), help="a text file to take the tokens from")
    args = ap.parse_args()
    model = Path(args.model) if args.model else demo_model_folder()
    from transformers import AutoTokenizer

    ids = AutoTokenizer.from_pretrained(model)(Path(args.text).read_text())["input_ids"]
    samples = [{"input_ids": ids[i * args.seq:(i + 1) * args.seq]} for i in range(args.rows)]
    for s in samples:
        s["labels"] = s["input_ids"]
    bf16 = "quant.compute_dtype=bfloat16"
    loss_ref, ref = grads(model, samples, args.seq, ["quant.compute_dtype=float32", "train.fast_lora=false"])
    paths = {
        "baseline": dict(overrides=[bf16, "train.fast_lora=false"], upcast=True),
        "peft-bf16": dict(overrides=[bf16, "train.fast_lora=false"]),
        "fast-bf16": dict(overrides=[bf16]),
        "fast-bf16-fp32-head": dict(overrides=[bf16], fp32_head=True),
        "fast-bf16-fp32-residual": dict(overrides=[bf16], fp32_residual=True),
        "fast-bf16-fp32-residual-head": dict(overrides=[bf16], fp32_residual=True, fp32_head=True),
    }
    res: dict = {"model": model.name, "text": Path(args.text).name, "seq": args.seq, "rows": args.rows, "loss_fp32": loss_ref}
    got = {}
    for name, how in paths.items():
        loss, g = grads(model, samples, args.seq, how["overrides"], upcast=how.get("upcast", False),
                        fp32_head=how.get("fp32_head", False), fp32_residual=how.get("fp32_residual", False))
        got[name] = g
        res[name] = {"loss": loss, "grad_rel_err_vs_fp32": round(rel_err(g, ref), 4)}
    res["fast_vs_baseline_grad_rel_err"] = round(rel_err(got["fast-bf16"], got["baseline"]), 4)
    res["fast_vs_baseline_loss_rel_diff"] = abs(res["fast-bf16"]["loss"] - res["baseline"]["loss"]) / res["baseline"]["loss"]
    print(json.dumps(res), flush=True)


if __name__ == "__main__":
    main()
