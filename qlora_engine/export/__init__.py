"""Exports of a trained run: the adapter, the merged 16-bit model, and GGUF (llama.cpp / Ollama).

``export(source, fmt, out)`` is the one entry the CLI (``qlora-engine export``) and the desktop
app call. Every export is written into a temporary sibling folder and renamed into place, never
replaces an existing folder unless told to (``overwrite=True`` / ``--force``), reports progress
as ``PhaseChanged``/``LogLine`` events, and can be cancelled between steps (``should_stop``).

Modules: ``source`` (find the adapter, the base and the run's facts), ``card`` (README.md),
``adapter``, ``merged``, ``gguf_model`` / ``gguf_vocab`` / ``gguf_lora`` / ``gguf_export``
(GGUF writing), ``ollama`` (Modelfile), ``cli`` (the ``export`` and ``chat`` commands).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from qlora_engine.export.common import FORMATS, ExportCancelled, ExportError, Reporter, check_output
from qlora_engine.export.source import RunInfo, load_run

__all__ = ["FORMATS", "ExportCancelled", "ExportError", "RunInfo", "export", "load_run"]


def export(
    source: str | Path | RunInfo,
    fmt: str,
    out: str | Path,
    *,
    overwrite: bool = False,
    sink: Any = None,
    should_stop: Any = None,
    dtype: str = "auto",
    gguf_types: tuple[str, ...] | list[str] = ("f16", "q8_0"),
    gguf_lora: bool = True,
) -> Path:
    """Export a run (folder, adapter folder or checkpoint) as ``fmt`` into the new folder ``out``.

    Args:
        source: a run folder, its adapter folder, a checkpoint folder, or a :class:`RunInfo`.
        fmt: 'adapter', 'merged' or 'gguf'.
        out: the folder to create.
        overwrite: replace ``out`` if it exists (the old one is removed only after the new one is complete).
        sink: receives PhaseChanged('exporting') and LogLine events.
        should_stop: called between steps; True cancels (the temporary folder is removed).
        dtype: merged and GGUF exports: the merge dtype ('auto' keeps the base's).
        gguf_types: GGUF export: which model files to write ('f16', 'q8_0'; 'q4_k_m', 'q5_k_m' with llama-cpp-python).
        gguf_lora: GGUF export: also write the adapter as a GGUF LoRA file.

    Returns:
        The folder written.
    """
    info = source if isinstance(source, RunInfo) else load_run(source)
    if fmt not in FORMATS:
        raise ExportError(f"format: {fmt!r} is not an export format; choose one of {', '.join(FORMATS)}.")
    rep = Reporter(sink, should_stop)
    if fmt == "gguf":
        from qlora_engine.export.gguf_export import export_gguf  # lazy: writers import torch; load only this one

        return export_gguf(info, out, rep, overwrite, types=gguf_types, lora=gguf_lora, dtype=dtype)
    out = check_output(out, info, overwrite=overwrite)
    if fmt == "adapter":
        from qlora_engine.export.adapter import export_adapter  # lazy: writers import torch; load only this one

        return export_adapter(info, out, rep, overwrite)
    from qlora_engine.export.merged import export_merged  # lazy: writers import torch; load only this one

    return export_merged(info, out, rep, overwrite, dtype=dtype)

