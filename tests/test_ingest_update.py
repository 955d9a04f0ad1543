"""``ingest --update``: a corrected camera definition re-reads the headers of ingested exposures,
reports what changed per exposure, stores the definition, and leaves raws and products alone; all or
nothing. A plain ingest with a changed definition is refused. On SQLite and PostgreSQL."""

import textwrap

import numpy as np
import pytest
from astropy.io import fits

from calib_core.camera import load_camera
from calib_core.repository import CameraMismatch, Datastore, ingest_files, sha256_file, update_exposures

CAM = """
name: upcam
utc_offset_hours: 0
detectors:
  - id: 0
    name: d0
    hdu: 0
    amplifiers:
      - {name: A, data_section: '[1:10,1:8]', overscan_section: '[11:14,1:8]',
         detector_section: '[1:10,1:8]', gain: 1.5, read_noise: 4.0}
metadata:
  obs_type:
    - {key: IMGTYPE, pattern: '(?i)flat', value: flat}
    - {key: IMGTYPE, pattern: '(?i)zero', value: bias}
  filter: {keys: [FILT], default: NONE}
"""


def _raw(path, imgtype, filt, value):
    hdu = fits.PrimaryHDU(np.full((8, 14), value, np.float32))
    hdu.header.update({"IMGTYPE": imgtype, "FILTER": filt, "EXPTIME": 1.0, "DATE-OBS": "2026-11-20T03:00:00"})
    hdu.writeto(path)
    return path


def _cam(tmp_path, text, name="cam.yaml"):
    p = tmp_path / name
    p.write_text(textwrap.dedent(text))
    return load_camera(p)


def _state(registry):
    from sqlalchemy import select

    from calib_core.repository.registry import CameraRow, ExposureRow

    with registry.session() as s:
        cams = [(c.name, c.checksum, c.definition) for c in s.scalars(select(CameraRow))]
        exps = [(e.exposure_id, e.obs_type, e.filter, e.camera_checksum)
                for e in s.scalars(select(ExposureRow).order_by(ExposureRow.exposure_id))]
    return registry.snapshot(), cams, exps


def test_update_reports_changes_and_keeps_raws(registry, tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    files = [_raw(src / "f1.fits", "FLAT", "r", 5000.0), _raw(src / "f2.fits", "flat", "g", 5000.0),
             _raw(src / "z1.fits", "ZERO", "r", 1000.0)]
    store = Datastore(tmp_path / "repo")
    wrong = _cam(tmp_path, CAM)                    # FILT: not this camera's key -> every filter NONE
    assert ingest_files(files, wrong, registry, store).ok
    placed = {p.name: sha256_file(p) for p in (store.root / "raw").rglob("*.fits")}

    fixed = _cam(tmp_path, CAM.replace("keys: [FILT]", "keys: [FILTER]"), "fixed.yaml")
    # a plain ingest with the corrected file is refused: the registry is left as it was
    before = _state(registry)
    with pytest.raises(CameraMismatch, match="ingest --update"):
        ingest_files(files, fixed, registry, store)
    assert _state(registry) == before

    report = update_exposures(fixed, registry)
    assert report.ok and report.camera_changed
    assert report.changed == {"f1": {"filter": ("NONE", "r")}, "f2": {"filter": ("NONE", "g")},
                              "z1": {"filter": ("NONE", "r")}}
    _, cams, exps = _state(registry)
    assert cams[0][1] == fixed.content_hash
    assert exps == [("f1", "flat", "r", fixed.content_hash), ("f2", "flat", "g", fixed.content_hash),
                    ("z1", "bias", "r", fixed.content_hash)]
    assert {p.name: sha256_file(p) for p in (store.root / "raw").rglob("*.fits")} == placed
    # the same definition again: nothing to change
    again = update_exposures(fixed, registry)
    assert again.ok and not again.camera_changed and not again.changed and sorted(again.unchanged) == ["f1", "f2", "z1"]
    # only the files given
    typed = _cam(tmp_path, CAM.replace("keys: [FILT]", "keys: [FILTER]").replace("'(?i)zero', value: bias",
                                                                                 "'(?i)zero', value: dark"), "t.yaml")
    only = update_exposures(typed, registry, [files[2]])
    assert only.ok and only.changed == {"z1": {"obs_type": ("bias", "dark")}}


def test_update_is_all_or_nothing(registry, tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    files = [_raw(src / "f1.fits", "FLAT", "r", 5000.0), _raw(src / "f2.fits", "FLAT", "r", 5000.0)]
    fits.setval(files[0], "FILT", value="x")          # only f1 has the key
    store = Datastore(tmp_path / "repo")
    assert ingest_files(files, _cam(tmp_path, CAM), registry, store).ok
    # f1 would change (x -> X), but f2 cannot be read with this definition: nothing changes
    bad = _cam(tmp_path, CAM.replace("filter: {keys: [FILT], default: NONE}", "filter: {keys: [FILT], map: {x: X}}"),
               "bad.yaml")
    before = _state(registry)
    report = update_exposures(bad, registry)
    assert not report.ok and not report.changed and not report.camera_changed
    assert len(report.failed) == 1 and report.failed[0][0].endswith("f2.fits")
    assert "metadata.filter.keys ['FILT']" in report.failed[0][1]
    assert _state(registry) == before
