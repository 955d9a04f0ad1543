"""Deployment definitions, prefect.yaml and the trigger's parameter handling, without a server
(tests/test_deployments_server.py runs them on a real one)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from calib_core.builds.bias_dark_flat import BiasConfig, DarkConfig, FlatConfig
from calib_core.builds.defects import DefectsConfig
from calib_core.builds.fringe import FringeBuildConfig
from calib_core.builds.ptc import PtcConfig
from calib_core.sky.frames import SkyBuildConfig
from calibflow.ops import check_parameters, parse_params
from deployments.build import BUILD_FLOWS, resolve_repo
from deployments.definitions import DeploymentSettings, make_deployments, site_morning_cron

REPO_ROOT = Path(__file__).resolve().parents[1]
MODELS = {"bias": BiasConfig, "dark": DarkConfig, "defects": DefectsConfig, "ptc": PtcConfig, "flat": FlatConfig,
          "fringe": FringeBuildConfig, "sky": SkyBuildConfig}


def _schema(flow) -> dict:
    return flow.parameters.model_dump_for_openapi()


def test_one_deployment_per_calib_type_plus_nightly(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    deps = make_deployments(DeploymentSettings(repo=Path("rel/repo"), camera="democam_mini",
                                               registry_url="postgresql+psycopg://u@h/db"))
    names = [(d.flow_name, d.name) for d in deps]
    assert names == [("build-calib", t) for t in MODELS] + [("nightly-calibs", "nightly")]
    for d in deps:
        # a relative repository is pinned as an absolute path: runs do not depend on any cwd
        assert d.parameters == {"camera": "democam_mini", "repo": str(tmp_path / "rel" / "repo"),
                                "registry_url": "env:CALIBFLOW_REGISTRY_URL"}    # never the URL itself
        assert d.description and "calibflow" in d.tags
        assert d.entrypoint.startswith("deployments.")
    assert all(not d.schedules for d in deps[:-1])
    (nightly_schedule,) = deps[-1].schedules
    # democam_mini's site is UTC-4.7: 09:00 there is 13:42 UTC
    assert (nightly_schedule.schedule.cron, nightly_schedule.schedule.timezone) == ("42 13 * * *", "UTC")


def test_nightly_schedule_settings():
    base = dict(repo=Path("/r"), camera="democam")
    assert DeploymentSettings(**base).nightly_schedule() == ("42 13 * * *", "UTC")
    assert DeploymentSettings(**base, timezone="America/Santiago").nightly_schedule() == \
        ("0 9 * * *", "America/Santiago")
    assert DeploymentSettings(**base, nightly_cron="30 7 * * 1-5", timezone="Europe/Madrid").nightly_schedule() == \
        ("30 7 * * 1-5", "Europe/Madrid")
    assert DeploymentSettings(**base, nightly_cron="0 12 * * *").nightly_schedule() == ("0 12 * * *", "UTC")
    # site offsets: 09:00 local -> UTC, wrapping around midnight, fractional hours to the minute
    assert site_morning_cron(0.0) == "0 9 * * *"
    assert site_morning_cron(-10.0) == "0 19 * * *"
    assert site_morning_cron(10.0) == "0 23 * * *"
    assert site_morning_cron(5.75) == "15 3 * * *"
    with pytest.raises(ValueError, match="unknown time zone 'Mars/Olympus'"):
        DeploymentSettings(**base, timezone="Mars/Olympus")
    with pytest.raises(ValueError, match="invalid cron"):
        DeploymentSettings(**base, nightly_cron="61 25 * *")


@pytest.mark.parametrize("calib_type", list(MODELS))
def test_build_form_is_the_config_model(calib_type):
    """The UI form of each build deployment: calib type fixed, config = that type's model with its
    defaults (including the per-type overrides of nested defaults), every field described."""
    flow = BUILD_FLOWS[calib_type]
    assert flow.name == "build-calib"
    schema = _schema(flow)
    props = schema["properties"]
    assert "calib_type" not in props
    model = MODELS[calib_type]
    assert props["config"]["$ref"] == f"#/definitions/{model.__name__}"
    assert props["config"]["default"] == model().model_dump(mode="json")
    assert set(schema["definitions"][model.__name__]["properties"]) == set(model.model_fields)
    for name, prop in props.items():
        assert prop.get("description"), f"{calib_type}: parameter {name} has no description"
    assert props["runner"]["enum"] == ["threads", "processes", "dask"]
    assert props["night"]["default"] is None and props["repo"]["default"] is None


def test_bias_form_defaults_differ_from_plain_isr_defaults():
    """A bias build must not subtract a bias: the form's default carries BiasConfig's ISR switches,
    not IsrConfig's (where do_bias is on)."""
    default = _schema(BUILD_FLOWS["bias"])["properties"]["config"]["default"]
    assert default["isr"]["do_bias"] is False and default["isr"]["do_dark"] is False
    assert _schema(BUILD_FLOWS["dark"])["properties"]["config"]["default"]["isr"]["do_bias"] is True


def test_resolve_repo_like_the_cli(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("CALIBFLOW_REPO", raising=False)
    monkeypatch.delenv("CALIBFLOW_REGISTRY_URL", raising=False)
    assert resolve_repo(None, None) == (str(tmp_path / "calibrepo"), None)
    monkeypatch.setenv("CALIBFLOW_REPO", "from-env")
    monkeypatch.setenv("CALIBFLOW_REGISTRY_URL", "sqlite:///x.db")
    # the environment's URL is passed on by reference (subflow parameters never carry a password)
    assert resolve_repo(None, None) == (str(tmp_path / "from-env"), "env:CALIBFLOW_REGISTRY_URL")
    assert resolve_repo("/abs/given", "sqlite:///y.db") == ("/abs/given", "sqlite:///y.db")


def test_parse_params():
    schema = _schema(BUILD_FLOWS["flat"])
    got = parse_params(["night=2026-11-20", "detectors=[0, 4]", "drop_incomplete=true", "filter=1",
                        "config.combine.statistic=MEDIAN", "config.combine.nsigma=2.5", "config.weighted=true",
                        "exposures=[\"e1\"]"], schema)
    assert got == {"night": "2026-11-20", "detectors": [0, 4], "drop_incomplete": True,
                   "filter": "1",                       # a string-only parameter keeps "1" as text
                   "config": {"combine": {"statistic": "MEDIAN", "nsigma": 2.5}, "weighted": True},
                   "exposures": ["e1"]}
    with pytest.raises(ValueError, match="key=value"):
        parse_params(["night"], schema)
    with pytest.raises(ValueError, match="given a value already"):
        parse_params(["config=3", "config.weighted=true"], schema)


def test_check_parameters_reports_every_problem():
    flow = BUILD_FLOWS["bias"]
    schema = _schema(flow)
    entry = "deployments.build.build_bias"
    ok = check_parameters({"night": "2026-11-20", "config": {"combine": {"statistic": "MEDIAN"}}},
                          {"camera": "democam_mini", "config": {"combine": {"nsigma": 2.0}}}, schema, entry)
    # dotted overrides merge into the deployment's own nested defaults
    assert ok == {"camera": "democam_mini", "night": "2026-11-20",
                  "config": {"combine": {"statistic": "MEDIAN", "nsigma": 2.0}}}
    with pytest.raises(ValueError, match=r"unknown parameter\(s\) calib_type, nigth"):
        check_parameters({"nigth": "x", "calib_type": "dark"}, {}, schema, entry)
    with pytest.raises(ValueError) as info:
        check_parameters({"night": "2026-1", "detectors": ["a"], "config": {"combine": {"statistic": "MODE"}},
                          "validity_days_after": -1}, {}, schema, entry)
    msg = str(info.value)
    assert "night: '2026-1' does not match" in msg
    assert "detectors.0: 'a' is not of type 'integer'" in msg
    assert "config.combine.statistic: 'MODE' is not one of" in msg
    assert "validity_days_after: -1 is less than the minimum of 0" in msg
    with pytest.raises(ValueError, match="Additional properties are not allowed .'doBais' was unexpected"):
        check_parameters({"config": {"isr": {"doBais": False}}}, {}, schema, entry)
    # what the JSON schema cannot say, the flow's own (pydantic) validation does
    with pytest.raises(ValueError, match="unknown mask plane 'FOO'"):
        check_parameters({"config": {"combine": {"mask": ["FOO"]}}}, {}, schema, entry)


def _rendered_prefect_yaml(values: dict[str, str], monkeypatch) -> list[dict]:
    """prefect.yaml's deployments with its {{ $NAME }} placeholders filled from ``values`` the way
    `prefect deploy` fills them (Prefect's own templating, from the environment)."""
    from prefect.utilities.templating import apply_values

    spec = yaml.safe_load((REPO_ROOT / "prefect.yaml").read_text())
    for name, value in values.items():
        monkeypatch.setenv(name, value)
    return apply_values(spec["deployments"], dict(os.environ), remove_notset=False)


@pytest.mark.parametrize("site", [
    dict(camera="democam"),                                                    # the defaults: democam's site
    dict(camera="democam_mini", nightly_cron="15 8 * * 1-5", timezone="Europe/Madrid"),
    dict(timezone="America/Santiago"),                                         # no camera; 09:00 in that zone
])
def test_prefect_yaml_matches_the_served_deployments(site, monkeypatch):
    """prefect.yaml (`calibflow deploy`: prefect deploy --all with the site's settings filled in)
    describes the same deployments, entry flows, tags, camera and nightly schedule as `calibflow serve`
    with the same settings."""
    from calibflow.ops import DEPLOY_VARIABLES, deploy_environment

    settings = DeploymentSettings(repo=Path("/r"), **site)
    served = make_deployments(settings)
    values = deploy_environment(settings)
    assert set(values) == set(DEPLOY_VARIABLES)
    spec = _rendered_prefect_yaml(values, monkeypatch)
    assert "{{" not in json.dumps(spec)                       # every placeholder is one deploy fills
    from prefect.flows import load_flow_from_entrypoint

    assert [d["name"] for d in spec] == [d.name for d in served]
    for entry, dep in zip(spec, served):
        path, name = entry["entrypoint"].split(":")
        loaded = load_flow_from_entrypoint(str(REPO_ROOT / entry["entrypoint"]), use_placeholder_flow=False)
        assert loaded.name == dep.flow_name and loaded.fn.__name__ == dep.entrypoint.rsplit(".", 1)[1]
        assert path == dep.entrypoint.rsplit(".", 1)[0].replace(".", "/") + ".py"
        assert sorted(entry["tags"]) == sorted(dep.tags)
        assert entry["work_pool"]["name"] == "calibflow"
        # the camera parameter: serve's ("" for none, which the entry flows read as none)
        assert entry["parameters"] == {"camera": dep.parameters.get("camera", "")}
        schedules = [(s["cron"], s["timezone"]) for s in entry.get("schedules") or []]
        assert schedules == [(s.schedule.cron, s.schedule.timezone) for s in dep.schedules]
    want = {"democam": ("42 13 * * *", "UTC"), "democam_mini": ("15 8 * * 1-5", "Europe/Madrid"),
            None: ("0 9 * * *", "America/Santiago")}[site.get("camera")]
    assert (values["CALIBFLOW_NIGHTLY_CRON"], values["CALIBFLOW_TIMEZONE"]) == want


def test_deploy_refuses_bad_settings_before_prefect(tmp_path):
    """`calibflow deploy` checks the site's settings as serve does (one line, exit 1)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_API", "CALIBFLOW_"))}
    env.update({"PREFECT_HOME": str(tmp_path / "ph"), "PREFECT_API_URL": "http://127.0.0.1:9/api",
                "CALIBFLOW_REPO": str(tmp_path / "repo")})
    exe = str(Path(sys.executable).parent / "calibflow")
    subprocess.run([exe, "init"], env=env, capture_output=True, timeout=120, check=True)
    for extra, message in (({"CALIBFLOW_TIMEZONE": "Mars/Olympus"}, "unknown time zone 'Mars/Olympus'"),
                           ({"CALIBFLOW_NIGHTLY_CRON": "61 25 * *"}, "invalid cron"),
                           ({"CALIBFLOW_CAMERA": "no-such-camera"}, "no-such-camera")):
        res = subprocess.run([exe, "deploy", "--prefect-file", str(REPO_ROOT / "prefect.yaml")],
                             env={**env, **extra}, capture_output=True, text=True, timeout=120)
        assert res.returncode == 1 and message in res.stderr, res.stdout + res.stderr


def test_entry_flows_read_an_empty_camera_as_none(monkeypatch):
    """prefect.yaml's camera placeholder filled with nothing gives camera="": no default camera."""
    seen = {}
    import deployments.build as build_module
    import deployments.nightly as nightly_module

    monkeypatch.setattr(build_module.build_calib, "fn", lambda *a, **k: seen.setdefault("build", k["camera"]))
    monkeypatch.setattr(nightly_module.nightly, "fn", lambda **k: seen.setdefault("nightly", k["camera"]))
    BUILD_FLOWS["bias"].fn(camera="")
    nightly_module.nightly_calibs.fn(camera="")
    assert seen == {"build": None, "nightly": None}


def test_serve_and_trigger_need_a_server(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_API")}
    env["PREFECT_HOME"] = str(tmp_path / "ph")
    exe = str(Path(sys.executable).parent / "calibflow")
    for args in (["trigger", "bias"], ["serve", "--repo", str(tmp_path)]):
        res = subprocess.run([exe, *args], env=env, capture_output=True, text=True, timeout=120)
        assert res.returncode == 1, res.stdout + res.stderr
        assert "PREFECT_API_URL is not set" in res.stderr
