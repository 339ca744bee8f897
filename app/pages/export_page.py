"""Export view: write a finished run as an adapter folder, a merged 16-bit model, or GGUF + Modelfile.

It runs the very ``qlora-engine export`` command the page shows, as a child process with
``--events -`` held by one :class:`~app.run_worker.EngineJob` (the window never imports torch);
its progress events come back as signals, a failure as its ``run_failed`` event. Cancel asks
the child to end (SIGTERM); the engine then removes its temporary folder, so nothing
half-written is left and an existing folder is never touched unless "Replace" is ticked.

``TryExportPage`` puts the Try view and this one under one flow step, with the ``set_run``
interface of the page it replaces.
"""

from __future__ import annotations

import importlib.util
import shlex
from pathlib import Path
from typing import Any

from PySide6.QtCore import QUrl, Signal
from PySide6.QtGui import QDesktopServices
from PySide6.QtWidgets import (
    QCheckBox,
    QComboBox,
    QFileDialog,
    QFormLayout,
    QLabel,
    QLineEdit,
    QPlainTextEdit,
    QProgressBar,
    QPushButton,
    QTabWidget,
    QWidget,
)

from app.pages.try_page import TryPage, has_adapter
from app.run_worker import EngineJob, engine_argv, engine_env
from app.theme import hbox, holder, note, vbox
from qlora_engine.events import Event, LogLine, PhaseChanged, RunFailed

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
        "The merged model as GGUF (F16, Q8_0, or Q4_K_M/Q5_K_M through llama.cpp's quantizer), the adapter as a GGUF LoRA file, and an Ollama Modelfile "
        "with the chat template and stop tokens. Llama, Mistral, Qwen2 and SmolLM models.",
    ),
}


def _default_export_dir(run_dir: Path, fmt: str) -> Path:
    """The engine's default export folder (base model, run and format), or the run's name and format if the
    run cannot be read. Reading a run's files is torch-free (``qlora_engine.export.source``)."""
    from qlora_engine.export.source import default_export_dir, load_run  # lazy: only once a run is shown

    try:
        return default_export_dir(load_run(run_dir), fmt)
    except Exception:  # a run without a readable config: still offer a folder
        return run_dir.parent / f"{run_dir.name}-{fmt}"


K_TIPS = {
    "q4_k_m": "4-bit K-quant, medium: the usual llama.cpp/Ollama download, about 30% of F16.",
    "q5_k_m": "5-bit K-quant, medium: closer to F16, about 36% of its size.",
}


class ExportPage(QWidget):
    """Choose a format and a folder, export, watch progress. ``shutdown()`` ends the export's process."""

    finished = Signal(str, str)
    """(outcome, detail): ('done', folder), ('failed', message) or ('cancelled', '')."""

    def __init__(self, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.run_dir: Path | None = None
        self.busy = False
        self.last_export: Path | None = None
        self._out_edited = False
        self.job: EngineJob | None = None
        self._failure: RunFailed | None = None
        self._cancelled = False

        self.run_label = note("Finish a run (or open one from the history) to export it.")
        self.format = QComboBox()
        for key, (title, _) in FORMATS.items():
            self.format.addItem(title, key)
        self.format_help = note()
        self.f16, self.q8, self.lora = (
            QCheckBox(text, checked=True, toggled=self._refresh) for text in ("F16", "Q8_0", "GGUF LoRA file")
        )
        # K-quants come from llama.cpp's quantizer (llama-cpp-python); off until asked for
        self.k_quants = {t: QCheckBox(t.upper()) for t in ("q4_k_m", "q5_k_m")}
        quantizer = importlib.util.find_spec("llama_cpp") is not None
        for t, box in self.k_quants.items():
            box.toggled.connect(self._refresh)
            box.setProperty("installed", quantizer)
            box.setToolTip(
                K_TIPS[t]
                + (" Quantized by llama.cpp." if quantizer else " Needs llama.cpp: pip install llama-cpp-python.")
            )
        self.f16.setToolTip("16-bit floats: the merged weights almost exactly (2 bytes per weight).")
        self.q8.setToolTip("8-bit blocks of 32 weights: about half the size of F16, very close in quality.")
        self.lora.setToolTip("The adapter alone, for llama.cpp --lora or Ollama ADAPTER on a GGUF of the base model.")
        self.gguf_options = holder(hbox(self.f16, self.q8, *self.k_quants.values(), self.lora, 1, margins=0))
        self.dtype = QComboBox()
        self.dtype.addItems(["auto", "bfloat16", "float16", "float32"])
        self.dtype.setToolTip("dtype of the merge; 'auto' keeps the base model's own (bfloat16 for most models).")
        self.out = QLineEdit(objectName="exportOut", textEdited=self._on_out_edited)
        out_row = hbox((self.out, 1), QPushButton("Browse …", clicked=self._browse))
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

        self.export_button = QPushButton("Export", objectName="primary", clicked=self.start)
        self.cancel_button = QPushButton("Cancel", clicked=self.cancel)
        self.open_button = QPushButton("Open the folder", clicked=self._open)
        buttons = hbox(self.export_button, self.cancel_button, self.open_button, 1)
        self.progress = QProgressBar(textVisible=False, maximum=1)
        self.phase = note(name="exportPhase")
        self.error = note(name="fieldError")
        self.log = QPlainTextEdit(readOnly=True, objectName="exportLog")
        self.command = QLineEdit(readOnly=True, objectName="exportCommand", toolTip="The same export from a terminal.")

        vbox(self.run_label, form, buttons, self.progress, self.phase, self.error, (self.log, 1), "In a terminal:",
             self.command, parent=self, margins=(0, 8, 0, 0))
        self.format.currentIndexChanged.connect(self._on_format)
        self._on_format()

    # -- state ----------------------------------------------------------------------------------

    def fmt(self) -> str:
        return self.format.currentData()

    def set_run(self, run_dir: Path | None) -> None:
        new = Path(run_dir) if run_dir else None
        if new != self.run_dir and not self.busy:  # what was said about another run's export goes
            self.last_export = None
            for w in (self.phase, self.error, self.log):
                w.clear()
            self.progress.setRange(0, 1)
            self.progress.setValue(0)
        self.run_dir = new
        self._out_edited = False
        ok = has_adapter(self.run_dir)
        self.run_label.setText(
            f"Run: {self.run_dir}" if ok else "Finish a run (or open one from the history) to export it."
        )
        self._default_out()
        self._refresh()

    def options(self) -> dict[str, Any]:
        boxes = (("f16", self.f16), ("q8_0", self.q8), *self.k_quants.items())
        types = [t for t, box in boxes if box.isChecked()]
        return {
            "overwrite": self.overwrite.isChecked(),
            "dtype": self.dtype.currentText(),
            "gguf_types": types,
            "gguf_lora": self.lora.isChecked(),
        }

    def command_line(self) -> str:
        """The same export from a terminal (what the page runs, less ``--events -``)."""
        return shlex.join(["qlora-engine", *self.export_args()]) if self.run_dir is not None else ""

    def export_args(self) -> list[str]:
        o = self.options()
        args = ["export", str(self.run_dir), "--format", self.fmt(), "--out", self.out.text().strip()]
        if self.fmt() != "adapter" and o["dtype"] != "auto":
            args += ["--dtype", o["dtype"]]
        if self.fmt() == "gguf":
            if o["gguf_types"] != ["f16", "q8_0"]:
                args += ["--gguf-types", ",".join(o["gguf_types"])]
            if not o["gguf_lora"]:
                args.append("--no-lora")
        if o["overwrite"]:
            args.append("--force")
        return args

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
        if self.fmt() == "gguf" and not self.options()["gguf_types"]:
            ready = False
        self.export_button.setEnabled(ready and not self.busy)
        self.cancel_button.setEnabled(self.busy)
        self.open_button.setEnabled(self.last_export is not None and self.last_export.is_dir() and not self.busy)
        for w in (self.format, self.f16, self.q8, self.lora, self.dtype, self.out, self.overwrite):
            w.setEnabled(not self.busy)
        for box in self.k_quants.values():
            box.setEnabled(not self.busy and bool(box.property("installed")))
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

    # -- the child process ------------------------------------------------------------------------

    def shutdown(self, timeout_ms: int = 120_000) -> bool:
        """Cancel a running export and wait for its process to end. True if it ended in time."""
        job = self.job
        if job is None:
            return True
        job.terminate()
        ended = job.wait(timeout_ms)
        if not ended:
            job.abort()
            ended = job.wait(timeout_ms)
        return ended

    def start(self) -> None:
        if self.busy or not self.export_button.isEnabled():
            return
        self.busy = True
        self._failure = None
        self._cancelled = False
        self.error.setText("")
        self.log.clear()
        self.phase.setText("Starting …")
        self.progress.setRange(0, 0)  # busy: the steps of an export have no common unit
        self._refresh()
        self.job = EngineJob(engine_argv(*self.export_args(), "--events", "-"), env=engine_env(), parent=self)
        self.job.event.connect(self._on_event)
        self.job.output.connect(self.log.appendPlainText)
        self.job.finished.connect(self._on_exit)
        self.job.start()

    def cancel(self) -> None:
        if self.job is not None and self.busy:
            self._cancelled = True
            self.job.terminate()
            self.phase.setText("Cancelling after the current step …")

    def _on_event(self, event: Event) -> None:
        if isinstance(event, PhaseChanged):
            self.phase.setText(event.detail)
            self.log.appendPlainText(event.detail)
        elif isinstance(event, LogLine):
            self.log.appendPlainText(f"{event.level}: {event.message}")
        elif isinstance(event, RunFailed):
            self._failure = event

    def _on_exit(self, code: int, stderr_tail: str) -> None:
        """The export's process has ended: done, failed (its run_failed event), or cancelled."""
        job, self.job = self.job, None
        if job is not None:
            job.deleteLater()
        self.busy = False
        out = self.out.text().strip()
        if self._failure is not None:
            f = self._failure
            self.phase.setText("The export failed; nothing was written.")
            self.error.setText(f.message + (f"\n{f.hint}" if f.hint else ""))
            outcome, detail = "failed", f.message
        elif code == 0:
            self.last_export = Path(out)
            self.phase.setText(f"Exported to {out}")
            outcome, detail = "done", out
        elif self._cancelled:
            self.phase.setText("Cancelled; nothing was written.")
            outcome, detail = "cancelled", ""
        else:
            self.phase.setText("The export failed; nothing was written.")
            self.error.setText(f"The export process ended unexpectedly (exit code {code}); its output is below.")
            outcome, detail = "failed", f"exit code {code}"
        self.progress.setRange(0, 1)
        self.progress.setValue(1 if outcome == "done" else 0)
        self._refresh()
        self.finished.emit(outcome, detail)


class TryExportPage(QWidget):
    """Flow step 6: the Try view and the Export view of the chosen run, in two tabs."""

    def __init__(self, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.run_dir: Path | None = None
        self.try_page = TryPage()
        self.export_page = ExportPage()
        self.tabs = QTabWidget()
        self.tabs.addTab(self.try_page, "Try")
        self.tabs.addTab(self.export_page, "Export")
        vbox(QLabel("6  Try / Export", objectName="pageTitle"), (self.tabs, 1), parent=self, margins=(18, 14, 18, 14))

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
