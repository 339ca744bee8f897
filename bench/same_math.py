"""Same math: the engine's fast path and the plain Hugging Face stack on the same weights and batch.

    python bench/same_math.py [--shape llama3-8b] [--seq 2048] [--mbs 2] [--variant "train.kernels=liger"]

Both models get the same LoRA initialisation (peft's, from the same seed) and then the same
random, non-zero B matrices (peft starts B at zero, which would make every A gradient zero
and the comparison empty). One forward and backward on the same random batch; prints the two
losses, their relative difference, and the relative error of the LoRA gradients
(||g_engine - g_hf|| / ||g_hf|| over all of them, and the worst single tensor). Goal
(speed issue): loss within 1%, gradients within 1e-2.

Both sides compute in bf16, along different paths (the baseline upcasts the residual stream
to fp32, the engine keeps it in bf16), so neither is the exact answer. A third process, the
reference, runs the engine's code with fp32 compute on the same NF4 weights and batch
(``quant.compute_dtype=float32``, no fused kernels); the JSON line also gives each side's
error against it (``*_vs_fp32``), which says which of the two is nearer the true gradient.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))


def seeded_b(model) -> None:
    gen = torch.Generator(device="cpu").manual_seed(1234)
    for name, p in sorted(model.named_parameters()):
        if "lora_B" in name:
            with torch.no_grad():
                p.copy_(torch.randn(p.shape, generator=gen) * 0.02)


def lora_grads(model) -> dict[str, torch.Tensor]:
    out = {}
    for name, p in model.named_parameters():
        if p.requires_grad and p.grad is not None:
            key = name.replace("base_model.model.", "")
            out[key] = p.grad.detach().float().cpu()
    return out


def hf_side(path: str, ids: torch.Tensor, seed: int):
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    q = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                           bnb_4bit_compute_dtype=torch.bfloat16)
    m = AutoModelForCausalLM.from_pretrained(path, quantization_config=q, device_map={"": 0}, dtype=torch.bfloat16,
                                             attn_implementation="sdpa")
    m = prepare_model_for_kbit_training(m, use_gradient_checkpointing=True,
                                        gradient_checkpointing_kwargs={"use_reentrant": False})
    torch.manual_seed(seed)
    m = get_peft_model(m, LoraConfig(r=16, lora_alpha=16, lora_dropout=0.0, task_type="CAUSAL_LM",
                                     target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                                     "down_proj"]))
    seeded_b(m)
    m.train()
    x = ids.cuda()
    loss = m(input_ids=x, labels=x).loss
    loss.backward()
    return float(loss), lora_grads(m)


def engine_side(path: str, ids: torch.Tensor, seed: int, variant: list[str]):
    from qlora_engine.config import TrainConfig, apply_overrides
    from qlora_engine.data import PreparedData, collate
    from qlora_engine.events import ListSink
    from qlora_engine.runner import build_trainer

    fp32_residual = "fp32_residual" in variant  # not a config field: bench/same_math_cpu.py's hooks, an experiment
    variant = [v for v in variant if v != "fp32_residual"]
    cfg = apply_overrides(TrainConfig(), [f"model.ref={path}", "data.path=synthetic", f"train.seed={seed}",
                                          "output.dir=/tmp/same-math", "lora.rank=16", "lora.alpha=16",
                                          f"data.max_length={ids.shape[1]}", "train.gradient_checkpointing=true", *variant])
    samples = [{"input_ids": row.tolist(), "labels": row.tolist()} for row in ids]
    trainer = build_trainer(cfg, ListSink(), data=PreparedData(train=samples, validation=None, report={}, fingerprint="x"))
    trainer.setup()
    if fp32_residual:
        from same_math_cpu import fp32_residual_stream

        fp32_residual_stream(trainer.model)
    seeded_b(trainer.model)
    batch = {k: v.cuda() for k, v in collate(samples, trainer.tokenizer.pad_token_id).items()}
    n = int((batch["labels"][:, 1:] != -100).sum())
    loss = trainer.model(**batch, use_cache=False, num_items_in_batch=torch.tensor(n, device="cuda")).loss
    loss.backward()
    return float(loss), lora_grads(trainer.model), trainer.kernels


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", default="llama3-8b")
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--mbs", type=int, default=2)
    ap.add_argument("--seed", type=int, default=42)
    ap.add_argument("--variant", default="", help="engine overrides, ';'-separated")
    ap.add_argument("--side", choices=["hf", "engine", "reference"])
    ap.add_argument("--no-reference", action="store_true", help="skip the fp32 reference")
    args = ap.parse_args()
    path = f"/tmp/ckpt-{args.shape}"
    if args.side is None:  # the parent: the sides below read the checkpoint it makes
        from speed import prepare_checkpoint

        prepare_checkpoint(args.shape, path)
    vocab = json.loads((Path(path) / "config.json").read_text())["vocab_size"]
    ids = torch.randint(0, vocab, (args.mbs, args.seq), generator=torch.Generator().manual_seed(7))
    grads_file = Path(f"/tmp/same-math-{args.side or 'x'}.pt")
    if args.side == "hf":
        loss, grads = hf_side(path, ids, args.seed)
        torch.save({"loss": loss, "grads": grads}, grads_file)
        return
    if args.side in ("engine", "reference"):
        variant = [v for v in args.variant.split(";") if v]
        if args.side == "reference":
            variant = ["quant.compute_dtype=float32", "train.kernels=none"]
        loss, grads, kernels = engine_side(path, ids, args.seed, variant)
        torch.save({"loss": loss, "grads": grads, "kernels": kernels}, grads_file)
        return
    import subprocess

    sides = ["hf", "engine"] + ([] if args.no_reference else ["reference"])
    for side in sides:  # separate processes: liger patches transformers process-wide
        subprocess.run([sys.executable, __file__, "--side", side, "--shape", args.shape, "--seq", str(args.seq),
                        "--mbs", str(args.mbs), "--seed", str(args.seed), "--variant", args.variant], check=True)
    got = {side: torch.load(f"/tmp/same-math-{side}.pt", weights_only=True) for side in sides}
    hf, en = got["hf"], got["engine"]
    res = dict(case="same-math", variant=args.variant, kernels=en["kernels"], seq=args.seq, mbs=args.mbs,
               loss_hf=hf["loss"], loss_engine=en["loss"], loss_rel_diff=abs(en["loss"] - hf["loss"]) / abs(hf["loss"]),
               **compare(en["grads"], hf["grads"]))
    if "reference" in got:
        ref = got["reference"]
        res["loss_fp32"] = ref["loss"]
        for name, side in (("engine", en), ("hf", hf)):
            res[f"loss_{name}_vs_fp32"] = abs(side["loss"] - ref["loss"]) / abs(ref["loss"])
            res.update({f"{k}_{name}_vs_fp32": v for k, v in compare(side["grads"], ref["grads"]).items()
                        if k in ("grad_rel_err", "worst_tensor_rel_err")})
    print(json.dumps(res), flush=True)


def compare(grads: dict[str, torch.Tensor], against: dict[str, torch.Tensor]) -> dict:
    """Relative error of ``grads`` against ``against``: over all LoRA tensors, and the worst one."""
    keys = sorted(set(grads) & set(against))
    unmatched = sorted(set(grads) ^ set(against))

    def rel(k: str) -> float:
        return float((grads[k] - against[k]).norm() / (against[k].norm() + 1e-30))

    diff = sum(float((grads[k] - against[k]).pow(2).sum()) for k in keys) ** 0.5
    norm = sum(float(against[k].pow(2).sum()) for k in keys) ** 0.5
    worst = max(keys, key=rel)
    return dict(grad_rel_err=diff / norm, worst_tensor=worst, worst_tensor_rel_err=rel(worst), tensors=len(keys),
                unmatched=unmatched[:5])


if __name__ == "__main__":
    main()
