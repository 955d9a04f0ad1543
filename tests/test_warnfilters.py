"""Warning filters under threads (calib_core.stats.warnfilters, docs/architecture.md#warnings-and-threads).

The truth for the quiet reductions is NumPy's own ``nanmedian``/``nanmean`` (their warnings silenced
in the test); the truth for the thread test is the process's filter list as it was before the threads
ran. Against the code before this change (bare ``warnings.catch_warnings`` blocks in ``_open``,
``_pixels`` and ``_comment_fits``) the thread test fails: interleaved blocks leave a thread's filters
behind.
"""

from __future__ import annotations

import sys
import threading
import warnings

import numpy as np
import pytest
from astropy.io import fits

from calib_core.io import raw as rawio
from calib_core.io.products import _header_with
from calib_core.stats.warnfilters import filtered_warnings, nanmean_quiet, nanmedian_quiet


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("shape,axis", [((7, 50), 0), ((7, 50), 1), ((30, 5, 4), 0), ((30, 5, 4), 2),
                                        ((2000, 40), 1), ((3, 700), 1), ((40,), 0), ((40,), None),
                                        ((6, 6), None)])
@pytest.mark.parametrize("empty", ["none", "some", "all"])
def test_quiet_reductions_are_numpys_values_without_a_warning(dtype, shape, axis, empty):
    rng = np.random.default_rng(hash((shape, axis, empty)) % 2**32)
    a = rng.normal(size=shape).astype(dtype)
    a[rng.random(shape) < 0.4] = np.nan
    if empty == "all":
        a[...] = np.nan
    elif empty == "some" and len(shape) > 1 and axis is not None:
        idx = [slice(None)] * len(shape)
        idx[1 if axis != 1 else 0] = 0          # one whole slice along the reduced axis is NaN
        a[tuple(idx)] = np.nan
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        want_median, want_mean = np.nanmedian(a, axis=axis), np.nanmean(a, axis=axis)
    with warnings.catch_warnings():
        warnings.simplefilter("error")          # any warning fails the test
        got_median, got_mean = nanmedian_quiet(a, axis), nanmean_quiet(a, axis)
    for want, got in ((want_median, got_median), (want_mean, got_mean)):
        assert type(got) is type(want)
        assert np.asarray(got).dtype == np.asarray(want).dtype
        np.testing.assert_array_equal(got, want)        # bit for bit, NaN where NumPy gives NaN


def test_filtered_warnings_apply_in_order_and_record():
    with filtered_warnings(("ignore", UserWarning), record=True) as caught:
        warnings.warn("hidden", UserWarning)
        warnings.warn("seen", DeprecationWarning)
    assert [str(w.message) for w in caught] == ["seen"]
    with pytest.raises(RuntimeWarning):
        with filtered_warnings(("ignore", Warning), ("error", RuntimeWarning)):
            warnings.warn("an error now", RuntimeWarning)


def test_threads_never_leave_their_warning_filters_behind(tmp_path):
    """Threads that open FITS files (``raw._open``: an error filter), read their pixels
    (``raw._pixels``: ignore all) and format header cards (``_comment_fits``: record all) over and
    over, with the interpreter switching threads every microsecond, leave the process's filter list
    exactly as it was."""
    path = tmp_path / "x.fits"
    fits.HDUList([fits.PrimaryHDU(), fits.ImageHDU(np.arange(64, dtype=np.uint16).reshape(8, 8),
                                                   name="D")]).writeto(path)
    cards = {"CALIB_INPUT_0": ("x" * 60, "an input of the product, with a comment far too long to fit"),
             "EXPTIME": 30.0}
    before = list(warnings.filters)
    errors: list[BaseException] = []
    start = threading.Barrier(4)

    def work():
        try:
            start.wait()
            for _ in range(300):
                with rawio._open(str(path)) as hdul:
                    rawio._pixels(str(path), hdul, "D")
                _header_with(cards)
        except BaseException as exc:       # noqa: BLE001 - reported below
            errors.append(exc)

    old = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    try:
        threads = [threading.Thread(target=work) for _ in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    finally:
        sys.setswitchinterval(old)
    assert not errors, errors
    assert warnings.filters == before, "a thread's warning filters were left in the process's list"
