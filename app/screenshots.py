"""Screenshots of every page, made by driving the real window offscreen.

    python -m app.screenshots [--out docs/screenshots] [--model PATH] [--steps 20] [--card-gib 8]

It opens the window on an offscreen screen, chooses the model (the SmolLM2-135M demo GGUF
by default) and the bundled sample data, goes through the pages, trains a short real run on
this machine's device (the CPU is fine), opens the run history, and saves a PNG of each view.
Without an NVIDIA GPU the budget panel is shown against a card of ``--card-gib`` GiB, as
NVML would list it, so the picture shows what the panel does on a GPU machine.

    python -m app.screenshots --looks [--size 1024x640] [--look dark] [--out docs/screenshots/looks]

``--looks`` trains nothing: it opens every page of a window of exactly ``--size`` logical pixels
(1024 × 640 is a 1280×800 screen at 125%; a 1366×768 one at 125% offers 1,093 × 614 less the
panel), the run page replaying a recorded run's events so the charts and their legends are drawn,
and saves one PNG per page in the chosen look, to check by eye what the tests check by number.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path


def _offscreen(width: int, height: int) -> None:
    if os.environ.get("QT_QPA_PLATFORM", "offscreen").startswith("offscreen"):
        cfg = Path(tempfile.mkdtemp()) / "screen.json"
        screen = {"name": "Screen", "x": 0, "y": 0, "width": width, "height": height}
        cfg.write_text(json.dumps({"screens": [{**screen, "logicalDpi": 96, "logicalBaseDpi": 96, "dpr": 1}]}))
        os.environ["QT_QPA_PLATFORM"] = f"offscreen:configfile={cfg}"


def _window(args: argparse.Namespace, prefix: str):
    """The application in ``args.look`` and a main window over a fresh QLORA_STUDIO_HOME: (window, home)."""
    home = Path(tempfile.mkdtemp(prefix=prefix))
    os.environ.setdefault("QLORA_STUDIO_HOME", str(home))
    from PySide6.QtWidgets import QApplication  # lazy: Qt loads after _offscreen() sets its platform

    from app.main_window import MainWindow  # lazy: Qt loads after _offscreen() sets its platform
    from app.theme import apply_theme  # lazy: Qt loads after _offscreen() sets its platform
    from qlora_engine.demo import find_demo_model  # lazy: Qt loads after _offscreen() sets its platform

    apply_theme(QApplication.instance() or QApplication(sys.argv[:1]), args.look)
    w = MainWindow(demo_model=find_demo_model())
    w.ask_save_changes = lambda: "discard"
    return w, home


def _settle(ms: int) -> None:
    from PySide6.QtCore import QEventLoop, QTimer  # lazy: Qt loads after _offscreen() sets its platform

    loop = QEventLoop()
    QTimer.singleShot(ms, loop.quit)
    loop.exec()


def _wait(until, timeout_s: float) -> None:
    for _ in range(int(timeout_s * 10)):
        if until():
            return
        _settle(100)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m app.screenshots", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="docs/screenshots")
    p.add_argument("--model", help="model folder or .gguf (default: the demo model)")
    p.add_argument("--data", help="training data (default: the bundled quickstart sample)")
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--card-gib", type=float, default=8.0, help="card size for the budget picture when there is no GPU")
    p.add_argument("--look", choices=["light", "dark"], default="light")
    p.add_argument("--looks", action="store_true", help="every page at --size in --look, a recorded run replayed")
    p.add_argument("--size", default="1024x640", help="--looks: the window's size in logical pixels, WxH")
    args = p.parse_args(argv)
    if args.looks:
        width, height = (int(v) for v in args.size.lower().split("x"))
        _offscreen(width, height)
        return looks(args, width, height)
    _offscreen(1920, 1200)
    from qlora_engine import gpu as gpu_facts  # lazy: Qt loads after _offscreen() sets its platform
    from qlora_engine.demo import find_demo_model  # lazy: Qt loads after _offscreen() sets its platform
    from qlora_engine.events import read_events  # lazy: Qt loads after _offscreen() sets its platform
    from qlora_engine.resources import path as resource_path  # lazy: Qt loads after _offscreen() sets its platform

    model = args.model or find_demo_model()
    if model is None:
        print("no model: pass --model, or fetch the demo with `qlora-engine quickstart`", file=sys.stderr)
        return 2
    data = args.data or resource_path("data", "quickstart.jsonl")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    w, home = _window(args, "qlora-shots-")
    w.resize(1440, 900)
    w.show()
    if not gpu_facts.query_gpus().available:
        size = int(args.card_gib * 2**30)
        w.budget.set_gpus([gpu_facts.GpuInfo(0, f"NVIDIA GPU ({args.card_gib:g} GiB)", size, size, 0, uuid=None)])

    def shot(name: str, widget=None) -> None:
        _settle(400)
        (widget or w).grab().save(str(out / f"{name}.png"))
        print(f"wrote {out / f'{name}.png'}")

    m = w.config_model
    runs = home / "runs"
    m.set_values(
        {
            ("model", "ref"): str(model),
            ("data", "path"): str(data),
            ("output", "dir"): str(runs / "smol-demo"),
            ("train", "max_steps"): args.steps,
            ("train", "save_steps"): 10,
            ("train", "micro_batch_size"): 4,
            ("train", "gradient_accumulation_steps"): 1,
            ("optim", "learning_rate"): 5e-4,
            ("optim", "warmup_steps"): 2,
            ("data", "max_length"): 256,
            ("data", "validation_split"): 0.1,
            ("train", "eval_steps"): 4,
        }
    )
    _wait(lambda: w.model_page.info is not None and w.budget.result is not None, 120)
    shot("1-model")
    w.show_page("data")
    _wait(lambda: w.data_page.report is not None and bool(w.data_page.report.get("lengths")), 120)
    shot("2-data")
    bar = w.data_page.scroll.verticalScrollBar()
    bar.setValue(bar.maximum())
    shot("2b-data-lengths")
    w.show_page("adapter")
    shot("3-adapter")
    w.show_page("training")
    shot("4-training")
    for batch in (64, 256, 1024):  # the estimate is sized by the data's longest sample: push until over
        m.set_values({("train", "micro_batch_size"): batch, ("train", "gradient_checkpointing"): False})
        _wait(lambda: w.budget.property("state") in ("over", "cpu"), 5)
        if w.budget.property("state") in ("over", "cpu"):
            break
    shot("4b-budget-over-limit", w.budget)
    m.set_values(
        {("train", "micro_batch_size"): 4, ("data", "max_length"): 256, ("train", "gradient_checkpointing"): "auto"}
    )
    w.show_page("run")
    shot("5a-run-ready")
    w.budget.set_gpus([])  # the run itself goes where this machine can train
    w.runs.start()
    _wait(lambda: not w.runs.running, 900)
    w.run_view.redraw()
    shot("5-run")
    w.show_page("result")
    shot("6-try-export")
    w.show_page("history")
    _wait(lambda: bool(w.history.runs), 30)
    shot("7-history")
    oom = Path(__file__).resolve().parents[1] / "tests" / "data" / "events" / "oom.jsonl"
    if oom.is_file():
        failure = read_events(oom)[-1]
        w.runs.show_failure(failure, str(home / "data" / "logs" / "smol-oom.log"))
        shot("8-error-dialog", w.runs.dialog)
        w.runs.dialog.close()
    w.close()
    return 0


def looks(args: argparse.Namespace, width: int, height: int) -> int:
    """Every page of a ``width`` × ``height`` window in ``args.look``, the run page replaying a recorded run."""
    from app.main_window import PAGES  # lazy: Qt loads after _offscreen() sets its platform
    from qlora_engine.demo import find_demo_model  # lazy: Qt loads after _offscreen() sets its platform
    from qlora_engine.resources import path as resource_path  # lazy: Qt loads after _offscreen() sets its platform

    out = Path(args.out if args.out != "docs/screenshots" else f"docs/screenshots/looks-{width}x{height}")
    out.mkdir(parents=True, exist_ok=True)
    w, home = _window(args, "qlora-looks-")
    w.setGeometry(0, 0, width, height)
    w.show()
    model = args.model or find_demo_model()
    if model is not None:
        data = args.data or resource_path("data", "quickstart.jsonl")
        w.config_model.set_values({("model", "ref"): str(model), ("data", "path"): str(data)})
    w.budget.plan_for(8)
    _wait(lambda: w.budget.result is not None, 120)
    recorded = Path(__file__).resolve().parents[1] / "tests" / "data" / "events" / "normal.jsonl"
    for number, (key, _label) in enumerate(PAGES, 1):
        if key == "run" and recorded.is_file():
            run_dir = home / "runs" / "recorded-run"
            run_dir.mkdir(parents=True, exist_ok=True)
            shutil.copy(recorded, run_dir / "events.jsonl")
            w.runs.open_run(run_dir)
            w.history.add_folder(run_dir)
        w.show_page(key)
        _settle(1500 if key in ("model", "data") else 500)
        name = out / f"{args.look}-{number}-{key}.png"
        w.grab().save(str(name))
        print(f"wrote {name}")
    w.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
