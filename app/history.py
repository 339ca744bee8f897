"""The run history: every run folder the app knows of, with its status, and what to do with it.

Scanning reads each folder's ``events.jsonl`` (through :class:`RunRecord`, the same reader
the live view uses) in the background; the page lists the runs and offers: open (redraw its
charts), load its configuration into the form, resume it from its last checkpoint, compare
loss curves, show the folder.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

from PySide6.QtCore import Qt, QUrl, Signal
from PySide6.QtGui import QDesktopServices
from PySide6.QtWidgets import (
    QAbstractItemView,
    QFileDialog,
    QHBoxLayout,
    QHeaderView,
    QLabel,
    QPushButton,
    QTableWidget,
    QTableWidgetItem,
    QVBoxLayout,
    QWidget,
)

from app.run_record import RunRecord
from app.tasks import TaskRunner
from qlora_engine.checkpoint import _pid_alive, latest_checkpoint  # one liveness test, the lock's own

STATUS_TEXT = {
    "finished": "finished",
    "stopped": "stopped (resumable)",
    "failed": "failed",
    "interrupted": "interrupted",
    "running": "running",
    "empty": "no events",
    "starting": "starting",
}


@dataclass(frozen=True)
class RunSummary:
    path: Path
    status: str
    step: int
    total_steps: int
    final_loss: float | None
    eval_loss: float | None
    model: str
    started_at: float | None
    last_checkpoint: Path | None
    has_adapter: bool
    error: str | None = None

    @property
    def name(self) -> str:
        return self.path.name

    @property
    def resumable(self) -> bool:
        return self.last_checkpoint is not None and self.status in ("stopped", "failed", "interrupted")


def is_run_dir(path: Path) -> bool:
    return (path / "events.jsonl").is_file() or ((path / "config.yaml").is_file() and (path / "checkpoints").is_dir())


def _lock_alive(run_dir: Path) -> bool:
    """True if the run's lock is held by a live process (the engine's own liveness test)."""
    lock = run_dir / "run.lock"
    if not lock.is_file():
        return False
    try:
        pid = int(json.loads(lock.read_text() or "{}").get("pid", -1))
    except (OSError, ValueError):
        return False
    return _pid_alive(pid)


def summarize(run_dir: str | Path) -> RunSummary:
    """What the history shows of one run folder."""
    run_dir = Path(run_dir)
    rec = RunRecord.from_dir(run_dir)
    status = rec.status
    if status in ("running", "starting", "empty") and not _lock_alive(run_dir):
        status = "interrupted" if (rec.has_steps or rec.started) else "empty"
    elif _lock_alive(run_dir) and status not in ("finished", "stopped"):
        status = "running"
    last = latest_checkpoint(run_dir / "checkpoints") if (run_dir / "checkpoints").is_dir() else None
    cfg = rec.config_dict() or {}
    model = str((cfg.get("model") or {}).get("ref", "")) if isinstance(cfg, dict) else ""
    return RunSummary(
        path=run_dir,
        status=status,
        step=rec.step,
        total_steps=rec.total_steps,
        final_loss=rec.finished.final_loss if rec.finished else (rec.latest.loss if rec.latest else None),
        eval_loss=rec.last_eval.loss if rec.last_eval else None,
        model=model,
        started_at=rec.first_time,
        last_checkpoint=last,
        has_adapter=(run_dir / "adapter").is_dir(),
        error=rec.failed.message if rec.failed else None,
    )


def scan(roots: list[Path], extra: list[Path]) -> list[RunSummary]:
    """Every run folder directly under ``roots`` plus the ``extra`` folders, newest first."""
    seen: set[Path] = set()
    found: list[RunSummary] = []
    candidates: list[Path] = []
    for root in roots:
        if root.is_dir():
            candidates += sorted(p for p in root.iterdir() if p.is_dir())
    candidates += extra
    for p in candidates:
        try:
            rp = p.resolve()
        except OSError:
            continue
        if rp in seen or not rp.is_dir() or not is_run_dir(rp):
            continue
        seen.add(rp)
        try:
            found.append(summarize(rp))
        except OSError:
            continue
    found.sort(key=lambda s: s.started_at or 0.0, reverse=True)
    return found


def _fmt_loss(v: float | None) -> str:
    return "-" if v is None else f"{v:.4f}"


class HistoryPage(QWidget):
    """Signals carry a run folder (or several, for compare)."""

    open_requested = Signal(object)
    load_config_requested = Signal(object)
    resume_requested = Signal(object)
    compare_requested = Signal(list)
    folder_added = Signal(object)
    refreshed = Signal()

    COLUMNS = ["Run", "Status", "Steps", "Train loss", "Eval loss", "Model", "Started", "Folder"]

    def __init__(self, tasks: TaskRunner, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.tasks = tasks
        self.runs: list[RunSummary] = []
        self._roots: list[Path] = []
        self._extra: list[Path] = []
        self._provider = None
        tasks.finished.connect(self._on_task_done)

        title = QLabel("Run history")
        title.setObjectName("pageTitle")
        self.info = QLabel("Every run folder in your runs folder and every run started here.")
        self.info.setObjectName("hint")
        self.table = QTableWidget(0, len(self.COLUMNS))
        self.table.setObjectName("historyTable")
        self.table.setHorizontalHeaderLabels(self.COLUMNS)
        self.table.setSelectionBehavior(QAbstractItemView.SelectionBehavior.SelectRows)
        self.table.setEditTriggers(QAbstractItemView.EditTrigger.NoEditTriggers)
        self.table.setSortingEnabled(False)
        self.table.verticalHeader().hide()
        header = self.table.horizontalHeader()
        header.setSectionResizeMode(QHeaderView.ResizeMode.ResizeToContents)
        header.setStretchLastSection(True)
        self.table.itemSelectionChanged.connect(self._update_buttons)
        self.table.itemDoubleClicked.connect(lambda _item: self._emit_selected(self.open_requested))

        self.open_button = QPushButton("Open")
        self.open_button.setToolTip("Redraw this run's charts from its events.jsonl")
        self.load_button = QPushButton("Load config")
        self.load_button.setToolTip("Load this run's configuration into the form, to start a new run from it")
        self.resume_button = QPushButton("Resume")
        self.resume_button.setToolTip("Continue this run from its last checkpoint")
        self.compare_button = QPushButton("Compare loss")
        self.compare_button.setToolTip("Overlay the selected runs' loss curves on the run charts")
        self.reveal_button = QPushButton("Show folder")
        self.add_button = QPushButton("Add run folder…")
        self.refresh_button = QPushButton("Refresh")
        self.open_button.clicked.connect(lambda: self._emit_selected(self.open_requested))
        self.load_button.clicked.connect(lambda: self._emit_selected(self.load_config_requested))
        self.resume_button.clicked.connect(lambda: self._emit_selected(self.resume_requested))
        self.compare_button.clicked.connect(lambda: self.compare_requested.emit([s.path for s in self.selected()]))
        self.reveal_button.clicked.connect(self._reveal)
        self.add_button.clicked.connect(self._add_folder)
        self.refresh_button.clicked.connect(self.refresh)

        header = QHBoxLayout()
        header.addWidget(title)
        header.addStretch(1)
        header.addWidget(self.add_button)
        header.addWidget(self.refresh_button)
        buttons = QHBoxLayout()
        for b in (self.open_button, self.load_button, self.resume_button, self.compare_button, self.reveal_button):
            buttons.addWidget(b)
        buttons.addStretch(1)

        lay = QVBoxLayout(self)
        lay.addLayout(header)
        lay.addWidget(self.info)
        lay.addLayout(buttons)
        lay.addWidget(self.table, 1)
        self._update_buttons()

    # -- data ------------------------------------------------------------------------------
    def set_sources(self, roots: list[Path], extra: list[Path]) -> None:
        self._roots, self._extra = list(roots), list(extra)

    def set_source_provider(self, provider) -> None:
        """``provider() -> (roots, extra)``, asked on every refresh (the known runs grow as runs start)."""
        self._provider = provider

    def refresh(self) -> None:
        if self._provider is not None:
            roots, extra = self._provider()
            self._roots, self._extra = list(roots), list(dict.fromkeys([*extra, *self._extra]))
        roots, extra = list(self._roots), list(self._extra)
        self.info.setText("Reading run folders…")
        self.tasks.submit("history", lambda: scan(roots, extra))

    def _on_task_done(self, key: str, result: object) -> None:
        if key != "history":
            return
        self.set_runs(result)
        self.refreshed.emit()

    def set_runs(self, runs: list[RunSummary]) -> None:
        selected = {s.path for s in self.selected()}
        self.runs = list(runs)
        self.table.setRowCount(len(runs))
        for r, s in enumerate(runs):
            started = time.strftime("%Y-%m-%d %H:%M", time.localtime(s.started_at)) if s.started_at else "-"
            cells = [
                s.name,
                STATUS_TEXT.get(s.status, s.status)
                if not (s.status == "failed" and s.resumable)
                else "failed (resumable)",
                f"{s.step} / {s.total_steps}" if s.total_steps else str(s.step),
                _fmt_loss(s.final_loss),
                _fmt_loss(s.eval_loss),
                Path(s.model).name if s.model else "-",
                started,
                str(s.path),
            ]
            for c, text in enumerate(cells):
                item = QTableWidgetItem(text)
                item.setData(Qt.ItemDataRole.UserRole, str(s.path))
                if c == 1 and s.error:
                    item.setToolTip(s.error)
                elif c == 5:
                    item.setToolTip(s.model)
                self.table.setItem(r, c, item)
            if s.path in selected:
                self.table.selectRow(r)
        n = len(runs)
        self.info.setText(f"{n} run{'s' if n != 1 else ''}." if n else "No runs yet: start one on the Run page.")
        self._update_buttons()

    def selected(self) -> list[RunSummary]:
        rows = sorted({i.row() for i in self.table.selectedIndexes()})
        return [self.runs[r] for r in rows if r < len(self.runs)]

    def select_path(self, path: Path) -> bool:
        for r, s in enumerate(self.runs):
            if s.path == Path(path).resolve():
                self.table.selectRow(r)
                return True
        return False

    # -- actions ---------------------------------------------------------------------------
    def _update_buttons(self) -> None:
        sel = self.selected()
        one = len(sel) == 1
        self.open_button.setEnabled(one)
        self.load_button.setEnabled(one and (sel[0].path / "config.yaml").is_file())
        self.resume_button.setEnabled(one and sel[0].resumable)
        self.compare_button.setEnabled(len(sel) >= 1)
        self.reveal_button.setEnabled(one)

    def _emit_selected(self, signal) -> None:
        sel = self.selected()
        if len(sel) == 1:
            signal.emit(sel[0].path)

    def _reveal(self) -> None:
        sel = self.selected()
        if sel:
            QDesktopServices.openUrl(QUrl.fromLocalFile(str(sel[0].path)))

    def _add_folder(self) -> None:
        folder = QFileDialog.getExistingDirectory(self, "Add a run folder")
        if folder:
            self.add_folder(Path(folder))

    def add_folder(self, folder: Path) -> None:
        folder = folder.resolve()
        if folder not in self._extra:
            self._extra.append(folder)
        self.folder_added.emit(folder)
        self.refresh()
