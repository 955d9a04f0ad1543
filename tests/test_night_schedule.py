"""The nightly flow's schedule (docs/architecture.md#builds-side-by-side): which builds wait for which,
builds that need nothing of each other run at the same time, a failed build's dependants still run
and are told, and a build's intermediates are removed while a build of another filter runs."""

import threading
import time

from calib_core.repository import Registry, running_builds
from calib_core.repository.buildruns import finish_build_run, start_build_run
from flows.build import may_share_inputs, products_settled
from flows.nightly import build_dependencies, run_steps


def _plan():
    """The democam night's plan (as plan_night makes it), with a skipped sky i build."""
    rows = [("bias", None), ("dark", None), ("defects", None), ("ptc", None), ("flat", "r"), ("flat", "z"),
            ("fringe", "z"), ("sky", "i"), ("sky", "r"), ("sky", "z")]
    return [{"type": t, "filter": f, "action": "skip" if f == "i" else "build", "reason": ""} for t, f in rows]


def _labels(steps, idx):
    return {f"{steps[i]['type']} {steps[i]['filter'] or ''}".strip() for i in idx}


def test_each_build_waits_for_the_calibs_its_isr_applies_of_its_own_filter():
    steps = _plan()
    deps = build_dependencies(steps)
    got = {f"{steps[i]['type']} {steps[i]['filter'] or ''}".strip(): _labels(steps, d) for i, d in deps.items()}
    # written out by hand from the ISR each type applies (docs/algorithms.md): bias none; dark bias;
    # defects bias+dark; ptc bias+defects; flat all four; fringe those and its filter's flat; sky those
    # and its filter's fringe
    four = {"bias", "dark", "defects", "ptc"}
    assert got == {"bias": set(), "dark": {"bias"}, "defects": {"bias", "dark"}, "ptc": {"bias", "defects"},
                   "flat r": four, "flat z": four, "fringe z": four | {"flat z"},
                   "sky r": four | {"flat r"}, "sky z": four | {"flat z", "fringe z"}}


def test_independent_builds_run_at_the_same_time_and_never_before_their_dependencies():
    steps = _plan()
    deps = build_dependencies(steps)
    lock, log, active, most = threading.Lock(), [], set(), [0]
    flat_z_started = threading.Event()

    def run_one(step, blocked):
        name = f"{step['type']} {step['filter'] or ''}".strip()
        with lock:
            log.append(("start", name))
            active.add(name)
            most[0] = max(most[0], len(active))
        if name == "flat z":
            flat_z_started.set()
        if name == "flat r":         # flat z must start while flat r runs: they need nothing of each other
            assert flat_z_started.wait(10), "flat z did not start beside flat r"
        time.sleep(0.05)
        with lock:
            active.discard(name)
            log.append(("end", name))

    outcome = run_steps(steps, run_one, parallel=2)
    assert all(e is None for e in outcome.values()), outcome
    assert most[0] == 2
    assert len([e for e in log if e[0] == "start"]) == 9          # the skipped step is not run
    for i, d in deps.items():
        name = f"{steps[i]['type']} {steps[i]['filter'] or ''}".strip()
        started = log.index(("start", name))
        for dep in _labels(steps, d):
            assert log.index(("end", dep)) < started, (name, dep)


def test_dependants_start_once_the_products_are_settled_not_after_the_report():
    """A build announces its products settled (flows.build.products_settled, before its report): the
    builds that apply them start then, beside its report, and never before the announcement; one
    that never announces (an older runner) is waited for to its end."""
    steps = _plan()
    deps = build_dependencies(steps)
    lock, log = threading.Lock(), []

    def run_one(step, blocked):
        name = f"{step['type']} {step['filter'] or ''}".strip()
        with lock:
            log.append(("start", name))
        time.sleep(0.02)                                    # the build's stages
        if name != "ptc":                                   # ptc never announces
            with lock:
                log.append(("settled", name))
            products_settled.get()()
        time.sleep(0.3)                                     # its report
        with lock:
            log.append(("end", name))

    outcome = run_steps(steps, run_one, parallel=2)
    assert all(e is None for e in outcome.values()), outcome
    for i, d in deps.items():
        name = f"{steps[i]['type']} {steps[i]['filter'] or ''}".strip()
        started = log.index(("start", name))
        for dep in _labels(steps, d):
            gate = ("end", dep) if dep == "ptc" else ("settled", dep)
            assert log.index(gate) < started, (name, dep)
    # the dark build started during the bias build's report, the flats only after the ptc build ended
    assert log.index(("start", "dark")) < log.index(("end", "bias"))
    assert log.index(("start", "flat r")) > log.index(("end", "ptc"))


def test_a_failed_build_is_reported_and_its_dependants_still_run_told_why():
    steps = _plan()
    seen = {}

    def run_one(step, blocked):
        name = f"{step['type']} {step['filter'] or ''}".strip()
        seen[name] = set(blocked)
        if name == "flat z":
            raise RuntimeError("no usable flats")

    outcome = run_steps(steps, run_one, parallel=2)
    failed = {f"{steps[i]['type']} {steps[i]['filter']}" for i, e in outcome.items() if e is not None}
    assert failed == {"flat z"} and isinstance(outcome[5], RuntimeError)
    assert seen["fringe z"] == {"flat"} and seen["sky z"] == {"flat"}
    assert seen["sky r"] == set()
    assert len(seen) == 9


def test_one_at_a_time_runs_in_plan_order_in_the_callers_thread():
    steps = _plan()
    order, threads = [], set()

    def run_one(step, blocked):
        order.append((step["type"], step["filter"]))
        threads.add(threading.get_ident())

    run_steps(steps, run_one, parallel=1)
    assert order == [(s["type"], s["filter"]) for s in steps if s["action"] == "build"]
    assert threads == {threading.get_ident()}


def test_intermediates_are_kept_only_for_a_running_build_of_the_same_type_and_filter(tmp_path):
    reg = Registry.open(f"sqlite:///{tmp_path / 'registry.db'}")
    reg.upgrade()
    z = start_build_run(reg, None, "flat", {"night": "2026-11-20", "filter": "z"})
    b = start_build_run(reg, None, "bias", {"night": "2026-11-20", "filter": None})
    mine = start_build_run(reg, None, "flat", {"night": "2026-11-20", "filter": "r"})
    others = running_builds(reg, exclude_run=mine)
    assert others == {("flat", "z"), ("bias", None)}
    assert not may_share_inputs(others, "flat", "r")        # flat z reads z exposures only
    assert may_share_inputs(others, "flat", "z")
    assert may_share_inputs(others, "bias", "NONE")
    assert may_share_inputs({("flat", None)}, "flat", "r")    # a run that recorded no filter: kept
    assert not may_share_inputs(others, "dark", "NONE")
    for run in (z, b):
        finish_build_run(reg, run, "completed")
    assert running_builds(reg, exclude_run=mine) == set()


def test_a_build_leaves_the_frames_of_its_type_to_the_last_build_of_the_type(tmp_path):
    """Sky r ending while sky z runs: its exposures' files go, the frames (named by detector and digest,
    not by exposure or filter) stay for sky z, whose end removes every frame of its detectors."""
    from calib_core.repository import build_files

    work = tmp_path / "work"
    work.mkdir()
    names = ["202611200010-det001-abc.fits", "202611200010-det001-abc.json", "202611200020-det001-abc.fits",
             "pass-frame-det001-3b877c764aa84113.fits", "pass-frame-det002-3b877c764aa84113.fits"]
    for n in names:
        (work / n).write_bytes(b"x")
    mine = {p.name for p in build_files(work, ["202611200010"], [1], frames=False)}
    assert mine == {"202611200010-det001-abc.fits", "202611200010-det001-abc.json"}
    last = {p.name for p in build_files(work, ["202611200020"], [1, 2])}
    assert last == {"202611200020-det001-abc.fits", "pass-frame-det001-3b877c764aa84113.fits",
                    "pass-frame-det002-3b877c764aa84113.fits"}
