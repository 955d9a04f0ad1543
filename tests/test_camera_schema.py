"""Camera schema: per-camera ISR defaults, load-time checks (each names the file and the field), and
the richer header mapping (values from several keys, header-dependent gains, HDUs to ignore)."""

import textwrap

import numpy as np
import pytest
from astropy.io import fits

from calib_core.calibs import BiasConfig, DarkConfig, process_bias
from calib_core.camera import CameraError, effective_config, load_camera
from calib_core.rawio import read_raw

ROWS = 20

CAM = f"""
name: drifty
detectors:
  - id: 0
    name: d0
    hdu: 0
    amplifiers:
      - {{name: A, data_section: '[1:10,1:{ROWS}]', overscan_section: '[11:14,1:{ROWS}]',
         detector_section: '[1:10,1:{ROWS}]', gain: 1.5, read_noise: 4.0}}
metadata:
  obs_type:
    - {{key: OBSTYPE, pattern: bias, value: bias}}
"""


def _write(tmp_path, text, name="cam.yaml"):
    p = tmp_path / name
    p.write_text(textwrap.dedent(text))
    return p


def _drifting_bias(path):
    """A bias whose level drifts along the rows (data and overscan alike): 1000 + 5 * row ADU."""
    rows = np.arange(ROWS, dtype=np.float32)[:, None]
    pix = np.broadcast_to(1000.0 + 5.0 * rows, (ROWS, 14)).astype(np.float32)
    hdu = fits.PrimaryHDU(pix)
    hdu.header.update({"OBSTYPE": "bias", "EXPTIME": 0.0, "DATE-OBS": "2026-11-20T03:00:00"})
    hdu.writeto(path)
    return path


def test_camera_isr_defaults_reach_isr(tmp_path):
    """A camera whose overscan drifts row by row sets MEDIAN_PER_ROW once, in its file: the bias ISR
    then removes the drift exactly (truth: the injected ramp), where the type default (one median per
    amplifier) leaves it in."""
    raw_path = _drifting_bias(tmp_path / "b1.fits")
    plain = load_camera(_write(tmp_path, CAM))
    per_row = load_camera(_write(tmp_path, CAM + "isr:\n  overscan_fit_type: MEDIAN_PER_ROW\n", "cam2.yaml"))
    assert per_row.isr == {"overscanFitType": "MEDIAN_PER_ROW"}
    assert plain.content_hash != per_row.content_hash

    cfg = effective_config(BiasConfig, per_row, None)
    assert cfg.isr.overscanFitType == "MEDIAN_PER_ROW"
    assert cfg.isr.doBias is False           # the bias type's own switches stay
    out = process_bias(read_raw(raw_path, per_row).detectors[0], cfg).image
    assert np.abs(out).max() < 1e-3

    default = process_bias(read_raw(raw_path, plain).detectors[0], effective_config(BiasConfig, plain, None)).image
    expected = 5.0 * (np.arange(ROWS) - np.median(np.arange(ROWS)))
    np.testing.assert_allclose(default[:, 0], expected, atol=1e-3)


def test_build_config_wins_over_camera_isr(tmp_path):
    cam = load_camera(_write(tmp_path, CAM + "isr:\n  overscanFitType: MEAN\n  doDefect: false\n"))
    cfg = effective_config(DarkConfig, cam, {"isr": {"overscanFitType": "POLY"}})
    assert cfg.isr.overscanFitType == "POLY"      # the build's setting
    assert cfg.isr.doDefect is False              # the camera's
    assert cfg.isr.doDark is False and cfg.isr.doBias is True   # the dark type's


@pytest.mark.parametrize("isr, message", [
    ("  overscanFitTyp: MEAN\n", "isr: Value error, unknown ISR setting 'overscanFitTyp'; did you mean "
                                 "'overscanFitType'?"),
    ("  overscan_fit_typ: MEAN\n", "did you mean 'overscanFitType'?"),
    ("  overscanFitType: PER_ROW\n", "isr"),
])
def test_camera_isr_errors_name_file_and_field(tmp_path, isr, message):
    path = _write(tmp_path, CAM + "isr:\n" + isr)
    with pytest.raises(CameraError) as info:
        load_camera(path)
    assert str(path) in str(info.value) and message in str(info.value)
