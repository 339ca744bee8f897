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


WINDOW_IN_USE = r"""
import json, sys
from PySide6.QtWidgets import QApplication
app = QApplication([])
from app.main_window import MainWindow
from PySide6.QtCore import QTimer, QEventLoop

w = MainWindow(demo_model=None)
w.ask_save_changes = lambda: "discard"
w.show()
model, data = sys.argv[1], sys.argv[2]
got = {}
w.model_page.info_changed.connect(lambda info: got.setdefault("model", info))
w.budget.updated.connect(lambda: got.__setitem__("budget", w.budget.result))
w.data_page.tasks.finished.connect(lambda key, r: got.setdefault(key, r))
w.config_model.set_values({("model", "ref"): model, ("data", "path"): data})
loop = QEventLoop()
def check():
    if {"model", "data"} <= set(got) and got.get("budget") is not None:
        loop.quit()
timer = QTimer(); timer.timeout.connect(check); timer.start(50)
QTimer.singleShot(int(sys.argv[3]) if len(sys.argv) > 3 else 240_000, loop.quit)
loop.exec()
result = {
    "layers": getattr(got.get("model"), "num_layers", None),
    "total": got["budget"]["estimate"].total if got.get("budget") else None,
    "data": sorted(got.get("data") or {})[:3],
    "got": sorted(got),
    "torch": sorted(m for m in ("torch", "transformers", "peft", "bitsandbytes") if m in sys.modules),
}
w.close()
print(json.dumps(result))
"""


def test_the_window_in_use_never_imports_torch(tiny_model_dir, text_data):
    """Model facts, the data report and the budget all come from the inspecting child process."""
    import json

    out = subprocess.run(
        [sys.executable, "-c", WINDOW_IN_USE, str(tiny_model_dir), str(text_data)],
        capture_output=True, text=True, timeout=300, env={**os.environ, "QT_QPA_PLATFORM": "offscreen"},
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["layers"] == 2 and result["total"] and result["data"], result
    assert result["torch"] == [], result
