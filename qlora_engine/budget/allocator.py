"""What no formula derives: the measured constants of a budget, and the CUDA caching allocator.

``CALIBRATION`` holds the numbers bench/budget_accuracy.py measures on a real card (the CUDA
context, cuBLAS's workspace, the allocator's slack per mode); :func:`allocator_mode` reads the
allocator's mode the way torch will in the engine's process, and :func:`allocator_slack`
turns a peak's dynamic part into what the allocator reserves beyond it.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

MiB = 1 << 20

# Constants that no formula derives; bench/budget_accuracy.py measures each on a real card
# (it records peak allocated and reserved per case, and refits the slack of the mode it ran).
CALIBRATION: dict[str, Any] = {
    # Memory the CUDA driver holds for the process outside torch's allocator: the context and
    # the kernel modules loaded so far (torch, cuBLAS, flash attention, bitsandbytes).
    "cuda_context": 640 * MiB,
    # cuBLAS's workspaces, which torch takes from its caching allocator: one per thread that
    # runs matmuls (the training thread and autograd's device thread), 32 MiB each on Hopper.
    # Measured as the intercept of peak allocated against the formulas on the H200 points below
    # (62-73 MB with and without Liger).
    "cublas_workspace": 64 * MiB,
    # Reserved minus allocated, by allocator mode: fixed + fragmentation x (the peak's dynamic
    # part: activations, logits and loss, transients; fragmentation_without_checkpointing
    # instead, where a mode has it, for runs without checkpointing) + logits_fragmentation x 4TV
    # when the loss is the peak. "measured": whether the numbers were fitted on a card.
    "allocator": {
        "fixed_segments": {
            "measured": True,
            # Partly used 2 MiB small-pool segments (cuBLAS's workspaces, in the first fit, are
            # now counted as allocated: CALIBRATION["cublas_workspace"]).
            "fixed": 32 * MiB,
            # Blocks the caching allocator keeps but cannot reuse, as a share of the dynamic part.
            "fragmentation": 0.02,
            # Without expandable segments the allocator holds about this many extra
            # fp32-logits-sized blocks (4 x T x V bytes) when the loss is the peak: the logits'
            # segments are split by the next step's long-lived block inputs and can no longer
            # hold a logits tensor, so new ones are reserved.
            "logits_fragmentation": 1.55,
            "source": (
                "fitted to the engine on an H200 without expandable segments (bench/results/"
                "2026-11-27-NVIDIA-H200-speed.json, Llama-3-8B shape: reserved - allocated = 1.67 GiB at "
                "2048 tokens, 6.39 and 6.26 GiB at 8192; slope 1.59 per 4TV, intercept 0.11 GiB), while the "
                "trainer still held the compute-dtype logits through the backward pass; refit with "
                "PYTORCH_CUDA_ALLOC_CONF=expandable_segments:False"
            ),
        },
        "expandable_segments": {
            "measured": True,
            # Expandable segments grow one segment in place, but a freed block inside it is
            # reused only by a request that fits. Under gradient checkpointing the block inputs
            # it keeps land between the recomputation's wide temporaries and leave holes that
            # the next block's temporaries do not fit, so reserved ends about a sixth of the
            # peak's dynamic part above allocated; without checkpointing the activations are
            # allocated forward and freed backward, stack-like, and the holes are few (about
            # 6%). Plus a small fixed part (partly used small-pool segments).
            # Fitted (these three constants only: the formulas are not fitted) on 20 H200 points
            # with expandable segments: the 14 cases of bench/results/2026-11-27-NVIDIA-H200-budget.json
            # (Llama-3-8B and ~1B shapes, Liger and kernels=none, with and without checkpointing,
            # 512-8192 tokens, 8-/32-bit paged AdamW and AdamW, padded, packed, accumulation) and
            # the 6 Llama-3-8B runs of tests/engine/test_budget_liger.py (Liger 2048x4, 8192x1,
            # 32768x1, 131072x1; none 2048x4, 8192x1). Every point is then within -2.4%..+2.0% of
            # peak reserved (median |error| 1.3% over the 14); least squares on the one-fraction
            # form (0.37 GiB + 0.025 x dynamic + 0.47 x 4TV at a plain loss peak) missed the
            # long-context points by -10%, and the logits term is not needed once the fraction
            # follows checkpointing. Checked by tests/engine/test_budget_recorded.py; refit with
            # bench/budget_accuracy.py (--recheck recomputes a record's predictions on the CPU).
            # Every one of these runs took peft's LoRA forward (they predate train.fast_lora);
            # the same constants are assumed for the fast path until it is refitted. On its three
            # H200 runs so far (Llama-3-8B, Liger; bench/results/2026-11-27-NVIDIA-H200-speed-llama3-8b-
            # 1406.json: 2048 x 4; -1412.json and -350k.json: 131,072 and 350,000 x 1 with offloaded
            # activations and 4,096-token MLP chunks) the estimate reserves +3.0%, -1.4% and +2.0%
            # against the measured peaks (tests/engine/test_budget_liger.py); not refitted to them.
            "fixed": 80 * MiB,
            "fragmentation": 0.16,
            "fragmentation_without_checkpointing": 0.06,
            "logits_fragmentation": 0.0,
            "source": (
                "fitted to the engine on an H200 with expandable segments (bench/results/"
                "2026-11-27-NVIDIA-H200-budget.json: 14 cases, Llama-3-8B and ~1B shapes; "
                "2026-11-27-NVIDIA-H200-speed-llama3-8b-0948.json and 2026-11-27-NVIDIA-H200-long-context.jsonl: "
                "Llama-3-8B shape, Liger 2048x4, 8192x1, 32768x1, 131072x1 and kernels=none 2048x4, 8192x1); "
                "refit with bench/budget_accuracy.py"
            ),
        },
    },
}

ENGINE_ALLOC_CONF = "expandable_segments:True"
"""What qlora_engine.train sets PYTORCH_CUDA_ALLOC_CONF to when the user has not set it."""


def allocator_mode(environ: Mapping[str, str] | None = None) -> str:
    """'expandable_segments' or 'fixed_segments': the CUDA caching allocator's mode in a run.

    The engine sets ``PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True`` unless the variable
    is already set (qlora_engine/train.py); a value the user set wins, and its last
    ``expandable_segments`` entry decides (absent: off, torch's default).
    """
    env = os.environ if environ is None else environ
    conf = env.get("PYTORCH_CUDA_ALLOC_CONF")
    if conf is None:
        conf = ENGINE_ALLOC_CONF
    expandable = False
    for item in conf.split(","):
        key, _, value = item.partition(":")
        if key.strip().lower() == "expandable_segments":
            expandable = value.strip().lower() in ("true", "1")
    return "expandable_segments" if expandable else "fixed_segments"


def allocator_slack(mode: str, dynamic: int, loss_peak: bool, logits_fp32: int, checkpointing: float = 1.0) -> int:
    """Reserved minus allocated at the peak, for an allocator mode (see CALIBRATION).

    ``checkpointing``: the share of the blocks that are checkpointed (1: all, 0: none; a bool
    works). The share of the dynamic part is ``fragmentation`` for all,
    ``fragmentation_without_checkpointing`` (where the mode has one) for none, and in between
    in proportion: the holes come from the kept block inputs (not yet measured in between)."""
    c = CALIBRATION["allocator"][mode]
    without = c.get("fragmentation_without_checkpointing", c["fragmentation"])
    share = without + (c["fragmentation"] - without) * float(checkpointing)
    slack = int(share * dynamic) + c["fixed"]
    if loss_peak:
        slack += int(c["logits_fragmentation"] * logits_fp32)
    return slack
