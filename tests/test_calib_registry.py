"""Products in the registry: no duplicates, validity rules, certify and lookup, on both backends."""

import datetime as dt
import json

import pytest
from typer.testing import CliRunner

from calib_core.camera import load_camera
from calib_core.repository import (CalibInput, Datastore, RegistryError, ValidityRule, calib_digest, calib_inputs,
                                   certify, ingest_files, list_calibs, lookup, record_calib)
from tests.test_registry import _mini_file


@pytest.fixture
def populated(registry, tmp_path):
    cam = load_camera("democam_mini")
    store = Datastore(tmp_path / "repo")
    files = [_mini_file(tmp_path / f"b{i}.fits", expid=f"b{i}") for i in range(3)]
    assert ingest_files(files, cam, registry, store).ok
    return registry, store


def _record(registry, calib_date, digest_seed="x", detector=0, rule=None, calib_type="bias", filter="NONE"):
    inputs = [CalibInput("b0", scale=1.0), CalibInput("b1", scale=1.1),
              CalibInput("b2", used=False, reason="outlier: mean 3.2 sigma high")]
    digest = calib_digest([(i.exposure_id, digest_seed) for i in inputs], "cfg")
    return record_calib(registry, camera="democam_mini", calib_type=calib_type, filter=filter, detector=detector,
                        calib_date=calib_date, path=f"/p/{digest[:6]}.fits", checksum="c" * 64, config_hash="cfg",
                        digest=digest, software_version="0.1.0", inputs=inputs, validity=rule)


def test_record_is_idempotent_and_complete(populated):
    registry, _ = populated
    row, created = _record(registry, dt.date(2026, 11, 20))
    assert created and row.n_inputs == 2
    again, created2 = _record(registry, dt.date(2026, 11, 20))
    assert not created2 and again.calib_id == row.calib_id
    assert len(list_calibs(registry)) == 1
    inputs = calib_inputs(registry, row.calib_id)
    assert [(i["exposure_id"], i["used"]) for i in inputs] == [("b0", True), ("b1", True), ("b2", False)]
    assert inputs[2]["reason"].startswith("outlier") and inputs[1]["scale"] == pytest.approx(1.1)
    with pytest.raises(RegistryError, match="not in the registry: nope"):
        record_calib(registry, camera="democam_mini", calib_type="bias", filter="NONE", detector=1,
                     calib_date=dt.date(2026, 11, 20), path="/x", checksum="c", config_hash="c", digest="d",
                     software_version="0", inputs=[CalibInput("nope")])


def test_validity_and_lookup(populated):
    registry, _ = populated
    # exposures were taken 2026-11-21T02:00Z (night of 2026-11-20)
    old, _ = _record(registry, dt.date(2026, 11, 1), digest_seed="old", rule=ValidityRule(days_before=0, days_after=30))
    near, _ = _record(registry, dt.date(2026, 11, 19), digest_seed="near", rule=ValidityRule(days_before=5, days_after=5))
    far, _ = _record(registry, dt.date(2026, 12, 30), digest_seed="future")
    hit = lookup(registry, camera="democam_mini", exposure_id="b0", calib_type="bias", detector=0)
    assert [h.calib_id for h in hit] == [near.calib_id]
    # shrink the near one's validity: the older one applies now
    certify(registry, near.calib_id, dt.datetime(2026, 11, 25, tzinfo=dt.timezone.utc), None)
    hit = lookup(registry, camera="democam_mini", exposure_id="b0", calib_type="bias")
    assert [h.calib_id for h in hit] == [old.calib_id]
    # nothing for another detector or type
    assert lookup(registry, camera="democam_mini", exposure_id="b0", calib_type="bias", detector=5) == []
    assert lookup(registry, camera="democam_mini", exposure_id="b0", calib_type="flat") == []
    with pytest.raises(RegistryError, match="not after begin"):
        certify(registry, far.calib_id, dt.datetime(2027, 1, 1, tzinfo=dt.timezone.utc),
                dt.datetime(2026, 1, 1, tzinfo=dt.timezone.utc))
    with pytest.raises(RegistryError, match="no calib"):
        certify(registry, "nope", dt.datetime(2027, 1, 1, tzinfo=dt.timezone.utc), None)


def test_cli_calibs_certify_lookup(populated, registry_url):
    registry, store = populated
    row, _ = _record(registry, dt.date(2026, 11, 20))
    from calibflow.cli import app

    runner = CliRunner()
    env = {"CALIBFLOW_REPO": str(store.root), "CALIBFLOW_REGISTRY_URL": registry_url}
    out = runner.invoke(app, ["calibs", "--json"], env=env)
    assert out.exit_code == 0, out.output
    rows = json.loads(out.stdout)
    for key in ("calib_id", "type", "filter", "detector", "calib_date", "valid_begin", "valid_end", "path",
                "n_inputs", "checksum"):
        assert key in rows[0]
    res = runner.invoke(app, ["lookup", "--exposure", "b1", "--type", "bias", "--json"], env=env)
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout)[0]["calib_id"] == row.calib_id
    res = runner.invoke(app, ["certify", row.calib_id, "--begin", "2026-12-01", "--end", "2026-12-31"], env=env)
    assert res.exit_code == 0, res.output
    res = runner.invoke(app, ["lookup", "--exposure", "b1", "--type", "bias"], env=env)
    assert res.exit_code == 1 and "no certified bias" in res.output
    res = runner.invoke(app, ["certify", row.calib_id, "--begin", "yesterday"], env=env)
    assert res.exit_code == 1 and "--begin must be" in res.output


def test_lookup_matches_readout_settings_and_explains(populated):
    """docs/architecture.md#lookup-rules, rule 3: where the camera has readout settings (binning, gain
    setting), a product made from inputs read out otherwise never applies, however near its date."""
    from calib_core.repository import explain_lookup
    from calib_core.repository.registry import ExposureRow

    registry, _ = populated
    with registry.session() as s:
        for e in s.query(ExposureRow):
            e.extra = {**(e.extra or {}), "BINNING": "2x2"}
    near, _ = record_calib(registry, camera="democam_mini", calib_type="bias", filter="NONE", detector=0,
                           calib_date=dt.date(2026, 11, 20), path="/p/near.fits", checksum="c" * 64,
                           config_hash="cfg", digest="d-near", software_version="0", inputs=[CalibInput("b0")],
                           stats={"readout": {"BINNING": "1x1"}})
    far, _ = record_calib(registry, camera="democam_mini", calib_type="bias", filter="NONE", detector=0,
                          calib_date=dt.date(2026, 11, 12), path="/p/far.fits", checksum="c" * 64,
                          config_hash="cfg", digest="d-far", software_version="0", inputs=[CalibInput("b1")],
                          stats={"readout": {"BINNING": "2x2"}})
    # without the camera's readout keys the nearer one wins; with them, the one read out as the exposure
    assert lookup(registry, camera="democam_mini", exposure_id="b0", calib_type="bias")[0].calib_id == \
        near.calib_id
    rows = explain_lookup(registry, camera="democam_mini", exposure_id="b0", calib_type="bias",
                          readout_keys=("BINNING",))
    assert [r["calib_id"] for r in rows if r["chosen"]] == [far.calib_id]
    why = next(r for r in rows if r["calib_id"] == near.calib_id)
    assert not why["eligible"] and why["reasons"] == ["readout BINNING=1x1, the exposure's is 2x2"]
    assert lookup(registry, camera="democam_mini", exposure_id="b0", calib_type="bias",
                  readout_keys=("BINNING",))[0].calib_id == far.calib_id
