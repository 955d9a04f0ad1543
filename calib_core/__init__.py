"""calib_core: the domain and numeric core of calibflow (never imports Prefect).

Usable as a plain library from a notebook. By concern (docs/architecture.md#package-layout):
:mod:`calib_core.io` (raw and product FITS), :mod:`calib_core.stats` (clipped and binned statistics,
backgrounds, stacking), :mod:`calib_core.isr`, :mod:`calib_core.builds` (one spec per calib type and
each type's numerics), :mod:`calib_core.sky` (sky frames), :mod:`calib_core.quality` (verification,
the night report, mosaics), :mod:`calib_core.repository` (the registry and the datastore: the only
package that talks to the database) and :mod:`calib_core.simulate`. Shared by all of them:
:mod:`calib_core.camera`, :mod:`calib_core.maskedimage`, :mod:`calib_core.configmodel` and
:mod:`calib_core.errors`.
"""
