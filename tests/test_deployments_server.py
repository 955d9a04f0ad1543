"""The deployments on a real ``prefect server start`` (telemetry off, 127.0.0.1, a free port):
``calibflow serve``, ``calibflow trigger --watch``, the nightly schedule, a run started from the
Prefect UI's form in headless Chromium, and ``prefect deploy --all`` with a process worker.

One server and one serve process for the module; every process started here runs in its own
process group, which is stopped (SIGTERM twice, then SIGKILL) whatever the outcome.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import warnings
from pathlib import Path
from zoneinfo import ZoneInfo

import httpx
import pytest

from calib_core.camera import load_camera
from calib_core.repository import Datastore, list_calibs
from calib_core.simulate.night import simulate_night
from tests._repos import ingested_repo

REPO_ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
NIGHT = "2026-11-20"
# a camera that exists only as a YAML file (democam_mini's geometry under another name, outside
# calib_core/cameras/): served and triggered by its file path, run from folders that do not hold it
CAMERA = "servedcam"
SITE_TZ = "America/Santiago"          # served with --timezone: the nightly cron follows Chile's DST
SCHEDULED_RUNS = 380                  # > a year of daily runs: both DST changes of the zone are crossed
UUID_RE = r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}"


# ------------------------------------------------------------------------------------------------
# processes
# ------------------------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Proc:
    """A background command in its own process group, with its output in a log file."""

    def __init__(self, args: list[str], env: dict, log: Path, cwd: Path | None = None):
        self.args, self.log = args, log
        self._fh = open(log, "wb")
        # SIGINT at its default: a process worker inherits SIG_IGN from a non-interactive shell
        # and then needs two SIGTERMs (docs/prefect.md#stopping-a-worker); stop() sends two anyway.
        self.popen = subprocess.Popen(args, env=env, cwd=cwd, stdout=self._fh, stderr=subprocess.STDOUT,
                                      stdin=subprocess.DEVNULL, start_new_session=True,
                                      preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))

    def alive(self) -> bool:
        return self.popen.poll() is None

    def tail(self, n: int = 4000) -> str:
        try:
            return self.log.read_text(errors="replace")[-n:]
        except OSError:
            return ""

    def stop(self) -> None:
        for sig, wait in ((signal.SIGTERM, 20), (signal.SIGTERM, 10), (signal.SIGKILL, 10)):
            if not self.alive():
                break
            try:
                os.killpg(self.popen.pid, sig)
            except ProcessLookupError:
                break
            try:
                self.popen.wait(wait)
            except subprocess.TimeoutExpired:
                continue
        try:   # children of the group (flow-run processes) that outlived their parent
            os.killpg(self.popen.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        self._fh.close()


def _poll(check, timeout: float, interval: float = 1.0, proc: Proc | None = None, what: str = ""):
    """``check()``'s first truthy value within ``timeout`` seconds, else None (an HTTP or OS error
    counts as not yet); fails the test at once if ``proc`` has exited."""
    t0 = time.monotonic()
    while True:
        try:
            value = check()
        except (httpx.HTTPError, OSError):
            value = None
        if value:
            return value
        if proc is not None and not proc.alive():
            pytest.fail(f"{what}: {' '.join(proc.args[:3])} exited with {proc.popen.returncode}:\n{proc.tail()}")
        if time.monotonic() - t0 > timeout:
            return None
        time.sleep(interval)


def _wait_for(what: str, check, timeout: float, proc: Proc | None = None, interval: float = 0.5):
    """:func:`_poll`, failing the test when nothing came within ``timeout``."""
    value = _poll(check, timeout, interval, proc, what)
    if not value:
        pytest.fail(f"{what}: not within {timeout:.0f} s" + (f"\n{proc.tail()}" if proc else ""))
    return value


class Server:
    def __init__(self, url: str, env: dict, proc: Proc | None = None):
        self.url, self.api, self.env, self.proc = url, f"{url}/api", env, proc
        self.http = httpx.Client(base_url=self.api, timeout=30)

    def deployment(self, name: str) -> dict:
        r = self.http.get(f"/deployments/name/{name}")
        r.raise_for_status()
        return r.json()

    def flow_runs(self, deployment_id: str) -> list[dict]:
        """Every flow run of a deployment, in expected start order (pages of 200, the API's limit)."""
        out: list[dict] = []
        while True:
            body = {"deployments": {"id": {"any_": [deployment_id]}}, "sort": "EXPECTED_START_TIME_ASC",
                    "limit": 200, "offset": len(out)}
            r = self.http.post("/flow_runs/filter", json=body)
            r.raise_for_status()
            page = r.json()
            out += page
            if len(page) < 200:
                return out

    def log_tail(self, n: int = 3000) -> str:
        return self.proc.tail(n) if self.proc else ""

    def flow_run(self, run_id: str) -> dict:
        r = self.http.get(f"/flow_runs/{run_id}")
        r.raise_for_status()
        return r.json()


@pytest.fixture(scope="module")
def prefect_server(tmp_path_factory):
    home = tmp_path_factory.mktemp("prefect-server-home")
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_API")}
    env.update({
        "PREFECT_HOME": str(home), "PREFECT_API_URL": f"{url}/api",   # the UI calls the API there too
        "DO_NOT_TRACK": "1", "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_SERVER_UI_V2_ENABLED": "false",                      # the V1 UI makes no external calls
        "PREFECT_SERVER_UI_SHOW_PROMOTIONAL_CONTENT": "false",
        "PREFECT_LOGGING_LEVEL": "WARNING",
        "PREFECT_SERVER_LOG_RETRYABLE_ERRORS": "true",   # "database is locked" (a 503) is logged too
        # the scheduler fills a year of the nightly schedule at once (test_nightly_schedule...)
        "PREFECT_SERVER_SERVICES_SCHEDULER_MIN_RUNS": str(SCHEDULED_RUNS),
        "PREFECT_SERVER_SERVICES_SCHEDULER_MAX_RUNS": str(SCHEDULED_RUNS),
        "PREFECT_SERVER_SERVICES_SCHEDULER_MAX_SCHEDULED_TIME": "P400D",
        "PREFECT_SERVER_SERVICES_SCHEDULER_MIN_SCHEDULED_TIME": "P390D",
    })
    proc = Proc([str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(port)], env,
                home / "server.log")
    try:
        server = Server(url, env, proc)
        _wait_for("prefect server health", lambda: server.http.get("/health").json() is True, 240, proc)
        yield server
    finally:
        proc.stop()


@pytest.fixture(scope="module")
def camera_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("cameras") / "servedcam.yaml"
    text = (REPO_ROOT / "calib_core" / "cameras" / "democam_mini.yaml").read_text()
    path.write_text(text.replace("name: democam_mini", f"name: {CAMERA}"))
    return path


@pytest.fixture(scope="module")
def night_repo(tmp_path_factory, camera_file):
    root = tmp_path_factory.mktemp("served-night")
    cam = load_camera(camera_file)
    simulate_night(cam, root / "sim", seed=5, night=NIGHT, n_bias=3, n_dark=2, n_flat=0, n_science=0,
                   filters=("r",))
    return ingested_repo(root / "repo", root / "sim" / "raw", str(camera_file))


def _client_env(server: Server, store: Datastore, **extra) -> dict:
    env = dict(server.env)
    env.update({"CALIBFLOW_REPO": str(store.root), "PREFECT_RUNNER_POLL_FREQUENCY": "1",
                "PREFECT_WORKER_QUERY_SECONDS": "2", **extra})
    env.pop("CALIBFLOW_REGISTRY_URL", None)
    return env


class Served:
    def __init__(self, proc: Proc):
        self.proc = proc

    def stop(self):
        self.proc.stop()


@pytest.fixture(scope="module")
def served(prefect_server, night_repo, camera_file, tmp_path_factory):
    store, _ = night_repo
    cwd = tmp_path_factory.mktemp("serve-cwd")      # not the repository's folder: runs must not care
    proc = Proc([str(BIN / "calibflow"), "serve", "--camera", str(camera_file), "--timezone", SITE_TZ],
                _client_env(prefect_server, store), cwd / "serve.log", cwd=cwd)
    try:
        def ready():
            r = prefect_server.http.post("/deployments/filter", json={})
            return {d["name"] for d in r.json()} >= {"bias", "dark", "flat", "fringe", "sky", "nightly"}

        _wait_for("served deployments", ready, 180, proc)
        yield Served(proc)
    finally:
        proc.stop()


def _calibflow(env: dict, *args: str, timeout: float = 400) -> subprocess.CompletedProcess:
    return subprocess.run([str(BIN / "calibflow"), *args], env=env, capture_output=True, text=True,
                          timeout=timeout, stdin=subprocess.DEVNULL)


@pytest.fixture(scope="module")
def cli_bias_run(prefect_server, night_repo, served):
    store, _ = night_repo
    return _calibflow(_client_env(prefect_server, store), "trigger", "build-calib/bias", "--param",
                      f"night={NIGHT}", "--watch", "--interval", "1", "--timeout", "300")


# ------------------------------------------------------------------------------------------------
# tests
# ------------------------------------------------------------------------------------------------


def test_served_deployments(prefect_server, night_repo, served):
    store, _ = night_repo
    bias = prefect_server.deployment("build-calib/bias")
    assert bias["parameters"] == {"camera": CAMERA, "repo": str(store.root)}
    assert bias["parameter_openapi_schema"]["properties"]["config"]["$ref"] == "#/definitions/BiasConfig"
    assert bias["enforce_parameter_schema"] is True and not bias["paused"]
    nightly = prefect_server.deployment("nightly-calibs/nightly")
    (sched,) = nightly["schedules"]
    assert (sched["schedule"]["cron"], sched["schedule"]["timezone"], sched["active"]) == ("0 9 * * *", SITE_TZ, True)


def test_trigger_watch_builds_and_registers(prefect_server, night_repo, cli_bias_run):
    store, reg = night_repo
    res = cli_bias_run
    assert res.returncode == 0, res.stdout + res.stderr
    run_id = re.search(rf"build-calib/bias: ({UUID_RE})", res.stdout).group(1)
    assert f"{prefect_server.url}/runs/flow-run/{run_id}" in res.stdout
    assert "Running" in res.stdout and f"flow run {prefect_server.flow_run(run_id)['name']} completed" in res.stdout
    # progress while it ran (a bar per stage, from the run's task runs), then what it built
    assert re.search(r"^bias process +━+ \d+/\d+", res.stderr, re.M), res.stderr
    assert re.search(r"^bias combine +━+ 9/9", res.stderr, re.M), res.stderr
    assert "bias 2026-11-20: 9 new, 0 already built" in res.stdout
    run = prefect_server.flow_run(run_id)
    assert run["state"]["type"] == "COMPLETED"
    assert run["parameters"] == {"camera": CAMERA, "repo": str(store.root), "night": NIGHT}
    # the products are in the registry, recorded as built by that flow run
    n_det = 9           # democam_mini's geometry
    products = list_calibs(reg, calib_type="bias")
    assert len(products) == n_det and {p.calib_date for p in products} == {NIGHT}
    from calib_core.repository.registry.models import BuildRunRow

    with reg.session() as s:
        runs = s.query(BuildRunRow).filter_by(calib_type="bias").all()
        assert [(r.flow_run_id, r.status) for r in runs] == [(run_id, "completed")]
    # and `calibflow calibs` shows them
    listed = _calibflow(_client_env(prefect_server, store), "calibs", "--type", "bias", "--json")
    assert listed.returncode == 0, listed.stderr
    assert sorted(r["calib_id"] for r in json.loads(listed.stdout)) == sorted(p.calib_id for p in products)
    assert all(p.calib_id in res.stdout for p in products)        # --watch listed every product


def test_trigger_refuses_bad_parameters(prefect_server, night_repo, served):
    store, _ = night_repo
    env = _client_env(prefect_server, store)
    dep = prefect_server.deployment("build-calib/flat")
    before = len(prefect_server.flow_runs(dep["id"]))
    res = _calibflow(env, "trigger", "flat", "-p", "config.combine.statistic=MODE", "-p", "night=20261120")
    assert res.returncode == 1
    assert "invalid parameters for build-calib/flat" in res.stderr
    assert "config.combine.statistic: 'MODE' is not one of" in res.stderr
    assert "night: '20261120' does not match" in res.stderr
    res = _calibflow(env, "trigger", "flat", "-p", "calib_type=bias")
    assert res.returncode == 1 and "unknown parameter(s) calib_type" in res.stderr
    # a date the pattern lets through and the calendar does not: one line, before any run exists
    for dep_name, bad in (("flat", "night=2026-13-45"), ("flat", "calib_date=2026-02-30"),
                          ("nightly-calibs/nightly", "night=2026-13-45")):
        res = _calibflow(env, "trigger", dep_name, "-p", bad, "--watch")
        key, value = bad.split("=")
        assert res.returncode == 1, res.stdout + res.stderr
        assert res.stderr.count("\n") == 1 and res.stderr.startswith("error: invalid parameters for "), res.stderr
        assert f"{key}: '{value}' is not a real date" in res.stderr and "no run was created" in res.stderr
        assert "flow run" not in res.stdout
    res = _calibflow(env, "trigger", "no-such-deployment")
    assert res.returncode == 1 and "no deployment 'no-such-deployment'" in res.stderr
    assert "build-calib/flat" in res.stderr
    # the server enforces the same schema on runs created by anyone (the UI, the API)
    r = prefect_server.http.post(f"/deployments/{dep['id']}/create_flow_run",
                                 json={"parameters": {"config": {"combine": {"statistic": "MODE"}}}})
    assert r.status_code == 409 and "MODE" in r.text
    assert len(prefect_server.flow_runs(dep["id"])) == before
    nightly = prefect_server.deployment("nightly-calibs/nightly")
    assert not [r for r in prefect_server.flow_runs(nightly["id"]) if r["parameters"].get("night") == "2026-13-45"]


def test_trigger_watch_exits_nonzero_when_the_run_fails(prefect_server, night_repo, served):
    store, _ = night_repo
    res = _calibflow(_client_env(prefect_server, store), "trigger", "build-calib/dark", "-p", "night=2020-01-01",
                     "--watch", "--interval", "1", "--timeout", "300")
    assert res.returncode == 1, res.stdout + res.stderr
    run_id = re.search(rf"build-calib/dark: ({UUID_RE})", res.stdout).group(1)
    assert "ended Failed" in res.stderr and "no dark exposures" in res.stderr
    assert prefect_server.flow_run(run_id)["state"]["type"] == "FAILED"


def _daily_times(hour: int, minute: int, zone: str, after: dt.datetime, n: int) -> list[dt.datetime]:
    """The next n wall-clock times hour:minute in zone after `after`, with zoneinfo alone."""
    tz = ZoneInfo(zone)
    day = after.astimezone(tz).date()
    out = []
    while len(out) < n:
        local = dt.datetime.combine(day, dt.time(hour, minute), tzinfo=tz)
        if local > after:
            out.append(local.astimezone(dt.timezone.utc))
        day += dt.timedelta(days=1)
    return out


def test_nightly_schedule_produces_runs_at_site_morning(prefect_server, served):
    dep = prefect_server.deployment("nightly-calibs/nightly")
    # every run of the deployment, whatever its state: one that falls due during the test is picked
    # up by the serve process and leaves SCHEDULED, but keeps its expected start time
    runs = _wait_for("scheduled nightly runs",
                     lambda: (lambda r: r if len(r) >= SCHEDULED_RUNS else None)(prefect_server.flow_runs(dep["id"])),
                     120, served.proc, interval=2)
    got = [dt.datetime.fromisoformat(r["expected_start_time"]) for r in runs]
    assert len(got) == SCHEDULED_RUNS
    created = dt.datetime.fromisoformat(dep["created"])
    # the first run is the first 09:00 in Santiago after the deployment was created
    assert created - dt.timedelta(minutes=5) < got[0] <= created + dt.timedelta(days=1)
    assert got == _daily_times(9, 0, SITE_TZ, got[0] - dt.timedelta(seconds=1), SCHEDULED_RUNS)
    # a year of runs crosses both of Chile's clock changes: the UTC time of the run moves with them
    assert {t.astimezone(ZoneInfo(SITE_TZ)).utcoffset() for t in got} == \
        {dt.timedelta(hours=-3), dt.timedelta(hours=-4)}
    assert {t.strftime("%H:%M") for t in got} == {"12:00", "13:00"}
    assert all(r["auto_scheduled"] and r["parameters"] == dep["parameters"] for r in runs)


def _browser():
    """Headless Debian Chromium under Selenium, with every host but 127.0.0.1 unresolvable."""
    missing = [p for p in ("chromium", "chromedriver") if not shutil.which(p)]
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        missing.append("selenium (Python package, test extra)")
    if missing:
        reason = (f"browser test needs {', '.join(missing)} (Debian: apt-get install chromium chromium-driver; "
                  ".ci/run installs them)")
        if os.environ.get("CALIBFLOW_REQUIRE_BROWSER") == "1":
            pytest.fail(reason)
        pytest.skip(reason)
    opts = webdriver.ChromeOptions()
    opts.binary_location = shutil.which("chromium")
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                "--window-size=1400,1000", "--host-resolver-rules=MAP * ~NOTFOUND , EXCLUDE 127.0.0.1"):
        opts.add_argument(arg)
    # the console and the network log, for the report of a failed UI step (_browser_log)
    opts.set_capability("goog:loggingPrefs", {"browser": "ALL", "performance": "ALL"})
    return webdriver.Chrome(service=Service(shutil.which("chromedriver")), options=opts)


def _browser_log(driver, limit: int = 40) -> str:
    """The page's console messages and its API requests that failed or answered >= 400, newest last."""
    lines = []
    try:
        for e in driver.get_log("browser"):
            lines.append(f"console {e.get('level')}: {e.get('message', '')[:300]}")
        urls = {}
        for e in driver.get_log("performance"):
            msg = json.loads(e["message"])["message"]
            params = msg.get("params", {})
            if msg["method"] == "Network.requestWillBeSent":
                urls[params["requestId"]] = f"{params['request']['method']} {params['request']['url']}"
            elif msg["method"] == "Network.responseReceived" and params["response"]["status"] >= 400:
                lines.append(f"HTTP {params['response']['status']}: {urls.get(params['requestId'], params['response']['url'])}")
            elif msg["method"] == "Network.loadingFailed":
                lines.append(f"failed ({params.get('errorText')}, canceled={params.get('canceled')}): "
                             f"{urls.get(params['requestId'], '?')}")
    except Exception as why:                          # noqa: BLE001 - the browser itself is gone
        lines.append(f"(no browser log: {why})")
    return "\n".join(lines[-limit:])


def test_ui_custom_run_with_a_form_parameter(prefect_server, night_repo, cli_bias_run, tmp_path):
    """Find the dark deployment in the UI, open Run > Custom run, set `night` in the form, submit,
    follow the run's page until it shows Completed; then check the run and its products."""
    from selenium.common.exceptions import ElementClickInterceptedException, StaleElementReferenceException
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support import expected_conditions as EC
    from selenium.webdriver.support.ui import WebDriverWait

    assert cli_bias_run.returncode == 0, "the dark build needs the bias built by the CLI test"
    store, reg = night_repo
    dep_id = prefect_server.deployment("build-calib/dark")["id"]
    driver = _browser()
    step = "opening the UI"
    try:
        # a click that lands while the page animates (a toast sliding in) is retried; the patience
        # is for a loaded 2-core machine, where the UI's polling can take over a minute to list a run
        wait = WebDriverWait(driver, 180, ignored_exceptions=[ElementClickInterceptedException,
                                                              StaleElementReferenceException])

        def click(xpath: str):
            wait.until(lambda d: d.find_element(By.XPATH, xpath).click() or True)

        driver.get(f"{prefect_server.url}/deployments")
        step = "Run > Custom run on the dark deployment"
        click("//a[normalize-space()='dark']")
        click("//button[normalize-space()='Run']")
        click("//*[normalize-space()='Custom run']")

        def night_field():
            label = wait.until(EC.presence_of_element_located(
                (By.XPATH, "//span[@class='schema-form-property__label' and starts-with(normalize-space(), 'night')]")))
            return label.find_element(By.XPATH, "./ancestor::div[contains(concat(' ', normalize-space(@class), ' '),"
                                                " ' schema-form-property ')][1]")

        def night_input():
            return night_field().find_element(By.CSS_SELECTOR, "fieldset textarea, fieldset input")

        step = "typing the night into the form"
        wait.until(lambda d: night_field().find_element(By.XPATH, ".//button[normalize-space()='str']").click()
                   or True)                                                                # str | None
        wait.until(lambda d: night_field().find_elements(By.CSS_SELECTOR, "fieldset textarea, fieldset input"))
        # The field is drawn again after the type switch; on a loaded machine that can happen while
        # the keys go in, leaving part of the date (which the form then refuses). Type until the
        # field holds the whole night on two reads in a row, half a second apart.
        seen: list[str] = []

        def night_is_typed(d) -> bool:
            el = night_input()
            value = el.get_attribute("value") or ""
            seen.append(value)
            if value != NIGHT:
                el.send_keys(Keys.CONTROL, "a")
                el.send_keys(NIGHT)            # replaces whatever was selected
                return False
            return len(seen) >= 2 and seen[-2] == NIGHT

        wait.until(night_is_typed)
        run_name = driver.find_element(By.CSS_SELECTOR, ".flow-run-name-input input").get_attribute("value")
        assert run_name
        step = f"submitting the form (run {run_name!r})"
        # The run exists on the server under the name the form gave it. Prefect's UI does not retry an
        # API call the server answered 503 (its SQLite database busy under the other writers: the served
        # runs, the scheduler; Prefect's Python client retries those): it shows "Oops. Something went
        # wrong" and keeps the form, and a person submits again (docs/prefect.md#the-ui-on-sqlite).
        # So does this test, at most three times, and says so.
        submit = "//button[@type='submit' and normalize-space()='Submit']"

        def submitted():
            return [r for r in prefect_server.flow_runs(dep_id) if r["name"] == run_name]

        unanswered: list[str] = []
        for attempt in range(1, 4):
            click(submit)
            runs = _poll(submitted, 60)
            if runs:
                break
            unanswered.append(f"submission {attempt} made no run within 60 s; the browser's log:\n"
                              f"{_browser_log(driver)}\nthe server's log:\n{prefect_server.log_tail()}")
            if not driver.find_elements(By.XPATH, submit):
                # the form is gone (the UI took the submission): the run is on its way, only slow
                runs = _poll(submitted, 120)
                break
        if not runs:
            raise AssertionError("\n".join(unanswered))
        if unanswered:
            warnings.warn(f"the custom-run form was submitted {attempt} times: " + "\n".join(unanswered))
        run_id = runs[0]["id"]
        # ... and the UI's page of that run follows it until it shows Completed
        step = f"following the run's page (run {run_name!r}, {run_id})"
        driver.get(f"{prefect_server.url}/runs/flow-run/{run_id}")
        WebDriverWait(driver, 300, poll_frequency=1).until(EC.presence_of_element_located(
            (By.XPATH, "//*[contains(@class,'state-badge') and normalize-space()='Completed']")))
        assert run_name in driver.find_element(By.TAG_NAME, "body").text
        driver.save_screenshot(str(tmp_path / "completed.png"))
    except (Exception, pytest.fail.Exception) as exc:
        # what the page showed when the step failed: its screenshot, and its text in the report
        shot = tmp_path / "failed.png"
        try:
            driver.save_screenshot(str(shot))
            text = driver.find_element(By.TAG_NAME, "body").text
        except Exception as why:                     # noqa: BLE001 - the browser itself is gone
            text = f"(no page text: {why})"
        pytest.fail(f"UI step failed while {step}: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
                    f"\nscreenshot {shot}\nbrowser log:\n{_browser_log(driver)}\npage text:\n{text[:1500]}")
    finally:
        driver.quit()
    run = prefect_server.flow_run(run_id)
    assert run["state"]["type"] == "COMPLETED"
    assert run["deployment_id"] == dep_id
    assert run["name"] == run_name
    assert run["parameters"]["night"] == NIGHT and run["parameters"]["camera"] == CAMERA
    darks = list_calibs(reg, calib_type="dark")
    assert len(darks) == 9


def _loaded_images(driver, timeout: float = 120, prefix: str = "") -> list:
    """[src prefix, naturalWidth] of the page's images whose src starts with ``prefix``, once at
    least one exists and all of them have finished loading."""
    from selenium.webdriver.support.ui import WebDriverWait

    script = ("return Array.from(document.images).filter(i => i.src.startsWith(arguments[0]))"
              ".map(i => [i.src.slice(0, 40), i.complete ? i.naturalWidth : -1])")
    return WebDriverWait(driver, timeout, poll_frequency=1).until(
        lambda d: (lambda imgs: imgs if imgs and all(w >= 0 for _, w in imgs) else False)(
            d.execute_script(script, prefix)))


def test_ui_shows_the_mosaic_inline(prefect_server, cli_bias_run, tmp_path):
    """The build's mosaic artifact, opened in the Prefect UI in Chromium, shows the picture: the
    data: URI image has loaded (natural width > 0); docs/prefect.md#artifacts."""
    assert cli_bias_run.returncode == 0, cli_bias_run.stdout + cli_bias_run.stderr
    key = f"bias-{CAMERA}-{NIGHT}-mosaic"
    arts = prefect_server.http.post("/artifacts/filter", json={"artifacts": {"key": {"any_": [key]}}}).json()
    assert arts, f"no artifact {key}"
    assert "data:image/png;base64," in arts[0]["data"] and "file://" not in arts[0]["data"]
    driver = _browser()
    try:
        driver.get(f"{prefect_server.url}/artifacts/artifact/{arts[0]['id']}")
        imgs = _loaded_images(driver, prefix="data:image/png")
        driver.save_screenshot(str(tmp_path / "mosaic-artifact.png"))
    finally:
        driver.quit()
    assert all(w > 0 for _, w in imgs), imgs


def test_trigger_watch_nightly_reports_each_build(prefect_server, night_repo, served, cli_bias_run):
    """The nightly deployment's builds are child flow runs: --watch finds them and reports what each
    built (here the bias the CLI test built: found, not rebuilt)."""
    assert cli_bias_run.returncode == 0, "the night's bias comes from the CLI test"
    store, _ = night_repo
    res = _calibflow(_client_env(prefect_server, store), "trigger", "nightly-calibs/nightly", "-p", f"night={NIGHT}",
                     "-p", 'policy={"types": ["bias"]}', "--watch", "--interval", "1", "--timeout", "300")
    assert res.returncode == 0, res.stdout + res.stderr
    assert "bias 2026-11-20: 0 new, 9 already built" in res.stdout, res.stdout


def test_prefect_yaml_deploy_and_process_worker(prefect_server, night_repo, served, camera_file, tmp_path):
    """The second way: prefect.yaml's deployments (`calibflow deploy`), a process work pool and a worker."""
    store, reg = night_repo
    served.stop()                      # the worker takes over the same deployment names
    env = _client_env(prefect_server, store)
    prefect = str(BIN / "prefect")
    res = subprocess.run([prefect, "work-pool", "create", "calibflow", "--type", "process"], env=env,
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stdout + res.stderr
    # `calibflow deploy` (prefect deploy --all, from another folder) with the site's settings from the
    # environment, as the compose stack's deployments service gives them: camera by its file, a time zone
    res = _calibflow({**env, "CALIBFLOW_CAMERA": str(camera_file), "CALIBFLOW_TIMEZONE": "Europe/Madrid"},
                     "deploy", "--prefect-file", str(REPO_ROOT / "prefect.yaml"), timeout=300)
    assert res.returncode == 0, res.stdout + res.stderr
    bias = prefect_server.deployment("build-calib/bias")
    assert bias["work_pool_name"] == "calibflow" and bias["entrypoint"] == "deployments/build.py:build_bias"
    assert bias["pull_steps"] == [{"prefect.deployments.steps.set_working_directory":
                                   {"directory": str(REPO_ROOT)}}]
    assert bias["parameter_openapi_schema"]["properties"]["config"]["$ref"] == "#/definitions/BiasConfig"
    assert bias["parameters"] == {"camera": CAMERA}                  # by its registry name
    (sched,) = prefect_server.deployment("nightly-calibs/nightly")["schedules"]
    assert (sched["schedule"]["cron"], sched["schedule"]["timezone"]) == ("0 9 * * *", "Europe/Madrid")
    worker = Proc([prefect, "worker", "start", "--pool", "calibflow"], env, tmp_path / "worker.log", cwd=tmp_path)
    try:
        _wait_for("worker start", lambda: "started" in worker.tail(), 120, worker)
        # by the camera's file path (the registry holds the same definition)
        res = _calibflow(env, "trigger", "bias", "-p", f"camera={camera_file}", "-p", f"night={NIGHT}",
                         "-p", "calib_date=2026-11-21", "--watch", "--interval", "1", "--timeout", "300")
        assert res.returncode == 0, res.stdout + res.stderr + worker.tail()
    finally:
        worker.stop()
    assert not worker.alive()
    # the worker's run used CALIBFLOW_REPO from its environment (the deployment pins no repo)
    new = [p for p in list_calibs(reg, calib_type="bias") if p.calib_date == "2026-11-21"]
    assert len(new) == len(load_camera(camera_file).detectors)
