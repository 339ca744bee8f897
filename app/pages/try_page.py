"""Try view: one prompt, two answers side by side, from the base model and from the tuned model.

Both answers come from one model in memory, the run's base in 4 bit with its adapter
(``qlora_engine.generate.ChatModel``): the base answer is generated with the adapter disabled.
The answers stream in token by token, in turns. Loading and generating run in a worker on
its own ``QThread``; Cancel sets a flag the generation loop checks between tokens (the worker's
thread is busy in that loop, so a queued call could not reach it). The model stays loaded
between prompts and is dropped when another run is chosen or the page shuts down.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from PySide6.QtCore import Qt, Signal, Slot
from PySide6.QtGui import QKeySequence, QShortcut, QTextCursor
from PySide6.QtWidgets import (
    QCheckBox,
    QDoubleSpinBox,
    QFormLayout,
    QGroupBox,
    QHBoxLayout,
    QLabel,
    QLineEdit,
    QPlainTextEdit,
    QPushButton,
    QSpinBox,
    QSplitter,
    QVBoxLayout,
    QWidget,
)

from app.tasks import JobWorker, SignalSink, WorkerThread, import_ml_stack
from qlora_engine.events import Event, PhaseChanged
from qlora_engine.generate import CHAT_REPETITION_PENALTY, GenerationSettings

SIDES = {"base": "Base model (adapter off)", "tuned": "Tuned model (adapter on)"}
FINISH = {"eos": "ended by the model", "length": "stopped at the token limit", "cancelled": "cancelled"}


def has_adapter(path: Path | None) -> bool:
    """A run folder with its final adapter, or an adapter (or checkpoint) folder itself."""
    return path is not None and (
        (path / "adapter" / "adapter_config.json").is_file() or (path / "adapter_config.json").is_file()
    )


def setting_help(name: str) -> str:
    return next(f.metadata.get("help", "") for f in dataclasses.fields(GenerationSettings) if f.name == name)


class _StatusSink(SignalSink):
    """Turns the loader's phase events into status text for the page."""

    def emit(self, event: Event) -> None:
        text = {
            "resolving": "Finding the base model …",
            "converting": "Converting the GGUF base model once (cached afterwards) …",
            "loading_model": "Loading the model in 4 bit …",
        }.get(getattr(event, "phase", ""))
        if isinstance(event, PhaseChanged) and text:
            self._emit(text)


class TryWorker(JobWorker):
    """Lives on the try thread: loads a run's model once, answers prompts with it."""

    status = Signal(str)
    loaded = Signal(str)
    piece = Signal(str, str)
    finished = Signal(object)
    """``{'base': GenerationResult, 'tuned': GenerationResult}`` (one side only without comparison)."""

    def __init__(self) -> None:
        super().__init__()
        self.chat: Any = None
        self.source: str | None = None

    @Slot(str, object, object, bool)
    def answer(self, source: str, prompt: Any, settings: GenerationSettings, compare: bool) -> None:
        try:
            import_ml_stack()
            if self.chat is None or self.source != source:
                self.unload()
                from qlora_engine.generate import ChatModel

                self.status.emit("Loading the model …")
                self.chat = ChatModel.load(source, sink=_StatusSink(self.status.emit))
                self.source = source
                self.loaded.emit(f"{self.chat.info.config.model.ref} + adapter, on {self.chat.device}")
            stop = self.cancel.is_set
            if stop():
                self.finished.emit({})
                return
            self.status.emit("Generating …")
            if compare:
                results = self.chat.compare(prompt, settings, on_text=self.piece.emit, should_stop=stop)
            else:
                r = self.chat.generate(
                    prompt, settings, on_text=lambda t: self.piece.emit("tuned", t), should_stop=stop
                )
                results = {"tuned": r}
            self.finished.emit(results)
        except Exception as e:
            self.report_failure(e)

    @Slot()
    def unload(self) -> None:
        if self.chat is not None:
            self.chat.close()
        self.chat = None
        self.source = None


class TryPage(QWidget):
    """The playground. ``set_run(run_dir)`` chooses the run; ``shutdown()`` ends the worker thread."""

    _request = Signal(str, object, object, bool)
    _unload = Signal()
    answered = Signal(object)
    """Emitted when an answer (or a comparison) is complete, with the results."""

    def __init__(self, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.run_dir: Path | None = None
        self.busy = False
        self._jobs = WorkerThread("try-model", TryWorker, self._connect_worker)

        self.run_label = QLabel("Finish a run (or open one from the history) to try it.")
        self.run_label.setObjectName("hint")
        self.run_label.setWordWrap(True)
        self.prompt = QPlainTextEdit()
        self.prompt.setObjectName("tryPrompt")
        self.prompt.setPlaceholderText("Ask something the fine-tune should answer differently …  (Ctrl+Enter sends)")
        self.prompt.setMaximumHeight(110)
        self.system = QLineEdit()
        self.system.setPlaceholderText("optional system message")
        self.system.setToolTip(setting_help("system"))

        d = GenerationSettings()
        self.max_new_tokens = QSpinBox()
        self.max_new_tokens.setRange(1, 8192)
        self.max_new_tokens.setValue(d.max_new_tokens)
        self.temperature = QDoubleSpinBox()
        self.temperature.setRange(0.0, 5.0)
        self.temperature.setSingleStep(0.1)
        self.temperature.setValue(d.temperature)
        self.top_p = QDoubleSpinBox()
        self.top_p.setRange(0.01, 1.0)
        self.top_p.setSingleStep(0.05)
        self.top_p.setValue(d.top_p)
        self.repetition_penalty = QDoubleSpinBox()
        self.repetition_penalty.setRange(1.0, 2.0)
        self.repetition_penalty.setSingleStep(0.05)
        self.repetition_penalty.setValue(CHAT_REPETITION_PENALTY)
        self.seed = QSpinBox()
        self.seed.setRange(0, 2**31 - 1)
        self.seed.setValue(d.seed)
        self.raw = QCheckBox("Plain text (no chat template)")
        self.compare = QCheckBox("Compare with the base model")
        self.compare.setChecked(True)
        for w, name in (
            (self.max_new_tokens, "max_new_tokens"),
            (self.temperature, "temperature"),
            (self.top_p, "top_p"),
            (self.repetition_penalty, "repetition_penalty"),
            (self.seed, "seed"),
            (self.raw, "raw"),
        ):
            w.setToolTip(setting_help(name))
        self.compare.setToolTip("Generate the base model's answer too (same weights with the adapter off, same seed).")

        settings_box = QGroupBox("Settings")
        form = QFormLayout(settings_box)
        form.addRow("Max new tokens", self.max_new_tokens)
        form.addRow("Temperature", self.temperature)
        form.addRow("Top-p", self.top_p)
        form.addRow("Repetition penalty", self.repetition_penalty)
        form.addRow("Seed", self.seed)
        form.addRow("System", self.system)
        form.addRow(self.raw)
        form.addRow(self.compare)

        self.generate_button = QPushButton("Generate")
        self.generate_button.setObjectName("primary")
        self.generate_button.clicked.connect(self.generate)
        self.cancel_button = QPushButton("Cancel")
        self.cancel_button.clicked.connect(self.cancel)
        self.status = QLabel("")
        self.status.setObjectName("tryStatus")
        self.status.setWordWrap(True)
        buttons = QHBoxLayout()
        buttons.addWidget(self.generate_button)
        buttons.addWidget(self.cancel_button)
        buttons.addWidget(self.status, 1)
        QShortcut(QKeySequence("Ctrl+Return"), self.prompt, activated=self.generate)

        self.panes: dict[str, QPlainTextEdit] = {}
        self.footers: dict[str, QLabel] = {}
        answers = QSplitter(Qt.Orientation.Horizontal)
        for side, title in SIDES.items():
            box = QWidget()
            lay = QVBoxLayout(box)
            lay.setContentsMargins(0, 0, 0, 0)
            heading = QLabel(f"<b>{title}</b>")
            pane = QPlainTextEdit()
            pane.setReadOnly(True)
            pane.setObjectName(f"answer_{side}")
            footer = QLabel("")
            footer.setObjectName("hint")
            lay.addWidget(heading)
            lay.addWidget(pane, 1)
            lay.addWidget(footer)
            answers.addWidget(box)
            self.panes[side], self.footers[side] = pane, footer

        top = QHBoxLayout()
        left = QVBoxLayout()
        left.addWidget(QLabel("Prompt"))
        left.addWidget(self.prompt)
        left.addLayout(buttons)
        top.addLayout(left, 1)
        top.addWidget(settings_box)
        lay = QVBoxLayout(self)
        lay.setContentsMargins(0, 8, 0, 0)
        lay.addWidget(self.run_label)
        lay.addLayout(top)
        lay.addWidget(answers, 1)
        self._update_buttons()

    # -- the worker thread ----------------------------------------------------------------------

    @property
    def _worker(self) -> TryWorker | None:
        """The worker, once the first prompt has started its thread."""
        return self._jobs.worker

    def _connect_worker(self, worker: TryWorker) -> None:
        self._request.connect(worker.answer)
        self._unload.connect(worker.unload)
        worker.status.connect(self.status.setText)
        worker.loaded.connect(lambda text: self.run_label.setText(f"Model: {text}"))
        worker.piece.connect(self._on_piece)
        worker.finished.connect(self._on_finished)
        worker.failed.connect(self._on_failed)

    def shutdown(self, timeout_ms: int = 60_000) -> bool:
        """Cancel any answer, free the model, end the thread. True if it ended in time."""
        if self._worker is not None:
            self._unload.emit()  # queued: frees the model once the answer in progress has seen the cancel
        ended = self._jobs.stop(timeout_ms)
        self.busy = False
        return ended

    # -- actions ----------------------------------------------------------------------------------

    def set_run(self, run_dir: Path | None) -> None:
        new = Path(run_dir) if run_dir else None
        if new != self.run_dir and self._worker is not None and not self.busy:
            self._unload.emit()  # free the old run's model now; the new one loads on the first prompt
        self.run_dir = new
        usable = has_adapter(new)
        self.run_label.setText(
            f"Run: {new}  (the model loads on the first prompt)"
            if usable
            else "Finish a run (or open one from the history) to try it."
        )
        self._update_buttons()

    def settings(self) -> GenerationSettings:
        return GenerationSettings(
            max_new_tokens=self.max_new_tokens.value(),
            temperature=round(self.temperature.value(), 4),
            top_p=round(self.top_p.value(), 4),
            repetition_penalty=round(self.repetition_penalty.value(), 4),
            seed=self.seed.value(),
            system=self.system.text().strip() or None,
            raw=self.raw.isChecked(),
        )

    def generate(self) -> None:
        prompt = self.prompt.toPlainText().strip()
        if self.busy or not prompt or not self._has_adapter():
            return
        worker = self._jobs.ensure()
        worker.cancel.clear()
        for side in SIDES:
            self.panes[side].clear()
            self.footers[side].setText("")
        self.panes["base"].setPlaceholderText("" if self.compare.isChecked() else "(comparison off)")
        self.busy = True
        self.status.setText("Starting …")
        self._update_buttons()
        self._request.emit(str(self.run_dir), prompt, self.settings(), self.compare.isChecked())

    def cancel(self) -> None:
        if self._worker is not None and self.busy:
            self._worker.cancel.set()
            self.status.setText("Cancelling …")

    # -- results ----------------------------------------------------------------------------------

    def _on_piece(self, side: str, text: str) -> None:
        pane = self.panes[side]
        pane.moveCursor(QTextCursor.MoveOperation.End)
        pane.insertPlainText(text)

    def _on_finished(self, results: dict) -> None:
        self.busy = False
        for side, r in results.items():
            self.footers[side].setText(
                f"{len(r.token_ids)} tokens, {r.tokens_per_second:.1f} tok/s, {FINISH.get(r.finish_reason, r.finish_reason)}"
            )
        cancelled = any(r.finish_reason == "cancelled" for r in results.values()) or not results
        self.status.setText("Cancelled." if cancelled else "Done.")
        self._update_buttons()
        self.answered.emit(results)

    def _on_failed(self, message: str, hint: str, tb: str) -> None:
        self.busy = False
        self.status.setText(message + (f"\n{hint}" if hint else ""))
        if tb:
            self.status.setToolTip(tb)
        self._update_buttons()
        self.answered.emit({})

    def _has_adapter(self) -> bool:
        return has_adapter(self.run_dir)

    def _update_buttons(self) -> None:
        self.generate_button.setEnabled(not self.busy and self._has_adapter())
        self.cancel_button.setEnabled(self.busy)
