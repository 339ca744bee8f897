"""An exception no code caught ends in the crash log and one dialog, and the window keeps answering."""

from __future__ import annotations

import sys

import pytest
from PySide6.QtCore import QTimer
from PySide6.QtWidgets import QMessageBox

from app import crash


@pytest.mark.qt_no_exception_capture  # let the exception reach our hook, as in the real app
def test_uncaught_exception_in_a_slot_is_logged_and_shown(qtbot, tmp_path, monkeypatch):
    monkeypatch.setenv("QLORA_STUDIO_HOME", str(tmp_path))
    shown = []
    # The dialog is modal; record what it would say instead of blocking the test on it.
    monkeypatch.setattr(QMessageBox, "critical", lambda parent, title, text: shown.append((title, text)))
    monkeypatch.setattr(sys, "excepthook", sys.excepthook)  # restored after the test
    crash.install()

    def broken_slot():
        raise ZeroDivisionError("a bug in a slot")

    QTimer.singleShot(0, broken_slot)  # a real slot, raising inside the Qt event loop
    log = crash.crash_log()
    qtbot.waitUntil(log.is_file, timeout=5000)
    assert log.is_file() and str(tmp_path) in str(log)
    content = log.read_text()
    assert "ZeroDivisionError: a bug in a slot" in content and "broken_slot" in content
    assert shown and "a bug in a slot" in shown[0][1] and str(log) in shown[0][1]
    # the event loop still runs afterwards
    fired = []
    QTimer.singleShot(0, lambda: fired.append(True))
    qtbot.waitUntil(lambda: bool(fired), timeout=2000)


def test_ctrl_c_is_not_swallowed(monkeypatch, tmp_path):
    monkeypatch.setenv("QLORA_STUDIO_HOME", str(tmp_path))
    monkeypatch.setattr(sys, "excepthook", sys.excepthook)
    seen = []
    monkeypatch.setattr(sys, "__excepthook__", lambda *a: seen.append(a[0]))
    crash.install()
    sys.excepthook(KeyboardInterrupt, KeyboardInterrupt(), None)
    assert seen == [KeyboardInterrupt] and not crash.crash_log().exists()


def test_a_hub_token_in_an_error_never_reaches_the_crash_log_or_the_dialog(monkeypatch, tmp_path):
    secret = "hf_CrAsHtOkEn0123456789abcdefghijkl"
    monkeypatch.setenv("QLORA_STUDIO_HOME", str(tmp_path))
    monkeypatch.setenv("HF_TOKEN", secret)
    shown = []
    monkeypatch.setattr(QMessageBox, "critical", lambda parent, title, text: shown.append(text))
    try:
        raise RuntimeError(f"401 for https://huggingface.co/x?token={secret}")
    except RuntimeError as e:
        log = crash.report(type(e), e, e.__traceback__)
    content = log.read_text()
    assert secret not in content and "token=hf_***" in content
    assert secret not in shown[0] and "hf_***" in shown[0]
