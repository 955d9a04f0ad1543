"""Camera definitions: every shipped camera validates, and bad definitions fail with the file named."""

import textwrap

import numpy as np
import pytest
from typer.testing import CliRunner

from calib_core.camera import CameraError, list_cameras, load_camera, parse_section


def test_builtin_cameras_load():
    names = list_cameras()
    assert {"democam", "democam_mini", "keck_hires", "lick_kast_blue", "wht_isis_blue", "msfc_esis"} <= set(names)
    for name in names:
        cam = load_camera(name)
        assert cam.name == name
        assert cam.detectors


def test_democam_layout():
    cam = load_camera("democam")
    assert len(cam.detectors) >= 9
    xs = sorted({d.x_mm for d in cam.detectors})
    ys = sorted({d.y_mm for d in cam.detectors})
    assert len(xs) >= 3 and len(ys) >= 3
    for det in cam.detectors:
        assert len(det.amplifiers) == 2
        for amp in det.amplifiers:
            assert amp.prescan_section and amp.overscan_section
            assert 1.0 < amp.gain < 3.0 and 2.0 < amp.read_noise < 10.0 and amp.saturation > 30000
    # chip gaps: neighbouring detectors do not touch
    boxes = [cam.detector_corners_mm(d) for d in cam.detectors]
    for i, a in enumerate(boxes):
        for b in boxes[i + 1:]:
            overlap_x = min(a[1], b[1]) - max(a[0], b[0])
            overlap_y = min(a[3], b[3]) - max(a[2], b[2])
            assert overlap_x < 0 or overlap_y < 0, "detectors overlap"


@pytest.mark.parametrize("orientation", [0, 1, 2, 3])
def test_focal_plane_round_trip(orientation):
    cam = load_camera("democam_mini")
    det = cam.detectors[4].model_copy(update={"orientation": orientation})
    x = np.array([0.0, 10.5, det.nx - 1.0])
    y = np.array([0.0, 300.25, det.ny - 1.0])
    fx, fy = cam.pixel_to_focal_plane(det, x, y)
    bx, by = cam.focal_plane_to_pixel(det, fx, fy)
    np.testing.assert_allclose(bx, x, atol=1e-9)
    np.testing.assert_allclose(by, y, atol=1e-9)
    # the detector centre maps to its focal-plane position whatever the orientation
    cx, cy = cam.pixel_to_focal_plane(det, (det.nx - 1) / 2, (det.ny - 1) / 2)
    assert cx == pytest.approx(det.x_mm) and cy == pytest.approx(det.y_mm)


def test_parse_section():
    s = parse_section("[7:1030,1:2048]")
    assert (s.x0, s.x1, s.y0, s.y1, s.flip_x) == (6, 1030, 0, 2048, False)
    f = parse_section("[2048:1,1:4096]")
    assert f.flip_x and f.nx == 2048 and f.to_fits() == "[2048:1,1:4096]"
    assert f.binned(2, 2).nx == 1024
    for bad in ("7:1030,1:2048", "[0:10,1:5]", "[a:b,c:d]"):
        with pytest.raises(ValueError):
            parse_section(bad)


def _write(tmp_path, text):
    p = tmp_path / "cam.yaml"
    p.write_text(textwrap.dedent(text))
    return p


GOOD = """
name: tiny
detectors:
  - id: 0
    name: d0
    hdu: 0
    amplifiers:
      - {name: A, data_section: '[1:10,1:10]', overscan_section: '[11:14,1:10]',
         detector_section: '[1:10,1:10]', gain: 1.5, read_noise: 4.0}
metadata:
  obs_type:
    - {key: OBSTYPE, pattern: bias, value: bias}
"""


def test_user_camera_file(tmp_path):
    cam = load_camera(_write(tmp_path, GOOD))
    assert cam.detectors[0].nx == 10 and cam.detectors[0].ny == 10


@pytest.mark.parametrize("edit, message", [
    (lambda t: t.replace("gain: 1.5", "gain: -1"), "gain"),
    (lambda t: t.replace("value: bias", "value: biass"), "unknown observation type"),
    (lambda t: t.replace("'[11:14,1:10]'", "'[11-14,1:10]'"), "overscan_section"),
    (lambda t: t.replace("name: tiny", "name: tiny\ncolour: red"), "colour"),
    (lambda t: t.replace("    hdu: 0\n", ""), "'hdu' is required"),
    (lambda t: t.replace(", gain: 1.5", ""), "give gain or gain_key"),
])
def test_invalid_camera_names_file_and_problem(tmp_path, edit, message):
    path = _write(tmp_path, edit(GOOD))
    with pytest.raises(CameraError) as info:
        load_camera(path)
    assert str(path) in str(info.value)
    assert message in str(info.value)


def test_duplicate_detector_ids(tmp_path):
    text = GOOD.replace("detectors:\n", "detectors:\n  - {id: 0, name: other, hdu: 1, amplifiers: [{name: A, "
                        "data_section: '[1:10,1:10]', overscan_section: '[11:14,1:10]', detector_section: "
                        "'[1:10,1:10]', gain: 1, read_noise: 1}]}\n")
    with pytest.raises(CameraError, match="detector ids must be unique"):
        load_camera(_write(tmp_path, text))


def test_not_yaml_and_unknown_name(tmp_path):
    with pytest.raises(CameraError, match="not valid YAML"):
        load_camera(_write(tmp_path, "name: [unclosed"))
    with pytest.raises(CameraError, match="unknown camera 'nosuchcam'"):
        load_camera("nosuchcam")


def test_cli_cameras_list_and_show():
    from calibflow.cli import app

    runner = CliRunner()
    out = runner.invoke(app, ["cameras"])
    assert out.exit_code == 0, out.output
    for name in ("democam", "keck_hires", "lick_kast_blue", "wht_isis_blue", "msfc_esis"):
        assert name in out.output
    shown = runner.invoke(app, ["cameras", "show", "keck_hires"])
    assert shown.exit_code == 0 and "sections_from_header: true" in shown.output
    bad = runner.invoke(app, ["cameras", "show", "nosuchcam"])
    assert bad.exit_code != 0 and "unknown camera" in bad.output
