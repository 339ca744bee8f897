"""The budget panel: the VRAM estimate as a stacked bar against the chosen card, always in view.

Every change of the configuration, the GPU or the data statistics schedules one estimate
(coalesced within the same event-loop turn) on a background thread of its own, so neither a
slow estimate nor a model inspection on another thread can hold up the form. The estimate
comes from ``qlora_engine.budget`` and reads the model's config only, never its weights.
Over budget the panel turns red and lists the changes that would make the run fit; a click
applies one to the configuration.
"""

from __future__ import annotations

from typing import Any

from PySide6.QtCore import QRectF, Qt, QTimer, Signal
from PySide6.QtGui import QColor, QPainter, QPalette, QPen
from PySide6.QtWidgets import (
    QCheckBox,
    QComboBox,
    QDoubleSpinBox,
    QFrame,
    QGridLayout,
    QLabel,
    QPushButton,
    QScrollArea,
    QSizePolicy,
    QToolButton,
    QVBoxLayout,
    QWidget,
)

from app import gpu_cards
from app.config_model import ConfigModel
from app.inspector import Inspector
from app.run_catalog import absolute_config
from app.theme import hbox, holder, note, restyle, vbox
from qlora_engine import gpu as gpu_facts
from qlora_engine.budget.estimate import ABSENT_WHEN_ZERO, VramEstimate
from qlora_engine.budget.fit import FitAdvice, Suggestion
from qlora_engine.config import ConfigError, TrainConfig
from qlora_engine.decisions import Decision

GIB = float(2**30)
PALETTE = [
    "#2563eb", "#0ea5e9", "#14b8a6", "#22c55e", "#84cc16", "#eab308", "#f97316", "#ef4444", "#a855f7", "#ec4899",
    "#64748b", "#94a3b8",
]  # fmt: skip


TARGET_CARDS_MIB = {8: 8188, 12: 12282, 16: 16376, 24: 24564, 48: 49140, 80: 81559}
"""Cards to plan for on another machine: nominal GB -> the memory NVML reports for the common card of
that size (the smaller where two differ: RTX 4060 8 GB, 4070 12 GB, 4080 16 GB, 4090 24 GB, RTX A6000
48 GB, H100 80 GB), so "fits" here means fits there."""
CUSTOM_CARD = {"plan_gb": None}
"""The selector's data for a planned card of the size in the spin box (a listed one: ``{"plan_gb": GB}``)."""
SEVERAL = "several"
"""The selector's data for "Several GPUs" (two cards or more here): the cards ticked below it."""


FIT_TITLE = "To make it fit, click a change:"
FASTER_TITLE = "Faster, and it still fits:"


def gib(n: float | None) -> str:
    return "-" if n is None else f"{n / GIB:.2f} GiB"


def compute_budget(cfg: TrainConfig, gpu: gpu_facts.GpuInfo | None, data_stats: dict | None) -> dict:
    """Estimate (and fit advice when a card is chosen), in this process: for tests and scripts.

    The window asks its inspecting child instead (:func:`budget_request`, :func:`budget_from_answer`):
    reading a model's config goes through transformers, which imports torch.
    """
    from qlora_engine.inspect_server import Inspector  # the child's own code, run here

    return budget_from_answer(Inspector().answer(budget_request(cfg, gpu, data_stats)))


def budget_request(
    cfg: TrainConfig, gpu: gpu_facts.GpuInfo | None, data_stats: dict | None, world_size: int = 1
) -> dict:
    """The inspecting child's ``budget`` request for this configuration and card (one of ``world_size``)."""
    return {
        "kind": "budget",
        "config": cfg.to_dict(),
        "base_dir": str(cfg.base_dir) if cfg.base_dir else None,
        "gpu_bytes": gpu.total_bytes if gpu is not None else None,
        "gpu_name": gpu.name if gpu is not None else None,
        # no card: the CPU, where no CUDA context exists to count; a planned card counts one
        "cuda": gpu is not None,
        "data_stats": data_stats,
        "world_size": world_size,
    }


def budget_from_answer(answer: dict) -> dict:
    """The child's plain answer as the estimate, the advice and the decision the panel draws."""
    advice = answer.get("advice")
    if advice is not None:
        advice = FitAdvice(
            **{
                **advice,
                "estimate": VramEstimate(**advice["estimate"]),
                "suggestions": [Suggestion(**x) for x in advice.get("suggestions") or []],
                "faster": Suggestion(**advice["faster"]) if advice.get("faster") else None,
            }
        )
    auto, strategy, dense = answer.get("checkpointing"), answer.get("strategy"), answer.get("dequantized")
    return {
        "estimate": VramEstimate(**answer["estimate"]),
        "advice": advice,
        "checkpointing": Decision.from_dict(auto) if auto else None,
        "strategy": Decision.from_dict(strategy) if strategy else None,
        "dequantized": Decision.from_dict(dense) if dense else None,
        "gpu_bytes": answer.get("gpu_bytes"),
        "world_size": answer.get("world_size") or 1,
        "help": answer.get("help") or {},
    }


class StackedBar(QWidget):
    """One horizontal bar of components (bytes) with the card's capacity marked."""

    def __init__(self, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.parts: list[tuple[str, float, QColor]] = []
        self.capacity: float | None = None
        self.low: float | None = None
        self.high: float | None = None
        self.setMinimumHeight(34)
        self.setSizePolicy(QSizePolicy.Policy.Expanding, QSizePolicy.Policy.Fixed)

    def set_parts(self, parts: list[tuple[str, float, QColor]], capacity: float | None, low=None, high=None) -> None:
        self.parts, self.capacity, self.low, self.high = parts, capacity, low, high
        self.setToolTip("\n".join(f"{name}: {gib(v)}" for name, v, _ in parts))
        self.update()

    @property
    def total(self) -> float:
        return sum(v for _, v, _ in self.parts)

    def paintEvent(self, _event) -> None:  # noqa: N802 - Qt's name
        p = QPainter(self)
        p.setRenderHint(QPainter.RenderHint.Antialiasing)
        pal = self.palette()
        r = QRectF(self.rect()).adjusted(1, 6, -1, -6)
        p.setPen(Qt.PenStyle.NoPen)
        p.setBrush(pal.color(QPalette.ColorRole.AlternateBase))
        p.drawRoundedRect(r, 4, 4)
        scale_max = max(self.total, self.capacity or 0.0, self.high or 0.0) * 1.04 or 1.0
        x = r.left()
        for _name, v, color in self.parts:
            w = r.width() * v / scale_max
            p.setBrush(color)
            p.drawRect(QRectF(x, r.top(), max(w, 0.0), r.height()))
            x += w
        if self.high and self.low:
            p.setPen(QPen(pal.color(QPalette.ColorRole.Text), 1))
            lo_x = r.left() + r.width() * self.low / scale_max
            hi_x = r.left() + r.width() * self.high / scale_max
            mid = r.center().y()
            p.drawLine(int(lo_x), int(mid), int(hi_x), int(mid))
        if self.capacity:
            cx = r.left() + r.width() * self.capacity / scale_max
            over = self.total > self.capacity
            p.setPen(QPen(QColor("#dc2626") if over else pal.color(QPalette.ColorRole.Text), 2))
            p.drawLine(int(cx), int(r.top() - 5), int(cx), int(r.bottom() + 5))
        p.end()


class BudgetPanel(QFrame):
    """The right-hand panel. ``updated`` fires after every redraw (the tests wait on it)."""

    updated = Signal()
    gpu_changed = Signal(object)

    def __init__(self, model: ConfigModel, tasks: Inspector, parent: QWidget | None = None) -> None:
        super().__init__(parent, objectName="budgetPanel", minimumWidth=290, maximumWidth=380)
        self.model = model
        self.tasks = tasks
        self.data_stats: dict | None = None
        self.result: dict | None = None
        self.error: str | None = None
        self.gpus: list[gpu_facts.GpuInfo] = []
        self.suggestion_buttons: list[QPushButton] = []
        self._suggestion_cards: list[QFrame] = []

        title = QLabel("VRAM budget", objectName="panelTitle")
        self.gpu_combo = QComboBox(objectName="gpuSelector")
        self.gpu_combo.setToolTip(
            "The card to train on; the estimate is compared with its memory. The 'plan for' entries size the run "
            "for a card in another machine (this one's GPU, if any, is not used for the estimate). 'Several GPUs' "
            "trains on the cards ticked below it (one process each); the estimate is then one card's."
        )
        self.target_gib = QDoubleSpinBox(  # the range before the value: properties are set in this order
            objectName="targetCardGib", minimum=1.0, maximum=1024.0, decimals=1, value=24.0, suffix=" GiB",
            toolTip="The memory of the card to plan for, as nvidia-smi shows it (MiB / 1024)", visible=False,
        )  # fmt: skip
        self.target_gib.valueChanged.connect(lambda *_: self._timer.start())
        refresh_tip = "Look for GPUs again (free memory changes as other programs run)"
        self.refresh_gpus_button = QToolButton(text="⟳", toolTip=refresh_tip, clicked=self.refresh_gpus)
        self.cards_row = QWidget(objectName="gpuCards")  # "Several GPUs": a box per card, four a row (the panel is narrow)
        self.cards_layout = QGridLayout(self.cards_row)
        self.cards_layout.setContentsMargins(0, 0, 0, 0)
        self.cards_layout.addWidget(QLabel("Train on:"), 0, 0, 1, 4)
        self.card_boxes: dict[int, QCheckBox] = {}
        self.cards_row.setVisible(False)
        self.headline = QLabel("-", objectName="budgetHeadline")
        self.status = note(name="budgetStatus")
        self.bar = StackedBar()
        self.legend = QGridLayout(horizontalSpacing=8, verticalSpacing=2)
        self.largest = note()
        self.reasons = note()
        self.suggest_title = note(FIT_TITLE, "suggestTitle")
        self.suggest_title.setVisible(False)  # until there is something to suggest
        self.suggest_box = QVBoxLayout()

        # The panel scrolls rather than stretch the window: with a long list of fixes it would
        # otherwise be taller than a 1280×800 screen at 125% (640 logical px).
        inner = QWidget(objectName="budgetContents")
        scroll = QScrollArea(widgetResizable=True, frameShape=QFrame.Shape.NoFrame)
        scroll.setHorizontalScrollBarPolicy(Qt.ScrollBarPolicy.ScrollBarAlwaysOff)
        scroll.setWidget(inner)
        scroll.viewport().setAutoFillBackground(False)
        inner.setAutoFillBackground(False)
        vbox(scroll, parent=self, margins=0)
        gpu_row = hbox((self.gpu_combo, 1), self.target_gib, self.refresh_gpus_button)
        vbox(
            title, gpu_row, self.cards_row, self.headline, self.bar, self.status, holder(self.legend), self.largest,
            self.suggest_title, holder(self.suggest_box), self.reasons, 1, parent=inner,
        )

        self._timer = QTimer(self, singleShot=True, interval=0, timeout=self.recompute)  # one estimate per loop turn
        model.changed.connect(lambda *_: self._timer.start())
        self.gpu_combo.currentIndexChanged.connect(self._on_gpu_changed)
        tasks.finished.connect(self._on_result)
        tasks.failed.connect(self._on_failed)
        self.refresh_gpus()

    # -- GPUs ------------------------------------------------------------------------------
    def refresh_gpus(self) -> None:
        report = gpu_cards.list_cards()
        self.set_gpus(list(report.gpus), report.reason)

    def set_gpus(self, gpus: list[gpu_facts.GpuInfo], reason: str | None = None) -> None:
        """Fill the selector (the first GPU is chosen unless the previous choice is still there)."""
        current = [g.index for g in self.selected_gpus()]
        planned = self.gpu_combo.currentData()
        self.gpus = list(gpus)
        self.gpu_combo.blockSignals(True)
        self.gpu_combo.clear()
        for g in self.gpus:
            self.gpu_combo.addItem(g.label(), g.index)
        if len(self.gpus) > 1:
            self.gpu_combo.addItem(f"Several GPUs (of {len(self.gpus)})", SEVERAL)
        self._make_card_boxes()
        self.gpu_combo.addItem("CPU (no GPU)" if not self.gpus else "CPU", -1)
        if not self.gpus:
            self.gpu_combo.setItemData(0, reason or "no NVIDIA GPU", Qt.ItemDataRole.ToolTipRole)
        self.gpu_combo.insertSeparator(self.gpu_combo.count())
        for gb in TARGET_CARDS_MIB:
            self.gpu_combo.addItem(f"Plan for {'an' if gb in (8, 80) else 'a'} {gb} GB card", {"plan_gb": gb})
        self.gpu_combo.addItem("Plan for a card of …", CUSTOM_CARD)
        if isinstance(planned, dict):  # a planned card stays chosen when the local GPUs are looked up again
            self.gpu_combo.setCurrentIndex(max(self.gpu_combo.findData(planned), 0))
        self.gpu_combo.blockSignals(False)
        if current and not self.select_cards(current):
            self.gpu_combo.setCurrentIndex(0)
        self._on_gpu_changed()

    def _make_card_boxes(self) -> None:
        for box in self.card_boxes.values():
            box.deleteLater()
        self.card_boxes = {}
        if len(self.gpus) < 2:
            return
        for i, g in enumerate(self.gpus):
            box = QCheckBox(gpu_cards.line_name(g.index), toolTip=g.label(), toggled=self._on_card_ticked)
            self.cards_layout.addWidget(box, 1 + i // 4, i % 4)
            self.card_boxes[g.index] = box

    def _on_card_ticked(self, *_args) -> None:
        ticked = [box for box in self.card_boxes.values() if box.isChecked()]
        for box in self.card_boxes.values():  # the last ticked card stays: no card is not a choice here
            box.setEnabled(len(ticked) != 1 or not box.isChecked())
        if self.gpu_combo.currentData() == SEVERAL:
            self._on_gpu_changed()

    def selected_gpu(self) -> gpu_facts.GpuInfo | None:
        """The one GPU of this machine chosen to train on (None: several, the CPU, or a planned card)."""
        cards = self.selected_gpus()
        return cards[0] if len(cards) == 1 else None

    def selected_gpus(self) -> list[gpu_facts.GpuInfo]:
        """This machine's GPUs chosen to train on, by number ([]: the CPU, or a card planned for another machine)."""
        data = self.gpu_combo.currentData()
        if data == SEVERAL:
            return [g for g in self.gpus if self.card_boxes[g.index].isChecked()]
        return [g for g in self.gpus if g.index == data] if isinstance(data, int) else []

    def select_cards(self, indices: list[int]) -> bool:
        """Choose these cards of this machine (one: that card alone; several: ticked); False if one is missing."""
        if not indices or any(i not in {g.index for g in self.gpus} for i in indices):
            return False
        if len(indices) == 1:
            self.gpu_combo.setCurrentIndex(self.gpu_combo.findData(indices[0]))
            return True
        for index, box in self.card_boxes.items():
            box.blockSignals(True)
            box.setChecked(index in indices)
            box.blockSignals(False)
        self._on_card_ticked()
        self.gpu_combo.setCurrentIndex(self.gpu_combo.findData(SEVERAL))
        return True

    def planned_card(self) -> gpu_facts.GpuInfo | None:
        """The card the estimate is compared with: this machine's, or one chosen to plan for (None: CPU)."""
        data = self.gpu_combo.currentData()
        if isinstance(data, dict):
            gb = data["plan_gb"]
            size = int((TARGET_CARDS_MIB[gb] if gb is not None else self.target_gib.value() * 1024) * 2**20)
            name = f"{gb} GB card" if gb is not None else f"{size / GIB:g} GiB card"
            return gpu_facts.GpuInfo(index=-2, name=name, total_bytes=size, free_bytes=size, used_bytes=0)
        cards = self.selected_gpus()  # several: each holds one share; the smallest card is the limit
        return min(cards, key=lambda g: g.total_bytes) if cards else None

    def plan_for(self, gib_or_gb: int | float) -> None:
        """Choose a card to plan for: a listed size in GB (8, 12, 16, 24, 48, 80) or any size in GiB."""
        i = self.gpu_combo.findData({"plan_gb": gib_or_gb}) if gib_or_gb in TARGET_CARDS_MIB else -1
        if i < 0:
            self.target_gib.setValue(float(gib_or_gb))
            i = self.gpu_combo.findData(CUSTOM_CARD)
        self.gpu_combo.setCurrentIndex(i)

    def _on_gpu_changed(self, *_args) -> None:
        self.target_gib.setVisible(self.gpu_combo.currentData() == CUSTOM_CARD)
        several = self.gpu_combo.currentData() == SEVERAL
        if several and not self.selected_gpus():  # first time: every card
            self.select_cards([g.index for g in self.gpus])
            return
        self.cards_row.setVisible(several)
        self.gpu_changed.emit(self.selected_gpus())
        self._timer.start()

    # -- inputs ----------------------------------------------------------------------------
    def set_data_stats(self, stats: dict | None) -> None:
        if stats != self.data_stats:
            self.data_stats = stats
            self._timer.start()

    def set_model_info(self, _info: Any) -> None:
        """A model was inspected (its files may have changed): estimate again."""
        self._timer.start()

    # -- computing -------------------------------------------------------------------------
    def recompute(self) -> None:
        cfg = self.model.config
        g = self.planned_card()
        if not cfg.model.ref.strip():
            self.tasks.cancel("budget")
            self._draw_empty("Choose a model to see its memory estimate.")
            return
        world = max(1, len(self.selected_gpus()))
        self.tasks.submit("budget", budget_request(absolute_config(cfg), g, self.data_stats, world))

    def _on_result(self, key: str, answer: object) -> None:
        if key == "budget":
            result = budget_from_answer(answer)
            self.result, self.error = result, None
            self._draw(result)
            self.updated.emit()

    def _on_failed(self, key: str, exc: Exception, _tb: str) -> None:
        if key != "budget":
            return
        self.result = None
        if isinstance(exc, ModuleNotFoundError) and (exc.name or "").startswith("qlora_engine.budget"):
            self.error = "The VRAM estimator is not installed in this build."
        else:
            self.error = str(exc)
        self._draw_empty(self.error)
        self.updated.emit()

    # -- drawing ---------------------------------------------------------------------------
    def _clear_legend(self) -> None:
        while self.legend.count():
            item = self.legend.takeAt(0)
            if item.widget():
                item.widget().deleteLater()

    def _set_suggestions(self, suggestions: list[Any], title: str = FIT_TITLE) -> None:
        """One card per suggestion: the sentence (wrapped: the panel is narrow) and an Apply button."""
        self.suggest_title.setText(title)
        self.suggest_title.setToolTip(
            "The change still fits at the top of the estimate's range." if title == FASTER_TITLE else ""
        )
        for card in self._suggestion_cards:
            card.deleteLater()
        self._suggestion_cards = []
        self.suggestion_buttons = []
        for s in suggestions:
            card = QFrame(objectName="suggestion")
            b = QPushButton("Apply", toolTip="Apply: " + ", ".join(s.overrides))
            b.setAccessibleName(f"Apply: {s.description}")
            b.clicked.connect(lambda _=False, o=list(s.overrides): self.apply(o))
            text = QLabel(s.description, wordWrap=True)
            hbox((text, 1), (b, 0, Qt.AlignmentFlag.AlignVCenter), parent=card, margins=(8, 6, 6, 6))
            self.suggest_box.addWidget(card)
            self._suggestion_cards.append(card)
            self.suggestion_buttons.append(b)
        self.suggest_title.setVisible(bool(suggestions))

    def apply(self, overrides: list[str]) -> None:
        try:
            self.model.apply_overrides(overrides)
        except ConfigError as e:
            self.status.setText(f"Could not apply {', '.join(overrides)}: {e}")

    def _set_state(self, state: str) -> None:
        for w in (self, self.headline, self.status):
            restyle(w, state=state)

    def _draw_empty(self, text: str) -> None:
        self.headline.setText("-")
        self.status.setText(text)
        self.bar.set_parts([], None)
        self._clear_legend()
        self._set_suggestions([])
        self.largest.setText("")
        self.reasons.setText("")
        self._set_state("none")

    def _draw(self, result: dict) -> None:
        est, advice, capacity = result["estimate"], result["advice"], result["gpu_bytes"]
        comps = [(k, v) for k, v in getattr(est, "components", {}).items() if v or k not in ABSENT_WHEN_ZERO]
        parts = [(name, float(v), QColor(PALETTE[i % len(PALETTE)])) for i, (name, v) in enumerate(comps)]
        total = float(est.total)
        self.bar.set_parts(parts, capacity, getattr(est, "low", None), getattr(est, "high", None))
        self._clear_legend()
        for i, (name, v, color) in enumerate(parts):
            swatch = QLabel()
            swatch.setFixedSize(10, 10)
            swatch.setStyleSheet(f"background:{color.name()}; border-radius:2px")
            label = QLabel(name.replace("_", " "), toolTip=result.get("help", {}).get(name, ""))
            self.legend.addWidget(swatch, i, 0)
            self.legend.addWidget(label, i, 1)
            value = QLabel(gib(v), alignment=Qt.AlignmentFlag.AlignRight)
            self.legend.addWidget(value, i, 2)
        approx = " (approximate)" if getattr(est, "approximate", False) else ""
        if capacity:
            fits = total <= capacity if getattr(est, "fits", None) is None else bool(est.fits)
            world = result.get("world_size", 1)
            self.headline.setText(f"{gib(total)} of {gib(capacity)}" + (" per GPU" if world > 1 else ""))
            spill = int(getattr(est, "spill_to_cpu_bytes", 0) or 0)
            if fits and spill:
                text = f"Fits by moving {gib(spill)} of optimizer state to CPU RAM (paged optimizer): slower steps"
            elif fits:
                text = f"Fits, with {gib(capacity - total)} to spare"
            else:
                text = f"Does not fit: {gib(total - capacity)} over this card"
            status = [f"{text}{approx}."]
            self._set_state("ok" if fits else "over")
            suggestions = list(getattr(advice, "suggestions", []) or []) if not fits else []
            faster = getattr(advice, "faster", None) if fits else None
        else:
            self.headline.setText(gib(total))
            status = ["Training on the CPU: no VRAM limit, but slow (fine for tests and demos)." + approx]
            self._set_state("cpu")
            suggestions, faster = [], None
        low, high = getattr(est, "low", None), getattr(est, "high", None)
        if low and high:
            status.append(f"Expected peak between {low / GIB:.2f} and {high / GIB:.2f} GiB.")
        auto = result.get("checkpointing")
        if auto is not None and capacity:  # what train.gradient_checkpointing auto chose for this card
            status.append(f"Gradient checkpointing (auto): {auto.summary}, {auto.reason}")
        dense = result.get("dequantized")
        if dense is not None and capacity:  # and what train.keep_dequantized auto chose
            status.append(f"Weights kept dequantized (auto): {dense.summary}, {dense.reason}")
        strategy = result.get("strategy")
        if strategy is not None and strategy.requested == "auto" and result.get("world_size", 1) > 1:
            status.append(f"Strategy (auto): {strategy.summary}, {strategy.reason}")
        self.status.setText("\n".join(status))
        if faster is not None:
            self._set_suggestions([faster], FASTER_TITLE)
        else:
            self._set_suggestions(suggestions)
        self.largest.setText(_largest_text(advice))
        reasons = list(getattr(est, "reasons", []) or [])
        self.reasons.setText("\n".join(f"• {r}" for r in reasons[:6]))


def _largest_text(advice: Any) -> str:
    if advice is None:
        return ""
    mb, seq = advice.max_micro_batch_size, advice.max_sequence_length
    if not mb and not seq:
        return "Not even one sequence fits on this card with these settings."
    return (
        f"Largest micro-batch that fits: {mb}" + (" (none)" if not mb else "") + "\n"
        f"Longest sequence that fits (micro-batch as set): {seq:,} tokens"
    )
