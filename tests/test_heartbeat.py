"""The flow-run heartbeat that stops when the flow ends (flows/heartbeat.py, docs/prefect.md#flow-run-heartbeat).

Prefect's own heartbeat thread sleeps in one-second steps and every flow call joins it, so each
build of a night waited for the rest of a second at its end. calibflow's replacement must emit the
same heartbeats through a real Prefect server and end at once.
"""

from __future__ import annotations

import threading
import time
import types

import pytest
from prefect import flow, flow_engine
from prefect.settings import temporary_settings

import flows  # noqa: F401  (installs the replacement)
from flows import heartbeat


class _Engine:
    """What ``_send_heartbeats`` uses of a flow run engine; counts the heartbeats."""

    def __init__(self, seconds):
        self.heartbeat_seconds = seconds
        self.flow_run = None
        self.logger = types.SimpleNamespace(debug=lambda *a, **k: None)
        self.emitted = threading.Event()
        self.count = 0

    def _build_heartbeat_event_template(self):
        return {}, []

    def _emit_flow_run_heartbeat(self, resource, related):
        self.count += 1
        self.emitted.set()


def _exit_latency(send_heartbeats) -> tuple[float, int]:
    """Seconds from leaving the context (just after the first heartbeat) until it returns; heartbeats."""
    engine = _Engine(30)
    ctx = send_heartbeats(engine)
    ctx.__enter__()
    assert engine.emitted.wait(10), "no heartbeat emitted"
    t0 = time.perf_counter()
    ctx.__exit__(None, None, None)
    return time.perf_counter() - t0, engine.count


def test_importing_the_flows_installs_it_on_the_pinned_prefect():
    import prefect

    assert prefect.__version__ == heartbeat.WRITTEN_FOR       # pyproject.toml pins it
    assert heartbeat.installed() and flow_engine._send_heartbeats is heartbeat._send_heartbeats


def test_it_stops_at_once_where_prefects_own_waits_for_its_second():
    # side by side in one run: Prefect's function waits out the one-second sleep it is in; ours returns
    prefects, n_prefect = _exit_latency(heartbeat.PREFECT_SEND_HEARTBEATS)
    ours, n_ours = _exit_latency(heartbeat._send_heartbeats)
    assert n_prefect == n_ours == 1
    assert prefects > 0.5, f"Prefect's own heartbeat returned in {prefects:.3f} s (the quirk is gone?)"
    assert ours < prefects / 5, f"ours took {ours:.3f} s, Prefect's {prefects:.3f} s"
    assert not any(t.name == heartbeat.THREAD_NAME for t in threading.enumerate())


def test_no_heartbeat_thread_when_heartbeats_are_off():
    engine = _Engine(None)
    with heartbeat._send_heartbeats(engine):
        assert not any(t.name == heartbeat.THREAD_NAME for t in threading.enumerate())
    assert engine.count == 0


def test_a_real_flow_run_sends_its_heartbeat_through_it(prefect_api, monkeypatch):
    sent = []
    original = flow_engine.FlowRunEngine._emit_flow_run_heartbeat

    def spy(self, resource, related):
        sent.append((threading.current_thread().name, resource.get("prefect.resource.id")))
        return original(self, resource, related)

    monkeypatch.setattr(flow_engine.FlowRunEngine, "_emit_flow_run_heartbeat", spy)

    @flow
    def beating() -> str:
        from prefect.runtime import flow_run

        deadline = time.monotonic() + 30
        while not sent and time.monotonic() < deadline:       # the first heartbeat goes out at the start
            time.sleep(0.01)
        return flow_run.id

    with temporary_settings(updates={"flows.heartbeat_frequency": 30}):
        run_id = beating()
    assert sent and sent[0] == (heartbeat.THREAD_NAME, f"prefect.flow-run.{run_id}")
    assert not any(t.name == heartbeat.THREAD_NAME for t in threading.enumerate())


if __name__ == "__main__":      # pragma: no cover
    pytest.main([__file__, "-v"])
