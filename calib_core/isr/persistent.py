"""Hot pixels are not cosmic rays: clear CR flags that repeat across the inputs of a dark build.

The per-exposure cosmic-ray finder cannot tell a hot pixel from a cosmic ray, so it flags hot pixels
in every dark. Cosmic rays do not repeat at the same pixel; a pixel flagged CR in at least
``min_fraction`` of the inputs is a fixed defect whose signal the dark must keep. This runs at the
combine barrier, streaming one file at a time (memory: an int16 count and a float32 minimum image).

With few inputs the count alone is not enough: the grown flags of two cosmic rays in different
inputs overlap a few times a night (4 darks of a 6-CCD camera), and now and then the tracks
themselves cross the same pixel. Such a pixel is flagged in 2 of 4 inputs, looks like a hot pixel,
and clearing it puts both cosmic rays into a stack that cannot clip two of four values (30-190
sigma pixels in the master dark, measured against the simulator's injected cosmic rays). So a flag
is cleared only where the input's value agrees with the pixel's minimum over all inputs within
``nsigma`` of the noise: a hot pixel is high in every input, a cosmic ray only in its own.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
from astropy.io import fits

from calib_core.io.products import read_product, write_product
from calib_core.maskedimage import MASK_PLANES

__all__ = ["clear_persistent_cr"]


def clear_persistent_cr(paths: Sequence[str | Path], min_fraction: float = 0.5, min_count: int = 2,
                        nsigma: float = 5.0) -> int:
    """Clear the CR bit, in every input file, at pixels flagged CR in >= ``min_fraction`` of them
    (and >= ``min_count``), in each input where the pixel's value is within ``nsigma`` of the noise
    of the lowest value any input has there.

    The noise of a difference is ``sqrt(2 * variance)`` of the flagged input (the minimum's input
    has about the same variance when the pixel is hot, a smaller one when a cosmic ray is in the
    flagged input); where the variance plane is not usable (<= 0, not finite) the flag is cleared as
    by the count alone.

    Returns the number of pixels cleared in at least one input. Files are rewritten atomically only
    when something changes.
    """
    cr = MASK_PLANES.bit("CR")
    count = lowest = None
    for p in paths:
        with fits.open(p, memmap=False) as hdul:
            m = np.asarray(hdul["MASK"].data)
            img = np.asarray(hdul["IMAGE"].data, np.float32)
        flagged = (m & cr) != 0
        count = flagged.astype(np.int16) if count is None else count + flagged
        lowest = img.copy() if lowest is None else np.fmin(lowest, img)
    if count is None:
        return 0
    threshold = max(min_count, int(np.ceil(min_fraction * len(paths))))
    persistent = count >= threshold
    if not persistent.any():
        return 0
    ys, xs = np.nonzero(persistent)
    low = lowest[ys, xs].astype(np.float64)
    cleared = np.zeros(ys.size, bool)
    for p in paths:
        mi, header = read_product(p)
        flagged = (mi.mask[ys, xs] & cr) != 0
        var = mi.variance[ys, xs].astype(np.float64)
        usable = np.isfinite(var) & (var > 0)
        with np.errstate(invalid="ignore"):
            agrees = mi.image[ys, xs] - low <= nsigma * np.sqrt(2.0 * np.where(usable, var, 0.0))
        clear = flagged & (agrees | ~usable)
        if clear.any():
            mi.mask[ys[clear], xs[clear]] &= ~np.int32(cr)
            cleared |= clear
            with fits.open(p, memmap=False) as hdul:       # keep the unit the intermediate declares
                unit = hdul["IMAGE"].header.get("BUNIT") if "IMAGE" in hdul else None
            write_product(p, mi, {k: header[k] for k in ("EXPID", "DETECTOR", "OBSTYPE") if k in header},
                          unit=unit, compact_mask=True)
    return int(cleared.sum())
