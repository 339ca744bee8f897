"""The paged optimizer state the engine reports (``StepMetrics.paged_out``, issue 21 goal 7).

bitsandbytes' paged buffers are CUDA managed memory, flagged ``is_paged``; a CPU machine cannot
make one, so the state here is a real AdamW state with one buffer flagged as bitsandbytes flags
its own. Where the pages are is a GPU matter (bench/spill.py measures it on a card).
"""

from __future__ import annotations

import torch

from qlora_engine import optim


def test_only_the_paged_buffers_count_and_the_cpu_reports_none():
    p = torch.nn.Parameter(torch.zeros(1000))
    opt = torch.optim.AdamW([p])
    p.grad = torch.ones(1000)
    opt.step()  # exp_avg, exp_avg_sq: 4,000 bytes each, and a step counter
    assert optim.paged_state_bytes(opt) == 0
    opt.state[p]["exp_avg"].is_paged = True
    assert optim.paged_state_bytes(opt) == 4000
    opt.state[p]["exp_avg_sq"].is_paged = True
    assert optim.paged_state_bytes(opt) == 8000
    assert optim.paged_out_bytes(opt, torch.device("cpu"), 0) is None
