"""The configuration pages: every field bound, tooltips, choices, errors at the field, files."""

from __future__ import annotations

import json
import re
import typing
from pathlib import Path

import numpy as np
import pytest
from PySide6.QtCore import QSize
from PySide6.QtWidgets import QCheckBox, QComboBox, QFileDialog, QLineEdit, QSpinBox

from app.config_model import SECTIONS, ConfigModel, field_type, section_fields
from app.main_window import CONFIG_PAGES
from qlora_engine.config import TrainConfig, field_help
from qlora_engine.padding import PACKING_HINT, padding_share


def all_bindings(window) -> dict:
    out = {}
    for key in CONFIG_PAGES:
        for k, b in window.pages[key].bindings.items():
            out.setdefault(k, b)
    return out


def test_every_config_field_is_on_a_page_with_its_help_as_tooltip(window):
    bindings = all_bindings(window)
    for section in SECTIONS:
        for f in section_fields(section):
            key = f"{section}.{f.name}"
            assert key in bindings, f"{key} is not on any page"
            b = bindings[key]
            assert b.editor.toolTip() == field_help(section, f.name)
            tp = field_type(section, f.name)
            if typing.get_origin(tp) is typing.Literal:
                assert isinstance(b.editor, QComboBox)
                assert [b.editor.itemData(i) for i in range(b.editor.count())] == list(typing.get_args(tp))
            elif tp is bool:
                assert isinstance(b.editor, QCheckBox)
            elif tp is int:
                assert isinstance(b.editor, QSpinBox)


def test_widgets_write_the_config_and_follow_it(qtbot, window):
    b = all_bindings(window)
    b["lora.rank"].editor.setValue(32)
    b["optim.scheduler"].editor.setCurrentIndex(b["optim.scheduler"].editor.findData("linear"))
    ckpt = b["train.gradient_checkpointing"].editor
    assert [ckpt.itemData(i) for i in range(ckpt.count())] == ["auto", True, False]  # bool | Literal["auto"]
    assert ckpt.currentData() == "auto" and ckpt.currentText().startswith("auto")
    ckpt.setCurrentIndex(ckpt.findData(False))
    b["optim.learning_rate"].editor.clear()
    qtbot.keyClicks(b["optim.learning_rate"].editor, "3e-4")
    b["train.max_steps"].editor.setValue(0)  # the "from epochs" entry: None
    cfg = window.config_model.config
    assert (cfg.lora.rank, cfg.optim.scheduler, cfg.train.gradient_checkpointing) == (32, "linear", False)
    assert cfg.optim.learning_rate == 3e-4 and cfg.train.max_steps is None
    assert b["train.max_steps"].editor.text() == "from epochs"
    # the model changes (a suggestion, a loaded file): the widgets follow
    window.config_model.apply_overrides(["lora.rank=4", "data.max_length=512", "optim.learning_rate=0.001"])
    assert b["lora.rank"].editor.value() == 4
    assert window.training_page.bindings["data.max_length"].editor.value() == 512
    assert window.data_page.bindings["data.max_length"].editor.value() == 512  # bound on two pages
    assert float(b["optim.learning_rate"].editor.text()) == 0.001
    assert window.config_model.dirty and window.windowTitle().startswith("untitled *")


def test_a_bad_value_is_marked_at_its_field(qtbot, window):
    b = all_bindings(window)
    rank = b["lora.rank"]
    rank.editor.setValue(0)
    assert rank.editor.property("invalid") is True
    assert not rank.error_label.isHidden()
    assert "at least 1" in rank.error_label.text()
    assert "at least 1" in rank.editor.toolTip()
    assert window.config_model.config.lora.rank == 16  # the last valid value stays in effect
    # two bad fields at once: both marked
    b["data.validation_split"].editor.clear()
    qtbot.keyClicks(b["data.validation_split"].editor, "1.5")
    assert set(window.config_model.errors) == {"lora.rank", "data.validation_split"}
    lr = b["optim.learning_rate"]
    lr.editor.clear()
    qtbot.keyClicks(lr.editor, "fast")
    assert lr.editor.property("invalid") is True and "not a number" in lr.error_label.text()
    # Start refuses and shows the first bad field
    window.show_page("run")
    assert not window.runs.start()
    assert window.current_page == "adapter"
    assert "lora.rank" in window.run_view.summary.text()
    rank.editor.setValue(8)
    b["data.validation_split"].editor.clear()
    qtbot.keyClicks(b["data.validation_split"].editor, "0.1")
    lr.editor.clear()
    qtbot.keyClicks(lr.editor, "2e-4")
    assert window.config_model.valid
    assert rank.editor.property("invalid") is False and rank.error_label.isHidden()
    assert window.config_model.config.lora.rank == 8


def test_config_model_collects_every_bad_field():
    m = ConfigModel()
    m.set_values({("lora", "rank"): 0, ("train", "micro_batch_size"): 0, ("optim", "scheduler"): "wavy"})
    assert set(m.errors) == {"lora.rank", "train.micro_batch_size", "optim.scheduler"}
    assert m.config.lora.rank == 16 and m.config.optim.scheduler == "cosine"
    assert m.value("lora", "rank") == 0  # the form keeps showing what was typed


def test_save_open_and_recent_files(qtbot, window, make_window, tmp_path, monkeypatch):
    target = tmp_path / "configs" / "mine.yaml"
    monkeypatch.setattr(QFileDialog, "getSaveFileName", lambda *a, **k: (str(target), "YAML (*.yaml)"))
    window.config_model.set_values(
        {("lora", "rank"): 24, ("data", "path"): "data/train.jsonl", ("model", "ref"): "org/model"}
    )
    assert window.actions_by_name["save"].shortcut().toString() == "Ctrl+S"
    window.actions_by_name["save"].trigger()  # no path yet: asks where (Save As)
    assert target.is_file()
    loaded = TrainConfig.load(target)
    assert loaded.lora.rank == 24 and loaded.model.ref == "org/model"
    assert "# " in target.read_text()  # the commented YAML the engine writes
    assert window.windowTitle().startswith("mine.yaml —")
    assert not window.config_model.dirty
    window.new_config()
    assert window.config_model.config.lora.rank == 16
    window._fill_recent()
    recent = [a for a in window.recent_menu.actions() if a.text() == str(target)]
    assert recent
    recent[0].trigger()
    assert window.config_model.config.lora.rank == 24 and window.config_model.path == target
    # a broken file: a clear message, nothing changes
    bad = tmp_path / "bad.yaml"
    bad.write_text("lora:\n  rank: many\n")
    warnings = []
    monkeypatch.setattr("app.main_window.QMessageBox.warning", lambda *a: warnings.append(a[2]))
    assert not window.open_config(bad)
    assert "lora.rank" in warnings[0]
    assert window.config_model.config.lora.rank == 24


def test_window_geometry_is_remembered(qtbot, make_window):
    w = make_window()
    first = QSize(w.size())
    w.resize(first.width() + 37, first.height() - 41)
    chosen = QSize(w.size())
    assert chosen != first
    w.close()
    w2 = make_window()
    assert w2.size() == chosen


def test_adapter_targets_from_the_models_own_layers(qtbot, window, tiny_model_dir):
    page = window.adapter_page
    assert page.module_boxes == {}  # no model yet: presets only
    with qtbot.waitSignal(window.model_page.info_changed, timeout=60_000, check_params_cb=lambda i: i is not None):
        window.config_model.set_value("model", "ref", str(tiny_model_dir))
    assert list(page.module_boxes) == ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    assert all(b.isChecked() for b in page.module_boxes.values())  # default: all-linear
    page.preset_buttons["mlp"].click()
    assert window.config_model.config.lora.target_modules == ["mlp"]
    assert [n for n, b in page.module_boxes.items() if b.isChecked()] == ["gate_proj", "up_proj", "down_proj"]
    page.module_boxes["gate_proj"].click()
    assert window.config_model.config.lora.target_modules == ["up_proj", "down_proj"]
    assert not page.preset_buttons["mlp"].isChecked()
    for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
        page.module_boxes[name].click()
    page.module_boxes["gate_proj"].click()
    assert window.config_model.config.lora.target_modules == ["all-linear"]
    # layers: a range bounded by the model's two layers
    assert page.all_layers.isChecked() and page.layer_to.maximum() == 1
    page.all_layers.click()
    assert window.config_model.config.lora.layers == "0-1"
    page.layer_from.setValue(1)
    assert window.config_model.config.lora.layers == "1-1"
    window.config_model.set_value("lora", "layers", "0-5")
    assert "layer 2 does not exist" in page.layer_warning.text()


def open_data(qtbot, window, model_dir, path, rows):
    """``rows`` written to ``path`` as JSONL, the model chosen (its facts read), then the data: the data page."""
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with qtbot.waitSignal(window.model_page.info_changed, timeout=60_000, check_params_cb=lambda i: i is not None):
        window.config_model.set_value("model", "ref", str(model_dir))
    window.config_model.set_value("data", "path", str(path))
    return window.data_page


def test_data_page_detects_maps_previews_and_measures(qtbot, window, tiny_model_dir, tmp_path):
    rows = [{"question": f"What is {i} plus {i}?", "answer": f"It is {2 * i}."} for i in range(30)]
    rows[3]["answer"] = "A much longer answer " * 20
    page = open_data(qtbot, window, tiny_model_dir, tmp_path / "qa.jsonl", rows)
    qtbot.waitUntil(lambda: bool(page.mapping_combos) and not page.mapping_box.isHidden(), timeout=30_000)
    assert "cannot tell the data format" in page.problems.text()
    combo = page.mapping_combos["instruction"]
    assert [combo.itemText(i) for i in range(combo.count())][1:] == ["question", "answer"]
    combo.setCurrentIndex(combo.findData("question"))
    page.mapping_combos["output"].setCurrentIndex(page.mapping_combos["output"].findData("answer"))
    assert window.config_model.config.data.columns == {"instruction": "question", "output": "answer"}
    qtbot.waitUntil(lambda: page.report is not None, timeout=30_000)
    assert page.report["format"] == "alpaca"
    assert "Format: alpaca" in page.detected.text()
    html = page.preview.toHtml()
    assert "What is 0 plus 0?" in page.preview.toPlainText()
    assert "#fde68a" in html  # the trained part is highlighted
    heights = page.bars.opts["height"]
    assert sum(heights) == 30  # every sample in the histogram
    assert page.cut_line.value() == 1024
    window.config_model.set_value("data", "max_length", 40)
    assert page.cut_line.value() == 40
    qtbot.waitUntil(lambda: "longer than 40" in page.stats.text(), timeout=30_000)
    assert isinstance(page.bindings["data.path"].editor, QLineEdit)
    # one long answer among short ones: in micro-batches of 4 it pads its batch, and packing is offered
    window.config_model.set_values({("data", "max_length"): 1024, ("train", "micro_batch_size"): 4})
    share = padding_share(np.asarray(page.report["lengths"]), 4, 1024)
    assert share >= PACKING_HINT
    qtbot.waitUntil(lambda: "would be padding" in page.stats.text(), timeout=30_000)
    assert f"{share:.0%} of the tokens computed" in page.stats.text()
    window.config_model.set_value("data", "packing", True)
    assert "would be padding" not in page.stats.text()


def test_data_page_shows_the_loss_weight_of_a_weighted_part(qtbot, window, tiny_model_dir, tmp_path):
    answer = [{"type": "text", "text": "Arr, matey! ", "weight": 0.2}, {"type": "text", "text": "Paris."}]
    rows = [{"messages": [{"role": "user", "content": f"Capital {i}?"}, {"role": "assistant", "content": answer}]}
            for i in range(5)]
    page = open_data(qtbot, window, tiny_model_dir, tmp_path / "weighted.jsonl", rows)
    qtbot.waitUntil(lambda: page.report is not None and page.report.get("format") == "chat", timeout=30_000)
    text = page.preview.toPlainText()
    assert "Arr, matey!×0.2 Paris.<|im_end|>" in text  # the space goes with " Paris", a token of weight 1
    assert "×1" not in text  # a weight of 1 is not marked


@pytest.mark.parametrize(
    ("row", "shown", "trained"),
    [
        ({"messages": [{"role": "user", "content": "Capital of France?"}, {"role": "assistant", "content": "Paris."}]},
         ["user: Capital of France?", "assistant: Paris."], "Paris."),
        ({"prompt": "Capital of France?", "completion": "Paris."}, ["Capital of France?", "Paris."], "Paris."),
        ({"text": "Paris is the capital of France."}, ["Paris is the capital of France."], "Paris is the capital"),
        ({"instruction": "Capital of France?", "output": "Paris."}, ["user: Capital of France?", "assistant: Paris."],
         "Paris."),
        ({"messages": [{"role": "user", "content": "Capital?"},
                       {"role": "assistant", "content": [{"type": "text", "text": "Arr! ", "weight": 0.2},
                                                         {"type": "text", "text": "Paris."}]}]},
         ["user: Capital?", "assistant: Arr! ×0.2Paris."], "Paris."),
    ],
    ids=["chat", "prompt-completion", "text", "alpaca", "weighted-chat"],
)
def test_data_page_shows_samples_before_a_model_is_chosen(qtbot, window, tmp_path, row, shown, trained):
    """No model yet: the samples are read without a tokenizer, and still shown, the trained part highlighted."""
    path = tmp_path / "rows.jsonl"
    path.write_text(json.dumps(row) + "\n")
    page = window.data_page
    window.config_model.set_value("data", "path", str(path))
    qtbot.waitUntil(lambda: page.report is not None and bool(page.report.get("samples")), timeout=30_000)
    text = page.preview.toPlainText()
    assert all(s in text for s in shown), text
    spans = re.findall(r'<span style="[^"]*background-color:#fde68a[^"]*">(.*?)</span>', page.preview.toHtml(), re.S)
    highlighted = [re.sub(r"<[^>]+>", "", h) for h in spans]
    assert any(trained in h for h in highlighted), highlighted
    assert not any("Capital" in h or ":" in h for h in highlighted), highlighted  # the question and roles: plain


def test_unplaced_fields_are_bound_generically(make_window):
    w = make_window()
    assert "data.cache" in all_bindings(w)
    assert Path(w.training_page.where.text().split(" to ", 1)[1]).is_absolute()
