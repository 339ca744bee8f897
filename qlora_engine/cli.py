"""``qlora-engine``: every action of the desktop app as a command taking the same YAML config."""

from __future__ import annotations

import argparse
import importlib
import json
import signal
import socket
import sys
import traceback
from pathlib import Path
from typing import Any

from qlora_engine.errors import QLoRAError, ResumeError
from qlora_engine.events import RunFailed, StreamSink, TextSink, redact


def _fail(e: QLoRAError) -> int:
    """A user error in a line or two on stderr (:func:`qlora_engine.errors.render`); its exit code."""
    print(redact(f"error: {e}"), file=sys.stderr)
    if e.fix:
        print(redact(f"hint: {e.fix}"), file=sys.stderr)
    return e.exit_code


def _internal_error(e: BaseException, args: argparse.Namespace) -> int:
    """A bug, not a user error: the traceback goes to a log file, the user reads one line naming it."""
    from qlora_engine.paths import write_error_log  # lazy: only an internal error needs it

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
    from qlora_engine.distributed import is_main_process  # lazy: only this subcommand needs it (fast --help)

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
    from qlora_engine.config import TrainConfig, apply_overrides  # lazy: only this subcommand needs it (fast --help)

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
    from qlora_engine.control import Aborted  # lazy: only this subcommand needs it (fast --help)

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
    from qlora_engine.checkpoint import latest_checkpoint  # lazy: only this subcommand needs it (fast --help)

    last = latest_checkpoint(run_dir / "checkpoints")
    if last is None:
        return "nothing was saved (no checkpoint yet)"
    return f"kept: {last} (continue with --resume)"


def cmd_train(args: argparse.Namespace) -> int:
    from qlora_engine import quiet  # lazy: only this subcommand needs it (fast --help)

    captured = quiet.capture(args.verbose)  # before torch and the libraries load: some talk at import
    try:
        return _train(args)
    finally:
        _report_captured(captured, args)


def _report_captured(captured: Any, args: argparse.Namespace) -> None:
    """Third-party warnings of a train command into the run's third_party.log, and one line if any matter."""
    from qlora_engine.config import TrainConfig  # lazy: only this subcommand needs it (fast --help)

    try:
        run_dir = TrainConfig.load(args.config, args.overrides).output_dir
    except QLoRAError:
        run_dir = None
    log_file = captured.write(run_dir / "third_party.log") if run_dir is not None and run_dir.is_dir() else None
    if line := captured.summary(log_file):
        print(line, file=sys.stderr)


def _train(args: argparse.Namespace) -> int:
    import torch  # lazy: torch takes seconds to import (fast --help)

    from qlora_engine import distributed  # lazy: only this subcommand needs it (fast --help)
    from qlora_engine.config import TrainConfig  # lazy: only this subcommand needs it (fast --help)
    from qlora_engine.control import RunControl  # lazy: only this subcommand needs it (fast --help)
    from qlora_engine.runner import run  # lazy: only this subcommand needs it (fast --help)

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
    try:
        cfg, resume = _resume_plan(cfg, args)
    except QLoRAError as e:
        _emit_failure(args, e)
        raise
    try:
        finished = run(cfg, sink, control, resume=resume, force_resume=args.force_resume)
    except QLoRAError as e:  # run() reported it as a run_failed event; on a terminal that is its error line
        return e.exit_code if args.events != "-" else _fail(e)
    except Exception as e:
        if args.events == "-":
            raise  # main() names it on stderr; the event stream already holds it
        if args.debug:  # the terminal got the run_failed event's lines: the traceback alone is missing
            print(redact("".join(traceback.format_exception(type(e), e, e.__traceback__))), file=sys.stderr, end="")
        return 1
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
    from qlora_engine.export.adapter import write_run_adapter_card  # lazy: the export package is heavy

    write_run_adapter_card(cfg.output_dir)  # our model card in place of peft's empty README template
    if args.events != "-":
        how = "stopped early and saved" if finished.stopped_early else "done"
        print(f"{how}: adapter: {finished.adapter_dir}", file=sys.stderr)
    return 0


def _resume_plan(cfg: Any, args: argparse.Namespace) -> tuple[Any, bool | str | None]:
    """The config to run and what to resume from, for --resume, --resume-from and --more.

    ``--more N`` continues from the newest checkpoint with ``train.max_steps`` set to its step + N;
    the trainer stretches the learning-rate schedule to the new end. A plain ``--resume`` of a run
    that already reached ``train.max_steps`` is refused with the ``--more`` hint, since it would
    train nothing.
    """
    from qlora_engine import checkpoint as ckpt  # lazy: only this subcommand needs it (fast --help)
    from qlora_engine.config import apply_overrides  # lazy: only this subcommand needs it (fast --help)

    if sum(x is not None and x is not False for x in (args.resume, args.resume_from, args.more)) > 1:
        raise QLoRAError("--resume, --resume-from and --more: use one of them.")
    if args.resume_from:
        return cfg, args.resume_from
    if not args.resume and args.more is None:
        return cfg, None
    latest = ckpt.latest_checkpoint(cfg.output_dir / "checkpoints")
    if latest is None:
        raise ResumeError(f"{cfg.output_dir / 'checkpoints'}: no complete checkpoint to resume from.")
    done = int(ckpt.load_state(latest)["step"])
    if args.more is not None:
        if args.more < 1:
            raise QLoRAError(f"--more: {args.more} is not allowed; give the number of extra steps, 1 or more.")
        return apply_overrides(cfg, [f"train.max_steps={done + args.more}"]), True
    if cfg.train.max_steps is not None and done >= cfg.train.max_steps:
        raise QLoRAError(
            f"{latest}: the run already trained its {cfg.train.max_steps} steps (train.max_steps); "
            "resuming would train nothing.",
            hint=f"Train more with --more N (N extra steps), or raise train.max_steps above {done}.",
        )
    return cfg, True


# -- inspect-model ---------------------------------------------------------------------------------


def cmd_inspect_model(args: argparse.Namespace) -> int:
    from qlora_engine.models import inspect_model  # lazy: only this subcommand needs it (fast --help)

    info = inspect_model(args.ref, trust_remote_code=args.trust_remote_code, revision=args.revision)
    if args.json:
        from qlora_engine.scrub import print_json  # lazy: only this subcommand needs it (fast --help)

        print_json(info.to_dict())
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
    """Fetch the demo model, train a short run on the bundled sample data, compare on held-out questions."""
    from qlora_engine import quiet  # lazy: only this subcommand needs it (fast --help)
    from qlora_engine.quickstart import run_quickstart  # lazy: only this subcommand needs it (fast --help)

    captured = quiet.capture(args.verbose)  # before torch and the libraries load: some talk at import
    return run_quickstart(args.output_dir, steps=args.steps, compare=args.compare, captured=captured)


# -- the parser ------------------------------------------------------------------------------------


class _IntermixedParser(argparse.ArgumentParser):
    """An argument parser whose positionals may come before, between or after its options."""

    _inside = False

    def parse_known_args(self, args=None, namespace=None):  # noqa: ANN001, ANN201 - argparse's signature
        if self._inside:  # parse_known_intermixed_args calls back in here (Python < 3.13)
            return super().parse_known_args(args, namespace)
        self._inside = True
        try:
            return self.parse_known_intermixed_args(args, namespace)
        finally:
            self._inside = False


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

    # Overrides may come after flags (`train run.yaml --resume lora.rank=8`): plain argparse would
    # refuse them there, so the train command's parser reads its arguments intermixed.
    plain, sub._parser_class = sub._parser_class, _IntermixedParser
    s = sub.add_parser("train", help="train from a config (Ctrl-C stops and saves)")
    sub._parser_class = plain
    s.add_argument("config", help="run config YAML")
    s.add_argument("overrides", nargs="*", metavar="section.field=value", help="e.g. lora.rank=32 train.max_steps=100")
    s.add_argument("--events", choices=["-", "text"], default="text", help="'-': JSON event lines on stdout")
    s.add_argument("--control-stdin", action="store_true", help="read stop/save/abort lines on stdin")
    # A flag, never an optional value: `--resume lora.rank=8` must not take the override for a checkpoint.
    s.add_argument("--resume", action="store_true", help="continue from the newest checkpoint")
    s.add_argument("--resume-from", metavar="CHECKPOINT", help="continue from this checkpoint folder")
    s.add_argument(
        "--more", type=int, metavar="N",
        help="train N more steps after the newest checkpoint, the learning-rate schedule stretched to the new end",
    )
    s.add_argument("--force-resume", action="store_true", help="resume even if the model, LoRA shape or data changed")
    s.add_argument(
        "--gpus", metavar="N|0,2",
        help="train on several GPUs of this machine (one process each, through torchrun): a count, or card numbers",
    )
    s.add_argument("--verbose", action="store_true", help="print the libraries' own warnings and progress bars")
    s.set_defaults(func=cmd_train)

    s = sub.add_parser("inspect-model", help="facts about a model from its config and tokenizer (no weights)")
    s.add_argument("ref", help="local folder, .gguf file or hub id")
    s.add_argument("--json", action="store_true")
    s.add_argument("--revision")
    s.add_argument("--trust-remote-code", action="store_true")
    s.set_defaults(func=cmd_inspect_model)

    s = sub.add_parser("quickstart", help="download the 135M demo model and train a short run on sample data")
    s.add_argument("--output-dir", default="runs/quickstart")
    s.add_argument("--steps", type=int, default=None, help="optimizer steps (default: 30)")
    s.add_argument("--verbose", action="store_true", help="print the libraries' own warnings and progress bars")
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
        "qlora_engine.tracking",
    ):
        _register(module, sub)
    return p


def _register(module: str, sub: Any) -> None:
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
