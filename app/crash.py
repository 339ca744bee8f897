"""The last line of defence: an exception nothing caught (in a slot, a timer, a paint) ends in
a log file and one dialog, never in a silent exit or a window that stops answering."""

from __future__ import annotations

import datetime
import sys
import traceback
from pathlib import Path
from types import TracebackType

from PySide6.QtWidgets import QApplication, QMessageBox

from app.settings import logs_dir
from qlora_engine.events import redact


def crash_log() -> Path:
    return logs_dir() / "crash.log"


def report(exc_type: type[BaseException], exc: BaseException, tb: TracebackType | None) -> Path:
    """Append the traceback to the crash log, tell the user (if a window can), return the log's path."""
    text = redact("".join(traceback.format_exception(exc_type, exc, tb)))
    path = crash_log()
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a", encoding="utf-8") as fh:
        fh.write(f"--- {datetime.datetime.now().isoformat(timespec='seconds')}\n{text}\n")
    print(text, file=sys.__stderr__, flush=True)
    if QApplication.instance() is not None:
        QMessageBox.critical(
            QApplication.activeWindow(),
            "QLoRA Studio: unexpected error",
            f"Something went wrong inside the app: {redact(f'{exc_type.__name__}: {exc}')}\n\n"
            f"Your runs are not affected (they run in their own process). The details were written to\n{path}\n"
            "Please include that file if you report the problem.",
        )
    return path


def install() -> None:
    """Route uncaught exceptions to :func:`report` (Ctrl-C in a terminal still quits)."""

    def hook(exc_type: type[BaseException], exc: BaseException, tb: TracebackType | None) -> None:
        if issubclass(exc_type, KeyboardInterrupt):
            sys.__excepthook__(exc_type, exc, tb)
            return
        report(exc_type, exc, tb)

    sys.excepthook = hook
