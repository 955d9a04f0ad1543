"""Sky frames: the camera's response to the night sky, built across the focal plane.

- :mod:`~calib_core.sky.frames`: build and apply sky frames (the two-pass focal-plane solve).
- :mod:`~calib_core.sky.objectmask`: object masking of each input.
- :mod:`~calib_core.sky.focalplane`: the focal-plane background (the legacy method).
- :mod:`~calib_core.sky.streaks`: satellite trails across the focal plane.
- :mod:`~calib_core.sky.heldout`: the quality of a sky frame, scored on held-out exposures.
"""
