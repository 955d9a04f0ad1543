"""What a person looks at in the morning: metric trends, focal-plane maps of the metrics and one
HTML page per night (docs/architecture.md#the-night-report). No Prefect here.

* :func:`trend` gathers one metric of every verified product of a type against calib date (the
  registry's ``calib_metric`` table) with the verification limits that apply to it;
  :func:`write_trend` draws it (PNG) and writes it for machines (JSON).
* :func:`focal_plane_map` colours each amplifier of the camera by a metric.
* :func:`write_night_report` writes ``reports/<camera>/<night>/index.html`` and the camera's
  index of nights.
"""

from __future__ import annotations

import datetime as dt
import html
import json
import math
import os
from pathlib import Path
from typing import Mapping

from calib_core.camera import Camera, parse_section
from calib_core.quality.verify import VerifyConfig, summarise_checks

__all__ = ["trend", "write_trend", "focal_plane_map", "write_night_report", "rewrite_reports_of", "report_dir",
           "DEFAULT_METRICS", "TREND_METRICS"]

#: the metric a night report trends and maps for each type
DEFAULT_METRICS = {"bias": "read_noise", "dark": "dark_current", "flat": "flat_level", "fringe": "level",
                   "sky": "structure_ratio"}
#: what each metric is, with its unit
TREND_METRICS = {
    "read_noise": "noise of a bias/dark-corrected frame of the kind, e-",
    "bias_level": "raw overscan level, ADU",
    "residual_level": "bias product's level after overscan, e-",
    "dark_current": "dark product's level, e-/s",
    "flat_level": "flat product's level (relative response)",
    "noise": "noise of the flat-fielded test flat, e-",
    "overscan_noise": "overscan noise, e-",
    "cr_noise": "noise after cosmic-ray masking, e-",
    "mean": "mean of the test frame with the product applied, e-",
    "level": "product's median level",
    "bad_fraction": "share of flagged pixels (bins)",
    "structure_ratio": "held-out structure above noise without / with the sky frame",
    "structure_before": "held-out structure above noise without the sky frame, fraction of the sky",
    "structure_after": "held-out structure above noise with the sky frame, fraction of the sky",
    "structure_noise": "RMS measured bin noise of the held-out residuals, fraction of the sky",
    "focal_plane_structure_ratio": "held-out structure ratio over the whole focal plane",
    "sky_scale": "median fitted scale of the sky frame on the held-out exposures",
}


def _limits(calib_type: str, metric: str, rows: list[dict], cfg: VerifyConfig) -> list[dict]:
    """The verification limits on ``metric`` (per amplifier where they are per amplifier)."""
    out = []
    nominal = {}
    for r in rows:
        if r["metric"] == "read_noise_nominal" and r["value"] is not None:
            nominal[(r["detector"], r["amp"])] = r["value"]
    if metric == "read_noise" and calib_type in ("bias", "dark"):
        for (d, a), rn in sorted(nominal.items()):
            out.append({"detector": d, "amp": a, "kind": "max", "value": rn * (1 + cfg.noise_tolerance),
                        "check": "NOISE"})
    elif metric == "overscan_noise":
        for (d, a), rn in sorted(nominal.items()):
            out.append({"detector": d, "amp": a, "kind": "max", "value": rn * (1 + cfg.overscan_noise_tolerance),
                        "check": "OVERSCAN_NOISE"})
            out.append({"detector": d, "amp": a, "kind": "min", "value": rn * (1 - cfg.overscan_noise_tolerance),
                        "check": "OVERSCAN_NOISE"})
    elif metric == "structure_ratio" and calib_type == "sky":
        out.append({"detector": None, "amp": None, "kind": "min", "value": cfg.sky_min_improvement,
                    "check": "STRUCTURE"})
    elif metric == "sky_scale" and calib_type == "sky":
        for kind, value in (("min", 1 - cfg.sky_scale_tolerance), ("max", 1 + cfg.sky_scale_tolerance)):
            out.append({"detector": None, "amp": None, "kind": kind, "value": value, "check": "SCALE"})
    elif metric == "bad_fraction":
        out.append({"detector": None, "amp": None, "kind": "max", "value": cfg.max_bad_fraction,
                    "check": "BAD_FRACTION"})
    return out


def trend(registry, camera: str, calib_type: str, metric: str, detector: int | None = None,
          filter: str | None = None, config: VerifyConfig | None = None, until: str | None = None) -> dict:
    """One metric of every verified product against calib date.

    Returns ``{camera, type, metric, detector, filter, points: [{calib_date, detector, amp, value,
    status, calib_id}], limits: [{detector, amp, kind: max|min, value, check}]}``; ``until``
    (YYYY-MM-DD) leaves out later products.
    """
    from calib_core.repository import calib_metrics

    cfg = config or VerifyConfig()
    rows = calib_metrics(registry, camera=camera, calib_type=calib_type, detector=detector, filter=filter)
    if until:
        rows = [r for r in rows if r["calib_date"] <= until]
    points = [{k: r[k] for k in ("calib_date", "detector", "amp", "value", "status", "calib_id", "filter")}
              for r in rows if r["metric"] == metric]
    return {"camera": camera, "type": calib_type, "metric": metric, "detector": detector, "filter": filter,
            "description": TREND_METRICS.get(metric, ""), "points": points,
            "limits": _limits(calib_type, metric, rows, cfg) if points else []}


def write_trend(data: dict, png: Path | None = None, json_path: Path | None = None) -> None:
    """The trend as a PNG (one line per detector and amplifier, limits dashed in the line's
    colour, held-back products as open circles) and/or JSON."""
    if json_path is not None:
        Path(json_path).parent.mkdir(parents=True, exist_ok=True)
        Path(json_path).write_text(json.dumps(data, indent=1, allow_nan=False, default=str))
    if png is None:
        return
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.dates as mdates
    import matplotlib.pyplot as plt

    series: dict[tuple, list] = {}
    for p in data["points"]:
        if p["value"] is not None:
            series.setdefault((p["detector"], p["amp"]), []).append(p)
    fig, ax = plt.subplots(figsize=(8, 4.5), dpi=100)
    cmap = plt.get_cmap("tab20")
    colours = {}
    for i, (key, pts) in enumerate(sorted(series.items(), key=lambda kv: (kv[0][0], str(kv[0][1])))):
        colours[key] = cmap(i % 20)
        x = [dt.date.fromisoformat(p["calib_date"]) for p in pts]
        y = [p["value"] for p in pts]
        label = f"det {key[0]} amp {key[1]}" if key[1] != "*" else f"det {key[0]}"
        ax.plot(x, y, "-", color=colours[key], lw=1, label=label)
        ok = [p["status"] == "certified" for p in pts]
        ax.plot([a for a, o in zip(x, ok) if o], [b for b, o in zip(y, ok) if o], "o", color=colours[key], ms=5)
        ax.plot([a for a, o in zip(x, ok) if not o], [b for b, o in zip(y, ok) if not o], "o", mfc="none",
                color=colours[key], ms=8)
    for lim in data["limits"]:
        key = (lim["detector"], lim["amp"])
        if lim["detector"] is not None and key not in series:
            continue
        ax.axhline(lim["value"], ls="--", lw=0.8, color=colours.get(key, "red"))
    ax.set_title(f"{data['camera']} {data['type']}: {data['metric']}"
                 + (f", detector {data['detector']}" if data["detector"] is not None else ""), fontsize=10)
    ax.set_ylabel(data.get("description") or data["metric"], fontsize=8)
    ax.set_xlabel("calib date (dashed: verification limits; open circles: not certified)", fontsize=8)
    ax.xaxis.set_major_formatter(mdates.DateFormatter("%Y-%m-%d"))
    fig.autofmt_xdate()
    if not series:
        ax.text(0.5, 0.5, "no verified products yet", ha="center", va="center", transform=ax.transAxes)
    elif len(series) <= 20:
        ax.legend(fontsize=6, ncol=2, loc="best")
    fig.tight_layout()
    Path(png).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png)
    plt.close(fig)


def _amp_boxes(camera: Camera):
    """(detector id, amp name, (xmin, xmax, ymin, ymax) mm) of every amplifier; the whole detector
    where its amplifiers' detector sections are not in the camera file."""
    for det in camera.detectors:
        x0, x1, y0, y1 = camera.detector_corners_mm(det)
        secs = [a.detector_section for a in det.amplifiers]
        if not all(secs) or not det.nx or not det.ny or det.orientation:
            yield det.id, "*", (x0, x1, y0, y1)
            continue
        p = camera.pixel_size(det)
        for amp in det.amplifiers:
            sec = parse_section(amp.detector_section)
            sx, sy = sec.slices[1], sec.slices[0]
            yield det.id, amp.name, (x0 + sx.start * p, x0 + sx.stop * p, y0 + sy.start * p, y0 + sy.stop * p)


def focal_plane_map(camera: Camera, values: Mapping[tuple[int, str], float], title: str, png: Path,
                    failed: set | None = None) -> None:
    """Each amplifier (or detector, amp ``"*"``) coloured by its value; grey where none; a red
    outline on the detectors in ``failed`` (held back)."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt
    from matplotlib.colors import Normalize
    from matplotlib.patches import Rectangle

    boxes = list(_amp_boxes(camera))
    finite = [v for v in values.values() if v is not None and math.isfinite(v)]
    norm = Normalize(min(finite), max(finite) if max(finite) > min(finite) else min(finite) + 1e-9) if finite \
        else Normalize(0, 1)
    cmap = plt.get_cmap("viridis")
    fig, ax = plt.subplots(figsize=(5.5, 4.5), dpi=100)
    for d, a, (x0, x1, y0, y1) in boxes:
        v = values.get((d, a), values.get((d, "*")))     # a detector-wide value colours each of its amps
        if v is None and a == "*":      # a detector drawn whole: the mean of its amplifiers' values
            amps = [x for (dd, aa), x in values.items() if dd == d and x is not None and math.isfinite(x)]
            v = float(sum(amps) / len(amps)) if amps else None
        colour = cmap(norm(v)) if v is not None and math.isfinite(v) else (0.75, 0.75, 0.75, 1)
        ax.add_patch(Rectangle((x0, y0), x1 - x0, y1 - y0, facecolor=colour, edgecolor="white", lw=0.5))
        if v is not None and math.isfinite(v):
            ax.text((x0 + x1) / 2, (y0 + y1) / 2, f"{v:.3g}", ha="center", va="center", fontsize=6, color="white")
    for det in camera.detectors:
        x0, x1, y0, y1 = camera.detector_corners_mm(det)
        bad = failed and det.id in failed
        ax.add_patch(Rectangle((x0, y0), x1 - x0, y1 - y0, fill=False, edgecolor="red" if bad else "black",
                               lw=2.5 if bad else 0.8))
        ax.text(x0, y1, det.name, fontsize=6, va="bottom")
    xs = [b[2][0] for b in boxes] + [b[2][1] for b in boxes]
    ys = [b[2][2] for b in boxes] + [b[2][3] for b in boxes]
    ax.set_xlim(min(xs) - 0.5, max(xs) + 0.5)
    ax.set_ylim(min(ys) - 0.5, max(ys) + 1.0)
    ax.set_aspect("equal")
    ax.set_xlabel("focal plane x (mm)", fontsize=8)
    ax.set_ylabel("focal plane y (mm)", fontsize=8)
    ax.set_title(title, fontsize=9)
    fig.colorbar(plt.cm.ScalarMappable(norm=norm, cmap=cmap), ax=ax, fraction=0.04)
    fig.tight_layout()
    Path(png).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png)
    plt.close(fig)


def report_dir(repo: Path, camera: str) -> Path:
    return Path(repo) / "reports" / camera


def _rel(target, start: Path) -> str:
    return Path(os.path.relpath(Path(target), start)).as_posix()


def write_night_report(registry, repo: Path, camera: Camera, night: str, summary: dict,
                       config: VerifyConfig | None = None) -> Path:
    """The night's page, ``reports/<camera>/<night>/index.html``, and the camera's index of nights.

    ``summary`` is the nightly flow's (steps with their action, products, exclusions and mosaic).
    The page shows, per build: what was built, certified or held back and why (the failed checks),
    every exclusion with its reason, the camera mosaic, a focal-plane map of the type's metric and
    its trend up to this night. Pictures are files beside the page (or under ``calib/``), linked
    relatively, so the folder can be served or opened from disk.
    """
    from calib_core.repository import calib_inputs, list_calibs

    cfg = config or VerifyConfig()
    out = report_dir(repo, camera.name) / night
    out.mkdir(parents=True, exist_ok=True)
    esc = html.escape
    parts = [f"<h1>Calibrations of {esc(camera.name)}, night {esc(night)}</h1>",
             f"<p class='meta'>written {dt.datetime.now(dt.timezone.utc).isoformat(timespec='seconds')} · "
             f"<a href='../index.html'>all nights</a></p>"]
    state = summary.get("state") or ""
    if state:
        parts.append(f"<p class='state {esc(state.split()[0].lower())}'>{esc(state)}</p>")
    rows = []
    for st in summary.get("steps", []):
        products = st.get("products") or []
        rows.append((st, products))
    parts.append("<h2>Builds</h2><table><tr><th>type</th><th>filter</th><th>inputs</th><th>action</th>"
                 "<th>certified</th><th>held back</th><th>note</th></tr>")
    details = []
    for st, products in rows:
        recs = [r for r in (list_calibs(registry, calib_type=st["type"], camera=camera.name) if products else [])
                if r.calib_id in set(products)]
        cert = [r for r in recs if r.status == "certified"]
        held = [r for r in recs if r.status != "certified"]
        note = st.get("reason") or ""
        parts.append(f"<tr><td>{esc(st['type'])}</td><td>{esc(st.get('filter') or '-')}</td>"
                     f"<td>{st.get('n_inputs', '')}</td><td>{esc(st['action'])}</td><td>{len(cert)}</td>"
                     f"<td class='{'bad' if held else ''}'>{len(held)}</td><td>{esc(note)}</td></tr>")
        if recs:
            details.append((st, recs, held))
    parts.append("</table>")
    excl = []
    for st, recs, _ in details:
        seen = set()
        for r in recs:
            for i in calib_inputs(registry, r.calib_id):
                if not i["used"] and i["exposure_id"] not in seen:
                    seen.add(i["exposure_id"])
                    excl.append((st, i["exposure_id"], i["reason"]))
    parts.append("<h2>Exclusions</h2>")
    if excl:
        parts.append("<table><tr><th>build</th><th>exposure</th><th>reason</th></tr>")
        for st, e, why in excl:
            parts.append(f"<tr><td>{esc(st['type'])} {esc(st.get('filter') or '')}</td><td>{esc(e)}</td>"
                         f"<td class='reason'>{esc(why)}</td></tr>")
        parts.append("</table>")
    else:
        parts.append("<p>none</p>")
    for st, recs, held in details:
        label = f"{st['type']}" + (f" {st['filter']}" if st.get("filter") else "")
        slug = label.replace(" ", "-")
        parts.append(f"<h2 id='{esc(slug)}'>{esc(label)}</h2>")
        if held:
            parts.append("<p><b>Held back</b> (kept as candidates; <code>calibflow certify --force ID</code> "
                         "certifies one anyway):</p><ul>")
            for r in held:
                why = summarise_checks(r.verification)
                if r.status == "decertified":
                    why = f"decertified: {r.status_note or 'no reason given'}; verification {why}"
                parts.append(f"<li class='held'><code>{esc(r.calib_id)}</code> ({esc(r.status)}): "
                             f"{esc(why)}</li>")
            parts.append("</ul>")
        forced = [r for r in recs if r.status == "certified" and r.verification
                  and not r.verification.get("passed", True)]
        if forced:
            parts.append("<p><b>Certified by force</b> (failed verification, certified by a person):</p><ul>")
            for r in forced:
                parts.append(f"<li class='forced'><code>{esc(r.calib_id)}</code>: "
                             f"{esc(r.status_note or 'certified by force')}; "
                             f"{esc(summarise_checks(r.verification))}</li>")
            parts.append("</ul>")
        if st.get("mosaic") and Path(st["mosaic"]).exists():
            parts.append(f"<figure><img class='mosaic' src='{esc(_rel(st['mosaic'], out))}' alt='mosaic of "
                         f"{esc(label)}'><figcaption>camera mosaic</figcaption></figure>")
        metric = DEFAULT_METRICS.get(st["type"])
        values = {}
        for r in recs:
            for amp, m in ((r.verification or {}).get("metrics") or {}).items():
                if metric in m:
                    values[(r.detector, amp)] = m[metric]
        if metric and values:
            fp = out / f"map-{slug}-{metric}.png"
            focal_plane_map(camera, values, f"{label} {night}: {metric}", fp,
                            failed={r.detector for r in held})
            parts.append(f"<figure><img class='map' src='{esc(fp.name)}' alt='focal-plane map'>"
                         f"<figcaption>focal-plane map: {esc(metric)} ({esc(TREND_METRICS.get(metric, ''))})"
                         "</figcaption></figure>")
            data = trend(registry, camera.name, st["type"], metric, filter=st.get("filter"), config=cfg, until=night)
            tp = out / f"trend-{slug}-{metric}.png"
            write_trend(data, tp, tp.with_suffix(".json"))
            parts.append(f"<figure><img class='trend' src='{esc(tp.name)}' alt='trend'>"
                         f"<figcaption>trend of {esc(metric)} up to this night "
                         f"(<a href='{esc(tp.with_suffix('.json').name)}'>JSON</a>)</figcaption></figure>")
    page = _page(f"{camera.name} {night}", "\n".join(parts))
    # what the page was made from, so a person's later certify --force or decertify can rewrite it
    _atomic_text(out / "summary.json", json.dumps({"summary": summary, "verify": cfg.model_dump(mode="json")},
                                                  default=str))
    _atomic_text(out / "index.html", page)
    _write_index(report_dir(repo, camera.name), camera.name)
    return out / "index.html"


def rewrite_reports_of(registry, repo: Path, camera: Camera, calib_id: str) -> list[Path]:
    """Rewrite the night reports that list ``calib_id`` (after a person certified it by force or
    withdrew it), from the summaries their nights saved beside them; returns the pages rewritten."""
    pages = []
    for saved in sorted(report_dir(repo, camera.name).glob("*/summary.json")):
        data = json.loads(saved.read_text())
        if any(calib_id in (st.get("products") or []) for st in data["summary"].get("steps", [])):
            pages.append(write_night_report(registry, repo, camera, saved.parent.name, data["summary"],
                                            VerifyConfig.model_validate(data["verify"])))
    return pages


def _write_index(folder: Path, camera: str) -> None:
    nights = sorted((p.parent.name for p in folder.glob("*/index.html")), reverse=True)
    items = "\n".join(f"<li><a href='{html.escape(n)}/index.html'>{html.escape(n)}</a></li>" for n in nights)
    _atomic_text(folder / "index.html", _page(f"{camera}: nights", f"<h1>{html.escape(camera)}: nights</h1>"
                                                                     f"<ul>{items}</ul>"))


def _atomic_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def _page(title: str, body: str) -> str:
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<style>
body {{ font-family: sans-serif; margin: 1.5em; max-width: 1100px; }}
table {{ border-collapse: collapse; margin: 0.5em 0; }}
td, th {{ border: 1px solid #ccc; padding: 3px 8px; font-size: 90%; text-align: left; }}
td.bad, .held {{ color: #b00; font-weight: bold; }}
.forced {{ color: #a60; font-weight: bold; }}
.state.failed, .state.empty {{ color: #b00; font-weight: bold; }}
figure {{ display: inline-block; margin: 0.5em; vertical-align: top; }}
img.mosaic {{ max-width: 520px; }} img.map {{ max-width: 420px; }} img.trend {{ max-width: 560px; }}
figcaption {{ font-size: 80%; color: #555; }}
</style></head><body>
{body}
</body></html>
"""
