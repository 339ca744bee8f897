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
    print(json.dumps(obj, indent=2, default=str))


def _fail(e: QLoRAError) -> int:
    print(redact(f"error: {e}"), file=sys.stderr)
    if getattr(e, "hint", None):
        print(redact(f"hint: {e.hint}"), file=sys.stderr)
    return 2


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


def _install_sigint(control: Any) -> None:
    """First Ctrl-C: stop at the next step boundary and save. Second: abort at once."""
    state = {"count": 0}

    def handler(signum: int, frame: Any) -> None:
        state["count"] += 1
        if state["count"] == 1:
            print("\nstopping after this step and saving (Ctrl-C again to abort) ...", file=sys.stderr)
            control.request_stop()
        else:
            signal.signal(signal.SIGINT, signal.default_int_handler)
            raise KeyboardInterrupt

    signal.signal(signal.SIGINT, handler)


def cmd_train(args: argparse.Namespace) -> int:
    from qlora_engine import quiet

    captured = quiet.capture(args.verbose)  # before torch and the libraries load: some talk at import
    try:
        return _train(args)
    finally:
        _report_captured(captured, args)


def _report_captured(captured: Any, args: argparse.Namespace) -> None:
    """Third-party warnings of a train command into the run's third_party.log, and one line if any matter."""
    from qlora_engine.config import TrainConfig

    try:
        run_dir = TrainConfig.load(args.config, args.overrides).output_dir
    except QLoRAError:
        run_dir = None
    log_file = captured.write(run_dir / "third_party.log") if run_dir is not None and run_dir.is_dir() else None
    if line := captured.summary(log_file):
        print(line, file=sys.stderr)


def _train(args: argparse.Namespace) -> int:
    import torch

    from qlora_engine.config import TrainConfig
    from qlora_engine.control import RunControl
    from qlora_engine.events import StreamSink, TextSink
    from qlora_engine.train import run

    cfg = TrainConfig.load(args.config, args.overrides)
    control = RunControl()
    _install_sigint(control)
    if args.control_stdin:
        control.listen(sys.stdin)
    sink = StreamSink(sys.stdout) if args.events == "-" else TextSink(sys.stderr)
    try:
        cfg, resume = _resume_plan(cfg, args)
        finished = run(cfg, sink, control, resume=resume, force_resume=args.force_resume)
    except QLoRAError as e:
        return _fail(e)
    except KeyboardInterrupt:
        print("aborted; the last checkpoint is kept.", file=sys.stderr)
        return 130
    except torch.OutOfMemoryError:  # the run_failed event already says what to change
        return 3
    if finished.adapter_dir:  # peft's empty README template becomes the adapter's model card (issue 19)
        from qlora_engine.export.adapter import write_run_adapter_card

        write_run_adapter_card(cfg.output_dir)
    if args.events != "-":
        print(f"adapter: {finished.adapter_dir}", file=sys.stderr)
    return 0


def _resume_plan(cfg: Any, args: argparse.Namespace) -> tuple[Any, bool | str | None]:
    """The config to run and what to resume from, for --resume, --resume-from and --more.

    ``--more N`` continues from the newest checkpoint with ``train.max_steps`` set to its step + N;
    the trainer stretches the learning-rate schedule to the new end. A plain ``--resume`` of a run
    that already reached ``train.max_steps`` is refused with the ``--more`` hint, since it would
    train nothing.
    """
    from qlora_engine import checkpoint as ckpt
    from qlora_engine.config import apply_overrides
    from qlora_engine.errors import ResumeError

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
    """Fetch the demo model, train a short run on the bundled sample data, compare on held-out questions."""
    from qlora_engine import quiet
    from qlora_engine.quickstart import run_quickstart

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
    for module in ("qlora_engine.data", "qlora_engine.budget", "qlora_engine.export"):
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
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except QLoRAError as e:
        return _fail(e)


if __name__ == "__main__":
    raise SystemExit(main())
