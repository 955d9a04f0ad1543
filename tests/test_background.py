"""Binned background model (docs/algorithms.md#binned-background-model) and the fast binned MEANCLIP kernel."""

import numpy as np
import pytest
from scipy.interpolate import Akima1DInterpolator, CubicSpline

from calib_core.maskedimage import MaskedImage, mask_bits
from calib_core.stats.background import (BackgroundConfig, BackgroundModel, bin_centres, bin_edges, interpolate_1d,
                                         lookup_max_interp_style, measure_background, n_bins)
from calib_core.stats.binned import box_statistics, grid_statistics, image_statistic
from calib_core.stats.clipped import clipped_mean, compute_statistic

RNG = np.random.default_rng(42)


# -- partition -----------------------------------------------------------------------------------


@pytest.mark.parametrize("size,n", [(2048, 64), (4176, 131), (100, 7), (10, 10), (33, 1), (4176, 5)])
def test_bin_edges_follow_afw_rule(size, n):
    e = bin_edges(size, n)
    assert e[0] == 0 and e[-1] == size and e.size == n + 1
    for i in range(n):
        assert e[i + 1] == min(((i + 1) * size + n // 2) // n, size)
    sizes = np.diff(e)
    assert sizes.min() >= size // n and sizes.max() <= -(-size // n)


def test_bin_centres_and_counts():
    e = bin_edges(10, 3)  # ends: (10+1)//3=3, (20+1)//3=7, 10
    assert list(e) == [0, 3, 7, 10]
    assert np.allclose(bin_centres(e), [1.0, 4.5, 8.0])
    assert n_bins(2048, 32, "round") == 64 and n_bins(2050, 32, "round") == 64
    assert n_bins(2064, 32, "round") == 65 and n_bins(10, 32, "round") == 1
    assert n_bins(2049, 1024, "ceil") == 3 and n_bins(2048, 1024, "floor_plus_one") == 3
    with pytest.raises(ValueError):
        bin_edges(5, 6)


# -- fast kernel vs the reference clipped_mean -------------------------------------------------------


@pytest.mark.parametrize("stat", ["MEANCLIP", "MEAN", "MEDIAN"])
def test_box_statistics_match_reference(stat):
    img = RNG.normal(100, 10, (300, 260)).astype(np.float32)
    img[RNG.random(img.shape) < 0.02] += 400          # outliers
    img[5, 5] = np.nan
    img[:, 7] = 100.0                                  # ties
    mask = np.where(RNG.random(img.shape) < 0.1, mask_bits(["BAD"]), 0).astype(np.int32)
    ignore = mask_bits(["BAD"])
    # sizes on both sides of each path's threshold: quickselect below 96 values, histogram from 96
    # (16-px sky bins: 256), sampled histogram range from 512
    boxes = [(0, 300, 0, 260), (0, 1, 0, 1), (0, 2, 0, 3), (10, 13, 20, 21), (3, 3, 0, 5),
             (17, 80, 40, 200), (0, 300, 7, 8), (100, 150, 0, 260), (40, 48, 50, 61), (40, 52, 50, 58),
             (200, 216, 100, 116), (0, 31, 0, 16), (60, 92, 0, 16)]
    out = box_statistics(img, mask, ignore, boxes, stat)
    for (y0, y1, x0, x1), row in zip(boxes, out):
        ref = compute_statistic(stat, img[y0:y1, x0:x1], mask[y0:y1, x0:x1], ignore)
        assert row[2] == ref.npoint
        if ref.npoint == 0:
            assert np.isnan(row[0])
            continue
        assert row[0] == pytest.approx(ref.mean, rel=1e-12, abs=1e-9)
        if np.isfinite(ref.error):
            assert row[1] == pytest.approx(ref.error, rel=1e-9)
        assert row[3] == ref.n_used


def test_grid_statistics_agree_with_clipped_mean_per_bin():
    img = RNG.normal(500, 20, (203, 171)).astype(np.float32)
    img[RNG.random(img.shape) < 0.03] *= 5
    mask = np.where(RNG.random(img.shape) < 0.05, mask_bits(["SAT"]), 0).astype(np.int32)
    xe, ye = bin_edges(171, 5), bin_edges(203, 6)
    val, err, npt, nused = grid_statistics(img, mask, mask_bits(["SAT"]), xe, ye)
    for j in range(6):
        for i in range(5):
            sub = (slice(ye[j], ye[j + 1]), slice(xe[i], xe[i + 1]))
            ref = clipped_mean(img[sub], mask[sub], mask_bits(["SAT"]))
            assert val[j, i] == pytest.approx(ref.mean, rel=1e-12)
            assert err[j, i] == pytest.approx(ref.error, rel=1e-9)
            assert (npt[j, i], nused[j, i]) == (ref.npoint, ref.n_used)


def test_histogram_quantiles_exact_on_heavy_tails():
    # large boxes take the histogram path; values spread over decades, many duplicates
    x = np.concatenate([RNG.normal(0, 1, 5000), RNG.lognormal(8, 2, 300), np.full(700, 1.5)])
    RNG.shuffle(x)
    img = x.reshape(60, 100).astype(np.float64)
    out = box_statistics(img, None, 0, [(0, 60, 0, 100)], "MEDIAN")
    assert out[0, 0] == np.median(img)
    ref = compute_statistic("MEANCLIP", img)
    assert box_statistics(img, None, 0, [(0, 60, 0, 100)])[0, 0] == pytest.approx(ref.mean, rel=1e-12)


@pytest.mark.parametrize("n", [8192, 1024, 600])
def test_histogram_quantiles_exact_when_the_sample_misleads(n):
    """Boxes of 512 values or more take the histogram range from a strided sample (every 8th value
    at least); the quantiles stay exact when the sample has no spread or lies far from the bulk
    (the needed ranks then fall in the under/overflow buckets)."""
    step = max(n // 1024, 8)
    shape = {8192: (64, 128), 1024: (32, 32), 600: (20, 30)}[n]
    for fill in ("tie", "far", "sorted"):
        x = RNG.normal(0, 1, n)
        if fill == "tie":
            x[::step] = 5.0
        elif fill == "far":
            x[::step] = RNG.uniform(100, 101, x[::step].size)
        else:
            x.sort()
        img = x.reshape(shape)
        box = [(0, shape[0], 0, shape[1])]
        out = box_statistics(img, None, 0, box, "MEDIAN")
        assert out[0, 0] == np.median(x)
        ref = compute_statistic("MEANCLIP", img)
        assert box_statistics(img, None, 0, box)[0, 0] == pytest.approx(ref.mean, rel=1e-12)


@pytest.mark.parametrize("stat", ["MEANCLIP", "MEAN", "MEDIAN", "SIGMACLIP", "MINMAX"])
@pytest.mark.parametrize("case", ["ccd", "objects", "small", "ties", "float64", "empty", "no-mask"])
def test_image_statistic_matches_the_numpy_reference(stat, case):
    """The whole-image kernel the builds use (flat levels, verification, defects, overscan) against
    compute_statistic, the NumPy reference (itself tested against brute force in test_stats):
    every field, to rounding (sums run in another order)."""
    shape = {"ccd": (512, 300), "objects": (400, 257), "small": (7, 9), "ties": (90, 70),
             "float64": (128, 100), "empty": (5, 6), "no-mask": (64, 64)}[case]
    img = RNG.normal(1000, 30, shape).astype(np.float64 if case == "float64" else np.float32)
    mask = np.where(RNG.random(shape) < 0.05, mask_bits(["BAD"]), 0).astype(np.int32)
    mask |= np.where(RNG.random(shape) < 0.1, mask_bits(["SAT"]), 0).astype(np.int32)
    ignore = mask_bits(["BAD"])
    if case == "objects":                            # bright objects stretching the range by decades
        bright = RNG.random(shape) < 0.04
        img[bright] *= RNG.lognormal(2, 2, int(bright.sum()))
        img[10:30, 40:90] = 6e4
    if case == "ties":
        img[:, ::2] = 1000.0
    img.flat[::97] = np.nan
    img.flat[5] = np.inf
    if case == "empty":
        mask[:] = ignore
    if case == "no-mask":
        mask, ignore = None, 0
    ref = compute_statistic(stat, img, mask, ignore)
    got = image_statistic(stat, img, mask, ignore)
    assert (got.npoint, got.n_used, got.or_mask) == (ref.npoint, ref.n_used, ref.or_mask)
    for field in ("mean", "variance", "error", "median"):
        r, g = getattr(ref, field), getattr(got, field)
        if np.isnan(r):
            assert np.isnan(g), field
        else:
            assert g == pytest.approx(r, rel=1e-11, abs=1e-12), field


def test_image_statistic_clip_parameters_reach_the_kernel():
    x = np.concatenate([RNG.normal(0, 1, 20000), RNG.normal(0, 1, 2000) + 3.5])
    for nsigma, niter in ((2.0, 1), (2.5, 5), (4.0, 0)):
        ref = compute_statistic("MEANCLIP", x, nsigma=nsigma, niter=niter)
        got = image_statistic("MEANCLIP", x, nsigma=nsigma, niter=niter)
        assert got.n_used == ref.n_used and got.mean == pytest.approx(ref.mean, rel=1e-12)
    with pytest.raises(ValueError, match="unknown statistic"):
        image_statistic("MODE", x)


# -- interpolation ---------------------------------------------------------------------------------


def test_interpolate_matches_scipy_inside_and_taylor_outside():
    x = np.linspace(10, 90, 9)
    y = np.sin(x / 15.0)
    xi = np.linspace(0, 100, 201)
    inside = (xi >= x[0]) & (xi <= x[-1])
    ak = Akima1DInterpolator(x, y)
    nat = CubicSpline(x, y, bc_type="natural")
    nak = CubicSpline(x, y)
    assert np.allclose(interpolate_1d(x, y, xi[inside], "AKIMA_SPLINE"), ak(xi[inside]))
    assert np.allclose(interpolate_1d(x, y, xi[inside], "NATURAL_SPLINE"), nat(xi[inside]))
    assert np.allclose(interpolate_1d(x, y, xi[inside], "CUBIC_SPLINE"), nak(xi[inside]))
    assert np.allclose(interpolate_1d(x, y, xi[inside], "LINEAR"), np.interp(xi[inside], x, y))
    # quadratic Taylor extrapolation from the end points; natural spline: linear
    lo = xi < x[0]
    d = xi[lo] - x[0]
    expect = ak(x[0]) + ak(x[0], 1) * d + 0.5 * ak(x[0], 2) * d * d
    assert np.allclose(interpolate_1d(x, y, xi[lo], "AKIMA_SPLINE"), expect)
    hi = xi > x[-1]
    d = xi[hi] - x[-1]
    assert np.allclose(interpolate_1d(x, y, xi[hi], "NATURAL_SPLINE"), nat(x[-1]) + nat(x[-1], 1) * d)
    # CONSTANT: nearest bin centre (piecewise constant about the mid-points)
    c = interpolate_1d(x, y, np.array([0.0, 14.9, 15.1, 100.0]), "CONSTANT")
    assert np.allclose(c, [y[0], y[0], y[1], y[-1]])


def test_reduce_interp_order_and_nan_handling():
    assert [lookup_max_interp_style(n) for n in (1, 2, 3, 4, 5, 9)] == [
        "CONSTANT", "LINEAR", "CUBIC_SPLINE", "CUBIC_SPLINE", "AKIMA_SPLINE", "AKIMA_SPLINE"]
    x = np.array([0.0, 1.0, 2.0, 3.0, 4.0])
    y = np.array([1.0, np.nan, 3.0, np.nan, np.nan])  # 2 good points -> LINEAR
    assert np.allclose(interpolate_1d(x, y, np.array([1.0, 4.0]), "AKIMA_SPLINE"), [2.0, 5.0])
    assert np.allclose(interpolate_1d(x, [np.nan, 2.0, np.nan, np.nan, np.nan], x), 2.0)
    assert np.isnan(interpolate_1d(x, np.full(5, np.nan), x)).all()
    with pytest.raises(ValueError):
        interpolate_1d(x, y, x, "AKIMA_SPLINE", "THROW_EXCEPTION")


def _smooth_image(h, w):
    yy, xx = np.mgrid[:h, :w].astype(np.float64)
    return 1000 + 30 * np.sin(xx / 90.0) + 20 * np.cos(yy / 120.0) + 0.01 * xx


@pytest.mark.parametrize("style", ["AKIMA_SPLINE", "NATURAL_SPLINE", "CUBIC_SPLINE", "LINEAR"])
def test_full_resolution_background_recovers_smooth_function(style):
    h, w = 400, 300
    truth = _smooth_image(h, w)
    img = truth + RNG.normal(0, 5, truth.shape)
    cfg = BackgroundConfig(bin_size=25, algorithm=style, use_approx=False)
    model = measure_background(MaskedImage.from_image(img), cfg)
    assert model.values.shape == (16, 12)
    res = model.evaluate() - truth
    tol = 2.5 if style == "LINEAR" else 1.0   # linear interpolation has curvature error
    assert np.sqrt(np.mean(res[10:-10, 10:-10] ** 2)) < tol


def test_y_then_x_order_and_bin_values():
    """Separable evaluation: a bin grid of f(y)+g(x) is reproduced through the bin centres."""
    h, w = 200, 160
    model = BackgroundModel(np.zeros((8, 8)), None, None, (0, 0, w - 1, h - 1), "NATURAL_SPLINE")
    yc, xc = bin_centres(model.y_edges), bin_centres(model.x_edges)
    model.values = (np.add.outer(yc ** 2 / 1000.0, np.sqrt(xc))).astype(np.float32)
    full = model.evaluate()
    ix, iy = np.round(xc).astype(int), np.round(yc).astype(int)
    # at the bin centres (half-integer here) the evaluation reproduces the grid
    cent = model.evaluate(xc, yc)
    assert np.allclose(cent, model.values, atol=1e-4)
    assert full.shape == (h, w) and np.all(np.isfinite(full))
    # row/column of NaNs: columns interpolate around them
    model.values[:, 3] = np.nan
    model.values[2, :] = np.nan
    out = model.evaluate()
    assert np.all(np.isfinite(out))
    assert abs(out[iy[0], ix[3]] - (yc[0] ** 2 / 1000.0 + np.sqrt(xc[3]))) < 0.2


@pytest.mark.parametrize("style", ["AKIMA_SPLINE", "NATURAL_SPLINE", "CUBIC_SPLINE", "LINEAR"])
def test_fill_equals_full_evaluation(style):
    """fill() writes exactly the full-resolution model's values (bit for bit) on the selected
    pixels, extrapolated edges and NaN bins included, and leaves the others alone."""
    h, w = 300, 410
    vals = 1000 + RNG.normal(0, 5, (7, 6))
    vals[2, 1] = np.nan
    vals[:, 4] = np.nan
    model = BackgroundModel(vals, None, None, (0, 0, w - 1, h - 1), style)
    mask = np.where(RNG.random((h, w)) < 0.3, mask_bits(["DETECTED"]), 0).astype(np.int32)
    mask[:, :5] |= mask_bits(["SAT"])
    img = RNG.normal(0, 1, (h, w)).astype(np.float32)
    expect = img.copy()
    sel = (mask & mask_bits(["DETECTED", "SAT"])) != 0
    expect[sel] = model.evaluate()[sel]
    model.fill(img, mask, mask_bits(["DETECTED", "SAT"]))
    assert np.array_equal(img, expect)
    with pytest.raises(ValueError, match="do not match"):
        model.fill(img[:-1], mask[:-1], 1)


def _scipy_two_pass(vals, h, w, style, x=None, y=None):
    """The full-resolution model computed with scipy alone: each bin column interpolated along y
    (the columns without a NaN bin together, the others one by one, as afw does), then every row
    along x through the finite columns; outside the end knots the Taylor expansion to second order."""
    make = {"AKIMA_SPLINE": lambda t, v: Akima1DInterpolator(t, v, axis=0),
            "NATURAL_SPLINE": lambda t, v: CubicSpline(t, v, bc_type="natural", axis=0),
            "CUBIC_SPLINE": lambda t, v: CubicSpline(t, v, bc_type="not-a-knot", axis=0)}[style]

    def interp(t, v, tnew):
        f = make(t, v)
        out = f(np.clip(tnew, t[0], t[-1]))
        for end, sel in ((t[0], tnew < t[0]), (t[-1], tnew > t[-1])):
            if sel.any():
                e = np.array([end])
                dx = (tnew[sel] - end)[:, None]
                out[sel] = f(e)[0] + f(e, 1)[0] * dx + 0.5 * f(e, 2)[0] * dx * dx
        return out

    ny, nx = vals.shape
    ye, xe = [((np.arange(n + 1) * size + n // 2) // n) for size, n in ((h, ny), (w, nx))]
    yc, xc = (ye[:-1] + ye[1:] - 1) / 2.0, (xe[:-1] + xe[1:] - 1) / 2.0
    x = np.arange(w, dtype=np.float64) if x is None else x
    y = np.arange(h, dtype=np.float64) if y is None else y
    v = vals.astype(np.float32).astype(np.float64)
    cols = np.full((y.size, nx), np.nan)
    whole = np.isfinite(v).all(axis=0)
    cols[:, whole] = interp(yc, v[:, whole], y)
    for j in np.flatnonzero(~whole & np.isfinite(v).any(axis=0)):
        fin = np.isfinite(v[:, j])
        cols[:, j] = interp(yc[fin], v[fin, j][:, None], y)[:, 0]
    good = np.isfinite(cols).all(axis=0)
    return interp(xc[good], cols[:, good].T, x).T.astype(np.float32)


@pytest.mark.parametrize("style", ["AKIMA_SPLINE", "NATURAL_SPLINE", "CUBIC_SPLINE"])
def test_evaluate_equals_scipy_bit_for_bit(style):
    """evaluate() (its row pass a numba kernel that releases the GIL) gives scipy's spline values
    bit for bit: at every pixel, extrapolated edges and NaN bins included, and on given coordinates."""
    h, w = 300, 410
    vals = 1000 + RNG.normal(0, 5, (7, 6))
    vals[2, 1] = np.nan
    vals[:, 4] = np.nan
    model = BackgroundModel(vals, None, None, (0, 0, w - 1, h - 1), style)
    assert np.array_equal(model.evaluate(), _scipy_two_pass(vals, h, w, style))
    x = np.array([-3.0, 0.0, 17.5, 204.0, 409.0, 415.0])
    y = np.array([0.0, 21.0, 150.25, 299.0])
    assert np.array_equal(model.evaluate(x, y), _scipy_two_pass(vals, h, w, style, x, y))


def test_masked_pixels_are_ignored():
    h, w = 256, 256
    img = np.full((h, w), 100.0) + RNG.normal(0, 1, (h, w))
    mask = np.zeros((h, w), np.int32)
    img[50:90, 50:90] = 5000.0
    mask[50:90, 50:90] = mask_bits(["DETECTED"])
    model = measure_background(MaskedImage(img, mask, np.ones((h, w))),
                               BackgroundConfig(bin_size=64, use_approx=False))
    assert np.all(np.abs(model.values - 100.0) < 0.3)
    model2 = measure_background(MaskedImage(img, np.zeros_like(mask), np.ones((h, w))),
                                BackgroundConfig(bin_size=64, statistic="MEAN", use_approx=False))
    assert model2.values.max() > 300  # the same bin without the mask is dominated by the object


def test_chebyshev_approximation():
    h, w = 512, 384
    yy, xx = np.mgrid[:h, :w].astype(np.float64)
    truth = 500 + 0.05 * xx - 0.03 * yy + 2e-4 * (xx - 200) ** 2
    img = truth + RNG.normal(0, 3, truth.shape)
    model = measure_background(MaskedImage.from_image(img), BackgroundConfig(bin_size=64))
    assert model.use_approx
    assert np.sqrt(np.mean((model.evaluate() - truth) ** 2)) < 0.3
    # order reduced when there are too few bins; still finite
    small = measure_background(MaskedImage.from_image(img[:100, :100]), BackgroundConfig(bin_size=64))
    assert np.all(np.isfinite(small.evaluate()))


def test_fits_round_trip(tmp_path):
    img = _smooth_image(130, 70) + RNG.normal(0, 1, (130, 70))
    model = measure_background(MaskedImage.from_image(img),
                               BackgroundConfig(bin_size=32, grid="round", algorithm="NATURAL_SPLINE",
                                                use_approx=False))
    path = tmp_path / "bg.fits"
    model.to_fits(path)
    from astropy.io import fits

    hdr = fits.getheader(path)
    assert (hdr["BOXMINX"], hdr["BOXMAXX"], hdr["BOXMAXY"], hdr["ALGORITHM"]) == (0, 69, 129, "NATURAL_SPLINE")
    assert hdr["BOX.MAXY"] == 129
    back = BackgroundModel.from_fits(path)
    assert back.bbox == model.bbox and back.algorithm == model.algorithm
    assert np.array_equal(back.values, model.values)
    assert np.array_equal(back.evaluate(), model.evaluate())
