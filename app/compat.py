"""Work-arounds for bugs in the libraries under the app, each detected before it is applied.

PySide6 6.12.0 on CPython before 3.12: ``SignalInstance.emit()`` returns ``True`` without
taking a new reference, so every emit from Python (ours, and pyqtgraph's on every redraw)
costs ``True`` one reference. After enough emits the interpreter frees ``True`` and aborts
("Fatal Python error: bool_dealloc"), mid-session or at exit. CPython 3.12 made ``True``
and ``False`` immortal; here we do the same for the affected combination: the two objects
are static and never freed, so a very large reference count changes nothing else.
"""

from __future__ import annotations

import sys

_applied = False


def emit_leaks_true() -> bool:
    """True if emitting a Python-defined signal drops a reference of ``True`` (the bug)."""
    from PySide6.QtCore import QObject, Signal  # lazy: Qt is probed only on CPython < 3.12, where the bug can exist

    class _Probe(QObject):
        ping = Signal()

    probe = _Probe()
    before = sys.getrefcount(True)
    for _ in range(8):
        probe.ping.emit()
    return sys.getrefcount(True) < before


def pin_bools() -> bool:
    """Make ``True``/``False`` effectively immortal where the emit bug is present; True if applied."""
    global _applied
    if _applied or sys.version_info >= (3, 12) or sys.implementation.name != "cpython":
        return _applied
    if not emit_leaks_true():
        return False
    import ctypes  # lazy: needed only where the bug is present

    for obj in (True, False):
        # ob_refcnt is the first field of every CPython object
        ctypes.c_ssize_t.from_address(id(obj)).value += 1 << 40
    _applied = True
    return True
