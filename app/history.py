"""The run history: every run folder the app knows of, with its status, and what to do with it.

Scanning reads each folder's ``events.jsonl`` (through :class:`RunRecord`, the same reader
the live view uses) in the background; the page lists the runs and offers: open (redraw its
charts), load its configuration into the form, resume it from its last checkpoint, compare
loss curves, open its logs (TensorBoard when the run wrote event files), give it a title and
notes, delete it (to the trash), show the folder. Columns sort by their values (steps, losses
and dates as numbers); the filter box keeps the rows whose name, title, notes, model or status
hold every word typed. Titles, notes and deleting are :mod:`app.run_catalog`'s (plain, no Qt).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

from PySide6.QtCore import QFile, Qt, QTimer, QUrl, Signal
from PySide6.QtGui import QDesktopServices
from PySide6.QtWidgets import (
    QAbstractItemView,
    QFileDialog,
    QHeaderView,
    QInputDialog,
    QLabel,
    QLineEdit,
    QMenu,
    QMessageBox,
    QPushButton,
    QTableWidget,
    QTableWidgetItem,
    QToolButton,
    QWidget,
)

from app import run_catalog
from app.run_catalog import RunNotes, TensorBoardServer
from app.run_record import RunRecord
from app.run_worker import engine_argv, engine_env
from app.tasks import TaskRunner
from app.theme import hbox, vbox
from qlora_engine.checkpoint import _pid_alive, latest_checkpoint  # one liveness test, the lock's own

STATUS_TEXT = {"stopped": "stopped (resumable)", "empty": "no events"}
"""A run's status as the history shows it, where the word itself does not say it."""


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
    title: str = ""
    notes: str = ""
    alive: bool = False
    """A live process holds the run's lock."""

    @property
    def name(self) -> str:
        return self.path.name

    @property
    def display_name(self) -> str:
        return self.title or self.path.name

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
    notes = run_catalog.read_notes(run_dir)
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
        title=notes.title,
        notes=notes.notes,
        alive=_lock_alive(run_dir),
    )


def scan(roots: list[Path], extra: list[Path]) -> list[RunSummary]:
    """Every run folder directly under ``roots`` plus the ``extra`` folders, newest first."""
    seen: set[Path] = set()
    found: list[RunSummary] = []
    in_roots = (sorted(p for p in root.iterdir() if p.is_dir()) for root in roots if root.is_dir())
    candidates = [p for folders in in_roots for p in folders] + list(extra)
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


SORT_KEY = Qt.ItemDataRole.UserRole + 1


class _Cell(QTableWidgetItem):
    """A cell that sorts by its value (numbers as numbers, a missing value last), not its text."""

    def __lt__(self, other: QTableWidgetItem) -> bool:  # Qt calls this when sorting
        a, b = self.data(SORT_KEY), other.data(SORT_KEY)
        if a is None or b is None:
            return a is not None  # values before blanks, whichever the direction's start
        try:
            return a < b
        except TypeError:
            return str(a) < str(b)


class HistoryPage(QWidget):
    """Signals carry a run folder (or several, for compare)."""

    open_requested = Signal(object)
    load_config_requested = Signal(object)
    resume_requested = Signal(object)
    compare_requested = Signal(list)
    folder_added = Signal(object)
    run_deleted = Signal(object)
    refreshed = Signal()

    COLUMNS = ["Run", "Status", "Steps", "Train loss", "Eval loss", "Model", "Started", "Notes", "Folder"]

    def __init__(self, tasks: TaskRunner, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.tasks = tasks
        self.runs: list[RunSummary] = []
        self._roots: list[Path] = []
        self._extra: list[Path] = []
        self._provider = None
        self.tensorboards: dict[Path, TensorBoardServer] = {}
        tasks.finished.connect(self._on_task_done)

        title = QLabel("Run history", objectName="pageTitle")
        self.info = QLabel("Every run folder in your runs folder and every run started here.", objectName="hint")
        self.table = QTableWidget(0, len(self.COLUMNS), objectName="historyTable")
        self.table.setHorizontalHeaderLabels(self.COLUMNS)
        self.table.setSelectionBehavior(QAbstractItemView.SelectionBehavior.SelectRows)
        self.table.setEditTriggers(QAbstractItemView.EditTrigger.NoEditTriggers)
        self.table.setSortingEnabled(True)
        self.table.sortByColumn(self.COLUMNS.index("Started"), Qt.SortOrder.DescendingOrder)
        self.table.verticalHeader().hide()
        header = self.table.horizontalHeader()
        header.setSectionResizeMode(QHeaderView.ResizeMode.Interactive)
        header.setStretchLastSection(True)
        header.setSortIndicatorShown(True)
        self.table.setContextMenuPolicy(Qt.ContextMenuPolicy.CustomContextMenu)
        self.table.customContextMenuRequested.connect(self._context_menu)
        placeholder = "Filter: name, title, notes, model or status"
        self.filter = QLineEdit(objectName="historyFilter", placeholderText=placeholder, clearButtonEnabled=True)
        self.filter.textChanged.connect(self._apply_filter)
        self.table.itemSelectionChanged.connect(self._update_buttons)
        self.table.itemDoubleClicked.connect(lambda _item: self._emit_selected(self.open_requested))

        self.open_button = QPushButton("Open", toolTip="Redraw this run's charts from its events.jsonl")
        self.load_button = QPushButton("Load config")
        self.load_button.setToolTip("Load this run's configuration into the form, to start a new run from it")
        self.resume_button = QPushButton("Resume", toolTip="Continue this run from its last checkpoint")
        self.compare_button = QPushButton("Compare loss")
        self.compare_button.setToolTip("Overlay the selected runs' loss curves on the run charts")
        self.logs_button = QPushButton("Open logs")
        self.logs_button.setToolTip(
            "TensorBoard for this run (runs with output.report_to: [tensorboard]); otherwise its folder of logs"
        )
        self.logs_button.clicked.connect(self._open_logs)
        self.manage_button = QToolButton(text="Manage", popupMode=QToolButton.ToolButtonPopupMode.InstantPopup)
        self.manage_menu = QMenu(self.manage_button)
        self.rename_action = self.manage_menu.addAction("Rename…", self._rename_selected)
        self.notes_action = self.manage_menu.addAction("Edit notes…", self._edit_notes_selected)
        self.reveal_action = self.manage_menu.addAction("Show folder", self._reveal)
        self.manage_menu.addSeparator()
        self.delete_action = self.manage_menu.addAction("Delete…", self._delete_selected)
        self.manage_button.setMenu(self.manage_menu)
        self.add_button = QPushButton("Add run folder…")
        self.refresh_button = QPushButton("Refresh")
        self.open_button.clicked.connect(lambda: self._emit_selected(self.open_requested))
        self.load_button.clicked.connect(lambda: self._emit_selected(self.load_config_requested))
        self.resume_button.clicked.connect(lambda: self._emit_selected(self.resume_requested))
        self.compare_button.clicked.connect(lambda: self.compare_requested.emit([s.path for s in self.selected()]))
        self.add_button.clicked.connect(self._add_folder)
        self.refresh_button.clicked.connect(self.refresh)

        header = hbox(title, 1, self.add_button, self.refresh_button)
        buttons = hbox(
            self.open_button, self.load_button, self.resume_button, self.compare_button, self.logs_button,
            self.manage_button, 1, (self.filter, 1),
        )
        vbox(header, self.info, buttons, (self.table, 1), parent=self)
        self._update_buttons()

    # -- data ------------------------------------------------------------------------------
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
        self.table.setSortingEnabled(False)  # sorting while filling would move rows under the loop
        self.table.setRowCount(len(runs))
        for r, s in enumerate(runs):
            started = time.strftime("%Y-%m-%d %H:%M", time.localtime(s.started_at)) if s.started_at else "-"
            status = STATUS_TEXT.get(s.status, s.status)
            if s.status == "failed" and s.resumable:
                status = "failed (resumable)"
            first_note = s.notes.strip().splitlines()[0] if s.notes.strip() else ""
            cells = [  # (text, sort key, tooltip)
                (s.display_name, s.display_name.lower(), f"folder: {s.name}" if s.title else ""),
                (status, status, s.error),
                (f"{s.step} / {s.total_steps}" if s.total_steps else str(s.step), s.step, ""),
                (_fmt_loss(s.final_loss), s.final_loss, ""),
                (_fmt_loss(s.eval_loss), s.eval_loss, ""),
                (Path(s.model).name if s.model else "-", Path(s.model).name.lower() if s.model else None, s.model),
                (started, s.started_at, ""),
                (first_note, first_note.lower() or None, s.notes),
                (str(s.path), str(s.path), ""),
            ]
            for c, (text, key, tip) in enumerate(cells):
                item = _Cell(text)
                item.setData(Qt.ItemDataRole.UserRole, str(s.path))
                item.setData(SORT_KEY, key)
                if tip:
                    item.setToolTip(tip)
                self.table.setItem(r, c, item)
        self.table.setSortingEnabled(True)  # re-sorts by the header's column and order
        for r in range(self.table.rowCount()):
            if self._row_path(r) in selected:
                self.table.selectRow(r)
        self.table.resizeColumnsToContents()
        self._apply_filter()
        self._update_buttons()

    def _row_path(self, row: int) -> Path | None:
        item = self.table.item(row, 0)
        return Path(item.data(Qt.ItemDataRole.UserRole)) if item is not None else None

    def _apply_filter(self, *_args) -> None:
        query = self.filter.text()
        by_path = {s.path: s for s in self.runs}
        shown = 0
        for r in range(self.table.rowCount()):
            s = by_path.get(self._row_path(r))
            ok = s is not None and run_catalog.matches(
                query, s.name, s.title, s.notes, s.model, STATUS_TEXT.get(s.status, s.status)
            )
            self.table.setRowHidden(r, not ok)
            shown += ok
        n = len(self.runs)
        if not n:
            self.info.setText("No runs yet: start one on the Run page.")
        elif query.strip():
            self.info.setText(f"{shown} of {n} runs match \u201c{query.strip()}\u201d.")
        else:
            self.info.setText(f"{n} run{'s' if n != 1 else ''}.")

    def visible_runs(self) -> list[RunSummary]:
        """The runs in the table's order, without those the filter hides."""
        by_path = {s.path: s for s in self.runs}
        rows = [r for r in range(self.table.rowCount()) if not self.table.isRowHidden(r)]
        return [by_path[p] for r in rows if (p := self._row_path(r)) in by_path]

    def selected(self) -> list[RunSummary]:
        by_path = {s.path: s for s in self.runs}
        rows = sorted({i.row() for i in self.table.selectedIndexes()})
        return [by_path[p] for r in rows if (p := self._row_path(r)) in by_path]

    def select_path(self, path: Path) -> bool:
        want = Path(path).resolve()
        for r in range(self.table.rowCount()):
            if self._row_path(r) == want:
                self.table.selectRow(r)
                return True
        return False

    # -- actions ---------------------------------------------------------------------------
    def _update_buttons(self) -> None:
        sel = self.selected()
        one = len(sel) == 1
        for w in (self.open_button, self.logs_button, self.manage_button, *self.manage_menu.actions()):  # Delete: below
            w.setEnabled(one)
        self.load_button.setEnabled(one and (sel[0].path / "config.yaml").is_file())
        self.resume_button.setEnabled(one and sel[0].resumable)
        self.compare_button.setEnabled(len(sel) >= 1)
        self.delete_action.setEnabled(one and not sel[0].alive)

    def _emit_selected(self, signal) -> None:
        sel = self.selected()
        if len(sel) == 1:
            signal.emit(sel[0].path)

    def _reveal(self) -> None:
        if (s := self._one()) is not None:
            QDesktopServices.openUrl(QUrl.fromLocalFile(str(s.path)))

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

    # -- titles, notes, delete, logs -----------------------------------------------------
    def ask_text(self, title: str, label: str, text: str, multiline: bool = False) -> str | None:
        """A line (or lines) from the user, None when cancelled (replaced in tests)."""
        if multiline:
            value, ok = QInputDialog.getMultiLineText(self, title, label, text)
        else:
            value, ok = QInputDialog.getText(self, title, label, QLineEdit.EchoMode.Normal, text)
        return value if ok else None

    def tell(self, title: str, text: str) -> None:
        """A message the user must read (replaced in tests)."""
        QMessageBox.warning(self, title, text)

    def ask_delete(self, summary: RunSummary, permanently: bool) -> bool:
        """Confirm deleting a run (replaced in tests)."""
        where = "deleted for good" if permanently else "moved to the trash"
        answer = QMessageBox.question(
            self,
            "Delete this run?",
            f"{summary.display_name}\n{summary.path}\n\nIts folder (checkpoints, adapter, events and logs) is {where}.",
            QMessageBox.StandardButton.Yes | QMessageBox.StandardButton.No,
        )
        return answer == QMessageBox.StandardButton.Yes

    def _one(self) -> RunSummary | None:
        sel = self.selected()
        return sel[0] if len(sel) == 1 else None

    def _rename_selected(self) -> None:
        if (s := self._one()) is not None:
            title = self.ask_text("Rename run", f"Title for {s.name} (the folder keeps its name):", s.title or s.name)
            if title is not None:
                self.set_title(s.path, "" if title.strip() == s.name else title)

    def _edit_notes_selected(self) -> None:
        if (s := self._one()) is not None:
            notes = self.ask_text("Notes", f"Notes on {s.display_name}:", s.notes, multiline=True)
            if notes is not None:
                self.set_notes(s.path, notes)

    def set_title(self, path: Path, title: str) -> None:
        notes = run_catalog.read_notes(path)
        self._save_notes(path, RunNotes(title=title.strip(), notes=notes.notes))

    def set_notes(self, path: Path, text: str) -> None:
        notes = run_catalog.read_notes(path)
        self._save_notes(path, RunNotes(title=notes.title, notes=text))

    def _save_notes(self, path: Path, notes: RunNotes) -> None:
        try:
            run_catalog.write_notes(path, notes)
        except OSError as e:
            self.tell("Could not save", f"{path / run_catalog.NOTES_FILE}: {e.strerror or e}")
            return
        self.refresh()

    def _delete_selected(self) -> None:
        if (s := self._one()) is not None:
            self.delete_run(s)

    def delete_run(self, s: RunSummary) -> bool:
        """Move the run's folder to the trash (or, where there is none, delete it after asking again)."""
        if s.alive:
            self.tell("Run in progress", f"{s.display_name} is running: stop it first.")
            return False
        if not self.ask_delete(s, permanently=False):
            return False
        trashed = QFile.moveToTrash(str(s.path))
        trashed = trashed[0] if isinstance(trashed, tuple) else trashed  # (ok, path in trash) in some versions
        if not trashed:
            if not self.ask_delete(s, permanently=True):
                return False
            try:
                run_catalog.delete_run(s.path, alive=summarize(s.path).alive)
            except (OSError, ValueError, run_catalog.RunBusyError) as e:
                self.tell("Could not delete", str(e))
                return False
        self._extra = [p for p in self._extra if p != s.path]
        self.run_deleted.emit(s.path)
        self.refresh()
        return True

    def _open_logs(self) -> None:
        if (s := self._one()) is not None:
            self.open_logs(s.path)

    def open_logs(self, path: Path) -> str:
        """TensorBoard on the run's event files when it has them and TensorBoard is installed, else its
        folder of logs. Returns the URL or folder opened."""
        tb = run_catalog.tracking_dir(path)
        if tb is not None and run_catalog.tensorboard_installed():
            server = self.tensorboards.get(path)
            if server is None or not server.alive:
                server = TensorBoardServer(tb, engine_argv, engine_env())
                server.start()
                self.tensorboards[path] = server
            self._open_when_ready(server)
            return server.url
        folder = path / "logs" if (path / "logs").is_dir() else path
        self.open_url(str(folder))
        return str(folder)

    def open_url(self, url_or_folder: str) -> None:
        """Hand a URL or a folder to the desktop (replaced in tests)."""
        url = QUrl(url_or_folder) if "://" in url_or_folder else QUrl.fromLocalFile(url_or_folder)
        QDesktopServices.openUrl(url)

    def _open_when_ready(self, server: TensorBoardServer, tries: int = 120) -> None:
        """Open the browser once TensorBoard answers (it takes a few seconds to start)."""
        if server.ready():
            self.open_url(server.url)
            self.info.setText(f"TensorBoard: {server.url}")
        elif tries > 0 and server.alive:
            self.info.setText("Starting TensorBoard…")
            QTimer.singleShot(250, lambda: self._open_when_ready(server, tries - 1))
        else:
            self.info.setText("TensorBoard did not start; the run's event files are in " + str(server.logdir))

    def _context_menu(self, pos) -> None:
        if self._one() is None:
            return
        menu = QMenu(self)
        menu.addAction("Open", lambda: self._emit_selected(self.open_requested))
        menu.addAction("Open logs", self._open_logs)
        menu.addSeparator()
        for action in self.manage_menu.actions():
            menu.addAction(action)
        menu.exec(self.table.viewport().mapToGlobal(pos))

    def shutdown(self) -> None:
        """Stop the TensorBoard servers this page started."""
        for server in self.tensorboards.values():
            server.stop()
        self.tensorboards.clear()
