"""Entry point of the desktop app: ``qlora-studio [CONFIG.yaml]``."""

from __future__ import annotations

import argparse
import sys


def collect_garbage_on_gui_thread():
    """Run Python's cycle collector only on the GUI thread, from a 1 s timer (pyqtgraph's collector).

    Automatic collection runs in whichever thread happens to allocate; when that is one of our
    worker threads (a model load, an export, a generation) and the garbage holds Qt objects of
    the GUI thread, Qt destroys them from the wrong thread, which can crash the process.
    """
    from pyqtgraph.util.garbage_collector import GarbageCollector  # lazy: Qt loads after argparse

    return GarbageCollector(interval=1.0)


def brand(qapp) -> None:
    """The window icon, and the desktop file the window belongs to (taskbars and docks match them)."""
    from PySide6.QtGui import QIcon  # lazy: Qt loads after argparse (fast --help, --engine)

    from qlora_engine.resources import path as resource_path  # lazy: Qt loads after argparse (fast --help, --engine)

    qapp.setWindowIcon(QIcon(str(resource_path("icons", "qlora-studio.svg"))))
    qapp.setDesktopFileName("qlora-studio")  # packaging/qlora-studio.desktop


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["--engine"]:
        # the packaged app has no separate Python: it runs the engine as itself (see app.run_worker.engine_argv)
        from qlora_engine.cli import main as engine_main

        return engine_main(argv[1:])
    parser = argparse.ArgumentParser(prog="qlora-studio", description="QLoRA Studio: local QLoRA fine-tuning.")
    parser.add_argument("config", nargs="?", help="a run configuration (YAML) to open")
    parser.add_argument("--look", choices=["system", "light", "dark"], help="light or dark look (default: as before)")
    args = parser.parse_args(argv)

    from app.platform_check import check as check_platform  # lazy: checked only after the arguments parse

    if (code := check_platform()) is not None:  # missing X libraries: name them, not Qt's plugin error
        return code

    from PySide6.QtCore import QCoreApplication  # lazy: Qt loads after argparse (fast --help, --engine)
    from PySide6.QtWidgets import QApplication  # lazy: Qt loads after argparse (fast --help, --engine)

    from app import crash  # lazy: Qt loads after argparse (fast --help, --engine)
    from app.main_window import MainWindow  # lazy: Qt loads after argparse (fast --help, --engine)
    from app.settings import open_settings  # lazy: Qt loads after argparse (fast --help, --engine)
    from app.theme import apply_theme  # lazy: Qt loads after argparse (fast --help, --engine)

    QCoreApplication.setOrganizationName("QLoRA Studio")
    QCoreApplication.setApplicationName("qlora-studio")
    qapp = QApplication.instance() or QApplication(sys.argv[:1])
    brand(qapp)
    crash.install()
    collector = collect_garbage_on_gui_thread()  # noqa: F841 - its timer lives as long as the app
    settings = open_settings()
    mode = args.look or str(settings.value("look/mode", "system"))
    apply_theme(qapp, mode)
    if mode == "system" and hasattr(qapp.styleHints(), "colorSchemeChanged"):
        qapp.styleHints().colorSchemeChanged.connect(lambda *_: apply_theme(qapp, "system"))
    window = MainWindow(settings)
    if args.config:
        window.open_config(args.config)
    window.show()
    return qapp.exec()


if __name__ == "__main__":
    raise SystemExit(main())
