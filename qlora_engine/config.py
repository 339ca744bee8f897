"""The run configuration: one typed dataclass tree, validated before anything heavy starts.

Every field carries help text (shown as the GUI tooltip and as a comment in the YAML that
``qlora-engine init`` writes) and a default chosen for a first QLoRA run on one GPU.
Choices are ``Literal`` types; :func:`validate` checks every field against its annotation
and raises :class:`ConfigError` (a ``ValueError``) naming the field, the value and what
is allowed.
"""

from __future__ import annotations

import dataclasses
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from qlora_engine.errors import ConfigError

SCHEMA_VERSION = 1


__all__ = ["ConfigError", "TrainConfig", "apply_overrides", "check_ready", "field_help", "parse_layers", "validate"]


def _f(default: Any, help: str, **kw: Any) -> Any:
    """A dataclass field with help text; list/dict defaults are copied per instance."""
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata={"help": help, **kw})
    return field(default=default, metadata={"help": help, **kw})


LORA_PRESETS = ("attention", "mlp", "all-linear")


@dataclass
class ModelConfig:
    ref: str = _f(
        "",
        "The base model: a local Hugging Face folder, a hub id (e.g. 'HuggingFaceTB/SmolLM2-135M-Instruct'), "
        "or a local .gguf file (dequantized once and cached, then quantized to 4 bit).",
    )
    revision: str | None = _f(None, "Hub revision (branch, tag or commit) to use; None takes the default branch.")
    trust_remote_code: bool = _f(
        False,
        "Run Python code shipped with the model. Off because that code runs with your user's rights; "
        "turn it on only for a model whose source you trust.",
    )
    attn_implementation: Literal["sdpa", "eager"] = _f(
        "sdpa", "Attention kernel. 'sdpa' is PyTorch's fused attention and is faster and leaner than 'eager'."
    )


@dataclass
class QuantConfig:
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
class LoraSettings:
    rank: int = _f(16, "LoRA rank r. 8-64 covers most fine-tunes; higher ranks learn more and cost more memory.")
    alpha: float = _f(16.0, "LoRA scaling numerator; the update is scaled by alpha/rank (alpha/sqrt(rank) with rsLoRA).")
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


@dataclass
class DataConfig:
    path: str = _f("", "Training data: a JSONL/JSON/CSV/Parquet/text file, a saved datasets folder, or a hub dataset id.")
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
        None, "Jinja chat template to use instead of the tokenizer's own; None uses the tokenizer's (ChatML if it has none)."
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


@dataclass
class OptimConfig:
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


@dataclass
class TrainSettings:
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
        "limits very long contexts) for a slower step and that much host RAM.",
    )
    mlp_chunk_tokens: int | None = _f(
        None,
        "Run each decoder layer's MLP over the sequence in chunks of this many tokens, each chunk recomputed in "
        "the backward pass: its wide intermediates (tokens x intermediate size) exist for one chunk at a time. "
        "For very long contexts (100k+ tokens); costs one more MLP forward per step. null: off.",
    )
    seed: int = _f(42, "Seed for initialisation, data order and dropout; the same seed gives the same run.")
    logging_steps: int = _f(1, "Report step metrics every N optimizer steps.")
    eval_steps: int | None = _f(None, "Evaluate on the validation set every N steps (and at the end); None: only at the end.")
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
    device: Literal["auto", "cuda", "cpu"] = _f(
        "auto", "Where to train. 'auto' takes the first CUDA GPU and falls back to the CPU (slow, for tests and demos)."
    )


@dataclass
class OutputConfig:
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


@dataclass
class TrainConfig:
    model: ModelConfig = field(default_factory=ModelConfig, metadata={"help": "The base model to fine-tune."})
    quant: QuantConfig = field(default_factory=QuantConfig, metadata={"help": "How the frozen base is quantized."})
    lora: LoraSettings = field(default_factory=LoraSettings, metadata={"help": "The LoRA adapters that are trained."})
    data: DataConfig = field(default_factory=DataConfig, metadata={"help": "The training data."})
    optim: OptimConfig = field(default_factory=OptimConfig, metadata={"help": "Optimizer and schedule."})
    train: TrainSettings = field(default_factory=TrainSettings, metadata={"help": "The training loop."})
    output: OutputConfig = field(default_factory=OutputConfig, metadata={"help": "Where the run's files go."})
    schema_version: int = field(default=SCHEMA_VERSION, metadata={"help": "Version of this file's layout."})

    def __post_init__(self) -> None:
        validate(self)

    # -- conversions -------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d.pop("base_dir", None)
        return {"schema_version": d.pop("schema_version"), **d}

    @classmethod
    def from_dict(cls, data: dict[str, Any], *, source: str = "config") -> TrainConfig:
        try:
            return cls._from_dict(data, source)
        except ConfigError as e:
            if not source or str(e).startswith(source):
                raise
            raise ConfigError(f"{source}: {e}", hint=e.hint) from None

    @classmethod
    def _from_dict(cls, data: dict[str, Any], source: str) -> TrainConfig:
        if not isinstance(data, dict):
            raise ConfigError(f"{source}: expected a mapping of sections, got {type(data).__name__}.")
        data = dict(data)
        version = data.pop("schema_version", SCHEMA_VERSION)
        if version != SCHEMA_VERSION:
            raise ConfigError(
                f"{source}: schema_version {version!r} is not supported (this version reads {SCHEMA_VERSION})."
            )
        sections = {f.name: f for f in dataclasses.fields(cls) if f.name != "schema_version"}
        unknown = sorted(set(data) - set(sections))
        if unknown:
            raise ConfigError(f"{source}: unknown section(s) {unknown}; known sections: {sorted(sections)}.")
        kwargs = {}
        hints = typing.get_type_hints(cls)
        for name, value in data.items():
            sub_cls = hints[name]
            if value is None:
                value = {}
            if not isinstance(value, dict):
                raise ConfigError(f"{name}: expected a mapping of fields, got {value!r}.")
            known = {f.name for f in dataclasses.fields(sub_cls)}
            bad = sorted(set(value) - known)
            if bad:
                raise ConfigError(f"{name}.{bad[0]}: unknown field; fields of '{name}': {sorted(known)}.")
            kwargs[name] = _construct(sub_cls, value)
        return cls(**kwargs)

    def to_yaml(self, *, comments: bool = True) -> str:
        return dump_yaml(self, comments=comments)

    @classmethod
    def from_yaml(cls, text: str, *, source: str = "config") -> TrainConfig:
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as e:
            raise ConfigError(f"{source}: not valid YAML ({e}). Python object tags are never loaded.") from e
        return cls.from_dict(data or {}, source=source)

    @classmethod
    def load(cls, path: str | Path, overrides: list[str] | None = None) -> TrainConfig:
        """Read a YAML file, apply ``section.field=value`` overrides, validate."""
        p = Path(path)
        try:
            text = p.read_text(encoding="utf-8-sig")
        except FileNotFoundError:
            raise ConfigError(f"{p}: config file not found.") from None
        cfg = cls.from_yaml(text, source=str(p))
        if overrides:
            cfg = apply_overrides(cfg, overrides)
        cfg.base_dir = p.resolve().parent
        return cfg

    def save(self, path: str | Path) -> None:
        p = Path(path)
        p.parent.mkdir(parents=True, exist_ok=True)
        tmp = p.with_name(p.name + ".tmp")
        tmp.write_text(self.to_yaml(), encoding="utf-8")
        tmp.replace(p)

    # -- paths -------------------------------------------------------------------------
    base_dir: Path | None = field(default=None, repr=False, compare=False, metadata={"internal": True})

    def resolve(self, path: str) -> Path:
        """A path from the config, relative to the config file's folder (or the working directory)."""
        p = Path(path).expanduser()
        if not p.is_absolute() and self.base_dir is not None:
            p = self.base_dir / p
        return p

    @property
    def output_dir(self) -> Path:
        return self.resolve(self.output.dir)


# -- validation ------------------------------------------------------------------------------


def _type_ok(value: Any, tp: Any) -> bool:
    origin = typing.get_origin(tp)
    if tp is Any:
        return True
    if origin is Literal:
        return value in typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        return any(_type_ok(value, a) for a in typing.get_args(tp))
    if tp is type(None):
        return value is None
    if tp is bool:
        return isinstance(value, bool)
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if tp is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if origin is list:
        (item,) = typing.get_args(tp)
        return isinstance(value, list) and all(_type_ok(v, item) for v in value)
    if origin is dict:
        k, v = typing.get_args(tp)
        return isinstance(value, dict) and all(_type_ok(a, k) and _type_ok(b, v) for a, b in value.items())
    if isinstance(tp, type):
        return isinstance(value, tp)
    return True


def _describe(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_describe(a) for a in typing.get_args(tp))
    if tp is type(None):
        return "null"
    if origin is list:
        return f"a list of {_describe(typing.get_args(tp)[0])}"
    if origin is dict:
        return "a mapping"
    return getattr(tp, "__name__", str(tp))


def _construct(cls: type, values: dict[str, Any]) -> Any:
    hints = typing.get_type_hints(cls)
    fixed = {}
    for k, v in values.items():
        tp = hints[k]
        # YAML reads 1e-4 as a string in YAML 1.1; accept numeric strings for float fields.
        if isinstance(v, str) and _type_ok(1.0, tp) and not _type_ok(v, tp):
            try:
                v = float(v)
            except ValueError:
                pass
        if isinstance(v, int) and not isinstance(v, bool) and tp is float:
            v = float(v)
        # YAML reads `layers: 3` or `revision: 1234` as numbers; take them as the text they are.
        if isinstance(v, (int, float)) and not isinstance(v, bool) and _type_ok("x", tp) and not _type_ok(v, tp):
            v = str(v)
        fixed[k] = v
    return cls(**fixed)


_RANGE_RE = re.compile(r"^\s*\d+\s*(-\s*\d+\s*)?(,\s*\d+\s*(-\s*\d+\s*)?)*$")


def parse_layers(spec: str | None) -> list[int] | None:
    """'0-3,6' -> [0, 1, 2, 3, 6]; None -> None (all layers)."""
    if spec is None:
        return None
    spec = str(spec)
    if not _RANGE_RE.match(spec):
        raise ConfigError(f"lora.layers: {spec!r} is not a layer range; write e.g. '0-11' or '0,2,4-7'.")
    out: list[int] = []
    for part in spec.split(","):
        a, _, b = part.partition("-")
        lo, hi = int(a), int(b or a)
        if hi < lo:
            raise ConfigError(f"lora.layers: range {part.strip()!r} runs backwards; write the lower number first.")
        out.extend(range(lo, hi + 1))
    return sorted(set(out))


def validate(cfg: TrainConfig) -> None:
    """Check every field's type and range; raise ConfigError naming the first bad one."""
    for section in dataclasses.fields(cfg):
        if section.metadata.get("internal") or section.name == "schema_version":
            continue
        obj = getattr(cfg, section.name)
        hints = typing.get_type_hints(type(obj))
        for f in dataclasses.fields(obj):
            value = getattr(obj, f.name)
            if not _type_ok(value, hints[f.name]):
                raise ConfigError(
                    f"{section.name}.{f.name}: {value!r} is not allowed; expected {_describe(hints[f.name])}."
                )

    def need(cond: bool, name: str, value: Any, allowed: str) -> None:
        if not cond:
            raise ConfigError(f"{name}: {value!r} is not allowed; {allowed}.")

    lo, op, tr, da = cfg.lora, cfg.optim, cfg.train, cfg.data
    need(lo.rank >= 1, "lora.rank", lo.rank, "use a whole number of at least 1 (8-64 is typical)")
    need(lo.alpha > 0, "lora.alpha", lo.alpha, "use a positive number (often equal to or twice the rank)")
    need(0 <= lo.dropout < 1, "lora.dropout", lo.dropout, "use a value in [0, 1)")
    need(len(lo.target_modules) > 0, "lora.target_modules", lo.target_modules, "name at least one module or a preset")
    presets = [m for m in lo.target_modules if m in LORA_PRESETS]
    need(
        not presets or len(lo.target_modules) == 1,
        "lora.target_modules",
        lo.target_modules,
        f"a preset ({', '.join(LORA_PRESETS)}) must stand alone",
    )
    parse_layers(lo.layers)
    need(op.learning_rate > 0, "optim.learning_rate", op.learning_rate, "use a positive number such as 2e-4")
    need(op.weight_decay >= 0, "optim.weight_decay", op.weight_decay, "use 0 or a positive number")
    need(0 <= op.adam_beta1 < 1, "optim.adam_beta1", op.adam_beta1, "use a value in [0, 1)")
    need(0 <= op.adam_beta2 < 1, "optim.adam_beta2", op.adam_beta2, "use a value in [0, 1)")
    need(op.adam_epsilon > 0, "optim.adam_epsilon", op.adam_epsilon, "use a small positive number such as 1e-8")
    need(op.max_grad_norm >= 0, "optim.max_grad_norm", op.max_grad_norm, "use 0 (off) or a positive number")
    need(op.warmup_steps >= 0, "optim.warmup_steps", op.warmup_steps, "use 0 or a positive whole number")
    need(tr.micro_batch_size >= 1, "train.micro_batch_size", tr.micro_batch_size, "use a whole number of at least 1")
    need(
        tr.gradient_accumulation_steps >= 1,
        "train.gradient_accumulation_steps",
        tr.gradient_accumulation_steps,
        "use a whole number of at least 1",
    )
    need(tr.epochs > 0, "train.epochs", tr.epochs, "use a positive number")
    need(tr.max_steps is None or tr.max_steps >= 1, "train.max_steps", tr.max_steps, "use null or at least 1")
    need(
        tr.mlp_chunk_tokens is None or tr.mlp_chunk_tokens >= 64,
        "train.mlp_chunk_tokens",
        tr.mlp_chunk_tokens,
        "use null (off) or at least 64 tokens (4096 is a good start)",
    )
    need(
        tr.checkpoint_layers is None or tr.checkpoint_layers >= 1,
        "train.checkpoint_layers",
        tr.checkpoint_layers,
        "use null (all layers) or at least 1; turn train.gradient_checkpointing off for none",
    )
    need(
        tr.checkpoint_layers is None or tr.gradient_checkpointing != "auto",
        "train.checkpoint_layers",
        tr.checkpoint_layers,
        "train.gradient_checkpointing auto chooses the layers itself; set this to null, or set "
        "train.gradient_checkpointing to true to choose them yourself",
    )
    need(tr.logging_steps >= 1, "train.logging_steps", tr.logging_steps, "use a whole number of at least 1")
    need(tr.eval_steps is None or tr.eval_steps >= 1, "train.eval_steps", tr.eval_steps, "use null or at least 1")
    need(tr.save_steps is None or tr.save_steps >= 1, "train.save_steps", tr.save_steps, "use null or at least 1")
    need(
        tr.save_total_limit is None or tr.save_total_limit >= 1,
        "train.save_total_limit",
        tr.save_total_limit,
        "use null (keep all) or at least 1",
    )
    need(da.max_length >= 8, "data.max_length", da.max_length, "use at least 8 tokens (512-4096 is typical)")
    need(0 <= da.validation_split < 1, "data.validation_split", da.validation_split, "use a fraction in [0, 1)")
    need(0 <= da.max_bad_fraction <= 1, "data.max_bad_fraction", da.max_bad_fraction, "use a fraction in [0, 1]")
    need(bool(cfg.output.dir.strip()), "output.dir", cfg.output.dir, "name a folder for the run's files")


def check_ready(cfg: TrainConfig) -> None:
    """Checks that only a config about to train must pass (a draft in the GUI may leave them empty)."""
    if not cfg.model.ref.strip():
        raise ConfigError("model.ref: no model chosen; set a local folder, a .gguf file or a hub id.")
    if not cfg.data.path.strip():
        raise ConfigError("data.path: no training data chosen; set a file, a folder or a hub dataset id.")


# -- overrides -------------------------------------------------------------------------------


def apply_overrides(cfg: TrainConfig, overrides: list[str]) -> TrainConfig:
    """Apply ``section.field=value`` strings (values parsed as YAML) and validate the result."""
    data = cfg.to_dict()
    for item in overrides:
        key, sep, raw = item.partition("=")
        parts = key.strip().split(".")
        if not sep or len(parts) != 2 or not all(parts):
            raise ConfigError(f"override {item!r}: write section.field=value, e.g. lora.rank=32.")
        section, name = parts
        if section not in data or not isinstance(data[section], dict):
            raise ConfigError(f"override {item!r}: unknown section {section!r}; known: {sorted(k for k in data if k != 'schema_version')}.")
        if name not in data[section]:
            raise ConfigError(f"override {item!r}: {section} has no field {name!r}; fields: {sorted(data[section])}.")
        try:
            value = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError:
            value = raw
        data[section][name] = value
    new = TrainConfig.from_dict(data, source="")
    new.base_dir = cfg.base_dir
    return new


# -- YAML with comments ----------------------------------------------------------------------


def _yaml_value(value: Any) -> str:
    text = yaml.safe_dump(value, default_flow_style=True, sort_keys=False, width=10_000).strip()
    if text.endswith("\n..."):
        text = text[: -len("\n...")]
    return text.removesuffix("...").strip()


def dump_yaml(cfg: TrainConfig, *, comments: bool = True) -> str:
    lines = [f"schema_version: {SCHEMA_VERSION}"]
    if comments:
        lines.insert(0, "# QLoRA Studio run configuration. Every field is listed with its default; edit freely.")
    for section in dataclasses.fields(cfg):
        if section.metadata.get("internal") or section.name == "schema_version":
            continue
        lines.append("")
        if comments:
            lines.append(f"# {section.metadata['help']}")
        lines.append(f"{section.name}:")
        obj = getattr(cfg, section.name)
        hints = typing.get_type_hints(type(obj))
        for f in dataclasses.fields(obj):
            if comments:
                help_text = f.metadata["help"]
                if typing.get_origin(hints[f.name]) is Literal:
                    help_text += f" Choices: {', '.join(map(str, typing.get_args(hints[f.name])))}."
                for chunk in _wrap(help_text, 92):
                    lines.append(f"  # {chunk}")
            lines.append(f"  {f.name}: {_yaml_value(getattr(obj, f.name))}")
    return "\n".join(lines) + "\n"


def _wrap(text: str, width: int) -> list[str]:
    import textwrap

    return textwrap.wrap(text, width) or [""]


def field_help(section: str, name: str) -> str:
    """Help text of ``section.name`` (the GUI's tooltips)."""
    sec_cls = typing.get_type_hints(TrainConfig)[section]
    for f in dataclasses.fields(sec_cls):
        if f.name == name:
            return f.metadata["help"]
    raise KeyError(f"{section}.{name}")
