"""Writing over retired intermediates (calib_core.io.recycle, docs/architecture.md#recycled-files):
the pool's files are reused in place (same inode), products read back exactly, the pool never
outlives its block or its limit, and a killed process's pool is swept."""

import os
import socket

import numpy as np
import pytest

from calib_core.io import recycle
from calib_core.io.products import read_product, write_product
from calib_core.maskedimage import MaskedImage
from calib_core.repository import retention
from calib_core.repository.retention import remove_files, survey


def _image(seed, shape=(64, 80)):
    rng = np.random.default_rng(seed)
    return MaskedImage(rng.normal(100, 5, shape).astype(np.float32), rng.integers(0, 4, shape).astype(np.int32),
                       rng.random(shape).astype(np.float32))


def _same(a: MaskedImage, b: MaskedImage):
    return (np.array_equal(a.image, b.image) and np.array_equal(a.mask, b.mask)
            and np.array_equal(a.variance, b.variance))


def test_a_new_file_is_written_over_a_retired_one(tmp_path):
    work = tmp_path / "work"
    (work / "cam" / "bias").mkdir(parents=True)
    calib = tmp_path / "calib"
    calib.mkdir()
    big, small = _image(1, (120, 100)), _image(2)
    old = write_product(work / "cam" / "bias" / "a.fits", big)
    inode = old.stat().st_ino
    with recycle.recycling(work):
        size = old.stat().st_size
        assert remove_files([old]) == (1, size)
        assert not old.exists()
        pool = list((work / recycle.POOL_DIRNAME).iterdir())
        assert len(pool) == 1 and pool[0].stat().st_ino == inode
        before = recycle.stats()["claimed"]
        new = write_product(calib / "b.fits", small)        # smaller than the retired file: cut to length
        assert recycle.stats()["claimed"] == before + 1
        assert new.stat().st_ino == inode
        assert not list((work / recycle.POOL_DIRNAME).iterdir())
        back, _ = read_product(new)
        assert _same(back, small)
        # the file ends where the FITS ends: no bytes of the retired file after it
        assert new.stat().st_size % 2880 == 0
        fresh = tmp_path / "fresh.fits"
        write_product(fresh, small)
        assert new.stat().st_size == fresh.stat().st_size
        # an empty pool: a fresh file, as without one
        other = write_product(calib / "c.fits", big)
        assert other.stat().st_ino != inode and _same(read_product(other)[0], big)
    assert not (work / recycle.POOL_DIRNAME).exists()


def test_a_larger_file_grows_over_a_smaller_retired_one(tmp_path):
    work = tmp_path / "work"
    work.mkdir()
    old = write_product(work / "x-det000-k.fits", _image(3, (16, 16)))
    inode = old.stat().st_ino
    big = _image(4, (200, 150))
    with recycle.recycling(work):
        remove_files([old])
        new = write_product(work / "y.fits", big)
        assert new.stat().st_ino == inode
        assert _same(read_product(new)[0], big)


def test_the_pool_is_emptied_when_the_outermost_block_ends(tmp_path):
    work = tmp_path / "work"
    work.mkdir()
    files = [write_product(work / f"e{i}.fits", _image(i)) for i in range(3)]
    with recycle.recycling(work):
        with recycle.recycling(work):           # a night's build: shares the night's pool
            remove_files(files[:2])
        assert len(list((work / recycle.POOL_DIRNAME).iterdir())) == 2   # the inner end kept it
        remove_files(files[2:])
        assert recycle.active()
    assert not recycle.active()
    assert not any(p.exists() for p in files)
    assert not (work / recycle.POOL_DIRNAME).exists()
    assert sorted(p.name for p in work.iterdir()) == []


def test_the_limit_deletes_what_does_not_fit(tmp_path, monkeypatch):
    work = tmp_path / "work"
    work.mkdir()
    files = [write_product(work / f"e{i}.fits", _image(i)) for i in range(3)]
    size = files[0].stat().st_size
    monkeypatch.setenv(recycle.LIMIT_ENV, str(1.5 * size / 2 ** 20))   # room for one
    with recycle.recycling(work):
        n, freed = remove_files(files)
        assert (n, freed) == (3, 3 * size)
        assert len(list((work / recycle.POOL_DIRNAME).iterdir())) == 1
    assert not any(p.exists() for p in files)
    monkeypatch.setenv(recycle.LIMIT_ENV, "0")                          # off
    files = [write_product(work / f"f{i}.fits", _image(i)) for i in range(2)]
    with recycle.recycling(work):
        assert not recycle.active()
        remove_files(files)
        assert not (work / recycle.POOL_DIRNAME).exists()
    assert not any(p.exists() for p in files)
    monkeypatch.setenv(recycle.LIMIT_ENV, "lots")
    from calib_core.errors import InputError
    with pytest.raises(InputError, match=recycle.LIMIT_ENV):
        with recycle.recycling(work):
            pass


def test_a_failed_build_makes_no_pool_folder(tmp_path):
    """Opening a pool creates nothing: a build refused before any work leaves the repository as it was."""
    missing = tmp_path / "nowhere" / "work"
    with recycle.recycling(missing):
        pass
    assert not (tmp_path / "nowhere").exists()


def test_a_killed_process_pool_is_swept_and_prune_sees_it(tmp_path, monkeypatch):
    """A pool left by a dead process is a stale temporary to ``calibflow prune`` and is swept by the
    next pool opened on the folder; a live process's is in use."""
    work = tmp_path / "work"
    pool = work / recycle.POOL_DIRNAME
    pool.mkdir(parents=True)
    host = socket.gethostname()
    host = "".join(c if c.isalnum() or c in "_-" else "_" for c in host) or "host"
    dead = pool / f".file.~{host}~{2 ** 22 + 12345}~{'0' * 16}.tmp"
    dead.write_bytes(b"x" * 5000)
    live = pool / f".file.~{host}~{os.getpid()}~{'1' * 16}.tmp"
    live.write_bytes(b"y" * 3000)
    monkeypatch.setattr(retention, "_inputs_with_products", lambda registry: set())   # no registry here
    states = {f.path: (f.state, f.size, f.removable(None))
              for f in survey(tmp_path, None, running=set()) if f.calib_type == "recycled"}
    assert states == {dead: ("stale-temporary", 5000, True), live: ("in-use", 3000, False)}
    with recycle.recycling(work):
        assert not dead.exists() and live.exists()



@pytest.mark.parametrize("runner, pooled", [("threads", True), ("", True), ("processes", False), ("dask", False)])
def test_only_a_thread_runner_build_holds_a_pool(tmp_path, monkeypatch, runner, pooled):
    """Tasks of the processes and dask runners run in other processes, which cannot take this
    process's pool files: there the pool would only hold disk, so a build opens none."""
    import flows.build as fb
    from calib_core.buildplan import BuildRequest

    seen = []
    monkeypatch.setattr(fb, "_run_build", lambda request, **kw: seen.append(recycle.active()))
    fb.run_build(BuildRequest(calib_type="bias", repo=str(tmp_path / "repo")), task_runner=None, log=None,
                 runner_name=runner)
    assert seen == [pooled] and not recycle.active()
    assert not (tmp_path / "repo").exists()
