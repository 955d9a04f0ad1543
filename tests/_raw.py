"""Raw-frame arithmetic the tests write out themselves (independent of ISR), shared by test modules."""

from __future__ import annotations

import numpy as np


def corrected(rd) -> np.ndarray:
    """Assembled data of one RawDetector minus the per-row median of each amplifier's overscan
    (written out here, not ISR's, so that ISR is checked against it); NaN where no amplifier lands."""
    out = np.full(rd.shape, np.nan)
    for a in rd.amps:
        level = np.median(a.overscan[:, a.amp.overscan_margin:], axis=1)
        d = a.data - level[:, None]
        if a.flip_x:
            d = d[:, ::-1]
        if a.flip_y:
            d = d[::-1, :]
        out[a.det_slices] = d
    return out
