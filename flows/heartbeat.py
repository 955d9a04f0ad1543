"""Prefect's flow-run heartbeat, stopped as soon as the flow ends (docs/prefect.md#flow-run-heartbeat).

Prefect 3.9.1 emits a flow run's heartbeat from a thread that sleeps in one-second steps, and every
synchronous flow call joins that thread when it ends: each call waits for the rest of the current
second (a night makes ten such calls, nine of them builds, most one after the other). The
replacement below is Prefect's own function with the sleep made an ``Event.wait``: the same
heartbeats at the same interval, and the join returns at once.

It replaces a private name of ``prefect.flow_engine`` and is installed only on the Prefect version
it was written against (the pin in pyproject.toml); any other leaves Prefect's own in place.
"""

from __future__ import annotations

import contextvars
import threading
from contextlib import contextmanager

import prefect
from prefect import flow_engine

__all__ = ["install", "installed"]

#: the Prefect version whose ``flow_engine._send_heartbeats`` this mirrors
WRITTEN_FOR = "3.9.1"
THREAD_NAME = "calibflow-flow-heartbeat"
#: Prefect's own, as imported (the test compares the two)
PREFECT_SEND_HEARTBEATS = flow_engine._send_heartbeats


@contextmanager
def _send_heartbeats(engine, join_on_exit: bool = True):
    seconds = engine.heartbeat_seconds
    if seconds is None:
        yield
        return
    seconds = max(seconds, flow_engine.MINIMUM_HEARTBEAT_INTERVAL)
    resource, related = engine._build_heartbeat_event_template()
    stop = threading.Event()

    def loop() -> None:
        while not stop.is_set():
            run = engine.flow_run
            if run and run.state and run.state.is_final():
                return
            try:
                engine._emit_flow_run_heartbeat(resource, related)
            except Exception:
                engine.logger.debug("Failed to emit heartbeat", exc_info=True)
            stop.wait(seconds)          # Prefect: `seconds` calls of time.sleep(1), each checking `stop`

    # the caller's context (its settings: the API URL), as Prefect does
    thread = threading.Thread(target=contextvars.copy_context().run, args=(loop,), daemon=True, name=THREAD_NAME)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        if join_on_exit:
            thread.join(timeout=2)


def install() -> bool:
    """Put :func:`_send_heartbeats` where Prefect's flow engine looks for its own; True if it is
    there (idempotent), False on a Prefect version it was not written for."""
    if prefect.__version__ != WRITTEN_FOR or not callable(getattr(flow_engine, "_send_heartbeats", None)):
        return False
    flow_engine._send_heartbeats = _send_heartbeats
    return True


def installed() -> bool:
    return getattr(flow_engine, "_send_heartbeats", None) is _send_heartbeats
