"""calib_core: the domain and numeric core of calibflow (never imports Prefect).

Usable as a plain library from a notebook: camera definitions (:mod:`calib_core.camera`), raw FITS
reading (:mod:`calib_core.io.raw`), masked images, statistics, stacking, ISR, backgrounds, the
focal-plane background, sky frames, the simulator, the registry and the datastore.
"""
