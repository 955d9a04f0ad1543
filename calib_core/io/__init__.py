"""Files in and out: raw exposures and calibflow's own FITS products.

- :mod:`~calib_core.io.raw`: multi-extension raw FITS into per-detector, per-amplifier arrays.
- :mod:`~calib_core.io.products`: product and intermediate files (IMAGE, MASK, UNCERT extensions).
- :mod:`~calib_core.io.productmeta`: how products describe themselves (units, focal-plane WCS).
- :mod:`~calib_core.io.atomic`: atomic writes, and the sweep of what a killed writer left.
"""
