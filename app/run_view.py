"""The run page: Start / Stop / Abort, progress with ETA, the five charts and the log.

The view draws a :class:`RunRecord`; it never talks to the process itself. Redraws are
throttled to a few per second (``REDRAW_MS``) however fast events arrive, which keeps the
window responsive while a run streams steps.
"""

from __future__ import annotations

import html
import time

from PySide6.QtCore import Qt, QTimer, Signal
from PySide6.QtGui import QKeySequence
from PySide6.QtWidgets import (
    QLabel,
    QPlainTextEdit,
    QProgressBar,
    QPushButton,
    QSplitter,
    QWidget,
)

from app.charts import RunCharts
from app.run_record import RunRecord
from app.theme import hbox, note, restyle, vbox
from qlora_engine.events import Event, LogLine, PhaseChanged, RunFailed, StepMetrics, describe, fmt_duration

REDRAW_MS = 250
LOG_BLOCKS = 5000
"""Lines the log pane keeps; older ones scroll out (the run's log file and events.jsonl keep all)."""

STATE_TEXT = {
    "idle": "Ready",
    "starting": "Starting the engine",
    "running": "Training",
    "stopping": "Stopping: saving a checkpoint at the end of this step",
    "finished": "Finished",
    "stopped": "Stopped (saved)",
    "failed": "Failed",
    "aborted": "Aborted",
    "replay": "Run from history",
}


QUIET_PHASES = ("training", "done")
"""Phases the log leaves out (the progress bar shows them)."""


class RunView(QWidget):
    """Signals: start_requested, stop_requested, abort_requested."""

    start_requested = Signal()
    stop_requested = Signal()
    abort_requested = Signal()

    def __init__(self, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.record = RunRecord()
        self.state = "idle"

        self.title = QLabel("Run", objectName="pageTitle")
        self.summary = note(name="runSummary")
        self.summary.setTextInteractionFlags(Qt.TextInteractionFlag.TextSelectableByMouse)

        start_tip = f"Start a run with this configuration ({QKeySequence('Ctrl+R').toString()})"
        self.start_button = QPushButton("Start training", objectName="primary", toolTip=start_tip)
        stop_tip = "Save a checkpoint and the adapter at the end of the current step, then finish"
        self.stop_button = QPushButton("Stop", toolTip=stop_tip)
        abort_tip = "End the run now; the last checkpoint on disk is kept"
        self.abort_button = QPushButton("Abort", objectName="danger", toolTip=abort_tip)
        self.start_button.clicked.connect(self.start_requested)
        self.stop_button.clicked.connect(self.stop_requested)
        self.abort_button.clicked.connect(self.abort_requested)

        self.state_label = QLabel(STATE_TEXT["idle"], objectName="runState")
        self.progress = QProgressBar(maximum=1, value=0, format="step %v / %m", textVisible=True)
        self.eta = QLabel("", objectName="runEta", minimumWidth=220)

        self.charts = RunCharts()
        self.log = QPlainTextEdit(objectName="runLog", readOnly=True, maximumBlockCount=LOG_BLOCKS)
        self.log.setPlaceholderText("The engine's messages appear here.")

        buttons = hbox(self.start_button, self.stop_button, self.abort_button, (self.state_label, 1))
        buttons.insertSpacing(3, 12)

        self.splitter = QSplitter(Qt.Orientation.Vertical)
        self.splitter.addWidget(self.charts)
        self.splitter.addWidget(self.log)
        self.splitter.setStretchFactor(0, 4)
        self.splitter.setStretchFactor(1, 1)

        vbox(self.title, self.summary, buttons, hbox((self.progress, 1), self.eta), (self.splitter, 1), parent=self)

        self._timer = QTimer(self, singleShot=True, interval=REDRAW_MS, timeout=self.redraw)
        self.set_state("idle")

    # -- state -----------------------------------------------------------------------------
    def set_state(self, state: str) -> None:
        self.state = state
        live = state in ("starting", "running", "stopping")
        self.start_button.setEnabled(not live)
        self.stop_button.setEnabled(state in ("starting", "running"))
        self.abort_button.setEnabled(live)
        self.state_label.setText(STATE_TEXT.get(state, state))
        restyle(self.state_label, state=state)
        self.schedule_redraw()

    def set_summary(self, text: str) -> None:
        self.summary.setText(text)

    def show_record(self, record: RunRecord, state: str | None = None, note: str = "") -> None:
        """Draw another record (a new live run, or a run opened from the history).

        Everything drawn for the run shown before goes: curves, axes, log, header.
        """
        self.record = record
        name = record.run_dir.name if record.run_dir else ""
        self.title.setText(f"Run: {name}" + (f" ({note})" if note else "") if name else "Run")
        self.charts.clear()
        self.log.clear()
        for line in record.logs:
            self.append_event(line)
        if record.failed:
            self.append_event(record.failed)
        if record.finished:
            self.append_event(record.finished)
        if state:
            self.set_state(state)
        self.redraw()

    # -- live updates ----------------------------------------------------------------------
    def schedule_redraw(self) -> None:
        if not self._timer.isActive():
            self._timer.start()

    def append_text(self, text: str, level: str = "info") -> None:
        if level in ("warning", "error"):
            color = "#d97706" if level == "warning" else "#dc2626"
            self.log.appendHtml(f'<span style="color:{color}">{html.escape(text)}</span>')
        else:
            self.log.appendPlainText(text)

    def append_event(self, e: Event) -> None:
        """Log the events a person wants to read (steps are on the charts, not in the log).

        The words are the engine's own (:func:`qlora_engine.events.describe`), as in a terminal.
        """
        if isinstance(e, (StepMetrics, PhaseChanged)) and (not isinstance(e, PhaseChanged) or e.phase in QUIET_PHASES):
            return
        stamp = time.strftime("%H:%M:%S", time.localtime(e.time))
        level = e.level if isinstance(e, LogLine) else "error" if isinstance(e, RunFailed) else "info"
        text = e.message if isinstance(e, LogLine) else describe(e)
        self.append_text(f"{stamp}  {text}", level)

    def redraw(self) -> None:
        rec = self.record
        self.charts.draw(rec)
        total = max(rec.total_steps, 1)
        self.progress.setRange(0, total)
        self.progress.setValue(min(rec.step, total))
        last = rec.latest
        parts = []
        if self.state in ("starting", "running", "stopping") and rec.phase and rec.phase != "training":
            parts.append(rec.phase.replace("_", " "))
        if last is not None:
            if self.state in ("running", "stopping", "starting"):
                parts.append(f"ETA {fmt_duration(last.eta)}")
            parts.append(f"elapsed {fmt_duration(rec.elapsed)}")
            parts.append(f"loss {last.loss:.4f}")
            parts.append(f"{last.tokens_per_second:,.0f} tok/s")
        self.eta.setText("  ·  ".join(parts))
