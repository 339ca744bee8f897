"""What every export shares: errors, progress reporting, the output-folder rules, the adapter check."""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

from qlora_engine.errors import ExportCancelled, ExportError
from qlora_engine.events import LogLine, PhaseChanged

__all__ = ["FORMATS", "ExportCancelled", "ExportError", "Reporter"]

FORMATS = ("adapter", "merged", "gguf")


class Reporter:
    """Progress as events (``PhaseChanged`` with phase 'exporting', ``LogLine``) plus the cancel check."""

    def __init__(self, sink: Any = None, should_stop: Callable[[], bool] | None = None) -> None:
        self.sink = sink
        self.should_stop = should_stop
        self.warnings: list[str] = []

    def phase(self, detail: str) -> None:
        self.check()
        if self.sink is not None:
            self.sink.emit(PhaseChanged(phase="exporting", detail=detail))

    def log(self, message: str, level: str = "info") -> None:
        if level == "warning":
            self.warnings.append(message)
        if self.sink is not None:
            self.sink.emit(LogLine(level=level, message=message))

    def check(self) -> None:
        if self.should_stop is not None and self.should_stop():
            raise ExportCancelled("export cancelled; nothing was written.")

    def tensor_progress(self, what: str) -> Callable[[int, int, str], None]:
        """A progress callback for tensor-by-tensor writers, reporting about every 10%."""
        state = {"last": -1}

        def report(i: int, n: int, name: str) -> None:
            tenth = i * 10 // max(n, 1)
            if tenth != state["last"] or i == n:
                state["last"] = tenth
                self.phase(f"{what}: tensor {i}/{n}")

        return report


def check_output(out: str | Path, info: Any, *, overwrite: bool) -> Path:
    """Refuse an output folder that exists (unless ``overwrite``) or that would replace the run (``info``) exported."""
    out = Path(out).expanduser()
    resolved = out.resolve()
    for p in [info.adapter_dir] + ([info.run_dir] if info.run_dir else []):
        p = p.resolve()
        if p.is_relative_to(resolved):  # the output is the source, or a folder holding it
            raise ExportError(f"{out}: this is (or holds) the run being exported; choose another output folder.")
    if out.exists() and not overwrite:
        raise ExportError(
            f"{out}: already exists; nothing was written.",
            hint="Choose a new folder, or pass --force (in the app: tick 'Replace the folder if it exists').",
        )
    if out.exists() and not out.is_dir():
        raise ExportError(f"{out}: exists and is not a folder.")
    return out


def copy_files(src: Path, dst: Path, *, skip: set[str] | None = None) -> list[str]:
    """Copy the plain, non-pickle files of ``src`` into ``dst`` (the adapter's weights, config, tokenizer)."""
    skip = skip or set()
    copied = []
    for p in sorted(src.iterdir()):
        if not p.is_file() or p.name in skip or p.suffix in (".bin", ".pt", ".pth", ".pkl", ".ckpt"):
            continue
        shutil.copy2(p, dst / p.name)
        copied.append(p.name)
    return copied


def adapter_b_stats(adapter_dir: Path) -> dict[str, int]:
    """How many LoRA B matrices the adapter has and how many are all zeros (untrained)."""
    from safetensors import safe_open  # lazy: only this reader needs safetensors; export CLI imports us

    total = zero = 0
    with safe_open(str(adapter_dir / "adapter_model.safetensors"), framework="pt") as st:
        names = st.keys()
        for name in names:
            if ".lora_B." in name:
                total += 1
                if not bool(st.get_tensor(name).abs().gt(0).any()):
                    zero += 1
    return {"b_matrices": total, "zero_b_matrices": zero}


def untrained_notes(adapter_dir: Path, rep: Reporter) -> list[str]:
    """A warning (logged, and for the model card) when LoRA B matrices are zero: those layers change nothing."""
    stats = adapter_b_stats(adapter_dir)
    if stats["b_matrices"] and stats["zero_b_matrices"] == stats["b_matrices"]:
        note = "every LoRA B matrix of this adapter is zero, so it changes nothing: the run trained no step."
    elif stats["zero_b_matrices"]:
        note = f"{stats['zero_b_matrices']} of {stats['b_matrices']} LoRA B matrices are zero (those layers are unchanged)."
    else:
        return []
    rep.log(note, "warning")
    return [note]
