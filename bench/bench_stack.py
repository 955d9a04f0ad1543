#!/usr/bin/env python
"""Benchmark: calibflow's stacking engine against ccdproc.combine on identical inputs.

Every measurement runs in a fresh subprocess (so peak RSS, ``ru_maxrss``, belongs to that tool
alone). Cases (docs/algorithms.md#memory-and-io, ccdproc issue 1012 setup: float32 images, average with sigma
clipping):

* large: N x S^2 (default 40 x 4096^2, 2.7 GB of input files), budgets 1 GB and 256 MB;
* linearity: the first 10 of the same files (time at N=40 / time at N=10, target <= 4.4);
* small: 10 x 2048^2.

Reported per run: wall time, peak RSS, the RSS after imports (baseline), the output size, the
working memory (peak - baseline - output) against the budget, the ratio to ccdproc, and the ratio
to the floor (one pass that reads every input once, in row bands, and averages it).

Usage::

    python bench/bench_stack.py                      # full run, writes bench/results/stack.md
    python bench/bench_stack.py --quick              # 10 x 1024^2 and 40 x 1024^2, no 4096 case
    python bench/bench_stack.py --skip-ccdproc --large-n 20
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


# --------------------------------------------------------------------------------------------------
# workers (run in a subprocess)
# --------------------------------------------------------------------------------------------------


def _rss_now() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def worker(args) -> None:
    sys.path.insert(0, str(ROOT))
    import numpy as np

    files = args.files
    out: dict = {"tool": args.worker, "n": len(files)}
    if args.worker == "calibflow":
        from calib_core.stats.stack import CombineConfig, stack_files

        config = CombineConfig(statistic="MEANCLIP", memory_budget=int(args.budget), mask=[])
        # warm the numba cache on a tiny problem so compile time is not counted (cache=True)
        import calib_core.stats._kernels  # noqa: F401
        from calib_core.maskedimage import MaskedImage
        from calib_core.stats.stack import stack_arrays

        stack_arrays([MaskedImage.from_image(np.ones((4, 40), np.float32) * i) for i in range(6)], config)
        base = _rss_now()
        t0, c0 = time.perf_counter(), time.process_time()
        result, _ = stack_files(files, config)
        out["wall_s"], out["cpu_s"] = time.perf_counter() - t0, time.process_time() - c0
        out["output_bytes"] = result.image.nbytes + result.mask.nbytes + result.variance.nbytes + result.image.size * 2
        out["checksum"] = float(np.nanmean(result.image))
    elif args.worker == "floor":
        from calib_core.io.products import RowReader, _to_native

        _to_native(np.zeros(16, np.float32))      # load the cached byte-swap kernel before timing
        readers_probe = RowReader(files[0])
        ny, nx = readers_probe.shape
        readers_probe.close()
        base = _rss_now()
        t0, c0 = time.perf_counter(), time.process_time()
        readers = [RowReader(p) for p in files]
        rows = max(1, int(args.budget) // (len(files) * nx * 4))
        acc = np.zeros((ny, nx), np.float32)
        buf = np.empty((rows, nx), np.float32)
        for y0 in range(0, ny, rows):
            y1 = min(ny, y0 + rows)
            for r in readers:
                r.read_into("IMAGE", y0, y1, buf[: y1 - y0])
                acc[y0:y1] += buf[: y1 - y0]
        acc /= len(files)
        for r in readers:
            r.close()
        out["wall_s"], out["cpu_s"] = time.perf_counter() - t0, time.process_time() - c0
        out["output_bytes"] = acc.nbytes
        out["checksum"] = float(np.nanmean(acc))
    elif args.worker == "ccdproc":
        import warnings

        import ccdproc

        base = _rss_now()
        t0, c0 = time.perf_counter(), time.process_time()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            result = ccdproc.combine([str(f) for f in files], method="average", sigma_clip=True,
                                     sigma_clip_low_thresh=3, sigma_clip_high_thresh=3,
                                     mem_limit=float(args.budget), unit="adu", dtype=np.float32)
        out["wall_s"], out["cpu_s"] = time.perf_counter() - t0, time.process_time() - c0
        out["output_bytes"] = result.data.nbytes
        out["checksum"] = float(np.nanmean(result.data))
    else:
        raise SystemExit(f"unknown worker {args.worker}")
    out["baseline_rss"] = base
    out["peak_rss"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print("RESULT " + json.dumps(out))


def run_worker(tool: str, files: list[Path], budget: float, timeout: float) -> dict:
    cmd = [sys.executable, __file__, "--worker", tool, "--budget", str(int(budget)), "--files", *map(str, files)]
    t0 = time.perf_counter()
    load = os.getloadavg()[0]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            res = json.loads(line[7:])
            res["budget"] = budget
            res["load"] = load
            return res
    raise RuntimeError(f"{tool} failed after {time.perf_counter() - t0:.0f} s:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")


# --------------------------------------------------------------------------------------------------
# driver
# --------------------------------------------------------------------------------------------------


def make_inputs(folder: Path, n: int, size: int, seed: int = 0) -> list[Path]:
    """n float32 images of size x size (primary HDU only, as ccdproc reads them): a bias-like
    level with Gaussian noise and 0.1 % cosmic-ray outliers."""
    import numpy as np
    from astropy.io import fits

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(n):
        p = folder / f"in_{size}_{i:03d}.fits"
        if not p.exists():
            img = rng.normal(1000.0, 10.0, (size, size)).astype(np.float32)
            k = rng.integers(0, size * size, size * size // 1000)
            img.ravel()[k] += rng.uniform(200, 5000, k.size).astype(np.float32)
            fits.PrimaryHDU(img).writeto(p)
        paths.append(p)
    return paths


def fmt_mb(b: float) -> str:
    return f"{b / 2**20:,.0f}"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--files", nargs="*", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--budget", type=float, default=1e9, help=argparse.SUPPRESS)
    ap.add_argument("--large-n", type=int, default=40, help="inputs in the large case (default 40)")
    ap.add_argument("--large-size", type=int, default=4096, help="image side of the large case (default 4096)")
    ap.add_argument("--lin-n", type=int, default=10, help="inputs for the linearity check (default 10)")
    ap.add_argument("--small-n", type=int, default=10, help="inputs in the small case (default 10)")
    ap.add_argument("--small-size", type=int, default=2048, help="image side of the small case (default 2048)")
    ap.add_argument("--budgets", default="1e9,256e6", help="memory budgets in bytes, comma separated")
    ap.add_argument("--repeat", type=int, default=3,
                    help="runs per floor and calibflow measurement, best kept (default 3; ccdproc runs once)")
    ap.add_argument("--skip-ccdproc", action="store_true", help="do not run ccdproc")
    ap.add_argument("--ccdproc-timeout", type=float, default=900, help="seconds before a ccdproc run is abandoned")
    ap.add_argument("--quick", action="store_true", help="small sizes only (1024^2) for a smoke run")
    ap.add_argument("--tmpdir", type=Path, default=None, help="where to write the inputs (default: a temp dir)")
    ap.add_argument("--keep-files", action="store_true", help="keep the input files")
    ap.add_argument("--output", type=Path, default=ROOT / "bench" / "results" / "stack.md")
    args = ap.parse_args(argv)
    if args.worker:
        worker(args)
        return 0
    if args.quick:
        args.large_size, args.small_size = 1024, 1024
    budgets = [float(b) for b in args.budgets.split(",")]
    tmp = args.tmpdir or Path(tempfile.mkdtemp(prefix="calibflow-bench-"))
    rows = []
    try:
        t0 = time.perf_counter()
        large = make_inputs(tmp, args.large_n, args.large_size)
        small = make_inputs(tmp, args.small_n, args.small_size, seed=1) if args.small_size != args.large_size \
            else large[: args.small_n]
        print(f"inputs ready in {time.perf_counter() - t0:.0f} s in {tmp}", flush=True)

        def best(tool, files, budget):
            runs = [run_worker(tool, files, budget, args.ccdproc_timeout) for _ in range(args.repeat if tool != "ccdproc" else 1)]
            r = min(runs, key=lambda r: r["wall_s"])
            print(f"  {tool:9s} N={len(files):3d} {args.large_size if files is large or files[0] in large else args.small_size}^2 "
                  f"budget {fmt_mb(budget)} MB: {r['wall_s']:.2f} s (cpu {r['cpu_s']:.2f} s, load {r['load']:.1f}), "
                  f"peak {fmt_mb(r['peak_rss'])} MB", flush=True)
            return r

        cases = [("large", large, budgets), ("linearity", large[: args.lin_n], budgets[:1]),
                 ("small", small, budgets[:1])]
        results = {}
        for name, files, bud in cases:
            size = args.large_size if name != "small" else args.small_size
            for b in bud:
                floor = best("floor", files, b)
                ours = best("calibflow", files, b)
                theirs = None
                if not args.skip_ccdproc and not (name == "large" and b != bud[0]) and name != "linearity":
                    theirs = best("ccdproc", files, b)
                results[(name, b)] = (floor, ours, theirs)
                rows.append((name, len(files), size, b, floor, ours, theirs))
        lin = results[("large", budgets[0])][1]["wall_s"] / results[("linearity", budgets[0])][1]["wall_s"]
        write_report(args, rows, lin)
    finally:
        if not args.keep_files and args.tmpdir is None:
            shutil.rmtree(tmp, ignore_errors=True)
    return 0


def write_report(args, rows, lin):
    import platform

    import numpy as np

    lines = ["# Stacking benchmark: calibflow vs ccdproc.combine", "",
             f"Machine: {platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}, "
             f"numpy {np.__version__}. Date: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}.",
             f"Each number is the best of {args.repeat} fresh subprocess(es) (ccdproc: one). "
             "calibflow = `stack_files`, MEANCLIP (3 sigma, 3 passes); "
             "ccdproc = `combine(method='average', sigma_clip=True, mem_limit=budget)`; floor = one pass "
             "reading every input once in row bands and averaging. Inputs: float32 FITS images "
             "(primary HDU), Gaussian noise with 0.1 % outliers, page-cached. `load` = 1-minute load average "
             "when the run started (the machine is shared; 2 cores, so load > 0 means fewer free cores); "
             "`cpu s` = CPU time of the process (all threads) over the timed part, less sensitive to the load. "
             "Working memory = peak RSS "
             "- RSS after imports - output arrays (calibflow output: image, mask, variance, n_used = 14 B/px).",
             "",
             "| case | N | size | budget MB | tool | wall s | cpu s | x floor | x ccdproc | peak RSS MB | baseline MB | output MB | working MB | within budget+10% | load |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, n, size, budget, floor, ours, theirs in rows:
        for tool, r in (("floor", floor), ("calibflow", ours), ("ccdproc", theirs)):
            if r is None:
                continue
            working = r["peak_rss"] - r["baseline_rss"] - r["output_bytes"]
            xf = r["wall_s"] / floor["wall_s"]
            xc = f"{r['wall_s'] / theirs['wall_s']:.3f}" if theirs else "–"
            ok = "yes" if working <= 1.1 * budget else "no"
            lines.append(f"| {name} | {n} | {size}² | {fmt_mb(budget)} | {tool} | {r['wall_s']:.2f} | {r['cpu_s']:.2f} | {xf:.2f} | {xc} | "
                         f"{fmt_mb(r['peak_rss'])} | {fmt_mb(r['baseline_rss'])} | {fmt_mb(r['output_bytes'])} | "
                         f"{fmt_mb(working)} | {ok} | {r['load']:.1f} |")
    lines += ["", f"Linearity (calibflow, {args.large_size}²): time at N={args.large_n} / time at N={args.lin_n} = "
              f"**{lin:.2f}** (target <= 4.4; 4.0 is linear).", ""]
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    raise SystemExit(main())
