"""The run charts (pyqtgraph): loss, learning rate, gradient norm, tokens/s and VRAM.

One ``GraphicsLayoutWidget`` holds all five plots, so a redraw is one scene update. The view
calls :meth:`RunCharts.draw` with a :class:`RunRecord` at most a few times a second; each
curve is replaced with ``setData``. That stays cheap however long the run: the record keeps
each series under a few thousand points (:mod:`app.series`), and the plots clip to the view
and downsample to the pixels on top of that.
"""

from __future__ import annotations

import numpy as np
import pyqtgraph as pg
from PySide6.QtCore import Qt
from PySide6.QtGui import QColor, QPalette
from PySide6.QtWidgets import QWidget

from app.run_record import MEMORY_SERIES, RunRecord
from app.theme import vbox

SERIES_COLORS = {
    # Each line at least 3:1 against the plot's background in its look (WCAG 1.4.11 for graphics; tested):
    # darker shades on the light look's white, lighter ones on the dark look's near-black.
    "light": {
        "train loss": "#2563eb",
        "eval loss": "#c2410c",
        "learning rate": "#047857",
        "grad norm": "#9333ea",
        "tokens/s": "#0369a1",
        "GPU used (NVML)": "#dc2626",
        "this run (NVML)": "#be123c",
        "torch allocated": "#15803d",
        "torch reserved": "#a16207",
        "paged out to CPU RAM": "#7c3aed",
        "estimate": "#64748b",
        "note": "#6b7280",
    },
    "dark": {
        "train loss": "#60a5fa",
        "eval loss": "#fb923c",
        "learning rate": "#34d399",
        "grad norm": "#c084fc",
        "tokens/s": "#38bdf8",
        "GPU used (NVML)": "#f87171",
        "this run (NVML)": "#fb7185",
        "torch allocated": "#4ade80",
        "torch reserved": "#facc15",
        "paged out to CPU RAM": "#a78bfa",
        "estimate": "#94a3b8",
        "note": "#9ca3af",
    },
}
GPU_LINE_SCHEMES = {
    # a run over several cards draws one line per card ("GPU 0", "GPU 2"), coloured in the order they appear
    "light": ["#dc2626", "#2563eb", "#047857", "#a16207", "#9333ea", "#0369a1", "#be123c", "#4d7c0f"],
    "dark": ["#f87171", "#60a5fa", "#34d399", "#facc15", "#c084fc", "#38bdf8", "#fb7185", "#a3e635"],
}
OVERLAY_SCHEMES = {
    "light": ["#e11d48", "#0f766e", "#7c3aed", "#a16207", "#1d4ed8"],
    "dark": ["#fb7185", "#2dd4bf", "#a78bfa", "#facc15", "#93c5fd"],
}
COLORS = SERIES_COLORS["light"]


def scheme_of(background: QColor) -> str:
    """'dark' when the plot's background is dark (the look in force), else 'light'."""
    return "dark" if background.lightness() < 128 else "light"


class RunCharts(QWidget):
    """Five live plots of a run. ``curves`` maps a series name to its plot item (tests read it)."""

    def __init__(self, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.view = pg.GraphicsLayoutWidget()
        self.view.setObjectName("runCharts")
        vbox(self.view, parent=self, margins=0)
        self.plots: dict[str, pg.PlotItem] = {}
        self.curves: dict[str, pg.PlotDataItem] = {}
        self._plot_of: dict[str, pg.PlotItem] = {}
        self._overlays: list[pg.PlotDataItem] = []
        self._drawn_version = -1
        self.scheme = "light"
        self.colors = dict(SERIES_COLORS["light"])
        self._gpu_lines: list[str] = []
        """The per-card lines made so far (a run over several cards), in the order they appeared."""

        self.loss = self._plot("loss", "Loss", "step", row=0, col=0, colspan=2)
        self.vram = self._plot("vram", "VRAM (GiB)", "seconds", row=0, col=2)
        self.lr = self._plot("lr", "Learning rate", "step", row=1, col=0)
        self.gnorm = self._plot("gnorm", "Gradient norm", "step", row=1, col=1)
        self.tps = self._plot("tps", "Tokens / s", "step", row=1, col=2)
        self.loss.addLegend(offset=(-10, 10))
        self.vram.addLegend(offset=(-10, 10), labelTextSize="8pt")

        self._curve(self.loss, "train loss")
        self._curve(self.loss, "eval loss", symbol="o", width=2)
        self._curve(self.lr, "learning rate")
        self._curve(self.gnorm, "grad norm")
        self._curve(self.tps, "tokens/s")
        for name in MEMORY_SERIES.values():
            self._curve(self.vram, name)
        self.estimate_line = pg.InfiniteLine(
            angle=0,
            movable=False,
            pen=pg.mkPen(COLORS["estimate"], width=2, style=Qt.PenStyle.DashLine),
            label="predicted peak",
            labelOpts={"position": 0.05, "color": COLORS["estimate"], "anchors": [(0, 1), (0, 1)]},
        )
        self.estimate_line.setVisible(False)
        self.vram.addItem(self.estimate_line, ignoreBounds=False)
        self.vram_note = pg.TextItem("", anchor=(0.5, 0.5), color="#6b7280")
        self.vram_note.setVisible(False)
        self.vram.addItem(self.vram_note, ignoreBounds=True)
        self.apply_palette(self.palette())

    def _plot(self, key: str, title: str, xlabel: str, row: int, col: int, colspan: int = 1) -> pg.PlotItem:
        p = self.view.addPlot(row=row, col=col, colspan=colspan, title=title)
        if key == "loss":
            # grid lines are drawn with the axes on every repaint and double its cost: loss only
            p.showGrid(x=False, y=True, alpha=0.12)
        p.setLabel("bottom", xlabel)
        p.setClipToView(True)
        p.setDownsampling(auto=True, mode="peak")
        p.setMenuEnabled(True)
        # every quantity drawn is >= 0 (loss, rate, norm, tokens/s, GiB, steps, seconds): a chart
        # with one point must not autoscale around it into negative values
        p.getViewBox().setLimits(xMin=0, yMin=0)
        self.plots[key] = p
        return p

    def _curve(self, plot: pg.PlotItem, name: str, symbol: str | None = None, width: int = 2) -> pg.PlotDataItem:
        pen = pg.mkPen(self.colors[name], width=width)
        kw = {"symbol": symbol, "symbolSize": 7, "symbolBrush": self.colors[name], "symbolPen": None} if symbol else {}
        c = plot.plot([], [], pen=pen, **kw)  # named in the legend once it has data (_legend)
        c.opts["name"] = name
        self.curves[name] = c
        self._plot_of[name] = plot
        return c

    def _legend(self, plot: pg.PlotItem, curve: pg.PlotDataItem, has_data: bool) -> None:
        """Only series with data appear in a legend (a CPU run has no GPU memory lines)."""
        legend = plot.legend
        if legend is None:
            return
        listed = any(getattr(sample, "item", sample) is curve for sample, _label in legend.items)
        if has_data and not listed:
            legend.addItem(curve, curve.opts["name"])
        elif not has_data and listed:
            legend.removeItem(curve)

    # -- drawing ---------------------------------------------------------------------------
    def clear(self) -> None:
        for name, c in self.curves.items():
            c.setData([], [])
            self._legend(self._plot_of[name], c, False)
        self.estimate_line.setVisible(False)
        self.vram_note.setVisible(False)
        self.set_overlays({})
        for p in self.plots.values():  # the axes of the run drawn before go too (a zoom, its ranges)
            p.enableAutoRange()
        self._drawn_version = -1

    def draw(self, rec: RunRecord, force: bool = False) -> None:
        if rec.version == self._drawn_version and not force:
            return
        self._drawn_version = rec.version
        for name, attr in (
            ("train loss", "loss"),
            ("learning rate", "learning_rate"),
            ("grad norm", "grad_norm"),
            ("tokens/s", "tokens_per_second"),
        ):
            xs, ys = rec.series(attr)
            self.curves[name].setData(np.asarray(xs, float), _finite(ys))
        self._legend(self.loss, self.curves["train loss"], rec.has_steps)
        xs, ys = rec.eval_series()
        self.curves["eval loss"].setData(np.asarray(xs, float), _finite(ys))
        self._legend(self.loss, self.curves["eval loss"], bool(xs))
        mem = rec.memory_series()
        for name in mem.keys() - self.curves.keys():  # a card's own line (a run over several), from its first sample
            scheme = GPU_LINE_SCHEMES[self.scheme]
            self.colors[name] = scheme[len(self._gpu_lines) % len(scheme)]
            self._gpu_lines.append(name)
            self._curve(self.vram, name)
        for name in [*MEMORY_SERIES.values(), *self._gpu_lines]:
            x, y = mem.get(name, ([], []))
            self.curves[name].setData(np.asarray(x, float), np.asarray(y, float))
            self._legend(self.vram, self.curves[name], bool(x))
        peak = rec.estimate_peak
        self.estimate_line.setVisible(peak is not None)
        if peak is not None:
            self.estimate_line.setValue(peak / 2**30)
            self.estimate_line.label.setFormat(f"predicted peak {peak_text(peak)}")
        on_cpu = rec.started is not None and str(rec.started.device).lower().startswith("cpu")
        if on_cpu and not mem:
            self.vram_note.setText("CPU run: no GPU memory")
            self.vram_note.setPos(0.5, (peak / 2**30) * 0.8 if peak else 0.5)
        self.vram_note.setVisible(on_cpu and not mem)

    def set_overlays(self, runs: dict[str, tuple[list[float], list[float]]]) -> None:
        """Draw other runs' train-loss curves on the loss plot (dashed), for comparison."""
        for item in self._overlays:
            self.loss.removeItem(item)
            legend = self.loss.legend
            if legend is not None:
                legend.removeItem(item)
        self._overlays = []
        for i, (name, (xs, ys)) in enumerate(runs.items()):
            overlay = OVERLAY_SCHEMES[scheme_of(self.view.backgroundBrush().color())]
            pen = pg.mkPen(overlay[i % len(overlay)], width=2, style=Qt.PenStyle.DashLine)
            item = self.loss.plot(np.asarray(xs, float), _finite(ys), pen=pen, name=name)
            self._overlays.append(item)

    @property
    def overlay_count(self) -> int:
        return len(self._overlays)

    def apply_palette(self, pal: QPalette) -> None:
        """Follow the window's light or dark look."""
        bg = pal.color(QPalette.ColorRole.Base)
        fg = pal.color(QPalette.ColorRole.Text)
        self.view.setBackground(bg)
        for p in self.plots.values():
            for axis in ("left", "bottom"):
                ax = p.getAxis(axis)
                ax.setPen(pg.mkPen(QColor(fg)))
                ax.setTextPen(pg.mkPen(QColor(fg)))
            p.setTitle(p.titleLabel.text, color=fg.name())
            if p.legend is not None:
                p.legend.setLabelTextColor(fg)
                for _sample, label in p.legend.items:  # labels already drawn keep their colour otherwise
                    label.setText(label.text, color=fg.name())
        self.scheme = scheme_of(bg)
        gpu_lines = GPU_LINE_SCHEMES[self.scheme]
        self.colors = {
            **SERIES_COLORS[self.scheme],
            **{name: gpu_lines[i % len(gpu_lines)] for i, name in enumerate(self._gpu_lines)},
        }
        for name, curve in self.curves.items():
            curve.setPen(pg.mkPen(self.colors[name], width=curve.opts["pen"].width()))
            if curve.opts.get("symbol"):
                curve.setSymbolBrush(self.colors[name])
        est = self.colors["estimate"]
        self.estimate_line.setPen(pg.mkPen(est, width=2, style=Qt.PenStyle.DashLine))
        self.estimate_line.label.setColor(est)
        self.vram_note.setColor(self.colors["note"])


def peak_text(n_bytes: float) -> str:
    """``1.37 GiB``, or ``35 MiB`` below one GiB (a tiny model's peak is not ``0.00 GiB``)."""
    return f"{n_bytes / 2**30:.2f} GiB" if n_bytes >= 2**30 else f"{n_bytes / 2**20:.0f} MiB"


def _finite(ys: list[float]) -> np.ndarray:
    arr = np.asarray(ys, float)
    arr[~np.isfinite(arr)] = np.nan
    return arr
