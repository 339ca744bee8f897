"""``qlora-engine inspect-serve --events -``: the app's questions about a model, data and the budget.

Reading a model's facts builds it on the meta device, reading data tokenizes it, and the
budget reads the model's config through transformers: all of it imports torch. The app's
window never does (see docs/DESIGN.md, "The app: processes, the job object, state"), so it
keeps one of these children and asks it. Each stdin line is one JSON request
``{"request": N, "kind": ..., ...}``; each is answered, in order, by one ``inspect_result``
event (``result`` is plain JSON) or one ``inspect_failed`` event (a user error's attributes in
``error``, an internal error's traceback in ``traceback``). ``quit`` or the end of stdin ends it.

Kinds:

- ``model``: ``ref``, ``trust_remote_code``, ``revision`` -> ``ModelInfo.to_dict()``;
- ``data``: ``config`` (a ``TrainConfig`` dict), ``base_dir``, ``model_ref`` (None: no tokens),
  ``samples``, ``max_rows``, ``shown`` -> the ``inspect_data`` report with the token lengths;
- ``keys``: ``config``, ``base_dir`` -> the column names of the data's first rows;
- ``budget``: ``config``, ``base_dir``, ``gpu_bytes``, ``gpu_name``, ``data_stats``, ``world_size``
  (GPUs sharing the run; default 1) -> the estimate (one GPU's), the fit advice, the checkpointing,
  strategy and kept-weights decisions and the components' help texts.
"""

from __future__ import annotations

import dataclasses
import json
import sys
import traceback
from pathlib import Path
from typing import IO, Any

from qlora_engine.errors import QLoRAError
from qlora_engine.events import InspectFailed, InspectResult, StreamSink


def plain(obj: Any) -> Any:
    """``obj`` as JSON data: dataclasses as dicts, numpy arrays and scalars as lists and numbers."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return plain(dataclasses.asdict(obj))
    if isinstance(obj, dict):
        return {str(k): plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [plain(v) for v in obj]
    if hasattr(obj, "tolist"):  # numpy
        return obj.tolist()
    return str(obj) if isinstance(obj, Path) else obj


def _config(req: dict[str, Any]) -> Any:
    from qlora_engine.config import TrainConfig  # lazy: pulls in torch; only this request needs it

    cfg = TrainConfig.from_dict(req["config"], source="")
    cfg.base_dir = Path(req["base_dir"]) if req.get("base_dir") else None
    return cfg


class Inspector:
    """Answers requests; keeps the last tokenizer, since the data page asks with the same model often."""

    def __init__(self) -> None:
        self._tokenizer: tuple[tuple[str, bool], Any] | None = None

    def tokenizer(self, ref: str, trust_remote_code: bool) -> Any:
        from qlora_engine.data.inspect import load_tokenizer_for  # lazy: pulls in torch; only this request needs it

        key = (ref, trust_remote_code)
        if self._tokenizer is None or self._tokenizer[0] != key:
            self._tokenizer = (key, load_tokenizer_for(ref, trust_remote_code=trust_remote_code))
        return self._tokenizer[1]

    def answer(self, req: dict[str, Any]) -> Any:
        kind = req.get("kind")
        if kind == "model":
            from qlora_engine.models import inspect_model  # lazy: pulls in torch; only this request needs it

            info = inspect_model(
                req["ref"], trust_remote_code=bool(req.get("trust_remote_code")), revision=req.get("revision")
            )
            return info.to_dict()
        if kind == "data":
            from qlora_engine.data import inspect_data  # lazy: pulls in torch; only this request needs it

            cfg = _config(req)
            ref = req.get("model_ref")
            tok = self.tokenizer(ref, cfg.model.trust_remote_code) if ref else None
            report = inspect_data(
                cfg, tok, samples=int(req["samples"] if tok else req["shown"]), max_rows=int(req["max_rows"])
            )
            samples = report.get("samples") or []
            if tok is not None and "lengths" not in report:
                report["lengths"] = [int(s["tokens"]) for s in samples if "tokens" in s]
            report["samples"] = samples[: int(req["shown"])]
            return plain(report)
        if kind == "keys":
            from qlora_engine.data.sources import open_source  # lazy: pulls in torch; only this request needs it

            cfg = _config(req)
            src = open_source(cfg.data.path, cfg.resolve(cfg.data.path), subset=cfg.data.subset, split=cfg.data.split)
            keys: dict[str, None] = {}
            for i, r in enumerate(src.rows()):
                if isinstance(getattr(r, "data", None), dict):
                    keys.update(dict.fromkeys(r.data))
                if i >= 50:
                    break
            return list(keys)
        if kind == "budget":
            from qlora_engine.budget.estimate import COMPONENT_HELP  # lazy: pulls in torch; only this request needs it
            from qlora_engine.plan import advise  # lazy: pulls in torch; only this request needs it

            planned = advise(
                _config(req),
                gpu_bytes=req.get("gpu_bytes"),
                data_stats=req.get("data_stats"),
                gpu_name=req.get("gpu_name"),
                cuda=bool(req.get("cuda", True)),
                world_size=int(req.get("world_size") or 1),
            )
            decision = planned.decision("train.gradient_checkpointing")
            strategy = planned.decision("train.strategy")
            dense = planned.decision("train.keep_dequantized")
            return {
                "estimate": plain(planned.estimate),
                "advice": plain(planned.fit) if planned.fit is not None else None,
                "checkpointing": decision.to_dict() if decision is not None else None,
                "strategy": strategy.to_dict() if strategy is not None else None,
                "dequantized": dense.to_dict() if dense is not None else None,
                "gpu_bytes": req.get("gpu_bytes"),
                "world_size": int(req.get("world_size") or 1),
                "help": dict(COMPONENT_HELP),
            }
        raise ValueError(f"unknown kind of request {kind!r}")


def serve(stream: IO[str], sink: Any) -> int:
    inspector = Inspector()
    for line in stream:
        text = line.strip()
        if not text:
            continue
        if text == "quit":
            break
        number = -1
        try:
            req = json.loads(text)
            number = int(req.get("request", -1))
            sink.emit(InspectResult(request=number, result=inspector.answer(req)))
        except QLoRAError as e:
            sink.emit(InspectFailed(request=number, error_type=type(e).__name__, message=str(e), error=e.to_dict()))
        except Exception as e:  # a bug or a library's own error: the page shows it with its traceback
            sink.emit(
                InspectFailed(
                    request=number, error_type=type(e).__name__, message=f"{type(e).__name__}: {e}",
                    traceback=traceback.format_exc(),
                )
            )  # fmt: skip
    return 0


def cmd_inspect_serve(args: Any) -> int:
    return serve(sys.stdin, StreamSink(sys.stdout))


def add_cli(sub: Any) -> None:
    s = sub.add_parser(
        "inspect-serve", help="answer JSON questions about models, data and the budget on stdin (the app)"
    )
    s.add_argument("--events", choices=["-"], default="-", help="JSON event lines on stdout (the only mode)")
    s.set_defaults(func=cmd_inspect_serve)
