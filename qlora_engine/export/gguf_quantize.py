"""K-quant GGUF files (Q4_K_M, Q5_K_M, ...) made by llama.cpp's own quantizer.

Our writer (:mod:`qlora_engine.export.gguf_model`) produces F16 and Q8_0 itself. The K-quant mixes
people run in llama.cpp and Ollama (Q4_K_M, Q5_K_M) choose a type per tensor and search scales per
256-weight super-block; rather than re-implement that, the F16 file goes through
``llama_model_quantize`` from llama.cpp's C API, reached through the ``llama-cpp-python`` package
(the ``llama`` extra). The file that comes out is the one ``llama-quantize`` would write.

The quantizer runs in a child process (``python -m qlora_engine.export.gguf_quantize SRC DST TYPE``):
the C call cannot be interrupted, so Cancel ends the child, and a native crash in it fails the
export with a message instead of taking the caller (the app's export process, a test) down.
"""

from __future__ import annotations

import ctypes
import importlib.util
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from qlora_engine.errors import ExportCancelled, ExportError

K_TYPES = {
    "q4_k_m": "LLAMA_FTYPE_MOSTLY_Q4_K_M",
    "q5_k_m": "LLAMA_FTYPE_MOSTLY_Q5_K_M",
    "q4_k_s": "LLAMA_FTYPE_MOSTLY_Q4_K_S",
    "q5_k_s": "LLAMA_FTYPE_MOSTLY_Q5_K_S",
    "q6_k": "LLAMA_FTYPE_MOSTLY_Q6_K",
}
"""Our type names (lower case, as in the file names) and llama.cpp's ``llama_ftype`` for each."""

DESCRIPTIONS = {
    "q4_k_m": "4-bit K-quant, medium: the usual llama.cpp/Ollama download (about 4.8 bits per weight)",
    "q5_k_m": "5-bit K-quant, medium: closer to F16 for a little more (about 5.7 bits per weight)",
    "q4_k_s": "4-bit K-quant, small (about 4.6 bits per weight)",
    "q5_k_s": "5-bit K-quant, small (about 5.5 bits per weight)",
    "q6_k": "6-bit K-quant (about 6.6 bits per weight)",
}

INSTALL_HINT = "pip install llama-cpp-python (or the app's `llama` extra: pip install 'qlora-studio[llama]')"


def available() -> bool:
    """Whether llama.cpp's quantizer (``llama-cpp-python``) is installed here."""
    return importlib.util.find_spec("llama_cpp") is not None


def check_available(types: list[str] | tuple[str, ...]) -> None:
    """Refuse K-quant types before any slow work when the quantizer is missing.

    Raises:
        ExportError: naming the types and what to install.
    """
    wanted = [t for t in types if t in K_TYPES]
    if wanted and not available():
        raise ExportError(
            f"{', '.join(t.upper() for t in wanted)} needs llama.cpp's quantizer, which is not installed",
            field="gguf_types",
            fix=INSTALL_HINT + "; or export F16/Q8_0, which need nothing more",
        )


def quantize(
    src: str | Path,
    dst: str | Path,
    kind: str,
    *,
    threads: int = 0,
    should_stop: Callable[[], bool] | None = None,
    poll_s: float = 0.2,
) -> Path:
    """Quantize the F16/F32 GGUF ``src`` to ``dst`` as ``kind`` (a key of :data:`K_TYPES`).

    Raises:
        ExportCancelled: ``should_stop()`` turned true (the child is ended; ``dst`` is removed).
        ExportError: llama.cpp refused the file or the child died.
    """
    if kind not in K_TYPES:
        raise ExportError(f"{kind!r} is not a K-quant type; choose from {', '.join(K_TYPES)}", field="gguf_types")
    check_available([kind])
    dst = Path(dst)
    cmd = [sys.executable, "-m", "qlora_engine.export.gguf_quantize", str(src), str(dst), kind, str(threads)]
    # llama.cpp logs every tensor to stderr: a file, not a pipe, so a long log cannot block the child.
    with tempfile.TemporaryFile("w+", encoding="utf-8", errors="replace") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        try:
            while proc.poll() is None:
                if should_stop is not None and should_stop():
                    proc.kill()
                    proc.wait()
                    dst.unlink(missing_ok=True)
                    raise ExportCancelled(f"quantizing to {kind.upper()} cancelled")
                time.sleep(poll_s)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        if proc.returncode != 0 or not dst.is_file():
            log.seek(0)
            tail = "".join(log.readlines()[-12:]).strip()
            dst.unlink(missing_ok=True)
            raise ExportError(
                f"llama.cpp could not quantize {Path(src).name} to {kind.upper()} (exit {proc.returncode}): {tail}",
                file=str(src),
                fix="export F16/Q8_0 instead, or update llama-cpp-python",
            )
    return dst


def _main(argv: list[str]) -> int:
    """The child: ``SRC DST TYPE [THREADS]``; exit status 0 when llama.cpp wrote DST."""
    import llama_cpp  # lazy: optional package, used in the child process only

    src, dst, kind = argv[:3]
    threads = int(argv[3]) if len(argv) > 3 else 0
    llama_cpp.llama_backend_init()
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, K_TYPES[kind])
    params.nthread = threads if threads > 0 else (os.cpu_count() or 1)
    rc = llama_cpp.llama_model_quantize(src.encode(), dst.encode(), ctypes.byref(params))
    llama_cpp.llama_backend_free()
    return 0 if rc == 0 else 3


if __name__ == "__main__":
    raise SystemExit(_main(sys.argv[1:]))
