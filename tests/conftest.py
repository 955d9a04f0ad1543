"""Shared test fixtures: Prefect settings, a throwaway PostgreSQL server, registries on both backends.

PostgreSQL: the session starts its own server from the machine's binaries (``initdb`` and ``pg_ctl``
in a temporary folder, on a free loopback port) and every registry test runs on SQLite and on
PostgreSQL. Where the binaries are missing the PostgreSQL cases skip with the reason, unless
``CALIBFLOW_REQUIRE_POSTGRES=1`` (set by ``.ci/run``), which turns that into a failure.
"""

from __future__ import annotations

import os
import tempfile

# Prefect settings must be in the environment before anything imports prefect (docs/prefect.md#settings-for-tests).
_PREFECT_HOME = tempfile.mkdtemp(prefix="calibflow-test-prefect-")
os.environ.update({
    "DO_NOT_TRACK": "1",
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "PREFECT_HOME": _PREFECT_HOME,
    "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "120",
    "PREFECT_LOGGING_LEVEL": "WARNING",
    "PREFECT_LOGGING_TO_API_WHEN_MISSING_FLOW": "ignore",
    "DASK_LOGGING__DISTRIBUTED": "warning",
    "PREFECT_TASKS_DEFAULT_NO_CACHE": "true",
    "PREFECT_SERVER_UI_SHOW_PROMOTIONAL_CONTENT": "false",
    "CALIBFLOW_NO_LIFELINE": "1",       # CLI commands run in-process here; test_hostile runs it in a subprocess
})

import atexit  # noqa: E402
import glob  # noqa: E402
import itertools  # noqa: E402
import shutil  # noqa: E402
import socket  # noqa: E402
import subprocess  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

# registered first, so it runs last: after Prefect's own exit handlers have stopped its servers
atexit.register(shutil.rmtree, _PREFECT_HOME, True)

REPO_ROOT = Path(__file__).resolve().parents[1]
REALDATA = REPO_ROOT.parent / "shared" / "realdata"


def _pg_bin(name: str) -> str | None:
    found = shutil.which(name)
    if found:
        return found
    candidates = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"))
    return candidates[-1] if candidates else None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class PostgresServer:
    """A PostgreSQL cluster in a temporary folder, stopped and deleted at the end of the session."""

    def __init__(self):
        self.initdb = _pg_bin("initdb")
        self.pg_ctl = _pg_bin("pg_ctl")
        if not (self.initdb and self.pg_ctl):
            raise FileNotFoundError("PostgreSQL server binaries (initdb, pg_ctl) not found; "
                                    "install them with `apt-get install postgresql` or run .ci/run")
        self.dir = Path(tempfile.mkdtemp(prefix="calibflow-pg-"))
        self.data = self.dir / "data"
        self.port = _free_port()
        self.user = "postgres"
        self._as = []
        if os.geteuid() == 0:  # initdb refuses to run as root: run the server as the postgres user
            import pwd

            try:
                pw = pwd.getpwnam("postgres")
            except KeyError:
                pw = pwd.getpwnam("nobody")
            os.chown(self.dir, pw.pw_uid, pw.pw_gid)
            self._as = ["runuser", "-u", pw.pw_name, "--"]

    def _run(self, *args, **kw):
        return subprocess.run([*self._as, *args], check=True, capture_output=True, text=True, **kw)

    def start(self):
        self._run(self.initdb, "-D", str(self.data), "-A", "trust", "-U", self.user, "-E", "UTF8",
                  "--no-sync")
        self._pg_start()
        return self

    def _pg_start(self):
        opts = f"-p {self.port} -k {self.dir} -c listen_addresses=127.0.0.1 -c fsync=off -c max_connections=200"
        self._run(self.pg_ctl, "-D", str(self.data), "-o", opts, "-l", str(self.dir / "log"), "-w", "-t", "60",
                  "start")

    def restart(self, down_s: float = 5.0) -> None:
        """Stop the server (fast: open connections are terminated), stay down ``down_s``, start it."""
        self._run(self.pg_ctl, "-D", str(self.data), "-m", "fast", "-w", "stop")
        try:
            time.sleep(down_s)
        finally:
            self._pg_start()

    def stop(self):
        try:
            self._run(self.pg_ctl, "-D", str(self.data), "-m", "fast", "-w", "stop")
        except subprocess.CalledProcessError:
            pass
        shutil.rmtree(self.dir, ignore_errors=True)

    def url(self, database: str = "postgres") -> str:
        return f"postgresql+psycopg://{self.user}@127.0.0.1:{self.port}/{database}"

    def create_database(self, name: str) -> str:
        import psycopg

        with psycopg.connect(f"host=127.0.0.1 port={self.port} user={self.user} dbname=postgres",
                             autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        return self.url(name)


@pytest.fixture(scope="session")
def postgres_server():
    try:
        server = PostgresServer().start()
    except (FileNotFoundError, subprocess.CalledProcessError) as exc:
        detail = getattr(exc, "stderr", "") or str(exc)
        if os.environ.get("CALIBFLOW_REQUIRE_POSTGRES") == "1":
            pytest.fail(f"PostgreSQL is required here but could not start: {detail}")
        pytest.skip(f"PostgreSQL not available: {detail}")
    yield server
    server.stop()


_db_counter = itertools.count()


@pytest.fixture(params=["sqlite", "postgresql"])
def registry_url(request, tmp_path):
    """A fresh, empty registry database URL on each backend."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'registry.sqlite3'}"
    server = request.getfixturevalue("postgres_server")
    return server.create_database(f"calibflow_test_{os.getpid()}_{next(_db_counter)}_{int(time.time())}")


@pytest.fixture
def registry(registry_url):
    from calib_core.repository import Registry

    reg = Registry.open(registry_url)
    reg.upgrade()
    yield reg
    reg.engine.dispose()


@pytest.fixture(scope="session")
def realdata() -> Path:
    """The shared real frames; tests skip with a clear reason when the folder is absent (a user's clone)."""
    if not REALDATA.is_dir():
        pytest.skip(f"real frames not found at {REALDATA} (they live in ../shared/realdata beside the "
                    "checkout; a plain clone does not have them)")
    return REALDATA


@pytest.fixture(scope="session")
def msfc_data() -> Path:
    msfc_ccd = pytest.importorskip("msfc_ccd", reason="the msfc-ccd package (test extra) is not installed")
    return Path(msfc_ccd.__file__).parent / "_data"


@pytest.fixture(scope="session")
def prefect_api():
    """One Prefect API for the whole session (docs/prefect.md#settings-for-tests: a harness per test is slow), with
    heartbeats off. Yields the API URL, for subprocesses that must report to the same server."""
    from prefect.client.orchestration import get_client
    from prefect.settings import temporary_settings
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=180):
        with temporary_settings(updates={"flows.heartbeat_frequency": None}):
            with get_client(sync_client=True) as client:
                url = str(client.api_url).rstrip("/")
            yield url
