"""The calib types and the numerics of each build.

- :mod:`~calib_core.builds.calibtypes`: one :class:`~calib_core.builds.calibtypes.CalibType` spec per
  type; the tasks and flows ask it, so adding a type touches that module plus its numerics.
- :mod:`~calib_core.builds.bias_dark_flat`: bias, dark and flat: per-input processing, flat scales,
  combination.
- :mod:`~calib_core.builds.fringe`: fringe frames.
- :mod:`~calib_core.builds.defects`: defect masks.
- :mod:`~calib_core.builds.ptc`: photon transfer curves (gains, read noise).

Sky frames have their own package, :mod:`calib_core.sky`.
"""
