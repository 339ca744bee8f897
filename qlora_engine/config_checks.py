"""The pieces each config section validates itself with (peft-style ``__post_init__``).

A section dataclass (``LoraSettings``, ``OptimConfig``, ...) names itself with ``SECTION`` and
lists its rules in ``_check(c)`` on a :class:`Checks`; :class:`Section` runs them on
construction and raises one :class:`~qlora_engine.errors.ConfigError` holding *every* bad
field as a :class:`~qlora_engine.errors.Problem` (its ``field`` the full path, ``lora.rank``),
so a form can mark all of them at once. The rules say what is allowed in the message itself
("use a whole number from 1 to 4096"), values are shown through a bounded ``repr`` (an error
about a huge value must not itself be huge), and no float field can be NaN or infinite.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
import re
import reprlib
import types
import typing
from pathlib import Path
from typing import Any, ClassVar, Literal

from qlora_engine.errors import ConfigError, Problem

MAX_TEXT = 4096
"""Longest path, id or name a config field takes (a longer one is a paste gone wrong)."""
MAX_LAYER = 100_000

_repr = reprlib.Repr()
_repr.maxstring = _repr.maxother = 60
_repr.maxlist = _repr.maxdict = _repr.maxtuple = _repr.maxset = 6
_repr.maxlevel = 3


def show(value: Any) -> str:
    """A value as the user wrote it, cut short: never the whole of a huge one."""
    if isinstance(value, float) and not math.isfinite(value):
        return {math.inf: ".inf", -math.inf: "-.inf"}.get(value, ".nan")  # as YAML writes them
    return _repr.repr(value)


@functools.cache
def hints_of(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def type_ok(value: Any, tp: Any) -> bool:
    """Whether ``value`` fits the annotation ``tp`` (bools are not numbers here)."""
    origin = typing.get_origin(tp)
    if tp is Any:
        return True
    if origin is Literal:
        return any(value == a and type(value) is type(a) for a in typing.get_args(tp))
    if origin in (typing.Union, types.UnionType):
        return any(type_ok(value, a) for a in typing.get_args(tp))
    if tp is type(None):
        return value is None
    if tp is bool:
        return isinstance(value, bool)
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if tp is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if origin is list:
        (item,) = typing.get_args(tp)
        return isinstance(value, list) and all(type_ok(v, item) for v in value)
    if origin is dict:
        k, v = typing.get_args(tp)
        return isinstance(value, dict) and all(type_ok(a, k) and type_ok(b, v) for a, b in value.items())
    if isinstance(tp, type):
        return isinstance(value, tp)
    return True


def describe(tp: Any) -> str:
    """An annotation in words: "one of 'nf4', 'fp4'", "int or null"."""
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin in (typing.Union, types.UnionType):
        return " or ".join(describe(a) for a in typing.get_args(tp))
    if tp is type(None):
        return "null"
    if origin is list:
        return f"a list of {describe(typing.get_args(tp)[0])}"
    if origin is dict:
        return "a mapping of names to text"
    return {"int": "a whole number", "float": "a number", "str": "text", "bool": "true or false"}.get(
        getattr(tp, "__name__", ""), str(tp)
    )


def _num(x: float) -> str:
    return f"{x:,}" if isinstance(x, int) and abs(x) >= 100_000 else f"{x:g}"


class Checks:
    """The problems found in one section; each rule is skipped for a field whose type is wrong."""

    def __init__(self, obj: Any) -> None:
        self.obj = obj
        self.section: str = obj.SECTION
        self.found: list[Problem] = []
        self.bad: set[str] = set()
        hints = hints_of(type(obj))
        for f in dataclasses.fields(obj):
            value, tp = getattr(obj, f.name), hints[f.name]
            if not type_ok(value, tp):
                self.add(f.name, f"{show(value)} is not allowed; expected {describe(tp)}")
            elif isinstance(value, str):
                self.text(f.name, value, getattr(obj, "TEXT_LIMITS", {}).get(f.name, MAX_TEXT))

    def add(self, name: str, what: str, fix: str | None = None) -> None:
        self.found.append(Problem(what, field=f"{self.section}.{name}", fix=fix))
        self.bad.add(name)

    def text(self, name: str, value: str, limit: int = MAX_TEXT) -> None:
        if "\x00" in value:
            self.add(name, "contains a NUL character, which no path or name can hold")
        elif len(value) > limit:
            self.add(name, f"is {len(value):,} characters long; at most {limit:,} are accepted")

    def need(self, name: str, ok: bool, allowed: str, fix: str | None = None) -> None:
        """Unless the field's type was already wrong: ``ok`` or a problem "VALUE is not allowed; ALLOWED"."""
        if name not in self.bad and not ok:
            self.add(name, f"{show(getattr(self.obj, name))} is not allowed; {allowed}", fix)

    def number(
        self,
        name: str,
        lo: float,
        hi: float,
        *,
        above: bool = False,
        below: bool = False,
        null: str | None = None,
        typical: str = "",
    ) -> None:
        """A finite number in ``[lo, hi]`` (``above``/``below``: the bound itself excluded);
        ``null``: what null means, if null is allowed."""
        if name in self.bad:
            return
        value = getattr(self.obj, name)
        if value is None and null is not None:
            return
        whole = hints_of(type(self.obj))[name] in (int, int | None)
        low = f"greater than {_num(lo)}" if above else f"at least {_num(lo)}"
        high = f"less than {_num(hi)}" if below else f"at most {_num(hi)}"
        allowed = f"a {'whole ' if whole else ''}number {low} and {high}"
        if null is not None:
            allowed = f"null ({null}) or {allowed}"
        if typical:
            allowed += f" ({typical})"
        if isinstance(value, float) and not math.isfinite(value):
            self.add(name, f"{show(value)} is not a finite number; use {allowed}")
            return
        ok = (value > lo if above else value >= lo) and (value < hi if below else value <= hi)
        if not ok:
            self.add(name, f"{show(value)} is out of range; use {allowed}")

    def done(self) -> list[Problem]:
        """The problems, plus any float field left NaN or infinite by a section that forgot a rule."""
        hints = hints_of(type(self.obj))
        for f in dataclasses.fields(self.obj):
            value = getattr(self.obj, f.name)
            if f.name not in self.bad and isinstance(value, float) and not math.isfinite(value):
                self.add(f.name, f"{show(value)} is not a finite number; expected {describe(hints[f.name])}")
        return self.found


class Section:
    """Base of the config sections: each validates itself when built (see the module docstring)."""

    SECTION: ClassVar[str] = ""

    def __post_init__(self) -> None:
        raise_problems(self.problems())

    def problems(self) -> list[Problem]:
        """Every bad field of this section (empty: the section is valid)."""
        c = Checks(self)
        self._check(c)
        return c.done()

    def _check(self, c: Checks) -> None:  # the section's own rules
        pass


def raise_problems(problems: list[Problem], *, file: Any = None) -> None:
    """One ConfigError for all ``problems`` (the first one's field and text lead); none: return."""
    if not problems:
        return
    first = problems[0]
    raise ConfigError(
        first.what, field=first.field, file=file or first.file, line=first.line, fix=first.fix, problems=problems
    )


_RANGE_RE = re.compile(r"^\s*\d+\s*(-\s*\d+\s*)?(,\s*\d+\s*(-\s*\d+\s*)?)*$")


def parse_layers(spec: str | None) -> list[int] | None:
    """'0-3,6' -> [0, 1, 2, 3, 6]; None -> None (all layers).

    Raises:
        ConfigError: ``field`` is ``lora.layers``.
    """
    if spec is None:
        return None
    spec = str(spec)
    if len(spec) > 1000 or not _RANGE_RE.match(spec):
        raise ConfigError(f"{show(spec)} is not a layer range; write e.g. '0-11' or '0,2,4-7'.", field="lora.layers")
    out: set[int] = set()
    for part in spec.split(","):
        a, _, b = part.partition("-")
        lo, hi = int(a), int(b or a)
        if hi < lo:
            raise ConfigError(
                f"range {part.strip()!r} runs backwards; write the lower number first.", field="lora.layers"
            )
        if hi > MAX_LAYER:
            raise ConfigError(f"layer {hi:,} is past any model (at most {MAX_LAYER:,}).", field="lora.layers")
        out.update(range(lo, hi + 1))
    return sorted(out)


# -- checks of a whole config against the machine and the data --------------------------------
# These take a TrainConfig (typed Any: this module is below qlora_engine.config, never beside it).


def check_output_dir(cfg: Any) -> Path:
    """The run folder, if it is (or can be made) a writable folder; else a ConfigError on ``output.dir``."""
    out = cfg.output_dir
    probe = out
    while not probe.exists() and probe.parent != probe:
        probe = probe.parent
    if probe.exists() and not probe.is_dir():
        what = "is a file, not a folder" if probe == out else f"cannot be made: {probe} is a file, not a folder"
        raise ConfigError(
            f"{out} {what}; nothing was written.", field="output.dir", file=probe, fix="Name a folder for the run."
        )
    if not os.access(probe, os.W_OK | os.X_OK):
        raise ConfigError(
            f"{out} cannot be written: {probe} is read-only for this user; nothing was written.",
            field="output.dir",
            file=probe,
            fix="Choose a folder you can write to.",
        )
    return out


def run_warnings(cfg: Any, total_steps: int, n_train: int) -> list[Problem]:
    """Settings that are legal but cannot do what they say for this data (each names its field)."""
    out = []
    # A warmup as long as the run is not warned of here: the optimizer scales it to a tenth of the
    # run and says so, naming optim.warmup_steps (qlora_engine.optim.warmup_for).
    per_step = cfg.train.micro_batch_size * cfg.train.gradient_accumulation_steps
    if per_step > n_train > 0:
        out.append(
            Problem(
                f"one optimizer step takes {per_step:,} samples (micro_batch_size x gradient_accumulation_steps) "
                f"but the data has {n_train:,}: each step sees samples more than once.",
                field="train.gradient_accumulation_steps",
                fix=f"Lower it to at most {max(1, n_train // cfg.train.micro_batch_size):,}, or add data.",
            )
        )
    return out
