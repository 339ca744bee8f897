"""Run quickstart sweep variants side by side on a many-core CPU (the device machine's 16 cores).

Each variant is ``bench/quickstart_sweep.py SPEC`` in its own process with ``--threads`` CPU
threads and no GPU visible (the quickstart's CPU path, as on a user's laptop and in CI), all
sharing one ``--work`` folder whose base answers are cached before the variants start. Rows are
appended to ``--out`` as each variant finishes, so a run stopped at its time limit keeps what
finished.

    python bench/quickstart_par.py --out X.jsonl --jobs 8 --threads 2 SPEC [SPEC ...]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

HERE = Path(__file__).resolve().parent


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--work", type=Path, default=Path("/tmp/qs_par"))
    ap.add_argument("--jobs", type=int, default=8)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("specs", nargs="+")
    a = ap.parse_args()
    a.work.mkdir(parents=True, exist_ok=True)
    env = {
        **os.environ,
        "CUDA_VISIBLE_DEVICES": "",
        "OMP_NUM_THREADS": str(a.threads),
        "MKL_NUM_THREADS": str(a.threads),
    }
    env["PYTHONPATH"] = os.pathsep.join([str(HERE.parent), env.get("PYTHONPATH", "")])
    t0 = time.perf_counter()
    lock = threading.Lock()

    def one(spec: str) -> None:
        name = spec.replace(",", "_").replace("=", "-").replace(":", ".")
        log, rows = a.work / f"{name}.log", a.work / f"{name}.jsonl"
        cmd = [sys.executable, str(HERE / "quickstart_sweep.py"), "--out", str(rows), "--work", str(a.work), spec]
        with log.open("w") as fh:
            rc = subprocess.run(cmd, env=env, stdout=fh, stderr=subprocess.STDOUT).returncode
        with lock, a.out.open("a") as out:
            out.write(rows.read_text() if rows.exists() else "")
        lines = [ln for ln in log.read_text().splitlines() if " @" in ln and "pass=" in ln]
        print(
            f"[{time.perf_counter() - t0:5.0f}s] rc={rc} " + (" | ".join(lines) or log.read_text()[-600:]), flush=True
        )

    with ThreadPoolExecutor(a.jobs) as pool:
        list(pool.map(one, a.specs))


if __name__ == "__main__":
    main()
