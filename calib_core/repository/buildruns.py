"""Build runs in the registry: one row per run of a build, from start to its end, and the runs a
killed process left ``running`` marked ``crashed`` (docs/architecture.md#resume-and-concurrency)."""

from __future__ import annotations

import datetime as dt
import os
import socket

from calib_core.repository.registry import BuildRunRow, Registry, retry_transient

__all__ = ["mark_crashed_runs", "start_build_run", "finish_build_run"]


def _start_ticks(pid: int) -> int | None:
    """When process ``pid`` started (clock ticks since boot, Linux), None if it does not exist."""
    try:
        with open(f"/proc/{pid}/stat") as fh:
            text = fh.read()
    except OSError:
        return None
    return int(text[text.rfind(")") + 2:].split()[19])


def _this_process() -> dict:
    return {"host": socket.gethostname(), "pid": os.getpid(), "started": _start_ticks(os.getpid())}


def _gone(proc: dict) -> bool:
    """True when the process that ran a build is known to have ended (same host, pid gone or reused)."""
    if not isinstance(proc, dict) or proc.get("host") != socket.gethostname() or not proc.get("pid"):
        return False
    started = _start_ticks(int(proc["pid"]))
    return started is None or (proc.get("started") is not None and started != proc["started"])


def mark_crashed_runs(registry: Registry) -> int:
    """Build runs still ``running`` whose process has ended (killed, lost) become ``crashed``."""
    now = dt.datetime.now(dt.timezone.utc)
    n = 0
    with registry.session() as s:
        for row in s.query(BuildRunRow).filter(BuildRunRow.status == "running"):
            proc = (row.parameters or {}).get("_process")
            if _gone(proc):
                row.status, row.finished_at = "crashed", now
                row.message = f"process {proc['pid']} on {proc['host']} ended before the run finished"
                n += 1
    return n


def start_build_run(registry: Registry, flow_run_id: str | None, calib_type: str, parameters: dict) -> int:
    return retry_transient(_start_build_run, registry, flow_run_id, calib_type, parameters, what="start build run")


def _start_build_run(registry: Registry, flow_run_id: str | None, calib_type: str, parameters: dict) -> int:
    mark_crashed_runs(registry)
    with registry.session() as s:
        row = BuildRunRow(flow_run_id=flow_run_id, calib_type=calib_type,
                          parameters={**parameters, "_process": _this_process()},
                          status="running", message="", started_at=dt.datetime.now(dt.timezone.utc))
        s.add(row)
        s.flush()
        return row.id


def finish_build_run(registry: Registry, run_id: int, status: str, message: str = "") -> None:
    retry_transient(_finish_build_run, registry, run_id, status, message, what="finish build run")


def _finish_build_run(registry: Registry, run_id: int, status: str, message: str = "") -> None:
    with registry.session() as s:
        row = s.get(BuildRunRow, run_id)
        row.status, row.message = status, message[:4000]
        row.finished_at = dt.datetime.now(dt.timezone.utc)
