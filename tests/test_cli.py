"""The CLI's own conventions, on every command: defaults shown in ``--help``, strict JSON (null, never
NaN), unknown types and detectors refused in one line, no data deleted unasked, no output written
into the source checkout by accident. Fast: no Prefect server (the build and trigger sides are in
tests/test_flows_build.py and tests/test_deployments_server.py)."""

from __future__ import annotations

import datetime as dt
import json
import logging
import os
import subprocess
from pathlib import Path

import pytest
from typer.testing import CliRunner

from calib_core.repository import CalibInput, calib_digest, record_calib

REPO_ROOT = Path(__file__).resolve().parents[1]
WIDE = {"COLUMNS": "1000", "TERMINAL_WIDTH": "1000"}     # help tables unwrapped, so texts can be found whole


def _app():
    from calibflow.cli import app

    return app


def _commands():
    """(argv prefix, click command) of every command, sub-commands included."""
    import typer.main

    out = []

    def walk(cmd, path):
        subs = getattr(cmd, "commands", None)
        if path:
            out.append((path, cmd))
        for name, sub in (subs or {}).items():
            walk(sub, path + [name])

    walk(typer.main.get_command(_app()), [])
    return out


def _strict_loads(text: str):
    def refuse(name):
        raise ValueError(f"not strict JSON: {name}")

    return json.loads(text, parse_constant=refuse)


def _one_line_error(res) -> str:
    """The stderr of a refused command: exactly one line, ``error: ...``."""
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert res.exit_code == 1, res.output
    assert len(lines) == 1 and lines[0].startswith("error: "), res.stderr
    return lines[0]


# ------------------------------------------------------------------------------------------------
# --help
# ------------------------------------------------------------------------------------------------


def test_help_shows_every_default_and_no_bool_type():
    runner = CliRunner()
    undocumented, lost = [], []
    for path, cmd in _commands():
        res = runner.invoke(_app(), [*path, "--help"], env=WIDE)
        assert res.exit_code == 0, res.output
        text = res.output
        assert "<bool>" not in text, f"calibflow {' '.join(path)} --help shows a flag as <bool>"
        for param in getattr(cmd, "params", []):
            if getattr(param, "param_type_name", "") != "option" or param.hidden:
                continue
            name = f"calibflow {' '.join(path)} {param.opts[0]}"
            doc = param.help or ""
            if "[default:" in doc:
                shown = doc[doc.index("[default:"):]
                shown = shown.replace("\\[", "[")       # the help text as written, not as escaped for rich
                if shown.split("]")[0] not in text:
                    lost.append(name)
            # an option left out means something: its help says what (lists, flags and required ones aside)
            elif (param.default is None and not param.required and not param.is_flag and not param.multiple):
                undocumented.append(name)
    assert not lost, f"documented defaults missing from --help: {lost}"
    assert not undocumented, f"options whose default --help does not state: {undocumented}"


def test_help_keeps_brackets_and_the_repo_default():
    res = CliRunner().invoke(_app(), ["calibs", "--help"], env=WIDE)
    assert "[default: ./calibrepo]" in res.output and "[default: SQLite inside the repository]" in res.output


# ------------------------------------------------------------------------------------------------
# JSON, types, detectors (a registry with one product whose statistics hold a NaN)
# ------------------------------------------------------------------------------------------------


@pytest.fixture
def repo_with_nan(tmp_path):
    from calib_core.camera import load_camera
    from calib_core.repository import Datastore, Registry, ingest_files
    from tests.test_registry import _mini_file

    store = Datastore(tmp_path / "repo")
    store.ensure()
    reg = Registry.open(store.default_registry_url)
    reg.upgrade()
    files = [_mini_file(tmp_path / f"b{i}.fits", expid=f"b{i}") for i in range(2)]
    assert ingest_files(files, load_camera("democam_mini"), reg, store).ok
    inputs = [CalibInput("b0"), CalibInput("b1")]
    row, _ = record_calib(reg, camera="democam_mini", calib_type="bias", filter="NONE", detector=0,
                          calib_date=dt.date(2026, 11, 20), path="/p/bias.fits", checksum="c" * 64,
                          config_hash="cfg", digest=calib_digest([(i.exposure_id, "x") for i in inputs], "cfg"),
                          software_version="0.1.0", inputs=inputs,
                          stats={"level": float("nan"), "noise": float("inf"), "n_used": 2})
    yield {"CALIBFLOW_REPO": str(store.root), "CALIBFLOW_REGISTRY_URL": ""}, row
    reg.engine.dispose()


def test_json_is_strict_null_for_missing_numbers(repo_with_nan):
    env, row = repo_with_nan
    runner = CliRunner()
    res = runner.invoke(_app(), ["calibs", "--json"], env=env)
    assert res.exit_code == 0, res.output
    assert "NaN" not in res.stdout and "Infinity" not in res.stdout
    (listed,) = _strict_loads(res.stdout)
    assert listed["calib_id"] == row.calib_id
    assert listed["stats"] == {"level": None, "noise": None, "n_used": 2}
    res = runner.invoke(_app(), ["lookup", "--exposure", "b0", "--type", "bias", "--json"], env=env)
    assert res.exit_code == 0, res.output
    assert _strict_loads(res.stdout)[0]["stats"]["level"] is None
    res = runner.invoke(_app(), ["exposures", "--json"], env=env)
    assert res.exit_code == 0 and len(_strict_loads(res.stdout)) == 2


def test_strict_json_helper():
    import numpy as np

    from calibflow.common import dumps_json

    text = dumps_json({"a": [np.float32("nan"), np.float64(1.5), -float("inf"), 2, True, None],
                       "b": {"c": dt.date(2026, 11, 20), "d": Path("/x")}})
    assert _strict_loads(text) == {"a": [None, 1.5, None, 2, True, None], "b": {"c": "2026-11-20", "d": "/x"}}


@pytest.mark.parametrize("args, needle", [
    (["calibs", "--type", "nosuchtype"], "--type: unknown calib type 'nosuchtype'; choose one of bias, dark"),
    (["lookup", "--exposure", "b0", "--type", "skyy"], "--type: unknown calib type 'skyy'"),
    (["exposures", "--type", "sciense"], "--type: unknown observation type 'sciense'; choose one of bias"),
    (["build", "skyy"], "unknown calib type 'skyy'"),
    (["nightly", "--types", "bias,skyy"], "--types: unknown calib type 'skyy'"),
    (["calibs", "--detector", "99"], "--detector: no detector 99 in camera democam_mini (detectors 0-8)"),
    (["lookup", "--exposure", "b0", "--type", "bias", "--detector", "42"], "no detector 42 in camera democam_mini"),
    (["build", "bias", "--detector", "3", "--detector", "99"], "--detector: no detector 99 in camera democam_mini"),
])
def test_unknown_types_and_detectors_are_refused_in_one_line(repo_with_nan, args, needle):
    env, _ = repo_with_nan
    res = CliRunner().invoke(_app(), args, env=env)
    assert needle in _one_line_error(res)


# ------------------------------------------------------------------------------------------------
# no data deleted unasked
# ------------------------------------------------------------------------------------------------


def _existing_repo(tmp_path) -> Path:
    repo = tmp_path / "demo" / "calibrepo"
    repo.mkdir(parents=True)
    (repo / "registry.sqlite3").write_bytes(b"products of last night")
    return repo


def test_demo_does_not_delete_a_repository_without_force(tmp_path):
    repo = _existing_repo(tmp_path)
    res = CliRunner().invoke(_app(), ["demo", "--no-build", "--repo", str(repo), "--camera", "democam_mini"])
    line = _one_line_error(res)
    assert str(repo) in line and "--force" in line and "--keep" in line
    assert (repo / "registry.sqlite3").read_bytes() == b"products of last night"
    assert sorted(p.name for p in repo.parent.iterdir()) == ["calibrepo"]       # nothing simulated either


def test_demo_asks_on_a_terminal_and_a_no_keeps_the_data(tmp_path, monkeypatch):
    import calibflow.cli as cli

    repo = _existing_repo(tmp_path)
    monkeypatch.setattr(cli, "_interactive", lambda: True)
    res = CliRunner().invoke(_app(), ["demo", "--no-build", "--repo", str(repo)], input="n\n")
    assert res.exit_code == 1 and "Delete it and start afresh?" in res.output
    assert "left as it was" in res.stderr
    assert (repo / "registry.sqlite3").read_bytes() == b"products of last night"


def test_demo_force_starts_afresh(tmp_path):
    repo = _existing_repo(tmp_path)
    (repo / "stale-product.fits").write_bytes(b"x")
    res = CliRunner().invoke(_app(), ["demo", "--no-build", "--force", "--repo", str(repo), "--camera",
                                      "democam_mini", "--n-science", "1"])
    assert res.exit_code == 0, res.output
    assert not (repo / "stale-product.fits").exists()
    assert "ingested" in res.output and (repo / "registry.sqlite3").stat().st_size > 1000



def test_demo_stopped_while_simulating_simulates_again(tmp_path, monkeypatch):
    """A demo stopped half-way through its simulation (Ctrl-C, a kill) leaves no folder the next demo
    would take as a simulated night: the next one simulates and ingests the whole night."""
    import calib_core.simulate.night as night

    real = night.simulate_night

    def stopped(camera, out_dir, *args, progress=None, **kwargs):
        def stop_after_two(done, total):
            if done >= 2:
                raise KeyboardInterrupt
        return real(camera, out_dir, *args, progress=stop_after_two, **kwargs)

    repo = tmp_path / "demo" / "calibrepo"
    args = ["demo", "--no-build", "--force", "--repo", str(repo), "--camera", "democam_mini", "--n-science", "1"]
    monkeypatch.setattr(night, "simulate_night", stopped)
    res = CliRunner().invoke(_app(), args)
    assert res.exit_code == 130          # click: Aborted
    written = sorted(p.name for p in repo.parent.iterdir())
    assert [n for n in written if n.startswith("sim-")] == ["sim-democam_mini-2026-11-20-seed1-n1.partial"]
    assert len(list((repo.parent / written[-1] / "raw").glob("*.fits*"))) >= 2
    monkeypatch.setattr(night, "simulate_night", real)
    res = CliRunner().invoke(_app(), args)
    assert res.exit_code == 0, res.output
    # 5 bias, 5 dark, 5 flats in each of r and z, 1 science in each: 22 exposures
    assert "ingested 22 exposures" in res.output
    assert sorted(p.name for p in repo.parent.iterdir()) == ["calibrepo", "sim-democam_mini-2026-11-20-seed1-n1"]

# ------------------------------------------------------------------------------------------------
# prune: reports by default, deletes with --delete, exactly what its policy allows
# ------------------------------------------------------------------------------------------------


def test_prune_reports_then_frees_what_the_policy_allows(repo_with_nan):
    """Files really on disk under work/: the product's inputs b0 and b1 (finished), an exposure no
    product used (a failed build's, kept unless --older-than), a sky frame (derived), a dead
    writer's temporary, and files of a type whose build is running (this process: never touched)."""
    import os
    import time

    from calib_core.io.atomic import private_name
    from calib_core.repository.buildruns import _this_process
    from calib_core.repository.registry import BuildRunRow, Registry

    env, _ = repo_with_nan
    root = Path(env["CALIBFLOW_REPO"])
    work = root / "work" / "democam_mini"
    sizes = {"bias/b0-det000-k1.fits": 1000, "bias/b0-det000-k1.json": 10, "bias/b1-det001-k1-crmask.fits": 300,
             "bias/b7-det000-k1.fits": 4000, "sky/frame-r-det000-0123abcd.fits": 500,
             "sky/b0-surface-0123abcd.pkl": 70, "dark/b0-det000-k2.fits": 2000}
    for name, size in sizes.items():
        (work / name).parent.mkdir(parents=True, exist_ok=True)
        (work / name).write_bytes(b"x" * size)
    dead = private_name(work / "bias" / "b1-det002-k1.fits").name.split("~")
    dead[2] = "999999999"                            # no such process
    stale = work / "bias" / "~".join(dead)
    stale.write_bytes(b"x" * 20)
    old = time.time() - 3 * 86400
    os.utime(work / "bias/b7-det000-k1.fits", (old, old))
    reg = Registry.open(f"sqlite:///{root / 'registry.sqlite3'}")
    with reg.session() as s:
        import datetime as dt

        s.add(BuildRunRow(calib_type="dark", parameters={"_process": _this_process()}, status="running",
                          started_at=dt.datetime.now(dt.timezone.utc)))
    reg.engine.dispose()

    def run(*args):
        res = CliRunner().invoke(_app(), ["prune", "--json", *args], env=env)
        assert res.exit_code == 0, res.output
        return _strict_loads(res.stdout)

    on_disk = {p for p in (root / "work").rglob("*") if p.is_file()}
    report = run()
    states = {(g["calib_type"], g["state"]): (g["files"], g["bytes"], g["frees_bytes"]) for g in report["groups"]}
    assert states == {("bias", "finished"): (3, 1310, 1310), ("bias", "unfinished"): (1, 4000, 0),
                      ("bias", "stale-temporary"): (1, 20, 20), ("sky", "derived"): (1, 500, 500),
                      ("sky", "unfinished"): (1, 70, 0),      # no sky product used b0
                      ("dark", "in-use"): (1, 2000, 0)}
    assert report["bytes"] == sum(sizes.values()) + 20 and report["frees_bytes"] == 1830
    assert report["freed_bytes"] == 0 and {p for p in (root / "work").rglob("*") if p.is_file()} == on_disk

    report = run("--delete")
    assert report["freed_bytes"] == 1830 and report["freed_files"] == 5
    left = {str(p.relative_to(work)) for p in (root / "work").rglob("*") if p.is_file()}
    assert left == {"bias/b7-det000-k1.fits", "sky/b0-surface-0123abcd.pkl", "dark/b0-det000-k2.fits"}

    assert run("--older-than", "5", "--delete")["freed_bytes"] == 0     # b7's are 3 days old
    assert run("--older-than", "2", "--delete")["freed_bytes"] == 4000
    assert {str(p.relative_to(work)) for p in (root / "work").rglob("*") if p.is_file()} == \
        {"sky/b0-surface-0123abcd.pkl", "dark/b0-det000-k2.fits"}      # the surface is new, dark in use


# ------------------------------------------------------------------------------------------------
# outputs: relative to the working directory, never into the checkout by accident
# ------------------------------------------------------------------------------------------------


def test_outputs_inside_the_checkout_are_refused(tmp_path, monkeypatch, repo_with_nan):
    from calibflow.common import checkout_root

    if checkout_root() is None:
        pytest.skip("calibflow is not running from a git checkout here")
    env, _ = repo_with_nan
    runner = CliRunner()
    monkeypatch.chdir(REPO_ROOT)                     # a user who followed the set-up is in the checkout
    res = runner.invoke(_app(), ["simulate", "--camera", "democam_mini", "--out", "sim-test-out"])
    line = _one_line_error(res)
    assert f"--out sim-test-out is {REPO_ROOT / 'sim-test-out'}, inside calibflow's source checkout" in line
    assert not (REPO_ROOT / "sim-test-out").exists()
    res = runner.invoke(_app(), ["apply-sky", "b0", "--out", "skysub/"], env=env)
    assert "inside calibflow's source checkout" in _one_line_error(res)
    assert not (REPO_ROOT / "skysub").exists()
    res = runner.invoke(_app(), ["demo", "--repo", "calib_core/calibrepo"])
    assert "--repo calib_core/calibrepo is" in _one_line_error(res)
    # the folders the checkout ignores for outputs (demo/, calibrepo/) and anywhere else are fine
    from calibflow.common import refuse_inside_checkout

    refuse_inside_checkout(Path("demo/calibrepo"), "--repo")
    refuse_inside_checkout(Path("calibrepo"), "--repo")
    monkeypatch.chdir(tmp_path)
    refuse_inside_checkout(Path("skysub/"), "--out")    # relative to where the user is


def test_readme_writes_nothing_into_the_checkout():
    """The README's own commands: relative outputs are written after it moves out of the checkout."""
    text = (REPO_ROOT / "README.md").read_text()
    using = text[text.index("## Using it"):text.index("### Scaling out")]
    lines = [ln.strip() for ln in using.splitlines()]
    cd = next(i for i, ln in enumerate(lines) if ln.startswith("mkdir") and "cd " in ln)
    for i, ln in enumerate(lines):
        if ln.startswith("calibflow ") and any(f" {opt} " in ln for opt in ("--out", "--repo")):
            assert i > cd, f"README runs {ln!r} before leaving the checkout"
    deploy = text[text.index("## Deployments"):text.index("## Running at an observatory")]
    for ln in deploy.splitlines():
        if ln.strip().startswith("calibflow demo"):
            assert "--keep" in ln or "--force" in ln, f"README: {ln.strip()!r} would delete what make demo built"


# ------------------------------------------------------------------------------------------------
# Prefect's console log: quiet unless -v
# ------------------------------------------------------------------------------------------------


def test_quiet_prefect_hides_info_keeps_warnings():
    import io

    from calibflow.common import quiet_prefect

    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    log = logging.getLogger("prefect")
    old_level = log.level
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    try:
        quiet_prefect(verbose=False)
        run_log = logging.getLogger("prefect.task_runs")
        run_log.info("Finished in state Completed()")
        run_log.warning("excluded exposures")
        quiet_prefect(verbose=False)             # twice: still one filter
        assert len(handler.filters) == 1
        quiet_prefect(verbose=True)
        run_log.info("Beginning flow run")
    finally:
        log.removeHandler(handler)
        log.setLevel(old_level)
    assert stream.getvalue().splitlines() == ["excluded exposures", "Beginning flow run"]


def test_the_embedded_api_started_early_is_the_one_the_flow_uses():
    """``calibflow demo`` starts the embedded Prefect server beside its simulation
    (``calibflow.common.start_embedded_api``); the flow that runs afterwards must use that server,
    not start a second one. In a fresh process: one server process, the flow run recorded in it."""
    import sys

    script = """
import json, os
from calibflow.common import start_embedded_api
wait = start_embedded_api()
wait()
from prefect.server.api.server import SubprocessASGIServer
early = SubprocessASGIServer()
from prefect import flow

@flow
def hello():
    from prefect.runtime import flow_run
    return flow_run.id

run_id = hello()
from prefect.client.orchestration import get_client
with get_client(sync_client=True) as c:
    api = str(c.api_url)
    state = c.read_flow_run(run_id).state.type.value
children = os.popen(f"ps -o args= --ppid {os.getpid()}").read()
print(json.dumps({"early": early.api_url, "api": api, "state": state,
                  "servers": children.count("uvicorn")}))
"""
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}   # the tests' PREFECT_HOME
    out = subprocess.run([sys.executable, "-c", script], cwd=REPO_ROOT, env=env, capture_output=True,
                         text=True, timeout=180)
    assert out.returncode == 0, out.stderr[-2000:]
    r = json.loads(out.stdout.strip().splitlines()[-1])
    assert r["api"].rstrip("/") == r["early"].rstrip("/"), r
    assert r["state"] == "COMPLETED" and r["servers"] == 1, r
