"""Out of memory, for real, once: a run far too big for the card must fail with budget fixes,
keep nothing half-written, and give all memory back when the engine process ends.

    python bench/oom_check.py MODEL_FOLDER

Runs `qlora-engine train` as the app does (a child process, --events -) on a config that
cannot fit (no checkpointing, plain loss, micro-batch 8 x 16384 tokens on an 8B model),
prints the run_failed event's message, hint and fixes, and the free GPU memory after.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path


def main() -> None:
    model = sys.argv[1]
    tmp = Path(tempfile.mkdtemp(prefix="oom-check-"))
    data = tmp / "long.jsonl"
    words = " ".join(f"word{i % 97} value{i % 13}" for i in range(12000))
    data.write_text("".join(json.dumps({"text": words}) + "\n" for _ in range(16)))
    config = tmp / "run.yaml"
    subprocess.run([sys.executable, "-m", "qlora_engine", "init", "--model", model, "--data", str(data),
                    "--output-dir", str(tmp / "run"), "-o", str(config), "data.max_length=16384",
                    "train.micro_batch_size=8", "train.gradient_checkpointing=false", "train.kernels=none",
                    "train.max_steps=2", "train.gradient_accumulation_steps=1"], check=True)
    proc = subprocess.run([sys.executable, "-m", "qlora_engine", "train", str(config), "--events", "-"],
                          capture_output=True, text=True)
    events = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    failed = [e for e in events if e["event"] == "run_failed"]
    import torch

    free, total = torch.cuda.mem_get_info()
    out = {
        "exit_code": proc.returncode,
        "failed": bool(failed),
        "error_type": failed[0]["error_type"] if failed else None,
        "message": failed[0]["message"] if failed else proc.stderr[-800:],
        "hint": failed[0]["hint"] if failed else None,
        "fixes": failed[0]["fixes"] if failed else None,
        "last_checkpoint": failed[0]["last_checkpoint"] if failed else None,
        "gpu_free_after_gib": round(free / 2**30, 1),
        "gpu_total_gib": round(total / 2**30, 1),
        "adapter_written": (tmp / "run" / "adapter").exists(),
    }
    print("OOM-CHECK " + json.dumps(out), flush=True)


if __name__ == "__main__":
    main()
