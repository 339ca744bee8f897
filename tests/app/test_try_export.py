"""The Try and Export views, driven offscreen against a real trained run (the tiny Llama chat run).

The model loads and generates on the page's worker thread; the event-loop probe checks the
window keeps answering meanwhile. Exports run the engine's real export code.
"""

from __future__ import annotations

import shlex
import sys
from pathlib import Path

import pytest
from PySide6.QtCore import Qt

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "engine"))
from test_export_support import CHATS, trained_chat_run  # noqa: E402

from app.pages.export_page import ExportPage, TryExportPage  # noqa: E402
from app.pages.try_page import TryPage  # noqa: E402
from qlora_engine.events import AnswerPiece  # noqa: E402
from qlora_engine.export import load_run  # noqa: E402


@pytest.fixture(scope="module")
def chat_run(tmp_path_factory, tiny_model_dir) -> Path:
    return trained_chat_run(tmp_path_factory, tiny_model_dir)


@pytest.fixture
def try_page(qtbot):
    page = TryPage()
    qtbot.addWidget(page)
    page.show()
    yield page
    assert page.shutdown()


@pytest.fixture
def export_page(qtbot):
    page = ExportPage()
    qtbot.addWidget(page)
    page.show()
    yield page
    assert page.shutdown()


def test_try_streams_base_and_tuned_answers_from_a_child_process_and_goes_on_talking(
    qtbot, try_page, chat_run, loop_probe
):
    page = try_page
    assert not page.generate_button.isEnabled()  # no run yet
    page.set_run(chat_run)
    assert page.generate_button.isEnabled() and not page.cancel_button.isEnabled()
    page.prompt.setPlainText(CHATS[0][0])
    page.temperature.setValue(0.0)
    page.max_new_tokens.setValue(16)
    pieces: list[tuple[str, str]] = []
    loop_probe.start()
    with qtbot.waitSignal(page.answered, timeout=180_000) as done:
        qtbot.mouseClick(page.generate_button, Qt.MouseButton.LeftButton)
        page.job.event.connect(lambda e: pieces.append((e.side, e.text)) if isinstance(e, AnswerPiece) else None)
        assert page.cancel_button.isEnabled() and not page.generate_button.isEnabled()
    loop_probe.stop()
    loop_probe.check()  # loading the model and generating never blocked the window
    results = done.args[0]
    assert results["tuned"].text == "Paris."
    assert page.panes["tuned"].toPlainText() == f"You: {CHATS[0][0]}\n\nModel: Paris."
    assert page.panes["base"].toPlainText().endswith(results["base"].text) and results["base"].text != "Paris."
    assert "ended by the model" in page.footers["tuned"].text()
    assert "stopped at the token limit" in page.footers["base"].text()
    assert {s for s, _ in pieces} == {"base", "tuned"} and len(pieces) > 3  # streamed, both sides
    assert page.status.text() == "Done." and page.generate_button.isEnabled()

    # The model stays loaded, and the conversation goes on: each message carries the turns before it.
    pid = page.job.pid
    page.compare.setChecked(False)  # a new conversation, the tuned model alone
    assert page.panes["tuned"].toPlainText() == "" and page.conversation["tuned"] == []
    for question, _ in CHATS[1:3]:
        page.prompt.setPlainText(question)
        with qtbot.waitSignal(page.answered, timeout=60_000) as done:
            page.generate()
        assert set(done.args[0]) == {"tuned"}
    assert page.job.pid == pid
    assert [m["role"] for m in page.conversation["tuned"]] == ["user", "assistant"] * 2
    assert page.conversation["tuned"][0]["content"] == CHATS[1][0]
    assert page.panes["tuned"].toPlainText().count("You: ") == 2
    assert page.panes["base"].toPlainText() == ""
    page.new_conversation()
    assert page.conversation["tuned"] == [] and page.panes["tuned"].toPlainText() == ""


def test_try_cancel_stops_both_answers(qtbot, try_page, chat_run):
    page = try_page
    page.set_run(chat_run)
    page.prompt.setPlainText("Tell me everything about foxes.")
    page.max_new_tokens.setValue(4000)
    with qtbot.waitSignal(page.answered, timeout=180_000) as done:
        page.generate()
        qtbot.waitUntil(lambda: page.panes["base"].toPlainText().split("Model: ", 1)[-1] != "", timeout=120_000)
        qtbot.mouseClick(page.cancel_button, Qt.MouseButton.LeftButton)
    results = done.args[0]
    assert results["base"].finish_reason == "cancelled" and results["base"].tokens < 4000
    # the tuned side starts after the cancel was seen: cancelled at once, or it ended its answer first
    assert results["tuned"].finish_reason in ("cancelled", "eos")
    assert page.status.text() == "Cancelled." and "cancelled" in page.footers["base"].text()
    assert page.generate_button.isEnabled()


def test_export_page_writes_an_adapter_then_refuses_the_same_folder_unless_replace(
    qtbot, export_page, chat_run, tmp_path
):
    page = export_page
    page.set_run(chat_run)
    assert page.out.text() == str(chat_run.parent / f"{load_run(chat_run).export_name}-lora")
    out = tmp_path / "adapter-export"
    page.out.setText(str(out))
    page._on_out_edited(str(out))
    assert shlex.split(page.command.text()) == [
        "qlora-engine",
        "export",
        str(chat_run),
        "--format",
        "adapter",
        "--out",
        str(out),
    ]
    with qtbot.waitSignal(page.finished, timeout=120_000) as done:
        qtbot.mouseClick(page.export_button, Qt.MouseButton.LeftButton)
    assert done.args == ["done", str(out)]
    assert (out / "adapter_model.safetensors").is_file() and (out / "README.md").is_file()
    assert page.open_button.isEnabled() and "adapter: done" in page.log.toPlainText()

    with qtbot.waitSignal(page.finished, timeout=60_000) as done:
        page.start()
    assert done.args[0] == "failed" and "already exists" in page.error.text() and "Replace" in page.error.text()
    page.overwrite.setChecked(True)
    assert page.command.text().endswith("--force")
    with qtbot.waitSignal(page.finished, timeout=120_000) as done:
        page.start()
    assert done.args[0] == "done" and page.error.text() == ""


def test_export_page_gguf_shows_progress_and_cancel_leaves_nothing(qtbot, export_page, chat_run, tmp_path):
    page = export_page
    page.set_run(chat_run)
    page.format.setCurrentIndex(page.format.findData("gguf"))
    assert not page.gguf_options.isHidden() and page.out.text().endswith("-gguf")
    page.q8.setChecked(False)
    page.lora.setChecked(False)
    assert "--gguf-types f16 --no-lora" in page.command.text()
    page.f16.setChecked(False)
    assert not page.export_button.isEnabled()  # no GGUF type chosen
    page.f16.setChecked(True)

    cancelled = tmp_path / "cancelled"
    page.out.setText(str(cancelled))
    with qtbot.waitSignal(page.finished, timeout=120_000) as done:
        page.start()
        page.cancel()
    assert done.args[0] == "cancelled" and not cancelled.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".tmp-")]

    out = tmp_path / "gguf"
    page.out.setText(str(out))
    phases: list[str] = []
    with qtbot.waitSignal(page.finished, timeout=180_000) as done:
        page.start()
        page.job.event.connect(lambda e: phases.append(getattr(e, "detail", "")))
        assert page.progress.maximum() == 0  # busy indicator while it runs
    assert done.args[0] == "done"
    name = load_run(chat_run).export_name
    assert sorted(p.name for p in out.iterdir()) == ["Modelfile", "README.md", "config.yaml", f"{name}-f16.gguf"]
    assert any("merge:" in p for p in phases) and any("tensor" in p for p in phases)
    assert page.progress.value() == page.progress.maximum() == 1


def test_try_export_page_follows_the_run(qtbot, chat_run, tmp_path):
    page = TryExportPage()
    qtbot.addWidget(page)
    page.set_run(None)
    assert not page.try_page.generate_button.isEnabled() and not page.export_page.export_button.isEnabled()
    empty = tmp_path / "no-adapter"
    empty.mkdir()
    page.set_run(empty)
    assert not page.export_page.export_button.isEnabled()
    page.set_run(chat_run)
    assert page.try_page.generate_button.isEnabled() and page.export_page.export_button.isEnabled()
    assert [page.tabs.tabText(i) for i in range(page.tabs.count())] == ["Try", "Export"]
    assert not page.busy() and page.shutdown()
