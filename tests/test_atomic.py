"""Private temporary names and the sweep of those left by killed writers (calib_core.io.atomic)."""

import os
import subprocess
import sys
import time

import numpy as np
import pytest

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
