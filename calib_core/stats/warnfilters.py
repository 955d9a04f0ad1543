"""Warning filters that threads cannot corrupt (docs/architecture.md#warnings-and-threads).

``warnings.catch_warnings`` is not thread-safe in Python before 3.14: it saves the process-wide filter
list on entry and puts it back on exit. Two threads whose blocks interleave (A enters, B enters, A
leaves, B leaves) leave B's filters in place for good: an ``"ignore"`` that hides every later warning,
or an ``"error"`` that turns someone else's warning into an exception. The threads runner processes
two or more inputs at once, and every one of them reads FITS files, writes headers and reduces
arrays that may be all NaN.

So the core changes warning filters only here:

* :func:`filtered_warnings` holds one process-wide lock for the whole block. Blocks run one at a
  time, so each restores exactly the list it found. (A warning another thread raises while a block
  runs still meets that block's filters, so blocks stay short: opening one file, formatting one card.)
* :func:`nanmedian_quiet` and :func:`nanmean_quiet` give NumPy's NaN-ignoring reductions without
  their all-NaN warnings and without touching the filters at all: the slices that are all NaN are
  left out of the call and come back NaN.
"""

from __future__ import annotations

import threading
import warnings
from contextlib import contextmanager
from typing import Iterator

import numpy as np

__all__ = ["filtered_warnings", "nanmedian_quiet", "nanmean_quiet"]

_LOCK = threading.RLock()


@contextmanager
def filtered_warnings(*rules: tuple[str, type[Warning]], record: bool = False) -> Iterator[list | None]:
    """``warnings.catch_warnings(record=record)`` with ``warnings.simplefilter(action, category)``
    for each ``(action, category)`` of ``rules`` (later rules win, as with ``simplefilter``), under a
    process-wide lock. Yields the list of caught warnings with ``record``, else None."""
    with _LOCK, warnings.catch_warnings(record=record) as caught:
        for action, category in rules:
            warnings.simplefilter(action, category)
        yield caught


def _nan_reduce(func, a, axis):
    a = np.asarray(a)
    if axis is None:
        if a.size and not np.isnan(a).all():
            return func(a)
        return (np.float64(np.nan) if not np.issubdtype(a.dtype, np.floating) else a.dtype.type(np.nan))
    empty = np.isnan(a).all(axis=axis)
    if not empty.any():
        return func(a, axis=axis)
    moved = np.moveaxis(a, axis, -1)
    has = ~empty
    part = func(moved[has], axis=-1) if has.any() else None
    dtype = part.dtype if part is not None else (a.dtype if np.issubdtype(a.dtype, np.floating) else np.float64)
    out = np.full(empty.shape, np.nan, dtype=dtype)
    if part is not None:
        out[has] = part
    return out[()] if out.ndim == 0 else out


def nanmedian_quiet(a, axis: int | None = None):
    """``np.nanmedian(a, axis)`` without the all-NaN-slice warning: such slices give NaN, the others
    exactly NumPy's value."""
    return _nan_reduce(np.nanmedian, a, axis)


def nanmean_quiet(a, axis: int | None = None):
    """``np.nanmean(a, axis)`` without the empty-slice warning: all-NaN slices give NaN, the others
    exactly NumPy's value (its own steps: NaN replaced by 0, summed, divided by the count, in the
    input's float type)."""
    a = np.asarray(a)
    if not np.issubdtype(a.dtype, np.inexact):
        return np.mean(a, axis=axis)
    mask = np.isnan(a)
    arr = a.copy()
    np.copyto(arr, 0, where=mask)
    tot = np.sum(arr, axis=axis)
    cnt = np.sum(~mask, axis=axis, dtype=np.intp)
    with np.errstate(invalid="ignore", divide="ignore"):     # thread-local in NumPy's error state
        if isinstance(tot, np.ndarray):
            return np.true_divide(tot, cnt, out=tot, casting="unsafe")
        return tot.dtype.type(tot / cnt)
