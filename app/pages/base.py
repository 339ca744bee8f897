"""What every configuration page has: a title, a short explanation, a scrolling body of groups."""

from __future__ import annotations

from PySide6.QtWidgets import QFrame, QGroupBox, QLabel, QScrollArea, QWidget

from app.config_model import ConfigModel
from app.fields import FieldBinding, FieldForm
from app.theme import holder, note, vbox


class Page(QWidget):
    """A scrolling page of groups of bound fields; ``bindings`` holds every field on it."""

    title = "Page"
    subtitle = ""

    def __init__(self, model: ConfigModel, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.model = model
        self.bindings: dict[str, FieldBinding] = {}
        self.scroll = QScrollArea(widgetResizable=True, frameShape=QFrame.Shape.NoFrame)
        vbox(self.scroll, parent=self, margins=0)
        heading = QLabel(self.title, objectName="pageTitle")
        self.body = vbox(heading, note(self.subtitle) if self.subtitle else None, margins=(18, 14, 18, 14), spacing=12)
        self.scroll.setWidget(holder(self.body, "pageBody"))

    def group(self, title: str, fields: str = "") -> tuple[QGroupBox, FieldForm]:
        """A titled group holding a form of the given fields, ``"lora.rank lora.alpha"`` (more can be added)."""
        box = QGroupBox(title)
        form = FieldForm(self.model, [tuple(key.split(".")) for key in fields.split()])
        vbox(form, parent=box)
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
