"""Light and dark looks that follow the system's colour scheme (or the user's choice).

Fusion style with a palette per scheme, plus a small style sheet (``qlora_engine/resources/styles/app.qss``)
whose ``@name`` colours are filled in here. ``QStyleHints.colorSchemeChanged`` re-applies it
when the system switches. Also the small builders every page uses: ``note``, ``hbox``/``vbox``,
``holder``, ``row`` and ``restyle``.
"""

from __future__ import annotations

from PySide6.QtCore import Qt
from PySide6.QtGui import QColor, QGuiApplication, QPalette
from PySide6.QtWidgets import QApplication, QBoxLayout, QHBoxLayout, QLabel, QLayout, QVBoxLayout, QWidget

from qlora_engine.resources import path as resource_path

COLORS = {
    "light": {
        "text": "#111827",
        "muted": "#6b7280",
        "error": "#dc2626",
        "ok": "#15803d",
        "accent": "#2563eb",
        "accent_hover": "#1d4ed8",
        "border": "#d1d5db",
        "panel": "#f3f4f6",
        "banner": "#eff6ff",
        "selected": "#e0e7ff",
        # a check box's frame: at least 3:1 against the window and the field (WCAG 1.4.11, tested)
        "check_border": "#6b7280",
        "check_disabled": "#b6bac2",
    },
    "dark": {
        "text": "#e5e7eb",
        "muted": "#9ca3af",
        "error": "#f87171",
        "ok": "#4ade80",
        "accent": "#3b82f6",
        "accent_hover": "#60a5fa",
        "border": "#374151",
        "panel": "#1f2937",
        "banner": "#1e293b",
        "selected": "#312e81",
        "check_border": "#9ca3af",
        "check_disabled": "#4b5563",
    },
}


def system_scheme() -> str:
    hints = QGuiApplication.styleHints()
    scheme = hints.colorScheme() if hasattr(hints, "colorScheme") else Qt.ColorScheme.Unknown
    return "dark" if scheme == Qt.ColorScheme.Dark else "light"


DARK_ROLES = {  # the dark palette's colours, in its active and inactive groups
    "Window": "#18212f", "WindowText": "text", "Base": "#111827", "AlternateBase": "#1f2937", "Text": "text",
    "Button": "#243041", "ButtonText": "text", "Highlight": "accent", "HighlightedText": "white",
    "ToolTipBase": "#1f2937", "ToolTipText": "text", "PlaceholderText": "muted", "Link": "#93c5fd",
}
DARK_DISABLED = {"Text": "#6b7280", "WindowText": "#6b7280", "ButtonText": "#6b7280", "Base": "#161e2b", "Button": "#1c2533"}


def dark_palette() -> QPalette:
    p = QPalette()
    for role, color in DARK_ROLES.items():
        for group in (QPalette.ColorGroup.Active, QPalette.ColorGroup.Inactive):
            p.setColor(group, getattr(QPalette.ColorRole, role), QColor(COLORS["dark"].get(color, color)))
    for role, color in DARK_DISABLED.items():
        p.setColor(QPalette.ColorGroup.Disabled, getattr(QPalette.ColorRole, role), QColor(color))
    return p


def style_sheet(scheme: str) -> str:
    text = resource_path("styles", "app.qss").read_text(encoding="utf-8")
    text = text.replace("@check_image", resource_path("styles", "check.svg").as_posix())
    # longest names first, so @accent_hover is not read as @accent + "_hover"
    for name, value in sorted(COLORS[scheme].items(), key=lambda kv: -len(kv[0])):
        text = text.replace(f"@{name}", value)
    return text


def apply_theme(app: QApplication, mode: str = "system") -> str:
    """Apply 'light', 'dark' or 'system' (follow the desktop); returns the scheme applied."""
    scheme = system_scheme() if mode == "system" else mode
    if app.style().name().lower() != "fusion":
        app.setStyle("Fusion")
    app.setPalette(dark_palette() if scheme == "dark" else app.style().standardPalette())
    sheet = style_sheet(scheme)
    if app.styleSheet() != sheet:  # re-polishing every widget costs a good fraction of a second
        app.setStyleSheet(sheet)
    app.setProperty("qlora_scheme", scheme)
    return scheme


def relative_luminance(color: str | QColor) -> float:
    """WCAG 2 relative luminance of an sRGB colour."""
    c = QColor(color)

    def channel(v: float) -> float:
        return v / 12.92 if v <= 0.04045 else ((v + 0.055) / 1.055) ** 2.4

    return 0.2126 * channel(c.redF()) + 0.7152 * channel(c.greenF()) + 0.0722 * channel(c.blueF())


def contrast_ratio(a: str | QColor, b: str | QColor) -> float:
    """WCAG 2 contrast ratio (1 to 21): 4.5 for text, 3 for the parts of a control and for graphics."""
    la, lb = sorted((relative_luminance(a), relative_luminance(b)), reverse=True)
    return (la + 0.05) / (lb + 0.05)


def note(text: str = "", name: str = "hint") -> QLabel:
    """A label that wraps its text, styled by its object name (``hint``: the grey small print)."""
    return QLabel(text, objectName=name, wordWrap=True)


def restyle(widget: QWidget, **properties: object) -> None:
    """Set style-sheet properties (``state``, ``invalid``) and polish the widget again so they show."""
    for name, value in properties.items():
        widget.setProperty(name, value)
    widget.style().unpolish(widget)
    widget.style().polish(widget)


def _fill(lay: QBoxLayout, items: tuple, margins: int | tuple[int, int, int, int] | None, spacing: int | None):
    if margins is not None:
        lay.setContentsMargins(*((margins,) * 4 if isinstance(margins, int) else margins))
    if spacing is not None:
        lay.setSpacing(spacing)
    for item in items:
        args = item if isinstance(item, tuple) else (item,)  # (widget or layout, stretch[, alignment])
        if isinstance(args[0], str):
            lay.addWidget(QLabel(args[0]), *args[1:])
        elif isinstance(args[0], int):
            lay.addStretch(args[0])
        elif isinstance(args[0], QLayout):
            lay.addLayout(*args)
        elif args[0] is not None:
            lay.addWidget(*args)
    return lay


def hbox(*items, parent: QWidget | None = None, margins=None, spacing: int | None = None) -> QHBoxLayout:
    """A row of widgets, layouts, labels (a str), stretches (an int) and ``(item, stretch)`` pairs."""
    return _fill(QHBoxLayout(parent), items, margins, spacing)


def vbox(*items, parent: QWidget | None = None, margins=None, spacing: int | None = None) -> QVBoxLayout:
    """A column, as :func:`hbox`."""
    return _fill(QVBoxLayout(parent), items, margins, spacing)


def holder(layout: QLayout, name: str = "") -> QWidget:
    """A plain widget that holds a layout (to put a layout where a widget goes)."""
    w = QWidget(objectName=name)
    w.setLayout(layout)
    return w


def row(*items) -> QWidget:
    """A widget holding a row of items (as :func:`hbox`), without margins."""
    return holder(hbox(*items, margins=0))
