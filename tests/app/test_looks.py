"""Looks: contrast of check boxes and chart legends in both looks, and a window that fits 1024 × 640.

Contrast is WCAG 2's ratio, computed from what is really on screen: the pixels of a rendered check
box (its frame against the window around it; 3:1 for the parts of a control) and the colours the
chart legends were given (labels 4.5:1 like any text, line samples 3:1 as graphics) against the
plot's background. The screenshots of the same in docs/screenshots/looks-1024x640/ are made by
``python -m app.screenshots --looks --look dark`` (and ``--look light``).
"""

from __future__ import annotations

import pytest
from PySide6.QtCore import QPoint
from PySide6.QtGui import QColor
from PySide6.QtWidgets import (
    QAbstractScrollArea,
    QApplication,
    QCheckBox,
    QStyle,
    QStyleOptionButton,
    QVBoxLayout,
    QWidget,
)

from app.charts import RunCharts
from app.main_window import PAGES
from app.run_record import RunRecord
from app.theme import apply_theme, contrast_ratio
from qlora_engine.events import read_events

LOOKS = ["light", "dark"]


@pytest.fixture
def look(request, qapp):
    apply_theme(qapp, request.param)
    yield request.param
    apply_theme(qapp, "light")


def _indicator_pixels(box: QCheckBox, host: QWidget) -> tuple[QColor, QColor, QColor]:
    """(frame, inside, window around it) as rendered: the left edge of the indicator at mid-height."""
    opt = QStyleOptionButton()
    box.initStyleOption(opt)
    rect = box.style().subElementRect(QStyle.SubElement.SE_CheckBoxIndicator, opt, box)
    image = host.grab().toImage()
    origin = box.mapTo(host, QPoint(0, 0))
    y = origin.y() + rect.center().y()
    x = origin.x() + rect.left()
    return (
        QColor(image.pixel(x, y)),
        QColor(image.pixel(rect.center().x() + origin.x(), y)),
        QColor(image.pixel(x - 3, y)),
    )


@pytest.mark.parametrize("look", LOOKS, indirect=True)
def test_check_boxes_stand_out_from_the_window(qtbot, look):
    host = QWidget()
    lay = QVBoxLayout(host)
    lay.setContentsMargins(12, 12, 12, 12)
    unchecked, checked = QCheckBox("unchecked"), QCheckBox("checked")
    checked.setChecked(True)
    lay.addWidget(unchecked)
    lay.addWidget(checked)
    qtbot.addWidget(host)
    host.resize(200, 80)
    host.show()
    qtbot.waitExposed(host)
    frame, inside, around = _indicator_pixels(unchecked, host)
    assert contrast_ratio(frame, around) >= 3.0, (look, frame.name(), around.name())
    assert contrast_ratio(frame, inside) >= 3.0, (look, frame.name(), inside.name())
    _frame, fill, around = _indicator_pixels(checked, host)
    assert contrast_ratio(fill, around) >= 3.0, (look, fill.name(), around.name())
    text = host.palette().color(host.palette().ColorRole.WindowText)
    assert contrast_ratio(text, around) >= 4.5


@pytest.mark.parametrize("look", LOOKS, indirect=True)
def test_chart_legends_are_readable(qtbot, look, events_dir):
    charts = RunCharts()
    qtbot.addWidget(charts)
    charts.apply_palette(QApplication.instance().palette())
    charts.draw(RunRecord.from_events(read_events(events_dir / "normal.jsonl")))
    charts.set_overlays({"earlier run": ([1, 2, 3], [6.5, 6.4, 6.3]), "another": ([1, 2], [6.6, 6.2])})
    background = charts.view.backgroundBrush().color()
    assert (background.lightness() < 128) == (look == "dark")
    legends = [p.legend for p in charts.plots.values() if p.legend is not None]
    samples = [(sample, label) for legend in legends for sample, label in legend.items]
    assert len(samples) >= 3  # train loss and the two overlays, at least
    for sample, label in samples:
        text = QColor(label.opts["color"])
        assert contrast_ratio(text, background) >= 4.5, (look, label.text, text.name())
        line = sample.item.opts["pen"].color()
        assert contrast_ratio(line, background) >= 3.0, (look, label.text, line.name())
    # every series colour of this look, listed or not yet (GPU lines appear only on a GPU)
    for name, curve in charts.curves.items():
        assert contrast_ratio(curve.opts["pen"].color(), background) >= 3.0, (look, name)
    assert contrast_ratio(charts.estimate_line.pen.color(), background) >= 3.0


@pytest.mark.parametrize("look", LOOKS, indirect=True)
def test_the_window_fits_1024_by_640_with_nothing_cut(qtbot, make_window, tiny_model_dir, look):
    """A 1280×800 screen at 125% (or 1366×768, which leaves 1,093 × 614): less a title bar and a panel."""
    w = make_window()
    with qtbot.waitSignal(w.budget.updated, timeout=60_000):
        w.config_model.set_value("model", "ref", str(tiny_model_dir))
    with qtbot.waitSignal(w.budget.updated, timeout=20_000):  # over the card: the panel at its fullest
        w.budget.plan_for(1.0)
        w.config_model.set_values({("train", "micro_batch_size"): 64, ("data", "max_length"): 4096})
    assert w.budget.suggestion_buttons
    w.resize(1024, 560)
    for key, _ in PAGES:
        w.show_page(key)
        qtbot.wait(20)
        hint = w.minimumSizeHint()
        assert hint.width() <= 1024 and hint.height() <= 560, (key, hint)
        assert w.width() == 1024 and w.height() == 560
        # nothing wider than the page: no sideways scrolling anywhere on it
        for area in w.pages[key].findChildren(QAbstractScrollArea):
            if area.isVisibleTo(w) and area.horizontalScrollBar().isVisibleTo(w):
                pytest.fail(f"{key}: {area.objectName() or type(area).__name__} scrolls sideways")
