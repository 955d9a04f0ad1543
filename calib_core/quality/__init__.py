"""What decides and shows whether a product is good.

- :mod:`~calib_core.quality.verify`: verification of a candidate before certification, and screening
  of inputs before stacking.
- :mod:`~calib_core.quality.report`: the morning report (metric trends, focal-plane maps, one page
  per night).
- :mod:`~calib_core.quality.mosaic`: binned focal-plane mosaics of per-detector images.
"""
