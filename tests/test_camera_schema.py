"""Camera schema: per-camera ISR defaults, load-time checks (each names the file and the field), and
the richer header mapping (values from several keys, header-dependent gains, HDUs to ignore)."""

import textwrap

import numpy as np
import pytest
from astropy.io import fits

from calib_core.builds.bias_dark_flat import BiasConfig, DarkConfig, process_bias
from calib_core.camera import CameraError, effective_config, load_camera
from calib_core.io.raw import read_raw

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
    assert per_row.isr == {"overscan_fit_type": "MEDIAN_PER_ROW"}
    assert plain.content_hash != per_row.content_hash

    cfg = effective_config(BiasConfig, per_row, None)
    assert cfg.isr.overscan_fit_type == "MEDIAN_PER_ROW"
    assert cfg.isr.do_bias is False           # the bias type's own switches stay
    out = process_bias(read_raw(raw_path, per_row).detectors[0], cfg).image
    assert np.abs(out).max() < 1e-3

    default = process_bias(read_raw(raw_path, plain).detectors[0], effective_config(BiasConfig, plain, None)).image
    expected = 5.0 * (np.arange(ROWS) - np.median(np.arange(ROWS)))
    np.testing.assert_allclose(default[:, 0], expected, atol=1e-3)


def test_build_config_wins_over_camera_isr(tmp_path):
    cam = load_camera(_write(tmp_path, CAM + "isr:\n  overscan_fit_type: MEAN\n  do_defect: false\n"))
    cfg = effective_config(DarkConfig, cam, {"isr": {"overscan_fit_type": "POLY"}})
    assert cfg.isr.overscan_fit_type == "POLY"      # the build's setting
    assert cfg.isr.do_defect is False              # the camera's
    assert cfg.isr.do_dark is False and cfg.isr.do_bias is True   # the dark type's


@pytest.mark.parametrize("isr, message", [
    ("  overscanFitTyp: MEAN\n", "isr: Value error, unknown ISR setting 'overscanFitTyp'; did you mean "
                                 "'overscan_fit_type'?"),
    ("  overscan_fit_typ: MEAN\n", "did you mean 'overscan_fit_type'?"),
    ("  overscan_fit_type: PER_ROW\n", "isr"),
])
def test_camera_isr_errors_name_file_and_field(tmp_path, isr, message):
    path = _write(tmp_path, CAM + "isr:\n" + isr)
    with pytest.raises(CameraError) as info:
        load_camera(path)
    assert str(path) in str(info.value) and message in str(info.value)


# --------------------------------------------------------------------------------------------------
# checks at load time: each error names the file and the field
# --------------------------------------------------------------------------------------------------

TWO = """
name: twodet
detectors:
  - id: 0
    name: d0
    hdu: 1
    x_mm: -1.0
    amplifiers:
      - {name: A, data_section: '[1:10,1:20]', overscan_section: '[21:24,1:20]',
         detector_section: '[1:10,1:20]', gain: 1.5, read_noise: 4.0}
      - {name: B, data_section: '[11:20,1:20]', overscan_section: '[25:28,1:20]',
         detector_section: '[20:11,1:20]', gain: 1.5, read_noise: 4.0}
  - id: 1
    name: d1
    hdu: 2
    x_mm: 1.0
    amplifiers:
      - {name: A, data_section: '[1:10,1:20]', overscan_section: '[21:24,1:20]',
         detector_section: '[1:10,1:20]', gain: 1.5, read_noise: 4.0}
      - {name: B, data_section: '[11:20,1:20]', overscan_section: '[25:28,1:20]',
         detector_section: '[20:11,1:20]', gain: 1.5, read_noise: 4.0}
metadata:
  obs_type:
    - {key: OBSTYPE, pattern: bias, value: bias}
  exposure_id: {path_pattern: '^([^.]+)'}
"""


def test_two_detector_camera_is_valid(tmp_path):
    cam = load_camera(_write(tmp_path, TWO))
    assert [(d.nx, d.ny) for d in cam.detectors] == [(20, 20), (20, 20)]


@pytest.mark.parametrize("edit, message", [
    # 20 px of 15 um = 0.3 mm wide, centres 0.2 mm apart
    (lambda t: t.replace("x_mm: 1.0", "x_mm: -0.8"),
     "detectors d0 and d1 overlap in the focal plane by 0.1 x 0.3 mm"),
    (lambda t: t.replace("detector_section: '[20:11,1:20]'", "detector_section: '[1:10,1:20]'", 1),
     "detectors[0] (d0) amplifiers[1] (B).detector_section [1:10,1:20] overlaps amplifier A's [1:10,1:20]"),
    (lambda t: t.replace("overscan_section: '[25:28,1:20]'", "overscan_section: '[18:28,1:20]'", 1),
     "detectors[0] (d0) amplifiers[1] (B).overscan_section [18:28,1:20] overlaps its data_section [11:20,1:20]"),
    (lambda t: t.replace("overscan_section: '[21:24,1:20]'", "overscan_section: '[15:24,1:20]'", 1),
     "detectors[0] (d0) amplifiers[0] (A).overscan_section [15:24,1:20] overlaps amplifier B's data_section"),
    (lambda t: t.replace("    x_mm: -1.0\n", "    x_mm: -1.0\n    nx: 16\n", 1),
     "detectors[0] (d0) amplifiers[1] (B).detector_section [20:11,1:20] lies outside the 16x20 detector"),
    (lambda t: t.replace("detector_section: '[20:11,1:20]'", "detector_section: '[19:11,1:20]'", 1),
     "detector_section [19:11,1:20] is 9x20 pixels but data_section [11:20,1:20] is 10x20"),
    (lambda t: t.replace("hdu: 2", "hdu: 1"),
     "detectors[1] (d1).hdu: HDU 1 is already read by detectors[0] (d0); each detector needs its own HDU"),
    (lambda t: t.replace("pattern: bias", "pattern: '(bias'"),
     "metadata.obs_type.0.pattern: Value error, invalid regular expression '(bias': missing ), "
     "unterminated subpattern"),
    (lambda t: t.replace("path_pattern: '^([^.]+)'", "path_pattern: '^([^.]+'"),
     "metadata.exposure_id.path_pattern: Value error, invalid regular expression"),
    (lambda t: t.replace("overscan_section: '[21:24,1:20]'", "overscan_sectoin: '[21:24,1:20]'", 1),
     "detectors.0.amplifiers.0.overscan_sectoin: unknown key; did you mean 'overscan_section'?"),
    (lambda t: t.replace("  exposure_id:", "  filtr: {keys: [FILTER]}\n  exposure_id:"),
     "metadata.filtr: unknown key; did you mean 'filter'?"),
])
def test_geometry_and_regex_errors_name_file_and_field(tmp_path, edit, message):
    path = _write(tmp_path, edit(TWO))
    with pytest.raises(CameraError) as info:
        load_camera(path)
    text = str(info.value)
    assert text.startswith(str(path)) and message in text, text
    assert len(text.splitlines()) <= 3          # a message, not a traceback


def test_cli_keeps_section_brackets(tmp_path):
    from typer.testing import CliRunner

    from calibflow.cli import app

    path = _write(tmp_path, TWO.replace("overscan_section: '[25:28,1:20]'", "overscan_section: '[18:28,1:20]'", 1))
    res = CliRunner().invoke(app, ["cameras", "show", str(path)])
    assert res.exit_code == 1
    assert "overscan_section [18:28,1:20] overlaps its data_section [11:20,1:20]" in " ".join(res.output.split())


def test_filter_key_typo_is_an_error_not_none(tmp_path):
    raw = _drifting_bias(tmp_path / "b1.fits")
    fits.setval(raw, "FILTER", value="r")
    good = load_camera(_write(tmp_path, CAM.replace("metadata:\n", "metadata:\n  filter: {keys: [FILTER]}\n")))
    assert read_raw(raw, good).metadata.filter == "r"
    typo = load_camera(_write(tmp_path, CAM.replace("metadata:\n", "metadata:\n  filter: {keys: [FILTR]}\n"),
                              "typo.yaml"))
    with pytest.raises(ValueError, match=r"no filter: none of the camera's metadata.filter.keys \['FILTR'\]"):
        read_raw(raw, typo)
    # an explicit default is a camera without filters, not a typo
    nofilter = load_camera(_write(tmp_path, CAM.replace("metadata:\n", "metadata:\n  filter: {keys: [FILTR], "
                                                        "default: OPEN}\n"), "open.yaml"))
    assert read_raw(raw, nofilter).metadata.filter == "OPEN"


def test_deployment_form_values_left_at_the_defaults_take_the_camera_isr(tmp_path):
    """A deployment's form always carries every field: only the values changed from the type's
    defaults override the camera's ISR defaults."""
    from deployments.build import _changed

    cam = load_camera(_write(tmp_path, CAM + "isr:\n  overscan_fit_type: MEDIAN_PER_ROW\n"))
    form = BiasConfig().model_dump(mode="json")
    form["combine"]["statistic"] = "MEDIAN"
    changed = _changed(form, BiasConfig().model_dump(mode="json"))
    assert changed == {"combine": {"statistic": "MEDIAN"}}
    cfg = effective_config(BiasConfig, cam, changed)
    assert cfg.isr.overscan_fit_type == "MEDIAN_PER_ROW" and cfg.combine.statistic == "MEDIAN"
    form["isr"]["overscan_fit_type"] = "MEAN"       # chosen in the form: wins over the camera
    assert effective_config(BiasConfig, cam, _changed(form, BiasConfig().model_dump(mode="json"))).isr.overscan_fit_type \
        == "MEAN"


def test_cameras_show_checks_sections_against_a_raw_file(tmp_path):
    """A section outside the HDU can only be seen with a file: `cameras show --raw` reads it."""
    from typer.testing import CliRunner

    from calibflow.cli import app

    raw = _drifting_bias(tmp_path / "b1.fits")         # 20 rows x 14 columns
    ok = CliRunner().invoke(app, ["cameras", "show", str(_write(tmp_path, CAM)), "--raw", str(raw)])
    assert ok.exit_code == 0 and "b1" in ok.output and "bias" in ok.output and "d0 20x10" in ok.output, ok.output
    wide = _write(tmp_path, CAM.replace("'[11:14,1:20]'", "'[11:16,1:20]'"), "wide.yaml")
    res = CliRunner().invoke(app, ["cameras", "show", str(wide), "--raw", str(raw)])
    assert res.exit_code == 1
    assert (f"{raw}: detector d0 amplifier A: overscan section [11:16,1:20] lies outside HDU 0 of shape 20x14"
            in " ".join(res.output.split())), res.output


# --------------------------------------------------------------------------------------------------
# the richer header mapping, on synthetic files whose headers say exactly what is expected
# --------------------------------------------------------------------------------------------------

RICH = f"""
name: richcam
ignore_hdus: [ERR, DQ]
detectors:
  - id: 0
    name: d0
    hdu: SCI
    amplifiers:
      - name: A
        data_section: '[1:10,1:{ROWS}]'
        overscan_section: '[11:14,1:{ROWS}]'
        detector_section: '[1:10,1:{ROWS}]'
        gain_table: {{key: CCDGAIN, values: {{'1': 1.1, '4': 4.2, low: 0.9}}}}
        read_noise_table: {{key: CCDGAIN, values: {{'1': 3.0, '4': 5.0, low: 2.5}}}}
        saturation: 65535
        saturation_key: SATURATE
metadata:
  obs_type:
    - {{key: IMAGETYP, pattern: '^EXT', value: science, all_of: [{{key: OBSTYPE, pattern: '^IMAGING'}},
                                                                   {{key: SHUTTER, pattern: '(?i)closed', negate: true}}]}}
    - {{key: IMAGETYP, pattern: '^EXT', value: dark}}
  filter: {{keys: [FILTER1, FILTER2], skip: '^CLEAR', default: CLEAR}}
  object: {{keys: [WHEEL1, WHEEL2], default: ''}}
  exposure_id: {{keys: [WHEEL1, WHEEL2], join: '+', skip: '(?i)^open$'}}
"""


def _rich_file(path, **cards):
    sci = fits.ImageHDU(np.full((ROWS, 14), 1000.0, np.float32), name="SCI")
    planes = [fits.ImageHDU(np.zeros((ROWS, 14), np.float32), name=n) for n in ("ERR", "DQ")]
    primary = fits.PrimaryHDU()
    primary.header.update({"IMAGETYP": "EXT", "OBSTYPE": "IMAGING", "EXPTIME": 5.0,
                           "DATE-OBS": "2026-11-20T03:00:00", "CCDGAIN": 4, **cards})
    fits.HDUList([primary, sci, *planes]).writeto(path)
    return path


@pytest.mark.parametrize("cards, expected", [
    ({"FILTER1": "F550M", "FILTER2": "CLEAR2S", "WHEEL1": "g", "WHEEL2": "ND1"}, ("science", "F550M", "g+ND1")),
    ({"FILTER1": "CLEAR1S", "FILTER2": "F435W", "WHEEL1": "open", "WHEEL2": "ND1"}, ("science", "F435W", "ND1")),
    ({"FILTER1": "CLEAR1S", "FILTER2": "CLEAR2S", "WHEEL1": "r", "WHEEL2": "open", "SHUTTER": "Closed"},
     ("dark", "CLEAR", "r")),
    ({"FILTER1": "F550M", "OBSTYPE": "SPECTROSCOPIC", "WHEEL1": "r"}, ("dark", "F550M", "r")),
])
def test_values_from_several_keys_and_combined_type_rules(tmp_path, cards, expected):
    cam = load_camera(_write(tmp_path, RICH))
    m = read_raw(_rich_file(tmp_path / "x.fits", **cards), cam).metadata
    assert (m.obs_type, m.filter, m.exposure_id) == expected


def test_gain_table_saturation_key_and_ignored_planes(tmp_path):
    cam = load_camera(_write(tmp_path, RICH))
    raw = read_raw(_rich_file(tmp_path / "a.fits", FILTER1="F550M", WHEEL1="r"), cam)   # ERR, DQ: 2-D, ignored
    amp = raw.detectors[0].amps[0]
    assert (amp.gain, amp.read_noise, amp.saturation) == (4.2, 5.0, 65535.0)
    amp = read_raw(_rich_file(tmp_path / "b.fits", FILTER1="F550M", WHEEL1="r", CCDGAIN="LOW", SATURATE=30000),
                   cam).detectors[0].amps[0]
    assert (amp.gain, amp.read_noise, amp.saturation) == (0.9, 2.5, 30000.0)
    with pytest.raises(ValueError, match=r"CCDGAIN=2 is not in the camera's gain table \(values for 1, 4, low\)"):
        read_raw(_rich_file(tmp_path / "c.fits", FILTER1="F550M", WHEEL1="r", CCDGAIN=2), cam)
    # without ignore_hdus the ERR and DQ planes count as raw pixels: a wrong-camera file
    plain = load_camera(_write(tmp_path, RICH.replace("ignore_hdus: [ERR, DQ]\n", ""), "plain.yaml"))
    with pytest.raises(ValueError, match="has 3 image HDUs .* but camera richcam reads 1: one per detector"):
        read_raw(tmp_path / "a.fits", plain)
