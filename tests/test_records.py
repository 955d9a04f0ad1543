"""The records that cross the layers (calib_core/records.py, docs/architecture.md#records): frozen,
closed to unknown fields, returned by the tasks, and read by attribute where dict keys used to be
(a typo'd field is then an error where it is written, not a silent ``None`` in a flow)."""

import ast
import math
import typing
from pathlib import Path

import pytest
from prefect import Task
from pydantic import BaseModel, ValidationError

from calib_core import records
from calib_core.records import BuiltProduct, CalibProduct, ProcessedInput, SkyResidual

ROOT = Path(__file__).resolve().parents[1]

#: the keys task results were read by before they were records
RETIRED_KEYS = {"error", "level", "npoint", "partial", "residual", "reused"}
#: the keys product rows (the registry's, and a build's with ``created``) were read by before they were
#: records: every field of BuiltProduct
PRODUCT_KEYS = set(BuiltProduct.model_fields)
#: the dicts of flows/ that share some of those keys and are not product rows: a build's result
#: (``created`` counts), the nightly's summary, its steps (``type``, ``filter``, ``n_inputs``) and
#: their held-back entries (``detector``, ``status``), which go to JSON for the night report
NOT_PRODUCTS = {"result", "summary", "step", "s", "h"}

RECORDS = [m for m in vars(records).values()
           if isinstance(m, type) and issubclass(m, BaseModel) and m.__module__ == records.__name__
           and not m.__name__.startswith("_")]


def _processed(**kw) -> ProcessedInput:
    return ProcessedInput(exposure_id="e1", detector=3, path="/repo/work/e1-det003.fits",
                          isr_calibs={"bias": "bias-x"}, pid=11, **kw)


def _sky(**kw) -> SkyResidual:
    return SkyResidual(exposure_id="e1", detector=3, path="/w/e1.fits", bins="/w/b.fits", residual="/w/r.fits",
                       scale=812.5, frame="/w/f.fits", **kw)


def _product(**kw) -> CalibProduct:
    fields = dict(calib_id="bias-cam-NONE-2026-11-20-det003-0123abcd", type="bias", camera="cam", filter="NONE",
                  detector=3, calib_date="2026-11-20", valid_begin="2026-11-05T12:00:00+00:00",
                  valid_end="2026-12-05T12:00:00+00:00", path="/repo/calib/cam/bias/b.fits", n_inputs=5,
                  checksum="c" * 64, status="candidate", config_hash="h" * 64, software_version="0.1.0",
                  stats={"level": 1000.5, "n_used": 5}, camera_checksum="k" * 64,
                  verification={"passed": True, "checks": [], "failed": []}, status_note="",
                  created_at="2026-11-21T12:00:00+00:00", status_changed_at=None)
    return CalibProduct(**{**fields, **kw})


def _built(**kw) -> BuiltProduct:
    return BuiltProduct(**_product().model_dump(), created=True, **kw)    # as BuiltProduct.of, spelt out


def test_every_record_is_frozen_and_closed():
    assert {m.__name__ for m in RECORDS} >= {"ProcessedInput", "SkyResidual", "CalibProduct", "BuiltProduct"}
    for model in RECORDS:
        assert model.model_config.get("frozen") is True, model.__name__
        assert model.model_config.get("extra") == "forbid", model.__name__
        for name, info in model.model_fields.items():
            assert info.description, f"{model.__name__}.{name} has no description"


@pytest.mark.parametrize("make, field", [(_processed, "level"), (_sky, "residual"), (_product, "status"),
                                         (_built, "created")])
def test_a_record_cannot_be_changed_in_place(make, field):
    rec = make()
    with pytest.raises(ValidationError, match="frozen"):
        setattr(rec, field, "x")
    # a changed record is a new one; the original stays as it was
    new = rec.model_copy(update={"detector": 4})
    assert (new.detector, rec.detector) == (4, 3)


@pytest.mark.parametrize("make, typo", [(_processed, "levle"), (_processed, "reuse"), (_sky, "residuals"),
                                        (_product, "calib_type"), (_product, "created"), (_built, "new")])
def test_a_typod_field_is_refused(make, typo):
    with pytest.raises(ValidationError, match=typo):
        make(**{typo: 1.0})


def test_a_processed_input_round_trips_through_its_resume_json():
    rec = _processed(level=1234.5, npoint=4096, amps=[("A", 0, 10, 0, 20)], overscan_noise={"A": 4.5})
    back = ProcessedInput.model_validate_json(rec.model_dump_json())
    assert back == rec
    assert back.amps == [("A", 0, 10, 0, 20)]


def test_nan_survives_the_resume_json():
    # a PTC amplifier without overscan has a NaN noise; null would not read back as a float
    rec = _processed(level=float("nan"), overscan_noise={"A": float("nan"), "B": 4.5})
    back = ProcessedInput.model_validate_json(rec.model_dump_json())
    assert math.isnan(back.level) and math.isnan(back.overscan_noise["A"]) and back.overscan_noise["B"] == 4.5


def test_a_resume_json_written_before_the_records_still_reads():
    # what process_exposure_detector wrote beside a flat's intermediate before it returned a record
    # (json.dumps of the result dict): a build resumed after the upgrade reuses it
    old = ('{"exposure_id": "f-0001", "detector": 0, "path": "/r/work/cam/flat/f-0001-det000-ab.fits", '
           '"isr_calibs": {"bias": "bias-cam-2026-01-01-d0-x"}, "pid": 4242, "level": 10523.25, "npoint": 3900}')
    rec = ProcessedInput.model_validate_json(old)
    assert (rec.level, rec.npoint, rec.reused, rec.error, rec.screened) == (10523.25, 3900, False, None, None)


def test_a_product_status_outside_the_registrys_is_refused():
    with pytest.raises(ValidationError, match="candidate"):
        _product(status="certifed")


def test_a_products_json_keeps_the_registrys_keys_and_its_nan():
    # `calibflow calibs --json` and `lookup --json` print model_dump(mode="json"): users script
    # against these keys, which are the registry row's of before the records, in the same order
    keys = ["calib_id", "type", "camera", "filter", "detector", "calib_date", "valid_begin", "valid_end", "path",
            "n_inputs", "checksum", "status", "config_hash", "software_version", "stats", "camera_checksum",
            "verification", "status_note", "created_at", "status_changed_at"]
    rec = _product(stats={"level": float("nan"), "n_used": 2})
    assert list(rec.model_dump(mode="json")) == keys
    assert list(_built().model_dump(mode="json")) == keys + ["created"]
    back = CalibProduct.model_validate_json(rec.model_dump_json())
    assert math.isnan(back.stats["level"]) and back.stats["n_used"] == 2


def _unwrap(annotation):
    """``list[X]`` -> {X}; ``A | B`` -> {A, B}; else {annotation}."""
    args = typing.get_args(annotation)
    if typing.get_origin(annotation) is list:
        return _unwrap(args[0])
    if args and typing.get_origin(annotation) in (typing.Union, __import__("types").UnionType):
        return set().union(*(_unwrap(a) for a in args))
    return {annotation}


def test_the_per_input_tasks_return_records():
    from tasks import calib_tasks

    tasks = {name: obj for name, obj in vars(calib_tasks).items() if isinstance(obj, Task)}
    # the tasks that return one result per (exposure, detector)
    per_input = {"process_detectors", "sky_rebin"}
    assert per_input <= set(tasks)
    for name in per_input:
        hints = typing.get_type_hints(tasks[name].fn)
        assert typing.get_origin(hints["return"]) is list, name
        assert _unwrap(hints["return"]) <= set(RECORDS), (name, hints["return"])
    # and what they hand on: the combine task takes records, the process helper returns one
    hints = typing.get_type_hints(tasks["combine_detector"].fn)
    assert _unwrap(hints["items"]) == {ProcessedInput, SkyResidual}
    assert typing.get_type_hints(calib_tasks.process_exposure_detector)["return"] is ProcessedInput
    # the combine task returns the registered product with whether it made it
    assert typing.get_type_hints(tasks["combine_detector"].fn)["return"] is BuiltProduct


def test_the_registry_returns_product_records():
    from calib_core.repository.registry import calibs

    for name in ("find_calib", "certify", "decertify"):
        assert _unwrap(typing.get_type_hints(getattr(calibs, name))["return"]) <= {CalibProduct, type(None)}, name
    for name in ("list_calibs", "settle_candidates", "lookup"):
        assert _unwrap(typing.get_type_hints(getattr(calibs, name))["return"]) == {CalibProduct}, name
    assert typing.get_args(typing.get_type_hints(calibs.record_calib)["return"]) == (CalibProduct, bool)


def retired_key_reads(path: Path, retired=RETIRED_KEYS, skip=frozenset()) -> list[str]:
    """``x["reused"]``-style subscripts, ``x.get("reused")`` calls on a name and ``"error" in x``
    tests by a retired key in one file; subscripts and ``get`` calls of the names in ``skip`` are not
    reads."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        key = None
        receiver = (node.value if isinstance(node, ast.Subscript)
                    else getattr(getattr(node, "func", None), "value", None))
        if isinstance(receiver, ast.Name) and receiver.id in skip:
            continue
        if isinstance(node, ast.Subscript) and isinstance(node.slice, ast.Constant):
            key = node.slice.value
        elif (isinstance(node, ast.Compare) and isinstance(node.left, ast.Constant)
              and any(isinstance(op, (ast.In, ast.NotIn)) for op in node.ops)):
            key = node.left.value
        elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "get"
              and isinstance(node.func.value, ast.Name) and node.args and isinstance(node.args[0], ast.Constant)):
            # p.get("status"), not p.stats.get("level"): a record's dict field is read by key
            key = node.args[0].value
        if isinstance(key, str) and key in retired:
            found.append((node.lineno, f"{path.parent.name}/{path.name}:{node.lineno}: {ast.unparse(node)}"))
    return [text for _, text in sorted(found)]


def test_flows_and_tasks_read_records_by_attribute():
    files = sorted((ROOT / "flows").glob("*.py")) + sorted((ROOT / "tasks").glob("*.py"))
    assert len(files) >= 3
    found = [hit for f in files for hit in retired_key_reads(f)]
    assert not found, "task results read by dict key:\n" + "\n".join(found)


def test_flows_and_tasks_read_products_by_attribute():
    files = sorted((ROOT / "flows").glob("*.py")) + sorted((ROOT / "tasks").glob("*.py"))
    found = [hit for f in files for hit in retired_key_reads(f, PRODUCT_KEYS, NOT_PRODUCTS)]
    assert not found, "product rows read by dict key:\n" + "\n".join(found)


def test_the_scan_sees_a_product_read(tmp_path):
    # the forms flows/build.py used on product rows before the records
    src = tmp_path / "old.py"
    src.write_text('ids = [p["calib_id"] for p in products]\nheld = p.get("status") != "certified"\n'
                   'v = result["products"][0]["valid_begin"]\nok = p.calib_id\nn = result["created"]\n')
    assert sorted(h.split(": ", 1)[1] for h in retired_key_reads(src, PRODUCT_KEYS, NOT_PRODUCTS)) == [
        "p.get('status')", "p['calib_id']", "result['products'][0]['valid_begin']"]


def test_the_scan_sees_a_dict_read(tmp_path):
    # the scan itself catches the forms the flows used before the records, and not attribute reads
    src = tmp_path / "old.py"
    src.write_text('levels = [p["level"] for p in items]\nbad = "error" in p\nok = p.level\n')
    assert sorted(h.split(": ", 1)[1] for h in retired_key_reads(src)) == ["'error' in p", "p['level']"]


def test_a_scalar_the_record_lacks_fails_the_process_step(tmp_path):
    # a calib type whose processing returns a scalar ProcessedInput has no field for is refused at
    # its first input, naming the key (not carried along until some reader misses it)
    from types import SimpleNamespace

    import numpy as np

    from calib_core.builds.calibtypes import Processed
    from calib_core.maskedimage import MaskedImage
    from tasks.calib_tasks import _process_pixels

    image = MaskedImage(np.zeros((4, 4)), np.zeros((4, 4)), np.ones((4, 4)))
    exposure = records.Exposure(exposure_id="e1", camera="cam", obs_type="flat", filter="r", exptime=5.0,
                                darktime=5.0, date_obs="2026-11-21T03:00:00+00:00", night="2026-11-20", object="",
                                n_detectors=1, path="/raw/e1.fits", checksum="0" * 64, size_bytes=1,
                                ingested_at="2026-11-21T12:00:00+00:00")

    def ctx_returning(scalars):
        spec = SimpleNamespace(process=lambda *args: Processed(image, scalars))
        return SimpleNamespace(spec=spec, calib_type="flat", cfg=lambda: None)

    calibs = {"bias": _product(calib_id="bias-1", path="/c/bias.fits")}
    out = tmp_path / "e1-det000-k.fits"
    mi, rec, variance = _process_pixels(ctx_returning({"level": 812.0, "npoint": 16}), None, None, exposure, 0,
                                        calibs, out)
    assert variance and mi is image and (rec.level, rec.npoint, rec.isr_calibs, rec.path) == (812.0, 16, {"bias": "bias-1"},
                                                                                  str(out))
    with pytest.raises(TypeError, match=r"flat processing returned \['levle'\]"):
        _process_pixels(ctx_returning({"levle": 812.0}), None, None, exposure, 0, calibs, out)
