"""``qlora-engine``: every action of the desktop app as a command taking the same YAML config."""

from __future__ import annotations

import argparse
import json
import signal
import sys
from pathlib import Path
from typing import Any

from qlora_engine.errors import QLoRAError
from qlora_engine.events import redact


def _print_json(obj: Any) -> None:
    """``--json`` output: scrubbed like every file the engine writes (it is often redirected to one)."""
    from qlora_engine.scrub import scrub_data

    print(json.dumps(scrub_data(obj), indent=2, default=str))


def _fail(e: QLoRAError) -> int:
    """A user error in a line or two on stderr (:func:`qlora_engine.errors.render`); its exit code."""
    print(redact(f"error: {e}"), file=sys.stderr)
    if e.fix:
        print(redact(f"hint: {e.fix}"), file=sys.stderr)
    return e.exit_code


def _internal_error(e: BaseException, args: argparse.Namespace) -> int:
    """A bug, not a user error: the traceback goes to a log file, the user reads one line naming it."""
    import traceback

    from qlora_engine.paths import write_error_log

    text = "".join(traceback.format_exception(type(e), e, e.__traceback__))
    log = write_error_log(f"qlora-engine {getattr(args, 'command', '')}\n{text}", getattr(args, "run_dir", None))
    if getattr(args, "debug", False):
        print(redact(text), file=sys.stderr, end="")
    where = f"; details in {log}" if log else ""
    print(redact(f"error: internal error ({type(e).__name__}: {e}){where}"), file=sys.stderr)
    print("hint: this is a bug in qlora-engine, not in your input; please report it with that file.", file=sys.stderr)
    return 1


def _emit_failure(args: argparse.Namespace, e: BaseException, log: Path | None = None) -> None:
    """With ``--events -``, a failure before the run started goes on the event stream too, so the app
    reads the error's attributes from a ``run_failed`` event, never from stderr text."""
    if getattr(args, "events", None) != "-":
        return
    from qlora_engine.distributed import is_main_process
    from qlora_engine.events import RunFailed, StreamSink

    if not is_main_process():  # under torchrun, rank 0 alone writes the event stream
        return

    user = e if isinstance(e, QLoRAError) else None
    StreamSink(sys.stdout).emit(
        RunFailed(
            error_type=type(e).__name__,
            message=str(e) if user else f"internal error ({type(e).__name__}: {e})",
            traceback="",
            hint=user.fix if user else None,
            error=user.to_dict() if user else None,
            log_file=str(log) if log else None,
        )
    )


# -- init ------------------------------------------------------------------------------------------


def cmd_init(args: argparse.Namespace) -> int:
    from qlora_engine.config import TrainConfig, apply_overrides

    out = Path(args.output)
    if out.exists() and not args.force:
        raise QLoRAError(f"{out}: already exists; nothing was written.", hint="Pass --force to replace it.")
    overrides = [f"model.ref={json.dumps(args.model)}", f"data.path={json.dumps(args.data)}"]
    if args.output_dir:
        overrides.append(f"output.dir={json.dumps(args.output_dir)}")
    cfg = apply_overrides(TrainConfig(), overrides + list(args.overrides))
    cfg.save(out)
    print(f"wrote {out}; edit it, then run: qlora-engine train {out}", file=sys.stderr)
    return 0


# -- train -----------------------------------------------------------------------------------------


def _install_signals(control: Any) -> dict[str, int]:
    """The first Ctrl-C or SIGTERM (what ``kill``, systemd and Docker send): stop at the next step
    boundary, save a checkpoint and the adapter, release the lock. The second of either: abort.

    Python runs a handler once for however many of one signal arrived while the main thread was
    busy in C code (a long forward pass): two quick Ctrl-C looked like one. The C-level handler
    writes one byte per signal to the wakeup socket, so counting those bytes counts every signal.
    The abort is raised as :class:`qlora_engine.control.Aborted` *and* set on ``control``: if the
    exception lands somewhere that swallows it (a finalizer), the loop still sees the flag at the
    next step boundary and before saving the adapter.
    """
    import socket

    from qlora_engine.control import Aborted

    state = {"count": 0, "signum": 0}
    counted = (int(signal.SIGINT), int(signal.SIGTERM))
    wake_r, wake_w = socket.socketpair()
    for sock in (wake_r, wake_w):
        sock.setblocking(False)
    old_fd = -1
    try:
        old_fd = signal.set_wakeup_fd(wake_w.fileno(), warn_on_full_buffer=False)
    except ValueError:  # not the main thread (an embedding caller): one signal per handler call
        wake_r = None
    state["_sockets"] = (wake_r, wake_w)  # type: ignore[assignment]  # kept alive with the handler

    def arrived() -> int:
        if wake_r is None:
            return 1
        data = b""
        try:
            while chunk := wake_r.recv(4096):
                data += chunk
        except (BlockingIOError, InterruptedError):
            pass
        return sum(1 for b in data if b in counted)

    def handler(signum: int, frame: Any) -> None:
        n = arrived()  # 0: this signal was counted by an earlier call that drained its byte
        if n == 0:
            return
        first = state["count"] == 0
        state["count"] += n
        state["signum"] = signum
        name = signal.Signals(signum).name
        if first and state["count"] == 1:
            again = "Ctrl-C" if signum == signal.SIGINT else name
            print(f"\n{name}: stopping after this step and saving ({again} again to abort) ...", file=sys.stderr)
            control.request_stop()
            return
        control.request_stop()
        control.request_abort()
        if state.get("aborting"):  # raised once: a third signal must not interrupt the clean-up (the lock)
            return
        state["aborting"] = 1
        print(f"\n{name}: aborting; checkpoints already written are kept.", file=sys.stderr)
        raise Aborted(signum)

    previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGINT, signal.SIGTERM)}

    def restore() -> None:
        """Put back what was there before (a caller running several commands in one process)."""
        for sig, old in previous.items():
            signal.signal(sig, old)
        if wake_r is not None:
            signal.set_wakeup_fd(old_fd)
        for sock in (wake_r, wake_w):
            if sock is not None:
                sock.close()

    state["restore"] = restore  # type: ignore[assignment]
    return state


def _exit_code_of_abort(signum: int | None) -> int:
    """128 + the signal's number, as a shell reports a process a signal ended (130 Ctrl-C, 143 SIGTERM)."""
    return 128 + (signum or signal.SIGINT)


def _kept(run_dir: Path) -> str:
    from qlora_engine.checkpoint import latest_checkpoint

    last = latest_checkpoint(run_dir / "checkpoints")
    if last is None:
        return "nothing was saved (no checkpoint yet)"
    return f"kept: {last} (continue with --resume)"


def cmd_train(args: argparse.Namespace) -> int:
    import torch

    from qlora_engine import distributed
    from qlora_engine.config import TrainConfig
    from qlora_engine.control import RunControl
    from qlora_engine.events import StreamSink, TextSink
    from qlora_engine.runner import run

    if args.gpus:  # several GPUs: torchrun starts one process per GPU, each running this command
        from qlora_engine.cluster import launch_local

        return launch_local(args)
    try:
        cfg = TrainConfig.load(args.config, args.overrides)
    except QLoRAError as e:
        _emit_failure(args, e)
        raise
    args.run_dir = cfg.output_dir
    control = RunControl()
    signals = _install_signals(control)
    if args.control_stdin and distributed.is_main_process():
        control.listen(sys.stdin)
    sink = StreamSink(sys.stdout) if args.events == "-" else TextSink(sys.stderr)
    resume: bool | str | None = None
    if args.resume is not None:
        resume = True if args.resume == "latest" else args.resume
    try:
        finished = run(cfg, sink, control, resume=resume, force_resume=args.force_resume)
    except QLoRAError as e:  # run() already reported it as a run_failed event
        return _fail(e)
    except KeyboardInterrupt as e:  # a second Ctrl-C / SIGTERM (or the first one before the run began)
        signum = getattr(e, "signum", None) or signals["signum"] or signal.SIGINT
        print(f"aborted; {_kept(cfg.output_dir)}.", file=sys.stderr)
        return _exit_code_of_abort(signum)
    except torch.OutOfMemoryError:  # the run_failed event already says what to change
        return 3
    finally:
        signals["restore"]()  # type: ignore[operator]
    if not distributed.is_main_process():  # rank 0 alone saves, reports and judges the run's end
        return 0
    if finished.adapter_dir is None or control.abort_requested:
        # aborted ('abort' on stdin), or stopped before a step was taken: nothing new was made
        how = "aborted" if control.abort_requested else "stopped before the first step"
        print(f"{how} at step {finished.step}; {_kept(cfg.output_dir)}.", file=sys.stderr)
        return _exit_code_of_abort(signals["signum"] or None)
    if args.events != "-":
        how = "stopped early and saved" if finished.stopped_early else "done"
        print(f"{how}: adapter: {finished.adapter_dir}", file=sys.stderr)
    return 0


# -- inspect-model ---------------------------------------------------------------------------------


def cmd_inspect_model(args: argparse.Namespace) -> int:
    from qlora_engine.models import inspect_model

    info = inspect_model(args.ref, trust_remote_code=args.trust_remote_code, revision=args.revision)
    if args.json:
        _print_json(info.to_dict())
    else:
        d = info.to_dict()
        width = max(len(k) for k in d)
        for k, v in d.items():
            print(f"{k:<{width}}  {', '.join(v) if isinstance(v, list) else v}")
    if not info.usable:
        print("unusable: " + "; ".join(info.problems), file=sys.stderr)
        return 3
    return 0


# -- demo / quickstart -----------------------------------------------------------------------------


def cmd_quickstart(args: argparse.Namespace) -> int:
    """Fetch the demo model, train a short run on the bundled sample data, show before/after."""
    import torch

    from qlora_engine import resources
    from qlora_engine.config import TrainConfig, apply_overrides
    from qlora_engine.demo import fetch_demo_model
    from qlora_engine.events import TextSink
    from qlora_engine.runner import run

    gguf = fetch_demo_model(log=lambda m: print(m, file=sys.stderr))
    out = Path(args.output_dir)
    config_path = out / "quickstart.yaml"
    if not config_path.exists():
        overrides = [
            f"model.ref={json.dumps(str(gguf))}",
            f"data.path={json.dumps(str(resources.path('data', 'quickstart.jsonl')))}",
            f"output.dir={json.dumps(str(out.resolve() / 'run'))}",
            f"train.max_steps={args.steps}",
            "train.micro_batch_size=4",
            "train.gradient_accumulation_steps=1",
            "train.save_steps=10",
            "optim.learning_rate=1e-3",
            "optim.warmup_steps=2",
            "lora.rank=8",
            "data.max_length=256",
        ]
        if not torch.cuda.is_available():
            # The CPU dequantizes every 4-bit layer on every call: adapting only the top six
            # blocks keeps the backward pass short, so the demo finishes in a few minutes.
            print("no CUDA GPU: training the top 6 blocks only, so the CPU demo stays short", file=sys.stderr)
            overrides += ["lora.layers=24-29", "train.gradient_checkpointing=false"]
        apply_overrides(TrainConfig(), overrides).save(config_path)
    cfg = TrainConfig.load(config_path)
    print(f"config: {config_path}", file=sys.stderr)
    done = run(cfg, TextSink(sys.stderr), resume=True if (cfg.output_dir / "checkpoints").exists() else None)
    print(f"\ndone: adapter in {done.adapter_dir}; train more with: qlora-engine train {config_path} --resume", file=sys.stderr)
    if args.compare:
        _show_before_after(cfg.output_dir, "What is the colour of grass?")
    return 0


def _show_before_after(run_dir: Path, question: str) -> None:
    """The base model's and the tuned model's answer to a question the training data did not hold."""
    from qlora_engine.generate import ChatModel, GenerationSettings

    print(f"\nasking both models (greedy): {question}", file=sys.stderr)
    chat = ChatModel.load(run_dir)
    answers = chat.compare(question, GenerationSettings(max_new_tokens=32, temperature=0))
    chat.close()
    for side in ("base", "tuned"):
        print(f"  {side:>5}: {answers[side].text.strip()}", file=sys.stderr)


# -- the parser ------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="qlora-engine", description="Headless QLoRA fine-tuning (4-bit NF4 + LoRA).")
    p.add_argument("--debug", action="store_true", help="print the full traceback of an internal error")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    s = sub.add_parser("init", help="write a complete, commented run config")
    s.add_argument("--model", required=True, help="local folder, .gguf file or hub id")
    s.add_argument("--data", required=True, help="training data file, folder or hub dataset id")
    s.add_argument("--output-dir", help="run folder (adapter/, checkpoints/, events.jsonl, config.yaml)")
    s.add_argument("-o", "--output", default="run.yaml", help="config file to write (default: run.yaml)")
    s.add_argument("--force", action="store_true", help="replace an existing config file")
    s.add_argument("overrides", nargs="*", metavar="section.field=value")
    s.set_defaults(func=cmd_init)

    s = sub.add_parser("train", help="train from a config (Ctrl-C stops and saves)")
    s.add_argument("config", help="run config YAML")
    s.add_argument("overrides", nargs="*", metavar="section.field=value", help="e.g. lora.rank=32 train.max_steps=100")
    s.add_argument("--events", choices=["-", "text"], default="text", help="'-': JSON event lines on stdout")
    s.add_argument("--control-stdin", action="store_true", help="read stop/save/abort lines on stdin")
    s.add_argument(
        "--resume", nargs="?", const="latest", default=None, metavar="CHECKPOINT",
        help="continue from the newest checkpoint, or from the given checkpoint folder",
    )
    s.add_argument("--force-resume", action="store_true", help="resume even if the model, LoRA shape or data changed")
    s.add_argument(
        "--gpus", metavar="N|0,2",
        help="train on several GPUs of this machine (one process each, through torchrun): a count, or card numbers",
    )
    s.set_defaults(func=cmd_train)

    s = sub.add_parser("inspect-model", help="facts about a model from its config and tokenizer (no weights)")
    s.add_argument("ref", help="local folder, .gguf file or hub id")
    s.add_argument("--json", action="store_true")
    s.add_argument("--revision")
    s.add_argument("--trust-remote-code", action="store_true")
    s.set_defaults(func=cmd_inspect_model)

    s = sub.add_parser("quickstart", help="download the 135M demo model and train a short run on sample data")
    s.add_argument("--output-dir", default="runs/quickstart")
    s.add_argument("--steps", type=int, default=30)
    s.add_argument("--no-compare", dest="compare", action="store_false", help="skip the before/after answers")
    s.set_defaults(func=cmd_quickstart)

    # Subcommands of other modules register here (one line each).
    for module in (
        "qlora_engine.data",
        "qlora_engine.budget.cli",
        "qlora_engine.export.cli",
        "qlora_engine.export.hub",
        "qlora_engine.cluster",
        "qlora_engine.inspect_server",
    ):
        _register(module, sub)
    return p


def _register(module: str, sub: Any) -> None:
    import importlib

    try:
        mod = importlib.import_module(module)
    except ModuleNotFoundError as e:
        if e.name != module:  # a missing dependency inside the module is a real error
            raise
        return
    add = getattr(mod, "add_cli", None)
    if add is not None:
        add(sub)


def main(argv: list[str] | None = None) -> int:
    """Run one command. A user error prints its message (exit 2); a bug prints one line naming the
    log file that holds its traceback (exit 1; ``--debug`` prints the traceback too)."""
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except QLoRAError as e:
        return _fail(e)
    except KeyboardInterrupt:
        print("interrupted.", file=sys.stderr)
        return 130
    except Exception as e:
        return _internal_error(e, args)


if __name__ == "__main__":
    raise SystemExit(main())
