"""Adapter page: LoRA rank, alpha, dropout, which linear layers and which blocks get adapters.

The target modules are check boxes built from the model's own linear layer names (from
``inspect_model``), with the presets attention / MLP / all linear; the layer range is a
pair of spin boxes bounded by the model's layer count. Both write the same config fields the
YAML has (``lora.target_modules``, ``lora.layers``), shown as text below for the record.
"""

from __future__ import annotations

from PySide6.QtWidgets import QCheckBox, QGridLayout, QLabel, QPushButton, QSpinBox, QWidget

from app.config_model import ConfigModel
from app.pages.base import Page
from app.theme import hbox, holder, note
from qlora_engine.config import ConfigError, parse_layers

PRESETS = [("attention", "Attention"), ("mlp", "MLP"), ("all-linear", "All linear")]


class AdapterPage(Page):
    title = "3  Adapter"
    subtitle = (
        "LoRA trains two small matrices beside each chosen linear layer. A higher rank learns more and uses more "
        "memory; adapting all linear layers gives the best quality for its size."
    )

    def __init__(self, model: ConfigModel, parent: QWidget | None = None) -> None:
        super().__init__(model, parent)
        self.info = None
        self._syncing = False
        self.group("LoRA", "lora.rank lora.alpha lora.dropout lora.use_rslora lora.use_dora")

        box, form = self.group("Target modules")
        self.preset_buttons: dict[str, QPushButton] = {}
        for key, text in PRESETS:
            b = QPushButton(text, checkable=True, objectName=f"preset:{key}")
            b.clicked.connect(lambda _on=False, k=key: self.model.set_value("lora", "target_modules", [k]))
            self.preset_buttons[key] = b
        box.layout().insertWidget(0, holder(hbox("Presets:", *self.preset_buttons.values(), 1)))
        self.modules_hint = note(
            "Choose a model on the Model page to list its linear layers; the presets work without it."
        )
        box.layout().insertWidget(1, self.modules_hint)
        self.module_grid = QGridLayout()
        box.layout().insertWidget(2, holder(self.module_grid))
        self.module_boxes: dict[str, QCheckBox] = {}
        self.targets = self.add_binding(form, "lora", "target_modules")

        box, form = self.group("Layers")
        self.all_layers = QCheckBox("All layers", objectName="allLayers")
        self.layer_from = QSpinBox(objectName="layerFrom", maximum=999)
        self.layer_to = QSpinBox(objectName="layerTo", maximum=999)
        self.layer_count = QLabel("", objectName="hint")
        range_row = hbox(self.all_layers, "from", self.layer_from, "to", self.layer_to, self.layer_count, 1)
        range_row.insertSpacing(1, 16)
        box.layout().insertWidget(0, holder(range_row))
        self.layers = self.add_binding(form, "lora", "layers")
        self.layers.editor.setPlaceholderText("all layers (or e.g. 0-11, or 0,2,4-7)")
        self.layer_warning = note(name="fieldError")
        self.layer_warning.hide()
        box.layout().addWidget(self.layer_warning)
        self.all_layers.toggled.connect(self._range_edited)
        self.layer_from.valueChanged.connect(self._range_edited)
        self.layer_to.valueChanged.connect(self._range_edited)
        self.finish()

        model.changed.connect(self._on_changed)
        self._sync_modules()
        self._sync_layers()

    # -- model facts -----------------------------------------------------------------------
    def set_model_info(self, info) -> None:
        self.info = info
        for b in self.module_boxes.values():
            b.deleteLater()
        self.module_boxes = {}
        names = list(info.linear_modules) if info is not None else []
        for i, name in enumerate(names):
            b = QCheckBox(name, objectName=f"module:{name}")
            kind = "attention" if name in info.attention_modules else "MLP" if name in info.mlp_modules else "other"
            b.setToolTip(f"{name} ({kind}) in each of the {info.num_layers} layers")
            b.toggled.connect(self._boxes_edited)
            self.module_boxes[name] = b
            self.module_grid.addWidget(b, i // 4, i % 4)
        self.modules_hint.setVisible(not names)
        n = info.num_layers if info is not None and info.num_layers else 0
        for s in (self.layer_from, self.layer_to):
            s.setRange(0, max(n - 1, 0) if n else 999)
        self.layer_count.setText(f"of {n} layers (0-{n - 1})" if n else "")
        self._sync_modules()
        self._sync_layers()

    def _modules_of(self, preset: str) -> list[str]:
        info = self.info
        if info is None:
            return []
        return {"attention": info.attention_modules, "mlp": info.mlp_modules, "all-linear": info.linear_modules}[preset]

    # -- target modules --------------------------------------------------------------------
    def _on_changed(self, section: str, name: str) -> None:
        if section == "" or (section, name) == ("lora", "target_modules"):
            self._sync_modules()
        if section == "" or (section, name) == ("lora", "layers"):
            self._sync_layers()

    def _sync_modules(self) -> None:
        value = self.model.value("lora", "target_modules") or []
        preset = value[0] if len(value) == 1 and value[0] in dict(PRESETS) else None
        for key, b in self.preset_buttons.items():
            b.setChecked(key == preset)
        chosen = set(self._modules_of(preset)) if preset else set(value)
        self._syncing = True
        try:
            for name, b in self.module_boxes.items():
                b.setChecked(name in chosen)
        finally:
            self._syncing = False
        unknown = [] if preset or self.info is None else [m for m in value if m not in self.module_boxes]
        if unknown:
            text = f"Not in this model: {', '.join(unknown)}. Its linear layers are: {', '.join(self.module_boxes)}."
        else:
            text = "Choose a model on the Model page to list its linear layers; the presets work without it."
        self.modules_hint.setText(text)
        self.modules_hint.setObjectName("fieldError" if unknown else "hint")
        self.modules_hint.style().polish(self.modules_hint)
        self.modules_hint.setVisible(bool(unknown) or not self.module_boxes)

    def _boxes_edited(self) -> None:
        if self._syncing:
            return
        chosen = [n for n, b in self.module_boxes.items() if b.isChecked()]
        value = chosen
        for key, _ in reversed(PRESETS):  # the widest preset that matches exactly
            names = self._modules_of(key)
            if names and set(chosen) == set(names):
                value = [key]
                break
        self.model.set_value("lora", "target_modules", value)

    # -- layers ----------------------------------------------------------------------------
    def _sync_layers(self) -> None:
        spec = self.model.value("lora", "layers")
        try:
            layers, spec_ok = parse_layers(spec), True
        except ConfigError:
            layers, spec_ok = None, False
        self._syncing = True
        try:
            self.all_layers.setChecked(spec is None)
            if layers:
                self.layer_from.setValue(min(layers))
                self.layer_to.setValue(max(layers))
            elif spec is None:
                self.layer_from.setValue(0)
                self.layer_to.setValue(self.layer_to.maximum() if self.info is not None else 0)
            contiguous = bool(layers) and layers == list(range(min(layers), max(layers) + 1))
            self.layer_from.setEnabled(contiguous)
            self.layer_to.setEnabled(contiguous)
        finally:
            self._syncing = False
        n = self.info.num_layers if self.info is not None else 0
        out = [i for i in (layers or []) if n and i >= n] if spec_ok else []
        self.layer_warning.setText(
            f"This model has {n} layers (0-{n - 1}); layer {out[0]} does not exist." if out else ""
        )
        self.layer_warning.setVisible(bool(out))

    def _range_edited(self) -> None:
        if self._syncing:
            return
        if self.all_layers.isChecked():
            value = None
        else:
            lo, hi = sorted((self.layer_from.value(), self.layer_to.value()))
            value = f"{lo}-{hi}"
        self.model.set_value("lora", "layers", value)
