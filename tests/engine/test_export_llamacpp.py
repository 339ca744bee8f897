"""GGUF exports loaded by llama.cpp itself: the consumer the files are written for.

llama.cpp comes from the ``llama-cpp-python`` package (the ``llama`` extra; CI installs it, and
pip keeps the wheel it compiled once in its cache). ``llamacpp_probe.py`` drives llama.cpp's C
API through it in a child process. Checks: llama.cpp loads the merged F16/Q8_0 files and the GGUF
LoRA file; its logits match transformers' (merged model; base file + LoRA applied at run time by
llama.cpp); its tokenizer, driven by our ``tokenizer.ggml.*`` metadata, splits text as the Hugging
Face tokenizer does; the chat template and EOS are the run's. The K-quant exports (Q4_K_M,
Q5_K_M: llama.cpp's own quantizer) are in ``test_export_kquants.py``.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
from test_export_support import PROBE, model_gguf, named, trained_chat_run  # noqa: E402

from qlora_engine.export import export, load_run  # noqa: E402
from qlora_engine.export.common import Reporter  # noqa: E402
from qlora_engine.export.merged import merge  # noqa: E402

PROBE_SCRIPT = Path(__file__).with_name("llamacpp_probe.py")


def need_llama_cpp() -> None:
    """Skip where llama-cpp-python is missing, except in CI, which installs it: there it fails."""
    if importlib.util.find_spec("llama_cpp") is None:
        if os.environ.get("CI"):
            pytest.fail("llama-cpp-python is not installed: CI installs the 'llama' extra (.ci/run)")
        pytest.skip("llama-cpp-python is not installed (pip install -e '.[llama]')")


@pytest.fixture(scope="module")
def probe() -> Path:
    need_llama_cpp()
    return PROBE_SCRIPT


def run_probe(
    probe: Path, model: Path, *, lora: Path | None = None, ids=None, text: str | None = None, generate: int = 0
) -> dict:
    cmd = [sys.executable, str(probe), str(model)]
    if lora is not None:
        cmd += ["--lora", str(lora)]
    cmd += ["--ids", ",".join(map(str, ids))] if ids is not None else ["--text", text]
    if generate:
        cmd += ["--generate", str(generate)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout)


@pytest.fixture(scope="module")
def chat_run(tmp_path_factory, tiny_model_dir) -> Path:
    return trained_chat_run(tmp_path_factory, tiny_model_dir)


@pytest.fixture(scope="module")
def gguf_dir(chat_run, tmp_path_factory) -> Path:
    return export(chat_run, "gguf", tmp_path_factory.mktemp("llamacpp") / "out")


def last_logits(model, ids) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0, -1]


@pytest.mark.parametrize("kind, rel_tol", [("f16", 5e-3), ("q8_0", 5e-2)])
def test_llama_cpp_runs_the_merged_gguf_like_transformers(probe, gguf_dir, chat_run, kind, rel_tol):
    from transformers import AutoTokenizer

    merged, _, _ = merge(load_run(chat_run), rep=Reporter())
    want = last_logits(merged, PROBE[0])
    got = run_probe(probe, gguf_dir / named(gguf_dir, f"-{kind}.gguf"), ids=PROBE[0])
    assert (torch.tensor(got["logits"]) - want).abs().max() < rel_tol * want.abs().max()
    tok = AutoTokenizer.from_pretrained(chat_run / "adapter")
    assert got["arch"] == "llama" and got["chat_template"] == tok.chat_template and got["eos"] == tok.eos_token_id


def test_llama_cpp_tokenizes_like_the_hugging_face_tokenizer(probe, gguf_dir, chat_run):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(chat_run / "adapter")
    for text in (
        "What is the capital of France? The capital of France is Paris.",
        "<|im_start|>user\nCount to five.<|im_end|>\n<|im_start|>assistant\n",
        "def add(a, b):\n    return a + b\n  1 2 3",
    ):
        got = run_probe(probe, gguf_dir / named(gguf_dir, "-f16.gguf"), text=text)
        assert got["tokens"] == tok(text)["input_ids"], text


def test_llama_cpp_applies_the_gguf_lora_file_to_the_base(probe, gguf_dir, chat_run, tiny_model_dir, tmp_path):
    """The base model as GGUF plus our LoRA file, applied by llama.cpp at run time, gives the tuned model."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    base_gguf = model_gguf(tiny_model_dir, tmp_path / "base-f16.gguf", "f16")
    plain = run_probe(probe, base_gguf, ids=PROBE[0])
    with_lora = run_probe(probe, base_gguf, lora=gguf_dir / named(gguf_dir, "-lora.gguf"), ids=PROBE[0])
    want_base = last_logits(base, PROBE[0])
    want_tuned = last_logits(PeftModel.from_pretrained(base, str(chat_run / "adapter")), PROBE[0])
    scale = want_tuned.abs().max()
    assert (torch.tensor(plain["logits"]) - want_base).abs().max() < 5e-3 * scale
    assert (torch.tensor(with_lora["logits"]) - want_tuned).abs().max() < 5e-3 * scale
    assert (want_tuned - want_base).abs().max() > 1.0  # the adapter matters, so the match above means something


@pytest.mark.slow
def test_llama_cpp_runs_the_smollm2_export(probe, smollm2_gguf, smollm2_dir, tmp_path):
    from test_export_gguf import fake_run
    from transformers import AutoModelForCausalLM, AutoTokenizer

    base = AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(smollm2_dir)
    run_dir, tuned = fake_run(tmp_path, base, tok, ["q_proj", "k_proj", "v_proj"], base_ref=str(smollm2_gguf))
    out = export(run_dir, "gguf", tmp_path / "gguf", gguf_types=["f16"])
    text = "<|im_start|>user\nWhat is 12345 + 678?<|im_end|>\n<|im_start|>assistant\n"
    got = run_probe(probe, out / named(out, "-f16.gguf"), text=text)
    source = run_probe(probe, smollm2_gguf, text=text)  # the original file's tokenizer, as llama.cpp reads it
    assert got["tokens"] == source["tokens"]
    want = last_logits(tuned, got["tokens"])
    assert (torch.tensor(got["logits"]) - want).abs().max() < 2e-2 * want.abs().max()
    # The LoRA file on the original Q4_1 file: llama.cpp changes the logits the way peft's adapter does.
    plain_q4 = torch.tensor(source["logits"])
    lora_q4 = torch.tensor(run_probe(probe, smollm2_gguf, lora=out / named(out, "-lora.gguf"), text=text)["logits"])
    with torch.no_grad(), tuned.disable_adapter():
        want_base = last_logits(tuned, got["tokens"])
    delta_cpp, delta_peft = lora_q4 - plain_q4, want - want_base
    cos = torch.nn.functional.cosine_similarity(delta_cpp, delta_peft, dim=0)
    assert cos > 0.9 and delta_peft.abs().max() > 0.5


def test_llama_cpp_reads_the_sentencepiece_style_vocabulary(probe, tmp_path):
    """Llama 2 / Mistral-style vocabularies: llama.cpp merges by our scores into the same tokens."""
    from test_export_gguf import fake_run
    from test_export_support import spm_llama, spm_tokenizer

    tok = spm_tokenizer()
    run_dir, tuned = fake_run(tmp_path, spm_llama(tok), tok, ["q_proj", "v_proj"])
    out = export(run_dir, "gguf", tmp_path / "gguf", gguf_types=["f16"])
    # (Leading spaces are left out: Hugging Face's Metaspace and sentencepiece disagree there, by design.)
    for text in (
        "The quick brown fox jumps over the lazy dog.",
        "naïve 123 ✓ Bonjour.",
        "What is the capital of France?",
    ):
        got = run_probe(probe, out / named(out, "-f16.gguf"), text=text)
        assert got["tokens"] == tok(text)["input_ids"], text
    want = last_logits(tuned, got["tokens"])
    assert (torch.tensor(got["logits"]) - want).abs().max() < 5e-3 * want.abs().max()
