"""The training run's job, and what the window does with runs: start, stop, abort, resume, the demo.

:class:`RunActions` owns at most one live training run: it writes the configuration it
launches (every path made absolute, so the run does not depend on the app's working
directory), starts the engine child through :class:`~app.run_worker.EngineJob` (on several
cards: ``train --gpus 0,2``, the engine's torchrun launcher), feeds its events into one
:class:`RunRecord`, sends it stop/save/abort, samples each chosen card's memory through NVML
about twice a second, and turns an engine that died without a word (a native crash, a
kill) into a ``RunFailed`` the window can show. Pages observe it through its signals.

Its state is derived (:mod:`app.job_state`): from the run's events first, then from what the
user asked (stop, abort) and how the child exited. A failure is the engine's ``run_failed``
event (also for one before the run starts); the child's stderr is only shown, never parsed.
A resumed run's record starts from the run folder's ``events.jsonl``, so the curve and the
elapsed time of the part before the resume stay.

Kept apart from the main window (which owns pages, menus and files) so that each stays
readable. Questions to the user go through small methods (``ask_*``) the tests replace.
"""

from __future__ import annotations

import time
from pathlib import Path

from PySide6.QtCore import QObject, QTimer, Signal
from PySide6.QtWidgets import QMessageBox, QWidget

from app import gpu_cards
from app.error_dialog import RunErrorDialog
from app.failure_fixes import FixChoice, judge_fixes, keep_config_before_fix
from app.history import HistoryPage
from app.job_state import JobFacts, ending_event, state_of
from app.run_catalog import absolute_config, holds_run, next_free_dir
from app.run_record import RunRecord
from app.run_view import RunView
from app.run_worker import EngineJob, engine_command, engine_env
from app.settings import add_known_run, data_dir, logs_dir, workspace_dir
from qlora_engine.config import ConfigError, TrainConfig, apply_overrides, check_ready
from qlora_engine.errors import QLoRAError
from qlora_engine.events import Event, RunFailed
from qlora_engine.resources import path as resource_path

CLOSE_GRACE_MS = 120_000
"""How long closing the window waits for a stopped run to save before ending it."""

FIXES_TASK = "failure-fixes"
"""The background job that judges a failed run's fixes (on the window's history task runner)."""

VRAM_SAMPLE_MS = 500


class RunActions(QObject):
    """Owns the training run's child and ties it to the run view, the history and the form.

    Signals:
        state_changed(str): idle, starting, running, stopping, finished, stopped, failed, aborted.
        updated(): the record changed (the view throttles its redraws).
        event(Event): every engine event as it arrives.
        run_started(Path): a run was launched; its folder.
        ended(str): the child process is gone; the final state.
        error_shown(RunErrorDialog): the error dialog was opened (tests close it).
    """

    state_changed = Signal(str)
    updated = Signal()
    event = Signal(object)
    run_started = Signal(object)
    ended = Signal(str)
    error_shown = Signal(object)

    def __init__(self, window, view: RunView, history: HistoryPage) -> None:
        super().__init__(window)
        self.window = window
        self.view = view
        self.history = history
        self.job: EngineJob | None = None
        self.record = RunRecord()
        self.facts = JobFacts()
        self.state = "idle"
        self.log_path: Path | None = None
        self.run_dir: Path | None = None
        self.command_factory = engine_command
        """Builds the child's command line (tests swap in a replay of recorded events)."""
        self.dialog: RunErrorDialog | None = None
        self.replaying: Path | None = None
        self._sampler = QTimer(self, interval=VRAM_SAMPLE_MS, timeout=self._sample_vram)
        self.state_changed.connect(view.set_state)
        self.updated.connect(view.schedule_redraw)
        self.event.connect(view.append_event)
        view.start_requested.connect(self.start)
        view.stop_requested.connect(self.stop)
        view.abort_requested.connect(self.abort)
        history.open_requested.connect(self.open_run)
        history.load_config_requested.connect(self.load_run_config)
        history.resume_requested.connect(self.resume)
        history.compare_requested.connect(self.compare)
        window.history_tasks.finished.connect(self._on_fixes_judged)
        window.history_tasks.failed.connect(self._on_fixes_failed)

    @property
    def running(self) -> bool:
        return self.job is not None and self.job.returncode is None

    # -- questions (replaced in tests) -----------------------------------------------------
    def ask_existing_run(self, run_dir: Path, new_dir: Path) -> str:
        """The output folder holds a run: 'resume', 'new' (use ``new_dir``) or 'cancel'."""
        box = QMessageBox(self.window, windowTitle="The output folder holds a run")
        box.setText(f"{run_dir} already holds a run (checkpoints or an adapter).")
        box.setInformativeText(f"Continue that run, or start a new one in {new_dir.name}?")
        resume = box.addButton("Continue it", QMessageBox.ButtonRole.AcceptRole)
        new = box.addButton(f"New run in {new_dir.name}", QMessageBox.ButtonRole.AcceptRole)
        box.addButton(QMessageBox.StandardButton.Cancel)
        box.exec()
        return "resume" if box.clickedButton() is resume else "new" if box.clickedButton() is new else "cancel"

    def tell(self, title: str, text: str) -> None:
        QMessageBox.warning(self.window, title, text)

    # -- starting --------------------------------------------------------------------------
    def start(self) -> bool:
        """Start a run with the form's configuration, unless the engine has flagged any of it.

        The checks are the engine's own: the config's validation (the form's field errors),
        ``check_ready``, and the model and data pages' inspections (the engine's errors about
        the model and the data chosen now). Nothing already flagged is started; the field at
        fault is shown. Errors are read by their attributes, never by their text.
        """
        w = self.window
        model = w.config_model
        if self.running:
            return False
        problem = self.launch_blocker()
        if problem is not None:
            field, title, text = problem
            w.reveal_field(field)
            self.tell(title, text)
            return False
        cfg = model.config
        run_dir = cfg.output_dir
        resume = None
        if holds_run(run_dir):
            new_dir = next_free_dir(run_dir)
            answer = self.ask_existing_run(run_dir, new_dir)
            if answer == "cancel":
                return False
            if answer == "resume":
                resume = True
            else:
                model.set_value("output", "dir", str(new_dir))
                cfg = model.config
        return self.launch(cfg, resume=resume)

    def launch_blocker(self) -> tuple[str | None, str, str] | None:
        """Why Start must not launch the form's configuration now: (field, title, text); None: it may."""
        w = self.window
        model = w.config_model
        if not model.valid:
            key = next(iter(model.errors), None)
            return key, "Fix the configuration first", f"{key}: {model.errors[key]}" if key else str(model.general_error)
        try:
            check_ready(model.config)
        except ConfigError as e:
            return e.field, "Not ready to train", str(e)
        for page, field in ((w.model_page, "model.ref"), (w.data_page, "data.path")):
            if page.error is not None:
                return page.error.field or field, "Fix this first", str(page.error)
        return None

    def launch(self, cfg: TrainConfig, resume: bool | None = None) -> bool:
        """Write the launch configuration and start its child on the budget panel's card or cards."""
        w = self.window
        self.replaying = None
        if self.dialog is not None:  # the failure of a run before this one
            self.dialog.close()
            self.dialog = None
        launch = absolute_config(cfg)
        run_dir = Path(launch.output.dir)
        stamp = time.strftime("%Y%m%d-%H%M%S")
        try:
            config_path = data_dir() / "launch" / f"{stamp}-{run_dir.name}.yaml"
            launch.save(config_path)
            self.log_path = logs_dir() / f"{run_dir.name}-{stamp}.log"
        except (OSError, QLoRAError) as e:  # the app's own folder cannot be written
            self.tell("Could not start the run", str(e))
            return False
        self.run_dir = run_dir
        cards = w.budget.selected_gpus()
        env = gpu_cards.launch_env(engine_env(), cards, launch.train.device)
        # a resumed run continues its record: the curve and the time before the resume stay
        self.record = RunRecord.from_dir(run_dir) if resume else RunRecord(run_dir=run_dir)
        self.record.gpus = [g.index for g in cards]
        self.facts = JobFacts(launched=True)
        cwd = run_dir.parent if run_dir.parent.is_dir() else None
        command = self.command_factory(config_path, resume) + gpu_cards.gpus_args(cards)
        job = EngineJob(command, cwd=cwd, env=env, log_path=self.log_path, parent=self)
        job.event.connect(self._on_event)
        job.output.connect(self.view.append_text)
        job.finished.connect(self._on_finished)
        self.job = job
        self._update_state()
        job.start()
        if cards:
            self._sampler.start()
        self.view.show_record(self.record, self.state)
        w.result_page.set_run(run_dir)  # Try and Export follow the run this page shows
        add_known_run(w.settings, run_dir)
        w.show_page("run")
        self.run_started.emit(run_dir)
        return True

    def stop(self) -> None:
        """Save and finish at the next step boundary."""
        if self.running:
            self.facts.stop_requested = True
            self.job.stop()
            self._update_state()

    def abort(self) -> None:
        """End the engine now; the checkpoints already on disk stay.

        Several cards: torchrun's workers outlive a killed launcher (and take it as a stop, which
        saves), so they are told ``abort`` through it; a second Abort ends the launcher as well.
        """
        if self.running:
            several = len(self.record.gpus) > 1 and not self.facts.abort_requested
            self.facts.abort_requested = True
            if several:
                self.job.send("abort")
            else:
                self.job.abort()

    def save_now(self) -> None:
        if self.running:
            self.job.save_now()

    def wait(self, timeout_ms: int = 60_000) -> bool:
        """Block until the child's thread has ended (tests and shutdown only)."""
        return self.job.wait(timeout_ms) if self.job is not None else True

    def resume(self, run_dir: Path) -> bool:
        """Continue a run from its newest checkpoint, with the configuration it was started with."""
        if self.running:
            self.tell("A run is in progress", "Stop the current run before resuming another.")
            return False
        try:
            cfg = TrainConfig.load(Path(run_dir) / "config.yaml")
            cfg = apply_overrides(cfg, [f"output.dir={Path(run_dir).resolve()}"])
            cfg.base_dir = Path(run_dir).resolve()
        except ConfigError as e:
            self.tell("Cannot resume this run", str(e))
            return False
        return self.launch(absolute_config(cfg), resume=True)

    # -- the demo --------------------------------------------------------------------------
    def start_demo(self, gguf: Path) -> bool:
        """One click: the demo model on the bundled sample data, a short run, started at once."""
        demo = workspace_dir() / "runs" / "demo"
        out = next_free_dir(demo) if demo.exists() else demo
        from qlora_engine.quickstart import TRAIN_SETTINGS  # the same measured settings as `qlora-engine quickstart`

        overrides = {
            ("model", "ref"): str(gguf),
            ("data", "path"): str(resource_path("data", "quickstart.jsonl")),
            ("output", "dir"): str(out),
            **{tuple(key.split(".", 1)): value for key, value in TRAIN_SETTINGS.items()},
        }
        self.window.config_model.reset(TrainConfig())
        self.window.config_model.config.base_dir = workspace_dir()
        self.window.config_model.set_values(overrides)
        return self.start()

    # -- history ---------------------------------------------------------------------------
    def open_run(self, run_dir: Path) -> None:
        """Redraw a finished (or failed, or stopped) run's charts from its events.jsonl."""
        if self.running:
            self.tell("A run is in progress", "Its charts are on the Run page; open past runs when it has ended.")
            return
        rec = RunRecord.from_dir(run_dir)
        self.replaying = Path(run_dir)
        self.view.show_record(rec, "replay", note=f"from history · {_record_summary(rec)}")
        self.window.result_page.set_run(Path(run_dir))
        self.window.show_page("run")

    def load_run_config(self, run_dir: Path) -> None:
        """Load a run's configuration into the form, pointed at a fresh output folder."""
        if not self.window.maybe_save_changes():
            return
        try:
            cfg = TrainConfig.load(Path(run_dir) / "config.yaml")
        except ConfigError as e:
            self.tell("Cannot load this run's configuration", str(e))
            return
        fresh = next_free_dir(Path(run_dir).resolve())
        cfg = apply_overrides(absolute_config(cfg), [f"output.dir={fresh}"])
        cfg.base_dir = fresh.parent
        self.window.config_model.reset(cfg)
        self.window.config_model.mark_dirty()
        name = Path(run_dir).name
        self.window.statusBar().showMessage(f"Loaded the configuration of {name}; new runs go to {fresh}", 8000)
        self.window.show_page("model")

    def compare(self, run_dirs: list[Path]) -> None:
        """Overlay the chosen runs' train-loss curves on the run charts."""
        overlays = {}
        for d in run_dirs:
            rec = RunRecord.from_dir(d)
            xs, ys = rec.series("loss")
            if xs:
                overlays[Path(d).name] = (xs, ys)
        self.view.charts.set_overlays(overlays)
        self.window.show_page("run")

    # -- endings ---------------------------------------------------------------------------
    def show_failure(self, failure: RunFailed, log_path: str) -> None:
        run_dir = self.run_dir
        self.dialog = RunErrorDialog(failure, log_path or None, str(run_dir) if run_dir else None, self.window)
        self.dialog.fix_chosen.connect(self.apply_fix)
        self.dialog.setModal(False)
        self.dialog.show()
        if failure.fixes and run_dir is not None:
            started = self.record.started
            config = dict(started.config) if started is not None and started.config else None

            def judge() -> tuple[RunFailed, list[FixChoice]]:  # reads files: off the GUI thread
                return failure, judge_fixes(failure, run_dir, config)

            self.window.history_tasks.submit(FIXES_TASK, judge)
        self.error_shown.emit(self.dialog)

    def _on_fixes_judged(self, key: str, result: object) -> None:
        if key != FIXES_TASK:
            return
        failure, choices = result
        if self.dialog is not None and self.dialog.failure is failure:
            self.dialog.set_fix_choices(choices)

    def _on_fixes_failed(self, key: str, exc: Exception, _tb: str) -> None:
        if key == FIXES_TASK and self.dialog is not None:
            self.dialog.set_fix_error(str(exc))

    # -- out-of-memory fixes ---------------------------------------------------------------
    def apply_fix(self, choice: FixChoice) -> bool:
        """Apply a fix of a failed run and run again: the same run from its checkpoint, or a new run.

        Resumable: the run folder's ``config.yaml`` becomes the changed configuration (the one
        from before is kept beside it, see :func:`keep_config_before_fix`) and the run
        continues exactly as the history's "Resume" does. Otherwise a new run in a fresh
        folder starts with the changed configuration; the failed run is left as it is. Where
        the form holds the failed run's configuration, it takes the change too, so the budget
        and the training page show what runs.
        """
        if self.running:
            self.tell("A run is in progress", "Stop the current run before applying a fix to another.")
            return False
        if choice.config is None or choice.before is None:
            self.tell("Cannot apply this change", choice.reason or choice.description)
            return False
        run_dir = Path(choice.run_dir)
        changes = ", ".join(choice.overrides)
        form_holds_run = self._form_holds(choice.before)
        if choice.resumable:
            try:
                kept = keep_config_before_fix(run_dir, choice.before)
                choice.config.save(run_dir / "config.yaml")  # what the history's resume launches
            except OSError as e:
                self.tell("Could not change the run's configuration", f"{run_dir / 'config.yaml'}: {e}")
                return False
            if form_holds_run:
                self.window.config_model.apply_overrides(list(choice.overrides))
            if not self.resume(run_dir):
                return False
            self.view.append_text(
                f"Applied {changes} ({choice.description}); continuing from the checkpoint at step "
                f"{choice.resume_step}. The configuration from before the change is kept in {kept.name}."
            )
            self.window.statusBar().showMessage(f"Applied {changes}; {run_dir.name} continues", 8000)
            return True
        fresh = next_free_dir(run_dir.resolve())
        model = self.window.config_model
        if form_holds_run:
            model.apply_overrides(list(choice.overrides))
            model.set_value("output", "dir", str(fresh))
        else:
            if not self.window.maybe_save_changes():
                return False
            cfg = absolute_config(choice.config)
            cfg.output.dir = str(fresh)
            cfg.base_dir = fresh.parent
            model.reset(cfg)
            model.mark_dirty()
        if not self.start():
            self.window.statusBar().showMessage(f"The changed configuration is in the form; new runs go to {fresh}")
            return False
        self.view.append_text(
            f"New run with {changes} ({choice.description}): {choice.reason} "
            f"The failed run {run_dir.name} is left as it was."
        )
        return True

    def _form_holds(self, cfg: TrainConfig) -> bool:
        """True if the form's configuration is the one this run was launched with (paths made absolute)."""
        model = self.window.config_model
        return model.valid and absolute_config(model.config) == absolute_config(cfg)

    # -- the child's events and exit ---------------------------------------------------------
    def _on_event(self, e: Event) -> None:
        self.record.apply(e)
        self._update_state()
        self.event.emit(e)
        self.updated.emit()

    def _sample_vram(self) -> None:
        if not self.record.gpus or not self.running:
            return
        samples = gpu_cards.sample_cards(self.record.gpus, self.job.pid)
        for s in samples:
            self.record.add_vram(s.used_bytes, s.process_bytes, card=s.index)
        if samples:
            self.updated.emit()

    def _on_finished(self, code: int, stderr_tail: str) -> None:
        self._sampler.stop()
        self.facts.exit_code = code
        closing = ending_event(self.record, self.facts, stderr_tail)
        if closing is not None:
            self._on_event(closing)
        self.updated.emit()
        self._update_state()
        if self.state == "failed":
            self.show_failure(self.record.failed, str(self.log_path) if self.log_path else "")
        self.window.result_page.set_run(self.run_dir)
        self.ended.emit(self.state)

    def _update_state(self) -> None:
        state = state_of(self.record, self.facts)
        if state != self.state:
            self.state = state
            self.state_changed.emit(state)

    def stop_for_close(self, parent: QWidget) -> None:
        """Closing during a run: stop it (it saves), and end it if it has not exited in time."""
        self.stop()
        QTimer.singleShot(CLOSE_GRACE_MS, self.abort)


def _record_summary(rec: RunRecord) -> str:
    cfg = rec.config_dict() or {}
    model = Path(str((cfg.get("model") or {}).get("ref", "?"))).name
    data = Path(str((cfg.get("data") or {}).get("path", "?"))).name
    error = f" · error: {rec.failed.message}" if rec.failed else ""
    return f"Status: {rec.status} · step {rec.step} of {rec.total_steps} · model {model} · data {data}{error}"
