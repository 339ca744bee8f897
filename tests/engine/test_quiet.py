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
    out = subprocess.run(
        [sys.executable, str(script), mode, str(tmp_path)], capture_output=True, text=True, timeout=300
    )
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


TORCH_SCRIPT = textwrap.dedent(
    """
    import json, logging, sys
    from qlora_engine import quiet

    captured = quiet.capture(verbose=sys.argv[1] == "verbose")
    import torch
    # torch's compiler logs print through handlers of their own on loggers that do not propagate
    names = sorted(n for n, lg in logging.root.manager.loggerDict.items()
                   if n.startswith("torch.") and isinstance(lg, logging.Logger) and not lg.propagate)
    for name in names:
        logging.getLogger(name).warning("note %s from the compiler", name)
    # and a child created after the capture, under one of them
    logging.getLogger("torch._dynamo.variables.higher_order_ops").warning("context_fn is passed to "
        "torch.utils.checkpoint under torch.compile.")
    print(json.dumps({"names": names, "texts": [n.text for n in captured.notices],
                      "unknown": len(captured.unknown())}))
    """
)


def test_torch_compiler_logs_are_caught_too(tmp_path):
    script = tmp_path / "torch_script.py"
    script.write_text(TORCH_SCRIPT)
    out = subprocess.run([sys.executable, str(script), "quiet"], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout.splitlines()[-1])
    # torch registers several (dynamo, inductor, ...): each one's note is kept, none printed
    assert len(result["names"]) >= 5 and any(n.startswith("torch._dynamo") for n in result["names"])
    assert "from the compiler" not in out.stderr and "context_fn" not in out.stderr, out.stderr
    for name in result["names"]:
        assert f"note {name} from the compiler" in result["texts"]
    assert any("context_fn" in t for t in result["texts"])
    assert result["unknown"] == len(result["names"])  # the context_fn notice is a known one
    loud = subprocess.run([sys.executable, str(script), "verbose"], capture_output=True, text=True, timeout=300)
    assert loud.returncode == 0 and "from the compiler" in loud.stderr and "context_fn" in loud.stderr
