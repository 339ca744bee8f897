"""``qlora-engine chat SOURCE --serve --events -``: a trained model answering requests on stdin.

The app's Try page runs this as a child process, so the window never imports torch and a
model that runs out of memory cannot take it down. The model loads once; then every stdin
line is one of:

- a JSON request ``{"request": N, "sides": {"base": MESSAGES, "tuned": MESSAGES},
  "settings": {...GenerationSettings fields...}}``: each side's conversation (a list of
  ``{"role", "content"}``, the newest user turn last) is answered with the model's chat
  template, the base side with the adapter off. Text streams out as ``answer_piece`` events,
  and each side ends with an ``answer_done`` event;
- ``cancel``: the answer in progress stops at the next token (``finish_reason`` 'cancelled');
- ``quit`` (or the end of stdin): the server exits.

A request the server cannot take (bad JSON, bad settings) is answered with a ``log`` event at
level ``error`` naming the request; loading failures end the server with a ``run_failed`` event.
"""

from __future__ import annotations

import json
import queue
import threading
from typing import IO, Any

from qlora_engine.events import AnswerDone, AnswerPiece, ChatReady, EventSink, LogLine

SIDES = ("base", "tuned")


def _reader(stream: IO[str], requests: queue.Queue, cancel: threading.Event) -> None:
    """Reads stdin on its own thread, so a ``cancel`` arrives while an answer is being generated."""
    for line in stream:
        text = line.strip()
        if not text:
            continue
        if text == "cancel":
            cancel.set()
        elif text == "quit":
            break
        else:
            requests.put(text)
    requests.put(None)


def serve(chat: Any, stream: IO[str], sink: EventSink) -> int:
    """Answer requests from ``stream`` with ``chat`` (a loaded :class:`~qlora_engine.generate.ChatModel`)."""
    from qlora_engine.generate import GenerationSettings  # lazy: only a served chat needs the generator

    info = getattr(chat, "info", None)
    sink.emit(ChatReady(model=str(info.config.model.ref) if info is not None else "", device=str(chat.device)))
    requests: queue.Queue = queue.Queue()
    cancel = threading.Event()
    threading.Thread(target=_reader, args=(stream, requests, cancel), name="chat-stdin", daemon=True).start()
    while True:
        line = requests.get()
        if line is None:
            return 0
        cancel.clear()
        try:
            req = json.loads(line)
            number = int(req.get("request", 0))
            settings = GenerationSettings(**(req.get("settings") or {}))
            sides = {side: list(req["sides"][side]) for side in SIDES if side in req.get("sides", {})}
        except Exception as e:  # a malformed request is answered, the server stays
            sink.emit(LogLine(level="error", message=f"request not understood ({type(e).__name__}: {e})"))
            continue
        for side, messages in sides.items():
            result = chat.generate(
                messages,
                settings,
                adapter=(side == "tuned"),
                on_text=lambda text, side=side, n=number: sink.emit(AnswerPiece(request=n, side=side, text=text)),
                should_stop=cancel.is_set,
            )
            sink.emit(
                AnswerDone(
                    request=number,
                    side=side,
                    text=result.text,
                    tokens=len(result.token_ids),
                    tokens_per_second=result.tokens_per_second,
                    finish_reason=result.finish_reason,
                )
            )


def request_line(number: int, sides: dict[str, list[dict[str, str]]], settings: dict[str, Any]) -> str:
    """One request as the line :func:`serve` reads (the app writes it with this)."""
    return json.dumps({"request": number, "sides": sides, "settings": settings})
