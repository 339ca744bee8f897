"""Generation for trying a fine-tune: the quantized base with the adapter on (tuned) or off (base).

One model is loaded (the base in 4 bit, as in training, plus the LoRA adapter); the base
model's answer comes from the same weights with the adapter switched off
(:meth:`ChatModel.adapter_enabled`), so the only difference between the two answers is the adapter.

Tokens are sampled here, one at a time with a KV cache, rather than through
``model.generate``: each step can hand its text to a callback (streaming), check a cancel
flag, and two answers can be interleaved step by step (:meth:`ChatModel.compare`). Both
answers of a comparison draw from random generators seeded alike, so with the same seed
they differ only where the models do. :meth:`ChatModel.answer_all` answers many prompts in one
batch (padded on the left, each row with its own sampler): the same answers as one by one, in a
third of the time on a CPU.

No Qt here: the desktop app calls this from a worker thread and passes a ``should_stop``
callable that reads its cancel flag.
"""

from __future__ import annotations

import contextlib
import inspect
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from qlora_engine.errors import QLoRAError

if TYPE_CHECKING:
    import torch

Messages = list[dict[str, str]]
StopCheck = Callable[[], bool] | None

# End-of-turn tokens of common chat templates; generation also stops at these when the
# tokenizer knows them as special tokens and the template writes them.
_TURN_ENDS = ("<|im_end|>", "<|eot_id|>", "<|end_of_text|>", "<end_of_turn>", "<|end|>", "<|endoftext|>", "</s>")


CHAT_REPETITION_PENALTY = 1.2
"""What chat front ends (the Try page, ``qlora-engine chat``, the quickstart) use unless told otherwise."""


@dataclass
class GenerationSettings:
    max_new_tokens: int = field(default=256, metadata={"help": "Longest answer in tokens."})
    temperature: float = field(
        default=0.7, metadata={"help": "Sampling temperature; 0 always takes the most likely token (greedy)."}
    )
    top_p: float = field(
        default=0.9, metadata={"help": "Sample only from the most likely tokens whose probabilities add up to this."}
    )
    repetition_penalty: float = field(
        default=1.0,
        metadata={
            "help": "Above 1, tokens the answer already holds become less likely (each logit divided by it if "
            "positive, multiplied if negative), which keeps small models from looping; 1 turns it off. Only the "
            "answer's own tokens count, so words of the question can still be repeated."
        },
    )
    seed: int = field(default=0, metadata={"help": "Seed of the sampler: the same seed gives the same answer."})
    system: str | None = field(default=None, metadata={"help": "Optional system message put before the prompt."})
    raw: bool = field(
        default=False,
        metadata={"help": "Send the prompt as plain text, without the chat template (for text-only fine-tunes)."},
    )

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise QLoRAError(f"max_new_tokens: {self.max_new_tokens} is not allowed; use at least 1.")
        if self.temperature < 0:
            raise QLoRAError(f"temperature: {self.temperature} is not allowed; use 0 (greedy) or a positive number.")
        if not 0 < self.top_p <= 1:
            raise QLoRAError(f"top_p: {self.top_p} is not allowed; use a value in (0, 1].")
        if self.repetition_penalty < 1:
            raise QLoRAError(
                f"repetition_penalty: {self.repetition_penalty} is not allowed; use 1 (off) or more (1.1 to 1.3 is usual)."
            )


@dataclass
class GenerationResult:
    text: str
    token_ids: list[int]
    finish_reason: str
    """'eos' (the model ended its answer), 'length' (max_new_tokens reached) or 'cancelled'."""
    prompt_tokens: int
    elapsed: float

    @property
    def tokens_per_second(self) -> float:
        return len(self.token_ids) / self.elapsed if self.elapsed > 0 else 0.0


class _Stream:
    """One answer being generated: its KV cache, sampler and the text handed out so far."""

    def __init__(self, chat: ChatModel, prompt_ids: list[int], settings: GenerationSettings, adapter: bool) -> None:
        import torch  # lazy: torch; GenerationSettings must import without it

        self.chat = chat
        self.settings = settings
        self.adapter = adapter
        self.prompt_ids = prompt_ids
        self.generator = torch.Generator().manual_seed(settings.seed)
        self.cache: Any = None
        self.next_input = torch.tensor([prompt_ids], device=chat.device)
        self.ids: list[int] = []
        self.emitted = ""
        self.finish_reason: str | None = None
        self.elapsed = 0.0

    @property
    def done(self) -> bool:
        return self.finish_reason is not None

    def step(self) -> str:
        """Generate one token; return the new text it completes (may be '' mid-character)."""
        import torch  # lazy: torch; GenerationSettings must import without it

        t = time.perf_counter()
        with torch.no_grad(), self.chat.adapter_enabled(self.adapter):
            kw = {self.chat.cache_arg: self.cache}
            out = self.chat.model(input_ids=self.next_input, use_cache=True, logits_to_keep=1, **kw)
        cache = getattr(out, self.chat.cache_arg, None)
        self.cache = cache if cache is not None else getattr(out, "past_key_values", None)
        token = _sample(out.logits[0, -1], self.settings, self.generator, self.ids)
        self.elapsed += time.perf_counter() - t
        self.finish_reason = self.chat.take(token, self.ids, self.settings)
        if self.finish_reason is not None:
            return self._flush()
        self.next_input = torch.tensor([[token]], device=self.chat.device)
        return self._new_text(final=False)

    def cancel(self) -> None:
        if self.finish_reason is None:
            self.finish_reason = "cancelled"

    def _flush(self) -> str:
        return self._new_text(final=True)

    def _new_text(self, *, final: bool) -> str:
        text = self.chat.tokenizer.decode(self.ids, skip_special_tokens=True)
        # A multi-byte character split over tokens decodes to U+FFFD until its last byte comes.
        if not final and text.endswith("\ufffd"):
            return ""
        if not text.startswith(self.emitted):  # the decoder re-spaced earlier text: hand out only what is new
            self.emitted = text
            return ""
        new = text[len(self.emitted) :]
        self.emitted = text
        return new

    def result(self) -> GenerationResult:
        return GenerationResult(
            text=self.emitted,
            token_ids=list(self.ids),
            finish_reason=self.finish_reason or "cancelled",
            prompt_tokens=len(self.prompt_ids),
            elapsed=self.elapsed,
        )


def _sample(logits: torch.Tensor, s: GenerationSettings, generator: torch.Generator, seen: Sequence[int] = ()) -> int:
    """The next token from ``logits``; ``seen``: the answer's tokens so far (for the repetition penalty)."""
    import torch  # lazy: torch; GenerationSettings must import without it

    logits = logits.float().cpu()  # the sampler's generator lives on the CPU; one small copy per token
    if s.repetition_penalty != 1.0 and seen:
        idx = torch.tensor(sorted(set(seen)), dtype=torch.long)
        picked = logits[idx]
        logits[idx] = torch.where(picked > 0, picked / s.repetition_penalty, picked * s.repetition_penalty)
    if s.temperature == 0:
        return int(torch.argmax(logits))
    probs = torch.softmax(logits / s.temperature, dim=-1)
    if s.top_p < 1.0:
        sorted_probs, order = torch.sort(probs, descending=True)
        # keep the smallest prefix whose mass reaches top_p (always at least the top token)
        keep = torch.cumsum(sorted_probs, dim=-1) - sorted_probs < s.top_p
        sorted_probs = sorted_probs * keep
        choice = torch.multinomial(sorted_probs / sorted_probs.sum(), 1, generator=generator)
        return int(order[choice])
    return int(torch.multinomial(probs, 1, generator=generator))


CPU_DENSE_SHARE = 0.25
"""The share of the memory available now that the weights :func:`keep_dequantized_on_cpu` keeps may take."""


def keep_dequantized_on_cpu(model: Any, *, available: int | None = None) -> int:
    """Keep every 4-bit layer's weight dequantized, for generating on the CPU; returns how many layers.

    There bitsandbytes dequantizes a 4-bit layer's whole weight at every call, so each generated
    token dequantizes the model (three quarters of a token's time on SmolLM2-135M). Kept, a layer
    is what bitsandbytes' own CPU path computes, with the dequantization done once: the weight
    dequantized straight into the compute dtype, then one ``F.linear`` (the same logits, bit for
    bit). Nothing is kept when the copies would take more than :data:`CPU_DENSE_SHARE` of
    ``available`` (the memory available now). It also keeps answers the same on every CPU:
    bitsandbytes would repack the weights for another kernel on CPUs with AVX-512 bf16.
    """
    import bitsandbytes as bnb  # lazy: only a loaded model needs it
    import torch

    from qlora_engine.fast_lora import dequantize  # lazy: torch
    from qlora_engine.vram import available_host_ram  # lazy: torch

    layers = [
        m
        for m in model.modules()
        if isinstance(m, bnb.nn.Linear4bit)
        and m.compute_dtype is not None
        and not getattr(m.weight.quant_state, "packing_format_for_cpu", False)
    ]
    need = sum(m.weight.quant_state.shape.numel() * m.compute_dtype.itemsize for m in layers)
    if not layers or need > CPU_DENSE_SHARE * (available_host_ram() if available is None else available):
        return 0
    for m in layers:
        with torch.no_grad():
            dense = dequantize(m.weight, m.compute_dtype)
        m.forward = _dense_forward(m, dense)
    return len(layers)


def _dense_forward(layer: Any, dense: torch.Tensor) -> Callable:
    import torch  # lazy: keeps torch out of the window

    def forward(x: torch.Tensor) -> torch.Tensor:
        bias = None if layer.bias is None else layer.bias.to(layer.compute_dtype)
        return torch.nn.functional.linear(x.to(layer.compute_dtype), dense, bias).to(x.dtype)

    return forward


class ChatModel:
    """A run's base model in 4 bit with its adapter, ready to answer prompts with the adapter on or off."""

    def __init__(self, model: Any, tokenizer: Any, template: str, *, info: Any = None) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.template = template
        self.info = info
        self.device = next(model.parameters()).device
        self.stop_ids = _stop_ids(model, tokenizer, template)
        self._tuner_layers: list | None = None  # the adapter's layers, found on the first answer without it
        # transformers 5.x renamed the KV-cache argument (and output field) from past_key_values to cache.
        base = model.get_base_model() if hasattr(model, "get_base_model") else model
        self.cache_arg = "cache" if "cache" in inspect.signature(base.forward).parameters else "past_key_values"

    # -- loading ---------------------------------------------------------------------------

    @classmethod
    def load(cls, source: str | Path, *, device: str | None = None, sink: Any = None) -> ChatModel:
        """Load a run folder, an exported adapter folder or a checkpoint folder (base in 4 bit + adapter).

        Args:
            source: the run folder (``runs/name``), its ``adapter/`` or a ``checkpoints/step-N`` folder.
            device: 'auto', 'cuda' or 'cpu'; None takes the run's ``train.device``.
            sink: receives ``PhaseChanged`` events while loading.
        """
        from peft import PeftModel  # lazy: only loading a model needs it; keeps torch out

        from qlora_engine import models  # lazy: only loading a model needs it; keeps torch out
        from qlora_engine.data.encode import resolve_template  # lazy: only loading a model needs it; keeps torch out
        from qlora_engine.events import PhaseChanged  # lazy: only loading a model needs it; keeps torch out
        from qlora_engine.export.source import load_run, resolve_base, tokenizer_dir  # lazy: keeps torch out

        info = load_run(source)
        cfg = info.config
        emit = sink.emit if sink is not None else (lambda e: None)
        dev = models.pick_device(device or cfg.train.device)
        dtype = models.pick_compute_dtype(cfg.quant.compute_dtype, dev)
        emit(PhaseChanged(phase="resolving", detail=cfg.model.ref))
        folder = resolve_base(info, sink=sink)
        tokenizer = models.load_tokenizer(tokenizer_dir(info), trust_remote_code=cfg.model.trust_remote_code)
        emit(PhaseChanged(phase="loading_model", detail=f"{folder} in 4-bit {cfg.quant.quant_type} on {dev}"))
        base = models.load_quantized_model(cfg, folder, dev, dtype)
        model = PeftModel.from_pretrained(base, str(info.adapter_dir), is_trainable=False)
        model.eval()
        if dev.type == "cpu":
            keep_dequantized_on_cpu(model)
        template, _ = resolve_template(tokenizer, cfg.data.chat_template)
        emit(PhaseChanged(phase="done", detail="model ready"))
        return cls(model, tokenizer, template, info=info)

    # -- prompts ---------------------------------------------------------------------------

    def prompt_ids(self, prompt: str | Messages, settings: GenerationSettings) -> list[int]:
        """Token ids of a prompt: a user message (or a conversation) through the chat template, or raw text."""
        if settings.raw:
            text = prompt if isinstance(prompt, str) else "\n".join(m["content"] for m in prompt)
            ids = list(self.tokenizer(text, add_special_tokens=True)["input_ids"])
            if not ids:  # no chat template, no BOS: nothing for the model to continue
                raise QLoRAError("the prompt is empty: with raw prompts the model needs some text to continue.")
            return ids
        messages: Messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)
        if settings.system and not any(m["role"] == "system" for m in messages):
            messages.insert(0, {"role": "system", "content": settings.system})
        text = self.tokenizer.apply_chat_template(
            messages, chat_template=self.template, tokenize=False, add_generation_prompt=True
        )
        # The template writes any BOS itself (as in training), so the tokenizer adds none.
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    @contextlib.contextmanager
    def adapter_enabled(self, enabled: bool) -> Iterator[None]:
        """The adapter on (as loaded) or off for what runs inside: what peft's ``disable_adapter()``
        does for LoRA, layer by layer, without the whole-model status check it makes on every entry
        (48 ms a call on SmolLM2, a generated token's time, and a base answer enters it per token)."""
        if enabled:
            yield
            return
        if self._tuner_layers is None:
            from peft.tuners.tuners_utils import BaseTunerLayer  # lazy: only a loaded model gets here

            self._tuner_layers = [m for m in self.model.modules() if isinstance(m, BaseTunerLayer)]
        for layer in self._tuner_layers:
            layer.enable_adapters(False)
        try:
            yield
        finally:
            for layer in self._tuner_layers:
                layer.enable_adapters(True)

    # -- generating ------------------------------------------------------------------------

    def generate(
        self,
        prompt: str | Messages,
        settings: GenerationSettings | None = None,
        *,
        adapter: bool = True,
        on_text: Callable[[str], None] | None = None,
        should_stop: StopCheck = None,
    ) -> GenerationResult:
        """One answer, streamed to ``on_text`` piece by piece; ``should_stop()`` True cancels it."""
        settings = settings or GenerationSettings()
        stream = _Stream(self, self.prompt_ids(prompt, settings), settings, adapter)
        while not stream.done:
            if should_stop is not None and should_stop():
                stream.cancel()
                break
            piece = stream.step()
            if piece and on_text is not None:
                on_text(piece)
        return stream.result()

    def compare(
        self,
        prompt: str | Messages,
        settings: GenerationSettings | None = None,
        *,
        on_text: Callable[[str, str], None] | None = None,
        should_stop: StopCheck = None,
    ) -> dict[str, GenerationResult]:
        """The base's and the tuned model's answers, generated in turns, one token each.

        ``on_text(side, piece)`` gets each new piece, side being 'base' or 'tuned'.
        Returns ``{'base': result, 'tuned': result}``.
        """
        settings = settings or GenerationSettings()
        ids = self.prompt_ids(prompt, settings)
        streams = {"base": _Stream(self, ids, settings, False), "tuned": _Stream(self, ids, settings, True)}
        while not all(s.done for s in streams.values()):
            if should_stop is not None and should_stop():
                for s in streams.values():
                    s.cancel()
                break
            for side, s in streams.items():
                if s.done:
                    continue
                piece = s.step()
                if piece and on_text is not None:
                    on_text(side, piece)
        return {side: s.result() for side, s in streams.items()}

    def take(self, token: int, ids: list[int], settings: GenerationSettings) -> str | None:
        """Add a sampled ``token`` to an answer's ``ids``; returns why the answer ends ('eos': a stop
        token, not added; 'length': ``max_new_tokens`` reached), or None while it goes on."""
        if token in self.stop_ids:
            return "eos"
        ids.append(token)
        return "length" if len(ids) >= settings.max_new_tokens else None

    def answer_all(
        self,
        prompts: Sequence[str | Messages],
        settings: GenerationSettings | None = None,
        *,
        adapter: bool = True,
        batch_size: int = 64,
        should_stop: StopCheck = None,
    ) -> list[GenerationResult]:
        """Every prompt's answer, ``batch_size`` prompts at a time through one forward pass a token.

        Each answer is what :meth:`generate` gives for its prompt alone (its own sampler, seeded
        alike, its own stop): the prompts are padded on the left and masked. On a CPU a batch of
        36 SmolLM2 answers takes about the time of 12 answered one by one.
        """
        settings = settings or GenerationSettings()
        out: list[GenerationResult] = []
        for start in range(0, len(prompts), batch_size):
            ids = [self.prompt_ids(p, settings) for p in prompts[start : start + batch_size]]
            out += self._answer_batch(ids, settings, adapter, should_stop)
        return out

    def _answer_batch(
        self, prompts: list[list[int]], settings: GenerationSettings, adapter: bool, should_stop: StopCheck
    ) -> list[GenerationResult]:
        import torch  # lazy: torch; GenerationSettings must import without it

        t0 = time.perf_counter()
        width = max(map(len, prompts))
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        inputs = torch.tensor([[pad] * (width - len(p)) + p for p in prompts], device=self.device)
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=self.device)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)  # each prompt counts from 0, as when it is alone
        generators = [torch.Generator().manual_seed(settings.seed) for _ in prompts]
        answers: list[list[int]] = [[] for _ in prompts]
        finish: list[str | None] = [None] * len(prompts)
        elapsed = [0.0] * len(prompts)
        cache: Any = None
        while any(f is None for f in finish):
            if should_stop is not None and should_stop():
                finish = [f or "cancelled" for f in finish]
                break
            with torch.no_grad(), self.adapter_enabled(adapter):
                kw = {self.cache_arg: cache}
                res = self.model(
                    input_ids=inputs,
                    attention_mask=mask,
                    position_ids=positions,
                    use_cache=True,
                    logits_to_keep=1,
                    **kw,
                )
            cache = getattr(res, self.cache_arg, None)
            cache = cache if cache is not None else getattr(res, "past_key_values", None)
            last = res.logits[:, -1].float().cpu()  # one copy from the device a step, not one a row
            nxt = []
            for row, ids in enumerate(answers):
                token = pad
                if finish[row] is None:
                    token = _sample(last[row], settings, generators[row], ids)
                    finish[row] = self.take(token, ids, settings)
                    elapsed[row] = time.perf_counter() - t0
                nxt.append(token)
            inputs = torch.tensor(nxt, device=self.device)[:, None]
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
            positions = positions[:, -1:] + 1
        return [
            GenerationResult(
                text=self.tokenizer.decode(ids, skip_special_tokens=True),
                token_ids=ids,
                finish_reason=f or "cancelled",
                prompt_tokens=len(p),
                elapsed=e,
            )
            for ids, f, p, e in zip(answers, finish, prompts, elapsed, strict=True)
        ]

    def close(self) -> None:
        """Drop the model (and its GPU memory)."""
        import torch  # lazy: torch; GenerationSettings must import without it

        self.model = None
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def _stop_ids(model: Any, tokenizer: Any, template: str) -> set[int]:
    """EOS, the generation config's end tokens, and the template's end-of-turn token."""
    ids: set[int] = set()
    if tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    gen_cfg = getattr(model, "generation_config", None)
    eos = getattr(gen_cfg, "eos_token_id", None)
    for t in eos if isinstance(eos, (list, tuple)) else [eos]:
        if t is not None:
            ids.add(int(t))
    specials = set(getattr(tokenizer, "all_special_tokens", []) or []) | set(tokenizer.get_added_vocab())
    for marker in _TURN_ENDS:
        if marker in specials and marker in template:
            tid = tokenizer.convert_tokens_to_ids(marker)
            if isinstance(tid, int) and tid >= 0:
                ids.add(tid)
    return ids
