"""Instrument signature removal: from a raw detector to an image in electrons.

- :mod:`~calib_core.isr.process`: the ISR of one raw detector (overscan, bias, dark, flat, fringe,
  defects, interpolation) with the calibs the registry found.
- :mod:`~calib_core.isr.cosmicrays`: cosmic-ray finding on one image.
- :mod:`~calib_core.isr.persistent`: cosmic-ray flags that repeat across a dark build's inputs are hot
  pixels, not cosmic rays.
"""
