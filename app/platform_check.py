"""Before Qt starts on Linux: can its xcb platform plugin load? If not, say which packages to install.

Qt's xcb plugin (the one that draws windows on an X11 desktop, and under XWayland) links
against a dozen small X libraries that a fresh Debian, Ubuntu or Fedora desktop does not all
have (``libxcb-cursor0`` since Qt 6.5, ``libxcb-icccm4``, ``libxcb-keysyms1`` ...). When one
is missing Qt prints "could not load the Qt platform plugin xcb" and aborts, which tells a
user nothing. This module asks the system's dynamic loader for each of those libraries, the
way Qt's plugin will, and names the missing ones with the package that ships each and the
one command that installs them.

Plain Python (ctypes), no Qt import: it runs before PySide6 loads anything.
"""

from __future__ import annotations

import ctypes
import os
import shutil
import sys
from dataclasses import dataclass

# soname -> (Debian/Ubuntu package, Fedora package): the X/xcb libraries PySide6's libqxcb.so and
# libQt6XcbQpa.so.6 link against (read with ldd from PySide6 6.x).
XCB_LIBRARIES: dict[str, tuple[str, str]] = {
    "libxcb.so.1": ("libxcb1", "libxcb"),
    "libX11.so.6": ("libx11-6", "libX11"),
    "libX11-xcb.so.1": ("libx11-xcb1", "libX11-xcb"),
    "libxcb-cursor.so.0": ("libxcb-cursor0", "xcb-util-cursor"),
    "libxcb-icccm.so.4": ("libxcb-icccm4", "xcb-util-wm"),
    "libxcb-keysyms.so.1": ("libxcb-keysyms1", "xcb-util-keysyms"),
    "libxcb-image.so.0": ("libxcb-image0", "xcb-util-image"),
    "libxcb-render-util.so.0": ("libxcb-render-util0", "xcb-util-renderutil"),
    "libxcb-util.so.1": ("libxcb-util1", "xcb-util"),
    "libxcb-randr.so.0": ("libxcb-randr0", "libxcb"),
    "libxcb-render.so.0": ("libxcb-render0", "libxcb"),
    "libxcb-shape.so.0": ("libxcb-shape0", "libxcb"),
    "libxcb-shm.so.0": ("libxcb-shm0", "libxcb"),
    "libxcb-sync.so.1": ("libxcb-sync1", "libxcb"),
    "libxcb-xfixes.so.0": ("libxcb-xfixes0", "libxcb"),
    "libxcb-xkb.so.1": ("libxcb-xkb1", "libxcb"),
    "libxkbcommon.so.0": ("libxkbcommon0", "libxkbcommon"),
    "libxkbcommon-x11.so.0": ("libxkbcommon-x11-0", "libxkbcommon-x11"),
    "libEGL.so.1": ("libegl1", "libglvnd-egl"),
    "libGL.so.1": ("libgl1", "libglvnd-glx"),
    "libfontconfig.so.1": ("libfontconfig1", "fontconfig"),
    "libdbus-1.so.3": ("libdbus-1-3", "dbus-libs"),
}


@dataclass(frozen=True)
class Missing:
    soname: str
    reason: str
    """The loader's own words (not found, file too short, wrong ELF class ...)."""
    debian: str
    fedora: str


def uses_xcb(environ: dict[str, str] | os._Environ = os.environ) -> bool:
    """Whether Qt will try its xcb plugin: on Linux, unless another platform was chosen."""
    if not sys.platform.startswith("linux"):
        return False
    chosen = environ.get("QT_QPA_PLATFORM", "").strip()
    # "xcb", "xcb;wayland" or unset: xcb is tried first. "wayland", "offscreen", "eglfs" ...: not.
    return not chosen or chosen.split(";")[0].split(":")[0] == "xcb"


def missing_libraries() -> list[Missing]:
    """The xcb plugin's libraries the dynamic loader cannot load, each with its packages."""
    out = []
    for soname, (deb, rpm) in XCB_LIBRARIES.items():
        try:
            ctypes.CDLL(soname, mode=os.RTLD_LAZY | os.RTLD_LOCAL)
        except OSError as e:
            reason = str(e)
            reason = reason.split(": ", 1)[1] if reason.startswith(soname + ": ") else reason
            out.append(Missing(soname, reason, deb, rpm))
    return out


def install_command(missing: list[Missing]) -> tuple[str, str]:
    """The apt and dnf command lines that install the missing libraries."""
    debs = sorted({m.debian for m in missing})
    rpms = sorted({m.fedora for m in missing})
    return "sudo apt install " + " ".join(debs), "sudo dnf install " + " ".join(rpms)


def report(missing: list[Missing]) -> str:
    apt, dnf = install_command(missing)
    lines = [
        "qlora-studio: the desktop window cannot open: Qt's X11 (xcb) platform plugin needs system libraries "
        "this machine does not have:",
    ]
    width = max(len(m.soname) for m in missing)
    lines += [
        f"  {m.soname:<{width}}  package {m.debian} (Fedora: {m.fedora}); loader says: {m.reason}" for m in missing
    ]
    lines += [
        "",
        "Install them, then start qlora-studio again:",
        f"  Debian / Ubuntu:  {apt}",
        f"  Fedora / RHEL:    {dnf}",
        "",
        "The headless engine needs none of them: `qlora-engine` works without a display.",
    ]
    if shutil.which("apt") is None and shutil.which("dnf") is not None:
        lines[-4], lines[-3] = lines[-3], lines[-4]  # the command for this machine first
    return "\n".join(lines)


def check() -> int | None:
    """None if Qt can start (or does not use xcb here); else prints the report and returns exit code 3."""
    if not uses_xcb():
        return None
    missing = missing_libraries()
    if not missing:
        return None
    print(report(missing), file=sys.stderr)
    return 3
