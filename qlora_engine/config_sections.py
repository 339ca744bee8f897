"""The sections of a run configuration: one dataclass each, every field with help and a default.

Each section validates itself when built (``__post_init__``, as peft's configs do; the rules
are in its ``_check``, run by :class:`~qlora_engine.config_checks.Section`).
:class:`~qlora_engine.config.TrainConfig` holds one of each.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

from qlora_engine.config_checks import Checks, Section, parse_layers
from qlora_engine.errors import ConfigError


def _f(default: Any, help: str, **kw: Any) -> Any:
    """A dataclass field with help text; list/dict defaults are copied per instance."""
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata={"help": help, **kw})
    return field(default=default, metadata={"help": help, **kw})


LORA_PRESETS = ("attention", "mlp", "all-linear")
DATA_FIELDS: dict[str, tuple[str, ...]] = {
    "text": ("text",),
    "alpaca": ("instruction", "input", "output", "system"),
    "chat": ("messages",),
    "sharegpt": ("conversations", "system"),
    "prompt_completion": ("prompt", "completion"),
}
"""The fields each ``data.format`` reads from a row: what ``data.columns`` maps to the data's own names."""


@dataclass
class ModelConfig(Section):
    SECTION: ClassVar[str] = "model"

    ref: str = _f(
        "",
        "The base model: a local Hugging Face folder, a hub id (e.g. 'HuggingFaceTB/SmolLM2-135M-Instruct'), "
        "or a local .gguf file (dequantized once and cached, then quantized to 4 bit).",
    )
    revision: str | None = _f(None, "Hub revision (branch, tag or commit) to use; None takes the default branch.")
    token: str | None = _f(
        None,
        "Hugging Face access token for a gated or private hub model; None uses the HF_TOKEN environment variable "
        "or `hf auth login`. Never written to any file the engine writes: saved configs, logs and events show hf_***.",
    )
    trust_remote_code: bool = _f(
        False,
        "Run Python code shipped with the model. Off because that code runs with your user's rights; "
        "turn it on only for a model whose source you trust.",
    )
    attn_implementation: Literal["sdpa", "eager"] = _f(
        "sdpa", "Attention kernel. 'sdpa' is PyTorch's fused attention and is faster and leaner than 'eager'."
    )


@dataclass
class QuantConfig(Section):
    SECTION: ClassVar[str] = "quant"

    quant_type: Literal["nf4", "fp4"] = _f(
        "nf4", "4-bit data type for the frozen base weights. NF4 matches normally distributed weights better than FP4."
    )
    double_quant: bool = _f(
        True, "Quantize the quantization constants too: saves about 0.37 bits per parameter at no measurable cost."
    )
    compute_dtype: Literal["auto", "bfloat16", "float16", "float32"] = _f(
        "auto",
        "dtype of the matmuls and of the weights that stay unquantized. 'auto' takes bfloat16 on GPUs that "
        "support it, float16 on older GPUs, float32 on the CPU.",
    )


@dataclass
class LoraSettings(Section):
    SECTION: ClassVar[str] = "lora"

    rank: int = _f(16, "LoRA rank r. 8-64 covers most fine-tunes; higher ranks learn more and cost more memory.")
    alpha: float = _f(
        16.0, "LoRA scaling numerator; the update is scaled by alpha/rank (alpha/sqrt(rank) with rsLoRA)."
    )
    dropout: float = _f(0.0, "Dropout on the LoRA input. 0 is fastest and usually fine for short fine-tunes.")
    target_modules: list[str] = _f(
        ["all-linear"],
        "Which linear layers get adapters: module names (e.g. q_proj, v_proj) or one preset: "
        "'attention', 'mlp', 'all-linear'. All linear layers give the best quality per parameter.",
    )
    layers: str | None = _f(
        None, "Which transformer blocks to adapt, as a range like '0-11' or a list like '0,2,4'; None adapts all."
    )
    use_dora: bool = _f(False, "Weight-decomposed LoRA (DoRA): sometimes better quality, noticeably slower.")
    use_rslora: bool = _f(False, "Rank-stabilized LoRA: scale by alpha/sqrt(rank), which keeps high ranks stable.")

    def _check(self, c: Checks) -> None:
        c.number("rank", 1, 4096, typical="8-64 is typical")
        c.number("alpha", 0, 100_000, above=True, typical="often equal to or twice the rank")
        c.number("dropout", 0, 1, below=True)
        if "target_modules" not in c.bad:
            mods = self.target_modules
            c.need("target_modules", 0 < len(mods) <= 256, "name at least one module (at most 256) or a preset")
            c.need("target_modules", all(m.strip() for m in mods), "a module name cannot be empty")
            presets = [m for m in mods if m in LORA_PRESETS]
            c.need(
                "target_modules",
                not presets or len(mods) == 1,
                f"a preset ({', '.join(LORA_PRESETS)}) must stand alone",
            )
        if "layers" not in c.bad:
            try:
                parse_layers(self.layers)
            except ConfigError as e:
                c.add("layers", e.what)


@dataclass
class DataConfig(Section):
    SECTION: ClassVar[str] = "data"
    TEXT_LIMITS: ClassVar[dict[str, int]] = {"chat_template": 1 << 20}  # real templates run to ~10k characters

    path: str = _f(
        "", "Training data: a JSONL/JSON/CSV/Parquet/text file, a saved datasets folder, or a hub dataset id."
    )
    format: Literal["auto", "text", "alpaca", "chat", "sharegpt", "prompt_completion"] = _f(
        "auto", "Row format. 'auto' detects it from the keys of the rows and reports the evidence."
    )
    columns: dict[str, str] = _f(
        {}, "Map our field names to yours, e.g. {text: body} or {instruction: question, output: answer}."
    )
    subset: str | None = _f(None, "Hub datasets only: the configuration (subset) name.")
    split: str = _f("train", "Hub datasets and saved folders: which split to train on.")
    max_length: int = _f(1024, "Longest sequence in tokens. Longer samples are truncated or dropped (see 'overlong').")
    overlong: Literal["truncate", "drop"] = _f(
        "truncate", "What to do with samples longer than max_length: cut them, or leave them out. Both are counted."
    )
    train_on_prompt: bool = _f(
        False, "Also compute the loss on prompt/system tokens. Off: the model learns only to answer."
    )
    packing: bool = _f(
        False, "Pack several samples into one sequence (attention stays inside each sample). Faster on short samples."
    )
    validation_split: float = _f(0.0, "Fraction of rows held out for evaluation (0 for none).")
    validation_path: str | None = _f(None, "A separate validation file; overrides validation_split.")
    chat_template: str | None = _f(
        None,
        "Jinja chat template to use instead of the tokenizer's own; None uses the tokenizer's (ChatML if it has none).",
    )
    max_bad_fraction: float = _f(
        0.1,
        "Largest fraction of unusable rows (missing fields, unknown roles, broken text) that are skipped with a "
        "warning; above it the run stops. A few broken rows are common in collected data; more than one in ten "
        "usually means a wrong format or column mapping.",
    )
    cache: bool = _f(
        True,
        "Keep the tokenized data in the user cache folder, keyed by file content, tokenizer, template and these "
        "settings, so the next run on the same data starts at once.",
    )

    def _check(self, c: Checks) -> None:
        c.number("max_length", 8, 1 << 20, typical="512-4096 is typical")
        c.number("validation_split", 0, 1, below=True)
        c.number("max_bad_fraction", 0, 1)
        if self.chat_template is not None and "chat_template" not in c.bad:
            problem = _template_problem(self.chat_template)
            if problem:
                c.add("chat_template", problem, fix="Fix the template, or set it to null to use the tokenizer's own.")
        if "columns" not in c.bad:
            for ours, theirs in self.columns.items():
                c.text("columns", ours, 256)
                c.text("columns", theirs, 256)


def _template_problem(template: str) -> str | None:
    """Why a Jinja chat template does not parse (None: it does). Parsing runs no template code."""
    import jinja2  # lazy: only a configured chat template needs jinja2

    try:  # the extensions transformers' chat templates may use
        jinja2.Environment(extensions=["jinja2.ext.loopcontrols", "jinja2.ext.do"]).parse(template)
    except jinja2.TemplateSyntaxError as e:
        if "unknown tag" in (e.message or ""):  # e.g. transformers' own {% generation %} block
            return None
        return f"the template is not valid Jinja: {e.message} (template line {e.lineno})"
    return None


@dataclass
class OptimConfig(Section):
    SECTION: ClassVar[str] = "optim"

    optimizer: Literal["paged_adamw_8bit", "paged_adamw_32bit", "adamw_8bit", "adamw"] = _f(
        "paged_adamw_8bit",
        "Optimizer. Paged optimizers move their state to CPU RAM when VRAM runs short instead of crashing; "
        "8-bit state uses a quarter of the memory of 32-bit.",
    )
    learning_rate: float = _f(2e-4, "Peak learning rate. 1e-4 to 3e-4 is the usual range for LoRA.")
    weight_decay: float = _f(0.0, "Decoupled weight decay on the LoRA weights.")
    adam_beta1: float = _f(0.9, "Adam beta1.")
    adam_beta2: float = _f(0.999, "Adam beta2.")
    adam_epsilon: float = _f(1e-8, "Adam epsilon.")
    max_grad_norm: float = _f(1.0, "Clip the gradient norm to this value; 0 turns clipping off.")
    scheduler: Literal["cosine", "linear", "constant"] = _f(
        "cosine", "Learning-rate schedule after warmup: cosine decay, linear decay, or constant."
    )
    warmup_steps: int = _f(10, "Optimizer steps of linear warmup from 0 to the peak learning rate.")

    def _check(self, c: Checks) -> None:
        c.number("learning_rate", 0, 1, above=True, typical="1e-4 to 3e-4 is usual for LoRA")
        c.number("weight_decay", 0, 10)
        c.number("adam_beta1", 0, 1, below=True)
        c.number("adam_beta2", 0, 1, below=True)
        c.number("adam_epsilon", 0, 1, above=True, below=True, typical="1e-8 is usual")
        c.number("max_grad_norm", 0, 1e6, typical="0 turns clipping off; 1 is usual")
        c.number("warmup_steps", 0, 10_000_000)


@dataclass
class TrainSettings(Section):
    SECTION: ClassVar[str] = "train"

    micro_batch_size: int = _f(1, "Sequences per forward pass. Raise it while memory allows.")
    gradient_accumulation_steps: int = _f(
        4, "Micro-batches per optimizer step; the effective batch is micro_batch_size x this."
    )
    epochs: float = _f(1.0, "Passes over the training data (ignored when max_steps is set).")
    max_steps: int | None = _f(None, "Stop after this many optimizer steps; None trains for 'epochs'.")
    gradient_checkpointing: bool | Literal["auto"] = _f(
        "auto",
        "Recompute activations in the backward pass instead of keeping them: far less memory, a slower step "
        "(every layer checkpointed: about a third slower). auto: on a GPU, checkpoint only as many layers as the "
        "card's free memory needs, by the VRAM budget (none when the whole run fits), and every layer if a step "
        "still runs out of memory; true: every layer (or train.checkpoint_layers); false: none.",
    )
    checkpoint_layers: int | None = _f(
        None,
        "With gradient_checkpointing true: how many decoder layers to checkpoint, counted from the lowest one "
        "the backward pass reaches; null checkpoints all. Each layer left out is not recomputed (faster) but "
        "keeps its activations (more memory); gradient_checkpointing auto chooses this for your GPU.",
    )
    offload_activations: bool = _f(
        False,
        "With gradient checkpointing on a GPU: keep each checkpointed layer's input in pinned CPU RAM instead of "
        "VRAM, copied back for the backward pass. Frees layers x tokens x hidden size x 2 bytes of VRAM (what "
        "limits very long contexts) for a slower step and that much host RAM; a run that would pin more than 80% "
        "of the RAM available is refused before the model loads.",
    )
    mlp_chunk_tokens: int | None = _f(
        None,
        "Run each decoder layer's MLP over the sequence in chunks of this many tokens, each chunk recomputed in "
        "the backward pass: its wide intermediates (tokens x intermediate size) exist for one chunk at a time. "
        "For very long contexts (100k+ tokens); costs one more MLP forward per step. null: off.",
    )
    seed: int = _f(42, "Seed for initialisation, data order and dropout; the same seed gives the same run.")
    logging_steps: int = _f(1, "Report step metrics every N optimizer steps.")
    eval_steps: int | None = _f(
        None, "Evaluate on the validation set every N steps (and at the end); None: only at the end."
    )
    save_steps: int | None = _f(100, "Write a resumable checkpoint every N optimizer steps; None: only at the end.")
    save_total_limit: int | None = _f(3, "Keep only the newest N checkpoints; None keeps all.")
    kernels: Literal["auto", "liger", "none"] = _f(
        "auto",
        "Fused GPU kernels (Liger Kernel: a fused linear + cross-entropy that never materializes the logits, "
        "fused RMSNorm, RoPE and SwiGLU) for supported architectures. 'auto' uses them on CUDA when "
        "liger-kernel is installed (pip install 'qlora-studio[gpu]'); 'none' runs the plain transformers code.",
    )
    fast_lora: bool = _f(
        True,
        "Run the LoRA matmuls in the compute dtype beside the 4-bit matmul (the fp32 adapter weights split into "
        "two bf16 halves, so the gradients stay about as near fp32 as peft's) instead of peft's fp32 copies of "
        "every layer input: about 1.5x faster and lighter. Off: peft's own path. Layers it does not cover (LoRA "
        "dropout, DoRA, float16) keep peft's path, and the run log says so.",
    )
    keep_dequantized: bool | Literal["auto"] = _f(
        "auto",
        "Dequantize the 4-bit weights once and keep them beside the packed ones in the compute dtype (the same "
        "values), so no step dequantizes: a few percent faster for about four times the 4-bit weights' memory. "
        "auto: on a GPU when the run needs no gradient checkpointing and still fits the card with them, by the "
        "VRAM budget; true/false: always/never. On train.fast_lora's path, one process or DDP.",
    )
    compile: Literal["off", "blocks", "graphs"] = _f(
        "off",
        "Compile each decoder layer with torch.compile. blocks: the compiler fuses each layer's small operations "
        "(norms, RoPE, SwiGLU, the LoRA products) into fewer kernels; graphs: also replays each layer's kernel "
        "launches as one CUDA graph, which takes most of the Python overhead out of small micro-batches (on a CPU, "
        "the same as blocks). The first step compiles (about 15-20 s at 8B on an H100); rows are padded to a multiple "
        "of 256 tokens so few shapes compile, which suits packed or fixed-length rows best. With Liger kernels only "
        "its fused loss is kept (the compiler fuses the rest). Not with offload_activations or mlp_chunk_tokens, nor "
        "with several GPUs yet. off: eager PyTorch.",
    )
    device: Literal["auto", "cuda", "cpu"] = _f(
        "auto", "Where to train. 'auto' takes the first CUDA GPU and falls back to the CPU (slow, for tests and demos)."
    )
    strategy: Literal["auto", "single", "ddp", "fsdp"] = _f(
        "auto",
        "How several GPUs share the run (start them with --gpus N or torchrun). ddp: every GPU holds the whole "
        "4-bit model and trains on its share of each step's batch (fastest; each card needs the one-GPU budget). "
        "fsdp: the 4-bit weights, LoRA weights and optimizer state are sharded over the GPUs (for models that do "
        "not fit one card). single: one process. auto: single for one process, else ddp when the model fits each "
        "card and fsdp when it does not. The same run either way: the batch of a step is micro_batch_size x "
        "gradient_accumulation_steps whatever the number of GPUs.",
    )

    def _check(self, c: Checks) -> None:
        c.number("micro_batch_size", 1, 65_536)
        c.number("gradient_accumulation_steps", 1, 4096, typical="1-64 is typical")
        c.number("epochs", 0, 1000, above=True)
        c.number("max_steps", 1, 100_000_000, null="train for 'epochs'")
        c.number("checkpoint_layers", 1, 100_000, null="all layers", typical="turn train.gradient_checkpointing off for none")
        c.number("mlp_chunk_tokens", 64, 1 << 24, null="off", typical="4096 is a good start")
        c.number("seed", 0, 2**32 - 1)
        c.number("logging_steps", 1, 100_000_000)
        c.number("eval_steps", 1, 100_000_000, null="only at the end")
        c.number("save_steps", 1, 100_000_000, null="only at the end")
        c.number("save_total_limit", 1, 1_000_000, null="keep all")
        c.need(
            "checkpoint_layers",
            self.checkpoint_layers is None or self.gradient_checkpointing != "auto",
            "train.gradient_checkpointing auto chooses the layers itself; set this to null, or set "
            "train.gradient_checkpointing to true to choose them yourself",
        )
        c.need(
            "keep_dequantized",
            self.keep_dequantized is not True or (self.fast_lora and self.strategy != "fsdp"),
            "the weights are kept dequantized on train.fast_lora's path, without FSDP",
            "set train.keep_dequantized to auto or false, or turn train.fast_lora on (and train.strategy off fsdp)",
        )
        for other, on in (("offload_activations", self.offload_activations), ("mlp_chunk_tokens", self.mlp_chunk_tokens)):
            c.need(
                "compile",
                self.compile == "off" or not on,
                f"a compiled layer cannot yet run with train.{other}; set train.compile to off, or turn "
                f"train.{other} off",
            )


@dataclass
class OutputConfig(Section):
    SECTION: ClassVar[str] = "output"

    dir: str = _f(
        "runs/my-run",
        "Run folder: config.yaml, events.jsonl, checkpoints/ and adapter/ go here. Relative paths are taken "
        "from the directory of the config file.",
    )
    report_to: list[Literal["tensorboard", "wandb", "mlflow"]] = _f(
        [],
        "Experiment trackers that also receive the run's metrics: tensorboard (event files in <run>/tensorboard, "
        "needs the tensorboard package), wandb or mlflow (when installed; they read their own settings and login "
        "from the environment). Empty: events.jsonl only.",
    )

    def _check(self, c: Checks) -> None:
        c.need("dir", bool(self.dir.strip()), "name a folder for the run's files")
