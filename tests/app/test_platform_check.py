"""qlora-studio on a desktop without Qt's xcb libraries: it names the packages and the command, and exits.

The libraries are really missing for the loader: either they are absent from this machine
(checked independently with ldd on PySide6's own xcb plugin), or the test hides one in a
private mount namespace (the library file replaced by an empty one, so the dynamic loader
cannot load it), and runs the real ``qlora-studio`` entry point there.
"""

from __future__ import annotations

import ctypes
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from app.platform_check import XCB_LIBRARIES, uses_xcb

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="Qt's xcb plugin is Linux only")

ROOT = Path(__file__).resolve().parents[2]
START_APP = "import sys; from app.main import main; sys.exit(main([]))"


def xcb_plugin() -> Path:
    import PySide6

    return Path(PySide6.__file__).parent / "Qt" / "plugins" / "platforms" / "libqxcb.so"


def not_found_by_ldd() -> set[str]:
    """The libraries Qt's real xcb plugin needs that this machine's loader cannot find (ground truth)."""
    out = subprocess.run(["ldd", str(xcb_plugin())], capture_output=True, text=True).stdout
    return set(re.findall(r"^\s*(\S+) => not found", out, re.MULTILINE))


def app_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("QT_QPA_PLATFORM", "DISPLAY", "WAYLAND_DISPLAY")}
    return {**env, "PYTHONPATH": str(ROOT), **extra}


def loaded_path(soname: str) -> Path | None:
    """Where the loader finds ``soname`` on this machine (None if it cannot load it)."""
    try:
        ctypes.CDLL(soname)
    except OSError:
        return None
    for line in Path("/proc/self/maps").read_text().splitlines():
        parts = line.split()
        if len(parts) >= 6 and Path(parts[5]).name.startswith(soname):
            return Path(parts[5])
    return None


def test_every_library_ldd_misses_is_in_the_table():
    """The check's table covers what the real plugin links against, so nothing missing goes unnamed."""
    if shutil.which("ldd") is None:
        pytest.skip("no ldd on this machine")
    assert not_found_by_ldd() <= set(XCB_LIBRARIES)


def test_libraries_missing_on_this_machine_are_named_with_the_commands():
    if shutil.which("ldd") is None:
        pytest.skip("no ldd on this machine")
    missing = not_found_by_ldd()
    if not missing:
        pytest.skip("every xcb library is installed here; the mount-namespace test hides one")
    out = subprocess.run([sys.executable, "-c", START_APP], capture_output=True, text=True, env=app_env(), timeout=120)
    assert out.returncode == 3, out.stderr
    apt = next(line for line in out.stderr.splitlines() if "sudo apt install" in line)
    dnf = next(line for line in out.stderr.splitlines() if "sudo dnf install" in line)
    for soname in missing:
        deb, rpm = XCB_LIBRARIES[soname]
        assert soname in out.stderr and deb in apt.split() and rpm in dnf.split()
    assert "could not load the Qt platform plugin" not in out.stderr


def test_a_library_hidden_from_the_loader_is_named(tmp_path):
    """libxcb-cursor0 (the one Qt 6.5 added) hidden in a private mount namespace: the app names it."""
    soname = "libxcb-cursor.so.0"
    real = loaded_path(soname)
    if real is None:
        pytest.skip(f"{soname} is not installed here (the test above covers a missing library)")
    if shutil.which("unshare") is None:
        pytest.skip("no unshare: cannot hide a library from the loader here")
    script = (
        f"mount --bind /dev/null {real} || exit 77; "
        # inside the namespace the loader really cannot load it
        f"{sys.executable} -c \"import ctypes; ctypes.CDLL('{soname}')\" 2>/dev/null && exit 78; "
        f'exec {sys.executable} -c "{START_APP}"'
    )
    out = subprocess.run(
        ["unshare", "--user", "--map-root-user", "--mount", "sh", "-c", script],
        capture_output=True,
        text=True,
        env=app_env(QT_QPA_PLATFORM="xcb"),
        timeout=120,
    )
    if out.returncode == 77 or "unshare:" in out.stderr:
        pytest.skip(f"cannot make a private mount namespace here: {out.stderr.strip()[:200]}")
    assert out.returncode != 78, "the library was not hidden"
    assert out.returncode == 3, out.stderr
    apt = next(line for line in out.stderr.splitlines() if "sudo apt install" in line)
    dnf = next(line for line in out.stderr.splitlines() if "sudo dnf install" in line)
    assert soname in out.stderr
    assert "libxcb-cursor0" in apt.split() and "xcb-util-cursor" in dnf.split()
    # outside the namespace the library loads: the check reported what the loader saw, not a list
    assert loaded_path(soname) == real


def test_other_platforms_are_not_checked():
    assert uses_xcb({}) == sys.platform.startswith("linux")
    assert uses_xcb({"QT_QPA_PLATFORM": "xcb"})
    assert not uses_xcb({"QT_QPA_PLATFORM": "offscreen"})
    assert not uses_xcb({"QT_QPA_PLATFORM": "wayland"})
