"""bench/profile_step.py's bookkeeping: kernel kinds, the GPU's busy time, the per-step table."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))
import profile_step  # noqa: E402


@pytest.mark.parametrize(
    ("name", "kind"),
    [
        ("nvjet_sm90_tst_320x128_64x3_1x2_h_bz_coopB_TNT", "matmul"),
        ("void kDequantizeBlockwise<__nv_bfloat16, 512, 64, 8, 2>(float*, ...)", "dequant 4-bit"),
        ("cudnn_generated_fort_native_sdpa_sm90_flash_bprop_wgmma_f16", "attention"),
        ("void at::native::vectorized_elementwise_kernel<8, at::native::CUDAFunctor_add<c10::BFloat16>", "elementwise / reduce"),
        ("void at::native::unrolled_elementwise_kernel<at::native::direct_copy_kernel_cuda", "copy / cast"),
        ("_rms_norm_backward_kernel", "triton (liger)"),
        ("Memcpy DtoD (Device -> Device)", "copy / cast"),
        ("some_unknown_thing", "other"),
    ],
)
def test_kernel_kinds(name, kind):
    assert profile_step.kind_of(name) == kind


def test_busy_time_is_the_union_of_kernel_intervals():
    assert profile_step.busy_us([(0, 10), (5, 15), (20, 25), (21, 22)]) == 20
    assert profile_step.busy_us([]) == 0


def test_the_profiler_s_own_ranges_are_not_kernels():
    class Event:
        def __init__(self, name: str) -> None:
            self.name = name

    assert profile_step.is_annotation(Event("ProfilerStep#4"))
    assert profile_step.is_annotation(Event("Optimizer.step#PagedAdamW8bit.step"))
    assert not profile_step.is_annotation(Event("nvjet_sm90_tst_256x128"))


def test_summary_per_step():
    kernels = [("gemm_a", 0.0, 600.0), ("gemm_a", 1000.0, 1600.0), ("flash_fwd", 600.0, 1000.0)]
    res = profile_step.summarize(kernels, steps=2, wall_s=0.004)
    assert res["wall_ms_per_step"] == 2.0 and res["gpu_busy_ms_per_step"] == 0.8
    assert res["kinds"]["matmul"] == {"ms_per_step": 0.6, "share": 0.75}
    assert res["top"][0] == {"name": "gemm_a", "kind": "matmul", "calls_per_step": 1.0, "ms_per_step": 0.6}


def test_idle_time_is_charged_to_the_kernel_that_ends_it():
    # busy 0-10, idle 10-30 (ended by dequant), overlap 30-50 and 40-45, idle 50-51 (under 2 us), idle 51-60
    kernels = [("gemm", 0.0, 10.0), ("kDequantizeBlockwise", 30.0, 50.0), ("add", 40.0, 45.0),
               ("gemm", 50.0 + 1.0, 52.0), ("kDequantizeBlockwise", 60.0, 61.0)]
    waits = profile_step.idle_before(kernels, steps=1)
    assert waits == [{"next_kernel": "kDequantizeBlockwise", "kind": "dequant 4-bit", "waits_per_step": 2.0,
                      "ms_per_step": 0.03}]
    assert profile_step.summarize(kernels, steps=1, wall_s=1e-4)["kernels_per_step"] == 5
