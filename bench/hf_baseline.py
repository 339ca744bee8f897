# Copied from the team's shared/bench/hf_baseline.py so it travels to the GPU machine with the repo.
"""Baseline: the plain Hugging Face QLoRA stack a user would pick instead.

Random-weight model of a real architecture (throughput and memory do not depend on
weight values): bnb NF4 + double quant, bf16 compute, peft LoRA on all linear
layers, gradient checkpointing, paged AdamW 8-bit. Optional Liger kernels.
Prints one JSON line per variant.
"""
import gc, json, os, sys, time
import torch
from transformers import AutoModelForCausalLM, BitsAndBytesConfig, LlamaConfig, LlamaForCausalLM
from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
import bitsandbytes as bnb

SHAPES = {
    "llama3-8b": dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                      num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=8192, rope_theta=500000.0),
    "llama-1b": dict(vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                     num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=8192, tie_word_embeddings=True),
}


def make_checkpoint(shape, path):
    if os.path.exists(os.path.join(path, "config.json")):
        return
    cfg = LlamaConfig(**SHAPES[shape], torch_dtype="bfloat16")
    with torch.device("cuda"):
        m = LlamaForCausalLM(cfg).to(torch.bfloat16)
    t = time.time()
    m.save_pretrained(path, max_shard_size="5GB")
    print(f"# saved {shape} in {time.time()-t:.1f}s", file=sys.stderr)
    del m; gc.collect(); torch.cuda.empty_cache()


def run(path, seq, mbs, steps, liger, gc_on=True, rank=16):
    torch.cuda.reset_peak_memory_stats()
    t0 = time.time()
    q = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                           bnb_4bit_compute_dtype=torch.bfloat16)
    m = AutoModelForCausalLM.from_pretrained(path, quantization_config=q, device_map={"": 0},
                                             dtype=torch.bfloat16, attn_implementation="sdpa")
    load_s = time.time() - t0
    if liger:
        from liger_kernel.transformers import _apply_liger_kernel_to_instance
        _apply_liger_kernel_to_instance(model=m)
    m = prepare_model_for_kbit_training(m, use_gradient_checkpointing=gc_on,
                                        gradient_checkpointing_kwargs={"use_reentrant": False})
    m = get_peft_model(m, LoraConfig(r=rank, lora_alpha=rank, lora_dropout=0.0, task_type="CAUSAL_LM",
                                     target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]))
    m.train()  # gradient checkpointing only acts in training mode
    after_load = torch.cuda.memory_allocated()
    opt = bnb.optim.PagedAdamW8bit([p for p in m.parameters() if p.requires_grad], lr=2e-4)
    vocab = m.config.vocab_size
    times = []
    for i in range(steps + 3):
        x = torch.randint(0, vocab, (mbs, seq), device="cuda")
        torch.cuda.synchronize(); t = time.time()
        out = m(input_ids=x, labels=x)
        out.loss.backward(); opt.step(); opt.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        if i >= 3:
            times.append(time.time() - t)
    times.sort()
    med = times[len(times) // 2]
    res = dict(path=os.path.basename(path), seq=seq, mbs=mbs, liger=liger, gc=gc_on, rank=rank,
               load_s=round(load_s, 1), step_s=round(med, 4), tok_s=round(mbs * seq / med),
               loss=round(out.loss.item(), 3),
               mem_after_load_gib=round(after_load / 2**30, 2),
               peak_alloc_gib=round(torch.cuda.max_memory_allocated() / 2**30, 2),
               peak_reserved_gib=round(torch.cuda.max_memory_reserved() / 2**30, 2))
    print(json.dumps(res), flush=True)
    del m, opt, out; gc.collect(); torch.cuda.empty_cache()
    return res


if __name__ == "__main__":
    shape = sys.argv[1] if len(sys.argv) > 1 else "llama3-8b"
    path = f"/tmp/ckpt-{shape}"
    print("# torch", torch.__version__, "bnb", bnb.__version__, torch.cuda.get_device_name(0), file=sys.stderr)
    make_checkpoint(shape, path)
    for seq, mbs, liger in [(2048, 1, False), (2048, 1, True), (2048, 4, False), (2048, 4, True), (8192, 1, False)]:
        try:
            run(path, seq, mbs, steps=8, liger=liger)
        except Exception as e:
            print(json.dumps(dict(seq=seq, mbs=mbs, liger=liger, error=f"{type(e).__name__}: {str(e)[:300]}")), flush=True)
            gc.collect(); torch.cuda.empty_cache()
