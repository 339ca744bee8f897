"""Builders for tiny real models used across the tests (no downloads, milliseconds to build).

A byte-level BPE tokenizer trained on a small corpus, with ChatML special tokens and a chat
template, and a Llama of a few hundred thousand parameters saved as safetensors: the same
on-disk layout as a hub model, so the engine loads it through its normal path.
"""

from __future__ import annotations

from pathlib import Path

LLAMA3_8B = {
    "model_type": "llama",
    "architectures": ["LlamaForCausalLM"],
    "vocab_size": 128256,
    "hidden_size": 4096,
    "intermediate_size": 14336,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "max_position_embeddings": 8192,
    "rope_theta": 500000.0,
}
"""The Llama-3-8B shape as its config.json says (for the VRAM budget, which never reads weights)."""

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "QLoRA trains low-rank adapters on a frozen 4-bit model.",
    "What is the capital of France? The capital of France is Paris.",
    "Translate to French: good morning. Bonjour.",
    "def add(a, b):\n    return a + b\n",
    "1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16 17 18 19 20",
    "system user assistant instruction input output response answer question",
] * 4


def build_tokenizer(path: Path | None = None, vocab_size: int = 384, chat_template: bool = True):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS, trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=None,
        eos_token="<|im_end|>" if chat_template else "<|endoftext|>",
        pad_token="<|endoftext|>",
    )
    if chat_template:
        fast.chat_template = CHATML_TEMPLATE
    if path is not None:
        fast.save_pretrained(path)
    return fast


def build_tiny_llama(path: Path, *, seed: int = 0, chat_template: bool = True, hidden: int = 64, layers: int = 2) -> Path:
    """Save a tiny random Llama (+ tokenizer) as a Hugging Face folder at ``path``."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    path = Path(path)
    tok = build_tokenizer(path, chat_template=chat_template)
    cfg = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=hidden,
        intermediate_size=hidden * 2,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        bos_token_id=None,
        tie_word_embeddings=False,
        # Wider than the usual 0.02, so the frozen random lm_head can express confident
        # predictions and a LoRA on top can really memorize a small set.
        initializer_range=0.1,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(cfg)
    model.save_pretrained(path, safe_serialization=True)
    return path
