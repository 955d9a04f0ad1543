"""Hot pixels are not cosmic rays: clear CR flags that repeat across the inputs of a dark build.

The per-exposure cosmic-ray finder cannot tell a hot pixel from a cosmic ray, so it flags hot pixels
in every dark. Cosmic rays do not repeat at the same pixel; a pixel flagged CR in at least
``min_fraction`` of the inputs is a fixed defect whose signal the dark must keep. This runs at the
combine barrier, streaming one mask at a time (memory: one int16 count image).
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
from astropy.io import fits

from .maskedimage import MASK_PLANES
from .products import read_product, write_product

__all__ = ["clear_persistent_cr"]


def clear_persistent_cr(paths: Sequence[str | Path], min_fraction: float = 0.5, min_count: int = 2) -> int:
    """Clear the CR bit, in every input file, at pixels flagged CR in >= ``min_fraction`` of them.

    Returns the number of pixels cleared. Files are rewritten atomically only when something changes.
    """
    cr = MASK_PLANES.bit("CR")
    count = None
    for p in paths:
        with fits.open(p, memmap=False) as hdul:
            m = np.asarray(hdul["MASK"].data)
        flagged = (m & cr) != 0
        count = flagged.astype(np.int16) if count is None else count + flagged
    if count is None:
        return 0
    threshold = max(min_count, int(np.ceil(min_fraction * len(paths))))
    persistent = count >= threshold
    n = int(persistent.sum())
    if n:
        for p in paths:
            mi, header = read_product(p)
            if (mi.mask[persistent] & cr).any():
                mi.mask[persistent] &= ~np.int32(cr)
                with fits.open(p, memmap=False) as hdul:       # keep the unit the intermediate declares
                    unit = hdul["IMAGE"].header.get("BUNIT") if "IMAGE" in hdul else None
                write_product(p, mi, {k: header[k] for k in ("EXPID", "DETECTOR", "OBSTYPE") if k in header},
                              unit=unit)
    return n
