"""Light and dark looks that follow the system's colour scheme (or the user's choice).

Fusion style with a palette per scheme, plus a small style sheet (``qlora_engine/resources/styles/app.qss``)
whose ``@name`` colours are filled in here. ``QStyleHints.colorSchemeChanged`` re-applies it
when the system switches.
"""

from __future__ import annotations

from PySide6.QtCore import Qt
from PySide6.QtGui import QColor, QGuiApplication, QPalette
from PySide6.QtWidgets import QApplication, QLabel

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


def dark_palette() -> QPalette:
    p = QPalette()
    c = COLORS["dark"]
    base, window = QColor("#111827"), QColor("#18212f")
    for group in (QPalette.ColorGroup.Active, QPalette.ColorGroup.Inactive):
        p.setColor(group, QPalette.ColorRole.Window, window)
        p.setColor(group, QPalette.ColorRole.WindowText, QColor(c["text"]))
        p.setColor(group, QPalette.ColorRole.Base, base)
        p.setColor(group, QPalette.ColorRole.AlternateBase, QColor("#1f2937"))
        p.setColor(group, QPalette.ColorRole.Text, QColor(c["text"]))
        p.setColor(group, QPalette.ColorRole.Button, QColor("#243041"))
        p.setColor(group, QPalette.ColorRole.ButtonText, QColor(c["text"]))
        p.setColor(group, QPalette.ColorRole.Highlight, QColor(c["accent"]))
        p.setColor(group, QPalette.ColorRole.HighlightedText, QColor("white"))
        p.setColor(group, QPalette.ColorRole.ToolTipBase, QColor("#1f2937"))
        p.setColor(group, QPalette.ColorRole.ToolTipText, QColor(c["text"]))
        p.setColor(group, QPalette.ColorRole.PlaceholderText, QColor(c["muted"]))
        p.setColor(group, QPalette.ColorRole.Link, QColor("#93c5fd"))
    for role in (QPalette.ColorRole.Text, QPalette.ColorRole.WindowText, QPalette.ColorRole.ButtonText):
        p.setColor(QPalette.ColorGroup.Disabled, role, QColor("#6b7280"))
    p.setColor(QPalette.ColorGroup.Disabled, QPalette.ColorRole.Base, QColor("#161e2b"))
    p.setColor(QPalette.ColorGroup.Disabled, QPalette.ColorRole.Button, QColor("#1c2533"))
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
