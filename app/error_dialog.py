"""The one dialog for a failed run: the message for the user, a copyable traceback, the log's path."""

from __future__ import annotations

from pathlib import Path

from PySide6.QtCore import QUrl
from PySide6.QtGui import QDesktopServices, QGuiApplication
from PySide6.QtWidgets import (
    QDialog,
    QDialogButtonBox,
    QLabel,
    QPlainTextEdit,
    QPushButton,
    QVBoxLayout,
    QWidget,
)

from qlora_engine.events import RunFailed


class RunErrorDialog(QDialog):
    def __init__(
        self, failure: RunFailed, log_path: str | None = None, run_dir: str | None = None, parent: QWidget | None = None
    ) -> None:
        super().__init__(parent)
        self.setObjectName("runErrorDialog")
        self.setWindowTitle("The run failed")
        self.failure = failure
        self.resize(720, 480)

        headline = QLabel(f"<b>{_escape(failure.message)}</b>")
        headline.setObjectName("errorMessage")
        headline.setWordWrap(True)
        headline.setTextFormat(headline.textFormat().RichText)
        lay = QVBoxLayout(self)
        lay.addWidget(headline)
        if failure.hint:
            hint = QLabel(failure.hint)
            hint.setObjectName("errorHint")
            hint.setWordWrap(True)
            lay.addWidget(hint)
        facts = []
        if failure.step:
            facts.append(f"Step reached: {failure.step}")
        if failure.last_checkpoint:
            facts.append(f"Last checkpoint (resume from it in the history): {failure.last_checkpoint}")
        if run_dir:
            facts.append(f"Events of the run: {Path(run_dir) / 'events.jsonl'}")
        if log_path:
            facts.append(f"Engine log: {log_path}")
        self.facts = QLabel("\n".join(facts))
        self.facts.setObjectName("errorFacts")
        self.facts.setWordWrap(True)
        self.facts.setTextInteractionFlags(self.facts.textInteractionFlags().TextSelectableByMouse)
        lay.addWidget(self.facts)

        lay.addWidget(QLabel(f"Details ({failure.error_type}):"))
        self.traceback = QPlainTextEdit(failure.traceback or "(no traceback)")
        self.traceback.setObjectName("errorTraceback")
        self.traceback.setReadOnly(True)
        self.traceback.setLineWrapMode(QPlainTextEdit.LineWrapMode.NoWrap)
        lay.addWidget(self.traceback, 1)

        buttons = QDialogButtonBox(QDialogButtonBox.StandardButton.Close)
        self.copy_button = QPushButton("Copy details")
        self.copy_button.clicked.connect(self.copy_details)
        buttons.addButton(self.copy_button, QDialogButtonBox.ButtonRole.ActionRole)
        folder = Path(log_path).parent if log_path else (Path(run_dir) if run_dir else None)
        if folder is not None:
            open_button = QPushButton("Open log folder")
            open_button.clicked.connect(lambda: QDesktopServices.openUrl(QUrl.fromLocalFile(str(folder))))
            buttons.addButton(open_button, QDialogButtonBox.ButtonRole.ActionRole)
        buttons.rejected.connect(self.reject)
        buttons.accepted.connect(self.accept)
        lay.addWidget(buttons)

    def details_text(self) -> str:
        f = self.failure
        parts = [f"{f.error_type}: {f.message}"]
        if f.hint:
            parts.append(f"Hint: {f.hint}")
        parts.append(self.facts.text())
        parts.append(f.traceback or "")
        return "\n\n".join(p for p in parts if p)

    def copy_details(self) -> None:
        QGuiApplication.clipboard().setText(self.details_text())


def _escape(text: str) -> str:
    import html

    return html.escape(text).replace("\n", "<br>")
