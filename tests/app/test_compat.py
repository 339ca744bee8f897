"""The PySide6 6.12.0 emit() reference bug cannot take the app down (see app/compat.py)."""

from __future__ import annotations

import subprocess
import sys


def test_many_emits_do_not_free_true():
    code = (
        "import app, sys\n"
        "from PySide6.QtCore import QObject, Signal\n"
        "class A(QObject):\n    s = Signal(str, bool)\n"
        "a = A()\na.s.connect(lambda k, v: None)\n"
        "for i in range(50_000):\n    a.s.emit('k', i % 2 == 0)\n"
        "print('survived')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "survived" in out.stdout
