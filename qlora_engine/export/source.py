"""What an export or a chat starts from: a run folder, its adapter, and the facts of its training.

Accepted sources: a run folder (``config.yaml``, ``events.jsonl``, ``adapter/``), the
``adapter/`` folder itself, a ``checkpoints/step-N`` folder, or an adapter folder exported
earlier (it carries the run's ``config.yaml``). The adapter must be in safetensors: a
``.bin`` adapter is a pickle and is never loaded.
"""

from __future__ import annotations

import glob
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from qlora_engine import scrub
from qlora_engine.config import TrainConfig, apply_overrides
from qlora_engine.errors import ModelError
from qlora_engine.events import EvalResult, RunFailed, RunFinished, RunStarted, StepMetrics, read_events

ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"


@dataclass
class TrainingFacts:
    """What the model card reports, read from ``events.jsonl``."""

    device: str | None = None
    steps: int | None = None
    total_steps: int | None = None
    final_loss: float | None = None
    final_eval_loss: float | None = None
    training_seconds: float | None = None
    stopped_early: bool = False
    resumed: bool = False
    model: dict[str, Any] = field(default_factory=dict)
    data: dict[str, Any] = field(default_factory=dict)
    finished: bool = False


@dataclass
class RunInfo:
    adapter_dir: Path
    run_dir: Path | None
    config: TrainConfig
    has_config: bool
    """False when no config.yaml was found and the config was made from adapter_config.json."""
    adapter_config: dict[str, Any]
    facts: TrainingFacts

    @property
    def name(self) -> str:
        return (self.run_dir or self.adapter_dir).name

    @property
    def export_name(self) -> str:
        """What exports are called: the base model's short name and the run's, e.g. 'smollm2-135m-instruct-pirate'."""
        return export_name(self.config.model.ref, self.name)


_QUANT_SUFFIX = re.compile(r"[.-](q\d[\w]*|iq\d[\w]*|f16|f32|bf16|fp16|gguf)$", re.IGNORECASE)


def _name_slug(name: str) -> str:
    out = re.sub(r"[^a-z0-9._-]+", "-", name.lower()).strip("-.")
    return re.sub(r"-{2,}", "-", out)


def base_model_name(ref: str) -> str:
    """A short lowercase name for a base model reference (hub id, folder or .gguf file).

    'HuggingFaceTB/SmolLM2-135M-Instruct' and '.../SmolLM2-135M-Instruct.Q4_1.gguf' both give
    'smollm2-135m-instruct': the last path part, without a GGUF extension or quantization suffix.
    """
    name = ref.replace("\\", "/").rstrip("/").split("/")[-1]
    if name.lower().endswith(".gguf"):
        name = name[: -len(".gguf")]
    while (stripped := _QUANT_SUFFIX.sub("", name)) != name:
        name = stripped
    return _name_slug(name)


def export_name(model_ref: str, run_name: str) -> str:
    """The base model's short name and the run's ('smollm2-135m-instruct-pirate'); the run's alone if it
    already starts with the base's."""
    base, run = base_model_name(model_ref), _name_slug(run_name) or "run"
    return run if not base or run.startswith(base) else f"{base}-{run}"


EXPORT_SUFFIX = {"adapter": "-lora", "merged": "", "gguf": "-gguf"}
"""Appended to :attr:`RunInfo.export_name` for each format's default folder."""


def default_export_dir(info: RunInfo, fmt: str) -> Path:
    """Where an export goes unless told: beside the run folder, named for the base model, the run and the format."""
    home = (info.run_dir or info.adapter_dir).parent
    return home / f"{info.export_name}{EXPORT_SUFFIX[fmt]}"


def _is_adapter_folder(path: Path) -> bool:
    return (path / ADAPTER_CONFIG).is_file()


def find_adapter(source: str | Path) -> tuple[Path, Path | None]:
    """(adapter folder, run folder or None) for any accepted source."""
    path = Path(source).expanduser()
    if not path.exists():
        raise ModelError(f"{path}: no such run or adapter folder.")
    if _is_adapter_folder(path / "adapter"):
        return path / "adapter", path
    if _is_adapter_folder(path):
        if path.parent.name == "checkpoints":
            return path, path.parent.parent
        parent = path.parent
        is_run = (parent / "events.jsonl").is_file() or (parent / "config.yaml").is_file() and path.name == "adapter"
        return path, parent if is_run else None
    if (path / "config.yaml").is_file() or (path / "events.jsonl").is_file():
        raise ModelError(
            f"{path}: this run has no final adapter yet (it is still training, or stopped before saving one).",
            hint="Wait for the run to finish, or point at one of its checkpoints/step-N folders.",
        )
    raise ModelError(
        f"{path}: not a run folder or an adapter folder (no {ADAPTER_CONFIG}).",
        hint="Point at a run folder (with adapter/ inside) or at an adapter folder.",
    )


def load_run(source: str | Path) -> RunInfo:
    """Everything an export or a chat needs to know about a trained adapter."""
    adapter_dir, run_dir = find_adapter(source)
    if not (adapter_dir / ADAPTER_WEIGHTS).is_file():
        pickled = [p.name for p in adapter_dir.glob("adapter_model.bin")]
        raise ModelError(
            f"{adapter_dir}: no {ADAPTER_WEIGHTS}"
            + (
                " (only a pickle file, adapter_model.bin, which is never loaded because it can run code)"
                if pickled
                else ""
            )
            + ".",
            hint="Use an adapter saved in safetensors format (peft's default).",
        )
    try:
        adapter_config = json.loads((adapter_dir / ADAPTER_CONFIG).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise ModelError(f"{adapter_dir / ADAPTER_CONFIG}: cannot be read ({e}).") from e
    if adapter_config.get("peft_type", "LORA") != "LORA":
        raise ModelError(
            f"{adapter_dir}: a {adapter_config.get('peft_type')} adapter; only LoRA adapters are supported."
        )

    config_file = next(
        (p for p in (adapter_dir / "config.yaml", run_dir / "config.yaml" if run_dir else None) if p and p.is_file()),
        None,
    )
    if config_file is not None:
        cfg = TrainConfig.load(config_file)
        has_config = True
    else:
        base = adapter_config.get("base_model_name_or_path") or ""
        if not base:
            raise ModelError(
                f"{adapter_dir}: no config.yaml next to the adapter and no base_model_name_or_path in {ADAPTER_CONFIG}, "
                "so the base model is unknown."
            )
        cfg = apply_overrides(TrainConfig(), [f"model.ref={json.dumps(base)}"])
        has_config = False
    events_file = run_dir / "events.jsonl" if run_dir else None
    facts = read_facts(events_file) if events_file and events_file.is_file() else TrainingFacts()
    return RunInfo(adapter_dir, run_dir, cfg, has_config, adapter_config, facts)


def read_facts(events_file: Path) -> TrainingFacts:
    """Device, steps, final losses and training time; a resumed run adds up its segments."""
    f = TrainingFacts()
    seconds = 0.0
    segment_last: float | None = None  # elapsed of the last step event in the current segment
    starts = 0
    for e in read_events(events_file):
        if isinstance(e, RunStarted):
            if segment_last is not None:
                seconds += segment_last  # a segment that ended without RunFinished (killed or failed)
            segment_last = None
            starts += 1
            f.device = e.device
            f.total_steps = e.total_steps
            f.model = dict(e.model or {})
            f.data = dict(e.data or {})
        elif isinstance(e, StepMetrics):
            segment_last = e.elapsed
            f.steps = e.step
            f.final_loss = e.loss
        elif isinstance(e, EvalResult):
            f.final_eval_loss = e.loss
        elif isinstance(e, RunFinished):
            seconds += e.elapsed
            segment_last = None
            f.steps = e.step
            f.final_loss = e.final_loss if e.final_loss is not None else f.final_loss
            f.final_eval_loss = e.final_eval_loss if e.final_eval_loss is not None else f.final_eval_loss
            f.stopped_early = e.stopped_early
            f.finished = True
        elif isinstance(e, RunFailed):
            f.finished = False
    if segment_last is not None:
        seconds += segment_last
    f.training_seconds = seconds if starts else None
    f.resumed = starts > 1
    return f


def _candidates(info: RunInfo) -> list[str]:
    cfg = info.config
    refs = [cfg.model.ref]
    resolved = cfg.resolve(cfg.model.ref)
    if str(resolved) != cfg.model.ref and resolved.exists():
        refs.insert(0, str(resolved))
    base = info.adapter_config.get("base_model_name_or_path")
    if base and base not in refs:
        refs.append(base)
    return [r for ref in refs for r in ([ref] if not scrub.is_masked(ref) else _unmasked(ref))]


def _unmasked(ref: str) -> list[str]:
    """A model path holding a hub token (a folder named by it) was written masked: the path with each
    token this process knows put back, then the one existing folder the mask's place fits."""
    parts = ref.split(scrub.MASK)
    found = [secret.join(parts) for secret in scrub.known_secrets()]
    fits = glob.glob("*".join(glob.escape(p) for p in parts))
    return [p for p in found if Path(p).exists()] + (fits if len(fits) == 1 else []) or [ref]


def resolve_base(info: RunInfo, *, sink: Any = None) -> Path:
    """The local folder of the run's base model (a GGUF base is its cached safetensors conversion)."""
    from qlora_engine.model_ref import resolve_model  # lazy: model_ref imports torch; reading a run must not

    errors: list[str] = []
    for ref in _candidates(info):
        try:
            return resolve_model(ref, revision=info.config.model.revision, sink=sink)
        except ModelError as e:
            errors.append(str(e))
    raise ModelError(
        f"the base model of {info.adapter_dir} cannot be found: " + " / ".join(errors),
        hint="Put the base model back where it was trained from, or set model.ref in the run's config.yaml.",
    )


def tokenizer_dir(info: RunInfo, *, sink: Any = None) -> Path:
    """Where the run's tokenizer is: the adapter folder (final adapters carry it), the run's final
    adapter (a checkpoint folder has none), or the base model's folder."""
    candidates = [info.adapter_dir] + ([info.run_dir / "adapter"] if info.run_dir else [])
    for folder in candidates:
        if (folder / "tokenizer_config.json").is_file() or (folder / "tokenizer.json").is_file():
            return folder
    return resolve_base(info, sink=sink)


def base_origin(folder: Path) -> dict[str, Any]:
    """Where the base folder's weights came from: {'kind': 'safetensors'|'gguf'|'prequantized', ...}."""
    source = folder / "qlora_source.json"
    if source.is_file():
        try:
            gguf = json.loads(source.read_text()).get("gguf")
        except (OSError, json.JSONDecodeError):
            gguf = None
        if gguf:
            return {"kind": "gguf", "gguf": gguf, "quantization": _gguf_file_type(Path(gguf))}
    try:
        config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        config = {}
    q = config.get("quantization_config")
    if isinstance(q, dict):
        return {"kind": "prequantized", "method": q.get("quant_method", "unknown"), "config": q}
    return {"kind": "safetensors", "dtype": config.get("dtype") or config.get("torch_dtype")}


def _gguf_file_type(path: Path) -> str | None:
    """The GGUF's file type name (e.g. 'MOSTLY_Q4_1'), or None if it cannot be read now."""
    try:
        import gguf  # lazy: only GGUF sources need gguf

        from qlora_engine.export.gguf_vocab import read_gguf_scalars  # lazy: only GGUF sources need gguf

        ftype = read_gguf_scalars(path, {"general.file_type"}).get("general.file_type")
        return None if ftype is None else gguf.LlamaFileType(int(ftype)).name
    except (OSError, ValueError):
        return None


def is_hub_id(ref: str) -> bool:
    """A hub id looks like 'org/name' and is not a path on this machine."""
    return (
        ref.count("/") == 1
        and not ref.startswith((".", "/", "~"))
        and not Path(ref).exists()
        and not ref.endswith(".gguf")
    )
