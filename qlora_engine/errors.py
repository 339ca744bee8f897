"""Errors a user can hit, each with a message written for that user.

Internal errors keep their own types and tracebacks; everything here is something the
user can fix (a bad value, a missing file, a model that needs a switch) and its message
says what and how.
"""

from __future__ import annotations


class QLoRAError(Exception):
    """Base of the errors a user can act on. ``hint`` is an optional next step."""

    def __init__(self, message: str, *, hint: str | None = None) -> None:
        super().__init__(message)
        self.hint = hint


class ConfigError(QLoRAError, ValueError):
    """A configuration value is not acceptable; the message names the field and the value."""


class ModelError(QLoRAError):
    """The model cannot be found, read or used safely."""


class DataError(QLoRAError, ValueError):
    """The dataset cannot be read or yields no usable rows; the message names the file and line."""


class ResumeError(QLoRAError):
    """A checkpoint cannot be resumed (missing, incomplete or from a different setup)."""


class RunLockedError(QLoRAError):
    """Another live run holds the output folder."""


class TrainingDiverged(QLoRAError):
    """The loss became NaN or infinite."""


class DiskFullError(QLoRAError, OSError):
    """No space left while writing a checkpoint, an adapter or an export."""
