"""Generating on the CPU with the 4-bit weights kept dequantized (``generate.keep_dequantized_on_cpu``).

bitsandbytes dequantizes a 4-bit layer's whole weight at every call on the CPU, so each generated
token used to dequantize the model. A chat model on the CPU now keeps each layer's weight
dequantized, where the copies fit. The layer must compute exactly what bitsandbytes' own CPU path
computes (the reference here is bitsandbytes' forward in training mode, which takes that path on
every CPU; in inference mode on a CPU with AVX-512 bf16 it repacks the weight for another kernel).
"""

from __future__ import annotations

import itertools
import sys
from pathlib import Path

import bitsandbytes as bnb
import pytest
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).parent))
from test_export_support import CHATS, trained_chat_run  # noqa: E402

from qlora_engine import generate
from qlora_engine.generate import ChatModel, GenerationSettings, keep_dequantized_on_cpu

CASES = list(
    itertools.product(
        ["nf4", "fp4"],  # quant type
        [True, False],  # nested (double) quantization of the absmax
        [torch.float32, torch.bfloat16, torch.float16],  # compute dtype
        [True, False],  # bias
        [torch.float32, torch.bfloat16],  # the input's dtype
    )
)


def four_bit_layer(quant_type: str, nested: bool, compute: torch.dtype, bias: bool, seed: int) -> bnb.nn.Linear4bit:
    torch.manual_seed(seed)
    plain = nn.Linear(128, 80, bias=bias)
    layer = bnb.nn.Linear4bit(128, 80, bias=bias, compute_dtype=compute, compress_statistics=nested, quant_type=quant_type)
    layer.load_state_dict(plain.state_dict())
    return layer.to("cpu")  # quantizes


def bnb_cpu_path(layer: bnb.nn.Linear4bit, x: torch.Tensor) -> torch.Tensor:
    """bitsandbytes' own forward, on its dequantize-then-matmul path (training mode: no repacking)."""
    layer.train()
    with torch.no_grad():
        out = bnb.nn.Linear4bit.forward(layer, x)
    layer.eval()
    return out


@pytest.mark.parametrize(("quant_type", "nested", "compute", "bias", "x_dtype"), CASES)
def test_a_kept_layer_computes_what_bitsandbytes_computes_bit_for_bit(quant_type, nested, compute, bias, x_dtype):
    layer = four_bit_layer(quant_type, nested, compute, bias, seed=len(str((quant_type, nested, compute, bias))))
    x = torch.randn(2, 7, 128).to(x_dtype)
    expected = bnb_cpu_path(layer, x)
    holder = nn.Sequential(layer)
    assert keep_dequantized_on_cpu(holder, available=2**40) == 1
    with torch.no_grad():
        got = holder(x)
    assert got.dtype == expected.dtype == x_dtype
    assert torch.equal(got, expected)
    assert torch.equal(bnb_cpu_path(layer, x), expected)  # the packed 4-bit weight is untouched


@pytest.mark.parametrize("share_of_need", [0.0, 0.5, 0.99])
def test_nothing_is_kept_where_the_copies_would_not_fit(share_of_need):
    layers = [four_bit_layer("nf4", True, torch.float32, False, seed=i) for i in range(3)]
    need = sum(m.weight.quant_state.shape.numel() * 4 for m in layers)  # float32
    holder = nn.Sequential(*layers)
    forwards = [m.forward for m in layers]
    available = int(need / generate.CPU_DENSE_SHARE * share_of_need)
    assert keep_dequantized_on_cpu(holder, available=available) == 0
    assert [m.forward for m in layers] == forwards  # bitsandbytes' own forward, untouched
    assert keep_dequantized_on_cpu(holder, available=int(need / generate.CPU_DENSE_SHARE) + 1) == 3


@pytest.fixture(scope="module")
def chat_run(tmp_path_factory, tiny_model_dir) -> Path:
    return trained_chat_run(tmp_path_factory, tiny_model_dir)


def test_a_cpu_chat_model_keeps_every_4bit_layer_and_answers_as_before(chat_run, monkeypatch):
    kept = ChatModel.load(chat_run, device="cpu")
    monkeypatch.setattr(generate, "CPU_DENSE_SHARE", 0.0)  # the same run, loaded as before: nothing kept
    plain = ChatModel.load(chat_run, device="cpu")
    try:
        four_bit = [m for m in kept.model.modules() if isinstance(m, bnb.nn.Linear4bit)]
        assert four_bit and all("forward" in vars(m) for m in four_bit)
        assert not any("forward" in vars(m) for m in plain.model.modules() if isinstance(m, bnb.nn.Linear4bit))
        greedy = GenerationSettings(temperature=0, max_new_tokens=12)
        for question, answer in CHATS:
            ids = torch.tensor([kept.prompt_ids(question, greedy)])
            for adapter in (True, False):
                with torch.no_grad(), kept.adapter_enabled(adapter), plain.adapter_enabled(adapter):
                    a, b = kept.model(ids).logits, plain.model(ids).logits
                # bit for bit where bitsandbytes takes the same path (every CPU without AVX-512 bf16)
                torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
                assert kept.generate(question, greedy, adapter=adapter).text == plain.generate(
                    question, greedy, adapter=adapter
                ).text
            assert kept.generate(question, greedy).text == answer
    finally:
        kept.close()
        plain.close()
