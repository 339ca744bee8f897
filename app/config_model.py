"""The configuration being edited: the engine's ``TrainConfig`` plus the user's draft values.

A form must be able to hold a value the engine rejects (a rank of 0 typed half-way), mark
that field and keep going. So the model keeps the draft as plain values per field, and the
last valid ``TrainConfig`` built from them: fields whose draft value is invalid keep their
last valid value in :attr:`ConfigModel.config` and carry an error message in
:attr:`ConfigModel.errors`. Views bind to fields by ``(section, name)`` and redraw on
:attr:`ConfigModel.changed`.
"""

from __future__ import annotations

import copy
import dataclasses
import os
import typing
from pathlib import Path
from typing import Any

from PySide6.QtCore import QObject, Signal

from qlora_engine.config import ConfigError, TrainConfig, apply_overrides

SECTIONS = [f.name for f in dataclasses.fields(TrainConfig) if f.name not in ("schema_version", "base_dir")]


def section_fields(section: str) -> list[dataclasses.Field]:
    cls = typing.get_type_hints(TrainConfig)[section]
    return list(dataclasses.fields(cls))


def field_type(section: str, name: str) -> Any:
    cls = typing.get_type_hints(TrainConfig)[section]
    return typing.get_type_hints(cls)[name]


class ConfigModel(QObject):
    """Holds the draft configuration; emits ``changed(section, name)`` ("", "" after a reload).

    Attributes:
        config: the last fully valid configuration (what a run would use).
        errors: ``{"section.name": message}`` for every field whose draft value is rejected.
        path: the YAML file this configuration was loaded from or saved to, if any.
    """

    changed = Signal(str, str)
    errors_changed = Signal()
    dirty_changed = Signal(bool)
    path_changed = Signal(object)

    def __init__(self, cfg: TrainConfig | None = None, parent: QObject | None = None) -> None:
        super().__init__(parent)
        self.config = TrainConfig()
        self.errors: dict[str, str] = {}
        self.general_error: str | None = None
        self.path: Path | None = None
        self.dirty = False
        self._draft: dict[str, dict[str, Any]] = {}
        self.reset(cfg or TrainConfig())

    # -- reading ---------------------------------------------------------------------------
    def value(self, section: str, name: str) -> Any:
        """The draft value of a field (what the form shows), valid or not."""
        return self._draft[section][name]

    def error(self, section: str, name: str) -> str | None:
        return self.errors.get(f"{section}.{name}")

    @property
    def valid(self) -> bool:
        return not self.errors and self.general_error is None

    @property
    def base_dir(self) -> Path | None:
        return self.config.base_dir

    # -- writing ---------------------------------------------------------------------------
    def set_value(self, section: str, name: str, value: Any) -> str | None:
        """Set one field; returns the field's error message, or None if the value is accepted."""
        return self.set_values({(section, name): value}).get(f"{section}.{name}")

    def set_values(self, values: dict[tuple[str, str], Any]) -> dict[str, str]:
        changed = []
        for (section, name), value in values.items():
            if section not in self._draft or name not in self._draft[section]:
                raise KeyError(f"{section}.{name}")
            if self._draft[section][name] != value or type(self._draft[section][name]) is not type(value):
                self._draft[section][name] = copy.deepcopy(value)
                changed.append((section, name))
        if changed:
            self._rebuild()
            self._set_dirty(True)
            for section, name in changed:
                self.changed.emit(section, name)
        return self.errors

    def apply_overrides(self, overrides: list[str]) -> None:
        """Apply ``section.field=value`` strings (a budget suggestion); raises ConfigError if they are bad."""
        new = apply_overrides(self.config, overrides)
        values = {}
        for item in overrides:
            section, name = item.partition("=")[0].strip().split(".")
            values[(section, name)] = getattr(getattr(new, section), name)
        self.set_values(values)

    def reset(self, cfg: TrainConfig, path: Path | None = None) -> None:
        """Replace everything (New, Open, load a run's config)."""
        self.config = cfg
        self._draft = {s: dict(v) for s, v in cfg.to_dict().items() if s != "schema_version"}
        self.errors = {}
        self.general_error = None
        self.path = path
        self._set_dirty(False)
        self.path_changed.emit(path)
        self.changed.emit("", "")
        self.errors_changed.emit()

    def load(self, path: str | Path) -> None:
        """Open a YAML file; raises ConfigError (naming the file and field) if it is not a valid config."""
        p = Path(path).resolve()
        self.reset(TrainConfig.load(p), p)

    def save(self, path: str | Path | None = None) -> Path:
        """Write the configuration as YAML (the valid values; the form's errors block saving)."""
        if not self.valid:
            key, msg = next(iter(self.errors.items())) if self.errors else ("", self.general_error)
            raise ConfigError(msg or f"{key} is not valid")
        p = Path(path or self.path).resolve()
        cfg = self.config
        old_base = cfg.base_dir
        if old_base is not None and old_base != p.parent:
            cfg = _rebase(cfg, old_base, p.parent)
        cfg.save(p)
        cfg.base_dir = p.parent
        self.config = cfg
        self._draft = {s: dict(v) for s, v in cfg.to_dict().items() if s != "schema_version"}
        self.path = p
        self._set_dirty(False)
        self.path_changed.emit(p)
        self.changed.emit("", "")
        return p

    # -- internals -------------------------------------------------------------------------
    def mark_dirty(self) -> None:
        """The configuration differs from its file (a run's configuration loaded into the form)."""
        self._set_dirty(True)

    def _set_dirty(self, dirty: bool) -> None:
        if dirty != self.dirty:
            self.dirty = dirty
            self.dirty_changed.emit(dirty)

    def _rebuild(self) -> None:
        """Build the config from the draft; fields that fail fall back to the last valid value.

        The engine's error names its bad fields as attributes (``problems``, or ``field`` when
        it stops at the first): each bad field is reverted and the build retried until the
        rest builds, so every bad field gets its own message. The text is only ever shown.
        """
        scratch = copy.deepcopy(self._draft)
        last = {s: v for s, v in self.config.to_dict().items() if s != "schema_version"}
        errors: dict[str, str] = {}
        general = None
        for _ in range(64):
            try:
                cfg = TrainConfig.from_dict(copy.deepcopy(scratch), source="")
            except ConfigError as e:
                bad = [(p.field, p.what) for p in e.problems if p.field] or [(e.field, e.what)]
                known = [(key, what) for key, what in bad if key and _in(scratch, key) and key not in errors]
                if not known:
                    general = str(e)
                    break
                for key, what in known:
                    errors[key] = what
                    section, name = key.split(".", 1)
                    scratch[section][name] = copy.deepcopy(last[section][name])
            else:
                cfg.base_dir = self.config.base_dir
                self.config = cfg
                break
        if errors != self.errors or general != self.general_error:
            self.errors = errors
            self.general_error = general
            self.errors_changed.emit()


def _in(draft: dict[str, dict[str, Any]], key: str) -> bool:
    section, _, name = key.partition(".")
    return name in draft.get(section, {})


def _rebase(cfg: TrainConfig, old: Path, new: Path) -> TrainConfig:
    """Keep relative paths pointing at the same files when the config moves to another folder."""
    out = copy.deepcopy(cfg)
    for section, name in (("data", "path"), ("data", "validation_path"), ("output", "dir"), ("model", "ref")):
        value = getattr(getattr(out, section), name)
        if not value or Path(value).expanduser().is_absolute():
            continue
        target = old / value
        if section == "model" and not target.exists():
            continue  # a hub id, not a path
        try:
            rel = os.path.relpath(target, new)
        except ValueError:  # another drive on Windows
            rel = str(target)
        setattr(getattr(out, section), name, rel)
    return out
