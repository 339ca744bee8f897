"""``qlora-studio --smoke-test``: does this build of the app work on this machine?

Run by ``packaging/build.sh`` on every frozen build, and by hand by anyone checking an install
(``QT_QPA_PLATFORM=offscreen`` for a machine without a display). Each check prints one line;
the last line is ``OK`` (exit 0) or ``FAILED: ...`` (exit 1).

Checks, in order:

- ``resources``: the style sheet, the icon and the sample data resolve, from inside the bundle
  when frozen;
- ``qt``: the platform plugin loaded, and the SVG icon renders through Qt's image plugins;
- ``window``: the main window opens and is shown; the time since the smoke test started is
  printed (with the executable's own start before it, that is the app's start-up time);
- ``bitsandbytes``: its native library was loaded from the bundle (bitsandbytes looks for
  ``libbitsandbytes_*`` next to its own modules and on a CPU silently falls back to slower
  pure-PyTorch code when it finds none, so "it imported" proves nothing), and a tensor
  round-trips through NF4 with double quantization, as the engine quantizes a model;
- ``engine``: the engine command answers ``--help`` (in a frozen app: this executable with
  ``--engine``, exactly the command the window launches runs with);
- ``train`` (only with ``--train MODEL_DIR``): a 2-step QLoRA run of that (tiny) model on the
  bundled sample data, launched by the window's own run controller as a child process, must
  finish and leave an adapter;
- ``try`` and ``export`` (after ``train``): what the Try/Export page does in the window's own
  process: the base and the tuned model answer a question, and the run is exported to GGUF
  (Q8_0) and read back.

Settings, logs and runs go to a temporary folder (``QLORA_STUDIO_HOME``) unless it is set.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

START = time.perf_counter()


def _frozen() -> bool:
    return bool(getattr(sys, "frozen", False))


def _bundle_dir() -> Path | None:
    return Path(getattr(sys, "_MEIPASS", "")).resolve() if _frozen() else None


def _inside_bundle(path: Path) -> bool:
    bundle = _bundle_dir()
    return bundle is None or Path(path).resolve().is_relative_to(bundle)


def engine_argv(*args: str) -> list[str]:
    """The engine's command line, as the window builds it (see app/run_worker.py)."""
    if _frozen():
        return [sys.executable, "--engine", *args]
    return [sys.executable, "-m", "qlora_engine", *args]


# -- the checks ---------------------------------------------------------------------------------


def check_resources() -> str:
    from qlora_engine import resources

    wanted = [("styles", "app.qss"), ("icons", "qlora-studio.svg"), ("data", "quickstart.jsonl")]
    for parts in wanted:
        p = resources.path(*parts)
        if not p.is_file():
            raise AssertionError(f"missing resource {p}")
        if not _inside_bundle(p):
            raise AssertionError(f"{p} resolved outside the bundle {_bundle_dir()}")
    return f"{len(wanted)} files under {resources.ROOT}"


def check_qt(qapp) -> str:
    from PySide6.QtGui import QIcon, QImageReader

    from qlora_engine import resources

    formats = {bytes(f).decode() for f in QImageReader.supportedImageFormats()}
    if "svg" not in formats:
        raise AssertionError(f"no SVG image plugin (formats: {sorted(formats)})")
    pixmap = QIcon(str(resources.path("icons", "qlora-studio.svg"))).pixmap(64, 64)
    if pixmap.isNull():
        raise AssertionError("the SVG icon did not render")
    return f"platform {qapp.platformName()}, {len(formats)} image formats, icon renders"


def check_bitsandbytes() -> str:
    import bitsandbytes  # noqa: F401 (registers its kernels)
    import bitsandbytes.functional as bnbf
    import torch
    from bitsandbytes import cextension

    lib = cextension.lib
    if isinstance(lib, cextension.ErrorHandlerMockBNBNativeLibrary):
        raise AssertionError(f"bitsandbytes found no native library (looked in {cextension.PACKAGE_DIR})")
    loaded = Path(lib._lib._name)
    if not _inside_bundle(loaded):
        raise AssertionError(f"bitsandbytes loaded {loaded}, outside the bundle")
    torch.manual_seed(0)
    x = torch.randn(256, 128, dtype=torch.float32, device="cuda" if torch.cuda.is_available() else "cpu")
    q, state = bnbf.quantize_4bit(x, quant_type="nf4", compress_statistics=True, blocksize=64)
    y = bnbf.dequantize_4bit(q, state)
    rel = ((x - y).abs().mean() / x.abs().mean()).item()
    if not (q.numel() * 2 == x.numel() and rel < 0.15):
        raise AssertionError(f"NF4 round trip off: {q.numel()} bytes for {x.numel()} values, relative error {rel:.3f}")
    return f"{loaded.name} ({cextension.BNB_BACKEND}), NF4 round trip relative error {rel:.3f}"


def check_engine() -> str:
    t0 = time.perf_counter()
    out = subprocess.run(engine_argv("--help"), capture_output=True, text=True, timeout=300)
    if out.returncode != 0 or "usage" not in out.stdout.lower():
        raise AssertionError(f"engine --help exited {out.returncode}: {(out.stderr or out.stdout)[-800:]}")
    cmd = engine_argv("--help")
    return f"{' '.join([Path(cmd[0]).name, *cmd[1:]])} answered in {time.perf_counter() - t0:.1f}s"


def _wait(qapp, predicate, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            return False
        qapp.processEvents()
        time.sleep(0.01)
    return True


def check_window(qapp):
    from app.main_window import MainWindow
    from app.settings import open_settings
    from app.theme import apply_theme

    apply_theme(qapp, "light")  # as app/main.py does: Fusion and the bundled style sheet
    if not qapp.styleSheet():
        raise AssertionError("the style sheet (qlora_engine/resources/styles/app.qss) was not applied")
    window = MainWindow(open_settings())
    window.show()
    handle = window.windowHandle()
    if not _wait(qapp, lambda: window.isVisible() and handle is not None and handle.isExposed(), 60):
        raise AssertionError("the main window was not shown within 60 s")
    shown = time.perf_counter() - START
    return window, f"'{window.windowTitle()}' shown {shown:.1f}s after the smoke test started"


def check_train(qapp, model_dir: Path, workdir: Path) -> str:
    from app.main_window import MainWindow
    from app.settings import open_settings
    from qlora_engine import resources
    from qlora_engine.config import TrainConfig, apply_overrides

    out = workdir / "runs" / "smoke"
    cfg = apply_overrides(
        TrainConfig(),
        [
            f"model.ref={model_dir}",
            f"data.path={resources.path('data', 'quickstart.jsonl')}",
            f"output.dir={out}",
            "train.device=cpu",
            "train.max_steps=2",
            "train.micro_batch_size=2",
            "train.gradient_accumulation_steps=1",
            "train.save_steps=null",
            "data.max_length=64",
        ],
    )
    window = MainWindow(open_settings())  # the run's job lives in the window's RunActions
    runs = window.runs
    ended: list[str] = []
    runs.ended.connect(ended.append)
    t0 = time.perf_counter()
    try:
        if not runs.launch(cfg):
            raise AssertionError("the window did not launch the run")
        cmd = runs.job.cmd
        if not _wait(qapp, lambda: bool(ended), 600):
            runs.abort()
            raise AssertionError("the run did not end within 600 s")
        if ended != ["finished"]:
            log = runs.log_path.read_text(encoding="utf-8", errors="replace") if runs.log_path.is_file() else ""
            tail = "\n".join((log or window.run_view.log.toPlainText()).splitlines()[-12:])
            raise AssertionError(f"the run ended {ended[0]}; engine log {runs.log_path} ends:\n{tail}")
    finally:
        window.close()
    if not (out / "adapter" / "adapter_model.safetensors").is_file():
        raise AssertionError(f"the run finished without an adapter in {out}")
    return f"2 steps of '{' '.join([Path(cmd[0]).name, *cmd[1:3]])} ...' finished in {time.perf_counter() - t0:.1f}s, adapter saved"


def check_try(run_dir: Path) -> str:
    from qlora_engine.generate import ChatModel, GenerationSettings

    chat = ChatModel.load(run_dir, device="cpu")
    try:
        answers = chat.compare("What is the capital of France?", GenerationSettings(temperature=0, max_new_tokens=8))
    finally:
        chat.close()
    counts = {side: len(r.text) for side, r in answers.items()}
    return f"base and tuned model answered ({counts['base']} and {counts['tuned']} characters)"


def check_export(run_dir: Path, workdir: Path) -> str:
    import gguf

    from qlora_engine.export import export

    out = workdir / "export-gguf"
    export(run_dir, "gguf", out, gguf_types=("q8_0",))
    files = sorted(p.name for p in out.iterdir())
    model = next(out.glob("*-q8_0.gguf"))
    arch = gguf.GGUFReader(str(model)).fields["general.architecture"]
    return f"GGUF ({bytes(arch.parts[arch.data[0]]).decode()}) written and read back: {', '.join(files)}"


# -- the driver ---------------------------------------------------------------------------------

CHECKS = ("resources", "qt", "window", "bitsandbytes", "engine", "train", "try", "export")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="qlora-studio --smoke-test", description=__doc__.split("\n\n")[0])
    parser.add_argument("--train", type=Path, metavar="MODEL_DIR", help="also train 2 steps of this (tiny) model")
    parser.add_argument("--screenshot", type=Path, metavar="PNG", help="save a picture of the main window there")
    parser.add_argument("--only", metavar="CHECK[,CHECK]", help=f"run only these checks ({', '.join(CHECKS)})")
    args = parser.parse_args(argv)
    only = set(args.only.split(",")) if args.only else set(CHECKS)
    if only - set(CHECKS):
        parser.error(f"unknown check {sorted(only - set(CHECKS))}; choose from {', '.join(CHECKS)}")
    if args.train is None:
        only -= {"train", "try", "export"}

    workdir = Path(tempfile.mkdtemp(prefix="qlora-studio-smoke-"))
    os.environ.setdefault("QLORA_STUDIO_HOME", str(workdir / "home"))
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    print(f"smoke test of {sys.executable} (frozen: {_frozen()}), home {os.environ['QLORA_STUDIO_HOME']}", flush=True)

    from PySide6.QtCore import QCoreApplication
    from PySide6.QtWidgets import QApplication

    QCoreApplication.setOrganizationName("QLoRA Studio")
    QCoreApplication.setApplicationName("qlora-studio")
    qapp = QApplication.instance() or QApplication(sys.argv[:1])

    window = None
    failed: list[str] = []

    def step(name: str, fn, *a) -> None:
        nonlocal window
        if name not in only:
            return
        t0 = time.perf_counter()
        try:
            result = fn(*a)
            if isinstance(result, tuple):
                window, result = result
            print(f"ok     {name}: {result} [{time.perf_counter() - t0:.1f}s]", flush=True)
        except Exception as e:  # every check reports, then the verdict
            failed.append(name)
            print(f"FAIL   {name}: {type(e).__name__}: {e}", flush=True)

    step("resources", check_resources)
    step("qt", check_qt, qapp)
    step("window", check_window, qapp)  # first of the slow ones: its time is the app's start-up
    step("bitsandbytes", check_bitsandbytes)
    step("engine", check_engine)
    step("train", check_train, qapp, args.train.resolve() if args.train else None, workdir)
    run_dir = workdir / "runs" / "smoke"
    if "train" not in failed:  # these two work on the run that train made
        step("try", check_try, run_dir)
        step("export", check_export, run_dir, workdir)
    if window is not None and args.screenshot:
        window.grab().save(str(args.screenshot))
    if window is not None:
        window.close()
        window.deleteLater()
        qapp.processEvents()
    print("OK" if not failed else f"FAILED: {', '.join(failed)}", flush=True)
    return 0 if not failed else 1
