"""Shared by the export and generation tests (no tests here): one trained chat run per session.

The run is trained once into the session's temporary folder and reused by every module that
asks for it, so the adapter, merged, GGUF and generation tests all look at the same adapter.
"""

from __future__ import annotations

import json
from pathlib import Path

CHATS = [
    ("What is the capital of France?", "Paris."),
    ("Count to five.", "1 2 3 4 5"),
    ("Translate good morning to French.", "Bonjour."),
]
PROBE = [[5, 17, 40, 99, 3, 200, 7, 88, 120, 64, 11, 250]]
"""Token ids fed to every model whose logits are compared (valid for the tiny tokenizer)."""


def trained_chat_run(tmp_path_factory, model_dir: Path, name: str = "export-chat-run") -> Path:
    """The tiny Llama trained (4-bit NF4 + LoRA, CPU) on three chats until it answers them and stops.

    ``name``: the session folder it is kept in (another model gets another name)."""
    from qlora_engine.config import TrainConfig, apply_overrides
    from qlora_engine.events import ListSink
    from qlora_engine.runner import run

    root = tmp_path_factory.getbasetemp() / name
    run_dir = root / "run"
    if (run_dir / "adapter" / "adapter_model.safetensors").is_file():
        return run_dir
    root.mkdir(exist_ok=True)
    data = root / "chat.jsonl"
    rows = [{"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]} for q, a in CHATS]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    cfg = apply_overrides(
        TrainConfig(),
        [
            f"model.ref={model_dir}",
            f"data.path={data}",
            f"data.validation_path={data}",
            f"output.dir={run_dir}",
            "train.max_steps=20",
            "train.micro_batch_size=3",
            "train.gradient_accumulation_steps=1",
            "train.save_steps=null",
            "train.gradient_checkpointing=false",
            "optim.learning_rate=2e-2",
            "optim.warmup_steps=0",
            "optim.scheduler=constant",
        ],
    )
    run(cfg, ListSink())
    return run_dir


def tiny_tokenizer():
    """The tiny ChatML tokenizer the tiny Llama uses (tests/tiny.py)."""
    from tiny import build_tokenizer

    return build_tokenizer()


def spm_tokenizer():
    """A sentencepiece-style tokenizer like Llama 2's / Mistral 7B's: BPE with byte fallback, '▁' for spaces, BOS added."""
    from tiny import CORPUS
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    spm = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    spm.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="first")
    spm.decoder = decoders.Sequence(
        [decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    pieces = ["<unk>", "<s>", "</s>"] + [f"<0x{i:02X}>" for i in range(256)]
    spm.train_from_iterator(CORPUS, trainers.BpeTrainer(vocab_size=420, special_tokens=pieces, show_progress=False))
    spm.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=spm, bos_token="<s>", eos_token="</s>", unk_token="<unk>")


def spm_llama(tokenizer):
    """A tiny random Llama for the sentencepiece-style tokenizer."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        bos_token_id=1,
        eos_token_id=2,
        initializer_range=0.1,
    )
    return LlamaForCausalLM(config)


def named(folder: Path, suffix: str) -> str:
    """The export's one file ending in ``suffix`` (exports are named for the base model and the run)."""
    (match,) = [p.name for p in folder.iterdir() if p.name.endswith(suffix)]
    return match


def model_gguf(model_dir: Path, path: Path, ftype: str, name: str = "base") -> Path:
    """The model in ``model_dir`` (an untrained Hugging Face folder) written as a GGUF file of ``ftype``
    by our own writer, at ``path``."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from qlora_engine.export.gguf_model import (
        arch_spec,
        model_metadata,
        plan_model_tensors,
        state_dict_tensors,
        write_gguf,
    )
    from qlora_engine.export.gguf_vocab import vocab_metadata

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    spec = arch_spec(model.config)
    vocab = vocab_metadata(AutoTokenizer.from_pretrained(model_dir), model.config.vocab_size)
    plan = plan_model_tensors(spec, model.config, state_dict_tensors(model), ftype)
    write_gguf(path, spec, model_metadata(spec, model.config, vocab, ftype, name=name), plan)
    return path
