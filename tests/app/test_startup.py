"""Start-up: the window's modules load without the ML stack (torch alone takes seconds to import)."""

from __future__ import annotations

import os
import subprocess
import sys


def test_the_main_window_imports_without_torch_or_transformers():
    probe = "import sys, app.main_window; print(sorted(m for m in ('torch', 'transformers') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120,
                         env={**os.environ, "QT_QPA_PLATFORM": "offscreen"})
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]", out.stdout


def test_the_app_has_its_icon_and_desktop_file(qapp):
    from app.main import brand

    brand(qapp)
    icon = qapp.windowIcon()
    assert not icon.isNull() and not icon.pixmap(64, 64).isNull()  # the SVG renders
    assert qapp.desktopFileName() == "qlora-studio"
