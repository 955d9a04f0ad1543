"""Run ``calibflow <args>`` in a process that first meets its partners at a file barrier.

Used by tests/test_concurrency.py to start two identical builds at the same instant:

    python tests/_race_build.py BARRIER_DIR N_PARTIES MODE -- build bias --night ...

Every party imports everything first (prefect, the CLI, the flow), then touches
``BARRIER_DIR/start.<pid>`` and waits until N_PARTIES such files exist, then runs the CLI, so the
imports (seconds) do not decide who is ahead. MODE ``start`` stops there. MODE ``record`` also makes
every call of ``record_calib`` made by the combine task wait at a per-detector barrier until all
parties have reached it: each party has then combined and written its own copy, and their
registrations of the same product really collide. Each such meeting is printed as ``RENDEZVOUS det<N>``
so the test can check the instrument did run (and is not silently bypassed by a refactor).
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

# a partner that never comes is a failure, not a hang (pytest-timeout would also catch it)
PATIENCE_S = 600.0


def meet(folder: Path, name: str, parties: int) -> None:
    (folder / f"{name}.{os.getpid()}").touch()
    start = time.monotonic()
    while len(list(folder.glob(f"{name}.*"))) < parties:
        if time.monotonic() - start > PATIENCE_S:
            raise RuntimeError(f"barrier {name!r} in {folder}: the other parties never arrived")
        time.sleep(0.002)


def main(argv: list[str]) -> None:
    folder, parties, mode = Path(argv[0]), int(argv[1]), argv[2]
    if argv[3] != "--" or mode not in ("start", "record"):
        raise SystemExit("usage: _race_build.py BARRIER_DIR N_PARTIES start|record -- CLI ARGS")
    cli_args = argv[4:]

    import flows.build  # noqa: F401  (import everything heavy before the barrier)
    import tasks.calib_tasks as calib_tasks
    from calibflow.cli import app

    if mode == "record":
        original = calib_tasks.record_calib

        def record_calib_after_meeting(registry, **kwargs):
            det = kwargs["detector"]
            meet(folder, f"record-{kwargs['calib_type']}-{kwargs['calib_date']}-det{det}", parties)
            os.write(1, f"RENDEZVOUS det{det}\n".encode())   # not print(): the flow captures prints
            return original(registry, **kwargs)

        calib_tasks.record_calib = record_calib_after_meeting

    meet(folder, "start", parties)
    sys.argv = ["calibflow", *cli_args]
    app()


if __name__ == "__main__":
    main(sys.argv[1:])
