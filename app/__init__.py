"""QLoRA Studio desktop front end (PySide6). Imports qlora_engine; never the reverse."""

from app.compat import pin_bools as _pin_bools

_pin_bools()  # PySide6 6.12.0's emit() reference bug (see app/compat.py), before any signal is emitted
