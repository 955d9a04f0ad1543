"""The stacking engine: numba kernels against the NumPy reference, row-band streaming, memory
budget, variance policy, NO_DATA and NaN filling, product files."""

from __future__ import annotations

import math

import numpy as np
import pytest
from astropy.io import fits

from calib_core.io.products import ProductError, RowReader, provenance_cards, read_product, read_rows, write_product
from calib_core.maskedimage import MaskedImage, mask_bits
from calib_core.stats.clipped import stack_statistic
from calib_core.stats.stack import CombineConfig, fill_nans, rows_per_block, stack_arrays, stack_files

BAD, NO_DATA, SAT, CR = (mask_bits([n]) for n in ("BAD", "NO_DATA", "SAT", "CR"))


def make_inputs(rng, n, ny=23, nx=37, ties=True):
    imgs = []
    for i in range(n):
        img = rng.normal(100.0, 5.0, (ny, nx)).astype(np.float32)
        img[rng.random((ny, nx)) < 0.05] += 250.0
        img[rng.random((ny, nx)) < 0.04] = np.nan
        if ties:
            img[:3] = np.round(img[:3] / 4) * 4    # many equal values
        mask = np.zeros((ny, nx), np.int32)
        mask[rng.random((ny, nx)) < 0.06] |= SAT
        mask[rng.random((ny, nx)) < 0.06] |= BAD      # not ignored: propagates
        mask[rng.random((ny, nx)) < 0.03] |= CR
        mask[5, 6] |= SAT                             # every input ignored here
        var = rng.uniform(1.0, 3.0, (ny, nx)).astype(np.float32)
        imgs.append(MaskedImage(img, mask, var))
    return imgs


def reference(config, images, scales=None):
    """NumPy reference: inputs scaled in float32 as afw MaskedImage /= s, then stack_statistic."""
    data = np.stack([im.image for im in images]).astype(np.float32)
    var = np.stack([im.variance for im in images]).astype(np.float32)
    if scales is not None:
        for i, s in enumerate(scales):
            data[i] /= np.float32(s)
            var[i] /= np.float32(s * s)
    use_var = len(images) < config.max_visits_to_calc_error_from_input_variance
    return stack_statistic(config.statistic, data, np.stack([im.mask for im in images]),
                           config.ignore_bits, var if use_var else None, nlow=config.nlow,
                           nhigh=config.nhigh, sigma=config.nsigma, maxiters=config.niter)


@pytest.mark.parametrize("statistic", ["MEANCLIP", "MEAN", "MEDIAN", "MINMAX", "SIGMACLIP"])
@pytest.mark.parametrize("n", [1, 2, 4, 5, 9, 40])
def test_engine_agrees_with_numpy_reference(statistic, n):
    rng = np.random.default_rng(n * 7 + len(statistic))
    images = make_inputs(rng, n)
    scales = list(rng.uniform(0.5, 2.0, n))
    config = CombineConfig(statistic=statistic, fill_nans=False, nlow=1, nhigh=1, mask=["SAT", "CR"])
    out, n_used = stack_arrays(images, config, scales=scales)
    ref = reference(config, images, scales)
    np.testing.assert_array_equal(n_used, ref.n_used)
    np.testing.assert_array_equal(out.mask, ref.mask)
    np.testing.assert_allclose(out.image, ref.value, rtol=2e-6, atol=1e-5, equal_nan=True)
    np.testing.assert_allclose(out.variance, ref.variance, rtol=1e-5, equal_nan=True)
    assert out.mask[5, 6] == NO_DATA and math.isnan(out.image[5, 6])


def test_meanclip_hot_path_with_wide_outliers_and_constant_pixels():
    rng = np.random.default_rng(99)
    n, ny, nx = 40, 8, 300
    data = rng.normal(0, 1, (n, ny, nx)).astype(np.float32)
    data[:, 0, :] = 7.0                           # constant: IQR 0, every value kept
    data[0, 1, :] = 1e30                          # huge outlier
    data[:20, 2, :] = -50.0                       # bimodal
    data[:, 3, :5] = np.nan                       # no data
    data[:39, 4, 10] = np.nan                     # a single admitted value
    images = [MaskedImage.from_image(d) for d in data]
    config = CombineConfig(fill_nans=False)
    out, n_used = stack_arrays(images, config)
    ref = reference(config, images)
    np.testing.assert_array_equal(n_used, ref.n_used)
    np.testing.assert_allclose(out.image, ref.value, rtol=1e-6, atol=1e-6, equal_nan=True)
    np.testing.assert_allclose(out.variance, ref.variance, rtol=1e-5, atol=1e-12, equal_nan=True)
    assert np.all(out.image[0] == 7.0)
    assert n_used[4, 10] == 1


def test_variance_policy_threshold():
    rng = np.random.default_rng(4)
    images = make_inputs(rng, 4, ties=False)
    few = CombineConfig(fill_nans=False, max_visits_to_calc_error_from_input_variance=5)
    many = CombineConfig(fill_nans=False, max_visits_to_calc_error_from_input_variance=4)
    out_few, n_few = stack_arrays(images, few)
    out_many, _ = stack_arrays(images, many)
    data = np.stack([im.image for im in images])
    var = np.stack([im.variance for im in images])
    ok = np.isfinite(data) & ((np.stack([im.mask for im in images]) & few.ignore_bits) == 0)
    # pixels where nothing was clipped: simple closed forms
    simple = np.argwhere((ok.sum(axis=0) == n_few) & (n_few >= 2))
    assert len(simple) > 100
    for y, x in simple[:50]:
        assert out_few.variance[y, x] == pytest.approx(var[ok[:, y, x], y, x].sum() / n_few[y, x] ** 2, rel=1e-5)
        assert out_many.variance[y, x] == pytest.approx(
            np.var(data[ok[:, y, x], y, x].astype(np.float64), ddof=1) / n_few[y, x], rel=1e-5)
    assert not np.allclose(out_few.variance, out_many.variance, equal_nan=True)


def test_fill_nans_cp_pipe_semantics():
    mi = MaskedImage(np.array([[1.0, np.nan], [3.0, 5.0]]), np.zeros((2, 2), np.int32),
                     np.array([[1.0, 2.0], [np.nan, 4.0]]))
    assert fill_nans(mi) == 2
    assert mi.image[0, 1] == 3.0 and mi.variance[0, 1] == 2.0      # medians of the finite pixels
    assert mi.image[1, 0] == 3.0 and mi.variance[1, 0] == 2.0      # NaN variance under a finite image
    assert mi.mask[0, 1] & BAD and mi.mask[1, 0] & BAD and not mi.mask[0, 0]


def test_no_data_pixel_is_filled_and_flagged():
    rng = np.random.default_rng(8)
    images = make_inputs(rng, 6)
    out, n_used = stack_arrays(images, CombineConfig())
    assert n_used[5, 6] == 0
    assert out.mask[5, 6] & NO_DATA and out.mask[5, 6] & BAD
    assert np.isfinite(out.image).all() and np.isfinite(out.variance).all()


def test_scales_are_checked():
    images = make_inputs(np.random.default_rng(1), 3)
    with pytest.raises(ValueError, match="3 inputs"):
        stack_arrays(images, scales=[1.0, 2.0])
    with pytest.raises(ValueError, match="finite and non-zero"):
        stack_arrays(images, scales=[1.0, 0.0, 1.0])
    with pytest.raises(ValueError, match="shape"):
        stack_arrays([images[0], images[1][:5]])


# ------------------------------------------------------------------------------------------------
# files
# ------------------------------------------------------------------------------------------------


def write_inputs(tmp_path, images):
    paths = []
    for i, im in enumerate(images):
        paths.append(write_product(tmp_path / f"in{i}.fits", im, {"EXPID": f"e{i}"}))
    return paths


@pytest.mark.parametrize("statistic", ["MEANCLIP", "MEDIAN", "SIGMACLIP"])
def test_stack_files_equals_in_memory_and_reads_each_byte_once(tmp_path, monkeypatch, statistic):
    rng = np.random.default_rng(21)
    images = make_inputs(rng, 7)
    paths = write_inputs(tmp_path, images)
    ny, nx = images[0].shape
    # two bands of 3 rows: 7 inputs * 3 rows * 37 px * 8 B (image + mask; 7 >= 5 so no variance)
    config = CombineConfig(statistic=statistic, memory_budget=2 * 7 * 3 * nx * 8)
    assert rows_per_block(7, nx, 8, config.memory_budget // 2) == 3
    opened, reads = [], []
    orig_init, orig_read = RowReader.__init__, RowReader.read_into

    def counting_init(self, path):
        opened.append(str(path))
        orig_init(self, path)

    def counting_read(self, plane, y0, y1, out):
        reads.append((self.path, plane, y0, y1))
        return orig_read(self, plane, y0, y1, out)

    monkeypatch.setattr(RowReader, "__init__", counting_init)
    monkeypatch.setattr(RowReader, "read_into", counting_read)
    out_f, n_f = stack_files(paths, config)
    out_m, n_m = stack_arrays(images, config)
    np.testing.assert_array_equal(n_f, n_m)
    np.testing.assert_array_equal(out_f.image, out_m.image)
    np.testing.assert_array_equal(out_f.mask, out_m.mask)
    np.testing.assert_array_equal(out_f.variance, out_m.variance)
    assert sorted(opened) == sorted(str(p) for p in paths)            # each file opened once
    for p in paths:
        for plane in ("IMAGE", "MASK"):
            bands = sorted((y0, y1) for path, pl, y0, y1 in reads if path == str(p) and pl == plane)
            assert bands[0][0] == 0 and bands[-1][1] == ny                # covers every row ...
            assert all(a[1] == b[0] for a, b in zip(bands, bands[1:]))   # ... exactly once
            assert max(y1 - y0 for y0, y1 in bands) == 3
        assert not any(path == str(p) and pl == "VARIANCE" for path, pl, *_ in reads)


def test_stack_files_reads_variance_when_few_inputs(tmp_path):
    rng = np.random.default_rng(2)
    images = make_inputs(rng, 3)
    paths = write_inputs(tmp_path, images)
    out_f, _ = stack_files(paths, CombineConfig(memory_budget=1000))
    out_m, _ = stack_arrays(images, CombineConfig())
    np.testing.assert_array_equal(out_f.variance, out_m.variance)


def test_stack_files_accepts_image_only_files(tmp_path):
    rng = np.random.default_rng(3)
    data = rng.normal(10, 1, (6, 9, 11)).astype(np.float32)
    paths = []
    for i, d in enumerate(data):
        p = tmp_path / f"plain{i}.fits"
        fits.PrimaryHDU(d).writeto(p)
        paths.append(p)
    out, n_used = stack_files(paths, CombineConfig(statistic="MEAN"))
    np.testing.assert_allclose(out.image, data.astype(np.float64).mean(axis=0), rtol=1e-6)
    assert (n_used == 6).all()


def test_stack_files_errors_name_the_file(tmp_path):
    rng = np.random.default_rng(5)
    images = make_inputs(rng, 2)
    paths = write_inputs(tmp_path, images)
    odd = write_product(tmp_path / "odd.fits", images[0][:10], {})
    with pytest.raises(ProductError, match="odd.fits.*shape"):
        stack_files([*paths, odd])
    broken = tmp_path / "broken.fits"
    broken.write_bytes(b"SIMPLE  = this is not FITS" * 10)
    with pytest.raises(ProductError, match="broken.fits"):
        stack_files([*paths, broken])
    truncated = tmp_path / "trunc.fits"
    truncated.write_bytes(paths[0].read_bytes()[:-20000])
    with pytest.raises(ProductError, match="trunc.fits"):
        stack_files([*paths, truncated])
    with pytest.raises(ProductError, match="missing.fits.*not found"):
        stack_files([*paths, tmp_path / "missing.fits"])


# ------------------------------------------------------------------------------------------------
# products
# ------------------------------------------------------------------------------------------------


def test_product_roundtrip_rows_and_headers(tmp_path):
    import datetime as dt

    rng = np.random.default_rng(6)
    mi = make_inputs(rng, 1)[0]
    t0 = dt.datetime(2026, 11, 20, 3, 0, tzinfo=dt.timezone.utc)
    cards = provenance_cards("dark", {"detector": 3, "calibDate": "2026-11-20"}, ["e2", "e1", "e2"],
                             dates=[t0, t0 + dt.timedelta(hours=1)], exptimes=[300.0, 300.0], exptime=1.0)
    path = write_product(tmp_path / "dark.fits", mi, cards)
    assert [p.name for p in tmp_path.iterdir()] == ["dark.fits"]      # no temporary left behind
    back, header = read_product(path)
    np.testing.assert_array_equal(back.image, mi.image)
    np.testing.assert_array_equal(back.mask, mi.mask)
    np.testing.assert_array_equal(back.variance, mi.variance)
    assert header["OBSTYPE"] == "dark"
    assert header["CALIB_ID"] == "detector=3 calibDate=2026-11-20"
    assert header["CALIB_INPUT_0"] == "e1" and header["CALIB_INPUT_1"] == "e2" and "CALIB_INPUT_2" not in header
    assert header["NCOMBINE"] == 3
    assert header["DATE-OBS"] == "2026-11-20T03:00:00.000"
    assert header["DATE-END"] == "2026-11-20T04:05:00.000"
    assert header["DATE-AVG"] == "2026-11-20T03:32:30.000"
    assert header["EXPTIME"] == 1.0 and header["DARKTIME"] == 1.0
    assert "CALIB_CREATION_DATE" in header and "CALIB_CREATION_TIME" in header
    assert any(k.startswith("MP_") for k in header)
    img, msk, var = read_rows(path, 4, 9)
    np.testing.assert_array_equal(img, mi.image[4:9])
    np.testing.assert_array_equal(msk, mi.mask[4:9])
    np.testing.assert_array_equal(var, mi.variance[4:9])
    # the file is standard FITS that astropy reads the same way
    with fits.open(path) as hdul:
        np.testing.assert_array_equal(hdul["IMAGE"].data, mi.image)


def test_write_product_is_atomic_on_failure(tmp_path, monkeypatch):
    mi = MaskedImage.empty((4, 4))
    target = write_product(tmp_path / "p.fits", mi, {"A": 1})
    before = target.read_bytes()

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(fits.HDUList, "writeto", boom)
    with pytest.raises(OSError, match="disk full"):
        write_product(target, MaskedImage.from_image(np.ones((4, 4))), {"A": 2})
    assert target.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["p.fits"]


def test_bswap_kernel():
    from calib_core.stats._kernels import bswap32_inplace

    a = np.arange(1000, dtype=np.float32) * 1.5
    be = a.astype(">f4").view(np.uint32).copy()
    bswap32_inplace(be)
    np.testing.assert_array_equal(be.view(np.float32), a)


@pytest.mark.parametrize("niter,nsigma", [(0, 3.0), (1, 2.0), (5, 2.5)])
@pytest.mark.parametrize("n", [3, 12])
def test_meanclip_iterations_and_clip_widths_agree_with_reference(niter, nsigma, n):
    rng = np.random.default_rng(100 + n + niter)
    images = make_inputs(rng, n)
    config = CombineConfig(niter=niter, nsigma=nsigma, fill_nans=False)
    out, n_used = stack_arrays(images, config)
    data = np.stack([im.image for im in images])
    use_var = n < config.max_visits_to_calc_error_from_input_variance
    ref = stack_statistic("MEANCLIP", data, np.stack([im.mask for im in images]), config.ignore_bits,
                          np.stack([im.variance for im in images]) if use_var else None,
                          nsigma=nsigma, niter=niter)
    np.testing.assert_array_equal(n_used, ref.n_used)
    np.testing.assert_allclose(out.image, ref.value, rtol=2e-6, atol=1e-5, equal_nan=True)
    np.testing.assert_allclose(out.variance, ref.variance, rtol=1e-5, equal_nan=True)


# ------------------------------------------------------------------------------------------------
# MEANCLIP block kernel: sorting network, blocks of pixels, its fast paths
# ------------------------------------------------------------------------------------------------


def test_sorting_network_sorts_every_zero_one_input():
    """0-1 principle: a comparator network that sorts all 2**n inputs of 0s and 1s sorts any input.
    Checked for the plain comparator list and for the kernel running its fused program."""
    from calib_core.stats._kernels import _sort_columns, sorting_network, sorting_program

    for n in range(1, 19):
        comps = sorting_network(n)
        if n > 1:
            assert (comps[:, 0] < comps[:, 1]).all() and comps.max() < n
        x = ((np.arange(2 ** n)[:, None] >> np.arange(n)) & 1).astype(np.int8)
        for a, b in comps:
            lo, hi = np.minimum(x[:, a], x[:, b]), np.maximum(x[:, a], x[:, b])
            x[:, a], x[:, b] = lo, hi
        assert (np.diff(x, axis=1) >= 0).all(), n
        ops, rows = sorting_program(n)
        s = np.full((rows, 2 ** n), np.inf, np.float32)
        s[:n] = ((np.arange(2 ** n)[None, :] >> np.arange(n)[:, None]) & 1)
        ones = s[:n].sum(axis=0)
        _sort_columns(s, ops, 2 ** n)
        assert (np.diff(s[:n], axis=0) >= 0).all() and (s[n:] == np.inf).all(), n
        assert (s[:n].sum(axis=0) == ones).all()


@pytest.mark.parametrize("n", [23, 40, 41, 64, 100, 257])
def test_sort_program_kernel_sorts_columns(n):
    from calib_core.stats._kernels import _sort_columns, sorting_program

    ops, rows = sorting_program(n)
    assert {1, 2} <= set(ops[:, 0])                                # the fused groups are used
    rng = np.random.default_rng(n)
    s = np.full((rows, 48), np.inf, np.float32)
    s[:n] = np.round(rng.normal(0, 3, (n, 48)))                     # many ties
    s[:n][rng.random((n, 48)) < 0.1] = np.inf                        # non-admitted values
    s[:n, 5] = 2.0
    expect = np.sort(s[:n], axis=0)
    _sort_columns(s, ops, 45)                                        # the first 45 columns only
    np.testing.assert_array_equal(s[:n, :45], expect[:, :45])
    assert (s[n:] == np.inf).all()


@pytest.mark.parametrize("n", [5, 16, 40, 41])
@pytest.mark.parametrize("use_var,niter,has_mask", [(False, 3, True), (True, 3, True), (False, 0, True),
                                                    (False, 3, False)])
def test_meanclip_kernel_blocks_agree_with_reference(n, use_var, niter, has_mask):
    """Blocks of 16 pixels (6 per row, the last one 3 wide) done in three calls, rows of a larger
    buffer, and rows that take each path: equal counts (row-wise quartiles, shared middle sums), mixed counts, a middle
    row rejected in some pixels (full scan), ties and constant pixels."""
    from calib_core.stats._kernels import meanclip_blocks, sorting_program

    rng = np.random.default_rng(1000 + n + niter)
    ny, nx = 6, 83
    data = rng.normal(1000.0, 10.0, (n, ny + 2, nx)).astype(np.float32)     # 2 rows not combined
    data[:, 1][rng.random((n, nx)) < 0.03] += rng.uniform(100, 5000)        # outliers
    data[:, 2, 16:48][rng.random((n, 32)) < 0.1] = np.nan                   # mixed counts
    data[: n // 5, 3, 20:30] -= 200.0                    # a low group: rows past the first two go
    data[:, 4] = np.round(data[:, 4] / 8) * 8                                # ties
    data[:, 4, :5] = 1000.0                                                  # constant
    data[:, 5, 70:] = np.nan                                                 # no data
    masks = np.zeros(data.shape, np.int32)
    masks[:, 2, 30:60][rng.random((n, 30)) < 0.1] |= SAT
    masks[:, 2][rng.random((n, nx)) < 0.2] |= BAD                            # propagates
    var = rng.uniform(1.0, 3.0, data.shape).astype(np.float32)
    ref = stack_statistic("MEANCLIP", data[:, :ny], masks[:, :ny] if has_mask else None, SAT,
                          var[:, :ny] if use_var else None, nsigma=3.0, niter=niter, no_data_bit=NO_DATA)
    outs = (np.zeros((ny, nx), np.float32), np.zeros((ny, nx), np.float32), np.zeros((ny, nx), np.int32),
            np.zeros((ny, nx), np.int16))
    for b0, b1 in ((0, 7), (7, 20), (20, ny * 6)):            # blocks in three pieces, as threads get them
        meanclip_blocks(data, masks, has_mask, var, use_var, np.int32(SAT), *sorting_program(n), 16, b0, b1,
                        3.0, niter, np.int32(NO_DATA), *outs)
    np.testing.assert_array_equal(outs[3], ref.n_used)
    np.testing.assert_array_equal(outs[2], ref.mask)
    np.testing.assert_allclose(outs[0], ref.value, rtol=1e-6, atol=1e-6, equal_nan=True)
    np.testing.assert_allclose(outs[1], ref.variance, rtol=1e-5, equal_nan=True)
    assert (outs[3][5, 70:] == 0).all() and (outs[2][5, 70:] == NO_DATA).all()
    assert (outs[0][4, :5] == 1000.0).all()
    if niter:
        assert (outs[3][3, 20:30] <= n - n // 5).all()


def test_meanclip_bit_identical_to_reference_on_bias_like_data():
    """The kernel's sums differ from the reference's only in float64 rounding (shifted sums); on
    bias-like data (Gaussian noise, 0.1 % cosmic rays, as the benchmark) that never reaches the
    float32 outputs: they are bit for bit the reference's."""
    rng = np.random.default_rng(5)
    n, ny, nx = 40, 12, 600
    data = rng.normal(1000.0, 10.0, (n, ny, nx)).astype(np.float32)
    k = rng.integers(0, data.size, data.size // 1000)
    data.ravel()[k] += rng.uniform(200, 5000, k.size).astype(np.float32)
    config = CombineConfig(fill_nans=False, mask=[])
    out, n_used = stack_arrays([MaskedImage.from_image(d) for d in data], config)
    ref = stack_statistic("MEANCLIP", data, None, 0, None, nsigma=3.0, niter=3)
    np.testing.assert_array_equal(n_used, ref.n_used)
    np.testing.assert_array_equal(out.image, ref.value)
    np.testing.assert_array_equal(out.variance, ref.variance)


def test_stack_files_large_outputs_from_the_heap(tmp_path):
    """Outputs and band buffers of >= 4 MB come from the heap (docs/architecture.md#fresh-memory):
    zero-filled, writeable, and the result equals the in-memory engine's."""
    from calib_core.stats.stack import _heap_zeros

    a = _heap_zeros((1100, 1000), np.int32)
    assert a.shape == (1100, 1000) and a.dtype == np.int32 and a.flags.writeable and not a.any()
    rng = np.random.default_rng(12)
    data = rng.normal(50, 2, (6, 1030, 1024)).astype(np.float32)
    data[2, 5, 7] = np.nan
    paths = []
    for i, d in enumerate(data):
        fits.PrimaryHDU(d).writeto(tmp_path / f"big{i}.fits")
        paths.append(tmp_path / f"big{i}.fits")
    out_f, n_f = stack_files(paths, CombineConfig(fill_nans=False))
    out_m, n_m = stack_arrays([MaskedImage.from_image(d) for d in data], CombineConfig(fill_nans=False))
    assert out_f.image.flags.writeable and n_f.flags.writeable
    np.testing.assert_array_equal(out_f.image, out_m.image)
    np.testing.assert_array_equal(out_f.variance, out_m.variance)
    np.testing.assert_array_equal(out_f.mask, out_m.mask)
    np.testing.assert_array_equal(n_f, n_m)
    assert n_f[5, 7] < 6 and n_f.max() == 6


@pytest.mark.skipif(not hasattr(__import__("os"), "fork"), reason="needs os.fork")
def test_stack_after_fork_starts_new_worker_threads():
    """A child forked after the pools started (multiprocessing's default on Linux) must not wait on
    the parent's threads, which it does not have."""
    import os

    images = [MaskedImage.from_image(np.full((8, 300), float(i), np.float32)) for i in range(6)]
    expect, _ = stack_arrays(images, CombineConfig(fill_nans=False))   # the pools exist now
    pid = os.fork()
    if pid == 0:                                                        # child: exit code = result
        try:
            out, _ = stack_arrays(images, CombineConfig(fill_nans=False))
            os._exit(0 if np.array_equal(out.image, expect.image) else 1)
        except BaseException:
            os._exit(2)
    import signal
    import time

    deadline = time.monotonic() + 120
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            break
        if time.monotonic() > deadline:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            pytest.fail("the forked child hung waiting for worker threads")
        time.sleep(0.05)
    assert os.waitstatus_to_exitcode(status) == 0
