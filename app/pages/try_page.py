"""Try view: a conversation with the tuned model, and the base model's answers beside it.

The model runs in a child process (``qlora-engine chat RUN --serve --events -``, see
:mod:`qlora_engine.chat_server`), held by one :class:`~app.run_worker.EngineJob`: the window
never imports torch, and a model that runs out of memory cannot take the window down. The
child loads the run's base in 4 bit with its adapter once; each message goes to it as one
JSON line, and the answers stream back as events. The base side is the same weights with the
adapter off. Each side keeps its own conversation (the model's chat template, the system
prompt, the usual generation settings), so a multi-turn chat shows how the two differ.
Cancel is a ``cancel`` line the child checks between tokens; choosing another run ends the
child and forgets the conversation.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from PySide6.QtCore import Qt, Signal
from PySide6.QtGui import QKeySequence, QShortcut, QTextCursor
from PySide6.QtWidgets import (
    QCheckBox,
    QDoubleSpinBox,
    QFormLayout,
    QGroupBox,
    QLabel,
    QLineEdit,
    QPlainTextEdit,
    QPushButton,
    QSpinBox,
    QSplitter,
    QWidget,
)

from app.run_worker import EngineJob, engine_argv, engine_env
from app.theme import hbox, holder, note, vbox
from qlora_engine.chat_server import request_line
from qlora_engine.events import AnswerDone, AnswerPiece, ChatReady, Event, PhaseChanged, RunFailed
from qlora_engine.generate import CHAT_REPETITION_PENALTY, GenerationSettings

SIDES = {"base": "Base model (adapter off)", "tuned": "Tuned model (adapter on)"}
FINISH = {"eos": "ended by the model", "length": "stopped at the token limit", "cancelled": "cancelled"}
LOADING = {
    "resolving": "Finding the base model …",
    "converting": "Converting the GGUF base model once (cached afterwards) …",
    "loading_model": "Loading the model in 4 bit …",
}
QUIT_WAIT_MS = 10_000
"""How long shutting down waits for the child to leave on ``quit`` before ending it."""


def has_adapter(path: Path | None) -> bool:
    """A run folder with its final adapter, or an adapter (or checkpoint) folder itself."""
    return path is not None and (
        (path / "adapter" / "adapter_config.json").is_file() or (path / "adapter_config.json").is_file()
    )


def setting_help(name: str) -> str:
    return next(f.metadata.get("help", "") for f in dataclasses.fields(GenerationSettings) if f.name == name)


class TryPage(QWidget):
    """The playground. ``set_run(run_dir)`` chooses the run; ``shutdown()`` ends the model's process."""

    answered = Signal(object)
    """A message is answered (or cancelled, or failed): ``{side: AnswerDone}`` ({} on a failure)."""

    def __init__(self, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.run_dir: Path | None = None
        self.busy = False
        self.job: EngineJob | None = None
        self.job_run: Path | None = None
        self.conversation: dict[str, list[dict[str, str]]] = {side: [] for side in SIDES}
        self._request = 0
        self._waiting: set[str] = set()
        self._results: dict[str, AnswerDone] = {}

        self.run_label = note("Finish a run (or open one from the history) to try it.")
        placeholder = "Write a message …  (Ctrl+Enter sends; the conversation goes on)"
        self.prompt = QPlainTextEdit(objectName="tryPrompt", placeholderText=placeholder, maximumHeight=110)
        self.system = QLineEdit(placeholderText="optional system prompt", toolTip=setting_help("system"))

        d = dataclasses.replace(GenerationSettings(), repetition_penalty=CHAT_REPETITION_PENALTY)
        settings_box = QGroupBox("Settings")
        form = QFormLayout(settings_box)

        def number(name: str, label: str, low: float, high: float, step: float | None = None) -> QSpinBox | QDoubleSpinBox:
            """A spin box for a generation setting (whole numbers without ``step``), its row in the form."""
            box = QSpinBox() if step is None else QDoubleSpinBox()
            box.setRange(low, high)
            if step is not None:
                box.setSingleStep(step)
            box.setValue(getattr(d, name))
            box.setToolTip(setting_help(name))
            form.addRow(label, box)
            return box

        self.max_new_tokens = number("max_new_tokens", "Max new tokens", 1, 8192)
        self.temperature = number("temperature", "Temperature", 0.0, 5.0, 0.1)
        self.top_p = number("top_p", "Top-p", 0.01, 1.0, 0.05)
        self.repetition_penalty = number("repetition_penalty", "Repetition penalty", 1.0, 2.0, 0.05)
        self.seed = number("seed", "Seed", 0, 2**31 - 1)
        form.addRow("System", self.system)
        self.raw = QCheckBox("Plain text (no chat template)", toolTip=setting_help("raw"))
        self.compare = QCheckBox("Compare with the base model", checked=True)
        self.compare.toggled.connect(self.new_conversation)  # two sides must have heard the same turns
        self.compare.setToolTip("Answer with the base model too (same weights with the adapter off, same seed).")
        form.addRow(self.raw)
        form.addRow(self.compare)

        self.generate_button = QPushButton("Send", objectName="primary", clicked=self.generate)
        self.cancel_button = QPushButton("Cancel", clicked=self.cancel)
        self.reset_button = QPushButton("New conversation", clicked=self.new_conversation)
        self.status = note(name="tryStatus")
        buttons = hbox(self.generate_button, self.cancel_button, self.reset_button, (self.status, 1))
        QShortcut(QKeySequence("Ctrl+Return"), self.prompt, activated=self.generate)

        self.panes: dict[str, QPlainTextEdit] = {}
        self.footers: dict[str, QLabel] = {}
        answers = QSplitter(Qt.Orientation.Horizontal)
        for side, title in SIDES.items():
            pane = QPlainTextEdit(readOnly=True, objectName=f"answer_{side}")
            footer = QLabel("", objectName="hint")
            answers.addWidget(holder(vbox(f"<b>{title}</b>", (pane, 1), footer, margins=0)))
            self.panes[side], self.footers[side] = pane, footer

        top = hbox((vbox("Message", self.prompt, buttons), 1), settings_box)
        vbox(self.run_label, top, (answers, 1), parent=self, margins=(0, 8, 0, 0))
        self._update_buttons()

    # -- the run --------------------------------------------------------------------------------

    def set_run(self, run_dir: Path | None) -> None:
        new = Path(run_dir) if run_dir else None
        if new != self.run_dir:  # another run: its model, its conversation
            self.shutdown()
            self.new_conversation()
            self.status.clear()
        self.run_dir = new
        self.run_label.setText(
            f"Run: {new}  (the model loads on the first message)"
            if has_adapter(new)
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

    def sides(self) -> list[str]:
        return ["base", "tuned"] if self.compare.isChecked() else ["tuned"]

    # -- actions ----------------------------------------------------------------------------------

    def generate(self) -> None:
        """Send the message to each side's conversation; the answers stream into the panes."""
        text = self.prompt.toPlainText().strip()
        if self.busy or not text or not has_adapter(self.run_dir):
            return
        job = self._ensure_job()
        self._request += 1
        self._waiting = set(self.sides())
        self._results = {}
        for side in self._waiting:
            self.conversation[side].append({"role": "user", "content": text})
            self._write(side, ("\n\n" if self.panes[side].toPlainText() else "") + f"You: {text}\n\nModel: ")
            self.footers[side].clear()
        self.panes["base"].setPlaceholderText("" if self.compare.isChecked() else "(comparison off)")
        self.prompt.clear()
        self.busy = True
        self.status.setText("Starting …" if self.job_run is None else "Generating …")
        self._update_buttons()
        sides = {side: list(self.conversation[side]) for side in self._waiting}
        job.send(request_line(self._request, sides, dataclasses.asdict(self.settings())))

    def cancel(self) -> None:
        if self.job is not None and self.busy:
            self.job.send("cancel")
            self.status.setText("Cancelling …")

    def new_conversation(self) -> None:
        """Forget both conversations (the model stays loaded)."""
        if self.busy:
            return
        self.conversation = {side: [] for side in SIDES}
        for side in SIDES:
            self.panes[side].clear()
            self.footers[side].clear()

    def shutdown(self, timeout_ms: int = QUIT_WAIT_MS) -> bool:
        """End the model's process: ``quit``, then ended if it does not leave in time. True if it is gone."""
        job, self.job, self.job_run = self.job, None, None
        self.busy = False
        self._update_buttons()
        if job is None:
            return True
        job.event.disconnect(self._on_event)
        job.finished.disconnect(self._on_exit)
        job.send("cancel")
        job.send("quit")
        if not job.wait(timeout_ms):
            job.abort()
            job.wait(timeout_ms)
        return not job.running

    # -- the child --------------------------------------------------------------------------------

    def _ensure_job(self) -> EngineJob:
        if self.job is None:
            cmd = engine_argv("chat", str(self.run_dir), "--serve", "--events", "-")
            self.job = EngineJob(cmd, env=engine_env(), parent=self)
            self.job.event.connect(self._on_event)
            self.job.finished.connect(self._on_exit)
            self.job.start()
        return self.job

    def _on_event(self, e: Event) -> None:
        if isinstance(e, PhaseChanged) and e.phase in LOADING:
            self.status.setText(LOADING[e.phase])
        elif isinstance(e, ChatReady):
            self.job_run = self.run_dir
            self.run_label.setText(f"Model: {e.model} + adapter, on {e.device}")
            if self.busy:
                self.status.setText("Generating …")
        elif isinstance(e, AnswerPiece) and e.request == self._request:
            self._write(e.side, e.text)
        elif isinstance(e, AnswerDone) and e.request == self._request:
            self._on_answer(e)
        elif isinstance(e, RunFailed):  # the model could not be loaded: the engine's own message
            self._fail(e.message + (f"\n{e.hint}" if e.hint else ""), e.traceback)

    def _on_answer(self, e: AnswerDone) -> None:
        self._results[e.side] = e
        self.conversation[e.side].append({"role": "assistant", "content": e.text})
        self.footers[e.side].setText(
            f"{e.tokens} tokens, {e.tokens_per_second:.1f} tok/s, {FINISH.get(e.finish_reason, e.finish_reason)}"
        )
        self._waiting.discard(e.side)
        if self._waiting:
            return
        self.busy = False
        cancelled = any(r.finish_reason == "cancelled" for r in self._results.values())
        self.status.setText("Cancelled." if cancelled else "Done.")
        self._update_buttons()
        self.answered.emit(dict(self._results))

    def _on_exit(self, code: int, stderr_tail: str) -> None:
        """The child left on its own: a crash, or the end after a ``run_failed`` already shown."""
        job, self.job, self.job_run = self.job, None, None
        if job is not None:
            job.deleteLater()
        if self.busy:
            self._fail(f"The model's process ended (exit code {code}).", stderr_tail)

    def _fail(self, message: str, details: str) -> None:
        for side in self._waiting:  # the unanswered message is not part of the conversation
            if self.conversation[side] and self.conversation[side][-1]["role"] == "user":
                self.conversation[side].pop()
        self._waiting = set()
        self.busy = False
        self.status.setText(message)
        self.status.setToolTip(details or "")
        self._update_buttons()
        self.answered.emit({})

    def _write(self, side: str, text: str) -> None:
        pane = self.panes[side]
        pane.moveCursor(QTextCursor.MoveOperation.End)
        pane.insertPlainText(text)

    def _update_buttons(self) -> None:
        ready = has_adapter(self.run_dir)
        self.generate_button.setEnabled(not self.busy and ready)
        self.cancel_button.setEnabled(self.busy)
        self.reset_button.setEnabled(not self.busy)
