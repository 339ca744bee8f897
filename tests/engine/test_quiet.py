"""Third-party warnings are caught, kept for the run's log, and shown only with --verbose."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

SCRIPT = textwrap.dedent(
    """
    import json, logging, sys, warnings
    from pathlib import Path
    from qlora_engine import quiet

    captured = quiet.capture(verbose=sys.argv[1] == "verbose")
    import torch  # a real library's own deprecation warning, raised from inside torch
    torch.nn.utils.weight_norm(torch.nn.Linear(2, 2))
    logging.getLogger("transformers.modeling_utils").warning("a note from transformers")
    logging.getLogger("bitsandbytes.backends.cpu.ops").warning(
        "Failed to load CPU gemm_4bit_forward from kernels-community: no kernels here"
    )
    warnings.warn("our own warning", UserWarning)  # from this script: not a library
    log = captured.write(Path(sys.argv[2]) / "third_party.log")
    print(json.dumps({"summary": captured.summary(log), "sources": sorted({n.source for n in captured.notices})}))
    """
)


def run(mode: str, tmp_path):
    script = tmp_path / "script.py"
    script.write_text(SCRIPT)
    out = subprocess.run([sys.executable, str(script), mode, str(tmp_path)], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.splitlines()[-1]), out.stderr


def test_library_warnings_go_to_the_log_and_one_line_of_ours(tmp_path):
    result, stderr = run("quiet", tmp_path)
    assert "weight_norm" not in stderr and "transformers" not in stderr and "kernels-community" not in stderr
    assert "our own warning" in stderr  # a warning outside the libraries still shows
    assert {"torch", "transformers.modeling_utils", "bitsandbytes.backends.cpu.ops"} <= set(result["sources"])
    log = (tmp_path / "third_party.log").read_text()
    assert "weight_norm" in log and "a note from transformers" in log
    assert "(QLoRA Studio: bitsandbytes looks for an optional fused CPU kernel" in log  # known: explained
    # the summary counts only what is not known to be harmless, in our words
    assert result["summary"].startswith("note: 2 warnings from the libraries underneath (torch, transformers)")
    assert str(tmp_path / "third_party.log") in result["summary"]


def test_verbose_lets_them_through(tmp_path):
    result, stderr = run("verbose", tmp_path)
    assert "weight_norm" in stderr and "a note from transformers" in stderr
