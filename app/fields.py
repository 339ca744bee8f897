"""Form fields bound to the config tree, built from each field's type and help text.

``bind(model, "lora", "rank")`` returns a :class:`FieldBinding` whose editor suits the
field's annotation: a check box for ``bool``, a combo box of the ``Literal`` choices, a spin
box for ``int`` (with a "none" entry for ``int | None``), a text box for ``float`` (so 2e-4
can be typed as such) and ``str``, and YAML flow text for lists and mappings. The tooltip is
the field's help text; a rejected value is marked at the field with the engine's message.
"""

from __future__ import annotations

import math
import types
import typing
from typing import Any, Literal

import yaml
from PySide6.QtCore import QObject, Qt, QTimer
from PySide6.QtWidgets import (
    QCheckBox,
    QComboBox,
    QFormLayout,
    QLabel,
    QLineEdit,
    QSpinBox,
    QWidget,
)

from app.config_model import ConfigModel, field_type
from app.theme import holder, note, restyle, vbox
from qlora_engine.config import field_help

LABELS = {
    ("model", "ref"): "Model",
    ("model", "attn_implementation"): "Attention kernel",
    ("quant", "quant_type"): "4-bit type",
    ("quant", "double_quant"): "Double quantization",
    ("lora", "rank"): "Rank (r)",
    ("train", "checkpoint_layers"): "Checkpointed layers",
    ("train", "offload_activations"): "Offload to CPU RAM",
    ("train", "mlp_chunk_tokens"): "MLP in chunks of",
    ("train", "kernels"): "Fused kernels",
    ("train", "fast_lora"): "Fast LoRA",
    ("train", "compile"): "Compile layers",
    ("train", "keep_dequantized"): "Keep weights dequantized",
    ("lora", "alpha"): "Alpha",
    ("lora", "use_dora"): "DoRA",
    ("lora", "use_rslora"): "rsLoRA",
    ("data", "path"): "Data file or folder",
    ("data", "max_length"): "Sequence length",
    ("data", "overlong"): "Longer samples",
    ("data", "validation_split"): "Validation fraction",
    ("data", "validation_path"): "Validation file",
    ("optim", "learning_rate"): "Learning rate",
    ("optim", "scheduler"): "Schedule",
    ("optim", "max_grad_norm"): "Gradient clipping",
    ("train", "micro_batch_size"): "Micro-batch size",
    ("train", "gradient_accumulation_steps"): "Gradient accumulation",
    ("train", "max_steps"): "Max steps",
    ("train", "eval_steps"): "Evaluate every",
    ("train", "save_steps"): "Checkpoint every",
    ("train", "save_total_limit"): "Keep checkpoints",
    ("train", "logging_steps"): "Report every",
    ("output", "dir"): "Output folder",
}

NONE_TEXT = {
    ("train", "max_steps"): "from epochs", ("train", "eval_steps"): "at the end only",
    ("train", "save_steps"): "at the end only", ("train", "save_total_limit"): "keep all",
    ("train", "checkpoint_layers"): "all layers", ("train", "mlp_chunk_tokens"): "off",
}  # fmt: skip

CHOICE_TEXT = {
    ("train", "gradient_checkpointing"): {
        "auto": "auto: as few layers as the GPU needs",
        True: "every layer",
        False: "off",
    },
}

SUFFIX = {
    ("train", "checkpoint_layers"): " layers", ("train", "mlp_chunk_tokens"): " tokens",
    ("train", "eval_steps"): " steps", ("train", "save_steps"): " steps", ("train", "logging_steps"): " steps",
    ("optim", "warmup_steps"): " steps", ("data", "max_length"): " tokens",
    ("train", "gradient_accumulation_steps"): " micro-batches",
}  # fmt: skip


def label_for(section: str, name: str) -> str:
    return LABELS.get((section, name)) or name.replace("_", " ").capitalize()


def _is_optional(tp: Any) -> tuple[bool, Any]:
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1 and len(typing.get_args(tp)) == 2:
            return True, args[0]
    return False, tp


def _choices(tp: Any) -> list[Any] | None:
    """The values of a ``Literal`` type, or of ``bool | Literal[...]`` (its words first, then true
    and false); None for any other type."""
    if typing.get_origin(tp) is Literal:
        return list(typing.get_args(tp))
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        words = [a for a in args if typing.get_origin(a) is Literal]
        if len(words) == 1 and set(args) == {bool, words[0]}:
            return [*typing.get_args(words[0]), True, False]
    return None


def format_float(v: float) -> str:
    if v == 0:
        return "0"
    if abs(v) < 1e-3 or abs(v) >= 1e6:
        return f"{v:g}"
    return repr(float(v)) if float(v) != int(v) else f"{v:.1f}"


class FieldBinding(QObject):
    """One config field: its editor, its label and its error line, kept in sync with the model."""

    def __init__(self, model: ConfigModel, section: str, name: str, parent: QObject | None = None) -> None:
        super().__init__(parent)
        self.model = model
        self.section, self.name = section, name
        self.key = f"{section}.{name}"
        self.tp = field_type(section, name)
        self.optional, self.base = _is_optional(self.tp)
        self.help = field_help(section, name)
        self.label = QLabel(label_for(section, name), toolTip=self.help)
        self.error_label = note(name="fieldError")
        self.error_label.hide()
        self._local_error: str | None = None
        self._updating = False
        self.editor = self._make_editor()
        self.editor.setObjectName(f"field:{self.key}")
        self.editor.setToolTip(self.help)
        self.editor.setAccessibleName(label_for(section, name))
        self.label.setBuddy(self.editor)
        self._write(model.value(section, name))
        model.changed.connect(self._on_model_changed)
        model.errors_changed.connect(self._show_error)
        self._show_error()

    # -- editors ---------------------------------------------------------------------------
    def _make_editor(self) -> QWidget:
        base, key = self.base, (self.section, self.name)
        if base is bool:
            return QCheckBox(toggled=lambda on: self._commit(bool(on)))
        choices = _choices(base)
        if choices is not None:
            w = QComboBox()
            text = CHOICE_TEXT.get(key, {})
            for choice in choices:
                shown = text.get(choice, ("on" if choice else "off") if isinstance(choice, bool) else str(choice))
                w.addItem(shown, choice)
            w.currentIndexChanged.connect(lambda _i: self._commit(w.currentData()))
            return w
        if base is int:
            w = QSpinBox(minimum=0, maximum=2**31 - 1, accelerated=True, keyboardTracking=True)
            if self.optional:
                w.setSpecialValueText(NONE_TEXT.get(key, "none"))
            if key in SUFFIX:
                w.setSuffix(SUFFIX[key])
            w.valueChanged.connect(lambda v: self._commit(None if (self.optional and v == 0) else int(v)))
            return w
        w = QLineEdit(clearButtonEnabled=base is str, placeholderText="none" if self.optional else "")
        if base is float:
            w.setMaximumWidth(180)
        w.textEdited.connect(self._text_edited)
        return w

    def _text_edited(self, text: str) -> None:
        value, problem = self._parse(text)
        self._local_error = problem
        if problem is None:
            self._commit(value)
        self._show_error()

    def _parse(self, text: str) -> tuple[Any, str | None]:
        text = text.strip()
        if self.optional and text == "":
            return None, None
        if self.base is float:
            try:
                v = float(text)
            except ValueError:
                return None, f"{text!r} is not a number (write e.g. 0.0002 or 2e-4)"
            if math.isnan(v) or math.isinf(v):
                return None, "use a finite number"
            return v, None
        if self.base is str:
            return text, None
        try:  # lists and mappings as YAML flow text: [q_proj, v_proj] or {text: body}
            return yaml.safe_load(text) if text else ([] if typing.get_origin(self.base) is list else {}), None
        except yaml.YAMLError:
            return None, "not valid YAML flow text; write e.g. [q_proj, v_proj] or {text: body}"

    def _commit(self, value: Any) -> None:
        if self._updating:
            return
        self.model.set_value(self.section, self.name, value)

    def _write(self, value: Any) -> None:
        self._updating = True
        try:
            w = self.editor
            if isinstance(w, QCheckBox):
                w.setChecked(bool(value))
            elif isinstance(w, QComboBox):
                i = w.findData(value)
                if i < 0:
                    w.addItem(str(value), value)
                    i = w.count() - 1
                w.setCurrentIndex(i)
            elif isinstance(w, QSpinBox):
                w.setValue(0 if value is None else int(value))
            else:
                text = self._format(value)
                if self._parse(w.text())[0] != value or (value is None and w.text()):
                    w.setText(text)
        finally:
            self._updating = False

    def _format(self, value: Any) -> str:
        if value is None:
            return ""
        if isinstance(value, float):
            return format_float(value)
        if isinstance(value, (list, dict)):
            return yaml.safe_dump(value, default_flow_style=True, width=10_000).strip()
        return str(value)

    def _on_model_changed(self, section: str, name: str) -> None:
        if (section, name) in (("", ""), (self.section, self.name)):
            if section == "":
                self._local_error = None
            self._write(self.model.value(self.section, self.name))
            self._show_error()

    # -- errors ----------------------------------------------------------------------------
    @property
    def error(self) -> str | None:
        return self._local_error or self.model.error(self.section, self.name)

    def _show_error(self) -> None:
        msg = self.error
        invalid = msg is not None
        if self.editor.property("invalid") != invalid:
            restyle(self.editor, invalid=invalid)
        self.error_label.setText(msg or "")
        self.error_label.setVisible(invalid)
        self.editor.setToolTip(f"{msg}\n\n{self.help}" if msg else self.help)

    def focus(self) -> None:
        """Bring the field into view and put the cursor in it (used by 'go to the bad field')."""
        self.editor.setFocus(Qt.FocusReason.OtherFocusReason)


class FieldForm(QWidget):
    """A form of bound fields; ``bindings`` maps ``"section.name"`` to its binding."""

    def __init__(self, model: ConfigModel, fields: list[tuple[str, str]], parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.bindings: dict[str, FieldBinding] = {}
        self.form = QFormLayout(self)
        self.form.setFieldGrowthPolicy(QFormLayout.FieldGrowthPolicy.ExpandingFieldsGrow)
        self.form.setContentsMargins(0, 0, 0, 0)
        for section, name in fields:
            self.add(model, section, name)

    def add(self, model: ConfigModel, section: str, name: str, wrap: Any = None) -> FieldBinding:
        """Add a bound field; ``wrap(editor)`` may return a row holding the editor and extra buttons."""
        b = FieldBinding(model, section, name, self)
        self.bindings[b.key] = b
        self.form.addRow(b.label, with_error(wrap(b.editor) if wrap else b.editor, b.error_label))
        return b


def with_error(editor: QWidget, error_label: QLabel) -> QWidget:
    """The editor with its error line below it (hidden while the value is fine)."""
    return holder(vbox(editor, error_label, margins=0, spacing=2))


def debounce(parent: QObject, ms: int, fn: Any) -> QTimer:
    """A single-shot timer that calls ``fn`` ``ms`` after the last ``start()``."""
    return QTimer(parent, singleShot=True, interval=ms, timeout=fn)
