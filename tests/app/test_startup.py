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
