"""Errors a user can hit, as data: what went wrong, where, and what to do.

Every error here is something the user can act on (a bad value, a missing or damaged file, a
model that needs a switch, a full disk). Like pydantic's ``ValidationError`` records, each
carries its parts as attributes, and callers branch on those, never on the text:

- ``what``: the problem in words, for the user;
- ``field``: the config field path (``lora.rank``), if a field is at fault;
- ``file`` and ``line``: the file (and 1-based line) at fault;
- ``checkpoint``: the checkpoint folder at fault;
- ``fix``: what to do (``hint`` is its older name);
- ``problems``: every problem found, when a check found several (a config with three bad
  fields): each a :class:`Problem`, the first one also the error's own ``field``/``what``.

``str(error)`` is :func:`render`: the one place an error becomes text. It leads with the place
(``file:line: checkpoint: field: what``), so a message reads the same in the terminal, the app
and the run's log. :meth:`QLoRAError.to_dict` and :func:`from_dict` carry an error across the
event stream (``RunFailed.error``) and back to its type, so the app gets the attributes, not
a sentence to parse.

Internal errors (bugs) keep their own types and tracebacks; the CLI writes those to a log file.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, ClassVar


@dataclass(frozen=True)
class Problem:
    """One thing wrong: where (a field, or a file and line) and what, and optionally the fix."""

    what: str
    field: str | None = None
    file: str | None = None
    line: int | None = None
    fix: str | None = None

    def __str__(self) -> str:
        return _place(self.file, self.line, None, self.field) + self.what


def _place(file: Any, line: int | None, checkpoint: Any, field: str | None) -> str:
    parts = []
    if file:
        parts.append(f"{file}:{line}" if line else str(file))
    if checkpoint and str(checkpoint) != str(file or ""):
        parts.append(str(checkpoint))
    if field:
        parts.append(field)
    return "".join(f"{p}: " for p in parts)


_PARTS = ("field", "file", "line", "checkpoint", "fix")  # what to_dict and from_dict carry besides what and problems


class QLoRAError(Exception):
    """Base of the errors a user can act on (see the module docstring for the attributes)."""

    exit_code: ClassVar[int] = 2
    """What the CLI exits with when this error ends a command."""

    def __init__(
        self,
        what: str,
        *,
        field: str | None = None,
        file: Any = None,
        line: int | None = None,
        checkpoint: Any = None,
        fix: str | None = None,
        hint: str | None = None,
        problems: list[Problem] | None = None,
    ) -> None:
        self.what = what
        self.field = field
        self.file = str(file) if file is not None else None
        self.line = line
        self.checkpoint = str(checkpoint) if checkpoint is not None else None
        self.fix = fix if fix is not None else hint
        self.problems: list[Problem] = list(problems or [])
        super().__init__(what)

    @property
    def hint(self) -> str | None:
        """The older name of :attr:`fix`."""
        return self.fix

    def __str__(self) -> str:
        return render(self)

    def __reduce__(self) -> tuple[Any, tuple[dict[str, Any]]]:  # pickles with its attributes
        return from_dict, (self.to_dict(),)

    def to_dict(self) -> dict[str, Any]:
        parts = {name: getattr(self, name) for name in ("what", *_PARTS)}
        return {"type": type(self).__name__, **parts, "problems": [asdict(p) for p in self.problems]}


def render(e: QLoRAError) -> str:
    """The one line the user reads first: the place, then what went wrong (and how many more)."""
    text = _place(e.file, e.line, e.checkpoint, e.field) + e.what
    more = len(e.problems) - 1
    if more > 0:
        text += f" (and {more} more problem{'s' if more > 1 else ''})"
    return text


class ConfigError(QLoRAError, ValueError):
    """A configuration value is not acceptable; ``field`` names it (``problems``: every bad field)."""


class ModelError(QLoRAError):
    """The model cannot be found, read or used safely."""


class DataError(QLoRAError, ValueError):
    """The dataset cannot be read or yields no usable rows; ``file`` and ``line`` name where."""


class ResumeError(QLoRAError):
    """A checkpoint cannot be resumed (missing, damaged, or from a different setup)."""


class RunLockedError(QLoRAError):
    """Another live run holds the output folder."""


class TrainingDiverged(QLoRAError):
    """The loss became NaN or infinite."""


class DiskFullError(QLoRAError, OSError):
    """No space left (ENOSPC) or a file-size limit reached (EFBIG) while writing; ``file`` names where."""


class WriteError(QLoRAError):
    """A folder the engine must write cannot be written (read-only, no permission, a file in the way);
    ``file`` (and ``field``, for ``output.dir``) name it."""


class ExportError(QLoRAError):
    """An export cannot be made as asked (the output exists, the format does not fit the model...)."""


class ExportCancelled(QLoRAError):
    """The user cancelled an export; the temporary folder was removed and nothing was written."""


class DistributedError(QLoRAError):
    """A process of a multi-process run died or stopped answering; ``what`` names its rank."""


ERROR_TYPES: dict[str, type[QLoRAError]] = {
    cls.__name__: cls
    for cls in (
        QLoRAError, ConfigError, ModelError, DataError, ResumeError, RunLockedError, TrainingDiverged, DiskFullError,
        WriteError, ExportError, ExportCancelled, DistributedError,
    )
}  # fmt: skip


def from_dict(d: dict[str, Any]) -> QLoRAError:
    """The error that :meth:`QLoRAError.to_dict` wrote, as its type (an unknown type: QLoRAError)."""
    cls = ERROR_TYPES.get(str(d.get("type")), QLoRAError)
    problems = [Problem(**p) for p in d.get("problems") or [] if isinstance(p, dict)]
    return cls(str(d.get("what", "")), **{name: d.get(name) for name in _PARTS}, problems=problems)
