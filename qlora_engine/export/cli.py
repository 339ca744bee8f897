"""The ``export`` and ``chat`` commands: take a finished run away, or talk to it in a terminal."""

from __future__ import annotations

import argparse
import dataclasses
import signal
import sys
from typing import Any

from qlora_engine.errors import QLoRAError
from qlora_engine.events import StreamSink, TextSink
from qlora_engine.export.common import FORMATS


def _interrupt_on_sigterm() -> None:
    """SIGTERM (the app's Cancel on a child, a job scheduler) unwinds like Ctrl-C, so temp folders get removed."""

    def handler(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    try:
        signal.signal(signal.SIGTERM, handler)
    except ValueError:  # not the main thread (tests calling main() from a worker)
        pass


def cmd_export(args: argparse.Namespace) -> int:
    from qlora_engine.export import export  # lazy: only this subcommand needs it (fast --help)

    sink = StreamSink(sys.stdout) if args.events == "-" else TextSink(sys.stderr)
    from qlora_engine.export.source import default_export_dir, load_run  # lazy: only this subcommand needs it

    types = [t.strip() for t in args.gguf_types.split(",") if t.strip()]
    _interrupt_on_sigterm()

    def work() -> Any:
        info = load_run(args.source)
        return export(
            info,
            args.format,
            args.out or default_export_dir(info, args.format),
            overwrite=args.force,
            sink=sink,
            dtype=args.dtype,
            gguf_types=types,
            gguf_lora=not args.no_lora,
        )

    try:
        path = _reporting_failure(args, work)
    except KeyboardInterrupt:
        print("export interrupted; nothing was written.", file=sys.stderr)
        return 130
    print(f"exported: {path}", file=sys.stderr)
    return 0


def _reporting_failure(args: argparse.Namespace, work: Any) -> Any:
    """Run ``work()``; with ``--events -`` a user error is also a ``run_failed`` event on stdout
    (the app reads its attributes from there, never the text on stderr)."""

    try:
        return work()
    except QLoRAError as e:
        from qlora_engine.cli import _emit_failure  # the CLI module imports this one: not at import time

        _emit_failure(args, e)
        raise


def _settings(args: argparse.Namespace) -> Any:
    from qlora_engine.generate import GenerationSettings  # lazy: only this subcommand needs it (fast --help)

    return GenerationSettings(**{f.name: getattr(args, f.name) for f in dataclasses.fields(GenerationSettings)})


def _answer(chat: Any, prompt: Any, settings: Any, *, adapter: bool, label: str | None) -> Any:
    if label:
        print(f"--- {label} ---", flush=True)
    result = chat.generate(prompt, settings, adapter=adapter, on_text=lambda t: print(t, end="", flush=True))
    print(flush=True)
    tail = {"length": " (stopped at --max-new-tokens)", "cancelled": " (cancelled)"}.get(result.finish_reason, "")
    print(f"[{len(result.token_ids)} tokens, {result.tokens_per_second:.1f} tok/s{tail}]", file=sys.stderr, flush=True)
    return result


def cmd_chat(args: argparse.Namespace) -> int:
    from qlora_engine.generate import ChatModel  # lazy: only this subcommand needs it (fast --help)

    if args.serve:
        from qlora_engine.chat_server import serve  # lazy: only this subcommand needs it (fast --help)

        sink = StreamSink(sys.stdout) if args.events == "-" else TextSink(sys.stderr)
        _interrupt_on_sigterm()
        chat = _reporting_failure(args, lambda: ChatModel.load(args.source, device=args.device, sink=sink))
        try:
            return serve(chat, sys.stdin, sink)
        except KeyboardInterrupt:
            return 130
    settings = _settings(args)
    chat = ChatModel.load(args.source, device=args.device, sink=TextSink(sys.stderr))
    sides = [(False, "base"), (True, "tuned")] if args.compare else [(True, None)]

    def turn(messages: list[dict[str, str]]) -> str:
        text = ""
        for adapter, label in sides:
            text = _answer(chat, messages, settings, adapter=adapter, label=label).text
        return text

    if args.prompt is not None:
        try:
            turn([{"role": "user", "content": args.prompt}])
        except KeyboardInterrupt:
            print("\n(interrupted)", file=sys.stderr)
            return 130
        return 0
    interactive = sys.stdin.isatty()
    if interactive:
        mode = "base and tuned answers" if args.compare else "the tuned model"
        print(f"Chatting with {mode}. /reset forgets the conversation, /quit (or Ctrl-D) leaves.", file=sys.stderr)
    history: list[dict[str, str]] = []
    while True:
        if interactive:
            print("> ", end="", file=sys.stderr, flush=True)
        line = sys.stdin.readline()
        if not line:
            break
        line = line.rstrip("\n")
        if not line.strip():
            continue
        if line.strip() == "/quit":
            break
        if line.strip() == "/reset":
            history.clear()
            continue
        # --compare answers each prompt on its own: two models cannot share one history.
        messages = (
            [{"role": "user", "content": line}] if args.compare else history + [{"role": "user", "content": line}]
        )
        try:
            reply = turn(messages)
        except KeyboardInterrupt:
            print("\n(interrupted)", file=sys.stderr)
            continue
        if not args.compare:
            history = messages + [{"role": "assistant", "content": reply}]
    return 0


def add_cli(sub: Any) -> None:
    s = sub.add_parser(
        "export",
        help="export a finished run: adapter, merged model or GGUF",
        description="Write a run's adapter (PEFT folder), the merged 16-bit model (safetensors), or GGUF files for "
        "llama.cpp/Ollama (merged f16/q8_0, a GGUF LoRA file and a Modelfile), each with a model card.",
    )
    s.add_argument("source", help="run folder, its adapter/ folder, or a checkpoints/step-N folder")
    s.add_argument("--format", choices=FORMATS, required=True)
    s.add_argument(
        "--out",
        help="folder to create (must not exist unless --force); default: beside the run folder, named for the base "
        "model, the run and the format (e.g. smollm2-135m-instruct-pirate-lora)",
    )
    s.add_argument(
        "--force", action="store_true", help="replace --out if it exists (only once the new export is complete)"
    )
    s.add_argument(
        "--dtype",
        default="auto",
        choices=["auto", "bfloat16", "float16", "float32"],
        help="merged/gguf: dtype of the merge (auto: the base model's own)",
    )
    s.add_argument(
        "--gguf-types",
        default="f16,q8_0",
        help="gguf: model files to write, comma-separated (f16, q8_0; q4_k_m, q5_k_m, q4_k_s, q5_k_s, q6_k through "
        "llama.cpp's quantizer: pip install llama-cpp-python)",
    )
    s.add_argument("--no-lora", action="store_true", help="gguf: skip the GGUF LoRA adapter file")
    s.add_argument("--events", choices=["-", "text"], default="text", help="'-': JSON event lines on stdout")
    s.set_defaults(func=cmd_export)

    s = sub.add_parser(
        "chat",
        help="talk to a trained model in the terminal (--compare: base and tuned side by side)",
        description="Loads the base model in 4 bit with the run's adapter. Reads prompts from stdin (one per line) "
        "or answers --prompt once.",
    )
    s.add_argument("source", help="run folder, adapter folder or checkpoint folder")
    s.add_argument("--compare", action="store_true", help="answer every prompt with the base model and the tuned model")
    s.add_argument("--prompt", help="answer this prompt and exit")
    s.add_argument("--system", help="system message")
    s.add_argument("--raw", action="store_true", help="no chat template: continue the text as given")
    s.add_argument("--max-new-tokens", type=int, default=256)
    s.add_argument("--temperature", type=float, default=0.7, help="0 for greedy (deterministic) answers")
    s.add_argument("--top-p", type=float, default=0.9)
    s.add_argument(
        "--repetition-penalty", type=float, default=1.2,  # generate.CHAT_REPETITION_PENALTY
        help="above 1, words the answer already used become less likely, so small models do not loop; 1 turns it off",
    )
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--device", choices=["auto", "cuda", "cpu"], default=None, help="default: the run's train.device")
    s.add_argument(
        "--serve", action="store_true", help="answer JSON requests on stdin, one a line (the app's Try page)"
    )
    s.add_argument("--events", choices=["-", "text"], default="text", help="with --serve, '-': JSON event lines on stdout")
    s.set_defaults(func=cmd_chat)
