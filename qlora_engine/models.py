"""Models: read a model's facts without weights, load it in 4 bit, wrap it with LoRA.

A model reference (a local Hugging Face folder, a hub id, or a local ``.gguf`` file) is made
into a local folder by :mod:`qlora_engine.model_ref`.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch.utils.checkpoint import checkpoint
from transformers import AutoConfig

from qlora_engine.config import TrainConfig, parse_layers
from qlora_engine.config_sections import LORA_PRESETS, LoraSettings
from qlora_engine.errors import ConfigError, ModelError, QLoRAError
from qlora_engine.model_check import folder_problems
from qlora_engine.model_ref import is_gguf, resolve_model, weights_format
from qlora_engine.offload import offloaded_checkpoint

_ATTENTION_HINTS = ("attn", "attention")
_MLP_HINTS = ("mlp", "feed_forward", "ffn")


# -- facts without weights ------------------------------------------------------------------------


@dataclass
class ModelInfo:
    ref: str
    local_path: str | None
    architecture: str
    model_type: str
    num_parameters: int
    num_layers: int
    hidden_size: int
    intermediate_size: int | None
    vocab_size: int
    num_attention_heads: int | None
    num_key_value_heads: int | None
    linear_modules: list[str]
    attention_modules: list[str]
    mlp_modules: list[str]
    has_chat_template: bool
    torch_dtype: str | None
    weights_format: str
    usable: bool
    problems: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def read_model_config(ref: str, *, trust_remote_code: bool = False, revision: str | None = None):
    """The transformers config of a model reference; reads no weights."""
    path = Path(ref).expanduser()
    try:
        if is_gguf(ref):
            if not path.is_file():
                raise ModelError("GGUF file not found.", file=path)
            return AutoConfig.from_pretrained(path.parent, gguf_file=path.name)
        folder = resolve_model(ref, revision=revision, weights=False)
        return AutoConfig.from_pretrained(folder, trust_remote_code=trust_remote_code)
    except QLoRAError:
        raise
    except Exception as e:  # transformers raises ValueError, OSError, KeyError... for a damaged file
        if "trust_remote_code" in str(e):
            raise remote_code_error(ref) from e
        where = path if is_gguf(ref) else path / "config.json"
        raise ModelError(
            f"could not read the model's configuration ({type(e).__name__}: {str(e)[:300]}).",
            file=where,
            fix="The file is damaged or not a model's; download or convert the model again.",
        ) from e


def remote_code_error(ref: str) -> ModelError:
    return ModelError(
        f"{ref}: this model needs its own Python code to load (trust_remote_code). That code would run with "
        "your user's rights, so it is off by default.",
        hint="If you trust the model's source, set model.trust_remote_code: true in the config.",
    )


def _module_names(config: Any, trust_remote_code: bool) -> tuple[str, int, list[str], list[str], list[str], int]:
    """Build the model on the meta device (no memory, no weights) to list its linear layers."""
    # lazy: transformers' auto model classes cost seconds; the budget imports this module only to read a config
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
    out_emb = model.get_output_embeddings()
    linear, attn, mlp = [], [], []
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and module is not out_emb:
            short = name.rsplit(".", 1)[-1]
            if short not in linear:
                linear.append(short)
            low = name.lower()
            if any(h in low for h in _ATTENTION_HINTS) and short not in attn:
                attn.append(short)
            elif any(h in low for h in _MLP_HINTS) and short not in mlp:
                mlp.append(short)
    n_params = sum(p.numel() for p in model.parameters())
    layers = _decoder_layers(model)
    return type(model).__name__, n_params, linear, attn, mlp, len(layers) if layers is not None else 0


def decoder_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The model's decoder blocks, lowest first (empty if none are found)."""
    return list(_decoder_layers(model) or [])


def decoder_body(model: torch.nn.Module) -> torch.nn.Module | None:
    """The module that holds the decoder blocks (``layers``): its first output is the last hidden state."""
    for _, module in model.named_modules():
        layers = getattr(module, "layers", None)
        if isinstance(layers, torch.nn.ModuleList) and len(layers) > 0:
            return module
    return None


def _decoder_layers(model: torch.nn.Module):
    body = decoder_body(model)
    return body.layers if body is not None else None


def _has_chat_template(folder: Path) -> bool:
    if (folder / "chat_template.jinja").is_file() or (folder / "chat_template.json").is_file():
        return True
    tc = folder / "tokenizer_config.json"
    if tc.is_file():
        try:
            return bool(json.loads(tc.read_text(encoding="utf-8")).get("chat_template"))
        except (json.JSONDecodeError, OSError):
            return False
    return False


def inspect_model(ref: str, *, trust_remote_code: bool = False, revision: str | None = None) -> ModelInfo:
    """Everything the GUI and the budget need to know about a model, from config and tokenizer files only."""
    config = read_model_config(ref, trust_remote_code=trust_remote_code, revision=revision)
    problems: list[str] = []
    path = Path(ref).expanduser()
    if is_gguf(ref):
        local: Path | None = path
        fmt = "gguf"
        has_template = _gguf_has_chat_template(path)
    else:
        local = resolve_model(ref, revision=revision, weights=False)
        fmt = weights_format(local) if local.is_dir() else "unknown"
        has_template = _has_chat_template(local)
        if fmt == "none" and not path.is_dir():
            fmt = "safetensors (on the hub)"
    if fmt == "pickle-only":
        problems.append("weights are only in pickle files (.bin/.pt); QLoRA Studio loads safetensors or GGUF only")
    elif fmt == "none":
        problems.append("no weight files (*.safetensors) in the folder")
    if local is not None and local.is_dir():  # the same verdict a run would reach before it loads
        problems += [str(p) for p in folder_problems(local, config=config, trust_remote_code=trust_remote_code)]
    # A GGUF file's config names no architecture class: the class built from it does.
    arch = (getattr(config, "architectures", None) or [type(config).__name__])[0]
    try:
        arch, n_params, linear, attn, mlp, n_layers = _module_names(config, trust_remote_code)
    except Exception as e:  # an architecture transformers cannot build: still report what we know
        problems.append(f"could not build the architecture to list its layers: {e}")
        n_params, linear, attn, mlp = 0, [], [], []
        n_layers = int(getattr(config, "num_hidden_layers", 0) or 0)
    text_cfg = config.get_text_config() if hasattr(config, "get_text_config") else config
    return ModelInfo(
        ref=ref,
        local_path=str(local) if local else None,
        architecture=arch,
        model_type=getattr(config, "model_type", "unknown"),
        num_parameters=n_params,
        num_layers=n_layers,
        hidden_size=int(getattr(text_cfg, "hidden_size", 0) or 0),
        intermediate_size=getattr(text_cfg, "intermediate_size", None),
        vocab_size=int(getattr(text_cfg, "vocab_size", 0) or 0),
        num_attention_heads=getattr(text_cfg, "num_attention_heads", None),
        num_key_value_heads=getattr(text_cfg, "num_key_value_heads", None),
        linear_modules=linear,
        attention_modules=attn,
        mlp_modules=mlp,
        has_chat_template=has_template,
        torch_dtype=str(getattr(config, "dtype", None) or getattr(config, "torch_dtype", None) or "") or None,
        weights_format=fmt,
        usable=not problems,
        problems=problems,
    )


def _gguf_has_chat_template(path: Path) -> bool:
    try:
        # lazy: only .gguf references need it, and a broken gguf install must only lose the template check (except below)
        from gguf import GGUFReader

        return "tokenizer.chat_template" in GGUFReader(str(path)).fields
    except Exception:
        return False


# -- loading ---------------------------------------------------------------------------------------


def pick_device(choice: str) -> torch.device:
    if choice == "cpu":
        return torch.device("cpu")
    if torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    if choice == "cuda":
        raise ConfigError("'cuda' was asked for but no CUDA GPU is visible; use 'auto' or 'cpu'.", field="train.device")
    return torch.device("cpu")


def pick_compute_dtype(choice: str, device: torch.device) -> torch.dtype:
    if choice != "auto":
        return getattr(torch, choice)
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32


def load_tokenizer(folder: str | Path, *, trust_remote_code: bool = False):
    # lazy: transformers' auto model classes cost seconds; the budget imports this module only to read a config
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(folder, trust_remote_code=trust_remote_code)
    except Exception as e:  # a damaged tokenizer file fails in many ways, all the user's to fix
        if "trust_remote_code" in str(e):
            raise remote_code_error(str(folder)) from e
        raise ModelError(
            f"the tokenizer cannot be loaded ({type(e).__name__}: {str(e)[:300]}).",
            file=folder,
            fix="The tokenizer files are damaged or missing; download or convert the model again.",
        ) from e
    if tok.pad_token_id is None:
        # A pad token that is not EOS: padding is masked out of the labels anyway, but an
        # EOS used as pad is easy to mask by mistake. unk is a safe stand-in when present.
        tok.pad_token = tok.unk_token if tok.unk_token is not None else tok.eos_token
    return tok


def load_quantized_model(
    cfg: TrainConfig,
    folder: Path,
    device: torch.device,
    dtype: torch.dtype,
    *,
    storage: torch.dtype = torch.uint8,
    weights: Mapping[str, Any] | None = None,
):
    """Load the base model with its linear layers in 4 bit (bitsandbytes); the rest stays in ``dtype``.

    ``storage``: the dtype the packed 4-bit weights are stored in (``bnb_4bit_quant_storage``):
    bytes, or the compute dtype for FSDP, which shards tensors of one dtype; the bits are the same.
    ``weights``: the checkpoint's tensors by name, read instead of the folder's weight files (the
    folder still gives the config). transformers takes each value as it takes a safetensors
    slice, ``value[...]`` when its turn comes, and quantizes it before the next: values built
    on demand load a model larger than the disk, one tensor at a time (``bench/big_shape.py``).
    """
    # lazy: transformers' auto model classes cost seconds; the budget imports this module only to read a config
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    qcfg = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=cfg.quant.quant_type,
        bnb_4bit_use_double_quant=cfg.quant.double_quant,
        bnb_4bit_compute_dtype=dtype,
        bnb_4bit_quant_storage=storage,
    )
    try:
        # transformers takes a state dict only in place of a folder, and through the model's own
        # class (the auto class needs the folder); the folder then gives the config
        loader, source = AutoModelForCausalLM, {"pretrained_model_name_or_path": folder}
        if weights is not None:
            import transformers  # lazy: see above

            config = AutoConfig.from_pretrained(folder)
            loader = getattr(transformers, (config.architectures or ["?"])[0])
            source = {"pretrained_model_name_or_path": None, "config": config, "state_dict": weights}
        model = loader.from_pretrained(
            **source,
            quantization_config=qcfg,
            dtype=dtype,
            device_map={"": str(device) if device.type == "cpu" else device.index or 0},
            trust_remote_code=cfg.model.trust_remote_code,
            attn_implementation=cfg.model.attn_implementation,
            use_safetensors=True,
        )
    except ValueError as e:
        if "trust_remote_code" in str(e):
            raise remote_code_error(cfg.model.ref) from e
        raise
    except OSError as e:  # a weight file damaged after the pre-load check, or unreadable
        raise ModelError(f"the weights cannot be loaded ({type(e).__name__}: {str(e)[:300]}).", file=folder) from e
    model.config.use_cache = False  # the KV cache is useless in training and costs memory
    return model


def apply_fused_kernels(model: torch.nn.Module, choice: str, device: torch.device, loss_only: bool = False) -> str:
    """Swap in Liger Kernel's fused operations where asked for and possible; returns what was used.

    Call on the base model before LoRA wrapping. The fused linear + cross-entropy computes
    the loss chunk by chunk from the hidden states, so the ``tokens x vocabulary`` logits
    (and their fp32 copies in the loss) never exist: with a 128k vocabulary that is most of
    the activation memory at moderate sequence lengths. ``loss_only`` (compiled layers): only
    that loss; Liger's norm, RoPE and activation kernels are opaque to ``torch.compile`` (a
    graph break each), and the compiler fuses those itself.
    """
    if choice == "none":
        return "none"
    model_type = getattr(model.config, "model_type", "")
    try:
        # lazy: optional package (liger-kernel, the `gpu` extra), absent on CPU machines
        from liger_kernel.transformers.monkey_patch import MODEL_TYPE_TO_APPLY_LIGER_FN, _apply_liger_kernel_to_instance
    except ImportError as e:
        if choice == "liger":
            raise ConfigError(
                "'liger' needs the liger-kernel package; install it with "
                "pip install 'qlora-studio[gpu]', or set train.kernels to auto or none.",
                field="train.kernels",
            ) from e
        return "none"
    if device.type != "cuda" or model_type not in MODEL_TYPE_TO_APPLY_LIGER_FN:
        if choice == "liger":
            where = "a CUDA GPU" if device.type != "cuda" else f"a supported architecture (not {model_type!r})"
            raise ConfigError(f"'liger' needs {where}; set train.kernels to auto or none.", field="train.kernels")
        return "none"
    # the keywords each architecture's apply function lacks are dropped by liger itself
    inside = dict.fromkeys(("rope", "rms_norm", "swiglu", "geglu", "layer_norm"), False) if loss_only else {}
    _apply_liger_kernel_to_instance(model=model, **inside)
    return "liger"


def resolve_target_modules(lora: LoraSettings, linear: list[str], attn: list[str], mlp: list[str]) -> list[str]:
    targets = lora.target_modules
    if len(targets) == 1 and targets[0] in LORA_PRESETS:
        chosen = {"attention": attn, "mlp": mlp, "all-linear": linear}[targets[0]]
        if not chosen:
            raise ConfigError(
                f"preset {targets[0]!r} matches no layer of this model; its linear layers are {linear}.",
                field="lora.target_modules",
            )
        return list(chosen)
    unknown = [t for t in targets if t not in linear]
    if unknown:
        raise ConfigError(
            f"{unknown} not in this model; its linear layers are {linear} "
            f"(or use a preset: {', '.join(LORA_PRESETS)}).",
            field="lora.target_modules",
        )
    return list(targets)


def linear_module_names(model: torch.nn.Module) -> tuple[list[str], list[str], list[str]]:
    """Short names of the linear layers inside the decoder blocks (4-bit ones included), by role."""
    # lazy: bitsandbytes costs seconds to import; inspect-model and the budget import this module without needing it
    import bitsandbytes as bnb

    out_emb = model.get_output_embeddings()
    linear, attn, mlp = [], [], []
    for name, module in model.named_modules():
        if isinstance(module, (torch.nn.Linear, bnb.nn.Linear4bit)) and module is not out_emb:
            short = name.rsplit(".", 1)[-1]
            low = name.lower()
            for lst, ok in (
                (linear, True),
                (attn, any(h in low for h in _ATTENTION_HINTS)),
                (mlp, any(h in low for h in _MLP_HINTS)),
            ):
                if ok and short not in lst:
                    lst.append(short)
    return linear, attn, mlp


def wrap_with_lora(model: torch.nn.Module, cfg: TrainConfig):
    """Add trainable LoRA adapters (peft). No fp32 upcast of the frozen weights: see the module docstring."""
    # lazy: peft costs seconds to import; only training wraps the model, inspect-model and the budget do not
    from peft import LoraConfig, get_peft_model

    lora = cfg.lora
    linear, attn, mlp = linear_module_names(model)
    targets = resolve_target_modules(lora, linear, attn, mlp)
    layers = parse_layers(lora.layers)
    n_layers = len(_decoder_layers(model) or [])
    if layers is not None and max(layers) >= n_layers:
        raise ConfigError(
            f"{lora.layers!r} goes past the model's {n_layers} layers (0-{n_layers - 1}).", field="lora.layers"
        )
    peft_cfg = LoraConfig(
        r=lora.rank,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=targets,
        layers_to_transform=layers,
        use_dora=lora.use_dora,
        use_rslora=lora.use_rslora,
        bias="none",
        task_type="CAUSAL_LM",
    )
    # lazy: varlen imports transformers' masking/attention modules (the modeling stack); training only
    from qlora_engine import varlen  # packed rows on a GPU: attention per sample, without a mask

    # Not under train.compile: its sample boundaries are read off the batch with a data-dependent
    # nonzero and cached across layers, which a compiled layer cannot hold in one graph; compiled
    # layers take SDPA's block mask for packed rows instead (a tensor input like any other).
    varlen.use_for(model, cfg.data.packing and cfg.train.compile == "off", next(model.parameters()).device)
    return get_peft_model(model, peft_cfg)


def enable_gradient_checkpointing(model: torch.nn.Module, layers: int | None = None, offload: bool = False) -> int:
    """Checkpoint the decoder layers the backward pass reaches, or only the lowest ``layers`` of them.

    Returns how many layers are checkpointed. A layer is reached from the lowest one holding
    a trainable (LoRA) weight up; the ones below take no part in the backward pass, so
    checkpointing them saves and costs nothing. The others keep their activations: faster
    (no recomputation), more memory (the VRAM budget models both). ``offload`` keeps the
    checkpointed inputs in pinned host memory (:mod:`qlora_engine.offload`).
    """
    # Non-reentrant checkpointing works with inputs that need no gradient, so the backward
    # pass stops at the lowest adapted layer (no `enable_input_require_grads`: that would
    # carry gradients down to the embeddings for nothing when only upper layers are adapted).
    # The method's name in newer transformers 5.x, else the older one.
    enable = getattr(model, "activation_checkpointing_enable", None)
    key = "activation_checkpointing_kwargs"
    if enable is None:
        enable, key = model.gradient_checkpointing_enable, "gradient_checkpointing_kwargs"
    enable(**{key: {"use_reentrant": False}})
    # transformers turns input gradients on itself when it enables checkpointing; take them off.
    model.disable_input_require_grads()
    # lazy: transformers.modeling_layers loads its whole modeling stack (seconds); only training needs it
    from transformers.modeling_layers import GradientCheckpointingLayer

    blocks = [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]
    trained = [i for i, b in enumerate(blocks) if any(p.requires_grad for p in b.parameters())]
    first = trained[0] if trained else len(blocks)
    keep = len(blocks) - first if layers is None else min(layers, len(blocks) - first)
    if layers is not None:  # else all, as transformers set them (those below `first` never run backward)
        for i, block in enumerate(blocks):
            # the flag transformers' own every_n_layers sets per layer; we choose the layers
            block.gradient_checkpointing = first <= i < first + keep
    if offload and not blocks:
        raise ConfigError(
            f"{type(model).__name__} has no decoder layers that transformers "
            "checkpoints, so there is nothing to offload; turn it off.",
            field="train.offload_activations",
        )
    if offload:
        for block in blocks:  # the function transformers' layers call when their flag is on
            block._gradient_checkpointing_func = offloaded_checkpoint
    return keep


def tile_mlps(model: torch.nn.Module, chunk: int) -> int:
    """Run every decoder layer's MLP over the sequence in chunks of ``chunk`` tokens.

    Each chunk runs under non-reentrant checkpointing, which keeps only the chunk's input: its
    gate, up and activation outputs (tokens x intermediate size each) are freed after the
    chunk and recomputed, one chunk at a time, in the backward pass. The MLP acts on each
    token alone, so the result is the same (with LoRA dropout, the masks are drawn per chunk:
    the same distribution, other draws). Without gradients (evaluation, generation) the MLP
    runs whole. Returns how many MLPs were tiled.
    """
    # lazy: transformers.modeling_layers loads its whole modeling stack (seconds); only training needs it
    from transformers.modeling_layers import GradientCheckpointingLayer

    def tiled(inner: Any) -> Any:
        def forward(x: torch.Tensor) -> torch.Tensor:
            if not torch.is_grad_enabled() or x.shape[-2] <= chunk:
                return inner(x)
            pieces = [checkpoint(inner, piece, use_reentrant=False) for piece in x.split(chunk, dim=-2)]
            return torch.cat(pieces, dim=-2)

        return forward

    mlps = [b.mlp for b in model.modules() if isinstance(b, GradientCheckpointingLayer) and hasattr(b, "mlp")]
    if not mlps:
        raise ConfigError(
            f"{type(model).__name__} has no decoder-layer MLP to tile; set it to null.", field="train.mlp_chunk_tokens"
        )
    for mlp in mlps:
        mlp.forward = tiled(mlp.forward)
    return len(mlps)


def model_facts(model: torch.nn.Module) -> dict[str, Any]:
    # lazy: bitsandbytes costs seconds to import; inspect-model and the budget import this module without needing it
    import bitsandbytes as bnb

    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = 0
    n4 = 0
    for m in model.modules():
        if isinstance(m, bnb.nn.Linear4bit):
            n4 += 1
    for p in model.parameters():
        # Params4bit stores two weights per byte; count the logical weights.
        total += p.quant_state.shape.numel() if hasattr(p, "quant_state") and p.quant_state is not None else p.numel()
    cfg = model.config
    return {
        "architecture": (getattr(cfg, "architectures", None) or [type(model).__name__])[0],
        "model_type": getattr(cfg, "model_type", ""),
        "num_parameters": int(total),
        "trainable_parameters": int(trainable),
        "quantized_linear_layers": n4,
        "num_layers": int(getattr(cfg, "num_hidden_layers", 0) or 0),
        "hidden_size": int(getattr(cfg, "hidden_size", 0) or 0),
        "vocab_size": int(getattr(cfg, "vocab_size", 0) or 0),
    }
