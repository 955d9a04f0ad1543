"""Prefect flows over calib_core; importing any of them puts the prompt flow-run heartbeat in place
(:mod:`flows.heartbeat`, docs/prefect.md#flow-run-heartbeat)."""

from flows.heartbeat import install as _install_heartbeat

_install_heartbeat()
