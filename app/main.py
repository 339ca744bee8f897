"""Entry point of the desktop app (filled in by the GUI issue)."""

import argparse


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="qlora-studio", description="QLoRA Studio desktop app.")
    parser.parse_args(argv)
    from PySide6.QtWidgets import QApplication, QLabel

    qapp = QApplication.instance() or QApplication([])
    label = QLabel("QLoRA Studio: the desktop app is not built yet; use qlora-engine.")
    label.show()
    return qapp.exec()
