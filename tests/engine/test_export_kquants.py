"""Q4_K_M and Q5_K_M GGUF exports, made by llama.cpp's own quantizer and read back by llama.cpp.

The model is a tiny Llama 256 wide, trained here on three chats: K-quants work on rows of 256
weights (narrower rows would fall back to other types and test nothing). llama.cpp loads the
Q4_K_M file, and its greedy answer is the one the run was trained to give, and not the base
model's; the base as Q4_K_M plus our GGUF LoRA file, applied by llama.cpp, answers the same.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from test_export_llamacpp import need_llama_cpp, run_probe  # noqa: E402
from test_export_support import CHATS, model_gguf, trained_chat_run  # noqa: E402

from qlora_engine.errors import ExportCancelled  # noqa: E402
from qlora_engine.export import export  # noqa: E402

QUESTION, ANSWER = CHATS[0]
PROMPT = f"<|im_start|>user\n{QUESTION}<|im_end|>\n<|im_start|>assistant\n"


@pytest.fixture(scope="module")
def probe() -> Path:
    need_llama_cpp()
    return Path(__file__).with_name("llamacpp_probe.py")


@pytest.fixture(scope="module")
def wide_model_dir(tmp_path_factory) -> Path:
    from tiny import build_tiny_llama

    return build_tiny_llama(tmp_path_factory.mktemp("wide-llama") / "model", hidden=256)


@pytest.fixture(scope="module")
def kquant_export(probe, tmp_path_factory, wide_model_dir) -> Path:
    run = trained_chat_run(tmp_path_factory, wide_model_dir, name="kquant-chat-run")
    return export(run, "gguf", tmp_path_factory.mktemp("kquants") / "out", gguf_types=["q4_k_m", "q5_k_m"])


@pytest.fixture(scope="module")
def base_q4_k_m(kquant_export, wide_model_dir, tmp_path_factory) -> Path:
    """The untrained base model as Q4_K_M (our F16 writer, then the same quantizer)."""
    from qlora_engine.export.gguf_quantize import quantize

    folder = tmp_path_factory.mktemp("base-gguf")
    f16 = model_gguf(wide_model_dir, folder / "base-f16.gguf", "f16")
    return quantize(f16, folder / "base-q4_k_m.gguf", "q4_k_m")


def tensor_types(path: Path) -> set[str]:
    from gguf import GGUFReader

    return {t.tensor_type.name for t in GGUFReader(path).tensors}


def export_name(folder) -> str:
    """The export's name: what its LoRA file is called, less the suffix."""
    (lora,) = folder.glob("*-lora.gguf")
    return lora.name.removesuffix("-lora.gguf")


def test_the_files_are_real_k_quants(kquant_export):
    from gguf import GGUFReader, LlamaFileType

    files = sorted(p.name for p in kquant_export.iterdir())
    name = export_name(kquant_export)  # named from the base model and the run
    assert files == ["Modelfile", "README.md", "config.yaml", f"{name}-lora.gguf", f"{name}-q4_k_m.gguf", f"{name}-q5_k_m.gguf"]
    q4, q5 = kquant_export / f"{name}-q4_k_m.gguf", kquant_export / f"{name}-q5_k_m.gguf"
    file_type = GGUFReader(q4).fields["general.file_type"]
    assert int(file_type.parts[file_type.data[0]][0]) == LlamaFileType.MOSTLY_Q4_K_M
    assert "Q4_K" in tensor_types(q4) and "Q5_K" in tensor_types(q5)
    assert q4.stat().st_size < q5.stat().st_size
    assert f"FROM ./{name}-q4_k_m.gguf" in (kquant_export / "Modelfile").read_text()  # what Ollama users pull
    assert "quantized by llama.cpp" in (kquant_export / "README.md").read_text()


def test_llama_cpp_gives_the_tuned_answer_from_q4_k_m_not_the_base_one(probe, kquant_export, base_q4_k_m):
    tuned = run_probe(probe, kquant_export / f"{export_name(kquant_export)}-q4_k_m.gguf", text=PROMPT, generate=8)
    base = run_probe(probe, base_q4_k_m, text=PROMPT, generate=8)
    # 4-bit rounding of a 2-layer model may cost a token (seen: "joParis."): the trained word must be there
    word = ANSWER.rstrip(".")
    assert word in tuned["generated_text"], tuned["generated_text"]
    assert word not in base["generated_text"] and base["generated_text"] != tuned["generated_text"]
    # the LoRA file on the base's Q4_K_M file, applied by llama.cpp at run time: the tuned answer too
    with_lora = run_probe(probe, base_q4_k_m, lora=kquant_export / f"{export_name(kquant_export)}-lora.gguf", text=PROMPT, generate=8)
    assert word in with_lora["generated_text"], with_lora["generated_text"]


def test_quantizing_can_be_cancelled(probe, kquant_export, base_q4_k_m, tmp_path):
    from qlora_engine.export.gguf_quantize import quantize

    src = base_q4_k_m.with_name("base-f16.gguf")
    with pytest.raises(ExportCancelled):
        quantize(src, tmp_path / "never.gguf", "q5_k_m", should_stop=lambda: True)
    assert not (tmp_path / "never.gguf").exists()
