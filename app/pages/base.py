"""What every configuration page has: a title, a short explanation, a scrolling body of groups."""

from __future__ import annotations

from PySide6.QtWidgets import QFrame, QGroupBox, QLabel, QScrollArea, QVBoxLayout, QWidget

from app.config_model import ConfigModel
from app.fields import FieldBinding, FieldForm
from app.theme import note


class Page(QWidget):
    """A scrolling page of groups of bound fields; ``bindings`` holds every field on it."""

    title = "Page"
    subtitle = ""

    def __init__(self, model: ConfigModel, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.model = model
        self.bindings: dict[str, FieldBinding] = {}
        outer = QVBoxLayout(self)
        outer.setContentsMargins(0, 0, 0, 0)
        self.scroll = QScrollArea(widgetResizable=True, frameShape=QFrame.Shape.NoFrame)
        outer.addWidget(self.scroll)
        body = QWidget(objectName="pageBody")
        self.scroll.setWidget(body)
        self.body = QVBoxLayout(body)
        self.body.setContentsMargins(18, 14, 18, 14)
        self.body.setSpacing(12)
        heading = QLabel(self.title, objectName="pageTitle")
        self.body.addWidget(heading)
        if self.subtitle:
            self.body.addWidget(note(self.subtitle))

    def group(self, title: str, fields: list[tuple[str, str]] | None = None) -> tuple[QGroupBox, FieldForm]:
        """A titled group holding a form of the given fields (more can be added to the form)."""
        box = QGroupBox(title)
        lay = QVBoxLayout(box)
        form = FieldForm(self.model, fields or [])
        lay.addWidget(form)
        self.bindings.update(form.bindings)
        self.body.addWidget(box)
        return box, form

    def add_binding(self, form: FieldForm, section: str, name: str, wrap=None) -> FieldBinding:
        b = form.add(self.model, section, name, wrap)
        self.bindings[b.key] = b
        return b

    def finish(self) -> None:
        self.body.addStretch(1)

    def reveal(self, key: str) -> bool:
        """Scroll to a field and focus it; False if the field is not on this page."""
        b = self.bindings.get(key)
        if b is None:
            return False
        self.scroll.ensureWidgetVisible(b.editor)
        b.focus()
        return True
