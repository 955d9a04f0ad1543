"""A build's child processes end when it ends, however it ends (SIGKILL included).

``calibflow build`` / ``nightly`` start processes of their own: the embedded Prefect server (uvicorn),
process-pool or Dask workers. A killed parent cannot stop them, and they would live on as orphans
(holding a port, or still writing intermediates into the repository). :func:`start` launches a small
watcher in its own session that notes the parent's descendants every half second; once the
parent is gone it sends them SIGTERM, then SIGKILL to any still there after a grace period, and
exits. Processes are recognised by pid *and* start time, so a reused pid is never signalled.

With the watcher in place, Ctrl-C and SIGTERM stop the command at once, as SIGKILL would
(:func:`_stop_at_signals`).

Linux only (``/proc``); elsewhere :func:`start` does nothing.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
from pathlib import Path

__all__ = ["start", "descendants", "process_start_time"]

POLL_S = 0.5
GRACE_S = 3.0


def process_start_time(pid: int) -> int | None:
    """The start time of a process (clock ticks since boot), or None if there is none."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = text[text.rfind(")") + 2:].split()
    return int(fields[19])          # field 22 of stat; fields[0] is field 3


def _table() -> dict[int, tuple[int, int]]:
    """pid -> (parent pid, start time) of every process."""
    out = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            text = Path(entry.path, "stat").read_text()
        except OSError:
            continue
        fields = text[text.rfind(")") + 2:].split()
        out[int(entry.name)] = (int(fields[1]), int(fields[19]))
    return out


def descendants(pid: int) -> dict[int, int]:
    """pid -> start time of every process below ``pid``."""
    table = _table()
    children: dict[int, list[int]] = {}
    for p, (pp, _) in table.items():
        children.setdefault(pp, []).append(p)
    out, todo = {}, list(children.get(pid, []))
    while todo:
        p = todo.pop()
        if p in out or p not in table:
            continue
        out[p] = table[p][1]
        todo.extend(children.get(p, []))
    return out


def _alive(pid: int, started: int) -> bool:
    return process_start_time(pid) == started


def _signal_all(known: dict[int, int], sig: int) -> None:
    for pid, started in known.items():
        if _alive(pid, started):
            try:
                os.kill(pid, sig)
            except OSError:
                pass


def _watch(parent: int, parent_started: int) -> None:
    me = os.getpid()
    known: dict[int, int] = {}
    while _alive(parent, parent_started):
        for pid, started in descendants(parent).items():
            if pid != me:
                known[pid] = started
        # a child's own children outlive it as orphans too: keep following those already known
        for pid in list(known):
            for sub, started in descendants(pid).items():
                if sub != me:
                    known.setdefault(sub, started)
        time.sleep(POLL_S)
    _signal_all(known, signal.SIGTERM)
    deadline = time.monotonic() + GRACE_S
    while time.monotonic() < deadline and any(_alive(p, s) for p, s in known.items()):
        time.sleep(0.1)
    _signal_all(known, signal.SIGKILL)


_watcher: int | None = None


def start() -> int | None:
    """Watch this process (once): its descendants are ended when it ends. Returns the watcher's pid.

    The watcher outlives this process on purpose, so it is spawned without a ``subprocess.Popen``
    (whose clean-up at exit would print "ResourceWarning: subprocess ... is still running" at the
    end of every command where warnings are shown).
    ``CALIBFLOW_NO_LIFELINE=1`` turns it off (the test suite does, for the CLI it runs in-process)."""
    global _watcher
    if not sys.platform.startswith("linux") or os.environ.get("CALIBFLOW_NO_LIFELINE") == "1":
        return None
    if _watcher is not None:
        return _watcher
    me = os.getpid()
    started = process_start_time(me)
    if started is None:
        return None
    # its own session, standard streams on /dev/null; this process's other descriptors are not
    # inherited (Python opens them non-inheritable)
    _watcher = os.posix_spawn(sys.executable, [sys.executable, "-m", "calibflow.lifeline", str(me), str(started)],
                              os.environ, setsid=True,
                              file_actions=[(os.POSIX_SPAWN_OPEN, fd, os.devnull, os.O_RDWR, 0) for fd in (0, 1, 2)])
    _stop_at_signals()
    return _watcher


#: the last line of a command stopped by Ctrl-C
INTERRUPTED = ("interrupted (Ctrl-C): stopped; products registered so far are kept, and running the same "
               "command again resumes from the intermediates written so far")
#: the last line of a command stopped by SIGTERM (``timeout``, ``kill``, systemd's stop)
TERMINATED = ("terminated (SIGTERM): stopped; products registered so far are kept, and running the same "
              "command again resumes from the intermediates written so far")


def _stop_at_signals() -> None:
    """Ctrl-C (SIGINT) and SIGTERM end the command at once, as SIGKILL would, with one line saying so
    (exit status 130 and 143, as a shell reports a process those signals ended).

    A terminal's Ctrl-C sends SIGINT to its whole foreground process group, the embedded Prefect
    server included; ``timeout`` and systemd send SIGTERM to the whole group likewise. The server
    stopped at once, while the flow's threads went on for minutes, each call to the dead API failing,
    retrying and logging. Stopping hard is what SIGKILL already does, and it is safe: files are
    written atomically, a rerun reuses the intermediates, the next build marks the stopped run
    crashed, and the watcher ends the server and any pool workers.

    While a flow runs, Prefect's flow engine puts a SIGTERM handler of its own in place
    (``prefect.utilities.engine.capture_sigterm``): it raises ``TerminationSignal`` in the main
    thread, which then waits for every running and queued task before the process can end (a
    ``timeout 30 calibflow demo`` was still running minutes later). The engine installs whatever
    that module's ``_prefect_sigterm_handler`` names, so this command's handler is put there; a
    Prefect without that name keeps its own (``tests/test_hostile.py`` shows which)."""
    if threading.current_thread() is not threading.main_thread():
        return

    def stopper(line: str, status: int):
        def stop(signum, frame):
            try:
                if os.isatty(1):
                    os.write(1, b"\x1b[?25h")          # the progress bars hid the cursor
                os.write(2, ("\n" + line + "\n").encode())
            finally:
                os._exit(status)
        return stop

    signal.signal(signal.SIGINT, stopper(INTERRUPTED, 130))
    on_term = stopper(TERMINATED, 143)
    signal.signal(signal.SIGTERM, on_term)
    try:
        import prefect.utilities.engine as engine
    except ImportError:
        return
    if callable(getattr(engine, "_prefect_sigterm_handler", None)):
        engine._prefect_sigterm_handler = on_term


if __name__ == "__main__":  # the watcher
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _watch(int(sys.argv[1]), int(sys.argv[2]))
