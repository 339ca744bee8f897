"""The window around the pages: the demo's one click, shortcuts, looks, an output folder in use."""

from __future__ import annotations

import sys
from pathlib import Path

import yaml
from PySide6.QtGui import QPalette
from PySide6.QtWidgets import QApplication

from qlora_engine.quickstart import TRAIN_SETTINGS
from qlora_engine.resources import path as resource_path

REPLAY = Path(__file__).with_name("replay_engine.py")


def capture_launches(window, events: Path) -> list:
    """Replace the engine by the replay and record (config path, resume) of every launch."""
    launches = []

    def factory(config, resume=None):
        launches.append((Path(config), resume))
        return [sys.executable, str(REPLAY), str(events)]

    window.runs.command_factory = factory
    return launches


def test_demo_is_offered_and_starts_in_one_click(qtbot, make_window, tmp_path, events_dir):
    assert make_window(demo_model=None).model_page.demo_banner.isHidden()
    gguf = tmp_path / "SmolLM2-135M-Instruct.Q4_1.gguf"
    gguf.write_bytes(b"GGUF")
    w = make_window(demo_model=gguf)
    assert not w.model_page.demo_banner.isHidden()
    launches = capture_launches(w, events_dir / "normal.jsonl")
    with qtbot.waitSignal(w.runs.ended, timeout=20_000):
        w.model_page.demo_button.click()
    assert w.current_page == "run"
    ((config, resume),) = launches
    launched = yaml.safe_load(config.read_text())
    assert launched["model"]["ref"] == str(gguf)
    assert launched["data"]["path"] == str(resource_path("data", "quickstart.jsonl"))
    assert launched["train"]["max_steps"] == TRAIN_SETTINGS["train.max_steps"] and resume is None
    assert Path(launched["output"]["dir"]).is_absolute()
    assert w.result_page.run_dir == Path(launched["output"]["dir"])


def test_output_folder_holding_a_run_continue_or_new(qtbot, window, tmp_path, events_dir):
    launches = capture_launches(window, events_dir / "stop.jsonl")
    out = tmp_path / "runs" / "busy"
    (out / "checkpoints" / "step-000003").mkdir(parents=True)
    window.config_model.set_values(
        {
            ("model", "ref"): str(tmp_path / "m"),
            ("data", "path"): str(tmp_path / "d.jsonl"),
            ("output", "dir"): str(out),
        }
    )
    window.runs.ask_existing_run = lambda run_dir, new_dir: "cancel"
    assert not window.runs.start() and not launches
    window.runs.ask_existing_run = lambda run_dir, new_dir: "new"
    with qtbot.waitSignal(window.runs.ended, timeout=20_000):
        assert window.runs.start()
    assert window.config_model.config.output.dir == str(tmp_path / "runs" / "busy-2")
    window.config_model.set_value("output", "dir", str(out))
    window.runs.ask_existing_run = lambda run_dir, new_dir: "resume"
    with qtbot.waitSignal(window.runs.ended, timeout=20_000):
        assert window.runs.start()
    assert [r for _, r in launches] == [None, True]


def test_shortcuts_for_the_main_actions(window):
    keys = {name: a.shortcut().toString() for name, a in window.actions_by_name.items()}
    assert keys["start"] == "Ctrl+R"
    assert keys["stop"] == "Ctrl+."
    assert keys["abort"] == "Ctrl+Shift+."
    assert keys["open"] == "Ctrl+O" and keys["save"] == "Ctrl+S" and keys["new"] == "Ctrl+N"
    window.show_page("model")
    pages = [
        a for a in window.findChildren(type(window.actions_by_name["start"])) if a.shortcut().toString() == "Ctrl+5"
    ]
    pages[0].trigger()
    assert window.current_page == "run"


def test_light_and_dark_looks(window, qapp):
    window.set_theme("dark")
    assert window.settings.value("look/mode") == "dark"
    assert qapp.property("qlora_scheme") == "dark"
    assert QApplication.palette().color(QPalette.ColorRole.Window).lightness() < 100
    assert window.run_view.charts.view.backgroundBrush().color().lightness() < 100
    window.set_theme("system")  # offscreen reports no colour scheme: the light look
    assert qapp.property("qlora_scheme") == "light"
    assert QApplication.palette().color(QPalette.ColorRole.Window).lightness() > 150
    assert window.run_view.charts.view.backgroundBrush().color().lightness() > 150
