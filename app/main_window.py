"""The main window: the flow Model → Data → Adapter → Training → Run, the history, the budget.

The left list is the flow; the middle is the current page; the budget panel on the right
stays in view while configuring. Menus hold the file actions (YAML configs, recent files) and
the run actions, each with a keyboard shortcut. Window geometry lives in QSettings.
"""

from __future__ import annotations

from pathlib import Path

from PySide6.QtCore import QByteArray, Qt, QTimer
from PySide6.QtGui import QAction, QCloseEvent, QKeySequence
from PySide6.QtWidgets import (
    QApplication,
    QFileDialog,
    QLabel,
    QListWidget,
    QMainWindow,
    QMessageBox,
    QPushButton,
    QSizePolicy,
    QSplitter,
    QStackedWidget,
)

from app import gpu_cards
from app import settings as app_settings
from app.budget_panel import BudgetPanel
from app.config_model import SECTIONS, ConfigModel, section_fields
from app.history import HistoryPage
from app.inspector import Inspector
from app.pages.adapter_page import AdapterPage
from app.pages.data_page import DataPage
from app.pages.export_page import TryExportPage
from app.pages.model_page import ModelPage
from app.pages.training_page import TrainingPage
from app.run_actions import RunActions
from app.run_view import RunView
from app.tasks import TaskRunner
from app.theme import apply_theme, hbox, holder, vbox
from qlora_engine.config import ConfigError, TrainConfig

PAGES = [
    ("model", "1  Model"), ("data", "2  Data"), ("adapter", "3  Adapter"), ("training", "4  Training"),
    ("run", "5  Run"), ("result", "6  Try / Export"), ("history", "History"),
]  # fmt: skip
CONFIG_PAGES = ("model", "data", "adapter", "training")


def fit_to_current_page(stack: QStackedWidget) -> None:
    """Size the stack by the page in view, not the widest of all pages (which QStackedWidget does).

    Without this, the Try/Export page's width was the minimum of every page, and beside the budget
    panel the window needed 1,151 px: more than a 1366×768 laptop at 125% offers (1,093).
    """
    ignored = QSizePolicy.Policy.Ignored
    for i in range(stack.count()):
        page = stack.widget(i)
        if page is stack.currentWidget():
            policy = page.property("own_size_policy")
            if policy is not None:
                page.setSizePolicy(policy)
        else:
            if page.property("own_size_policy") is None:
                page.setProperty("own_size_policy", page.sizePolicy())
            page.setSizePolicy(ignored, ignored)
    stack.updateGeometry()


class MainWindow(QMainWindow):
    def __init__(self, settings=None, demo_model: Path | None | str = "find") -> None:
        super().__init__()
        self.setWindowTitle("QLoRA Studio")
        self.settings = settings or app_settings.open_settings()
        self._close_after_run = False
        self.config_model = ConfigModel()
        self.config_model.config.base_dir = app_settings.workspace_dir()
        # questions about the model and data, and the budget, go to children that may import torch;
        # the budget has its own, so an estimate never waits behind a model or data inspection
        self.inspect_tasks = Inspector(self)
        self.budget_tasks = Inspector(self)
        self.history_tasks = TaskRunner("history", self)

        # pages
        m = self.config_model
        self.model_page = ModelPage(m, self.inspect_tasks)
        self.data_page = DataPage(m, self.inspect_tasks)
        self.adapter_page = AdapterPage(m)
        self.training_page = TrainingPage(m)
        self.run_view = RunView()
        self.result_page = TryExportPage()
        self.history = HistoryPage(self.history_tasks)
        self.pages = {
            "model": self.model_page,
            "data": self.data_page,
            "adapter": self.adapter_page,
            "training": self.training_page,
            "run": self.run_view,
            "result": self.result_page,
            "history": self.history,
        }
        bound = {k for key in CONFIG_PAGES for k in self.pages[key].bindings}
        self.training_page.add_other_settings(
            [(sec, f.name) for sec in SECTIONS for f in section_fields(sec) if f"{sec}.{f.name}" not in bound]
        )
        self.budget = BudgetPanel(m, self.budget_tasks)
        self.runs = RunActions(self, self.run_view, self.history)

        # layout: nav | stack (+ back/next) | budget
        self.nav = QListWidget(objectName="nav", minimumWidth=170, maximumWidth=170)
        self.stack = QStackedWidget()
        for key, label in PAGES:
            self.nav.addItem(label)
            self.stack.addWidget(self.pages[key])
        self.nav.currentRowChanged.connect(self._on_nav)
        self.back_button = QPushButton("← Back")
        self.next_button = QPushButton("Next →", objectName="primary")
        self.back_button.clicked.connect(lambda: self._step(-1))
        self.next_button.clicked.connect(lambda: self._step(1))
        self.flow_bar = holder(hbox(self.back_button, 1, self.next_button, margins=(18, 4, 18, 10)))
        self.splitter = QSplitter(Qt.Orientation.Horizontal)
        self.splitter.addWidget(holder(vbox((self.stack, 1), self.flow_bar, margins=0, spacing=0)))
        self.splitter.addWidget(self.budget)
        self.splitter.setStretchFactor(0, 1)
        self.splitter.setCollapsible(0, False)
        self.setCentralWidget(holder(hbox(self.nav, (self.splitter, 1), margins=0, spacing=0)))

        self.path_label = QLabel()
        self.statusBar().addPermanentWidget(self.path_label)

        # wiring between pages
        self.model_page.info_changed.connect(self.adapter_page.set_model_info)
        self.model_page.info_changed.connect(self.budget.set_model_info)
        saved_cards = self.settings.value(gpu_cards.SETTING)  # the cards chosen last time, those still here
        self.budget.select_cards(gpu_cards.restore(saved_cards, [g.index for g in self.budget.gpus]))
        self.budget.gpu_changed.connect(self._remember_cards)
        self.budget.gpu_changed.connect(lambda *_: self.update_run_summary())
        self.model_page.info_changed.connect(self._on_model_info)
        self.model_page.demo_requested.connect(self._start_demo)
        self.data_page.tasks.finished.connect(self._on_data_report)
        m.changed.connect(lambda *_: self.update_run_summary())
        m.dirty_changed.connect(lambda *_: self._update_title())
        m.path_changed.connect(lambda *_: self._update_title())
        m.errors_changed.connect(self.update_run_summary)

        self.runs.state_changed.connect(self._update_side_panel)
        self.runs.run_started.connect(self._update_side_panel)
        self.runs.ended.connect(self._on_run_ended)
        self._build_menus()
        if demo_model == "find":
            from qlora_engine.demo import find_demo_model  # lazy: only the 'find' default searches for the demo model

            demo_model = find_demo_model()
        self.demo_model = demo_model
        self.model_page.set_demo_available(demo_model)
        self._restore()
        self.update_run_summary()
        self._update_title()
        self.history.set_source_provider(self.history_sources)
        self.nav.setCurrentRow(0)
        QTimer.singleShot(0, self.history.refresh)

    # -- menus -----------------------------------------------------------------------------
    def _action(self, menu, text: str, slot, shortcut=None, name: str | None = None) -> QAction:
        a = QAction(text, self)
        if shortcut is not None:
            a.setShortcut(QKeySequence(shortcut))
        a.triggered.connect(slot)
        menu.addAction(a)
        if name:
            self.actions_by_name[name] = a
        return a

    def _build_menus(self) -> None:
        self.actions_by_name: dict[str, QAction] = {}
        bar = self.menuBar()
        f = bar.addMenu("&File")
        self._action(f, "&New configuration", self.new_config, QKeySequence.StandardKey.New, "new")
        self._action(f, "&Open configuration…", self.open_config_dialog, QKeySequence.StandardKey.Open, "open")
        self.recent_menu = f.addMenu("Open &recent")
        self.recent_menu.aboutToShow.connect(self._fill_recent)
        self._action(f, "&Save", self.save_config, QKeySequence.StandardKey.Save, "save")
        self._action(f, "Save &as…", self.save_config_as, "Ctrl+Shift+S", "save_as")
        f.addSeparator()
        self._action(f, "&Quit", self.close, QKeySequence.StandardKey.Quit, "quit")
        r = bar.addMenu("&Run")
        self._action(r, "&Start training", self.runs.start, "Ctrl+R", "start")
        self._action(r, "S&top (save and finish)", self.runs.stop, "Ctrl+.", "stop")
        self._action(r, "&Abort (end now)", self.runs.abort, "Ctrl+Shift+.", "abort")
        self._action(r, "Save a checkpoint &now", self.runs.save_now, "Ctrl+Shift+K", "save_now")
        v = bar.addMenu("&View")
        for i, (key, label) in enumerate(PAGES):
            self._action(v, label.split("  ")[-1], lambda _=False, k=key: self.show_page(k), f"Ctrl+{i + 1}")
        v.addSeparator()
        theme = v.addMenu("&Look")
        for mode, text in (("system", "Follow the system"), ("light", "Light"), ("dark", "Dark")):
            self._action(theme, text, lambda _=False, m=mode: self.set_theme(m))
        h = bar.addMenu("&Help")
        self._action(h, "&Keyboard shortcuts", self._show_shortcuts, QKeySequence.StandardKey.HelpContents)

    def _fill_recent(self) -> None:
        self.recent_menu.clear()
        files = app_settings.recent_files(self.settings)
        for p in files:
            a = self.recent_menu.addAction(p)
            a.triggered.connect(lambda _=False, path=p: self.open_config(path))
        if not files:
            a = self.recent_menu.addAction("(none)")
            a.setEnabled(False)

    def _show_shortcuts(self) -> None:
        lines = [
            f"{a.shortcut().toString(QKeySequence.SequenceFormat.NativeText):<18} {a.text().replace('&', '')}"
            for a in self.findChildren(QAction)
            if not a.shortcut().isEmpty()
        ]
        QMessageBox.information(self, "Keyboard shortcuts", "\n".join(lines))

    def set_theme(self, mode: str) -> None:
        self.settings.setValue("look/mode", mode)
        apply_theme(QApplication.instance(), mode)
        self.run_view.charts.apply_palette(self.palette())
        self.data_page.apply_palette()

    # -- navigation ------------------------------------------------------------------------
    def show_page(self, key: str) -> None:
        self.nav.setCurrentRow([k for k, _ in PAGES].index(key))

    @property
    def current_page(self) -> str:
        return PAGES[self.stack.currentIndex()][0]

    def _on_nav(self, row: int) -> None:
        if row < 0:
            return
        self.stack.setCurrentIndex(row)
        key = PAGES[row][0]
        fit_to_current_page(self.stack)
        self._update_side_panel()
        self.flow_bar.setVisible(key in CONFIG_PAGES)
        self.back_button.setEnabled(row > 0)
        self.next_button.setText("Go to Run →" if key == "training" else "Next →")
        if key == "run":
            self.update_run_summary()
        if key == "history":
            self.history.refresh()

    def _update_side_panel(self, *_args) -> None:
        """The budget panel is in view while configuring (and on a run page with nothing to show yet)."""
        key = self.current_page
        idle_run_page = key == "run" and self.runs.state == "idle" and self.runs.replaying is None
        self.budget.setVisible(key in CONFIG_PAGES or idle_run_page)

    def _step(self, delta: int) -> None:
        self.nav.setCurrentRow(max(0, min(self.nav.currentRow() + delta, len(PAGES) - 1)))

    def reveal_field(self, key: str | None) -> None:
        """Show the page holding a field and put the cursor in it."""
        if not key:
            return
        for page_key in CONFIG_PAGES:
            page = self.pages[page_key]
            if key in page.bindings:
                self.show_page(page_key)
                page.reveal(key)
                return

    # -- pages talking to each other -------------------------------------------------------
    def _on_model_info(self, info) -> None:
        ref = info.local_path or info.ref if info is not None else None
        self.data_page.set_model_ref(ref)

    def _on_data_report(self, key: str, report: object) -> None:
        if key == "data" and isinstance(report, dict):
            self.budget.set_data_stats(report.get("token_stats"))

    def update_run_summary(self) -> None:
        """The Run page's second line: what Start trains now (derived from the form, whatever run is shown)."""
        if self.runs.running:
            return
        m = self.config_model
        cfg = m.config
        if not m.valid:
            key = next(iter(m.errors), "")
            text = f"Fix {key} first: {m.errors.get(key, m.general_error)}"
        elif not cfg.model.ref.strip() or not cfg.data.path.strip():
            text = "Choose a model and data first (pages 1 and 2), or start the demo on the Model page."
        else:
            steps = f"{cfg.train.max_steps} steps" if cfg.train.max_steps else f"{cfg.train.epochs:g} epochs"
            text = (
                f"Start trains: model {Path(cfg.model.ref).name} · data {Path(cfg.data.path).name} · "
                f"LoRA rank {cfg.lora.rank} · {steps} · output {cfg.output_dir}"
            )
            cards = self.budget.selected_gpus()
            if len(cards) > 1:
                text += " · on " + ", ".join(gpu_cards.line_name(g.index) for g in cards)
        self.run_view.set_summary(text)

    def _on_run_ended(self, _state: str) -> None:
        self.history.refresh()
        self.update_run_summary()
        if self._close_after_run:
            QTimer.singleShot(0, self.close)

    def _remember_cards(self, cards: list) -> None:
        if cards:  # this machine's cards; the CPU or a planned card leaves the last choice of cards
            self.settings.setValue(gpu_cards.SETTING, gpu_cards.to_setting(g.index for g in cards))

    def _start_demo(self) -> None:
        if self.demo_model is not None and self.maybe_save_changes():
            self.runs.start_demo(self.demo_model)

    def history_sources(self) -> tuple[list[Path], list[Path]]:
        """Where the history looks: the workspace's runs, the current output's parent, every known run."""
        roots = [app_settings.workspace_dir() / "runs", self.config_model.config.output_dir.parent]
        extra = [Path(p) for p in app_settings.known_runs(self.settings)]
        return roots, extra

    # -- files -----------------------------------------------------------------------------
    def ask_save_changes(self) -> str:
        """'save', 'discard' or 'cancel' (replaced in tests)."""
        answer = QMessageBox.question(
            self,
            "Unsaved changes",
            "Save the changes to this configuration first?",
            QMessageBox.StandardButton.Save | QMessageBox.StandardButton.Discard | QMessageBox.StandardButton.Cancel,
        )
        words = {QMessageBox.StandardButton.Save: "save", QMessageBox.StandardButton.Discard: "discard"}
        return words.get(answer, "cancel")

    def maybe_save_changes(self) -> bool:
        if not self.config_model.dirty:
            return True
        answer = self.ask_save_changes()
        return self.save_config() if answer == "save" else answer == "discard"

    def new_config(self) -> None:
        if self.maybe_save_changes():
            cfg = TrainConfig()
            cfg.base_dir = app_settings.workspace_dir()
            self.config_model.reset(cfg)
            self.show_page("model")

    def open_config_dialog(self) -> None:
        if not self.maybe_save_changes():
            return
        start = str(self.config_model.path.parent if self.config_model.path else app_settings.workspace_dir())
        path, _ = QFileDialog.getOpenFileName(self, "Open a run configuration", start, "YAML (*.yaml *.yml)")
        if path:
            self.open_config(path)

    def open_config(self, path: str | Path) -> bool:
        try:
            self.config_model.load(path)
        except ConfigError as e:
            QMessageBox.warning(self, "Cannot open this configuration", str(e))
            return False
        app_settings.add_recent_file(self.settings, path)
        self.statusBar().showMessage(f"Opened {path}", 5000)
        return True

    def save_config(self) -> bool:
        if self.config_model.path is None:
            return self.save_config_as()
        return self._save_to(self.config_model.path)

    def save_config_as(self) -> bool:
        start = str(self.config_model.path or app_settings.workspace_dir() / "run.yaml")
        path, _ = QFileDialog.getSaveFileName(self, "Save the run configuration", start, "YAML (*.yaml *.yml)")
        return self._save_to(Path(path)) if path else False

    def _save_to(self, path: Path) -> bool:
        try:
            saved = self.config_model.save(path)
        except (ConfigError, OSError) as e:
            QMessageBox.warning(self, "Cannot save", str(e))
            return False
        app_settings.add_recent_file(self.settings, saved)
        self.statusBar().showMessage(f"Saved {saved}", 5000)
        return True

    def _update_title(self) -> None:
        m = self.config_model
        name = m.path.name if m.path else "untitled"
        self.setWindowTitle(f"{name}{' *' if m.dirty else ''} — QLoRA Studio")
        self.path_label.setText(str(m.path) if m.path else "unsaved configuration")

    # -- geometry and closing --------------------------------------------------------------
    def _restore(self) -> None:
        geometry = self.settings.value("window/geometry")
        if isinstance(geometry, QByteArray) and not geometry.isEmpty():
            self.restoreGeometry(geometry)
        else:
            self.resize(1360, 860)
        state = self.settings.value("window/splitter-v2")
        if isinstance(state, QByteArray):
            self.splitter.restoreState(state)

    def ask_stop_on_close(self) -> bool:
        """A run is live: True to stop it (it saves) and close (replaced in tests)."""
        answer = QMessageBox.question(
            self,
            "A run is in progress",
            "Stop the run and close? It saves a checkpoint and the adapter at the end of the current step.",
            QMessageBox.StandardButton.Yes | QMessageBox.StandardButton.No,
        )
        return answer == QMessageBox.StandardButton.Yes

    def closeEvent(self, event: QCloseEvent) -> None:  # noqa: N802 - Qt's name
        if self.runs.running:
            event.ignore()
            if not self._close_after_run and self.ask_stop_on_close():
                self._close_after_run = True
                self.statusBar().showMessage("Stopping the run; the window closes when it has saved…")
                self.runs.stop_for_close(self)
            return
        if not self._close_after_run and not self.maybe_save_changes():
            event.ignore()
            return
        self.settings.setValue("window/geometry", self.saveGeometry())
        self.settings.setValue("window/splitter-v2", self.splitter.saveState())
        self.settings.sync()
        if self.runs.dialog is not None:
            self.runs.dialog.close()
        for tasks in (self.inspect_tasks, self.budget_tasks, self.history_tasks):
            tasks.shutdown()
        self.result_page.shutdown()  # cancels an answer or export in progress, frees the Try model
        self.history.shutdown()  # the TensorBoard servers "Open logs" started
        event.accept()
