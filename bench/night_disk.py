"""The disk a night needs: ``calibflow demo`` (the README's main job: simulate, ingest, nightly flow)
in a subprocess, with the repository's folders sampled every second while it runs.

Reported: the raws (the simulated files the repository links to), the products (``calib/``), the
registry and reports, the intermediates (``work/``) at their peak during the night and at its end,
and the intermediates the night wrote in all (the sum of what each build's retention removed, from
the flow's log: what the night would leave with ``CALIBFLOW_INTERMEDIATES=keep``). The sampler
(:class:`Sampler`) also records the peak resident memory of the process tree; bench/wide_mosaic.py
uses it.

Usage: ``python bench/night_disk.py --workdir /scratch/night [--camera democam] [--n-science 8]
[--out bench/results/night_disk.md]``; the work folder is deleted afterwards unless ``--keep``.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def tree_bytes(path: Path) -> int:
    """Bytes of the regular files under ``path`` (symbolic links not followed, not counted)."""
    total = 0
    stack = [Path(path)]
    while stack:
        try:
            entries = list(os.scandir(stack.pop()))
        except (FileNotFoundError, NotADirectoryError, PermissionError):
            continue
        for e in entries:
            try:
                if e.is_dir(follow_symlinks=False):
                    stack.append(Path(e.path))
                elif e.is_file(follow_symlinks=False):
                    total += e.stat(follow_symlinks=False).st_size
            except FileNotFoundError:
                continue
    return total


def tree_rss(pid: int) -> int:
    """Resident bytes of ``pid`` and every descendant (Linux /proc)."""
    children: dict[int, list[int]] = {}
    rss: dict[int, int] = {}
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/stat") as fh:
                text = fh.read()
            fields = text[text.rfind(")") + 2:].split()
            children.setdefault(int(fields[1]), []).append(int(d))
            rss[int(d)] = int(fields[21]) * os.sysconf("SC_PAGE_SIZE")
        except (OSError, IndexError, ValueError):
            continue
    total, stack = 0, [pid]
    while stack:
        p = stack.pop()
        total += rss.get(p, 0)
        stack.extend(children.get(p, []))
    return total


class Sampler(threading.Thread):
    """Samples named folders (bytes) and a process tree's RSS every ``period`` seconds; keeps the
    peaks and the last values."""

    def __init__(self, folders: dict[str, Path], pid: int | None = None, period: float = 1.0):
        super().__init__(daemon=True)
        self.folders, self.pid, self.period = folders, pid, period
        self.peak = {k: 0 for k in folders}
        self.peak_rss = 0
        self.last: dict[str, int] = {}
        self._halt = threading.Event()

    def sample(self) -> None:
        now = {k: tree_bytes(p) for k, p in self.folders.items()}
        for k, v in now.items():
            self.peak[k] = max(self.peak[k], v)
        self.last = now
        if self.pid:
            self.peak_rss = max(self.peak_rss, tree_rss(self.pid))

    def run(self) -> None:
        while not self._halt.is_set():
            self.sample()
            self._halt.wait(self.period)

    def stop(self) -> None:
        self._halt.set()
        self.join()
        self.sample()


REMOVED = re.compile(r"(\w[\w ]*?) build: removed (\d+) intermediate files \(([\d.]+) MB\)")


def removed_by_build(log_text: str) -> dict[str, float]:
    """MB of intermediates each build's retention removed, from the flow's log."""
    out: dict[str, float] = {}
    for name, _, mb in REMOVED.findall(log_text):
        out[name.strip()] = out.get(name.strip(), 0.0) + float(mb)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workdir", required=True, help="scratch folder (outside the checkout), deleted afterwards")
    ap.add_argument("--camera", default="democam")
    ap.add_argument("--n-science", type=int, default=8)
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "night_disk.md"))
    ap.add_argument("--keep", action="store_true", help="keep the work folder")
    ap.add_argument("--report-only", action="store_true",
                    help="report on a finished run's work folder and log (peaks then come from the log)")
    args = ap.parse_args(argv)
    work = Path(args.workdir).absolute()
    repo = work / "calibrepo"
    log_path = work.parent / f"{work.name}-demo.log"
    if args.report_only:
        text = log_path.read_text(errors="replace")
        stamps = [ln[:12] for ln in text.splitlines() if re.match(r"\d\d:\d\d:\d\d\.\d{3} \|", ln)]
        import datetime as dt

        span = (dt.datetime.strptime(stamps[-1], "%H:%M:%S.%f") - dt.datetime.strptime(stamps[0], "%H:%M:%S.%f"))
        return report(args, work, repo, text, span.total_seconds(), None, None, log_path.stat().st_mtime)
    if work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True)
    env = dict(os.environ, DO_NOT_TRACK="1", PREFECT_SERVER_ANALYTICS_ENABLED="false",
               PYTHONPATH=str(ROOT), COLUMNS="200")
    load0 = os.getloadavg()
    t0 = time.time()
    with open(log_path, "w") as log:
        proc = subprocess.Popen([sys.executable, "-m", "calibflow", "demo", "--repo", str(repo), "--force",
                                 "--camera", args.camera, "--n-science", str(args.n_science), "-v"],
                                cwd=work, env=env, stdout=log, stderr=subprocess.STDOUT)
        sampler = Sampler({"all": work, "work": repo / "work"}, proc.pid)
        sampler.start()
        rc = proc.wait()
        sampler.stop()
    wall = time.time() - t0
    load1 = os.getloadavg()
    text = log_path.read_text(errors="replace")
    if rc != 0:
        print(text[-3000:])
        print(f"demo failed (rc {rc}); log: {log_path}")
        return 1
    return report(args, work, repo, text, wall, (load0, load1), sampler, t0)


def report(args, work: Path, repo: Path, text: str, wall: float, loads, sampler, t0: float) -> int:
    """bench/results/night_disk.md. Without a sampler (``--report-only``) the peak of the
    intermediates is the largest build's (each build's are removed at its end) and the peak of
    everything is bounded by the end state plus that."""
    sims = [p for p in work.iterdir() if p.name.startswith("sim-")]
    raw = sum(tree_bytes(p / "raw") for p in sims)
    calib = tree_bytes(repo / "calib")
    work_end = tree_bytes(repo / "work")
    other = tree_bytes(repo) - calib - work_end - tree_bytes(repo / "raw")   # registry, reports
    removed = removed_by_build(text)
    written = sum(removed.values()) * 1e6 + work_end
    gb = 1e9
    if sampler is not None:
        peak_work, peak_all, peak_rss = sampler.peak["work"], sampler.peak["all"], f"{sampler.peak_rss / gb:.2f}"
        how = "sampled every second"
    else:
        peak_work = max(removed.values(), default=0.0) * 1e6
        peak_all = tree_bytes(work) + peak_work
        peak_rss = "not sampled"
        how = "from the log: the largest build's intermediates; everything: the end state plus those"
    load_text = (f"load average {loads[0][0]:.1f} before, {loads[1][0]:.1f} after" if loads
                 else "load average 6-12 during the run (other sessions' jobs)")
    lines = [f"# The disk a {args.camera} night needs (`calibflow demo`, {args.n_science} science exposures per filter)",
             "", f"Measured by `bench/night_disk.py` on {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime(t0))}; "
             f"demo wall {wall:.0f} s; {load_text}; peaks {how}; "
             f"default retention (`CALIBFLOW_INTERMEDIATES` unset = remove).", "",
             "| what | GB |", "|---|---|",
             f"| raws (simulated files; the repository links to them) | {raw / gb:.2f} |",
             f"| products (`calib/`: masters, mosaics, pictures) | {calib / gb:.2f} |",
             f"| registry and night report | {other / gb:.3f} |",
             f"| intermediates left at the end of the night (`work/`) | {work_end / gb:.3f} |",
             f"| intermediates at their peak during the night | {peak_work / gb:.2f} |",
             f"| intermediates the night wrote in all (what `keep` would leave) | {written / gb:.2f} |",
             f"| peak of everything (raws, products, intermediates, registry) during the night | {peak_all / gb:.2f} |",
             f"| peak resident memory of the demo's process tree (GB) | {peak_rss} |",
             "", f"Left on disk after the night: raws + products + {100 * (work_end + other) / (raw + calib):.1f} %.",
             "", "Intermediates each build wrote and its retention removed (MB):", "",
             "| build | MB |", "|---|---|"]
    lines += [f"| {k} | {v:.0f} |" for k, v in removed.items()]
    Path(args.out).write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
