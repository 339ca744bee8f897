"""Export view: write a finished run as an adapter folder, a merged 16-bit model, or GGUF + Modelfile.

It calls the same ``qlora_engine.export.export`` the ``qlora-engine export`` command runs (the
page shows that command), in a worker on its own ``QThread``; the engine's progress events come
back as signals. Cancel sets a flag the export checks between steps; the engine then removes
its temporary folder, so nothing half-written is left and an existing folder is never touched
unless "Replace" is ticked.

``TryExportPage`` puts the Try view and this one under one flow step, with the ``set_run``
interface of the page it replaces.
"""

from __future__ import annotations

import shlex
from pathlib import Path
from typing import Any

from PySide6.QtCore import QUrl, Signal, Slot
from PySide6.QtGui import QDesktopServices
from PySide6.QtWidgets import (
    QCheckBox,
    QComboBox,
    QFileDialog,
    QFormLayout,
    QHBoxLayout,
    QLabel,
    QLineEdit,
    QPlainTextEdit,
    QProgressBar,
    QPushButton,
    QTabWidget,
    QVBoxLayout,
    QWidget,
)

from app.pages.try_page import TryPage, has_adapter
from app.tasks import JobWorker, SignalSink, WorkerThread, import_ml_stack
from qlora_engine.events import Event, LogLine, PhaseChanged

FORMATS = {
    "adapter": (
        "Adapter (PEFT folder)",
        "The LoRA weights and config as peft saves them, the tokenizer, a model card and the run's config.yaml. "
        "Small; needs the base model to run.",
    ),
    "merged": (
        "Merged model (16-bit safetensors)",
        "The adapter merged into a 16-bit copy of the base (reloaded in 16 bit, not the 4-bit training copy). "
        "Loads with plain transformers; as large as the base model.",
    ),
    "gguf": (
        "GGUF for llama.cpp and Ollama",
        "The merged model as GGUF (F16 and/or Q8_0), the adapter as a GGUF LoRA file, and an Ollama Modelfile "
        "with the chat template and stop tokens. Llama, Mistral, Qwen2 and SmolLM models.",
    ),
}



def _default_export_dir(run_dir: Path, fmt: str) -> Path:
    """The engine's default export folder (base model, run and format), or the run's name and format if the
    run cannot be read."""
    from qlora_engine.export.source import default_export_dir, load_run

    try:
        return default_export_dir(load_run(run_dir), fmt)
    except Exception:  # a run without a readable config: still offer a folder
        return run_dir.parent / f"{run_dir.name}-{fmt}"

class ExportWorker(JobWorker):
    event = Signal(object)
    done = Signal(str)
    cancelled = Signal()

    @Slot(str, str, str, object)
    def run(self, source: str, fmt: str, out: str, options: dict) -> None:
        from qlora_engine.export import ExportCancelled, export

        try:
            import_ml_stack()
            path = export(source, fmt, out, sink=SignalSink(self.event.emit), should_stop=self.cancel.is_set, **options)
            self.done.emit(str(path))
        except ExportCancelled:
            self.cancelled.emit()
        except Exception as e:
            self.report_failure(e)


class ExportPage(QWidget):
    """Choose a format and a folder, export, watch progress. ``shutdown()`` ends the worker thread."""

    _request = Signal(str, str, str, object)
    finished = Signal(str, str)
    """(outcome, detail): ('done', folder), ('failed', message) or ('cancelled', '')."""

    def __init__(self, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.run_dir: Path | None = None
        self.busy = False
        self.last_export: Path | None = None
        self._out_edited = False
        self._jobs = WorkerThread("export", ExportWorker, self._connect_worker)

        self.run_label = QLabel("Finish a run (or open one from the history) to export it.")
        self.run_label.setObjectName("hint")
        self.run_label.setWordWrap(True)
        self.format = QComboBox()
        for key, (title, _) in FORMATS.items():
            self.format.addItem(title, key)
        self.format_help = QLabel()
        self.format_help.setObjectName("hint")
        self.format_help.setWordWrap(True)
        self.f16 = QCheckBox("F16")
        self.q8 = QCheckBox("Q8_0")
        self.lora = QCheckBox("GGUF LoRA file")
        for box in (self.f16, self.q8, self.lora):
            box.setChecked(True)
            box.toggled.connect(self._refresh)
        self.f16.setToolTip("16-bit floats: the merged weights almost exactly (2 bytes per weight).")
        self.q8.setToolTip("8-bit blocks of 32 weights: about half the size of F16, very close in quality.")
        self.lora.setToolTip("The adapter alone, for llama.cpp --lora or Ollama ADAPTER on a GGUF of the base model.")
        self.gguf_options = QWidget()
        go = QHBoxLayout(self.gguf_options)
        go.setContentsMargins(0, 0, 0, 0)
        for box in (self.f16, self.q8, self.lora):
            go.addWidget(box)
        go.addStretch(1)
        self.dtype = QComboBox()
        self.dtype.addItems(["auto", "bfloat16", "float16", "float32"])
        self.dtype.setToolTip("dtype of the merge; 'auto' keeps the base model's own (bfloat16 for most models).")
        self.out = QLineEdit()
        self.out.setObjectName("exportOut")
        self.out.textEdited.connect(self._on_out_edited)
        browse = QPushButton("Browse …")
        browse.clicked.connect(self._browse)
        out_row = QHBoxLayout()
        out_row.addWidget(self.out, 1)
        out_row.addWidget(browse)
        self.overwrite = QCheckBox(
            "Replace the folder if it exists (the old one is removed only once the new one is complete)"
        )
        self.overwrite.toggled.connect(self._refresh)

        form = QFormLayout()
        form.addRow("Format", self.format)
        form.addRow("", self.format_help)
        form.addRow("GGUF files", self.gguf_options)
        form.addRow("Merge dtype", self.dtype)
        form.addRow("Output folder", out_row)
        form.addRow("", self.overwrite)
        self._form = form

        self.export_button = QPushButton("Export")
        self.export_button.setObjectName("primary")
        self.export_button.clicked.connect(self.start)
        self.cancel_button = QPushButton("Cancel")
        self.cancel_button.clicked.connect(self.cancel)
        self.open_button = QPushButton("Open the folder")
        self.open_button.clicked.connect(self._open)
        buttons = QHBoxLayout()
        for b in (self.export_button, self.cancel_button, self.open_button):
            buttons.addWidget(b)
        buttons.addStretch(1)
        self.progress = QProgressBar()
        self.progress.setTextVisible(False)
        self.progress.setRange(0, 1)
        self.phase = QLabel("")
        self.phase.setObjectName("exportPhase")
        self.phase.setWordWrap(True)
        self.error = QLabel("")
        self.error.setObjectName("fieldError")
        self.error.setWordWrap(True)
        self.log = QPlainTextEdit()
        self.log.setReadOnly(True)
        self.log.setObjectName("exportLog")
        self.command = QLineEdit()
        self.command.setReadOnly(True)
        self.command.setObjectName("exportCommand")
        self.command.setToolTip("The same export from a terminal.")

        lay = QVBoxLayout(self)
        lay.setContentsMargins(0, 8, 0, 0)
        lay.addWidget(self.run_label)
        lay.addLayout(form)
        lay.addLayout(buttons)
        lay.addWidget(self.progress)
        lay.addWidget(self.phase)
        lay.addWidget(self.error)
        lay.addWidget(self.log, 1)
        lay.addWidget(QLabel("In a terminal:"))
        lay.addWidget(self.command)
        self.format.currentIndexChanged.connect(self._on_format)
        self._on_format()

    # -- state ----------------------------------------------------------------------------------

    def fmt(self) -> str:
        return self.format.currentData()

    def set_run(self, run_dir: Path | None) -> None:
        self.run_dir = Path(run_dir) if run_dir else None
        self._out_edited = False
        ok = has_adapter(self.run_dir)
        self.run_label.setText(
            f"Run: {self.run_dir}" if ok else "Finish a run (or open one from the history) to export it."
        )
        self._default_out()
        self._refresh()

    def options(self) -> dict[str, Any]:
        types = [t for t, box in (("f16", self.f16), ("q8_0", self.q8)) if box.isChecked()]
        return {
            "overwrite": self.overwrite.isChecked(),
            "dtype": self.dtype.currentText(),
            "gguf_types": types,
            "gguf_lora": self.lora.isChecked(),
        }

    def command_line(self) -> str:
        if self.run_dir is None:
            return ""
        o = self.options()
        args = ["qlora-engine", "export", str(self.run_dir), "--format", self.fmt(), "--out", self.out.text().strip()]
        if self.fmt() != "adapter" and o["dtype"] != "auto":
            args += ["--dtype", o["dtype"]]
        if self.fmt() == "gguf":
            if o["gguf_types"] != ["f16", "q8_0"]:
                args += ["--gguf-types", ",".join(o["gguf_types"])]
            if not o["gguf_lora"]:
                args.append("--no-lora")
        if o["overwrite"]:
            args.append("--force")
        return shlex.join(args)

    def _default_out(self) -> None:
        if self.run_dir is not None and not self._out_edited:
            self.out.setText(str(_default_export_dir(self.run_dir, self.fmt())))

    def _on_out_edited(self, _text: str) -> None:
        self._out_edited = True
        self._refresh()

    def _on_format(self) -> None:
        self.format_help.setText(FORMATS[self.fmt()][1])
        self._form.setRowVisible(self.gguf_options, self.fmt() == "gguf")
        self._form.setRowVisible(self.dtype, self.fmt() != "adapter")
        self._default_out()
        self._refresh()

    def _refresh(self) -> None:
        ready = has_adapter(self.run_dir) and bool(self.out.text().strip())
        if self.fmt() == "gguf" and not (self.f16.isChecked() or self.q8.isChecked()):
            ready = False
        self.export_button.setEnabled(ready and not self.busy)
        self.cancel_button.setEnabled(self.busy)
        self.open_button.setEnabled(self.last_export is not None and self.last_export.is_dir() and not self.busy)
        for w in (self.format, self.f16, self.q8, self.lora, self.dtype, self.out, self.overwrite):
            w.setEnabled(not self.busy)
        self.command.setText(self.command_line())

    def _browse(self) -> None:
        start = str(self.run_dir.parent) if self.run_dir else ""
        chosen = QFileDialog.getExistingDirectory(self, "Export into which parent folder?", start)
        if chosen and self.run_dir is not None:
            self.out.setText(str(Path(chosen) / f"{self.run_dir.name}-{self.fmt()}"))
            self._on_out_edited(self.out.text())

    def _open(self) -> None:
        if self.last_export is not None:
            QDesktopServices.openUrl(QUrl.fromLocalFile(str(self.last_export)))

    # -- the worker thread ----------------------------------------------------------------------

    @property
    def _worker(self) -> ExportWorker | None:
        """The worker, once the first export has started its thread."""
        return self._jobs.worker

    def _connect_worker(self, worker: ExportWorker) -> None:
        self._request.connect(worker.run)
        worker.event.connect(self._on_event)
        worker.done.connect(self._on_done)
        worker.failed.connect(self._on_failed)
        worker.cancelled.connect(self._on_cancelled)

    def shutdown(self, timeout_ms: int = 120_000) -> bool:
        """Cancel a running export and end the thread. True if it ended in time."""
        ended = self._jobs.stop(timeout_ms)
        self.busy = False
        return ended

    def start(self) -> None:
        if self.busy or not self.export_button.isEnabled():
            return
        worker = self._jobs.ensure()
        worker.cancel.clear()
        self.busy = True
        self.error.setText("")
        self.log.clear()
        self.phase.setText("Starting …")
        self.progress.setRange(0, 0)  # busy: the steps of an export have no common unit
        self._refresh()
        self._request.emit(str(self.run_dir), self.fmt(), self.out.text().strip(), self.options())

    def cancel(self) -> None:
        if self._worker is not None and self.busy:
            self._worker.cancel.set()
            self.phase.setText("Cancelling after the current step …")

    def _on_event(self, event: Event) -> None:
        if isinstance(event, PhaseChanged):
            self.phase.setText(event.detail)
            self.log.appendPlainText(event.detail)
        elif isinstance(event, LogLine):
            self.log.appendPlainText(f"{event.level}: {event.message}")

    def _finish(self, outcome: str, detail: str) -> None:
        self.busy = False
        self.progress.setRange(0, 1)
        self.progress.setValue(1 if outcome == "done" else 0)
        self._refresh()
        self.finished.emit(outcome, detail)

    def _on_done(self, path: str) -> None:
        self.last_export = Path(path)
        self.phase.setText(f"Exported to {path}")
        self._finish("done", path)

    def _on_failed(self, message: str, hint: str, tb: str) -> None:
        self.phase.setText("The export failed; nothing was written.")
        self.error.setText(message + (f"\n{hint}" if hint else ""))
        if tb:
            self.log.appendPlainText(tb)
        self._finish("failed", message)

    def _on_cancelled(self) -> None:
        self.phase.setText("Cancelled; nothing was written.")
        self._finish("cancelled", "")


class TryExportPage(QWidget):
    """Flow step 6: the Try view and the Export view of the chosen run, in two tabs."""

    def __init__(self, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.run_dir: Path | None = None
        title = QLabel("6  Try / Export")
        title.setObjectName("pageTitle")
        self.try_page = TryPage()
        self.export_page = ExportPage()
        self.tabs = QTabWidget()
        self.tabs.addTab(self.try_page, "Try")
        self.tabs.addTab(self.export_page, "Export")
        lay = QVBoxLayout(self)
        lay.setContentsMargins(18, 14, 18, 14)
        lay.addWidget(title)
        lay.addWidget(self.tabs, 1)

    def set_run(self, run_dir: Path | None) -> None:
        self.run_dir = Path(run_dir) if run_dir else None
        self.try_page.set_run(self.run_dir)
        self.export_page.set_run(self.run_dir)

    def busy(self) -> bool:
        return self.try_page.busy or self.export_page.busy

    def shutdown(self) -> bool:
        a = self.try_page.shutdown()
        b = self.export_page.shutdown()
        return a and b
