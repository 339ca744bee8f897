"""Where the app keeps its own things: QSettings (geometry, recent files, known runs) and folders.

``QLORA_STUDIO_HOME`` moves everything the app writes (settings file, workspace, logs) into
one folder; the tests point it at a temporary directory so they never touch the user's.
"""

from __future__ import annotations

import os
from pathlib import Path

import platformdirs
from PySide6.QtCore import QSettings

MAX_RECENT = 10


def studio_home() -> Path | None:
    env = os.environ.get("QLORA_STUDIO_HOME")
    return Path(env).expanduser() if env else None


def workspace_dir() -> Path:
    """Where an unsaved configuration's relative paths point (its runs go to ``runs/`` here)."""
    home = studio_home()
    path = home / "workspace" if home else Path(platformdirs.user_documents_dir()) / "QLoRA Studio"
    path.mkdir(parents=True, exist_ok=True)
    return path


def data_dir() -> Path:
    """The app's private files: launch configs, engine logs."""
    home = studio_home()
    path = home / "data" if home else Path(platformdirs.user_data_dir("qlora-studio", appauthor=False))
    path.mkdir(parents=True, exist_ok=True)
    return path


def logs_dir() -> Path:
    path = data_dir() / "logs"
    path.mkdir(parents=True, exist_ok=True)
    return path


def open_settings() -> QSettings:
    home = studio_home()
    if home is not None:
        home.mkdir(parents=True, exist_ok=True)
        return QSettings(str(home / "settings.ini"), QSettings.Format.IniFormat)
    return QSettings(QSettings.Format.IniFormat, QSettings.Scope.UserScope, "QLoRA Studio", "qlora-studio")


def _list(settings: QSettings, key: str) -> list[str]:
    value = settings.value(key, [])
    if value is None:
        return []
    if isinstance(value, str):
        return [value] if value else []
    return [str(v) for v in value]


def recent_files(settings: QSettings) -> list[str]:
    return [p for p in _list(settings, "recent/files") if Path(p).exists()]


def add_recent_file(settings: QSettings, path: str | Path) -> list[str]:
    p = str(Path(path).resolve())
    files = [p] + [f for f in _list(settings, "recent/files") if f != p]
    files = files[:MAX_RECENT]
    settings.setValue("recent/files", files)
    return files


def known_runs(settings: QSettings) -> list[str]:
    return _list(settings, "runs/known")


def add_known_run(settings: QSettings, run_dir: str | Path) -> None:
    p = str(Path(run_dir).resolve())
    runs = [p] + [r for r in _list(settings, "runs/known") if r != p]
    settings.setValue("runs/known", runs[:500])
