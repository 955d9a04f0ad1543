"""A camera that exists only as a YAML file (not in calib_core/cameras/) goes through ingest, every
build, nightly and apply-sky by its file path or its registry name, from a folder that is not the
file's; a corrected file is taken in with ``ingest --update`` and rebuilds what it changes."""

import json
import os
from pathlib import Path

import numpy as np
import pytest
import yaml
from typer.testing import CliRunner

import calib_core
from calib_core.camera import load_camera
from calib_core.io.products import read_product
from calib_core.repository import Registry, list_calibs, lookup
from calib_core.simulate.night import simulate_night

NIGHT = "2026-11-23"
KEEP = (3, 4)          # two of democam_mini's detectors: a small, fast camera


def _camera_text(name: str, mirrored_b: bool) -> str:
    """democam_mini's definition for two detectors, renamed; ``mirrored_b=False`` is the mistake a
    user makes: amplifier B's detector section written forwards (it reads out mirrored)."""
    data = yaml.safe_load((Path(calib_core.__file__).parent / "cameras" / "democam_mini.yaml").read_text())
    data["name"] = name
    data["description"] = "a camera calibflow does not ship"
    data["detectors"] = [d for d in data["detectors"] if d["id"] in KEEP]
    if not mirrored_b:
        for d in data["detectors"]:
            d["amplifiers"][1]["detector_section"] = "[129:256,1:512]"
    return yaml.safe_dump(data, sort_keys=False)


@pytest.fixture(scope="module")
def fieldcam(tmp_path_factory, prefect_api):
    root = tmp_path_factory.mktemp("fieldcam")
    cams = root / "cameras"
    cams.mkdir()
    good = cams / "fieldcam_good.yaml"
    good.write_text(_camera_text("fieldcam", mirrored_b=True))
    path = cams / "fieldcam.yaml"
    path.write_text(_camera_text("fieldcam", mirrored_b=False))     # the user's first, wrong file
    sim = simulate_night(load_camera(good), root / "sim", seed=3, night=NIGHT, n_bias=3, n_dark=3, n_flat=3,
                         n_science=5, filters=("z",))
    work = root / "elsewhere"          # the commands run from a folder holding neither file nor repo
    work.mkdir()
    return root, path, good, sim, work


def _run(runner, env, *args):
    from calibflow.cli import app

    res = runner.invoke(app, list(args), env=env)
    return res


def test_file_only_camera_end_to_end_and_fix_and_rerun(fieldcam, monkeypatch):
    root, path, good, sim, work = fieldcam
    monkeypatch.chdir(work)
    runner = CliRunner()
    repo = root / "repo"
    env = {"CALIBFLOW_REPO": str(repo), "CALIBFLOW_REGISTRY_URL": ""}
    assert _run(runner, env, "init").exit_code == 0
    res = _run(runner, env, "ingest", str(sim.out_dir / "raw"), "--camera", str(path), "--transfer", "symlink")
    assert res.exit_code == 0 and "ingested 14" in res.output, res.output

    # by name: the registry's stored definition, no file needed; --camera optional (one camera)
    res = _run(runner, env, "build", "bias", "--camera", "fieldcam", "--night", NIGHT)
    assert res.exit_code == 0 and "2 new" in res.output, res.output
    res = _run(runner, env, "build", "bias", "--night", NIGHT)
    assert res.exit_code == 0 and "0 new, 2 already built" in res.output, res.output
    mosaic = res.output.split("mosaic:")[1].split()[0]
    assert mosaic.endswith(".png") and os.path.exists(mosaic)
    reg = Registry.open(f"sqlite:///{repo / 'registry.sqlite3'}")
    wrong = {c.detector: c for c in list_calibs(reg, calib_type="bias")}

    # fix and rerun: the corrected file differs from the registered definition
    path.write_text(good.read_text())
    res = _run(runner, env, "build", "bias", "--camera", str(path), "--night", NIGHT)
    assert res.exit_code == 1 and "ingest --update" in res.output, res.output
    res = _run(runner, env, "ingest", "--update", "--camera", str(path))
    assert res.exit_code == 0 and "definition updated" in res.output and "0 exposure(s) changed, 14 unchanged" \
        in res.output, res.output
    res = _run(runner, env, "build", "bias", "--camera", str(path), "--night", NIGHT)
    assert res.exit_code == 0 and "2 new" in res.output, res.output
    fixed = {c.detector: c for c in list_calibs(reg, calib_type="bias") if c.calib_id not in
             {w.calib_id for w in wrong.values()}}
    assert set(fixed) == set(KEEP)
    cam_hash = load_camera(path).content_hash
    for det in KEEP:
        assert fixed[det].camera_checksum == cam_hash != wrong[det].camera_checksum
        old, new = read_product(wrong[det].path)[0].image, read_product(fixed[det].path)[0].image
        # same pixels, amplifier B (columns 128..255) mirrored back
        np.testing.assert_allclose(new[:, :128], old[:, :128], atol=1e-4)
        np.testing.assert_allclose(new[:, 128:], old[:, 128:][:, ::-1], atol=1e-4)
    exp = sim.select("dark")[0].exposure_id
    assert lookup(reg, camera="fieldcam", exposure_id=exp, calib_type="bias", detector=3)[0].calib_id == \
        fixed[3].calib_id

    # the other types by file path, then nightly (nothing left to build) and apply-sky
    for calib_type in ("dark", "defects", "ptc", "flat", "fringe", "sky"):
        res = _run(runner, env, "build", calib_type, "--camera", str(path), "--night", NIGHT)
        assert res.exit_code == 0 and "2 new" in res.output, (calib_type, res.output)
    res = _run(runner, env, "nightly", "--camera", str(path), "--night", NIGHT)
    assert res.exit_code == 0 and "0 new products" in res.output, res.output
    science = sim.select("science")[0].exposure_id
    res = _run(runner, env, "apply-sky", science, "--camera", str(path), "--json", "--out", str(root / "skysub"))
    assert res.exit_code == 0, res.output
    got = json.loads(res.output)
    assert set(got["outputs"]) == {str(d) for d in KEEP} and got["scale"] > 0
    # the listing commands take the file too
    res = _run(runner, env, "exposures", "--camera", str(path), "--json")
    kinds = sorted(r["obs_type"] for r in json.loads(res.output))
    assert kinds == ["bias"] * 3 + ["dark"] * 3 + ["flat"] * 3 + ["science"] * 5, res.output
    res = _run(runner, env, "calibs", "--camera", str(path), "--json")
    assert sorted({r["type"] for r in json.loads(res.output)}) == ["bias", "dark", "defects", "flat", "fringe", "ptc",
                                                                  "sky"]
    res = _run(runner, env, "lookup", "--exposure", exp, "--type", "bias", "--detector", "3", "--camera", str(path))
    assert res.exit_code == 0 and fixed[3].calib_id in res.output, res.output


def test_camera_errors_list_the_registry(fieldcam, monkeypatch, tmp_path):
    root, path, good, sim, work = fieldcam
    monkeypatch.chdir(work)
    runner = CliRunner()
    env = {"CALIBFLOW_REPO": str(tmp_path / "repo2"), "CALIBFLOW_REGISTRY_URL": ""}
    assert _run(runner, env, "init").exit_code == 0
    res = _run(runner, env, "build", "bias", "--night", NIGHT)
    assert res.exit_code == 1 and "none (ingest raw files first)" in res.output, res.output
    raws = sorted((sim.out_dir / "raw").glob("*.fits"))
    assert _run(runner, env, "ingest", *map(str, raws[:3]), "--camera", str(good)).exit_code == 0
    res = _run(runner, env, "build", "bias", "--camera", "democam")
    assert res.exit_code == 1 and "unknown camera 'democam'" in res.output and "fieldcam" in res.output, res.output
    other = tmp_path / "other.yaml"
    other.write_text(good.read_text().replace("name: fieldcam", "name: othercam"))
    res = _run(runner, env, "build", "bias", "--camera", str(other))
    assert res.exit_code == 1 and "'othercam'" in res.output and "not in the registry" in res.output, res.output
    assert _run(runner, env, "ingest", *map(str, raws[:3]), "--camera", str(other)).exit_code == 0
    res = _run(runner, env, "build", "bias")
    assert res.exit_code == 1 and "several cameras: fieldcam, othercam" in res.output, res.output


def test_serve_default_camera_comes_from_the_registry(registry, tmp_path):
    """`calibflow serve` without --camera: the registry's only camera (by name, so runs need no file);
    none while the registry is empty or holds several; a file not ingested yet is taken as given."""
    import click
    import typer

    from calibflow.ops import _serve_camera

    assert _serve_camera(registry, None) is None
    path = tmp_path / "fieldcam.yaml"
    path.write_text(_camera_text("fieldcam", mirrored_b=True))
    assert _serve_camera(registry, str(path)).name == "fieldcam"          # not ingested yet
    with registry.session() as s:
        registry.ensure_camera(s, load_camera(path))
    assert _serve_camera(registry, None).name == "fieldcam"
    assert _serve_camera(registry, "fieldcam").content_hash == load_camera(path).content_hash
    path.write_text(_camera_text("fieldcam", mirrored_b=False))              # differs from the registry's
    with pytest.raises((typer.Exit, click.exceptions.Exit)):
        _serve_camera(registry, str(path))
    with registry.session() as s:
        registry.ensure_camera(s, load_camera("democam_mini"))
    assert _serve_camera(registry, None) is None
