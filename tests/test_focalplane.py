"""Focal-plane background (docs/algorithms.md#focal-plane-background-legacy): geometry, continuity across chip gaps, merging of
partial models in any grouping, bad-cell filling, pickling."""

import pickle

import numpy as np
import pytest

from calib_core.camera import load_camera
from calib_core.errors import DataError
from calib_core.maskedimage import MaskedImage, mask_bits
from calib_core.sky.focalplane import FocalPlaneBackground, FocalPlaneBackgroundConfig, interpolate_bad_cells

CAM = load_camera("democam_mini")
CFG = FocalPlaneBackgroundConfig(x_size=1.92, y_size=1.92)  # 128-px cells


def smooth_sky(fx, fy):
    """A sky that is smooth in focal-plane mm (gradient + curvature)."""
    return 1000.0 + 8.0 * fx - 5.0 * fy + 0.3 * (fx - 2.0) ** 2 + 0.2 * fx * fy


def detector_image(det, seed=0, noise=0.0):
    yy, xx = np.mgrid[:det.ny, :det.nx].astype(np.float64)
    img = smooth_sky(*CAM.pixel_to_focal_plane(det, xx, yy))
    if noise:
        img = img + np.random.default_rng(seed + det.id).normal(0, noise, img.shape)
    return MaskedImage.from_image(img.astype(np.float32))


def partials(noise=0.0):
    out = []
    for det in CAM.detectors:
        fp = FocalPlaneBackground.from_camera(CFG, CAM)
        fp.add_detector(CAM, det, detector_image(det, noise=noise))
        out.append(fp)
    return out


def test_geometry():
    fp = FocalPlaneBackground.from_camera(CFG, CAM)
    corners = np.array([CAM.detector_corners_mm(d) for d in CAM.detectors])
    width = corners[:, 1].max() - corners[:, 0].min()
    height = corners[:, 3].max() - corners[:, 2].min()
    assert fp.dims == (int(np.ceil(width / 1.92)) + 2, int(np.ceil(height / 1.92)) + 2)
    assert fp.values.shape == (fp.dims[1], fp.dims[0])
    sx, sy = fp.fp_to_sample(corners[:, 0].min(), corners[:, 2].min())
    assert (sx, sy) == (1.0, 1.0)
    assert np.allclose(fp.sample_to_fp(*fp.fp_to_sample(3.3, -7.1)), (3.3, -7.1))
    assert fp.pixel_size == CAM.pixel_size_mm


def test_cell_values_are_count_weighted_clipped_means():
    ps = partials()
    merged = FocalPlaneBackground.merged(ps)
    stats = merged.get_stats_image()
    # every good cell's value is the sky at (close to) the centre of its covered area
    good = merged.numbers >= CFG.min_frac * (1.92 / 0.015) ** 2
    jj, ii = np.nonzero(good)
    fx, fy = merged.sample_to_fp(ii, jj)
    full = merged.numbers[jj, ii] >= 0.95 * (1.92 / 0.015) ** 2
    assert np.allclose(stats[jj[full], ii[full]], smooth_sky(fx[full], fy[full]), rtol=2e-3)
    # the numbers are pixel counts: their sum is at least the number of pixels (boxes are
    # inclusive, so cells sharing a boundary row both count it, as in the reference)
    total = sum(d.nx * d.ny for d in CAM.detectors)
    assert total <= merged.numbers.sum() < 1.05 * total


def test_continuous_across_chip_gaps():
    merged = FocalPlaneBackground.merged(partials(noise=3.0))
    for det in CAM.detectors:
        model = merged.to_detector_background(CAM, det).evaluate()
        yy, xx = np.mgrid[:det.ny, :det.nx].astype(np.float64)
        truth = smooth_sky(*CAM.pixel_to_focal_plane(det, xx, yy))
        # cells cut by a detector edge measure the sky at the centroid of the covered part, not at
        # the cell centre (reference behaviour): errors up to ~gradient x half a cell near corners
        assert np.abs(model - truth).max() < 8.0
        assert np.sqrt(np.mean((model - truth) ** 2)) < 3.5
    # across the gap between ccd03 and ccd04 the two models meet the same smooth surface: their
    # edge columns differ by the truth's difference, not by a step
    a, b = CAM.detector(3), CAM.detector(4)
    ma = merged.to_detector_background(CAM, a).evaluate()[:, -1]
    mb = merged.to_detector_background(CAM, b).evaluate()[:, 0]
    ys = np.arange(a.ny, dtype=float)
    ta = smooth_sky(*CAM.pixel_to_focal_plane(a, np.full_like(ys, a.nx - 1), ys))
    tb = smooth_sky(*CAM.pixel_to_focal_plane(b, np.zeros_like(ys), ys))
    assert np.abs((mb - ma) - (tb - ta)).max() < 2.0
    assert np.abs(mb - ma).mean() > 3.0  # the truth does change across the gap


@pytest.mark.parametrize("grouping", [[[0, 1, 2], [3, 4, 5], [6, 7, 8]], [[8], [0, 4, 2, 6], [1, 3, 5, 7]],
                                      [[4, 0], [1], [2, 3, 5, 6, 7, 8]]])
def test_merge_is_independent_of_grouping(grouping):
    ps = partials(noise=5.0)
    reference = FocalPlaneBackground.merged(ps)
    groups = [FocalPlaneBackground.merged([ps[i] for i in g]) for g in grouping]
    total = groups[-1].clone()
    for g in groups[:-1][::-1]:
        total += g
    assert np.array_equal(total.values, reference.values)
    assert np.array_equal(total.numbers, reference.numbers)
    assert np.array_equal(total.get_stats_image(), reference.get_stats_image())


def test_merge_mismatch_raises():
    a = FocalPlaneBackground.from_camera(CFG, CAM)
    b = FocalPlaneBackground.from_camera(FocalPlaneBackgroundConfig(x_size=2.5, y_size=2.5), CAM)
    with pytest.raises(DataError):
        a.merge(b)


def test_masked_pixels_ignored_and_pickling():
    det = CAM.detector(4)
    mi = detector_image(det)
    mi.image[100:200, 50:150] = 1e5
    mi.mask[100:200, 50:150] = mask_bits(["DETECTED"])
    fp = FocalPlaneBackground.from_camera(CFG, CAM)
    fp.add_detector(CAM, det, mi)
    clean = FocalPlaneBackground.from_camera(CFG, CAM)
    clean.add_detector(CAM, det, detector_image(det))
    good = clean.numbers > 0
    rel = np.abs(fp.values[good] / fp.numbers[good] - clean.values[good] / clean.numbers[good])
    assert rel.max() < 5.0   # only the centroid of the remaining pixels moves; no 1e5 light leaks in
    blob = pickle.dumps(fp)
    assert len(blob) < 20_000
    back = pickle.loads(blob)
    assert np.array_equal(back.values, fp.values) and back.dims == fp.dims
    with pytest.raises(ValueError):
        fp.add_detector(CAM, det, MaskedImage.empty((10, 10)))


def test_interpolate_bad_cells_rows_then_columns():
    v = np.add.outer(np.arange(6.0), 10 * np.arange(7.0))
    bad = np.zeros(v.shape, bool)
    bad[2, 3] = True          # filled along its row
    bad[:, 5] = False
    bad[4, :] = True          # a whole bad row: filled by the column pass
    vin = np.where(bad, np.nan, v)
    out = interpolate_bad_cells(vin, bad, "AKIMA_SPLINE")
    assert np.allclose(out, v, atol=1e-4)
    with pytest.raises(DataError):
        interpolate_bad_cells(v, np.ones(v.shape, bool))
    # low-count but finite cells in an all-bad row keep their value (reference quirk)
    bad2 = np.zeros(v.shape, bool)
    bad2[1, :] = True
    raw = v.copy()
    raw[1, :] = -1.0
    assert np.allclose(interpolate_bad_cells(raw, bad2)[1], -1.0)


def test_smoothing_option():
    cfg = FocalPlaneBackgroundConfig(x_size=1.92, y_size=1.92, do_smooth=True, smooth_scale=1.0)
    fp = FocalPlaneBackground.from_camera(cfg, CAM)
    for det in CAM.detectors:
        fp.add_detector(CAM, det, detector_image(det, noise=20.0))
    s = fp.get_stats_image()
    assert np.all(np.isfinite(s))
    raw = FocalPlaneBackground.from_camera(CFG, CAM)
    raw.values, raw.numbers = fp.values, fp.numbers
    r = raw.get_stats_image()
    # smoothing reduces cell-to-cell scatter of a linear-ish field's second differences
    assert np.abs(np.diff(s, 2, axis=1)).mean() < np.abs(np.diff(r, 2, axis=1)).mean()
