"""QLoRA Studio desktop front end (PySide6). Imports qlora_engine; never the reverse."""
