"""The visd error family.

Every error visd raises on bad input is a :class:`VisdError`; each subclass also inherits
the matching built-in so ``except ValueError`` keeps working. Messages follow one shape:
what was wrong, the offending value, what was expected, how to fix it.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable

__all__ = [
    "VisdError",
    "ConfigError",
    "InputError",
    "WeightsNotFoundError",
    "CheckpointMismatchError",
    "MissingDependencyError",
    "HubAuthError",
    "did_you_mean",
]


class VisdError(Exception):
    """Base class of every error raised by visd."""


class ConfigError(VisdError, ValueError):
    """A configuration value or file is invalid."""


class InputError(VisdError, ValueError):
    """User data (a scan, a mask, a table, a prompt) is invalid."""


class WeightsNotFoundError(VisdError, FileNotFoundError):
    """A model folder, Hub repository or weight file could not be found."""


class CheckpointMismatchError(VisdError, RuntimeError):
    """Weights do not fit the model they are loaded into."""


class MissingDependencyError(VisdError, ImportError):
    """An optional dependency needed for this feature is not installed."""


class HubAuthError(VisdError, PermissionError):
    """The Hugging Face Hub refused a write: no token, or a token without write access."""


def did_you_mean(value: str, choices: Iterable[str]) -> str:
    """Return ``" Did you mean 'x'?"`` for the closest choice, or ``""`` when none is close."""
    close = difflib.get_close_matches(str(value), [str(c) for c in choices], n=1, cutoff=0.6)
    return f" Did you mean {close[0]!r}?" if close else ""
