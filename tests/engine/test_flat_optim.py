"""One flat buffer for every LoRA weight and gradient (qlora_engine.optim.FLAT): one optimizer launch a step.

The flat optimizer must be the same arithmetic as bitsandbytes' (or torch's) tensor by tensor:
every tensor starts on a 256-element block of the 8-bit state and tensors under
``min_8bit_size`` keep 32-bit state. A run trains to the same weights either way, its
checkpoints resume exactly (test_train.py's resume test runs the flat path, the default), and
a checkpoint written tensor by tensor before the change still resumes.
"""

from __future__ import annotations

import copy

import pytest
import torch

from qlora_engine import optim
from qlora_engine.config_sections import OptimConfig
from qlora_engine.events import ListSink, StepMetrics
from qlora_engine.runner import build_trainer
from qlora_engine.train import Trainer


@pytest.fixture
def per_tensor():
    """Run the body with the old optimizer layout; always put the default back."""
    optim.FLAT = False
    yield
    optim.FLAT = True


def _params() -> list[torch.nn.Parameter]:
    # Sizes that are and are not multiples of 256, under and over min_8bit_size (4096).
    torch.manual_seed(0)
    return [torch.nn.Parameter(torch.randn(s)) for s in [(16, 300), (700, 16), (8, 64), (5, 7), (16, 1024)]]


def _train(opt_name: str, flat: bool, steps: int = 3) -> list[torch.Tensor]:
    optim.FLAT = flat
    try:
        ps = _params()
        opt = optim.build_optimizer(OptimConfig(optimizer=opt_name, weight_decay=0.01), ps)
        for i in range(steps):
            gen = torch.Generator().manual_seed(i)
            loss = sum((p * torch.randn(p.shape, generator=gen)).sum() + (p**2).sum() for p in ps)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        return [p.detach().clone() for p in ps]
    finally:
        optim.FLAT = True


@pytest.mark.parametrize("name", ["paged_adamw_8bit", "adamw_8bit", "paged_adamw_32bit", "adamw"])
def test_flat_update_is_the_same_arithmetic_as_tensor_by_tensor(name):
    for a, b in zip(_train(name, flat=False), _train(name, flat=True), strict=True):
        assert torch.equal(a, b)


def test_tensors_are_views_of_one_buffer_and_gradients_stay_linked():
    ps = _params()
    opt = optim.build_optimizer(OptimConfig(), ps)
    groups = opt.flat_groups
    assert len(groups) == 2  # the 8-bit tensors, and the small ones held at 32 bits
    assert len(opt.param_groups[0]["params"]) == 2
    for g in groups:
        for p, o in zip(g.params, g.offsets, strict=True):
            assert o % optim.ALIGN == 0
            assert p.data_ptr() == g.flat[o:].data_ptr() and p.grad.data_ptr() == g.flat.grad[o:].data_ptr()
    sum(p.sum() for p in ps).backward()
    assert all(float(g.flat.grad.sum()) == sum(p.numel() for p in g.params) for g in groups)
    opt.zero_grad(set_to_none=True)
    assert all(p.grad is not None and float(p.grad.abs().sum()) == 0 for p in ps)
    ps[0].grad = None  # someone else dropped a gradient: the next step links it again
    sum(p.sum() for p in ps).backward()
    opt.step()
    assert ps[0].grad.data_ptr() == groups[0].flat.grad.data_ptr()


def _trainer(tiny_cfg, tmp_path, name, *overrides) -> tuple[Trainer, ListSink]:
    sink = ListSink()
    trainer = build_trainer(tiny_cfg(f"output.dir={tmp_path / name}", *overrides), sink)
    trainer.setup()
    return trainer, sink


def _lora(trainer: Trainer) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in trainer.model.named_parameters() if p.requires_grad}


def test_a_run_trains_to_the_same_weights_either_way(tiny_cfg, tmp_path, per_tensor):
    old, old_sink = _trainer(tiny_cfg, tmp_path, "old", "train.max_steps=4")
    assert not hasattr(old.optimizer, "flat_groups")
    old.train()
    optim.FLAT = True
    new, new_sink = _trainer(tiny_cfg, tmp_path, "new", "train.max_steps=4")
    assert len(new.optimizer.param_groups[0]["params"]) <= 2
    new.train()
    assert [e.loss for e in new_sink.of(StepMetrics)] == [e.loss for e in old_sink.of(StepMetrics)]
    a, b = _lora(old), _lora(new)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_a_checkpoint_written_tensor_by_tensor_still_resumes(tiny_cfg, tmp_path, per_tensor):
    from qlora_engine.runner import run

    common = ["train.max_steps=4", "train.save_steps=2"]
    straight = ListSink()
    run(tiny_cfg(*common, f"output.dir={tmp_path / 'straight'}"), straight)  # per tensor throughout
    cfg = tiny_cfg("train.max_steps=2", "train.save_steps=2", f"output.dir={tmp_path / 'split'}")
    run(cfg, ListSink())  # per tensor: the checkpoint at step 2 holds 28 states
    optim.FLAT = True
    resumed = ListSink()
    run(tiny_cfg(*common, f"output.dir={tmp_path / 'split'}"), resumed, resume=True)
    a = [e.loss for e in straight.of(StepMetrics)][2:]
    assert [e.loss for e in resumed.of(StepMetrics)] == pytest.approx(a, abs=1e-6)


def steps(opt, ps, rng):
    """Optimizer steps ``rng`` on a fixed, seeded loss (the same steps whichever optimizer runs them)."""
    for i in rng:
        gen = torch.Generator().manual_seed(i)
        sum((p * torch.randn(p.shape, generator=gen)).sum() + (p**2).sum() for p in ps).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)


@pytest.mark.parametrize("name", ["paged_adamw_8bit", "adamw"])
def test_an_8bit_state_saved_tensor_by_tensor_loads_into_the_flat_buffer(name):
    cfg = OptimConfig(optimizer=name)
    optim.FLAT = False
    try:
        ps = _params()
        opt = optim.build_optimizer(cfg, ps)
        steps(opt, ps, range(2))
        saved, weights = copy.deepcopy(opt.state_dict()), [p.detach().clone() for p in ps]
        steps(opt, ps, range(2, 4))  # the per-tensor run goes on
    finally:
        optim.FLAT = True
    flat_ps = [torch.nn.Parameter(w) for w in weights]
    flat = optim.build_optimizer(cfg, flat_ps)
    flat.load_state_dict(saved)
    steps(flat, flat_ps, range(2, 4))
    for a, b in zip(ps, flat_ps, strict=True):
        assert torch.equal(a.detach(), b.detach())


@pytest.mark.parametrize("name", ["paged_adamw_8bit", "adamw_8bit", "paged_adamw_32bit", "adamw"])
def test_the_flat_buffer_saves_tensor_by_tensor_so_a_per_tensor_optimizer_goes_on_from_it(name):
    """One process writes with the flat buffer; DDP and FSDP (no flat buffer) must resume from it."""

    cfg = OptimConfig(optimizer=name)
    ps = _params()
    flat = optim.build_optimizer(cfg, ps)
    steps(flat, ps, range(2))
    saved, weights = copy.deepcopy(flat.state_dict()), [p.detach().clone() for p in ps]
    assert len(saved["param_groups"]) == 1 and saved["param_groups"][0]["params"] == list(range(len(ps)))
    steps(flat, ps, range(2, 4))  # the flat run goes on
    plain_ps = [torch.nn.Parameter(w) for w in weights]
    plain = optim.build_optimizer(cfg, plain_ps, flat=False)
    plain.load_state_dict(saved)
    steps(plain, plain_ps, range(2, 4))
    for a, b in zip(ps, plain_ps, strict=True):
        assert torch.equal(a.detach(), b.detach())
    again = optim.build_optimizer(cfg, [torch.nn.Parameter(w) for w in weights])
    again.load_state_dict(saved)  # and the flat buffer reads its own saved state back
    assert again.state_dict()["state"].keys() == saved["state"].keys()


@pytest.mark.parametrize("name", ["paged_adamw_8bit", "paged_adamw_32bit", "adamw"])
def test_the_budget_counts_the_flat_optimizer_s_state(name):
    from qlora_engine.budget import formulas

    assert formulas.FLAT_LORA == optim.FLAT
    ps = _params()
    opt = optim.build_optimizer(OptimConfig(optimizer=name), ps)
    sum(p.sum() for p in ps).backward()
    opt.step()
    held = sum(
        t.numel() * t.element_size()
        for s in opt.state.values()
        for k, t in s.items()
        if torch.is_tensor(t) and t.dim() >= 1 and not k.startswith("qmap")
    )
    resident, paged, _ = formulas.optimizer_state_bytes([p.numel() for p in ps], name)
    maps = 2 * 256 * 4 if name.endswith("8bit") else 0
    assert resident + paged - maps == held


@pytest.mark.parametrize("flat", [True, False], ids=["flat", "per-tensor"])
def test_overrides_left_in_bitsandbytes_global_manager_change_nothing(flat):
    """bitsandbytes keeps per-tensor overrides in one process-wide table keyed by tensor id and by
    position, never cleared: what an earlier optimizer left there (transformers' 32-bit embeddings,
    our own small flat group) gave a later tensor 32-bit state inside an 8-bit optimizer."""
    from bitsandbytes.optim import GlobalOptimManager

    mng = GlobalOptimManager.get_instance()
    ps = _params()
    before = dict(mng.pid2config), dict(mng.index2config)
    mng.index2config[(0, 0)] = {"optim_bits": 32}  # an earlier optimizer's override, by position
    mng.pid2config[id(ps[1])] = {"optim_bits": 32}  # and by an id this tensor now has
    optim.FLAT = flat
    try:
        opt = optim.build_optimizer(OptimConfig(optimizer="adamw_8bit"), ps)
        steps(opt, ps, range(1))
    finally:
        optim.FLAT = True
        mng.pid2config, mng.index2config = before
    held = [g.flat for g in opt.flat_groups if g.eight_bit] if flat else [p for p in ps if p.numel() >= 4096]
    assert len(held) == (1 if flat else 3)
    assert [opt.state[p]["state1"].dtype for p in held] == [torch.uint8] * len(held)
    assert not mng.pid2config.keys() - before[0].keys()  # and ours wrote nothing there
