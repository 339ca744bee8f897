"""Starting a run on several GPUs and machines: ``--gpus`` under torchrun, and a SLURM script.

``qlora-engine train CONFIG --gpus N`` (or ``--gpus 0,2``) starts ``torchrun`` (PyTorch's
``torch.distributed.run``) with one process per GPU, each running ``qlora-engine train CONFIG``;
:mod:`qlora_engine.distributed` makes them one run. The same YAML runs by hand as
``torchrun --nproc-per-node N -m qlora_engine train CONFIG``, and on several machines as
``torchrun --nnodes M --rdzv-backend c10d --rdzv-endpoint HOST:PORT ...`` on each;
``qlora-engine slurm CONFIG --nodes 2 --gpus-per-node 8`` writes that as a SLURM batch script.

Control: torchrun starts its workers in their own sessions, with this process's pipe as their
stdin. A terminal's Ctrl-C reaches only this launcher, which writes ``stop`` (a second Ctrl-C:
``abort``) to the pipe; rank 0 reads it and every process stops after the same step. The app's
control lines (``--control-stdin``) go the same way. A launcher that dies closes the pipe, which
rank 0 takes as ``stop``: the run saves and ends instead of training on unwatched.
"""

from __future__ import annotations

import argparse
import os
import shlex
import signal
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

from qlora_engine.config import TrainConfig
from qlora_engine.errors import ConfigError

SHUTDOWN_TIMEOUT_S = 600
"""How long torchrun lets its workers finish a save after a stop signal before it kills them."""


def parse_gpus(spec: str) -> tuple[int, str | None]:
    """``--gpus``: a count (``4``: the first four cards) or a list of card numbers (``0,2``; one card: ``3,``).

    Returns the process count and the ``CUDA_VISIBLE_DEVICES`` value to set (None: leave it).
    """
    text = spec.strip()
    try:
        if "," in text:
            ids = [int(x) for x in text.split(",") if x.strip()]
            if not ids or len(set(ids)) != len(ids) or min(ids) < 0:
                raise ValueError
            return len(ids), ",".join(str(i) for i in ids)
        count = int(text)
        if count < 1:
            raise ValueError
        return count, None
    except ValueError:
        raise ConfigError(
            f"--gpus {spec!r}: not a number of GPUs nor a list of card numbers.",
            fix="Use a count (--gpus 4) or card numbers (--gpus 0,2; one card: --gpus 3,).",
        ) from None


def torchrun_args(
    nproc: int, *, nnodes: str = "1", rdzv_endpoint: str | None = None, rdzv_id: str | None = None
) -> list[str]:
    """torchrun's own arguments: standalone on one machine, a c10d rendezvous across several."""
    args = [f"--nproc-per-node={nproc}", f"--shutdown-timeout={SHUTDOWN_TIMEOUT_S}"]
    if nnodes == "1" and rdzv_endpoint is None:
        return ["--standalone", *args]
    return [
        f"--nnodes={nnodes}",
        *args,
        "--rdzv-backend=c10d",
        f"--rdzv-endpoint={rdzv_endpoint}",
        f"--rdzv-id={rdzv_id or 'qlora'}",
    ]


def train_args(args: argparse.Namespace) -> list[str]:
    """The ``train`` command line every worker runs (the launcher's own, less ``--gpus``)."""
    out = ["train", str(args.config), *args.overrides, "--events", args.events, "--control-stdin"]
    if args.resume:
        out.append("--resume")
    if args.resume_from:
        out += ["--resume-from", str(args.resume_from)]
    if args.more is not None:
        out += ["--more", str(args.more)]
    if args.force_resume:
        out.append("--force-resume")
    return (["--debug"] if getattr(args, "debug", False) else []) + out


def check_gpus(nproc: int, visible: str | None, device: str) -> None:
    """Refuse, before anything starts, a count of GPUs this machine does not have."""
    if device == "cpu":
        return  # train.device cpu: N CPU processes over gloo, to try the setup without GPUs
    import torch  # lazy: the CLI imports this module at start-up; torch only to count the GPUs

    if visible is not None:
        os.environ["CUDA_VISIBLE_DEVICES"] = visible  # counted as the workers will see them
    have = torch.cuda.device_count()
    if have == 0:
        raise ConfigError(
            f"--gpus asks for {nproc} GPUs but no CUDA GPU is visible.",
            field="train.device",
            fix="Run on a machine with NVIDIA GPUs, or set train.device=cpu to try the setup with CPU processes.",
        )
    if nproc > have:
        raise ConfigError(
            f"--gpus asks for {nproc} GPUs but {have} {'is' if have == 1 else 'are'} visible.",
            fix=f"Use --gpus {have} or fewer (or name cards with --gpus 0,1).",
        )


def launch_local(args: argparse.Namespace) -> int:
    """``train --gpus``: run the config under torchrun on this machine; torchrun's exit status."""
    nproc, visible = parse_gpus(args.gpus)
    cfg = TrainConfig.load(args.config, args.overrides)
    check_gpus(nproc, visible, cfg.train.device)
    env = dict(os.environ)
    if visible is not None:
        env["CUDA_VISIBLE_DEVICES"] = visible
    env.setdefault("OMP_NUM_THREADS", "1")  # torchrun's own default, said out loud so it does not warn
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        *torchrun_args(nproc),
        "-m",
        "qlora_engine",
        *train_args(args),
    ]
    # Its own session: a terminal's Ctrl-C reaches this launcher only, which stops the run cleanly.
    proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, env=env, text=True, start_new_session=True)
    send = _control_writer(proc)
    _forward_signals(send, proc)
    if args.control_stdin:
        threading.Thread(target=_forward_stdin, args=(send,), name="control-forward", daemon=True).start()
    try:
        return proc.wait()
    finally:
        if proc.stdin:
            try:
                proc.stdin.close()
            except OSError:
                pass


def _control_writer(proc: subprocess.Popen) -> Any:
    lock = threading.Lock()

    def send(line: str) -> None:
        with lock:
            try:
                proc.stdin.write(line + "\n")
                proc.stdin.flush()
            except (OSError, ValueError):  # the run has ended
                pass

    return send


def _forward_stdin(send: Any) -> None:
    for line in sys.stdin:
        if line.strip():
            send(line.strip())
    send("stop")  # our parent closed our stdin: the same rule as one process (see RunControl.listen)


def _forward_signals(send: Any, proc: subprocess.Popen) -> None:
    """Ctrl-C: stop after this step (saves); again: abort; a third time: end torchrun. SIGTERM: stop."""
    count = {"n": 0}

    def on_int(signum: int, frame: Any) -> None:
        count["n"] += 1
        if count["n"] == 1:
            print("\nstopping all processes after this step and saving (Ctrl-C again to abort) ...", file=sys.stderr)
            send("stop")
        elif count["n"] == 2:
            send("abort")
        else:
            proc.terminate()

    signal.signal(signal.SIGINT, on_int)
    signal.signal(signal.SIGTERM, lambda signum, frame: send("stop"))


# -- SLURM -----------------------------------------------------------------------------------------


def slurm_script(
    config: Path,
    *,
    nodes: int,
    gpus_per_node: int,
    time_limit: str = "24:00:00",
    partition: str | None = None,
    account: str | None = None,
    cpus_per_gpu: int = 8,
    port: int = 29500,
    python: str | None = None,
) -> str:
    """A SLURM batch script that runs ``config`` on ``nodes`` machines of ``gpus_per_node`` GPUs each.

    One torchrun per node (``srun --ntasks-per-node=1``), meeting at a c10d rendezvous on the
    first node. SLURM's warning signal (``--signal``) reaches torchrun, which passes it on: the
    run stops after a step, saves, and the same script resumes it when the job is started again.
    """
    config = Path(config).resolve()
    cfg = TrainConfig.load(config)
    run_dir = cfg.output_dir.resolve()
    py = python or sys.executable
    name = run_dir.name or "qlora"
    lines = [
        "#!/bin/bash",
        f"# QLoRA Studio: {config.name} on {nodes} node(s) x {gpus_per_node} GPU(s). Written by `qlora-engine slurm`.",
        f"#SBATCH --job-name=qlora-{name}",
        f"#SBATCH --nodes={nodes}",
        "#SBATCH --ntasks-per-node=1",
        f"#SBATCH --gpus-per-node={gpus_per_node}",
        f"#SBATCH --cpus-per-task={cpus_per_gpu * gpus_per_node}",
        f"#SBATCH --time={time_limit}",
        # SIGTERM to torchrun 5 minutes before the time limit: every process stops after the
        # same step and rank 0 saves; resubmitting the script resumes from that checkpoint.
        "#SBATCH --signal=TERM@300",
        f"#SBATCH --output={run_dir}/logs/slurm-%j.out",
    ]
    if partition:
        lines.append(f"#SBATCH --partition={partition}")
    if account:
        lines.append(f"#SBATCH --account={account}")
    rdzv = torchrun_args(gpus_per_node, nnodes="$SLURM_NNODES", rdzv_endpoint=f"$HEAD:{port}", rdzv_id="$SLURM_JOB_ID")
    lines += [
        "set -euo pipefail",
        f"mkdir -p {shlex.quote(str(run_dir / 'logs'))}",
        'HEAD=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)',
        "export OMP_NUM_THREADS=1",
        "# Continue the run if it has a checkpoint (a resubmitted or requeued job), else start it.",
        "RESUME=()",
        f"if compgen -G {shlex.quote(str(run_dir / 'checkpoints'))}'/step-*/qlora_checkpoint.json' > /dev/null; then RESUME=(--resume); fi",
        "srun --ntasks-per-node=1 --kill-on-bad-exit=1 \\",
        f"  {shlex.quote(py)} -m torch.distributed.run {' '.join(_quote_keep_vars(a) for a in rdzv)} \\",
        f'  -m qlora_engine train {shlex.quote(str(config))} "${{RESUME[@]}}"',
        "",
    ]
    return "\n".join(lines)


def _quote_keep_vars(arg: str) -> str:
    """Quote an argument for bash but let ``$VARS`` expand (double quotes)."""
    return f'"{arg}"' if "$" in arg else shlex.quote(arg)


def cmd_slurm(args: argparse.Namespace) -> int:
    opts = {name: getattr(args, name) for name in ("nodes", "gpus_per_node", "partition", "account", "port")}
    text = slurm_script(Path(args.config), time_limit=args.time, **opts)
    if args.output:
        Path(args.output).write_text(text, encoding="utf-8")
        os.chmod(args.output, 0o755)
        print(f"wrote {args.output}; submit it with: sbatch {args.output}", file=sys.stderr)
    else:
        print(text, end="")
    return 0


def add_cli(sub: Any) -> None:
    s = sub.add_parser("slurm", help="write a SLURM batch script that runs a config on several machines")
    s.add_argument("config", help="run config YAML")
    s.add_argument("--nodes", type=int, default=1, help="machines (default: 1)")
    s.add_argument("--gpus-per-node", type=int, default=8, help="GPUs per machine, one process each (default: 8)")
    s.add_argument("--time", default="24:00:00", help="job time limit (default: 24:00:00)")
    s.add_argument("--partition", help="SLURM partition")
    s.add_argument("--account", help="SLURM account")
    s.add_argument("--port", type=int, default=29500, help="rendezvous port on the first node (default: 29500)")
    s.add_argument("-o", "--output", help="write the script here (default: print it)")
    s.set_defaults(func=cmd_slurm)
