"""Training page: optimizer and schedule, length of the run, batch shape, checkpoints, output folder."""

from __future__ import annotations

from pathlib import Path

from PySide6.QtWidgets import QFileDialog, QPushButton, QWidget

from app.config_model import ConfigModel
from app.pages.base import Page
from app.theme import note, row


class TrainingPage(Page):
    title = "4  Training"
    subtitle = (
        "The defaults are a sound first run: paged 8-bit AdamW at 2e-4 with cosine decay. The budget panel shows "
        "what the batch shape and the sequence length cost in memory."
    )

    def __init__(self, model: ConfigModel, parent: QWidget | None = None) -> None:
        super().__init__(model, parent)
        self.group(
            "Optimizer and schedule",
            "optim.optimizer optim.learning_rate optim.scheduler optim.warmup_steps optim.weight_decay "
            "optim.max_grad_norm",
        )
        self.group("Length", "train.epochs train.max_steps")
        box, form = self.group(
            "Batch and memory",
            "train.micro_batch_size train.gradient_accumulation_steps data.max_length data.packing "
            "train.gradient_checkpointing train.checkpoint_layers train.offload_activations train.mlp_chunk_tokens",
        )
        self.effective = note()  # long with big numbers: it must not widen the page past a small screen
        box.layout().addWidget(self.effective)
        self.group("Speed", "train.kernels train.fast_lora train.keep_dequantized train.compile")
        self.group(
            "Evaluation, checkpoints and reproducibility",
            "train.eval_steps train.save_steps train.save_total_limit train.logging_steps train.seed train.device",
        )
        _box, form = self.group("Output")
        self.browse = QPushButton("Browse…", clicked=self._pick_output)
        self.add_binding(form, "output", "dir", wrap=lambda editor: row(editor, self.browse))
        self.where = note()
        _box.layout().addWidget(self.where)
        advanced = "optim.adam_beta1 optim.adam_beta2 optim.adam_epsilon"
        self.advanced, _ = self.group("Advanced optimizer settings", advanced)
        self.advanced.setCheckable(True)
        self.advanced.setChecked(False)
        self._toggle_advanced(False)
        self.advanced.toggled.connect(self._toggle_advanced)
        self.finish()
        model.changed.connect(self._update_notes)
        model.changed.connect(self._checkpointing_changed)
        self._update_notes()

    def _checkpointing_changed(self, section: str, name: str) -> None:
        """A layer count is kept only with "every layer"; auto chooses its own (the config refuses both)."""
        mine = self.model.value("train", "gradient_checkpointing") is True
        if (section, name) == ("train", "gradient_checkpointing") and not mine and self.model.value("train", "checkpoint_layers"):
            self.model.set_value("train", "checkpoint_layers", None)

    def add_other_settings(self, fields: list[tuple[str, str]]) -> None:
        """Fields no page places by hand (new engine settings): bound generically, never hidden."""
        if not fields:
            return
        box, _form = self.group("Other settings", " ".join(f"{section}.{name}" for section, name in fields))
        self.body.removeWidget(box)
        self.body.insertWidget(self.body.count() - 1, box)  # above the closing stretch

    def _toggle_advanced(self, on: bool) -> None:
        for child in self.advanced.findChildren(QWidget):
            child.setVisible(on)

    def _update_notes(self, *_args) -> None:
        cfg = self.model.config
        mb, ga = cfg.train.micro_batch_size, cfg.train.gradient_accumulation_steps
        self.effective.setText(
            f"Effective batch: {mb} × {ga} = {mb * ga} sequences of up to {cfg.data.max_length} tokens per optimizer step."
        )
        self.where.setText(f"The run's files go to {cfg.output_dir}")
        # The layer count is the user's choice only with "every layer"; auto chooses it, off needs none.
        layers = self.bindings["train.checkpoint_layers"]
        mine = self.model.value("train", "gradient_checkpointing") is True
        layers.editor.setEnabled(mine)
        layers.label.setEnabled(mine)

    def _pick_output(self) -> None:
        start = str(self.model.config.output_dir.parent)
        folder = QFileDialog.getExistingDirectory(self, "Choose the run folder", start)
        if folder:
            self.model.set_value("output", "dir", str(Path(folder)))
