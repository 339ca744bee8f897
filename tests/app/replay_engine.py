"""A stand-in for ``qlora-engine train`` that replays a recorded event file on stdout.

The GUI tests use it to drive the real worker thread, child process and JSON parsing
without loading a model: ``python replay_engine.py EVENTS.jsonl [--delay S] [--exit N] [--hang]``.
It honours ``stop`` on stdin like the engine (finishes with a stopped run) and writes a
line of stderr so the log path is exercised.
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
import time
from pathlib import Path


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("events")
    p.add_argument("--delay", type=float, default=0.0)
    p.add_argument("--exit", type=int, default=0)
    p.add_argument("--hang", action="store_true", help="after the events, wait for stop/abort")
    p.add_argument(
        "--write-adapter", action="store_true", help="write run_finished's adapter folder first, as the engine does"
    )
    args = p.parse_args()
    stop = threading.Event()

    def listen() -> None:
        for line in sys.stdin:
            if line.strip() in ("stop", "abort"):
                stop.set()
        stop.set()  # EOF: the parent is gone or closed our stdin

    threading.Thread(target=listen, daemon=True).start()
    print("replay engine: starting", file=sys.stderr, flush=True)
    step = 0
    with open(args.events, encoding="utf-8") as fh:
        for line in fh:
            if stop.is_set():
                break
            d = json.loads(line)
            step = d.get("step", step) or step
            if args.write_adapter and d.get("event") == "run_finished" and d.get("adapter_dir"):
                adapter = Path(d["adapter_dir"])
                adapter.mkdir(parents=True, exist_ok=True)
                (adapter / "adapter_config.json").write_text("{}")
            sys.stdout.write(line)
            sys.stdout.flush()
            if args.delay:
                time.sleep(args.delay)
    if args.hang:
        stop.wait()
    if stop.is_set():
        done = {
            "event": "run_finished",
            "time": time.time(),
            "step": step,
            "adapter_dir": None,
            "stopped_early": True,
            "final_loss": None,
            "final_eval_loss": None,
            "elapsed": 1.0,
        }
        print(json.dumps(done), flush=True)
    print("replay engine: done", file=sys.stderr, flush=True)
    return args.exit


if __name__ == "__main__":
    raise SystemExit(main())
