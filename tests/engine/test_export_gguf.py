"""GGUF exports read back by independent readers: gguf's GGUFReader and transformers' GGUF loader.

The tiny Llama run is the one the adapter/merged tests train (shared through the session's
temporary folder). Checks: llama.cpp's tensor names, types and metadata keys; logits of the
GGUF model through transformers against the merged model, within the error of each type; the
LoRA file's layout and its arithmetic (base + alpha/rank * B @ A = merged, in llama.cpp's
row order); Qwen2; a clear refusal for other architectures; the real SmolLM2.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
from test_export_support import PROBE, named, tiny_tokenizer, trained_chat_run  # noqa: E402

from qlora_engine.config import TrainConfig, apply_overrides
from qlora_engine.errors import ModelError
from qlora_engine.export import export, load_run
from qlora_engine.export.common import Reporter
from qlora_engine.export.gguf_lora import lora_scale, plan_lora_tensors
from qlora_engine.export.gguf_model import (
    SUPPORTED,
    arch_spec,
    model_metadata,
    plan_model_tensors,
    state_dict_tensors,
    write_gguf,
)
from qlora_engine.export.gguf_vocab import vocab_metadata
from qlora_engine.export.merged import merge


def field(reader: gguf.GGUFReader, key: str):
    return reader.fields[key].contents()


@pytest.fixture(scope="module")
def chat_run(tmp_path_factory, tiny_model_dir) -> Path:
    return trained_chat_run(tmp_path_factory, tiny_model_dir)


@pytest.fixture(scope="module")
def gguf_dir(chat_run, tmp_path_factory) -> Path:
    return export(chat_run, "gguf", tmp_path_factory.mktemp("gguf") / "out")


@pytest.fixture(scope="module")
def merged_logits(chat_run) -> torch.Tensor:
    model, _, _ = merge(load_run(chat_run), rep=Reporter())
    with torch.no_grad():
        return model(torch.tensor(PROBE)).logits


def expected_names(n_layers: int) -> set[str]:
    per_block = ["attn_norm", "attn_q", "attn_k", "attn_v", "attn_output", "ffn_norm", "ffn_gate", "ffn_up", "ffn_down"]
    names = {"token_embd.weight", "output_norm.weight", "output.weight"}
    return names | {f"blk.{i}.{t}.weight" for i in range(n_layers) for t in per_block}


def test_gguf_files_have_llama_cpp_names_types_and_metadata(gguf_dir, chat_run, tiny_model_dir):
    from transformers import AutoTokenizer

    files = sorted(p.name for p in gguf_dir.iterdir())
    n = load_run(chat_run).export_name
    assert files == sorted(["Modelfile", "README.md", "config.yaml", f"{n}-f16.gguf", f"{n}-lora.gguf", f"{n}-q8_0.gguf"])
    tok = AutoTokenizer.from_pretrained(chat_run / "adapter")
    vocab = tok.backend_tokenizer.to_str()
    for name, ftype, qtype in ((f"{n}-f16.gguf", 1, "F16"), (f"{n}-q8_0.gguf", 7, "Q8_0")):
        r = gguf.GGUFReader(str(gguf_dir / name))
        assert field(r, "general.architecture") == "llama" and field(r, "general.type") == "model"
        assert field(r, "general.file_type") == ftype and field(r, "general.quantization_version") == 2
        expected = {
            "llama.block_count": 2,
            "llama.context_length": 512,
            "llama.embedding_length": 64,
            "llama.feed_forward_length": 128,
            "llama.attention.head_count": 4,
            "llama.attention.head_count_kv": 2,
            "llama.rope.dimension_count": 16,
            "llama.vocab_size": 384,
        }
        for key, value in expected.items():
            assert field(r, key) == value, key
        assert field(r, "llama.rope.freq_base") == pytest.approx(10000.0)
        assert field(r, "llama.attention.layer_norm_rms_epsilon") == pytest.approx(1e-6)
        assert field(r, "tokenizer.ggml.model") == "gpt2" and field(r, "tokenizer.ggml.pre") == "gpt-2"
        tokens = field(r, "tokenizer.ggml.tokens")
        assert tokens == [tok.convert_ids_to_tokens(i) for i in range(384)]
        assert len(field(r, "tokenizer.ggml.merges")) == len(json.loads(vocab)["model"]["merges"])
        assert field(r, "tokenizer.ggml.eos_token_id") == tok.eos_token_id == tok.convert_tokens_to_ids("<|im_end|>")
        types = field(r, "tokenizer.ggml.token_type")
        assert [tokens[i] for i, t in enumerate(types) if t == gguf.TokenType.CONTROL] == [
            "<|endoftext|>",
            "<|im_start|>",
            "<|im_end|>",
        ]
        assert field(r, "tokenizer.chat_template") == tok.chat_template
        by_name = {t.name: t for t in r.tensors}
        assert set(by_name) == expected_names(2)
        for t in r.tensors:
            want = "F32" if t.name.endswith("norm.weight") else qtype
            assert t.tensor_type.name == want, t.name
        assert list(by_name["token_embd.weight"].shape) == [64, 384]  # ggml order: row length first
        assert list(by_name["blk.0.attn_k.weight"].shape) == [64, 32]  # 2 KV heads x 16


@pytest.mark.parametrize("kind, rel_tol", [("f16", 5e-3), ("q8_0", 5e-2)])
def test_gguf_reads_back_in_transformers_with_the_merged_models_logits(
    gguf_dir, chat_run, merged_logits, kind, rel_tol
):
    """f16 keeps ~3 significant digits; q8_0 rounds each weight to 1/127 of its block's largest: ~1% of the logits."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    name = named(gguf_dir, f"-{kind}.gguf")
    model = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=name, dtype=torch.float32)
    with torch.no_grad():
        logits = model(torch.tensor(PROBE)).logits
    scale = merged_logits.abs().max()
    assert (logits - merged_logits).abs().max() < rel_tol * scale
    assert (logits.argmax(-1) == merged_logits.argmax(-1)).float().mean() >= 0.9
    tok = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=name)
    ref = AutoTokenizer.from_pretrained(chat_run / "adapter")
    text = "What is the capital of France? 1 2 3 <|im_start|>user\nhi<|im_end|>"
    assert tok(text)["input_ids"] == ref(text)["input_ids"]
    assert tok.eos_token == "<|im_end|>"


def test_gguf_lora_file_has_llama_cpp_layout_and_reproduces_the_merge(gguf_dir, chat_run, tiny_model_dir, tmp_path):
    """base + alpha/rank * B @ A (what llama.cpp computes with --lora) equals the merged weights, row order included."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    lora = gguf.GGUFReader(str(gguf_dir / named(gguf_dir, "-lora.gguf")))
    assert field(lora, "general.type") == "adapter" and field(lora, "adapter.type") == "lora"
    assert field(lora, "general.architecture") == "llama"
    alpha = field(lora, "adapter.lora.alpha")
    assert alpha == pytest.approx(16.0)  # alpha 16, rank 16: peft's scale 1.0 = llama.cpp's alpha / rank

    info = load_run(chat_run)
    spec = arch_spec(AutoModelForCausalLM.from_pretrained(tiny_model_dir).config)
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    merged, _, _ = merge(info, rep=Reporter())
    vocab = vocab_metadata(AutoTokenizer.from_pretrained(tiny_model_dir), 384)
    readers = {}
    for tag, model in (("base", base), ("merged", merged)):
        path = tmp_path / f"{tag}-f32.gguf"
        plan = plan_model_tensors(spec, model.config, state_dict_tensors(model), "f32")
        write_gguf(path, spec, model_metadata(spec, model.config, vocab, "f32", name=tag), plan)
        readers[tag] = {t.name: np.array(t.data) for t in gguf.GGUFReader(str(path)).tensors}

    pairs = {}
    for t in lora.tensors:
        target, _, part = t.name.rpartition(".")
        pairs.setdefault(target, {})[part] = np.array(t.data)
        assert t.tensor_type.name == "F32"
    assert len(pairs) == 14 and all(set(p) == {"lora_a", "lora_b"} for p in pairs.values())
    for target, p in pairs.items():
        w = readers["base"][target]
        a, b = p["lora_a"], p["lora_b"]
        # llama.cpp's check: model ne[0] == a ne[0], model ne[1] == b ne[1], a ne[1] == b ne[0] (numpy order reversed)
        assert w.shape[1] == a.shape[1] and w.shape[0] == b.shape[0] and a.shape[0] == b.shape[1] == 16
        np.testing.assert_allclose(w + alpha / a.shape[0] * (b @ a), readers["merged"][target], atol=2e-5)
    untouched = set(readers["base"]) - set(pairs)
    for name in untouched:
        np.testing.assert_array_equal(readers["base"][name], readers["merged"][name])


def test_lora_scale_with_rslora_and_adapters_a_lora_file_cannot_hold():
    assert lora_scale({"lora_alpha": 16, "use_rslora": False}, 16) == 1.0
    assert lora_scale({"lora_alpha": 16, "use_rslora": True}, 16) == pytest.approx(4.0)
    from transformers import LlamaConfig

    config = LlamaConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=32,
    )
    spec = SUPPORTED["LlamaForCausalLM"]
    weights = {
        "base_model.model.model.layers.0.self_attn.v_proj.lora_A.weight": torch.ones(8, 64),
        "base_model.model.model.layers.0.self_attn.v_proj.lora_B.weight": torch.ones(32, 8),
    }
    plan, alpha = plan_lora_tensors(spec, config, weights, {"lora_alpha": 16, "use_rslora": True})
    assert alpha == pytest.approx(16 / math.sqrt(8) * 8)  # llama.cpp's alpha/rank = rsLoRA's alpha/sqrt(rank)
    assert [t.name for t in plan] == ["blk.0.attn_v.weight.lora_a", "blk.0.attn_v.weight.lora_b"]
    with pytest.raises(ModelError, match="DoRA"):
        plan_lora_tensors(spec, config, weights, {"lora_alpha": 16, "use_dora": True})
    with pytest.raises(ModelError, match="modules_to_save"):
        plan_lora_tensors(spec, config, weights, {"lora_alpha": 16, "modules_to_save": ["lm_head"]})


# -- other architectures ------------------------------------------------------------------------------


def fake_run(tmp_path: Path, model, tokenizer, target_modules: list[str], base_ref: str | None = None):
    """A run folder for ``model`` with a LoRA adapter whose B matrices are random (no training needed),
    and the in-memory peft model (base + that adapter, unmerged)."""
    from peft import LoraConfig, get_peft_model

    if base_ref is None:
        base_ref = str(tmp_path / "base")
        model.save_pretrained(base_ref)
        tokenizer.save_pretrained(base_ref)
    torch.manual_seed(0)
    peft_model = get_peft_model(
        model, LoraConfig(r=4, lora_alpha=8, target_modules=target_modules, init_lora_weights=False)
    )
    run_dir = tmp_path / "run"
    peft_model.save_pretrained(run_dir / "adapter")
    tokenizer.save_pretrained(run_dir / "adapter")
    cfg = apply_overrides(
        TrainConfig(),
        [f"model.ref={json.dumps(base_ref)}", f"data.path={tmp_path / 'none.jsonl'}", f"output.dir={run_dir}"],
    )
    cfg.save(run_dir / "config.yaml")
    return run_dir, peft_model


@pytest.mark.parametrize("family", ["qwen2", "mistral"])
def test_qwen2_and_mistral_models_round_trip(family, tmp_path):
    """Qwen2: its own llama.cpp architecture, Q/K/V biases, no row reordering. Mistral: runs as 'llama' in llama.cpp."""
    from transformers import AutoModelForCausalLM, MistralConfig, MistralForCausalLM, Qwen2Config, Qwen2ForCausalLM

    tok = tiny_tokenizer()
    torch.manual_seed(1)
    shape = dict(
        vocab_size=len(tok),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        initializer_range=0.1,
    )
    if family == "qwen2":
        model = Qwen2ForCausalLM(Qwen2Config(**shape, tie_word_embeddings=True))
    else:
        model = MistralForCausalLM(MistralConfig(**shape, tie_word_embeddings=False, sliding_window=128))
    run_dir, _ = fake_run(tmp_path, model, tok, ["q_proj", "k_proj", "v_proj", "o_proj"])
    out = export(run_dir, "gguf", tmp_path / "gguf", gguf_types=["f16"])
    r = gguf.GGUFReader(str(out / named(out, "-f16.gguf")))
    names = {t.name for t in r.tensors}
    if family == "qwen2":
        assert field(r, "general.architecture") == "qwen2"
        assert "blk.0.attn_q.bias" in names and "output.weight" not in names  # tied: llama.cpp reuses token_embd
    else:
        assert field(r, "general.architecture") == "llama" and names == expected_names(2)
    lora = gguf.GGUFReader(str(out / named(out, "-lora.gguf")))
    assert {t.name.rpartition(".")[0] for t in lora.tensors} <= names
    merged, _, _ = merge(load_run(run_dir), rep=Reporter())
    back = AutoModelForCausalLM.from_pretrained(out, gguf_file=named(out, "-f16.gguf"), dtype=torch.float32)
    with torch.no_grad():
        ref, got = merged(torch.tensor(PROBE)).logits, back(torch.tensor(PROBE)).logits
    assert (got - ref).abs().max() < 5e-3 * ref.abs().max()


def test_other_architectures_get_a_clear_not_supported_yet(tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    tok = tiny_tokenizer()
    model = GPT2LMHeadModel(GPT2Config(vocab_size=len(tok), n_embd=32, n_layer=1, n_head=2, n_positions=64))
    run_dir, _ = fake_run(tmp_path, model, tok, ["c_attn"])
    with pytest.raises(ModelError, match="GPT2LMHeadModel models is not supported yet") as e:
        export(run_dir, "gguf", tmp_path / "out")
    assert "--format merged" in e.value.hint
    assert not (tmp_path / "out").exists()
    assert export(run_dir, "merged", tmp_path / "merged").is_dir()  # the merged export still works for it


# -- the real SmolLM2 -------------------------------------------------------------------------------


@pytest.mark.slow
def test_smollm2_gguf_export_from_a_gguf_only_base(smollm2_gguf, smollm2_dir, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    # The reference: the base in float32 (its bf16 values, exactly) with the adapter applied unmerged.
    base = AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(smollm2_dir)
    # The run's base is the GGUF file itself, as in the demo: only its 16-bit conversion exists.
    run_dir, tuned = fake_run(tmp_path, base, tok, ["q_proj", "v_proj"], base_ref=str(smollm2_gguf))
    out = export(run_dir, "gguf", tmp_path / "gguf", gguf_types=["f16"])
    card = (out / "README.md").read_text()
    assert "available only as a GGUF file (SmolLM2-135M-Instruct.Q4_1.gguf, MOSTLY_Q4_1)" in card
    r = gguf.GGUFReader(str(out / named(out, "-f16.gguf")))
    assert field(r, "tokenizer.ggml.pre") == "smollm"  # the source GGUF's name for its pre-tokenizer
    assert field(r, "llama.attention.head_count_kv") == 3 and "output.weight" not in {t.name for t in r.tensors}
    modelfile = (out / "Modelfile").read_text()
    assert "You are a helpful AI assistant named SmolLM" in modelfile and 'PARAMETER stop "<|im_end|>"' in modelfile
    assert (out / "Modelfile.lora").read_text().startswith("# Ollama")
    back = AutoModelForCausalLM.from_pretrained(out, gguf_file=named(out, "-f16.gguf"), dtype=torch.float32)
    ids = tok("The capital of France is", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        ref, got = tuned(ids).logits, back(ids).logits
    assert (got - ref).abs().max() < 2e-2 * ref.abs().max()
    assert (got[0, -1].argmax() == ref[0, -1].argmax()).item()


def test_sentencepiece_style_vocabulary_llama2_mistral(tmp_path):
    """Llama 2 / Mistral 7B / TinyLlama tokenizers: BPE with byte fallback, written as llama.cpp's 'llama' vocabulary."""
    from test_export_support import spm_llama, spm_tokenizer
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = spm_tokenizer()
    run_dir, tuned = fake_run(tmp_path, spm_llama(tok), tok, ["q_proj", "k_proj", "v_proj", "o_proj"])
    out = export(run_dir, "gguf", tmp_path / "gguf", gguf_types=["f16"], gguf_lora=False)
    r = gguf.GGUFReader(str(out / named(out, "-f16.gguf")))
    assert field(r, "tokenizer.ggml.model") == "llama" and "tokenizer.ggml.merges" not in r.fields
    assert field(r, "tokenizer.ggml.add_bos_token") is True and field(r, "tokenizer.ggml.add_space_prefix") is True
    types = field(r, "tokenizer.ggml.token_type")
    assert types[:3] == [gguf.TokenType.UNKNOWN, gguf.TokenType.CONTROL, gguf.TokenType.CONTROL]
    assert set(types[3:259]) == {gguf.TokenType.BYTE} and set(types[259:]) == {gguf.TokenType.NORMAL}
    scores = field(r, "tokenizer.ggml.scores")
    assert scores[300] > scores[400]  # earlier merges rank higher, as sentencepiece's scores do
    back = AutoTokenizer.from_pretrained(out, gguf_file=named(out, "-f16.gguf"))
    ref = AutoTokenizer.from_pretrained(run_dir / "adapter")
    for text in ("The quick brown fox jumps over the lazy dog.", "  two leading spaces", "naïve 123 ✓ Bonjour."):
        assert back(text)["input_ids"] == ref(text)["input_ids"], text
    model = AutoModelForCausalLM.from_pretrained(out, gguf_file=named(out, "-f16.gguf"), dtype=torch.float32)
    ids = ref("What is the capital of France?", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        got, want = model(ids).logits, tuned(ids).logits
    assert (got - want).abs().max() < 5e-3 * want.abs().max()


def test_llama3_rope_scaling_is_written_as_llama_cpp_rope_freqs():
    """Llama 3.1/3.2 scale RoPE per frequency; llama.cpp divides its frequencies by the rope_freqs tensor."""
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    from qlora_engine.export.gguf_model import llama3_rope_factors

    rope = {
        "rope_type": "llama3",
        "rope_theta": 500000.0,
        "factor": 32.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 64,
    }
    config = LlamaConfig(hidden_size=64, num_attention_heads=4, max_position_embeddings=1024, rope_parameters=rope)
    scaled, _ = ROPE_INIT_FUNCTIONS["llama3"](config, "cpu")
    plain = 1.0 / (500000.0 ** (torch.arange(0, 16, 2, dtype=torch.float32) / 16))
    np.testing.assert_allclose(llama3_rope_factors(config), (plain / scaled).numpy(), rtol=1e-5)
    spec = arch_spec(config)
    plan = plan_model_tensors(spec, config, [], "f16")
    assert [t.name for t in plan] == ["rope_freqs.weight"]
    config.rope_parameters = {"rope_type": "longrope", "rope_theta": 1e4, "factor": 2.0}
    with pytest.raises(ModelError, match="longrope"):
        arch_spec(config)


def test_f16_refuses_weights_it_cannot_hold():
    from qlora_engine.export.gguf_model import encode

    big = np.full((2, 32), 1e6, dtype=np.float32)
    with pytest.raises(ModelError, match="float16's range"):
        encode(big, gguf.GGMLQuantizationType.F16, "blk.0.ffn_down.weight")
    q = encode(big, gguf.GGMLQuantizationType.Q8_0)
    np.testing.assert_allclose(gguf.quants.dequantize(q, gguf.GGMLQuantizationType.Q8_0), big, rtol=1e-3)
