"""Samples to tokens: the chat template, the loss mask and the closing EOS.

Chat samples are rendered by the tokenizer's own chat template (or the one in the config,
or ChatML when the tokenizer has none) and tokenized as one string, exactly as the model
will see a conversation at inference. Which characters carry loss is found from the
template itself: the answer of assistant turn *i* is what the template adds between
"conversation up to *i* with the generation prompt" and "conversation through *i*", which
includes the template's end-of-turn marker so the model learns to stop. Tokens that hold any
character of an answer span carry labels; everything else is ``IGNORE_INDEX`` (-100, the value PyTorch's cross entropy skips).

Loss weights (a turn's ``weight``, its content parts' weights) become one weight per token: the
largest weight among the characters the token holds. The text the template adds around an answer
(its end-of-turn marker) weighs what the turn does; a token of weight 0 carries no label.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Any

import numpy as np

from qlora_engine.data.formats import BadRow, ChatSample, PromptCompletion, Sample, TextSample

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
# End-of-turn markers of common templates, used only when the prefix method cannot find a turn.
_END_MARKERS = ("<|im_end|>", "<|eot_id|>", "<end_of_turn>", "<|end|>", "</s>", "<|endoftext|>")


@dataclass
class Encoded:
    input_ids: list[int]
    trained: list[bool]
    weights: list[float] | None = None
    """Each token's loss weight, when the sample has weights (0 where ``trained`` is False)."""


def resolve_template(tokenizer: Any, override: str | None) -> tuple[str, str]:
    """(template, where it came from): the config's, the tokenizer's, or the ChatML default."""
    if override:
        if override.strip().lower() == "chatml":
            return CHATML_TEMPLATE, "chatml (data.chat_template)"
        return override, "data.chat_template"
    own = getattr(tokenizer, "chat_template", None)
    if isinstance(own, dict):  # several named templates: the default one
        own = own.get("default") or next(iter(own.values()), None)
    if isinstance(own, str) and own.strip():
        return own, "tokenizer"
    return CHATML_TEMPLATE, "chatml (default: the tokenizer has no chat template)"


def tokenizer_fingerprint(tokenizer: Any, template: str) -> str:
    """Changes when the vocabulary, the special tokens or the template change."""
    h = hashlib.sha256(type(tokenizer).__name__.encode())
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        h.update(backend.to_str().encode())
    else:
        h.update(json.dumps(sorted(tokenizer.get_vocab().items())).encode())
    specials = {k: str(v) for k, v in sorted(getattr(tokenizer, "special_tokens_map", {}).items())}
    h.update(json.dumps([specials, tokenizer.eos_token_id, tokenizer.bos_token_id]).encode())
    h.update(template.encode())
    return h.hexdigest()


class Encoder:
    """Turns normalized samples into token ids and a per-token "carries loss" flag."""

    def __init__(self, tokenizer: Any, template: str, *, train_on_prompt: bool = False) -> None:
        self.tok = tokenizer
        self.template = template
        self.train_on_prompt = train_on_prompt
        self.eos_id = tokenizer.eos_token_id
        self.eos_text = tokenizer.eos_token if isinstance(tokenizer.eos_token, str) else None
        self.fast = bool(getattr(tokenizer, "is_fast", False))
        self._fast_render = self._compile_fast_render()
        self._checked = False
        self.rendered_chats = 0  # conversations that went through the chat template
        self._max_token_chars: int | None = None

    @property
    def max_token_chars(self) -> int:
        """The most characters one token can cover (an upper bound, from the vocabulary's longest
        entry: byte-level and SentencePiece entries are at least as long as the text they stand for)."""
        if self._max_token_chars is None:
            try:
                longest = max((len(t) for t in self.tok.get_vocab()), default=16)
            except Exception:  # a tokenizer that cannot list its vocabulary: a generous bound
                longest = 64
            self._max_token_chars = min(max(longest, 4), 4096)
        return self._max_token_chars

    # -- chat -----------------------------------------------------------------------------

    def _apply(self, messages: list[dict[str, str]], generation: bool) -> str:
        if self._fast_render is not None:
            return self._fast_render(messages, generation)
        return self._slow_render(messages, generation)

    def _slow_render(self, messages: list[dict[str, str]], generation: bool) -> str:
        return self.tok.apply_chat_template(
            messages, chat_template=self.template, tokenize=False, add_generation_prompt=generation
        )

    def _compile_fast_render(self) -> Any:
        """The compiled template called directly: ``apply_chat_template`` spends most of its time
        converting message objects, which ours (plain dicts of strings) never need. It is used
        only after it has rendered a real conversation exactly as ``apply_chat_template`` does."""
        try:
            # lazy: transformers costs seconds and qlora_engine.data is imported at the CLI's start-up
            from transformers.utils.chat_template_utils import _compile_jinja_template

            compiled = _compile_jinja_template(self.template)
        except Exception:
            return None
        specials = dict(getattr(self.tok, "special_tokens_map", {}) or {})

        def render(messages: list[dict[str, str]], generation: bool) -> str:
            msgs = [dict(m) for m in messages]  # a template may edit what it is given
            return compiled.render(
                messages=msgs, tools=None, documents=None, add_generation_prompt=generation, **specials
            )

        return render

    def _check_fast_render(self, sample: ChatSample) -> None:
        self._checked = True
        fast = self._fast_render
        if fast is None:
            return
        try:
            same = all(
                fast(m, g) == self._slow_render(m, g)
                for m, g in ((sample.messages, False), (sample.messages[:-1] or sample.messages, True))
            )
        except Exception:
            same = False
        if not same:
            self._fast_render = None

    def render(self, sample: ChatSample) -> tuple[str, list[tuple[int, int]]]:
        """The conversation as text and the character spans that carry loss."""
        msgs = sample.messages
        self.rendered_chats += 1
        if not self._checked:
            self._check_fast_render(sample)
        try:
            full = self._apply(msgs, False)
        except Exception as e:  # a template may refuse a conversation (raise_exception in Jinja)
            raise BadRow(
                f"the chat template refused it: {str(e).splitlines()[0][:160] if str(e) else type(e).__name__}"
            ) from None
        full = full.rstrip()
        if self.train_on_prompt:
            return full, [(0, len(full))]
        spans: list[tuple[int, int]] = []
        cursor = 0
        for i, m in enumerate(msgs):
            if m["role"] != "assistant" or not sample.train[i]:
                continue
            span = self._span_by_prefix(msgs, i, full, cursor) or self._span_by_search(m["content"], full, cursor)
            if span is None:
                raise BadRow(f"turn {i + 1}: the chat template's output does not contain the answer; cannot mask it")
            spans.append(span)
            cursor = span[1]
        return full, spans

    def char_weights(self, sample: ChatSample, full: str, spans: list[tuple[int, int]]) -> np.ndarray:
        """Each character's loss weight: 0 outside what is trained, 1 inside, an answer's turn weight
        over its span (end-of-turn marker included) and each part's weight x the turn's over its text,
        found in the span as the template wrote it."""
        cw = np.zeros(len(full), dtype=np.float32)
        for a, b in spans:
            cw[a:b] = 1.0
        weights = sample.weights or [None] * len(sample.messages)
        answers = [i for i, m in enumerate(sample.messages) if m["role"] == "assistant" and sample.train[i]]
        cursor = 0
        for k, i in enumerate(answers):
            w = weights[i]
            a, b = (cursor, len(full)) if self.train_on_prompt else spans[k]
            content = sample.messages[i]["content"]
            at = full.find(content, a, b)
            if w is None:
                cursor = at + len(content) if at >= 0 else cursor
                continue
            if at < 0:
                raise BadRow(f"turn {i + 1}: the chat template changed the answer's text; cannot place its weights")
            if not self.train_on_prompt:
                cw[a:b] = w.turn
            start = at
            for end, x in w.parts:
                cw[start : at + end] = w.turn * x
                start = at + end
            if not w.parts:
                cw[at : at + len(content)] = w.turn
            cursor = at + len(content)
        return cw

    def _span_by_prefix(self, msgs: list[dict[str, str]], i: int, full: str, cursor: int) -> tuple[int, int] | None:
        if i == 0:
            return None
        try:
            prefix = self._apply(msgs[:i], True)
            through = full if i == len(msgs) - 1 else self._apply(msgs[: i + 1], False).rstrip()
        except Exception:
            return None
        if not (full.startswith(through) and through.startswith(prefix)) or len(prefix) < cursor:
            return None
        return None if len(through) <= len(prefix) else (len(prefix), len(through))

    def _span_by_search(self, content: str, full: str, cursor: int) -> tuple[int, int] | None:
        k = full.find(content, cursor)
        if k < 0:
            stripped = content.strip()
            k = full.find(stripped, cursor) if stripped else -1
            if k < 0:
                return None
            content = stripped
        end = k + len(content)
        rest = full[end:]
        gap = len(rest) - len(rest.lstrip(" \t\r\n"))
        markers = ((self.eos_text,) if self.eos_text else ()) + _END_MARKERS
        for marker in markers:
            if rest[gap:].startswith(marker):
                end += gap + len(marker)
                break
        return k, end

    # -- tokens ---------------------------------------------------------------------------

    def encode_many(self, samples: list[Sample]) -> list[Encoded | BadRow]:
        """Encode a batch (one tokenizer call per kind, so the Rust tokenizer runs in parallel)."""
        out: list[Encoded | BadRow | None] = [None] * len(samples)
        chats: list[tuple[int, str, list[tuple[int, int]], np.ndarray | None, ChatSample]] = []
        texts: list[tuple[int, str]] = []
        pcs: list[tuple[int, PromptCompletion]] = []
        for i, s in enumerate(samples):
            if isinstance(s, TextSample):
                texts.append((i, s.text))
            elif isinstance(s, PromptCompletion):
                pcs.append((i, s))
            else:
                try:
                    text, spans = self.render(s)
                    cw = self.char_weights(s, text, spans) if s.weights else None
                except BadRow as e:
                    out[i] = e
                    continue
                chats.append((i, text, spans, cw, s))
        if chats:
            tokenized = self._tokenize_spans([c[1] for c in chats], [c[2] for c in chats], [c[3] for c in chats])
            for (i, _text, _spans, _cw, s), (ids, trained, weights) in zip(chats, tokenized, strict=True):
                last = s.train[-1] and s.messages[-1]["role"] == "assistant"
                last_w = s.weights[-1] if s.weights else None
                eos_w = last_w.turn if last_w is not None else 1.0
                out[i] = self._close(ids, trained, last or self.train_on_prompt, weights, eos_w)
        if texts:
            ids_list = self.tok([t for _, t in texts], add_special_tokens=True)["input_ids"]
            for (i, _), ids in zip(texts, ids_list, strict=True):
                out[i] = self._close(list(ids), [True] * len(ids), True)
        if pcs:
            p_ids = self.tok([p.prompt for _, p in pcs], add_special_tokens=True)["input_ids"]
            c_ids = self.tok([p.completion for _, p in pcs], add_special_tokens=False)["input_ids"]
            for (i, _), p, c in zip(pcs, p_ids, c_ids, strict=True):
                trained = [self.train_on_prompt] * len(p) + [True] * len(c)
                out[i] = self._close(list(p) + list(c), trained, True)
        return [o if o is not None else BadRow("could not be encoded") for o in out]

    def _tokenize_spans(
        self, texts: list[str], spans: list[list[tuple[int, int]]], char_weights: list[np.ndarray | None]
    ) -> list[tuple[list[int], list[bool], list[float] | None]]:
        if not self.fast:
            return [self._tokenize_segments(*args) for args in zip(texts, spans, char_weights, strict=True)]
        enc = self.tok(texts, add_special_tokens=False, return_offsets_mapping=True)
        result = []
        for ids, offsets, sp, cw in zip(enc["input_ids"], enc["offset_mapping"], spans, char_weights, strict=True):
            spans_of_tokens = np.asarray(offsets, dtype=np.int64).reshape(-1, 2)
            starts, ends = spans_of_tokens[:, 0], spans_of_tokens[:, 1]
            if cw is not None:
                weights = _token_weights(cw, starts, ends)
                result.append((list(ids), (weights > 0).tolist(), weights.tolist()))
                continue
            mask = np.zeros(len(ids), dtype=bool)
            for a, b in sp:
                # Any overlap: a token that merges the template's trailing space with the first
                # answer character (" 1" after "A:") holds answer text and must be learned.
                mask |= (ends > a) & (starts < b)
            result.append((list(ids), mask.tolist(), None))
        return result

    def _tokenize_segments(
        self, text: str, spans: list[tuple[int, int]], cw: np.ndarray | None
    ) -> tuple[list[int], list[bool], list[float] | None]:
        """Tokenizers without offsets: tokenize the pieces between span (and weight) edges one by one."""
        edges = [x for sp in spans for x in sp]
        if cw is not None:
            edges += (np.flatnonzero(np.diff(cw)) + 1).tolist()
        cuts = sorted({0, len(text), *edges})
        ids: list[int] = []
        trained: list[bool] = []
        weights: list[float] = []
        for a, b in zip(cuts, cuts[1:], strict=False):
            piece = self.tok(text[a:b], add_special_tokens=False)["input_ids"]
            inside = any(sa <= a and b <= sb for sa, sb in spans)
            w = float(cw[a]) if cw is not None else float(inside)
            ids.extend(piece)
            trained.extend([inside and w > 0] * len(piece))
            weights.extend([w] * len(piece))
        return ids, trained, (weights if cw is not None else None)

    def _close(
        self,
        ids: list[int],
        trained: list[bool],
        train_eos: bool,
        weights: list[float] | None = None,
        eos_weight: float = 1.0,
    ) -> Encoded:
        """Every sample ends with EOS; it carries loss whenever the answer before it does (with the
        last answer's turn weight)."""
        if self.eos_id is not None and (not ids or ids[-1] != self.eos_id):
            ids.append(self.eos_id)
            trained.append(train_eos and eos_weight > 0)
            if weights is not None:
                weights.append(eos_weight if train_eos else 0.0)
        elif ids and train_eos:
            if weights is not None:
                weights[-1] = weights[-1] or eos_weight
            trained[-1] = weights is None or weights[-1] > 0
        return Encoded(ids, trained, weights)


def _token_weights(cw: np.ndarray, starts: np.ndarray, ends: np.ndarray) -> np.ndarray:
    """Each token's weight: the largest among the characters it holds (``cw`` is piecewise constant,
    so this goes run by run, a few vectorized passes a sample)."""
    bounds = np.concatenate([[0], np.flatnonzero(np.diff(cw)) + 1, [len(cw)]])
    tw = np.zeros(len(starts), dtype=np.float32)
    for a, b in zip(bounds[:-1].tolist(), bounds[1:].tolist(), strict=True):
        w = float(cw[a]) if b > a else 0.0
        if w > 0:
            np.maximum(tw, np.where((ends > a) & (starts < b), np.float32(w), np.float32(0)), out=tw)
    return tw
