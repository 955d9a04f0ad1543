"""Files in and out: raw exposures and calibflow's own FITS products.

- :mod:`~calib_core.io.raw`: multi-extension raw FITS into per-detector, per-amplifier arrays.
- :mod:`~calib_core.io.products`: product and intermediate files (IMAGE, MASK, UNCERT extensions).
- :mod:`~calib_core.io.productmeta`: how products describe themselves (units, focal-plane WCS).
- :mod:`~calib_core.io.atomic`: atomic writes, and the sweep of what a killed writer left.
- :mod:`~calib_core.io.recycle`: new files written over retired intermediates' cached pages.
"""

import os


def env_megabytes(name: str, default_mb: float) -> int:
    """Bytes from the environment variable ``name``, given in megabytes (``default_mb`` when unset or
    blank; negative values count as 0); a value that is not a number is an
    :class:`~calib_core.errors.InputError` naming the variable."""
    value = os.environ.get(name, "").strip()
    try:
        mb = float(value) if value else default_mb
    except ValueError:
        from calib_core.errors import InputError

        raise InputError(f"{name}={value!r}: expected a number of megabytes") from None
    return max(0, int(mb * 2**20))
