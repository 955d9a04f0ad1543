"""calibflow's exceptions: one hierarchy, and the retry policy written out.

Every error calibflow raises on purpose is a :class:`CalibflowError`. Its ``transient`` attribute
says whether trying again can help; :func:`is_retryable` is the one place the tasks' retry
condition asks (docs/architecture.md#resume-and-concurrency):

* bad input (:class:`InputError`: an unreadable raw, a header that lies, a selection with nothing in
  it), a bad configuration (:class:`ConfigError`) and a data condition that makes the computation
  impossible (:class:`DataError`: no good pixels, a dark time of zero) are deterministic: retrying
  gives the same answer, so the build fails (or excludes the input) at once, naming the file;
* :class:`TransientError`, an ``OSError`` (a flaky disk or network file system) and a database
  error the registry classifies as transient (a restarting server, a dropped connection) are
  retried with backoff.

The deterministic classes also derive from ``ValueError`` (and :class:`~calib_core.repository.registry.RegistryError`
from ``RuntimeError``), as they did before the hierarchy existed, so callers that caught those keep
working.
"""

from __future__ import annotations

__all__ = ["CalibflowError", "InputError", "ConfigError", "DataError", "TransientError", "is_retryable"]


class CalibflowError(Exception):
    """Base of every error calibflow raises on purpose."""

    #: whether trying the same thing again can succeed
    transient: bool = False


class InputError(CalibflowError, ValueError):
    """Bad input: a file, a header, a selection of exposures."""


class ConfigError(CalibflowError, ValueError):
    """A configuration (camera file, build config, parameter) that cannot be used."""


class DataError(CalibflowError, ValueError):
    """The data make the computation impossible (no good pixels, no valid scale)."""


class TransientError(CalibflowError):
    """A condition a later attempt can get past."""

    transient = True


def is_retryable(exc: BaseException) -> bool:
    """The retry policy: calibflow's own errors say so themselves; an ``OSError`` is retried; a
    database error is retried when the registry calls it transient; anything else is not."""
    if isinstance(exc, CalibflowError):
        return exc.transient
    if isinstance(exc, OSError):
        return True
    from calib_core.repository import is_transient

    return is_transient(exc)
