"""One way to fail: every error the project raises on purpose, by what a retry can do about it.

Each error class of the project subclasses one of four bases, and the exit code follows from
the base alone (:func:`exit_code`), so ``vae``, the DVC stages and the Prefect tasks agree on
what is worth retrying:

- :class:`PermanentError`, exit 1: bad data, a corrupt checkpoint, a NaN loss, an unknown
  registered model; a retry fails the same way. One line says what and where.
- :class:`UsageError`, exit 2: a bad param or argument, found before any work.
- :class:`RetryableError`, exit 75 (``EX_TEMPFAIL``): a server or download out of reach, a lock
  held too long by another process; a later retry may work.
- :class:`Bug`, exit 70 (``EX_SOFTWARE``): a broken invariant, reported with its traceback, as is
  any exception that is none of these.

This module imports nothing, so every room (the model code included) may raise these.
"""

from __future__ import annotations

__all__ = [
    "EXIT_ERROR",
    "EXIT_SOFTWARE",
    "EXIT_TEMPFAIL",
    "EXIT_USAGE",
    "Bug",
    "PermanentError",
    "RetryableError",
    "UsageError",
    "VaeError",
    "exit_code",
]

EXIT_ERROR, EXIT_USAGE, EXIT_SOFTWARE, EXIT_TEMPFAIL = 1, 2, 70, 75


class VaeError(Exception):
    """The common base; raise one of the four below, never this one."""


class PermanentError(VaeError):
    """An expected failure that a retry cannot fix (exit 1)."""


class UsageError(VaeError):
    """A bad param, argument or option (exit 2)."""


class RetryableError(VaeError):
    """Something out of reach for now: a server, a download, a lock (exit 75)."""


class Bug(VaeError):
    """A broken invariant: a bug in this project (exit 70, with the traceback)."""


# Checked in this order: a class with two bases (say, data that is both bad and out of reach)
# takes the code of the first one it has.
_CODES = ((RetryableError, EXIT_TEMPFAIL), (UsageError, EXIT_USAGE), (PermanentError, EXIT_ERROR))


def exit_code(exc: BaseException) -> int:
    """The exit code of ``exc``, by its base class; 70 for a bug or any other exception."""
    for base, code in _CODES:
        if isinstance(exc, base):
            return code
    return EXIT_SOFTWARE
