"""Render the app icon (``resources/icons/qlora-studio.svg``) to every file the packages need.

    python packaging/render_icons.py

writes, under ``packaging/icons/``:

- ``hicolor/<N>x<N>/apps/qlora-studio.png`` for each size in :data:`SIZES` and
  ``hicolor/scalable/apps/qlora-studio.svg``: the freedesktop icon theme layout, so
  ``install-desktop.sh`` copies the tree as it is;
- ``qlora-studio.ico`` (Windows: the executable's icon) and ``qlora-studio.icns`` (macOS:
  the app bundle's icon), both holding PNG images, which every supported Windows and macOS
  reads. They are written by hand here because Qt writes neither format without extra
  image-format plugins, and Pillow is not a dependency.

The outputs are checked in (a Windows or macOS build machine needs them and must not need
this script); run it again after editing the SVG. ``tests/test_packaging_files.py`` checks
that they exist, are the sizes they claim, and that the scalable copy matches the source.
"""

from __future__ import annotations

import os
import shutil
import struct
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SOURCE = ROOT / "qlora_engine" / "resources" / "icons" / "qlora-studio.svg"
OUT = ROOT / "packaging" / "icons"
NAME = "qlora-studio"

SIZES = (16, 22, 24, 32, 48, 64, 128, 256, 512)
"""The hicolor sizes: what desktops ask for in menus, docks, task switchers and file managers."""

ICO_SIZES = (16, 24, 32, 48, 64, 128, 256)
"""Windows reads 256 as the largest entry of an icon file."""

ICNS_TYPES = {  # OSType -> pixel size; all of them hold PNG data
    b"icp4": 16,
    b"icp5": 32,
    b"ic11": 32,  # 16@2x
    b"ic07": 128,
    b"ic12": 64,  # 32@2x
    b"ic08": 256,
    b"ic13": 256,  # 128@2x
    b"ic09": 512,
    b"ic14": 512,  # 256@2x
    b"ic10": 1024,  # 512@2x
}


def png_path(size: int, root: Path = OUT) -> Path:
    """Where the PNG of one size lives (the freedesktop hicolor layout)."""
    return root / "hicolor" / f"{size}x{size}" / "apps" / f"{NAME}.png"


def render_png(size: int) -> bytes:
    """The SVG drawn at ``size`` x ``size`` pixels on a transparent background, as PNG bytes."""
    from PySide6.QtCore import QBuffer, QByteArray, QIODevice, Qt
    from PySide6.QtGui import QImage, QPainter
    from PySide6.QtSvg import QSvgRenderer

    renderer = QSvgRenderer(str(SOURCE))
    if not renderer.isValid():
        raise SystemExit(f"{SOURCE}: not a valid SVG")
    image = QImage(size, size, QImage.Format.Format_ARGB32_Premultiplied)
    image.fill(Qt.GlobalColor.transparent)
    painter = QPainter(image)
    painter.setRenderHint(QPainter.RenderHint.Antialiasing)
    painter.setRenderHint(QPainter.RenderHint.SmoothPixmapTransform)
    renderer.render(painter)
    painter.end()
    data = QByteArray()
    buf = QBuffer(data)
    buf.open(QIODevice.OpenModeFlag.WriteOnly)
    if not image.convertToFormat(QImage.Format.Format_ARGB32).save(buf, "PNG"):
        raise SystemExit(f"could not encode the {size}px icon as PNG")
    buf.close()
    return bytes(data.data())


def ico_bytes(pngs: dict[int, bytes]) -> bytes:
    """An ICO file whose entries are PNG images (Windows Vista and later read these)."""
    sizes = sorted(pngs)
    header = struct.pack("<HHH", 0, 1, len(sizes))  # reserved, type 1 = icon, count
    offset = len(header) + 16 * len(sizes)
    entries, blobs = b"", b""
    for s in sizes:
        data = pngs[s]
        # width/height 0 means 256; 0 colors, 0 reserved, 1 plane, 32 bits per pixel
        entries += struct.pack("<BBBBHHII", s % 256, s % 256, 0, 0, 1, 32, len(data), offset + len(blobs))
        blobs += data
    return header + entries + blobs


def icns_bytes(pngs: dict[int, bytes]) -> bytes:
    """An ICNS file whose entries are PNG images (macOS 10.7 and later read these)."""
    body = b"".join(t + struct.pack(">I", 8 + len(pngs[s])) + pngs[s] for t, s in ICNS_TYPES.items())
    return b"icns" + struct.pack(">I", 8 + len(body)) + body


def main() -> int:
    os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")
    from PySide6.QtGui import QGuiApplication

    app = QGuiApplication.instance() or QGuiApplication(sys.argv[:1])  # noqa: F841 (QImage needs one)
    needed = set(SIZES) | set(ICO_SIZES) | set(ICNS_TYPES.values())
    pngs = {s: render_png(s) for s in sorted(needed)}
    for s in SIZES:
        target = png_path(s)
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(pngs[s])
    scalable = OUT / "hicolor" / "scalable" / "apps" / f"{NAME}.svg"
    scalable.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(SOURCE, scalable)
    (OUT / f"{NAME}.ico").write_bytes(ico_bytes({s: pngs[s] for s in ICO_SIZES}))
    (OUT / f"{NAME}.icns").write_bytes(icns_bytes(pngs))
    print(f"wrote {len(SIZES)} PNGs, the scalable SVG, {NAME}.ico and {NAME}.icns under {OUT.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
