"""The one dialog for a failed run: the message for the user, a copyable traceback, the log's path.

A run that ran out of GPU memory also lists the budget's fixes, each with a button that
applies it: "Apply and resume from step N" when the run's checkpoint fits the changed
configuration, else "Apply and start a new run" with the reason. The dialog only draws the
choices (:class:`app.failure_fixes.FixChoice`) and says which one was clicked; the run
actions carry it out.
"""

from __future__ import annotations

import html
from pathlib import Path

from PySide6.QtCore import Qt, QUrl, Signal
from PySide6.QtGui import QDesktopServices, QGuiApplication
from PySide6.QtWidgets import (
    QDialog,
    QDialogButtonBox,
    QFrame,
    QGridLayout,
    QGroupBox,
    QLabel,
    QPlainTextEdit,
    QPushButton,
    QVBoxLayout,
    QWidget,
)

from app.failure_fixes import FixChoice
from app.theme import note
from qlora_engine.events import RunFailed


class RunErrorDialog(QDialog):
    """A failed run: what went wrong, what to change, the details.

    Signals:
        fix_chosen(FixChoice): the user clicked a fix's button (the dialog then closes).
    """

    fix_chosen = Signal(object)

    def __init__(
        self, failure: RunFailed, log_path: str | None = None, run_dir: str | None = None, parent: QWidget | None = None
    ) -> None:
        super().__init__(parent)
        self.setObjectName("runErrorDialog")
        self.setWindowTitle("The run failed")
        self.failure = failure
        self.resize(720, 560 if failure.fixes else 480)

        headline = note(f"<b>{_escape(failure.message)}</b>", "errorMessage")
        headline.setTextFormat(headline.textFormat().RichText)
        lay = QVBoxLayout(self)
        lay.addWidget(headline)
        if failure.hint and not failure.fixes:  # with fixes, the hint only repeats them
            lay.addWidget(note(failure.hint, "errorHint"))
        self.fix_choices: list[FixChoice] = []
        self.fix_buttons: list[QPushButton] = []
        self.fix_box = QGroupBox("Change and try again", objectName="errorFixes")
        self._fix_layout = QVBoxLayout(self.fix_box)
        self.fix_status = note("Checking which of these changes can continue the run from its checkpoint…")
        self._fix_layout.addWidget(self.fix_status)
        self._fix_rows: list[QWidget] = []
        for fix in failure.fixes or []:  # the descriptions at once; the buttons once judged
            pending = QLabel(str(fix.get("description", "")), wordWrap=True)
            self._fix_layout.addWidget(pending)
            self._fix_rows.append(pending)
        self.fix_box.setVisible(bool(failure.fixes))
        lay.addWidget(self.fix_box)
        facts = [
            (failure.step, f"Step reached: {failure.step}"),
            (failure.last_checkpoint, f"Last checkpoint (resume from it in the history): {failure.last_checkpoint}"),
            (run_dir, f"Events of the run: {Path(run_dir or '.') / 'events.jsonl'}"),
            (log_path, f"Engine log: {log_path}"),
        ]
        self.facts = note("\n".join(text for known, text in facts if known), "errorFacts")
        self.facts.setTextInteractionFlags(self.facts.textInteractionFlags().TextSelectableByMouse)
        lay.addWidget(self.facts)

        self.details_label = QLabel(f"Details ({failure.error_type}):")
        lay.addWidget(self.details_label)
        self.traceback = QPlainTextEdit(failure.traceback or "(no traceback)", objectName="errorTraceback")
        self.traceback.setReadOnly(True)
        self.traceback.setLineWrapMode(QPlainTextEdit.LineWrapMode.NoWrap)
        lay.addWidget(self.traceback, 1)
        # an error the user can fix opens with the message and the fix; its details wait behind a click
        user_error = failure.error is not None
        self.details_label.setVisible(not user_error)
        self.traceback.setVisible(not user_error)
        if user_error:
            lay.addStretch(1)

        buttons = QDialogButtonBox(QDialogButtonBox.StandardButton.Close)
        self.copy_button = QPushButton("Copy details", clicked=self.copy_details)
        buttons.addButton(self.copy_button, QDialogButtonBox.ButtonRole.ActionRole)
        self.details_button = QPushButton("Show details", visible=user_error, clicked=self.show_details)
        buttons.addButton(self.details_button, QDialogButtonBox.ButtonRole.ActionRole)
        folder = Path(log_path).parent if log_path else (Path(run_dir) if run_dir else None)
        if folder is not None:
            open_button = QPushButton("Open log folder")
            open_button.clicked.connect(lambda: QDesktopServices.openUrl(QUrl.fromLocalFile(str(folder))))
            buttons.addButton(open_button, QDialogButtonBox.ButtonRole.ActionRole)
        buttons.rejected.connect(self.reject)
        buttons.accepted.connect(self.accept)
        lay.addWidget(buttons)

    def show_details(self) -> None:
        self.details_label.show()
        self.traceback.show()
        self.details_button.hide()

    def set_fix_choices(self, choices: list[FixChoice]) -> None:
        """Show the judged fixes: one row each, its description, its button, why a new run if it is one."""
        for row in self._fix_rows:
            self._fix_layout.removeWidget(row)
            row.hide()
            row.deleteLater()
        self._fix_rows = []
        self.fix_status.hide()
        self.fix_choices = list(choices)
        self.fix_buttons = []
        for choice in self.fix_choices:
            card = QFrame(objectName="suggestion")  # drawn as the budget panel's suggestions
            grid = QGridLayout(card)
            grid.setContentsMargins(6, 4, 6, 4)
            grid.addWidget(note(choice.description, "fixDescription"), 0, 0)
            if choice.reason:
                grid.addWidget(note(choice.reason), 1, 0)
            button = QPushButton(choice.label, objectName="fixButton", enabled=choice.config is not None)
            tip = "Changes " + ", ".join(choice.overrides)
            if choice.resumable:
                tip += f"; the run continues with step {choice.resume_step + 1} from its checkpoint"
            button.setToolTip(tip)
            button.setAccessibleName(f"{choice.label}: {choice.description}")
            button.clicked.connect(lambda _=False, c=choice: self.choose_fix(c))
            grid.addWidget(button, 0, 1, 2, 1, Qt.AlignmentFlag.AlignVCenter)
            grid.setColumnStretch(0, 1)
            self._fix_layout.addWidget(card)
            self._fix_rows.append(card)
            self.fix_buttons.append(button)
        self.fix_box.setVisible(bool(self.fix_choices))

    def set_fix_error(self, message: str) -> None:
        """The fixes could not be judged: say so where they would be."""
        self.fix_status.setText(f"The fixes could not be checked: {message}")

    def choose_fix(self, choice: FixChoice) -> None:
        self.fix_chosen.emit(choice)
        self.accept()

    def details_text(self) -> str:
        f = self.failure
        parts = [f"{f.error_type}: {f.message}"]
        if f.hint:
            parts.append(f"Hint: {f.hint}")
        for fix in f.fixes or []:
            parts.append(f"Fix: {fix.get('description', '')} ({', '.join(fix.get('overrides') or [])})")
        parts.append(self.facts.text())
        parts.append(f.traceback or "")
        return "\n\n".join(p for p in parts if p)

    def copy_details(self) -> None:
        QGuiApplication.clipboard().setText(self.details_text())


def _escape(text: str) -> str:
    return html.escape(text).replace("\n", "<br>")
