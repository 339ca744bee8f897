"""The budget's byte counts against what the libraries really allocate, exactly, on the CPU.

* 4-bit weights and constants: the tensors bitsandbytes builds when transformers loads a
  model in 4 bit. The CPU and CUDA paths give the same layout (blocks of 64 values, nested
  blocks of 256: Params4bit's default blocksize, functional.quantize_4bit; the CPU uses the
  default backend's quantize_4bit and the CPU quantize_blockwise kernel, whose output shapes
  match the CUDA kernels'). What only CUDA adds, the caching allocator's 512-byte rounding of
  each tensor, is part of the estimate's allocator slack, not of these components.
* LoRA parameters: what the engine's own ``models.wrap_with_lora`` (peft) makes trainable.
* Activations, logits and loss: one optimizer step of the engine's own Trainer (its setup:
  models.load_quantized_model, wrap_with_lora, enable_gradient_checkpointing; its step:
  forward, ``.loss``, backward, optimizer), 4-bit base, fp32 adapters, bf16 compute, SDPA.
  What autograd holds when the backward pass starts is counted per block through
  saved-tensor hooks (a hook's object lives exactly as long as autograd keeps the tensor);
  what each block keeps when checkpointing recomputes it, through the checkpoint's own
  record (torch.utils.checkpoint._CheckpointFrame, a private API: if torch renames it, these
  tests fail loudly); the loss's forward and backward peaks, from the profiler's record of
  every CPU allocation. If the engine changes what the step keeps, these tests fail.
* Peaks: the same allocation record, cut at the start of each block's backward, against
  ``timeline``'s replay of the block (with checkpointing, the recomputation and the backward;
  without, the backward and the forward with every lower block's saved tensors alive).
"""

from __future__ import annotations

import gc
import time
import weakref
from functools import partial

import bitsandbytes as bnb
import pytest
import torch
from tiny import build_tiny_llama
from torch.multiprocessing.reductions import StorageWeakRef
from torch.profiler import ProfilerActivity, profile
from transformers import LlamaConfig, LlamaForCausalLM

from qlora_engine import models
from qlora_engine.budget import estimate, model_spec
from qlora_engine.budget import formulas as fm
from qlora_engine.budget import timeline as tl
from qlora_engine.budget.estimate import adapted_linears
from qlora_engine.config import TrainConfig, apply_overrides
from qlora_engine.events import ListSink
from qlora_engine.runner import build_trainer

CPU = torch.device("cpu")


def config_for(folder, *overrides: str) -> TrainConfig:
    return apply_overrides(TrainConfig(), [f"model.ref={folder}", "quant.compute_dtype=bfloat16", *overrides])


@pytest.fixture(scope="module")
def odd_model_dir(tmp_path_factory):
    """A Llama whose layer sizes are odd (odd element counts, partial blocks, several nested
    blocks), with head_dim * heads != hidden and tied embeddings."""
    path = tmp_path_factory.mktemp("odd-llama")
    cfg = LlamaConfig(
        vocab_size=301,
        hidden_size=99,
        intermediate_size=251,
        num_hidden_layers=3,
        num_attention_heads=3,
        head_dim=32,
        num_key_value_heads=1,
        max_position_embeddings=256,
        tie_word_embeddings=True,
    )
    torch.manual_seed(0)
    LlamaForCausalLM(cfg).save_pretrained(path, safe_serialization=True)
    return path


def load_4bit(cfg: TrainConfig, folder) -> torch.nn.Module:
    return models.load_quantized_model(cfg, folder, CPU, torch.bfloat16)


def _tensors(obj, seen: dict[int, torch.Tensor]) -> None:
    """Every tensor a QuantState holds, including its nested state (deduplicated by storage)."""
    for value in vars(obj).values():
        if isinstance(value, torch.Tensor):
            seen.setdefault(value.untyped_storage().data_ptr(), value)
        elif isinstance(value, bnb.functional.QuantState):
            _tensors(value, seen)


def bitsandbytes_bytes(model: torch.nn.Module) -> tuple[int, int, int]:
    """(packed weight bytes, quantization-constant bytes, every other parameter's bytes)."""
    packed = 0
    consts: dict[int, torch.Tensor] = {}
    layers = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert layers
    for layer in layers:
        w = layer.weight
        assert w.dtype == torch.uint8 and not getattr(w.quant_state, "packing_format_for_cpu", False)
        packed += w.numel() * w.element_size()
        _tensors(w.quant_state, consts)
    const_bytes = sum(t.numel() * t.element_size() for t in consts.values())
    other = sum(p.numel() * p.element_size() for p in model.parameters() if not isinstance(p, bnb.nn.Params4bit))
    return packed, const_bytes, other


@pytest.mark.parametrize("model", ["tiny", "odd"])
@pytest.mark.parametrize("quant", [("nf4", True), ("fp4", False), ("nf4", False)])
def test_quantized_and_unquantized_bytes_equal_what_bitsandbytes_builds(model, quant, tiny_model_dir, odd_model_dir):
    folder = tiny_model_dir if model == "tiny" else odd_model_dir
    qtype, dq = quant
    cfg = config_for(folder, f"quant.quant_type={qtype}", f"quant.double_quant={str(dq).lower()}")
    packed, consts, other = bitsandbytes_bytes(load_4bit(cfg, folder))
    est = estimate(cfg)
    assert est.components["quantized_weights"] == packed
    assert est.components["quant_constants"] == consts
    assert est.components["unquantized_weights"] == other
    assert not est.approximate


def test_double_quantization_costs_about_an_eighth_of_a_bit_per_weight():
    # The figure: ~0.127 bits per parameter of constants instead of 0.5.
    n = 4096 * 14336
    _, dq = fm.quantized_linear_bytes(n, double_quant=True)
    _, plain = fm.quantized_linear_bytes(n, double_quant=False)
    assert 8 * dq / n == pytest.approx(0.127, abs=0.002)
    assert 8 * plain / n == pytest.approx(0.5, abs=0.001)


LORA_CASES = [
    ("lora.target_modules=[all-linear]", "lora.rank=8"),
    ("lora.target_modules=[attention]", "lora.rank=4"),
    ("lora.target_modules=[mlp]", "lora.rank=16", "lora.layers='1'"),
    ("lora.target_modules=[q_proj, v_proj]", "lora.rank=3"),
    ("lora.target_modules=[all-linear]", "lora.rank=2", "lora.use_dora=true"),
    ("lora.target_modules=[o_proj, down_proj]", "lora.rank=5", "lora.layers='0,2'"),
]


@pytest.mark.parametrize("overrides", LORA_CASES, ids=lambda o: " ".join(o))
def test_lora_parameter_count_equals_peft(overrides, odd_model_dir):
    cfg = config_for(odd_model_dir, *overrides)
    model = models.wrap_with_lora(load_4bit(cfg, odd_model_dir), cfg)
    trainable = [p for p in model.parameters() if p.requires_grad]
    est = estimate(cfg)
    assert est.details["lora_parameters"] == sum(p.numel() for p in trainable)
    # peft keeps adapters in fp32 (autocast_adapter_dtype), which the estimate assumes.
    assert {p.dtype for p in trainable} == {torch.float32}
    assert est.components["lora_weights"] == sum(p.numel() * 4 for p in trainable)


# -- activations, through the trainer's real step -------------------------------------------------


@pytest.fixture(scope="module")
def three_layer_dir(tmp_path_factory):
    """The tiny Llama with three blocks (so a lower block, an adapted one and an upper one)."""
    return build_tiny_llama(tmp_path_factory.mktemp("tiny-llama-3"), layers=3)


class _Held:
    """What a saved-tensor hook hands autograd: alive exactly as long as autograd keeps it."""

    __slots__ = ("t", "zone", "__weakref__")

    def __init__(self, t: torch.Tensor, zone) -> None:
        self.t, self.zone = t, zone


def _storage(t: torch.Tensor) -> tuple[int, int]:
    st = t.untyped_storage()
    return st.data_ptr(), st.nbytes()


# A tensor of this many bytes, made and freed at once, marks a moment in the CPU allocation
# timeline (kineto's memory events come in allocation order; no real tensor here has these sizes).
_MARKS = {"lm_head": 777_001, "backward": 777_003, "lm_head_grad": 777_005}
_BLOCK_MARK = 778_001  # + 2 x block index: the gradient of that block's output has arrived


def _mark(name: str) -> None:
    torch.empty(_MARKS[name], dtype=torch.uint8)


def _mark_block(i: int) -> None:
    torch.empty(_BLOCK_MARK + 2 * i, dtype=torch.uint8)  # returns None: the gradient is unchanged


class StepProbe:
    """Runs one optimizer step of the engine's Trainer on the CPU and records what it keeps.

    The model comes from the trainer's own setup (models.load_quantized_model, wrap_with_lora,
    enable_gradient_checkpointing) and the step is Trainer.train's: the probe only watches,
    through saved-tensor hooks around the whole step, module hooks, a hook on the loss (the
    start of the backward pass), the checkpoint's recomputation and the profiler's record of
    every CPU allocation.
    """

    def __init__(self, trainer) -> None:
        self.trainer = trainer
        model = trainer.model
        self.base = model.get_base_model()
        self.params = {_storage(t)[0] for t in [*model.parameters(), *model.buffers()]}
        self.shared: set[int] = set()  # RoPE's cos/sin: made once per forward, read by every block
        self.zone: object = "embed"
        self.held: list[weakref.ref] = []
        self.block_input_grad: list[bool] = []
        self.recomputed: list[int] = []
        self.at_backward: dict[object, int] = {}
        self.logits: list[StorageWeakRef] = []
        self.logits_expired_at_backward: list[bool] = []
        self.previous_logits_expired_at_forward: list[bool] = []

        layers = self.base.model.layers
        for i, layer in enumerate(layers):
            layer.register_forward_pre_hook(partial(self._enter_block, i), with_kwargs=True)
            layer.register_forward_hook(partial(self._leave_block, i))
        self.base.model.rotary_emb.register_forward_hook(self._rope)
        self.base.lm_head.register_forward_pre_hook(self._lm_head_in)
        self.base.lm_head.register_forward_hook(self._lm_head_out)
        self.base.register_forward_hook(self._model_out)

    # hooks
    def _enter_block(self, i, module, args, kwargs) -> None:
        self.zone = i
        if len(self.block_input_grad) < len(self.base.model.layers):  # the first forward only
            self.block_input_grad.append((args[0] if args else kwargs["hidden_states"]).requires_grad)

    def _leave_block(self, i, module, args, out) -> None:
        self.zone = "head"
        out = out[0] if isinstance(out, tuple) else out
        if out.requires_grad:  # (a recomputed output is thrown away: its hook never fires)
            out.register_hook(lambda grad: _mark_block(i))

    def _rope(self, module, args, out) -> None:
        self.shared |= {_storage(t)[0] for t in out}

    def _lm_head_in(self, module, args) -> None:
        _mark("lm_head")
        self.previous_logits_expired_at_forward += [ref.expired() for ref in self.logits[-1:]]
        args[0].register_hook(lambda grad: _mark("lm_head_grad"))

    def _lm_head_out(self, module, args, out) -> None:
        self.logits.append(StorageWeakRef(out.untyped_storage()))

    def _model_out(self, module, args, out) -> None:
        out.loss.register_hook(self._backward_starts)

    def _backward_starts(self, grad) -> None:
        _mark("backward")
        self.logits_expired_at_backward.append(self.logits[-1].expired())
        if not self.at_backward:
            self.at_backward = self.alive()

    def alive(self) -> dict[object, int]:
        """Bytes autograd holds now, by the block that saved them ('head': after the last
        block; 'shared': RoPE's tensors), each storage counted once, parameters not at all."""
        seen: dict[int, tuple[object, int]] = {}
        for ref in self.held:
            h = ref()
            if h is not None:
                ptr, nbytes = _storage(h.t)
                if ptr not in self.params and ptr not in seen:
                    seen[ptr] = ("shared" if ptr in self.shared else h.zone, nbytes)
        out: dict[object, int] = {}
        for zone, nbytes in seen.values():
            out[zone] = out.get(zone, 0) + nbytes
        return out

    def _pack(self, t: torch.Tensor) -> _Held:
        h = _Held(t, self.zone)
        self.held.append(weakref.ref(h))
        return h

    def run(self) -> None:
        frame_cls = torch.utils.checkpoint._CheckpointFrame
        original = frame_cls.check_recomputed_tensors_match
        probe = self

        def recomputed(frame, gid):
            # Called once per recomputed block, before the backward uses what it recomputed.
            seen = {}
            for t in frame.recomputed[gid].values():
                ptr, nbytes = _storage(t)
                if ptr not in probe.params and ptr not in probe.shared:
                    seen[ptr] = nbytes
            probe.recomputed.append(sum(seen.values()))
            return original(frame, gid)

        frame_cls.check_recomputed_tensors_match = recomputed
        # No garbage from earlier tests may be freed inside the step's allocation record
        # (autograd frees what it held by reference counting alone).
        gc.collect()
        gc.disable()
        try:
            # oneDNN's bf16 GEMMs take packing buffers of tens of KB from the CPU allocator on
            # every call; cuBLAS allocates its workspace once (CALIBRATION's cublas_workspace).
            # Without oneDNN the record holds the tensors a CUDA step allocates.
            with (
                torch.backends.mkldnn.flags(enabled=False),
                profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof,
                torch.autograd.graph.saved_tensors_hooks(self._pack, lambda h: h.t),
            ):
                self.trainer.train()
        finally:
            gc.enable()
            frame_cls.check_recomputed_tensors_match = original
        self.allocations = [
            e.nbytes() for e in sorted(prof.profiler.kineto_results.events(), key=lambda e: e.start_ns())
            if e.name() == "[memory]"
        ]  # fmt: skip

    def block_peaks(self) -> tuple[dict[int, int], int]:
        """({block: the peak of its backward above the level where it began}, the peak of the
        first forward above the step's start), for the last micro-batch's backward."""
        level, rises, start, forward, in_forward = 0, {}, None, 0, True
        blocks = {_BLOCK_MARK + 2 * i: i for i in range(len(self.base.model.layers))}
        for n in self.allocations:
            if abs(n) in blocks or abs(n) in _MARKS.values():
                if n > 0 and n in blocks:
                    start = (blocks[n], level)
                    rises[blocks[n]] = 0
                elif n == _MARKS["lm_head"]:
                    in_forward, start = False, None
                continue
            level += n
            if in_forward:
                forward = max(forward, level)
            if start is not None:
                rises[start[0]] = max(rises[start[0]], level - start[1])
        return rises, forward

    def loss_peaks(self) -> tuple[int, int]:
        """(forward, backward) peaks of the last micro-batch's loss above the level where each
        began: from lm_head's input to the backward's start, and from there to lm_head's
        input gradient (the loss's backward done)."""
        level, marks, levels, peaks = 0, [], [], []
        for n in self.allocations:
            name = next((k for k, v in _MARKS.items() if abs(n) == v), None)
            if name is not None:
                if n > 0:
                    marks.append(name)
                    levels.append(level)
                    peaks.append(level)
                continue
            level += n
            if peaks:
                peaks[-1] = max(peaks[-1], level)
        i = len(marks) - 1 - marks[::-1].index("lm_head")
        assert marks[i : i + 3] == ["lm_head", "backward", "lm_head_grad"], marks
        return peaks[i] - levels[i], peaks[i + 1] - levels[i + 1]


def engine_step(folder, overrides, samples, *, input_grads: bool = False) -> tuple[StepProbe, TrainConfig]:
    from qlora_engine.data import PreparedData

    cfg = config_for(
        folder, "data.path=probe", "train.max_steps=1", "train.save_steps=null", "optim.optimizer=adamw",
        "train.micro_batch_size=2", "train.gradient_accumulation_steps=1", "lora.rank=8",
        "train.gradient_checkpointing=false",
        f"output.dir={folder / 'runs' / str(time.monotonic_ns())}", *overrides,
    )  # fmt: skip
    trainer = build_trainer(cfg, ListSink(), data=PreparedData(train=samples, validation=None, fingerprint="probe"))
    trainer.setup()
    trainer.save_checkpoint = lambda: None  # measure the step, not the files
    trainer.save_adapter = lambda: None
    if input_grads:  # not the engine's choice: to test the formulas for CHECKPOINTING_INPUT_GRADS = True
        trainer.model.enable_input_require_grads()
    probe = StepProbe(trainer)
    probe.run()
    return probe, cfg


def probe_samples(kind: str, b: int, s: int, n: int) -> list[dict]:
    gen = torch.Generator().manual_seed(0)
    out = []
    for k in range(n):
        length = 40 if kind == "padding" and k % 2 else s  # padded micro-batches build a 4-D mask
        ids = torch.randint(3, 300, (length,), generator=gen).tolist()
        sample = {"input_ids": ids, "labels": ids}
        if kind == "packed":  # two samples per row: transformers builds a block-diagonal mask
            sample["position_ids"] = list(range(24)) + list(range(s - 24))
        out.append(sample)
    return out


# name: (overrides, data kind, whether input gradients are forced on: the engine turns them
# off, so that the backward pass stops at the lowest adapter; forcing them tests the formulas
# for CHECKPOINTING_INPUT_GRADS = True, every block down to the first one recomputed)
STEP_CASES = {
    "plain": ((), "fixed", False),
    "plain-accumulating": (("train.gradient_accumulation_steps=2",), "fixed", False),
    "padding": ((), "padding", False),
    "packed": (("data.packing=true",), "packed", False),
    "attention-only+dropout": (("lora.target_modules=[attention]", "lora.dropout=0.1"), "fixed", False),
    "mlp-only": (("lora.target_modules=[mlp]",), "fixed", False),
    "v-only+dropout": (("lora.target_modules=[v_proj]", "lora.dropout=0.05"), "fixed", False),
    "up-only": (("lora.target_modules=[up_proj]",), "fixed", False),
    "middle-layer": (("lora.layers='1'", "lora.rank=4"), "fixed", False),
    "checkpointing": (("train.gradient_checkpointing=true",), "fixed", False),
    "checkpointing+padding": (("train.gradient_checkpointing=true",), "padding", False),
    "checkpointing+middle-layer": (("train.gradient_checkpointing=true", "lora.layers='1'"), "fixed", False),
    "checkpointing+top-layer": (("train.gradient_checkpointing=true", "lora.layers='2'", "lora.target_modules=[mlp]"), "fixed", False),
    "checkpointing+input-grads": (("train.gradient_checkpointing=true",), "fixed", True),
    "checkpointing+input-grads+middle-layer": (("train.gradient_checkpointing=true", "lora.layers='1'"), "fixed", True),
    "checkpointing+input-grads+top-layer": (("train.gradient_checkpointing=true", "lora.layers='2'"), "fixed", True),
}  # fmt: skip


# peft's LoRA forward (train.fast_lora=false, and every layer with dropout) on the cases that change
# what it keeps; the dropout cases above take it with either switch.
PEFT_CASES = ["plain", "padding", "packed", "middle-layer", "checkpointing", "checkpointing+input-grads"]
STEP_ROWS = [(c, True) for c in STEP_CASES] + [(c, False) for c in PEFT_CASES]


@pytest.mark.parametrize(
    ("case", "fast_lora"), STEP_ROWS, ids=[f"{c}-{'fast' if f else 'peft'}-lora" for c, f in STEP_ROWS]
)
def test_saved_activation_bytes_equal_what_the_engines_step_keeps(case, fast_lora, three_layer_dir):
    """Per block, the bytes autograd keeps in the trainer's real step (and, with checkpointing,
    what each recomputed block keeps) equal the formulas; nothing keeps the logits through
    the backward pass; the loss's forward and backward peaks equal logits_bytes. Both LoRA
    forwards: train.fast_lora's and peft's (which the fast one leaves to layers with dropout)."""
    overrides, kind, forced = STEP_CASES[case]
    b, s = 2, 64  # s a multiple of 32: CUDA's memory-efficient kernel pads its log-sum-exp to 32 rows
    overrides = (*overrides, f"train.fast_lora={str(fast_lora).lower()}")
    probe, cfg = engine_step(three_layer_dir, overrides, probe_samples(kind, b, s, 4), input_grads=forced)

    spec = model_spec(LlamaConfig.from_pretrained(three_layer_dir))
    ckpt = cfg.train.gradient_checkpointing
    fast = fm.fast_lora_applies(fast_lora, cfg.quant.compute_dtype, cfg.lora.dropout, cfg.lora.use_dora)
    assert fast == (fast_lora and cfg.lora.dropout == 0)
    shape = fm.StepShape(
        batch=b, seq=s, elem=2, checkpointing=ckpt, mask=kind != "fixed", packed=kind == "packed", attn="sdpa",
        rank=cfg.lora.rank, dropout=cfg.lora.dropout > 0, dora=False, dropout_mask_bytes=4,
        input_grads=ckpt and (forced or fm.CHECKPOINTING_INPUT_GRADS), fast_lora=fast,
    )  # fmt: skip
    est = estimate(cfg, data_stats={"min": 40 if kind == "padding" else s, "max": s})
    assert est.details["checkpointing_input_grads"] == (ckpt and fm.CHECKPOINTING_INPUT_GRADS)
    assert est.details["fast_lora"] == fast
    adapted = adapted_linears(cfg, spec, [])
    layers = set(range(spec.num_layers)) if cfg.lora.layers is None else {int(cfg.lora.layers)}
    # The engine took the path the budget assumes, on every adapted layer.
    assert probe.trainer.fast_lora == (len(adapted) * len(layers) if fast else 0)
    flow = fm.grad_flow(spec.num_layers, layers, shape.input_grads)
    T, V, h = b * s, spec.vocab_size, spec.hidden_size

    # Which blocks' inputs need a gradient: the engine's behaviour the budget assumes.
    assert probe.block_input_grad == [grad for _, grad in flow]

    kept = probe.at_backward
    if ckpt:
        expected = [2 * T * h if here or grad else 0 for here, grad in flow]  # each block's input
        total_kept, recomputed = fm.checkpointed_blocks(spec, shape, adapted, layers)
        assert sum(expected) == total_kept
        # From the top block down, once per micro-batch; none below the lowest adapter.
        assert probe.recomputed == recomputed * cfg.train.gradient_accumulation_steps
    else:
        expected = [fm.block_saved(spec, shape, adapted if here else [], grad) for here, grad in flow]
        assert sum(expected) == fm.blocks_saved(spec, shape, adapted, layers)
        assert probe.recomputed == []
        rows = b if kind == "packed" else 1
        assert kept["shared"] == 2 * 2 * rows * s * spec.head_dim  # RoPE's cos and sin, kept once
    assert [kept.get(i, 0) for i in range(spec.num_layers)] == expected
    # After the blocks: the final norm, and of the loss the int64 shifted labels, the fp32
    # log-softmax, nll_loss's total weight (fp32) and the divisor num_items_in_batch (int64).
    assert kept["head"] == fm.final_saved(spec, shape) + 8 * T + 4 * T * V + 4 + 8
    assert set(kept) <= {*range(spec.num_layers), "head", "shared"}

    # The logits: gone before every backward pass, and before the next micro-batch's forward.
    assert probe.logits_expired_at_backward == [True] * cfg.train.gradient_accumulation_steps
    assert all(probe.previous_logits_expired_at_forward)
    loss_bwd, loss_fwd = fm.logits_bytes(spec, shape)
    fwd_peak, bwd_peak = probe.loss_peaks()
    # Beyond the formula, the forward makes the padded and the shifted int64 labels (counted
    # with the batch in shared_saved) and a few scalars.
    labels = 8 * b * (s + 1) + 8 * T
    assert 0 <= fwd_peak - (loss_fwd + labels) <= 64
    # The backward peak: the two fp32 gradients on top of the kept log-softmax (already in the
    # level), once nll_loss's backward has released its labels and total weight.
    assert 0 <= bwd_peak - (loss_bwd - 4 * T * V - 8 * T - 4) <= 64

    # The peaks of the blocks, as the timeline replays them.
    rises, forward = probe.block_peaks()
    traces = {i: tl.block_trace(spec, shape, adapted if here else [], grad) for i, (here, grad) in enumerate(flow)
              if here or grad}  # fmt: skip
    assert set(rises) == set(traces)
    lora = {i: 4 * sum(n for lin in adapted for n in fm.lora_tensor_sizes(lin, shape.rank, False)) if here else 0
            for i, (here, _) in enumerate(flow)}  # fmt: skip
    # Below the replay: where the peak is a 4-bit matmul's backward, the CPU decodes the absmax
    # once (4 bytes a block) and frees it before the product exists; CUDA holds two fp32 copies
    # through it (the replay's dequant).
    absmax = 8 * max(-(-lin.numel // 64) for lin in spec.block_linears)
    for i, tr in traces.items():
        predicted = tr.backward_peak - 2 * T * h - (0 if ckpt else tr.saved)  # the rise above the gradient's arrival
        if ckpt:
            # Beyond the replay: the CPU generator's state (5,056 bytes) that checkpointing saves
            # around the recomputation, and a few of bitsandbytes' small CPU temporaries.
            assert -absmax <= rises[i] - predicted <= 8192, (i, rises[i], predicted)
        else:
            # Beyond the replay: the LoRA weights' gradients made in this block's backward
            # (the estimate counts them separately, a whole block's worth).
            assert -absmax <= rises[i] - predicted <= lora[i] + 64, (i, rises[i], predicted)
    if not ckpt and cfg.train.gradient_accumulation_steps == 1:
        below, predicted = 0, 0
        for i, tr in traces.items():
            embeds = 2 * T * h if i else 0  # LlamaModel.forward holds inputs_embeds to its end
            predicted = max(predicted, below + embeds + fm.shared_saved(spec, shape) + tr.forward_peak)
            below += tr.saved
        # The final norm's fp32 temporaries over everything the blocks keep (the peak when the
        # blocks' own moments are lower: train.fast_lora's).
        predicted = max(predicted, below + 2 * T * h + fm.shared_saved(spec, shape) + tl.final_norm_peak(spec, shape))
        # A block whose MLP has no adapter peaks at a bare 4-bit matmul, where bitsandbytes' CPU
        # kernel makes about 20 KB of temporaries the CUDA path (the replay) does not.
        mlp_adapted = any(lin.role == "mlp" for lin in adapted) and cfg.lora.layers is None
        slack = 64 if mlp_adapted else 24_576
        assert -1024 <= forward - predicted <= slack, (forward, predicted)


def test_the_engine_keeps_its_input_grads_choice(three_layer_dir):
    """models.enable_gradient_checkpointing: whether the embedding output requires grad equals
    fm.CHECKPOINTING_INPUT_GRADS (False: transformers turns input gradients on with
    checkpointing, the engine turns them off again). If this fails, the engine (or
    transformers) changed what the backward pass reaches: flip the constant (its formulas are
    tested both ways above, the True side with input gradients forced on)."""
    cfg = config_for(three_layer_dir, "train.gradient_checkpointing=true", "lora.layers='2'")
    model = models.wrap_with_lora(load_4bit(cfg, three_layer_dir), cfg)
    models.enable_gradient_checkpointing(model)
    model.train()
    seen = []
    model.get_base_model().model.layers[0].register_forward_pre_hook(lambda m, a: seen.append(a[0].requires_grad))
    model(input_ids=torch.randint(3, 300, (1, 8)), use_cache=False)
    assert seen == [fm.CHECKPOINTING_INPUT_GRADS]


@pytest.mark.parametrize(("tokens", "out_features", "rank"), [(8192, 14336, 16), (2048, 4096, 8), (512, 1024, 64), (100, 50, 4)])
def test_the_fast_lora_forward_adds_into_the_base_output_on_the_tape(tokens, out_features, rank):
    # fast_lora._LoraProduct adds the LoRA half into the 4-bit matmul's output in place (tested on the
    # real op in test_fast_lora.py): a layer that is not its block's last leaves one output alive,
    # never the base output beside a second one.
    from qlora_engine.budget.linears import Linears
    from qlora_engine.budget.spec import LinearShape
    from qlora_engine.budget.tape import Tape

    lin = LinearShape("up_proj", 4096, out_features, False, "mlp", "mlp_in")
    layers = Linears()
    layers.s = fm.StepShape(batch=1, seq=tokens, elem=2, checkpointing=False, mask=False, packed=False,
                            attn="sdpa", rank=rank, dropout=False, dora=False, fast_lora=True)  # fmt: skip
    layers.T, layers.e, layers.names, layers.last = tokens, 2, {"up_proj"}, "down_proj"

    class Levels(Tape):  # the highest level of live tensors (the dequantized weight's spike apart)
        top = 0

        def new(self, name, nbytes):
            name = super().new(name, nbytes)
            self.top = max(self.top, self.level)
            return name

    t = Levels()
    out = layers.linear(t, lin, t.external("x"), True)
    output = 2 * tokens * out_features
    kept = t.level - output  # besides the output: the product's saves, all rank-wide
    assert t.size[out] == output
    assert 0 < kept <= 2 * (tokens * rank + 2 * rank * (lin.in_features + out_features))
    # at most: the output, the saves and the product's rank-wide temporaries (x @ A in two halves
    # and twice over, lora_B's fp32 copy); a second output beside the base output would double it
    temporaries = 2 * (2 * tokens * 2 * rank) + 4 * out_features * rank
    assert output <= t.top <= output + kept + temporaries
