"""Private temporary names and the sweep of those left by killed writers (calib_core.io.atomic)."""

import os
import subprocess
import sys
import time

import numpy as np
import pytest

from calib_core.errors import InputError
from calib_core.io.atomic import STALE_AGE_S, create_private, private_name, sweep_stale
from calib_core.io.products import read_product, write_product
from calib_core.maskedimage import MaskedImage


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def _named(path, pid, host=None):
    name = private_name(path).name
    parts = name.split("~")
    parts[2] = str(pid)
    if host is not None:
        parts[1] = host
    return path.with_name("~".join(parts))


def test_names_are_private_and_parse(tmp_path):
    target = tmp_path / "flat-det001.fits"
    a, b = private_name(target), private_name(target, "pending")
    assert a != b and a.parent == tmp_path and a.name.startswith(".flat-det001.fits.~")
    assert a.name.endswith(".tmp") and b.name.endswith(".pending")
    assert private_name(target, suffix=".png").name.endswith(".tmp.png")
    with pytest.raises(ValueError, match="tag"):
        private_name(target, "partial")
    made = create_private(target)
    assert made.exists() and (made.stat().st_mode & 0o777) == 0o644


def test_sweep_removes_only_leftovers_of_dead_writers(tmp_path):
    sub = tmp_path / "work" / "det"
    sub.mkdir(parents=True)
    target = sub / "x.fits"
    dead = _named(target, _dead_pid())
    live = _named(target, os.getpid())
    far_old = _named(target, 1, host="otherhost")
    far_young = _named(target, 1, host="otherhost2")
    unrelated = [sub / ".hidden-config", sub / "x.fits", sub / ".x.fits.abc.tmp"]
    for p in [dead, live, far_old, far_young, *unrelated]:
        p.write_bytes(b"partial")
    old = time.time() - STALE_AGE_S - 60
    os.utime(far_old, (old, old))

    removed = sweep_stale(tmp_path)
    assert sorted(removed) == sorted([dead, far_old])
    assert not dead.exists() and not far_old.exists()
    assert all(p.exists() for p in [live, far_young, *unrelated])
    assert sweep_stale(tmp_path / "missing") == []


def test_interrupted_write_leaves_a_sweepable_temporary(tmp_path):
    """A writer killed in the middle of write_product leaves its temporary; the sweep removes it and
    the product is never seen half-written."""
    code = ("import os, signal, numpy as np\n"
            "from astropy.io import fits\n"
            "from calib_core.maskedimage import MaskedImage\n"
            "from calib_core.io.products import write_product\n"
            "real = fits.HDUList.writeto\n"
            "def die(self, name, **kw):\n"
            "    open(name, 'wb').write(b'SIMPLE  = ')\n"
            "    os.kill(os.getpid(), signal.SIGKILL)\n"
            "fits.HDUList.writeto = die\n"
            f"write_product({str(tmp_path / 'p.fits')!r}, MaskedImage.from_image(np.ones((4, 4), np.float32)), {{}})\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True)
    assert proc.returncode == -9, proc.stderr.decode()
    left = [p for p in tmp_path.iterdir()]
    assert len(left) == 1 and left[0].name.startswith(".p.fits.~") and not (tmp_path / "p.fits").exists()
    assert sweep_stale(tmp_path) == left
    assert list(tmp_path.iterdir()) == []
    # and a normal write leaves nothing but the product
    write_product(tmp_path / "p.fits", MaskedImage.from_image(np.ones((4, 4), np.float32)), {})
    assert [p.name for p in tmp_path.iterdir()] == ["p.fits"]
    assert read_product(tmp_path / "p.fits")[0].image.shape == (4, 4)


# -- the per-process cache of calib products -------------------------------------------------------


def _product(path, value):
    rng = np.random.default_rng(int(value))
    mi = MaskedImage(rng.normal(value, 1.0, (40, 30)), (rng.random((40, 30)) < 0.1).astype(np.int32),
                     np.full((40, 30), 2.0))
    write_product(path, mi)
    return mi


def test_read_calib_reads_a_product_once_and_shares_it_read_only(tmp_path, monkeypatch):
    from calib_core.io import products

    monkeypatch.setattr(products, "_CALIBS", products._CalibCache())
    path = tmp_path / "bias.fits"
    truth = _product(path, 100.0)
    reads = []
    real = products.read_product
    monkeypatch.setattr(products, "read_product", lambda p: reads.append(p) or real(p))
    first = products.read_calib(path)
    again = products.read_calib(str(path))
    assert len(reads) == 1 and again is first
    for plane, ref in ((first.image, truth.image), (first.mask, truth.mask), (first.variance, truth.variance)):
        assert np.array_equal(plane, ref) and not plane.flags.writeable
        with pytest.raises(ValueError, match="read-only"):
            plane[0, 0] = 0


def test_read_calib_rereads_a_replaced_product_and_honours_the_budget(tmp_path, monkeypatch):
    from calib_core.io import products

    monkeypatch.setattr(products, "_CALIBS", products._CalibCache())
    path = tmp_path / "flat.fits"
    _product(path, 1.0)
    assert products.read_calib(path).image.mean() == pytest.approx(1.0, abs=0.2)
    newer = _product(path, 5.0)                 # written atomically: a new inode under the same name
    assert np.array_equal(products.read_calib(path).image, newer.image)

    monkeypatch.setenv(products.CALIB_CACHE_ENV, "0")       # nothing kept: each call reads the file
    products._CALIBS.clear()
    assert products.read_calib(path) is not products.read_calib(path)
    monkeypatch.setenv(products.CALIB_CACHE_ENV, "0.02")   # room for one 40x30 product (14 kB), not two
    other = tmp_path / "dark.fits"
    _product(other, 7.0)
    a = products.read_calib(path)
    assert products.read_calib(path) is a
    products.read_calib(other)                  # evicts the least recently used
    assert products.read_calib(path) is not a
    monkeypatch.setenv(products.CALIB_CACHE_ENV, "lots")
    with pytest.raises(InputError, match="CALIBFLOW_CALIB_CACHE_MB='lots'"):
        products.read_calib(other)
    with pytest.raises(products.ProductError, match="missing.fits"):
        products.read_calib(tmp_path / "missing.fits")


@pytest.mark.parametrize("top, bitpix", [(2**8, 8), (2**9, 16)])
def test_a_compact_mask_is_narrow_on_disk_and_int32_when_read(tmp_path, top, bitpix):
    """The builds' intermediates store MASK in one byte when every value fits (the planes the builds
    set, bits 0-7), else in two (bits up to 14): the file is 3 or 2 bytes a pixel smaller and every
    reader (read_product, RowReader bands, astropy's CCDData) gets the same bits; a mask using bit
    15 or above stays int32."""
    from astropy.io import fits
    from astropy.nddata import CCDData

    from calib_core.io.products import RowReader

    rng = np.random.default_rng(3)
    shape = (50, 70)
    mask = rng.integers(0, top, shape).astype(np.int32)
    mask[0, 0] = top - 1
    mi = MaskedImage(rng.normal(0, 1, shape), mask, np.ones(shape))
    wide, narrow = tmp_path / "wide.fits", tmp_path / "narrow.fits"
    write_product(wide, mi)
    write_product(narrow, mi, compact_mask=True)
    assert fits.getheader(narrow, "MASK")["BITPIX"] == bitpix and fits.getheader(wide, "MASK")["BITPIX"] == 32
    assert wide.stat().st_size - narrow.stat().st_size >= 50 * 70 * (4 - bitpix // 8) - 2880
    assert np.array_equal(fits.getdata(narrow, "MASK"), mask)          # as any FITS reader sees it
    back = read_product(narrow)[0]
    assert back.mask.dtype == np.int32 and np.array_equal(back.mask, mask)
    assert np.array_equal(back.image, mi.image) and np.array_equal(back.variance, mi.variance)
    with RowReader(narrow) as r:
        band = r.read_into("MASK", 17, 31, np.empty((14, 70), np.int32))
    assert np.array_equal(band, mask[17:31])
    assert np.array_equal(np.asarray(CCDData.read(narrow, unit="adu").mask), mask != 0)
    high = mask.copy()
    high[0, 0] = 1 << 16
    write_product(narrow, MaskedImage(mi.image, high, mi.variance), compact_mask=True)
    assert fits.getheader(narrow, "MASK")["BITPIX"] == 32 and np.array_equal(read_product(narrow)[0].mask, high)


def test_a_product_without_its_variance_plane_reads_as_zero_variance(tmp_path):
    """``write_product(variance=False)`` (the defects and PTC builds' intermediates, whose variance no
    step reads) writes IMAGE and MASK only, 4 bytes a pixel less; read_product gives a zero variance,
    a RowReader no variance plane, and a stack of such files takes its variance from the inputs'
    spread whatever their number."""
    from astropy.io import fits

    from calib_core.io.products import RowReader
    from calib_core.stats.stack import CombineConfig, stack_files

    rng = np.random.default_rng(5)
    shape = (60, 80)
    paths, full = [], []
    for k in range(3):
        mi = MaskedImage(rng.normal(10.0, 1.0, shape), np.zeros(shape, np.int32), np.full(shape, 1.0))
        with_var, without = tmp_path / f"v{k}.fits", tmp_path / f"n{k}.fits"
        write_product(with_var, mi, compact_mask=True)
        write_product(without, mi, compact_mask=True, variance=False)
        paths.append(without)
        full.append(with_var)
        with fits.open(without) as hdul:
            assert [h.name for h in hdul] == ["PRIMARY", "IMAGE", "MASK"]
        assert with_var.stat().st_size - without.stat().st_size >= 60 * 80 * 4
        back = read_product(without)[0]
        assert np.array_equal(back.image, mi.image) and np.array_equal(back.mask, mi.mask)
        assert not back.variance.any()
        with RowReader(without) as r:
            assert not r.has_variance and r.rows(0, 5)[2] is None
    # three inputs, fewer than max_visits_to_calc_error_from_input_variance: with the planes the
    # output variance is the inputs' propagated (1/3 everywhere), without them the inputs' spread
    assert np.allclose(stack_files(full, CombineConfig())[0].variance, 1.0 / 3.0, rtol=1e-6)
    out = stack_files(paths, CombineConfig())[0]
    data = np.stack([read_product(p)[0].image for p in paths]).astype(np.float64)
    assert np.allclose(out.variance, data.var(axis=0, ddof=1) / 3, rtol=1e-5)   # the mean's, from the spread
