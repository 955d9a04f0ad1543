"""Statistics on pixels: the numbers every build rests on.

- :mod:`~calib_core.stats.clipped`: clipped statistics with the reference's semantics (MEANCLIP,
  MEDIAN, ...) for one array or per pixel of a stack.
- :mod:`~calib_core.stats.binned`: the same statistics per box of a masked image.
- :mod:`~calib_core.stats.background`: binned background models (measure, interpolate, evaluate).
- :mod:`~calib_core.stats.stack`: the stacking engine (N inputs of one detector, per pixel, within a
  memory budget).
- :mod:`~calib_core.stats._kernels`: the numba kernels under them, each checked against a NumPy
  reference in the tests.
- :mod:`~calib_core.stats.warnfilters`: warning filters that threads cannot corrupt, and NumPy's
  NaN-ignoring reductions without their all-NaN warnings.
"""
