"""The VRAM budget: will this run fit, and if not, what would?

From a model's ``config.json`` alone (no weights are read), the run config and optionally
the dataset's token-length statistics, :func:`estimate` breaks a QLoRA run's peak GPU memory
into components (4-bit weights and their constants, unquantized weights, LoRA weights,
gradients and optimizer state, activations, logits and loss, CUDA context, allocator slack).
:func:`fit` finds the largest micro-batch and sequence length for a card and the single
changes that make an over-budget run fit.

Modules: ``spec`` (model facts from config.json), ``formulas`` (what autograd keeps, each byte
count argued from the code of bitsandbytes, peft, transformers, torch and liger-kernel),
``timeline`` (one block replayed tensor by tensor: where the peaks are; its linear layers,
peft's LoRA forward or ``train.fast_lora``'s, in ``linears``, on ``tape``), ``kernels`` (whether
the run gets Liger Kernel's fused kernels), ``allocator`` (measured constants and the CUDA
caching allocator's slack), ``estimate`` (the breakdown), ``fit`` (search and
suggestions), ``units`` (GPU sizes), ``cli`` (``qlora-engine estimate``; it plans through ``qlora_engine.plan``, so the package does
not import it).
"""

from qlora_engine.budget.allocator import CALIBRATION, ENGINE_ALLOC_CONF, allocator_mode
from qlora_engine.budget.estimate import COMPONENTS, VramEstimate, estimate, estimate_from_spec
from qlora_engine.budget.fit import FitAdvice, Suggestion, fit
from qlora_engine.budget.spec import LinearShape, ModelSpec, model_spec
from qlora_engine.budget.units import KNOWN_GPUS, format_bytes, parse_gpu_size

__all__ = [
    "CALIBRATION",
    "COMPONENTS",
    "ENGINE_ALLOC_CONF",
    "KNOWN_GPUS",
    "FitAdvice",
    "LinearShape",
    "ModelSpec",
    "Suggestion",
    "VramEstimate",
    "allocator_mode",
    "estimate",
    "estimate_from_spec",
    "fit",
    "format_bytes",
    "model_spec",
    "parse_gpu_size",
]
