"""The run configuration: one typed dataclass tree, validated before anything heavy starts.

Every field carries help text (shown as the GUI tooltip and as a comment in the YAML that
``qlora-engine init`` writes) and a default chosen for a first QLoRA run on one GPU.
Choices are ``Literal`` types. Each section (:mod:`qlora_engine.config_sections`) validates
itself when built (``__post_init__``, as peft's configs do) and :func:`validate` checks a whole
tree: a :class:`ConfigError` (a ``ValueError``) carries every bad field at once in
``problems``, each naming its field path and what is allowed. Config files are read through
:mod:`qlora_engine.config_file` (regular files only, size/depth/alias limits, no duplicate keys).
"""

from __future__ import annotations

import dataclasses
import errno
import textwrap
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal

import yaml

from qlora_engine import scrub
from qlora_engine.config_checks import (
    Section,
    check_output_dir,
    hints_of,
    parse_layers,
    raise_problems,
    run_warnings,
    show,
    type_ok,
)
from qlora_engine.config_file import load_yaml, read_yaml_file
from qlora_engine.config_sections import (
    DataConfig,
    LoraSettings,
    ModelConfig,
    OptimConfig,
    OutputConfig,
    QuantConfig,
    TrainSettings,
)
from qlora_engine.errors import ConfigError, DiskFullError, Problem, QLoRAError

SCHEMA_VERSION = 1


__all__ = [
    "ConfigError",
    "TrainConfig",
    "apply_overrides",
    "check_output_dir",
    "check_ready",
    "field_help",
    "parse_layers",
    "problems_of",
    "run_warnings",
    "validate",
]


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
        scrub.remember_config(self)  # before validation: its messages are scrubbed too
        validate(self)

    # -- conversions -------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d.pop("base_dir", None)
        return {"schema_version": d.pop("schema_version"), **d}

    @classmethod
    def from_dict(
        cls, data: dict[str, Any], *, source: str = "config", lines: dict[str, int] | None = None
    ) -> TrainConfig:
        """Build and validate a config from plain data (what YAML gives).

        Args:
            data: ``{"lora": {"rank": 8}, ...}``; missing sections and fields keep their defaults.
            source: where the data came from (a file path, "form"); the error's ``file``.
            lines: the line of each ``section`` / ``section.field`` key, for the error's ``line``.

        Raises:
            ConfigError: every bad section and field in ``problems``.
        """
        try:
            return cls._from_dict(data)
        except ConfigError as e:
            raise _located(e, source, lines or {}) from None

    @classmethod
    def _from_dict(cls, data: Any) -> TrainConfig:
        if not isinstance(data, dict):
            raise ConfigError(
                f"expected a mapping of sections (model:, data:, lora:, ...), got {describe_value(data)}."
            )
        problems: list[Problem] = []
        names = [k for k in data if k != "schema_version"]
        for k in names:
            if not isinstance(k, str):
                problems.append(Problem(f"the key {show(k)} is not a section name; keys must be text"))
        version = data.get("schema_version", SCHEMA_VERSION)
        if version != SCHEMA_VERSION or type(version) is not int:
            problems.append(
                Problem(
                    f"schema_version {show(version)} is not supported (this version reads {SCHEMA_VERSION}).",
                    field="schema_version",
                )
            )
        hints = hints_of(cls)
        sections = [
            f.name for f in dataclasses.fields(cls) if f.name != "schema_version" and not f.metadata.get("internal")
        ]
        kwargs = {}
        for name in names:
            if not isinstance(name, str):
                continue
            if name not in sections:
                problems.append(Problem(f"unknown section {name[:60]!r}; known sections: {sections}.", field=name))
                continue
            value = data[name]
            if value is None:
                value = {}
            if not isinstance(value, dict):
                problems.append(Problem(f"expected a mapping of fields, got {show(value)}.", field=name))
                continue
            sub_cls = hints[name]
            known = [f.name for f in dataclasses.fields(sub_cls)]
            bad = [k for k in value if not isinstance(k, str) or k not in known]
            for k in bad:
                what = "unknown field" if isinstance(k, str) else f"the key {show(k)} is not a field name"
                problems.append(Problem(f"{what}; fields of '{name}': {known}.", field=f"{name}.{str(k)[:60]}"))
            try:
                kwargs[name] = _construct(sub_cls, {k: v for k, v in value.items() if k not in bad})
            except ConfigError as e:
                problems.extend(e.problems or [Problem(e.what, field=e.field)])
        raise_problems(problems)
        return cls(**kwargs)

    def to_yaml(self, *, comments: bool = True) -> str:
        return dump_yaml(self, comments=comments)

    @classmethod
    def from_yaml(cls, text: str, *, source: str = "config") -> TrainConfig:
        """A config from YAML text (read with the limits of :mod:`qlora_engine.config_file`)."""
        data, lines = load_yaml(text, source)
        return cls.from_dict(data if data is not None else {}, source=source, lines=lines)

    @classmethod
    def load(cls, path: str | Path, overrides: list[str] | None = None) -> TrainConfig:
        """Read a YAML file, apply ``section.field=value`` overrides, validate.

        Raises:
            ConfigError: ``file`` (and ``line`` where known) names the place; ``problems`` holds
                every bad field.
        """
        p = Path(path)
        data, lines = read_yaml_file(p)
        cfg = cls.from_dict(data if data is not None else {}, source=str(p), lines=lines)
        if overrides:
            cfg = apply_overrides(cfg, overrides)
        cfg.base_dir = p.resolve().parent
        cfg.source_file = p
        return cfg

    def save(self, path: str | Path) -> None:
        """Write the YAML through a temporary file, so a failed write leaves the old file whole.

        Raises:
            DiskFullError: no space left (or a file-size limit) while writing.
            QLoRAError: the place cannot be written (read-only, a file where a folder must be).
        """
        p = Path(path)
        tmp = p.with_name(p.name + ".tmp")
        try:
            p.parent.mkdir(parents=True, exist_ok=True)
            scrub.remember_config(self)  # a field set since __post_init__
            tmp.write_text(scrub.scrub(self.to_yaml()), encoding="utf-8")  # a token given in the config: hf_***
            tmp.replace(p)
        except OSError as e:
            if tmp.is_file():
                tmp.unlink()
            if e.errno in (errno.ENOSPC, errno.EFBIG):
                raise DiskFullError(f"no space left to write the config ({e.strerror}).", file=p) from None
            why = e.strerror or str(e)
            if isinstance(e, (FileExistsError, NotADirectoryError)):
                why = "a file stands where a folder must be"
            raise QLoRAError(
                f"the config cannot be written ({why}); nothing was changed.",
                file=p,
                fix="Choose a folder you can write to.",
            ) from None

    # -- paths -------------------------------------------------------------------------
    base_dir: Path | None = field(default=None, repr=False, compare=False, metadata={"internal": True})
    source_file: ClassVar[Path | None] = None
    """The YAML file this config was read from, set per instance by :meth:`load` (errors found
    later still name it); not a dataclass field, so it is no section and never written."""

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


def describe_value(value: Any) -> str:
    return {list: "a list", str: "text", int: "a number", float: "a number", bool: "true/false"}.get(
        type(value), type(value).__name__
    )


def _construct(cls: type, values: dict[str, Any]) -> Any:
    """A section from YAML values, forgiving what YAML reads differently than the user meant."""
    hints = hints_of(cls)
    fixed = {}
    for k, v in values.items():
        tp = hints[k]
        # YAML reads 1e-4 as a string in YAML 1.1; accept numeric strings for float fields.
        if isinstance(v, str) and type_ok(1.0, tp) and not type_ok(v, tp) and len(v) < 64:
            try:
                v = float(v)
            except ValueError:
                pass
        if isinstance(v, int) and not isinstance(v, bool) and tp is float:
            v = float(v)
        # `rank: 16.0` means 16; `rank: 16.5` stays a float and is refused as not whole.
        if isinstance(v, float) and v.is_integer() and type_ok(1, tp) and not type_ok(1.5, tp):
            v = int(v)
        # YAML reads `layers: 3` or `revision: 1234` as numbers; take them as the text they are.
        if isinstance(v, (int, float)) and not isinstance(v, bool) and type_ok("x", tp) and not type_ok(v, tp):
            v = str(v)
        # YAML 1.1 reads `off` and `on` (and no/yes) as false and true; a choice named so is what was meant.
        if isinstance(v, bool) and not type_ok(v, tp) and type_ok("on" if v else "off", tp):
            v = "on" if v else "off"
        fixed[k] = v
    return cls(**fixed)


def _located(e: ConfigError, source: str, lines: dict[str, int]) -> ConfigError:
    """``e`` with the file it came from and the line of each problem's field (or section)."""

    def line_of(p: Problem) -> int | None:
        if p.line is not None or not p.field:
            return p.line
        return lines.get(p.field) or lines.get(p.field.split(".")[0])

    problems = [dataclasses.replace(p, file=p.file or source or None, line=line_of(p)) for p in e.problems]
    if not problems:
        return ConfigError(e.what, field=e.field, file=e.file or source or None, line=e.line, fix=e.fix)
    first = problems[0]
    return ConfigError(
        first.what, field=first.field, file=first.file, line=first.line, fix=first.fix, problems=problems
    )


def problems_of(cfg: TrainConfig) -> list[Problem]:
    """Every bad field of a config tree (sections check themselves; fields may have been set since)."""
    found: list[Problem] = []
    for section in dataclasses.fields(cfg):
        if section.metadata.get("internal") or section.name == "schema_version":
            continue
        obj = getattr(cfg, section.name)
        if isinstance(obj, Section):
            found.extend(obj.problems())
        else:
            found.append(Problem(f"expected a mapping of fields, got {show(obj)}.", field=section.name))
    return found


def validate(cfg: TrainConfig) -> None:
    """Check every field of every section; raise one ConfigError holding every problem found."""
    raise_problems(problems_of(cfg))


def check_ready(cfg: TrainConfig) -> None:
    """Checks that only a config about to train must pass (a draft in the GUI may leave them empty)."""
    src = str(cfg.source_file) if cfg.source_file else None
    problems = []
    if not cfg.model.ref.strip():
        problems.append(
            Problem("no model chosen; set a local folder, a .gguf file or a hub id.", field="model.ref", file=src)
        )
    if not cfg.data.path.strip():
        problems.append(
            Problem("no training data chosen; set a file, a folder or a hub dataset id.", field="data.path", file=src)
        )
    raise_problems(problems)


# -- overrides -------------------------------------------------------------------------------


def apply_overrides(cfg: TrainConfig, overrides: list[str]) -> TrainConfig:
    """Apply ``section.field=value`` strings (values parsed as YAML) and validate the result.

    Raises:
        ConfigError: a malformed or unknown override (its ``field``), or every bad value.
    """
    data = cfg.to_dict()
    problems: list[Problem] = []
    for item in overrides:
        key, sep, raw = item.partition("=")
        parts = key.strip().split(".")
        if not sep or len(parts) != 2 or not all(parts):
            problems.append(
                Problem(
                    f"override {show(item)}: write section.field=value, e.g. lora.rank=32.", fix="Check the spelling."
                )
            )
            continue
        section, name = parts
        if section not in data or not isinstance(data[section], dict):
            known = sorted(k for k in data if k != "schema_version")
            problems.append(
                Problem(f"override {show(item)}: unknown section {section[:60]!r}; known: {known}.", field=section[:60])
            )
            continue
        if name not in data[section]:
            problems.append(
                Problem(
                    f"override {show(item)}: {section} has no field {name[:60]!r}; fields: {sorted(data[section])}.",
                    field=f"{section}.{name[:60]}",
                )
            )
            continue
        try:
            value = load_yaml(raw)[0] if raw.strip() else ""
        except ConfigError:  # not YAML: the text as written (a type problem names it if it must not be text)
            value = raw
        data[section][name] = value
    raise_problems(problems)
    new = TrainConfig.from_dict(data, source="")
    new.base_dir, new.source_file = cfg.base_dir, cfg.source_file
    return new


# -- YAML with comments ----------------------------------------------------------------------


def _yaml_value(value: Any) -> str:
    text = yaml.safe_dump(value, default_flow_style=True, sort_keys=False, width=10_000).strip()
    return text.removesuffix("\n...").removesuffix("...").strip()


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
                lines += [f"  # {chunk}" for chunk in _wrap(help_text, 92)]
            lines.append(f"  {f.name}: {_yaml_value(getattr(obj, f.name))}")
    return "\n".join(lines) + "\n"


def _wrap(text: str, width: int) -> list[str]:
    return textwrap.wrap(text, width) or [""]


def field_help(section: str, name: str) -> str:
    """Help text of ``section.name`` (the GUI's tooltips)."""
    sec_cls = typing.get_type_hints(TrainConfig)[section]
    for f in dataclasses.fields(sec_cls):
        if f.name == name:
            return f.metadata["help"]
    raise KeyError(f"{section}.{name}")
