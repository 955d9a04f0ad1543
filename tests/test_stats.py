"""calib_core.stats.clipped against brute-force references written here with plain Python loops."""

from __future__ import annotations

import math

import numpy as np
import pytest
from astropy.stats import sigma_clip

from calib_core.maskedimage import mask_bits
from calib_core.stats.clipped import IQR_TO_SIGMA, ClippedStats, clipped_mean, compute_statistic, stack_statistic

NO_DATA = mask_bits(["NO_DATA"])


# ------------------------------------------------------------------------------------------------
# brute-force references (loops, no vectorisation)
# ------------------------------------------------------------------------------------------------


def bf_percentile(sorted_vals, q):
    n = len(sorted_vals)
    p = q * (n - 1)
    k = int(math.floor(p))
    t = p - k
    if t == 0:
        return sorted_vals[k]
    a, b = sorted_vals[k], sorted_vals[k + 1]
    return a + (b - a) * t


def bf_mean_var(xs):
    n = len(xs)
    if n == 0:
        return math.nan, math.nan, 0
    m = 0.0
    for x in xs:
        m += x
    m /= n
    if n == 1:
        return m, math.nan, 1
    s = 0.0
    for x in xs:
        s += (x - m) * (x - m)
    return m, s / (n - 1), n


def bf_admitted(values, masks, ignore):
    out, om = [], 0
    for i, v in enumerate(values):
        v = float(v)
        m = 0 if masks is None else int(masks[i])
        if math.isfinite(v) and (m & ignore) == 0:
            out.append(v)
            om |= m
    return out, om


def bf_meanclip(xs, nsigma=3.0, niter=3):
    """docs/algorithms.md#meanclip, literally."""
    if not xs:
        return math.nan, math.nan, 0
    s = sorted(xs)
    med = bf_percentile(s, 0.5)
    iqr = bf_percentile(s, 0.75) - bf_percentile(s, 0.25)
    mean, var, n = math.nan, math.nan, 0
    for it in range(niter):
        if it == 0:
            centre, width = med, nsigma * 0.741301109252802 * iqr
        else:
            centre = mean
            width = nsigma * math.sqrt(max(var, 0.0)) if n > 1 else nsigma * 0.741301109252802 * iqr
        if not (math.isfinite(centre) and math.isfinite(width)):
            return math.nan, math.nan, 0
        kept = [x for x in xs if abs(x - centre) <= width]
        mean, var, n = bf_mean_var(kept)
    return mean, var, n


def bf_minmax(xs, nlow, nhigh):
    s = sorted(xs)
    kept = s[nlow:len(s) - nhigh] if len(s) > nlow + nhigh else []
    return bf_mean_var(kept)


def random_values(rng, n, nan_frac=0.1, outlier_frac=0.1):
    x = rng.normal(50.0, 3.0, n)
    x[rng.random(n) < outlier_frac] += rng.choice([-1, 1]) * rng.uniform(20, 500)
    x[rng.random(n) < nan_frac] = np.nan
    return x


# ------------------------------------------------------------------------------------------------


def test_iqr_factor_is_afw_value():
    assert IQR_TO_SIGMA == 0.741301109252802
    # 1 / (2 * Phi^-1(0.75))
    from scipy.stats import norm

    assert IQR_TO_SIGMA == pytest.approx(1 / (2 * norm.ppf(0.75)), rel=1e-12)


@pytest.mark.parametrize("n", [0, 1, 2, 3, 4, 5, 8, 33, 200])
@pytest.mark.parametrize("nsigma,niter", [(3.0, 3), (2.0, 1), (2.5, 5)])
def test_clipped_mean_matches_brute_force(n, nsigma, niter):
    rng = np.random.default_rng(1000 + n)
    x = random_values(rng, n)
    masks = np.where(rng.random(n) < 0.15, 4, 0).astype(np.int32) | np.where(rng.random(n) < 0.2, 1, 0).astype(np.int32)
    got = clipped_mean(x, masks, ignore_bits=4, nsigma=nsigma, niter=niter)
    xs, om = bf_admitted(x, masks, 4)
    mean, var, nu = bf_meanclip(xs, nsigma, niter)
    assert isinstance(got, ClippedStats)
    assert got.npoint == len(xs)
    assert got.n_used == nu
    assert got.or_mask == om
    np.testing.assert_allclose(got.mean, mean, rtol=1e-12, equal_nan=True)
    np.testing.assert_allclose(got.variance, var, rtol=1e-9, equal_nan=True)
    expected_err = math.sqrt(var / nu) if nu > 0 else math.nan
    np.testing.assert_allclose(got.error, expected_err, rtol=1e-9, equal_nan=True)
    if xs:
        assert got.median == pytest.approx(bf_percentile(sorted(xs), 0.5), rel=1e-12)


def test_meanclip_passes_reselect_from_all_pixels():
    # An outlier rejected by the IQR pass is re-admitted if a later, wider window contains it:
    # rejections do not accumulate.
    x = np.array([0.0, 0.0, 0.0, 0.0, 10.0, 10.0, 10.0, 10.0, 4.0])
    got = clipped_mean(x, nsigma=3.0, niter=2)
    mean, var, n = bf_meanclip(list(x), 3.0, 2)
    assert got.n_used == n
    assert got.mean == pytest.approx(mean)


def test_meanclip_inclusive_bounds():
    # values exactly at centre +- width are kept: median 0, IQR 2 -> width 3*0.7413*2
    w = 3 * IQR_TO_SIGMA * 2.0
    x = np.array([-1.0, -1.0, 0.0, 1.0, 1.0, w, -w])
    xs = list(x)
    got = clipped_mean(x, niter=1)
    mean, _, n = bf_meanclip(xs, 3.0, 1)
    assert got.n_used == n
    assert got.mean == pytest.approx(mean)


def test_meanclip_ignores_nan_and_masked_and_reports_or_mask_of_admitted():
    x = np.array([1.0, 2.0, np.nan, 3.0, 1000.0, 1.5, 2.5, 1.8])
    m = np.array([1, 2, 8, 16, 0, 0, 0, 0], np.int32)
    got = clipped_mean(x, m, ignore_bits=16)
    assert got.npoint == 6          # nan and the masked 3.0 are not admitted
    assert got.or_mask == 1 | 2     # the NaN's mask (8) and the ignored (16) are not ORed
    assert got.n_used == 5          # 1000 is clipped
    assert got.mean == pytest.approx((1.0 + 2.0 + 1.5 + 2.5 + 1.8) / 5)


def test_single_value_and_empty():
    one = clipped_mean([5.0])
    assert one.mean == 5.0 and one.n_used == 1 and math.isnan(one.variance)
    none = clipped_mean([np.nan, np.inf])
    assert math.isnan(none.mean) and none.npoint == 0 and none.n_used == 0


def test_mean_median_errors():
    rng = np.random.default_rng(5)
    x = rng.normal(10, 2, 101)
    mean, var, n = bf_mean_var(list(x))
    got = compute_statistic("MEAN", x)
    assert got.mean == pytest.approx(mean, rel=1e-12)
    assert got.error == pytest.approx(math.sqrt(var / n), rel=1e-9)
    med = compute_statistic("median", x)
    assert med.mean == pytest.approx(bf_percentile(sorted(x), 0.5))
    assert med.error == pytest.approx(math.sqrt(math.pi / 2 * var / n), rel=1e-9)


@pytest.mark.parametrize("nlow,nhigh", [(0, 0), (1, 1), (2, 0), (3, 4)])
def test_minmax_matches_brute_force(nlow, nhigh):
    rng = np.random.default_rng(nlow * 10 + nhigh)
    x = random_values(rng, 9)
    got = compute_statistic("MINMAX", x, nlow=nlow, nhigh=nhigh)
    xs, _ = bf_admitted(x, None, 0)
    mean, var, n = bf_minmax(xs, nlow, nhigh)
    assert got.n_used == n
    np.testing.assert_allclose(got.mean, mean, rtol=1e-12, equal_nan=True)


@pytest.mark.parametrize("kwargs", [{}, {"sigma": 2.0, "maxiters": 2}, {"sigma": 2.5, "maxiters": None},
                                    {"sigma": 2.0, "cenfunc": "mean", "stdfunc": "mad_std"},
                                    {"sigma_lower": 1.5, "sigma_upper": 4.0}])
def test_sigmaclip_identical_to_astropy(kwargs):
    rng = np.random.default_rng(7)
    x = random_values(rng, 300, outlier_frac=0.05)
    got = compute_statistic("SIGMACLIP", x, **kwargs)
    ref = sigma_clip(x[np.isfinite(x)], masked=True, **{"maxiters": 5, **kwargs})
    kept = ref.compressed()
    assert got.n_used == kept.size
    assert got.mean == pytest.approx(kept.astype(np.float64).mean(), rel=1e-12)


def test_unknown_statistic_and_bad_mask_shape():
    with pytest.raises(ValueError, match="unknown statistic"):
        compute_statistic("MODE", [1.0, 2.0])
    with pytest.raises(ValueError, match="mask shape"):
        compute_statistic("MEAN", [1.0, 2.0], mask=[0])


# ------------------------------------------------------------------------------------------------
# per pixel across a stack
# ------------------------------------------------------------------------------------------------


def random_stack(rng, n, ny=6, nx=7):
    data = rng.normal(100.0, 4.0, (n, ny, nx)).astype(np.float32)
    data[rng.random(data.shape) < 0.07] += 300.0
    data[rng.random(data.shape) < 0.07] = np.nan
    masks = np.zeros(data.shape, np.int32)
    masks[rng.random(data.shape) < 0.1] |= 2
    masks[rng.random(data.shape) < 0.1] |= 32
    masks[:, 0, 0] |= 2                      # one pixel with every input ignored
    variances = rng.uniform(1.0, 4.0, data.shape).astype(np.float32)
    return data, masks, variances


@pytest.mark.parametrize("n", [1, 2, 3, 6, 15])
def test_stack_meanclip_matches_per_pixel_brute_force(n):
    rng = np.random.default_rng(n)
    data, masks, variances = random_stack(rng, n)
    res = stack_statistic("MEANCLIP", data, masks, ignore_bits=2)
    res_v = stack_statistic("MEANCLIP", data, masks, ignore_bits=2, variances=variances)
    for y in range(data.shape[1]):
        for x in range(data.shape[2]):
            xs, om = bf_admitted(data[:, y, x], masks[:, y, x], 2)
            mean, var, nu = bf_meanclip(xs)
            if not xs:
                assert res.mask[y, x] == NO_DATA and math.isnan(res.value[y, x]) and res.n_used[y, x] == 0
                continue
            assert res.mask[y, x] == om
            assert res.n_used[y, x] == nu
            np.testing.assert_allclose(res.value[y, x], mean, rtol=1e-6, equal_nan=True)
            np.testing.assert_allclose(res.variance[y, x], var / nu if nu else np.nan, rtol=1e-5,
                                       equal_nan=True)
            # variance from the inputs: sum over the clipped survivors / n**2
            centre_kept = [i for i in range(n) if math.isfinite(data[i, y, x]) and not masks[i, y, x] & 2]
            s = sorted(float(data[i, y, x]) for i in centre_kept)
            m2, v2, n2 = bf_meanclip(s)
            # reproduce which inputs the last pass kept
            med = bf_percentile(s, 0.5)
            iqr_w = 3 * 0.741301109252802 * (bf_percentile(s, 0.75) - bf_percentile(s, 0.25))
            c, w, mm, vv, nn = med, iqr_w, None, None, 0
            for it in range(3):
                if it:
                    c = mm
                    w = 3 * math.sqrt(max(vv, 0)) if nn > 1 else iqr_w
                kept = [i for i in centre_kept if abs(float(data[i, y, x]) - c) <= w]
                mm, vv, nn = bf_mean_var([float(data[i, y, x]) for i in kept])
            vsum = sum(float(variances[i, y, x]) for i in kept)
            np.testing.assert_allclose(res_v.variance[y, x], vsum / nn ** 2 if nn else np.nan, rtol=1e-5,
                                       equal_nan=True)


@pytest.mark.parametrize("name", ["MEAN", "MEDIAN", "MINMAX"])
def test_stack_other_statistics_match_brute_force(name):
    rng = np.random.default_rng(11)
    data, masks, _ = random_stack(rng, 7)
    res = stack_statistic(name, data, masks, ignore_bits=32, nlow=1, nhigh=2)
    for y in range(data.shape[1]):
        for x in range(data.shape[2]):
            xs, om = bf_admitted(data[:, y, x], masks[:, y, x], 32)
            if name == "MEAN":
                mean, var, n = bf_mean_var(xs)
                err2 = var / n if n else math.nan
            elif name == "MEDIAN":
                _, var, n = bf_mean_var(xs)
                mean = bf_percentile(sorted(xs), 0.5) if xs else math.nan
                err2 = math.pi / 2 * var / n if n else math.nan
            else:
                mean, var, n = bf_minmax(xs, 1, 2)
                err2 = var / n if n else math.nan
            assert res.n_used[y, x] == n
            np.testing.assert_allclose(res.value[y, x], mean, rtol=1e-6, equal_nan=True)
            np.testing.assert_allclose(res.variance[y, x], err2, rtol=1e-5, equal_nan=True)
            if xs:
                assert res.mask[y, x] == om


def test_stack_sigmaclip_identical_to_astropy_per_pixel():
    rng = np.random.default_rng(3)
    data = rng.normal(0, 1, (25, 5, 6)).astype(np.float32)
    data[rng.random(data.shape) < 0.08] = 8.0
    res = stack_statistic("SIGMACLIP", data, sigma=2.5, maxiters=4)
    for y in range(5):
        for x in range(6):
            ref = sigma_clip(data[:, y, x], sigma=2.5, maxiters=4, masked=True).compressed()
            assert res.n_used[y, x] == ref.size
            assert res.value[y, x] == pytest.approx(ref.astype(np.float64).mean(), rel=1e-6)


def test_stack_shapes_are_checked():
    with pytest.raises(ValueError, match=r"\(N, ny, nx\)"):
        stack_statistic("MEAN", np.zeros((3, 4)))
    with pytest.raises(ValueError, match="masks shape"):
        stack_statistic("MEAN", np.zeros((3, 4, 4)), masks=np.zeros((2, 4, 4), np.int32))


def test_nanpercentile0_is_numpys_nanpercentile():
    """The vectorised percentile gives NumPy's own values, bit for bit: NaNs anywhere, columns with
    one value or none, ties, 2-D and 3-D stacks (NumPy's nanpercentile is the reference here)."""
    import warnings

    from calib_core.stats.clipped import nanpercentile0

    rng = np.random.default_rng(5)
    for shape in [(7, 300), (2, 50), (13, 17, 11), (1, 40)]:
        x = rng.normal(size=shape) * rng.choice([1.0, 1e3], size=shape)
        x[rng.random(shape) < 0.3] = np.nan
        x[..., 0] = np.nan                       # a column with no value
        x[1:, ..., 1] = np.nan                   # a column with one value
        x[..., 2] = 4.0                          # ties
        qs = [25.0, 50.0, 75.0, 10.0, 90.0, 0.0, 100.0]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            ref = np.nanpercentile(x, qs, axis=0)
        np.testing.assert_array_equal(nanpercentile0(x, qs), ref)
