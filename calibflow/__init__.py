"""calibflow: calibration frames for mosaic CCD cameras as Prefect flows over a pluggable numeric core."""

try:
    from importlib.metadata import version as _version

    __version__ = _version("calibflow")
except Exception:  # running from a source tree that is not installed
    __version__ = "0.1.0"
