"""The VRAM estimate: a per-component breakdown of one run's peak GPU memory.

The peak of a QLoRA step is one of a few moments, and the estimate computes each:

* ``loss_backward``: the backward of the cross-entropy, when the fp32 log-softmax and its two
  gradients exist together (the peak of large-vocabulary models without fused kernels; the
  trainer has already dropped the compute-dtype logits);
* ``loss_forward``: the forward of the loss (the logits, their fp32 copy and the log-softmax;
  with Liger's fused linear + cross-entropy, one chunk of logits);
* ``block_backward``: a decoder block's backward; under gradient checkpointing it begins by
  recomputing the block's forward, whose fp32 LoRA temporaries are the peak of a Liger run on
  peft's LoRA forward (on ``train.fast_lora``'s, down_proj's input gradients over the
  recomputed block; ``timeline`` replays a block tensor by tensor);
* ``block_forward``: a block's forward without checkpointing, with every lower block's
  saved tensors alive;
* ``optimizer_step``: the optimizer's update (only torch's AdamW has temporaries).

What is alive at every moment (weights, LoRA weights, resident optimizer state) is added to
the largest, with the LoRA gradients that exist at that moment (none before the first
backward of a step unless micro-batches accumulate). ``total`` is what the process needs on
the card: the peak that torch's caching allocator reserves, the CUDA context outside it, and
the paged optimizer state that lives in managed memory (and can move to CPU RAM).

Which code runs is read the way the engine will decide it: fused Liger kernels for 'auto'
when liger-kernel is installed and the architecture is supported (``kernels``),
``train.fast_lora``'s LoRA forward unless dropout, DoRA or float16 leave the layers to peft's
(``formulas.fast_lora_applies``), and the caching allocator's mode from the environment
(:func:`allocator_mode`; the engine turns on expandable segments unless
``PYTORCH_CUDA_ALLOC_CONF`` is set).
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

from qlora_engine.budget import formulas as fm
from qlora_engine.budget import timeline as tl
from qlora_engine.budget.allocator import CALIBRATION, allocator_mode, allocator_slack
from qlora_engine.budget.kernels import LIGER_MODEL_TYPES, KernelChoice, resolve_kernels
from qlora_engine.budget.spec import LinearShape, ModelSpec, spec_from_config, spec_from_ref
from qlora_engine.config import TrainConfig, parse_layers, validate
from qlora_engine.config_sections import LORA_PRESETS
from qlora_engine.errors import ConfigError

GiB = 1 << 30
MiB = 1 << 20

COMPONENTS = (
    "quantized_weights",
    "quant_constants",
    "unquantized_weights",
    "dequantized_weights",
    "lora_weights",
    "lora_grads",
    "optimizer_state",
    "activations",
    "logits_loss",
    "cuda_context",
    "allocator_slack",
)

ABSENT_WHEN_ZERO = ("cuda_context", "dequantized_weights")
"""Components a run may not have at all (the CUDA context of a CPU run, weights not kept dequantized): not listed when 0."""

COMPONENT_HELP = {
    "quantized_weights": "the frozen linear layers in 4 bit, two weights per byte",
    "quant_constants": "per-block scales (absmax) of the 4-bit weights, double-quantized",
    "unquantized_weights": "embeddings, lm_head and norms, kept in the compute dtype",
    "dequantized_weights": "the adapted 4-bit weights kept dequantized in the compute dtype (train.keep_dequantized)",
    "lora_weights": "the trainable adapters (fp32)",
    "lora_grads": "their gradients (fp32), as many as exist at the peak",
    "optimizer_state": "AdamW's two moments per adapter weight",
    "activations": "what the forward pass keeps for the backward pass, the temporaries of the moment, cuBLAS workspaces",
    "logits_loss": "the logits over the whole vocabulary and the fp32 loss buffers (one chunk with Liger's fused loss)",
    "cuda_context": "the CUDA driver's context and kernels, outside PyTorch's allocator",
    "allocator_slack": "memory PyTorch's caching allocator reserves beyond what is in use",
}


@dataclass
class VramEstimate:
    """Peak GPU memory of a run, by component, in bytes.

    ``total`` is the expected peak on the card, ``low``/``high`` the range it should fall in;
    ``fits`` is None when no GPU size was given. ``spill_to_cpu_bytes`` is how much paged
    optimizer state would have to move to CPU RAM on the given card (slower steps, no crash).
    """

    components: dict[str, int]
    total: int
    low: int
    high: int
    gpu_bytes: int | None = None
    gpu_name: str | None = None
    fits: bool | None = None
    spill_to_cpu_bytes: int = 0
    approximate: bool = False
    reasons: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    details: dict[str, Any] = field(default_factory=dict)

    @property
    def torch_reserved(self) -> int:
        """The part torch's ``max_memory_reserved()`` measures (no context, no paged state)."""
        return int(self.details.get("torch_reserved", self.total))

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> VramEstimate:
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


def compute_bytes(compute_dtype: str) -> int:
    """Bytes per element of the compute dtype on a GPU ('auto' is bf16, or fp16 on older cards)."""
    return 4 if compute_dtype == "float32" else 2


def adapted_linears(cfg: TrainConfig, spec: ModelSpec, reasons: list[str]) -> list[LinearShape]:
    """The linear layers of a block that get adapters, resolved like models.resolve_target_modules."""
    targets = cfg.lora.target_modules
    names = spec.linear_names()
    if len(targets) == 1 and targets[0] in LORA_PRESETS:
        preset = targets[0]
        return [lin for lin in spec.block_linears if preset == "all-linear" or lin.role == preset]
    unknown = [t for t in targets if t not in names]
    if unknown:
        if spec.approximate:
            reasons.append(f"lora.target_modules {unknown} are not among the modelled layers {names}; not counted")
        else:
            raise ConfigError(
                f"lora.target_modules: {unknown} not in this model; its linear layers are {names} "
                f"(or use a preset: {', '.join(LORA_PRESETS)})."
            )
    return [lin for lin in spec.block_linears if lin.name in targets]


def adapted_layers(cfg: TrainConfig, spec: ModelSpec) -> list[int]:
    layers = parse_layers(cfg.lora.layers)
    if layers is None:
        return list(range(spec.num_layers))
    if spec.usable and max(layers) >= spec.num_layers:
        raise ConfigError(
            f"lora.layers: {cfg.lora.layers!r} goes past the model's {spec.num_layers} layers (0-{spec.num_layers - 1})."
        )
    return [i for i in layers if i < spec.num_layers]


def _data_shape(cfg: TrainConfig, data_stats: dict[str, Any] | None, notes: list[str]) -> tuple[int, bool]:
    """(tokens per sequence of the longest micro-batch, whether a 4-D attention mask is built)."""
    max_len = cfg.data.max_length
    mbs = cfg.train.micro_batch_size
    packing = cfg.data.packing
    if not data_stats:
        mask = packing or mbs > 1
        if mbs > 1 and not packing:
            notes.append("without data statistics, micro-batches are assumed padded (an attention mask is built)")
        return max_len, mask
    longest = data_stats.get("longest_sequence") or data_stats.get("max") or max_len
    seq = max(1, min(int(longest), max_len))
    shortest = min(int(data_stats.get("min", seq) or seq), max_len)
    if packing:
        return seq, True
    mask = mbs > 1 and shortest < seq
    if seq < max_len:
        notes.append(f"sized for the longest sample in the data: {seq} tokens (data.max_length is {max_len})")
    return seq, mask


def kernels_for(cfg: TrainConfig, spec: ModelSpec, installed: bool | None = None) -> KernelChoice:
    """What ``models.apply_fused_kernels`` will do for this run (see ``kernels.resolve_kernels``).

    The budget plans for a CUDA card unless ``train.device`` is 'cpu'. 'liger' where the engine
    would refuse it (a CPU run, an architecture liger does not patch) is the same ConfigError.
    """
    choice = resolve_kernels(cfg.train.kernels, spec.model_type, cuda=cfg.train.device != "cpu", installed=installed)
    if cfg.train.kernels == "liger" and not choice.liger:
        where = "a CUDA GPU" if cfg.train.device == "cpu" else f"a supported architecture (not {spec.model_type!r})"
        raise ConfigError(f"train.kernels: 'liger' needs {where}; set train.kernels to auto or none.")
    return choice


def reached_layers(cfg: TrainConfig, spec: ModelSpec) -> int:
    """Decoder layers the backward pass reaches: from the lowest adapted one up."""
    layers = adapted_layers(cfg, spec)
    return spec.num_layers - min(layers) if layers else 0


def variant(cfg: TrainConfig, **changes: Any) -> TrainConfig:
    """A copy of ``cfg`` with ``section__field=value`` changes, without re-validating (fast)."""
    new = copy.copy(cfg)
    by_section: dict[str, dict[str, Any]] = {}
    for key, value in changes.items():
        section, name = key.split("__")
        by_section.setdefault(section, {})[name] = value
    for section, values in by_section.items():
        setattr(new, section, replace(getattr(cfg, section), **values))
    return new


def with_checkpointing(cfg: TrainConfig, k: int, n: int) -> TrainConfig:
    """A copy of ``cfg`` with the lowest ``k`` of the ``n`` reached layers checkpointed (0: off; n: all)."""
    return variant(cfg, train__gradient_checkpointing=k > 0, train__checkpoint_layers=k if 0 < k < n else None)


def every_layer(cfg: TrainConfig) -> TrainConfig:
    """A copy of ``cfg`` with every layer checkpointed."""
    return variant(cfg, train__gradient_checkpointing=True, train__checkpoint_layers=None)


def fewest_checkpointed(cfg: TrainConfig, spec: ModelSpec, ok: Callable[[TrainConfig], bool]) -> int | None:
    """The fewest checkpointed layers (0: checkpointing off) for which ``ok(config)`` holds; None if not even all.

    A binary search: checkpointing one more layer never needs more memory.
    """
    n = reached_layers(cfg, spec)
    if not ok(with_checkpointing(cfg, n, n)):
        return None
    lo, hi = 0, n
    while lo < hi:
        mid = (lo + hi) // 2
        if ok(with_checkpointing(cfg, mid, n)):
            hi = mid
        else:
            lo = mid + 1
    return lo


def estimate_from_spec(
    cfg: TrainConfig,
    spec: ModelSpec,
    *,
    gpu_bytes: int | None = None,
    gpu_name: str | None = None,
    data_stats: dict[str, Any] | None = None,
    liger_installed: bool | None = None,
    cuda: bool = True,
) -> VramEstimate:
    """The estimate for a config and an already-read model spec (pure arithmetic, no I/O).

    ``liger_installed``: whether liger-kernel is importable where the run will be (None: look
    it up on this machine), which decides what ``train.kernels: auto`` runs. ``cuda=False``: the
    run is on the CPU, where there is no CUDA context to count.
    """
    reasons = list(spec.reasons)
    notes: list[str] = []
    if not spec.usable:
        comps = dict.fromkeys(COMPONENTS, 0)
        return VramEstimate(comps, 0, 0, 0, gpu_bytes, gpu_name, None, 0, True, reasons, notes, {"usable": False})
    if cfg.train.gradient_checkpointing == "auto":
        # The budget estimates a settled config (qlora_engine.plan settles 'auto' for a card);
        # unsettled, 'auto' is taken at its most frugal: every layer checkpointed.
        cfg = every_layer(cfg)

    e = compute_bytes(cfg.quant.compute_dtype)
    if cfg.quant.compute_dtype == "float32":
        reasons.append("float32 compute is modelled roughly (the budget is calibrated for bf16/fp16)")
    adapted = adapted_linears(cfg, spec, reasons)
    layers = adapted_layers(cfg, spec)
    L = spec.num_layers
    seq, mask = _data_shape(cfg, data_stats, notes)
    kern = kernels_for(cfg, spec, liger_installed)
    notes.append(f"kernels: {kern.kernels} ({kern.reason})")
    shape = fm.StepShape(
        batch=cfg.train.micro_batch_size,
        seq=seq,
        elem=e,
        checkpointing=cfg.train.gradient_checkpointing,
        mask=mask,
        packed=cfg.data.packing,
        attn=cfg.model.attn_implementation,
        rank=cfg.lora.rank,
        dropout=cfg.lora.dropout > 0,
        dora=cfg.lora.use_dora,
        input_grads=cfg.train.gradient_checkpointing and fm.CHECKPOINTING_INPUT_GRADS,
        kernels=kern.kernels,
        loss=kern.loss if kern.liger else "plain",
        norm_in_place=kern.norm_in_place,
        checkpoint_layers=cfg.train.checkpoint_layers if cfg.train.gradient_checkpointing else None,
        offload=cfg.train.gradient_checkpointing and cfg.train.offload_activations,
        mlp_chunk=cfg.train.mlp_chunk_tokens,
        fast_lora=fm.fast_lora_applies(
            cfg.train.fast_lora, cfg.quant.compute_dtype, cfg.lora.dropout, cfg.lora.use_dora
        ),
    )
    if shape.fast_lora:
        notes.append(
            "train.fast_lora: checked on three GPU runs so far; the allocator's slack is fitted on runs without it"
        )
    elif cfg.train.fast_lora:
        why = "LoRA dropout" if cfg.lora.dropout > 0 else "DoRA" if cfg.lora.use_dora else "float16"
        notes.append(f"train.fast_lora: peft's LoRA path kept for {why} (its fp32 copies are counted)")
    if spec.max_position_embeddings and shape.seq > spec.max_position_embeddings:
        notes.append(
            f"{shape.seq} tokens is longer than the model's context ({spec.max_position_embeddings}); "
            "quality past it is not assured"
        )
    if cfg.lora.use_dora:
        reasons.append("DoRA's extra activations are modelled roughly")
    if shape.attn == "eager":
        notes.append("eager attention keeps two batch x heads x seq x seq tensors per layer; 'sdpa' is far leaner")

    packed, consts, unquant, quantized_params = _weight_bytes(cfg, spec, e, notes)
    # train.keep_dequantized: the adapted 4-bit layers' weights again, in the compute dtype (fast_lora.keep_dense)
    dense = 0
    if cfg.train.keep_dequantized is True and shape.fast_lora and cfg.train.strategy != "fsdp":
        skip = spec.prequantized["skip_modules"] if spec.prequantized else []
        dense = e * len(layers) * sum(lin.numel for lin in adapted if lin.name not in skip)

    # -- adapters, gradients, optimizer ---------------------------------------------------
    sizes = [n for lin in adapted for n in fm.lora_tensor_sizes(lin, cfg.lora.rank, cfg.lora.use_dora)]
    block_sizes = sizes
    sizes = sizes * len(layers)
    lora_params = sum(sizes)
    lora_bytes = 4 * lora_params  # peft keeps adapters in fp32 (autocast_adapter_dtype=True)
    block_grads = 4 * sum(block_sizes)  # one adapted block's LoRA gradients
    opt_resident, opt_paged, opt_transient = fm.optimizer_state_bytes(sizes, cfg.optim.optimizer)
    accumulating = cfg.train.gradient_accumulation_steps > 1

    def grads_from(j: int) -> int:
        """LoRA gradients alive during block j's backward: those of the blocks from j up (the
        gradients are set to None after every optimizer step), or all of them from the second
        micro-batch of an accumulating step on."""
        return lora_bytes if accumulating or fm.FLAT_LORA else block_grads * sum(1 for i in layers if i >= j)

    # before the first backward of a step (the flat gradient buffer lives through the run)
    all_grads = lora_bytes if accumulating or fm.FLAT_LORA else 0

    # -- activations at each candidate peak ----------------------------------------------
    T = shape.tokens
    hidden = e * T * spec.hidden_size  # one hidden state (a block's input, a gradient)
    flow = fm.grad_flow(L, set(layers), shape.input_grads)
    # The blocks that take part in the backward pass, bottom up, and the ones checkpointed: all,
    # none, or (train.checkpoint_layers) the lowest few; each traced as it runs.
    taking_part = [(j, here, grad) for j, (here, grad) in enumerate(flow) if here or grad]
    n_ckpt = len(taking_part) if shape.checkpoint_layers is None else shape.checkpoint_layers
    checkpointed = {j for j, _, _ in taking_part[:n_ckpt]} if shape.checkpointing else set()
    plain = replace(shape, checkpointing=False)
    traces = {
        j: tl.block_trace(spec, shape if j in checkpointed else plain, adapted if here else [], grad)
        for j, here, grad in taking_part
    }
    shared = fm.shared_saved(spec, shape)
    final = fm.final_saved(spec, shape)
    loss_bwd, loss_fwd = fm.loss_bytes(spec, shape)
    if not kern.liger or kern.loss != "fused_linear_cross_entropy":
        loss_fwd += hidden  # the final norm's output, held by the model's forward while the loss runs
    phases: dict[str, tuple[int, int, int, int]] = {}  # activations, logits/loss, LoRA grads, optimizer
    # A checkpointed block keeps only its input through the step (in host memory when
    # offloaded); in the backward it is recomputed (from the top down, one at a time, its input
    # back on the GPU) and its input let go after its backward. A block that is not
    # checkpointed keeps what its forward saved until its backward.
    below = 0
    fwd, bwd = [], []
    for j, tr in traces.items():
        if j in checkpointed:
            bwd.append((below + hidden + shared + tr.backward_peak, 0, grads_from(j), 0))
            below += 0 if shape.offload else hidden
        else:
            embeds = hidden if j > 0 else 0  # LlamaModel.forward keeps inputs_embeds to its end
            fwd.append((below + embeds + shared + tr.forward_peak, 0, all_grads, 0))
            bwd.append((below + shared + tr.backward_peak, 0, grads_from(j), 0))
            below += tr.saved
    held = below
    if fwd:
        phases["block_forward"] = max(fwd, key=sum)
    phases["block_backward"] = max(bwd, key=sum, default=(0, 0, 0, 0))
    phases["loss_backward"] = (held + shared + final, loss_bwd, all_grads, 0)
    phases["loss_forward"] = (held + shared + final, loss_fwd, all_grads, 0)
    phases["optimizer_step"] = (shared, 0, lora_bytes, opt_transient)
    peak_phase = max(phases, key=lambda k: sum(phases[k]))
    activations, logits, grads_now, opt_extra = phases[peak_phase]
    workspace = CALIBRATION["cublas_workspace"]
    activations += workspace

    static = packed + consts + unquant + dense + lora_bytes + opt_resident
    dynamic = activations + logits + grads_now + opt_extra
    allocated = static + dynamic

    # -- what the caching allocator adds -------------------------------------------------
    mode = allocator_mode()
    loss_peak = peak_phase.startswith("loss") and kern.loss != "fused_linear_cross_entropy"
    logits_fp32 = 4 * T * spec.vocab_size
    # Every persistent tensor is rounded up to 512 bytes (a 4-bit layer has six).
    rounding = 512 * (6 * L * len(spec.block_linears) + 3 * len(sizes))
    ckpt_share = len(checkpointed) / len(traces) if traces else float(shape.checkpointing)
    host_activations = len(checkpointed) * hidden if shape.offload else 0
    if host_activations:
        notes.append(
            f"{host_activations / GiB:.1f} GiB of checkpointed activations in pinned CPU RAM (offload_activations; "
            "not yet measured on a GPU)"
        )
    if 0 < ckpt_share < 1:
        notes.append(
            f"{len(checkpointed)} of {len(traces)} layers checkpointed: the allocator's slack is interpolated "
            "between the measured all and none"
        )
    slack = allocator_slack(mode, dynamic, loss_peak, logits_fp32, ckpt_share) + rounding
    torch_reserved = allocated + slack
    context = CALIBRATION["cuda_context"] if cuda else 0
    total = torch_reserved + context + opt_paged
    calibrated = bool(CALIBRATION["allocator"][mode]["measured"])
    if not calibrated:
        notes.append(f"allocator slack with {mode.replace('_', ' ')} is not yet measured: a conservative allowance")

    components = {
        "quantized_weights": packed,
        "quant_constants": consts,
        "unquantized_weights": unquant,
        "dequantized_weights": dense,
        "lora_weights": lora_bytes,
        "lora_grads": grads_now,
        "optimizer_state": opt_resident + opt_paged + opt_extra,
        "activations": activations,
        "logits_loss": logits,
        "cuda_context": context,
        "allocator_slack": slack,
    }
    low = total - slack - int(0.03 * dynamic)
    high = total + int(0.05 * dynamic + 0.02 * static)
    if not calibrated:
        # Until this mode is measured, the range reaches up to the measured mode's slack.
        measured = allocator_slack("fixed_segments", dynamic, loss_peak, logits_fp32, ckpt_share) + rounding
        high = max(high, total - slack + measured + int(0.05 * dynamic))
    if reasons:
        low, high = min(low, int(0.8 * total)), max(high, int(1.3 * total))

    fits: bool | None = None
    spill = 0
    if gpu_bytes is not None:
        fits = total <= gpu_bytes
        if not fits and opt_paged and total - opt_paged <= gpu_bytes:
            fits = True
            spill = total - gpu_bytes
            notes.append(
                f"{spill / GiB:.2f} GiB of paged optimizer state would move to CPU RAM: it fits, with slower steps"
            )
        elif fits and high > gpu_bytes:
            notes.append("fits, but within the estimate's uncertainty of the card's size")
    if opt_paged and not spill:
        notes.append(
            f"{opt_paged / MiB:.0f} MiB of optimizer state is paged: it can move to CPU RAM if VRAM runs short"
        )
    if peak_phase.startswith("loss") and logits > activations:
        hint = (
            "; Liger's fused loss (train.kernels) avoids them"
            if spec.model_type in LIGER_MODEL_TYPES and not kern.liger
            else ""
        )
        notes.append(
            "the logits and loss over the whole vocabulary dominate the peak; a shorter sequence or smaller "
            f"micro-batch helps most{hint}"
        )

    details = {
        "model_type": spec.model_type,
        "architecture": spec.architecture,
        "peak_phase": peak_phase,
        "phases": {k: sum(v) for k, v in phases.items()},
        "micro_batch_size": shape.batch,
        "sequence_length": shape.seq,
        "tokens": T,
        "attention_mask": shape.mask,
        "gradient_checkpointing": shape.checkpointing,
        "checkpointed_layers": len(checkpointed),
        "checkpointing_auto": False,
        "host_activation_bytes": host_activations,
        "compute_bytes": e,
        "kernels": kern.kernels,
        "kernels_requested": kern.requested,
        "kernels_reason": kern.reason,
        "loss": shape.loss,
        "fast_lora": shape.fast_lora,
        "quantized_parameters": quantized_params,
        "lora_parameters": lora_params,
        "adapted_layers": len(layers),
        "adapted_modules": [lin.name for lin in adapted],
        "paged_optimizer_bytes": opt_paged,
        "checkpointing_input_grads": shape.input_grads,
        "static_bytes": static,
        "dynamic_bytes": dynamic,
        "allocator": mode,
        "allocator_calibrated": calibrated,
        "torch_allocated": allocated,
        "torch_reserved": torch_reserved,
    }
    return VramEstimate(
        components=components, total=total, low=low, high=high, gpu_bytes=gpu_bytes, gpu_name=gpu_name, fits=fits,
        spill_to_cpu_bytes=spill, approximate=bool(reasons), reasons=reasons, notes=notes, details=details,
    )  # fmt: skip


def _weight_bytes(cfg: TrainConfig, spec: ModelSpec, e: int, notes: list[str]) -> tuple[int, int, int, int]:
    """(packed 4-bit bytes, quantization-constant bytes, unquantized bytes, quantized parameters).

    Every linear layer of the decoder blocks is quantized (transformers skips only the output
    embedding, tied weights and the checkpoint's own skip list); embeddings, lm_head, norms
    and biases stay in the compute dtype. NF4 and FP4 take the same bytes.
    """
    double_quant, skip = cfg.quant.double_quant, []
    if spec.prequantized:
        double_quant, skip = spec.prequantized["double_quant"], spec.prequantized["skip_modules"]
        notes.append(f"the checkpoint is saved in 4 bit ({spec.prequantized['quant_type']}); its own settings apply")
    L = spec.num_layers
    packed = consts = quantized = 0
    unquant = spec.vocab_size * spec.hidden_size * (1 if spec.tie_word_embeddings else 2)
    unquant += (L * spec.norms_per_block + 1) * spec.hidden_size
    if spec.head_norms:
        unquant += L * 2 * spec.head_dim
    for lin in spec.block_linears:
        if lin.bias:
            unquant += L * lin.out_features
        if lin.name in skip:
            unquant += L * lin.numel
            continue
        p, c = fm.quantized_linear_bytes(lin.numel, double_quant=double_quant)
        packed, consts, quantized = packed + L * p, consts + L * c, quantized + L * lin.numel
    return packed, consts, e * unquant, quantized


def resolve_spec(cfg: TrainConfig, model_config: Any = None) -> ModelSpec:
    if model_config is not None:
        return spec_from_config(model_config)
    return spec_from_ref(cfg.model.ref, revision=cfg.model.revision, trust_remote_code=cfg.model.trust_remote_code)


def estimate(
    cfg: TrainConfig,
    model_config: Any = None,
    *,
    gpu_bytes: int | None = None,
    data_stats: dict[str, Any] | None = None,
    gpu_name: str | None = None,
) -> VramEstimate:
    """Predict a run's peak GPU memory from the config and the model's config alone.

    Args:
        cfg: the run configuration (validated again here: the GUI may have edited it).
        model_config: a transformers ``PretrainedConfig`` or the dict of ``config.json``;
            None reads it from ``cfg.model.ref`` (config files only, cached).
        gpu_bytes: the card's memory; with it, ``fits`` and ``spill_to_cpu_bytes`` are set.
        data_stats: token-length statistics of the dataset (``token_stats`` of the data
            report: ``max``/``min``/``longest_sequence``), so the estimate is sized for the
            longest micro-batch the data produces rather than ``data.max_length``.
        gpu_name: shown with the estimate.

    Raises:
        ConfigError: a config value is invalid, or the LoRA targets/layers do not exist.
        ModelError: the model reference cannot be read.
    """
    validate(cfg)
    if gpu_bytes is not None and (isinstance(gpu_bytes, bool) or not isinstance(gpu_bytes, int) or gpu_bytes <= 0):
        raise ConfigError(f"GPU size: {gpu_bytes!r} is not a positive number of bytes.")
    spec = resolve_spec(cfg, model_config)
    return estimate_from_spec(cfg, spec, gpu_bytes=gpu_bytes, gpu_name=gpu_name, data_stats=data_stats)
