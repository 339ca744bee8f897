"""Try / Export page: where the trained adapter is and how to use it.

The side-by-side playground and the export formats come from the engine's export and chat
commands; until the app drives them itself, this page points at the files and shows the
exact commands for the last finished run.
"""

from __future__ import annotations

from pathlib import Path

from PySide6.QtCore import Qt, QUrl
from PySide6.QtGui import QDesktopServices, QGuiApplication
from PySide6.QtWidgets import QHBoxLayout, QLabel, QPlainTextEdit, QPushButton, QVBoxLayout, QWidget


class ResultPage(QWidget):
    def __init__(self, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.run_dir: Path | None = None
        title = QLabel("6  Try / Export")
        title.setObjectName("pageTitle")
        self.info = QLabel("Finish a run (or open one from the history) to try and export its adapter.")
        self.info.setWordWrap(True)
        self.info.setTextInteractionFlags(Qt.TextInteractionFlag.TextSelectableByMouse)
        self.commands = QPlainTextEdit()
        self.commands.setObjectName("resultCommands")
        self.commands.setReadOnly(True)
        self.commands.setMaximumHeight(160)
        self.open_button = QPushButton("Open the run folder")
        self.open_button.clicked.connect(self._open)
        self.copy_button = QPushButton("Copy the commands")
        self.copy_button.clicked.connect(lambda: QGuiApplication.clipboard().setText(self.commands.toPlainText()))
        buttons = QHBoxLayout()
        buttons.addWidget(self.open_button)
        buttons.addWidget(self.copy_button)
        buttons.addStretch(1)
        lay = QVBoxLayout(self)
        lay.setContentsMargins(18, 14, 18, 14)
        lay.addWidget(title)
        lay.addWidget(self.info)
        lay.addWidget(QLabel("In a terminal:"))
        lay.addWidget(self.commands)
        lay.addLayout(buttons)
        lay.addStretch(1)
        self.set_run(None)

    def set_run(self, run_dir: Path | None) -> None:
        self.run_dir = Path(run_dir) if run_dir else None
        has = self.run_dir is not None and (self.run_dir / "adapter").is_dir()
        self.open_button.setEnabled(self.run_dir is not None)
        self.copy_button.setEnabled(has)
        if not has:
            self.commands.setPlainText("")
            return
        d = self.run_dir
        self.info.setText(f"The adapter of {d.name} is in {d / 'adapter'} (a PEFT folder any peft install loads).")
        self.commands.setPlainText(
            f'qlora-engine chat "{d}" --compare\n'
            f'qlora-engine export "{d}" --format adapter --out "{d.parent / (d.name + "-adapter")}"\n'
            f'qlora-engine export "{d}" --format merged --out "{d.parent / (d.name + "-merged")}"\n'
            f'qlora-engine export "{d}" --format gguf --out "{d.parent / (d.name + "-gguf")}"\n'
        )

    def _open(self) -> None:
        if self.run_dir is not None:
            QDesktopServices.openUrl(QUrl.fromLocalFile(str(self.run_dir)))
