"""Entry point of the desktop app: ``qlora-studio [CONFIG.yaml]``."""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["--engine"]:
        # the packaged app has no separate Python: it runs the engine as itself (see run_controller)
        from qlora_engine.cli import main as engine_main

        return engine_main(argv[1:])
    parser = argparse.ArgumentParser(prog="qlora-studio", description="QLoRA Studio: local QLoRA fine-tuning.")
    parser.add_argument("config", nargs="?", help="a run configuration (YAML) to open")
    parser.add_argument("--look", choices=["system", "light", "dark"], help="light or dark look (default: as before)")
    args = parser.parse_args(argv)

    from PySide6.QtCore import QCoreApplication
    from PySide6.QtWidgets import QApplication

    from app import crash
    from app.main_window import MainWindow
    from app.settings import open_settings
    from app.theme import apply_theme

    QCoreApplication.setOrganizationName("QLoRA Studio")
    QCoreApplication.setApplicationName("qlora-studio")
    qapp = QApplication.instance() or QApplication(sys.argv[:1])
    crash.install()
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
