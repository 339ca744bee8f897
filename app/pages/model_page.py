"""Model page: choose the base model (folder, .gguf file or hub id) and see what it is.

The facts come from ``qlora_engine.models.inspect_model``, which reads config and tokenizer
files only; the window's inspecting child runs it (it imports torch, the window does not).
"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

from PySide6.QtCore import Signal
from PySide6.QtWidgets import QFileDialog, QFormLayout, QFrame, QLabel, QPushButton, QWidget

from app.config_model import ConfigModel
from app.fields import debounce
from app.inspector import Inspector
from app.pages.base import Page
from app.theme import hbox, holder, note, restyle, row
from qlora_engine.errors import QLoRAError


def fmt_count(n: int | None) -> str:
    if not n:
        return "-"
    for div, unit in ((1e9, "B"), (1e6, "M"), (1e3, "K")):
        if n >= div:
            return f"{n / div:.3g}{unit}"
    return str(n)


class ModelPage(Page):
    title = "1  Model"
    subtitle = (
        "The base model stays frozen in 4-bit NF4; only small LoRA adapters are trained on top of it. "
        "Choose a local Hugging Face folder, a .gguf file, or type a hub id such as HuggingFaceTB/SmolLM2-135M-Instruct."
    )

    info_changed = Signal(object)
    """The inspected ``ModelInfo`` (None while none is known)."""
    demo_requested = Signal()

    FACTS = [
        ("architecture", "Architecture"), ("model_type", "Model type"), ("num_parameters", "Parameters"),
        ("num_layers", "Layers"), ("hidden_size", "Hidden size"), ("vocab_size", "Vocabulary"),
        ("heads", "Attention heads"), ("has_chat_template", "Chat template"), ("weights_format", "Weights"),
        ("linear_modules", "Linear layers"),
    ]  # fmt: skip

    def __init__(self, model: ConfigModel, tasks: Inspector, parent: QWidget | None = None) -> None:
        super().__init__(model, parent)
        self.tasks = tasks
        self.info = None
        self.error: QLoRAError | None = None
        """The engine's error about the model chosen now (Start refuses while there is one)."""
        self._inspected_key: tuple | None = None

        self.demo_banner = QFrame(objectName="banner")
        self.demo_label = QLabel(
            "<b>Quick start</b>: fine-tune the small SmolLM2-135M-Instruct demo model on sample data "
            "(a few minutes, even on a CPU).",
            wordWrap=True,
        )
        self.demo_button = QPushButton("Start the demo", objectName="primary")
        self.demo_button.clicked.connect(self.demo_requested)  # a signal: not a keyword argument
        hbox((self.demo_label, 1), self.demo_button, parent=self.demo_banner)
        self.demo_banner.hide()
        self.body.addWidget(self.demo_banner)

        _box, form = self.group("Base model")
        self.browse_folder = QPushButton("Folder…", clicked=self._pick_folder)
        self.browse_gguf = QPushButton("GGUF file…", clicked=self._pick_gguf)
        self.ref = self.add_binding(
            form, "model", "ref", wrap=lambda editor: row(editor, self.browse_folder, self.browse_gguf)
        )
        self.ref.editor.setPlaceholderText("folder, .gguf file or hub id")
        for name in ("revision", "trust_remote_code", "attn_implementation"):
            self.add_binding(form, "model", name)

        box, _ = self.group("About this model")
        facts = QFormLayout()
        self.status = note("Choose a model to see its facts.")
        box.layout().addWidget(self.status)
        self.fact_labels: dict[str, QLabel] = {}
        for key, label in self.FACTS:
            value = note("-", f"fact:{key}")
            self.fact_labels[key] = value
            facts.addRow(label, value)
        self.problems = note(name="fieldError")
        self.problems.hide()
        box.layout().addWidget(holder(facts))
        box.layout().addWidget(self.problems)

        self.group("Quantization of the frozen base", "quant.quant_type quant.double_quant quant.compute_dtype")
        self.finish()

        self._inspect_timer = debounce(self, 400, self.inspect_now)
        model.changed.connect(self._on_changed)
        tasks.finished.connect(self._on_result)
        tasks.failed.connect(self._on_failed)

    # -- the demo --------------------------------------------------------------------------
    def set_demo_available(self, path: Path | None) -> None:
        self.demo_banner.setVisible(path is not None)
        if path is not None:
            self.demo_button.setToolTip(str(path))

    # -- picking ---------------------------------------------------------------------------
    def _start_dir(self) -> str:
        ref = self.model.value("model", "ref")
        if ref and Path(ref).expanduser().exists():
            return str(Path(ref).expanduser().parent)
        return str(self.model.base_dir or Path.home())

    def _pick_folder(self) -> None:
        folder = QFileDialog.getExistingDirectory(self, "Choose a Hugging Face model folder", self._start_dir())
        if folder:
            self.model.set_value("model", "ref", folder)

    def _pick_gguf(self) -> None:
        path, _ = QFileDialog.getOpenFileName(
            self, "Choose a GGUF model file", self._start_dir(), "GGUF models (*.gguf)"
        )
        if path:
            self.model.set_value("model", "ref", path)

    # -- inspection ------------------------------------------------------------------------
    def _key(self) -> tuple:
        ref, trust, revision = (self.model.value("model", n) for n in ("ref", "trust_remote_code", "revision"))
        return ref.strip(), bool(trust), revision

    def _on_changed(self, section: str, name: str) -> None:
        relevant = section == "" or (section == "model" and name in ("ref", "trust_remote_code", "revision"))
        if relevant and self._key() != self._inspected_key:
            self.error = None  # it was about the model before this change
            self._inspect_timer.start()

    def inspect_now(self) -> None:
        key = self._key()
        ref, trust, revision = key
        self._inspected_key = key
        if not ref:
            self.tasks.cancel("model")
            self._show(None, "Choose a model to see its facts.")
            return
        resolved = str(self.model.config.resolve(ref)) if self.model.config.resolve(ref).exists() else ref
        self.status.setText(f"Reading {ref} …")
        self.tasks.submit("model", {"kind": "model", "ref": resolved, "trust_remote_code": trust, "revision": revision})

    def _on_result(self, key: str, info: object) -> None:
        if key == "model":  # the engine's ModelInfo as plain data: read by attribute, as the dataclass
            self._show(SimpleNamespace(**info), "")

    def _on_failed(self, key: str, exc: Exception, _tb: str) -> None:
        if key != "model":
            return
        msg = str(exc)
        hint = getattr(exc, "hint", None)
        self._show(None, msg + (f"\n{hint}" if hint else ""), error=True)
        self.error = exc if isinstance(exc, QLoRAError) else None

    def _show(self, info, status: str, error: bool = False) -> None:
        self.info = info
        self.status.setText(status)
        self.status.setObjectName("fieldError" if error else "hint")
        restyle(self.status)
        self.status.setVisible(bool(status))
        values: dict[str, str] = {}
        if info is not None:
            heads = f"{info.num_attention_heads or '-'}"
            if info.num_key_value_heads and info.num_key_value_heads != info.num_attention_heads:
                heads += f" (key/value: {info.num_key_value_heads})"
            values = {
                "architecture": info.architecture,
                "model_type": info.model_type,
                "num_parameters": f"{fmt_count(info.num_parameters)} ({info.num_parameters:,})",
                "num_layers": str(info.num_layers),
                "hidden_size": str(info.hidden_size),
                "vocab_size": f"{info.vocab_size:,}",
                "heads": heads,
                "has_chat_template": "yes" if info.has_chat_template else "no (ChatML is used for chat data)",
                "weights_format": info.weights_format,
                "linear_modules": ", ".join(info.linear_modules) or "-",
            }
        for key, label in self.fact_labels.items():
            label.setText(values.get(key, "-"))
        problems = list(info.problems) if info is not None else []
        self.problems.setText("\n".join(f"• {p}" for p in problems))
        self.problems.setVisible(bool(problems))
        self.info_changed.emit(info)
