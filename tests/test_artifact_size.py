"""Artifacts stay within what the Prefect server publishes (docs/prefect.md#artifacts).

The server refuses an event above ``PREFECT_SERVER_EVENTS_MAXIMUM_SIZE_BYTES`` and prints
``Refusing to publish event of size ...`` on the user's terminal; the demo's nightly artifact, nine
mosaics inline, was 2.9 MB. The truth here is the limit itself and the pictures as written: every
picture is still there, decodes as a PNG of the same aspect, and one that fits is embedded unchanged.
"""

from __future__ import annotations

import base64
import io
import re

import numpy as np
import pytest
from PIL import Image
from prefect.settings import PREFECT_SERVER_EVENTS_MAXIMUM_SIZE_BYTES, temporary_settings

from flows.build import png_data_uri
from flows.nightly import nightly_markdown

URI = re.compile(r"!\[mosaic\]\(data:image/png;base64,([A-Za-z0-9+/=]+)\)")


def _noise_png(path, shape, seed):
    """A PNG that hardly compresses (noise), ~ny*nx bytes."""
    pix = np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8)
    Image.fromarray(pix).save(path, format="PNG")
    return path


def _summary(pngs):
    steps = [{"type": f"t{i}", "filter": None, "n_inputs": 5, "action": "built", "created": 9,
              "valid": ["2026-11-05", "2026-12-05"], "mosaic": str(p)} for i, p in enumerate(pngs)]
    return {"camera": "democam", "night": "2026-11-20", "state": "completed", "steps": steps,
            "report": "/repo/reports/democam/2026-11-20/index.html"}


@pytest.mark.parametrize("limit", [1_500_000, 600_000])
def test_nightly_artifact_keeps_every_mosaic_within_the_event_limit(tmp_path, limit):
    shapes = [(900, 600)] * 8 + [(60, 40)]            # eight of ~540 kB and a small one
    pngs = [_noise_png(tmp_path / f"m{i}.png", s, i) for i, s in enumerate(shapes)]
    assert sum(p.stat().st_size for p in pngs) > 4_000_000
    with temporary_settings(updates={PREFECT_SERVER_EVENTS_MAXIMUM_SIZE_BYTES: limit}):
        text = nightly_markdown(_summary(pngs))
    assert len(text.encode()) < limit
    embedded = URI.findall(text)
    assert len(embedded) == len(pngs)                 # no picture dropped
    for b64, png, (ny, nx) in zip(embedded, pngs, shapes):
        data = base64.b64decode(b64)
        with Image.open(io.BytesIO(data)) as img:
            w, h = img.size
        assert abs(h / w - ny / nx) < 2 / min(w, h)   # shrunk, both axes alike
        if png.stat().st_size < limit // 20:          # one that fits is embedded as it is
            assert data == png.read_bytes()
        else:
            assert w < nx and h < ny


def test_a_build_mosaic_over_the_limit_is_shrunk_and_one_under_is_not(tmp_path):
    big = _noise_png(tmp_path / "big.png", (1600, 1200), 1)       # ~1.9 MB
    small = _noise_png(tmp_path / "small.png", (300, 200), 2)
    with temporary_settings(updates={PREFECT_SERVER_EVENTS_MAXIMUM_SIZE_BYTES: 1_500_000}):
        uri_big, uri_small = png_data_uri(big), png_data_uri(small)
    assert len(uri_big) <= 1_400_000
    assert base64.b64decode(uri_small.split(",", 1)[1]) == small.read_bytes()
    with Image.open(io.BytesIO(base64.b64decode(uri_big.split(",", 1)[1]))) as img:
        assert img.size[0] < 1200 and abs(img.size[1] / img.size[0] - 4 / 3) < 0.01
    (tmp_path / "not.png").write_bytes(b"GIF89a")
    assert png_data_uri(tmp_path / "not.png") is None and png_data_uri(tmp_path / "missing.png") is None
