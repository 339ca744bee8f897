"""Data page: the training file, its detected format and evidence, column mapping, rendered
samples with the trained part highlighted, and a histogram of token lengths with the cut.

Everything shown comes from ``qlora_engine.data.inspect_data`` (the same code the CLI's
``inspect-data`` runs), called in the background with the chosen model's tokenizer.
"""

from __future__ import annotations

import html
from pathlib import Path
from typing import Any

import numpy as np
import pyqtgraph as pg
from PySide6.QtCore import Qt
from PySide6.QtGui import QPalette
from PySide6.QtWidgets import QComboBox, QFileDialog, QFormLayout, QPushButton, QTextBrowser, QWidget

from app.config_model import ConfigModel
from app.fields import FieldForm, debounce
from app.inspector import Inspector
from app.pages.base import Page
from app.theme import holder, note, row
from qlora_engine.config_sections import DATA_FIELDS
from qlora_engine.errors import DataError, QLoRAError
from qlora_engine.padding import packing_hint

PREVIEW_ROWS = 2000
"""Rows read for the statistics and the histogram (the preview must stay quick on big files)."""
SHOWN_SAMPLES = 5
SAME = "(same name)"


def data_request(kind: str, cfg: Any) -> dict[str, Any]:
    """A question about the configuration's data for the inspecting child (it tokenizes; torch)."""
    return {"kind": kind, "config": cfg.to_dict(), "base_dir": str(cfg.base_dir) if cfg.base_dir else None}


class DataPage(Page):
    title = "2  Data"
    subtitle = (
        "JSONL, JSON, CSV, Parquet or plain text; a saved datasets folder or a hub dataset id. The format is detected "
        "from the rows: plain text, instruction (Alpaca), chat messages, ShareGPT conversations, or prompt/completion."
    )

    def __init__(self, model: ConfigModel, tasks: Inspector, parent: QWidget | None = None) -> None:
        super().__init__(model, parent)
        self.tasks = tasks
        self.model_ref: str | None = None
        self.report: dict[str, Any] | None = None
        self.error: QLoRAError | None = None
        """The engine's error about the data chosen now (Start refuses while there is one)."""
        self.keys: list[str] = []

        _box, form = self.group("Training data")
        self.browse_file = QPushButton("File…", clicked=self._pick_file)
        self.browse_folder = QPushButton("Folder…", clicked=self._pick_folder)
        self.add_binding(form, "data", "path", wrap=lambda e: row(e, self.browse_file, self.browse_folder))
        for name in ("format", "subset", "split"):
            self.add_binding(form, "data", name)

        box, _ = self.group("What was found")
        self.detected = note("Choose a data file to see what it holds.", "detected")
        self.detected.setTextInteractionFlags(Qt.TextInteractionFlag.TextSelectableByMouse)
        box.layout().addWidget(self.detected)
        self.problems = note(name="fieldError")
        self.problems.hide()
        box.layout().addWidget(self.problems)

        self.mapping_box, _ = self.group("Column mapping")
        self.mapping_note = note(
            "Tell which of your columns holds each of our fields (only needed when your names differ from ours)."
        )
        self.mapping_box.layout().addWidget(self.mapping_note)
        self.mapping_form = QFormLayout()
        self.mapping_box.layout().addWidget(holder(self.mapping_form))
        self.mapping_combos: dict[str, QComboBox] = {}
        self.mapping_box.hide()
        self.columns_form = FieldForm(model, [])
        self.add_binding(self.columns_form, "data", "columns")
        self.mapping_box.layout().addWidget(self.columns_form)

        box, _ = self.group("Samples as the model sees them")
        self.preview = QTextBrowser(objectName="samplePreview", minimumHeight=220, openLinks=False)
        box.layout().addWidget(self.preview)

        box, _ = self.group("Token lengths")
        self.histogram = pg.PlotWidget()
        self.histogram.setObjectName("lengthHistogram")
        self.histogram.setMinimumHeight(180)
        self.histogram.setLabel("bottom", "tokens per sample")
        self.histogram.setLabel("left", "samples")
        self.histogram.setMenuEnabled(False)
        self.histogram.setMouseEnabled(x=False, y=False)
        self.apply_palette()
        self.bars = pg.BarGraphItem(x=[], height=[], width=1, brush="#3b82f6")
        self.histogram.addItem(self.bars)
        self.cut_line = pg.InfiniteLine(
            angle=90,
            movable=False,
            pen=pg.mkPen("#dc2626", width=2, style=Qt.PenStyle.DashLine),
            label="max length {value:.0f}",
            labelOpts={"position": 0.9, "color": "#dc2626"},
        )
        self.histogram.addItem(self.cut_line)
        self.stats = note()
        box.layout().addWidget(self.histogram)
        box.layout().addWidget(self.stats)

        self.group(
            "Length, masking and validation",
            "data.max_length data.overlong data.train_on_prompt data.packing data.validation_split "
            "data.validation_path data.chat_template",
        )
        self.finish()

        self._timer = debounce(self, 350, self.inspect_now)
        model.changed.connect(self._on_changed)
        tasks.finished.connect(self._on_result)
        tasks.finished.connect(self._on_keys)
        tasks.failed.connect(self._on_failed)

    def apply_palette(self) -> None:
        """The histogram follows the window's light or dark look."""
        pal = self.palette()
        self.histogram.setBackground(pal.color(QPalette.ColorRole.Base))
        fg = pal.color(QPalette.ColorRole.Text)
        for axis in ("left", "bottom"):
            self.histogram.getAxis(axis).setPen(fg)
            self.histogram.getAxis(axis).setTextPen(fg)

    # -- inputs ----------------------------------------------------------------------------
    def set_model_ref(self, ref: str | None) -> None:
        """The model whose tokenizer measures the samples (None: format-only look)."""
        if ref != self.model_ref:
            self.model_ref = ref
            self._timer.start()

    def _pick_file(self) -> None:
        path, _ = QFileDialog.getOpenFileName(
            self,
            "Choose training data",
            str(self.model.base_dir or Path.home()),
            "Data (*.jsonl *.json *.csv *.tsv *.parquet *.txt *.gz *.zip *.tar *.tgz *.tar.bz2 *.tar.xz);;All files (*)",
        )
        if path:
            self.model.set_value("data", "path", path)

    def _pick_folder(self) -> None:
        folder = QFileDialog.getExistingDirectory(
            self, "Choose a saved datasets folder", str(self.model.base_dir or Path.home())
        )
        if folder:
            self.model.set_value("data", "path", folder)

    def _on_changed(self, section: str, name: str) -> None:
        if section in ("", "data") and name not in ("validation_split", "validation_path", "packing"):
            self.error = None  # it was about the data before this change
            self._timer.start()
        redraw = {("data", "max_length"), ("data", "packing"), ("train", "micro_batch_size")}
        if (section, name) in redraw and self.report:
            self._draw_histogram(self.report)

    # -- inspection ------------------------------------------------------------------------
    def inspect_now(self) -> None:
        self.error = None
        cfg = self.model.config
        if not cfg.data.path.strip():
            self.tasks.cancel("data")
            self._show_message("Choose a data file to see what it holds.")
            return
        self.detected.setText(f"Reading {cfg.data.path} …")
        self.tasks.submit(
            "data",
            {**data_request("data", cfg), "model_ref": self.model_ref, "samples": PREVIEW_ROWS,
             "shown": SHOWN_SAMPLES, "max_rows": PREVIEW_ROWS},
        )  # fmt: skip

    def _on_result(self, key: str, report: object) -> None:
        if key == "data":
            self.show_report(report)

    def _on_failed(self, key: str, exc: Exception, _tb: str) -> None:
        if key != "data":
            return
        hint = getattr(exc, "hint", None)
        self._show_message(str(exc) + (f"\n{hint}" if hint else ""), error=True)
        self.error = exc if isinstance(exc, QLoRAError) else None
        cfg = self.model.config
        if isinstance(exc, DataError) and exc.field in ("data.format", "data.columns"):
            self.tasks.submit("data-keys", data_request("keys", cfg))  # offer to map the columns

    def _on_keys(self, key: str, keys: object) -> None:
        if key == "data-keys":
            self._show_mapping(list(keys), unsure=True)

    def _show_message(self, text: str, error: bool = False) -> None:
        self.report = None
        self.detected.setText(text if not error else "")
        self.problems.setText(text if error else "")
        self.problems.setVisible(error)
        self.preview.clear()
        self.bars.setOpts(x=[], height=[], width=1)
        self.stats.setText("")

    # -- drawing ---------------------------------------------------------------------------
    def show_report(self, report: dict[str, Any]) -> None:
        self.report = report
        fmt = report.get("format", "?")
        ev = report.get("evidence") or {}
        reason = ev.get("reason") or ("set by data.format" if ev.get("given") else "")
        rows = report.get("rows", 0)
        usable = report.get("usable_rows", 0)
        limited = " (first rows only)" if report.get("limited_to_rows") and rows >= report["limited_to_rows"] else ""
        lines = [f"<b>Format: {html.escape(str(fmt))}</b> — {html.escape(reason)}"]
        lines.append(f"{rows:,} rows read{limited}, {usable:,} usable, {report.get('skipped_total', 0):,} skipped")
        if report.get("template"):
            lines.append(f"Chat template: {html.escape(str(report['template']))}")
        if report.get("note"):
            lines.append(html.escape(str(report["note"])))
        self.detected.setText("<br>".join(lines))
        problems = list(report.get("problems") or [])
        for reason_text, entry in (report.get("skipped") or {}).items():
            where = ", ".join(entry.get("where", [])[:3])
            problems.append(f"{entry.get('count', 0)} rows skipped: {reason_text}" + (f" ({where})" if where else ""))
        self.problems.setText("\n".join(f"• {p}" for p in problems))
        self.problems.setVisible(bool(problems))
        fits = ev.get("rows_fitting") or {}
        unsure = bool(fits) and (fits.get(fmt, 0) < ev.get("rows_examined", 0) or len(fits) > 1 and fmt == "text")
        self._show_mapping(
            list((ev.get("keys") or {}).keys()), unsure=unsure or bool(self.model.value("data", "columns"))
        )
        self._draw_samples(report.get("samples") or [])
        self._draw_histogram(report)

    def _draw_samples(self, samples: list[dict[str, Any]]) -> None:
        parts = [
            '<p style="margin:0 0 8px 0"><span style="background:#fde68a;color:#111">highlighted</span> = trained '
            "(the loss is computed there; ×0.2 after a part: its loss weight); plain = prompt, context only.</p>"
        ]
        for i, s in enumerate(samples, 1):
            facts = [f"{s.get('where', f'sample {i}')}"]
            if "tokens" in s:
                facts.append(f"{s['tokens']} tokens, {s.get('trained_tokens', 0)} trained")
                if s.get("over_max_length"):
                    facts.append("<span style='color:#dc2626'>longer than max length</span>")
                if not s.get("ends_with_eos", True):
                    facts.append("<span style='color:#d97706'>no end-of-sequence token</span>")
            body = []
            for seg in s.get("segments") or _format_only_segments(s):
                text = html.escape(str(seg.get("text", ""))).replace("\n", "↵<br>")
                weight = seg.get("weight", 1)
                mark = f'<sub style="color:#92400e">×{weight:g}</sub>' if seg.get("trained") and weight != 1 else ""
                body.append(
                    f'<span style="background:#fde68a;color:#111">{text}</span>{mark}' if seg.get("trained") else text
                )
            parts.append(
                f"<p style='margin:10px 0 2px 0'><b>{' · '.join(facts)}</b></p>"
                f"<div style='font-family:monospace; white-space:pre-wrap'>{''.join(body)}</div>"
            )
        if not samples:
            parts.append("<p>No samples to show.</p>")
        self.preview.setHtml("".join(parts))

    def _draw_histogram(self, report: dict[str, Any]) -> None:
        max_len = int(self.model.config.data.max_length)
        self.cut_line.setValue(max_len)
        lengths = np.asarray(report.get("lengths") or [], dtype=float)
        stats = report.get("token_stats") or {}
        if lengths.size == 0:
            self.bars.setOpts(x=[], height=[], width=1)
            self.stats.setText("Choose a model to measure the samples in tokens." if not stats else "")
            return
        top = max(float(lengths.max()), float(max_len)) * 1.05
        counts, edges = np.histogram(lengths, bins=50, range=(0, top))
        width = edges[1] - edges[0]
        centers = edges[:-1] + width / 2
        brushes = [pg.mkBrush("#dc2626" if c > max_len else "#3b82f6") for c in centers]
        self.bars.setOpts(x=centers, height=counts, width=width * 0.95, brushes=brushes)
        self.histogram.setXRange(0, top, padding=0.01)
        self.histogram.setYRange(0, max(int(counts.max()), 1) * 1.1, padding=0)
        over = int((lengths > max_len).sum())
        policy = self.model.config.data.overlong
        text = (
            f"{lengths.size:,} samples measured: min {int(lengths.min())}, median {int(np.median(lengths))}, "
            f"95% under {int(np.percentile(lengths, 95))}, max {int(lengths.max())} tokens."
        )
        if over:
            text += f" {over} ({over / lengths.size:.1%}) are longer than {max_len} and would be {policy}d."
        else:
            text += f" All fit in {max_len} tokens."
        cfg = self.model.config
        hint = None if cfg.data.packing else packing_hint(lengths, cfg.train.micro_batch_size, max_len)
        self.stats.setText(f"{text} {hint}" if hint else text)

    # -- column mapping --------------------------------------------------------------------
    def _show_mapping(self, keys: list[str], unsure: bool) -> None:
        self.keys = keys
        while self.mapping_form.rowCount():
            self.mapping_form.removeRow(0)
        self.mapping_combos = {}
        fmt = self.model.value("data", "format")
        if fmt == "auto":
            fmt = (self.report or {}).get("format", "alpaca")
        columns = dict(self.model.value("data", "columns") or {})
        for ours in DATA_FIELDS.get(fmt, ()):
            combo = QComboBox(objectName=f"map:{ours}")
            combo.addItem(SAME, None)
            for k in keys:
                if k != ours:
                    combo.addItem(k, k)
            if columns.get(ours):
                i = combo.findData(columns[ours])
                if i < 0:
                    combo.addItem(columns[ours], columns[ours])
                    i = combo.count() - 1
                combo.setCurrentIndex(i)
            combo.currentIndexChanged.connect(lambda _i, o=ours, c=combo: self._map(o, c.currentData()))
            self.mapping_combos[ours] = combo
            self.mapping_form.addRow(f"{ours} ({fmt})", combo)
        self.mapping_note.setText(
            ("The format is not certain: check which of your columns holds each field. " if unsure else "")
            + f"Your columns: {', '.join(keys) or '-'}."
        )
        self.mapping_box.setVisible(unsure and bool(self.mapping_combos))

    def _map(self, ours: str, theirs: str | None) -> None:
        columns = dict(self.model.value("data", "columns") or {})
        if theirs:
            columns[ours] = theirs
        else:
            columns.pop(ours, None)
        self.model.set_value("data", "columns", columns)


def _format_only_segments(sample: dict[str, Any]) -> list[dict[str, Any]]:
    """A sample read without a tokenizer (no model chosen yet) as (text, trained) segments: each turn
    as "role: content" (a weighted answer part by part, each with its weight), a prompt and its
    completion, or the text, trained where training would be."""
    if "messages" in sample:
        out: list[dict[str, Any]] = []
        for m in sample["messages"]:
            trained = bool(m.get("trained"))
            parts = m.get("parts") or [{"text": m.get("content"), "weight": 1}]
            out.append({"text": f"{m.get('role')}: ", "trained": False})
            turn = m.get("weight", 1)
            out += [{"text": str(p["text"]), "trained": trained, "weight": turn * p["weight"]} for p in parts]
            out.append({"text": "\n", "trained": False})
        return out
    if "prompt" in sample:
        return [
            {"text": f"{sample['prompt']}\n", "trained": False},
            {"text": str(sample.get("completion")), "trained": True},
        ]
    return [{"text": str(sample.get("text", "")), "trained": "text" in sample}]
