"""How often a Prefect server refuses a run-creation call that nobody retries (docs/prefect.md#the-ui-on-sqlite).

Prefect's UI sends each API call once: a 503 (the server's "database is locked", which Prefect's
Python client retries) or a dropped connection shows "Oops. Something went wrong" and no run is
created. This starts ``prefect server start`` on SQLite and on PostgreSQL (a throwaway cluster from
the machine's ``initdb``/``pg_ctl``), and for each calls ``POST /deployments/{id}/create_flow_run``
in a loop for ``--seconds``, once alone and once beside ``--writers`` threads that create runs, set
their states and send logs (what a served build does), counting the answers. One run, one machine:

    python bench/prefect_server_writes.py [--seconds 30] [--writers 2] [--out bench/results/prefect_server_writes.md]
"""

from __future__ import annotations

import argparse
import collections
import datetime as dt
import glob
import os
import platform
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx

BIN = Path(sys.executable).parent


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _pg_bin(name: str) -> str:
    found = shutil.which(name) or (sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}")) or [None])[-1]
    if not found:
        raise SystemExit(f"{name} not found: apt-get install postgresql")
    return found


class Postgres:
    """A throwaway PostgreSQL cluster (run as the postgres user when this runs as root)."""

    def __init__(self):
        self.dir = Path(tempfile.mkdtemp(prefix="bench-pg-"))
        self.port = _free_port()
        self.as_user = []
        if os.geteuid() == 0:
            import pwd
            pw = pwd.getpwnam("postgres")
            os.chown(self.dir, pw.pw_uid, pw.pw_gid)
            self.as_user = ["runuser", "-u", "postgres", "--"]

    def run(self, *args):
        subprocess.run([*self.as_user, *args], check=True, capture_output=True)

    def __enter__(self):
        self.run(_pg_bin("initdb"), "-D", str(self.dir / "data"), "-A", "trust", "-U", "postgres", "--no-sync")
        self.run(_pg_bin("pg_ctl"), "-D", str(self.dir / "data"), "-l", str(self.dir / "log"), "-w", "-o",
                 f"-p {self.port} -k {self.dir} -c listen_addresses=127.0.0.1 -c fsync=off", "start")
        return f"postgresql+asyncpg://postgres@127.0.0.1:{self.port}/postgres"

    def __exit__(self, *exc):
        subprocess.run([*self.as_user, _pg_bin("pg_ctl"), "-D", str(self.dir / "data"), "-m", "fast", "-w", "stop"],
                       capture_output=True)
        shutil.rmtree(self.dir, ignore_errors=True)


def measure(db_url: str | None, writers: int, seconds: float) -> dict:
    home = Path(tempfile.mkdtemp(prefix="bench-prefect-"))
    port = _free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_API", "PREFECT_SERVER_DATABASE"))}
    env.update(PREFECT_HOME=str(home), DO_NOT_TRACK="1", PREFECT_SERVER_ANALYTICS_ENABLED="false",
               PREFECT_LOGGING_LEVEL="WARNING")
    if db_url:
        env["PREFECT_SERVER_DATABASE_CONNECTION_URL"] = db_url
    log = open(home / "server.log", "wb")
    proc = subprocess.Popen([str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(port)],
                            env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    api = f"http://127.0.0.1:{port}/api"
    try:
        client = httpx.Client(base_url=api, timeout=60)
        for _ in range(240):
            try:
                if client.get("/health").json() is True:
                    break
            except (httpx.HTTPError, ValueError):
                pass
            time.sleep(0.5)
        flow = client.post("/flows/", json={"name": "bench"}).json()
        dep = client.post("/deployments/", json={"name": "bench", "flow_id": flow["id"]}).json()
        stop = threading.Event()

        def writer():
            w = httpx.Client(base_url=api, timeout=60)
            while not stop.is_set():
                try:
                    r = w.post("/flow_runs/", json={"flow_id": flow["id"], "state": {"type": "RUNNING"}})
                    if r.status_code < 300:
                        rid = r.json()["id"]
                        w.post(f"/flow_runs/{rid}/set_state", json={"state": {"type": "COMPLETED"}, "force": True})
                        w.post("/logs/", json=[{"name": "bench", "level": 20, "message": "m" * 200,
                                                "timestamp": dt.datetime.now(dt.timezone.utc).isoformat(),
                                                "flow_run_id": rid}] * 50)
                except httpx.HTTPError:
                    pass

        threads = [threading.Thread(target=writer, daemon=True) for _ in range(writers)]
        for t in threads:
            t.start()
        answers: collections.Counter = collections.Counter()
        t0 = time.monotonic()
        while time.monotonic() - t0 < seconds:
            try:
                answers[str(client.post(f"/deployments/{dep['id']}/create_flow_run", json={}).status_code)] += 1
            except httpx.HTTPError as exc:
                answers[type(exc).__name__] += 1
        stop.set()
        for t in threads:
            t.join(60)
        return dict(answers)
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
        shutil.rmtree(home, ignore_errors=True)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seconds", type=float, default=30)
    ap.add_argument("--writers", type=int, default=2)
    ap.add_argument("--out", type=Path, default=None)
    a = ap.parse_args(argv)
    rows = []
    for name, make in (("SQLite", lambda: None), ("PostgreSQL", Postgres)):
        for writers in (0, a.writers):
            if make() is None:
                answers = measure(None, writers, a.seconds)
            else:
                with make() as url:
                    answers = measure(url, writers, a.seconds)
            total = sum(answers.values())
            ok = answers.get("201", 0)
            rows.append(f"| {name} | {writers} | {total} | {ok} | {total - ok} ({100 * (total - ok) / total:.1f} %) | "
                        + ", ".join(f"{k}: {v}" for k, v in sorted(answers.items())) + " |")
            print(rows[-1], flush=True)
    import prefect
    text = "\n".join([
        "# Run creation on a Prefect server, without retries",
        "",
        f"Run {dt.datetime.now(dt.timezone.utc):%Y-%m-%d %H:%M} UTC on {platform.machine()}, {os.cpu_count()} cores, "
        f"Prefect {prefect.__version__}; `python bench/prefect_server_writes.py --seconds {a.seconds:g} "
        f"--writers {a.writers}`. Each row: `prefect server start` on that database, `create_flow_run` "
        f"called in a loop for {a.seconds:g} s, beside that many writer threads (runs, states, logs).",
        "",
        "| database | writers | calls | created (201) | refused | answers |",
        "|---|---|---|---|---|---|",
        *rows, ""])
    if a.out:
        a.out.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
