"""One naming rule for every config key, and the retired names kept working for a release
(docs/architecture.md#config-naming)."""

from __future__ import annotations

import re
import warnings

import pytest
from pydantic import BaseModel, ValidationError

from calib_core.builds.calibtypes import CALIB_TYPES
from calib_core.camera import effective_config, load_camera
from calib_core.configmodel import ClipConfig, ConfigModel, _model_in

SNAKE = re.compile(r"^[a-z][a-z0-9]*(_[a-z0-9]+)*$")


def _models(model: type[BaseModel], seen: set) -> None:
    """Every model reachable from ``model`` through its fields."""
    if model in seen:
        return
    seen.add(model)
    for field in model.model_fields.values():
        sub = _model_in(field.annotation)
        if sub is not None:
            _models(sub, seen)
    for sub in (getattr(field.annotation, "__args__", ()) for field in model.model_fields.values()):
        for arg in sub:
            inner = _model_in(arg)
            if inner is not None:
                _models(inner, seen)


def _all_models() -> set:
    seen: set = set()
    for spec in CALIB_TYPES.values():
        _models(spec.config_model, seen)
    return seen


def test_every_key_of_every_calib_config_is_snake_case_and_clips_are_spelt_one_way():
    models = _all_models()
    assert len(models) > 15, sorted(m.__name__ for m in models)     # the walk reached the nested models
    bad = [f"{m.__name__}.{k}" for m in models for k in m.model_fields if not SNAKE.match(k)]
    assert bad == []
    # the clip threshold and its passes have one spelling: none of the six old ones is a field anywhere
    old = {"clip", "nsigma_clip", "n_clip", "crNumSigma", "overscanNumSigmaClip", "n_sigma", "clipSigma"}
    assert [f"{m.__name__}.{k}" for m in models for k in m.model_fields if k in old] == []
    clipping = [m for m in models if "nsigma" in m.model_fields]
    assert all(issubclass(m, ClipConfig) for m in clipping), [m.__name__ for m in clipping
                                                              if not issubclass(m, ClipConfig)]


def test_reference_names_are_in_the_descriptions_and_map_to_real_fields():
    models = [m for m in _all_models() if issubclass(m, ConfigModel)]
    assert any(m.reference_names for m in models)
    for m in models:
        for field, ref in m.reference_names.items():
            assert field in m.model_fields, (m.__name__, field)
            assert m.model_fields[field].description.endswith(f"(reference: {ref})"), (m.__name__, field)
            # shown in the JSON schema the Prefect UI builds its forms from
            assert f"(reference: {ref})" in str(m.model_json_schema()["properties"][field].get("description"))
        for old, new in m.old_keys().items():
            assert new in m.model_fields and old not in m.model_fields, (m.__name__, old, new)


@pytest.mark.parametrize("calib_type,old,new,value", [
    ("bias", {"isr": {"overscanFitType": "MEDIAN_PER_ROW"}}, {"isr": {"overscan_fit_type": "MEDIAN_PER_ROW"}}, None),
    ("dark", {"crNumSigma": 5.0, "isr": {"doDefect": True}}, {"cr_nsigma": 5.0, "isr": {"do_defect": True}}, None),
    ("sky", {"sky": {"stats": {"clip": 2.5, "n_iter": 4}}, "large_scale": {"n_clip": 2}},
     {"sky": {"stats": {"nsigma": 2.5, "niter": 4}}, "large_scale": {"niter": 2}}, None),
])
def test_a_retired_key_gives_the_same_config_as_its_new_name_with_a_warning(calib_type, old, new, value):
    model = CALIB_TYPES[calib_type].config_model
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        from_old = effective_config(model, None, old)
    with warnings.catch_warnings():
        warnings.simplefilter("error")          # the new names warn about nothing
        from_new = effective_config(model, None, new)
    assert from_old == from_new
    assert from_old != model()                  # the setting really changed something
    msgs = [str(w.message) for w in caught if issubclass(w.category, FutureWarning)]
    assert msgs and all("renamed" in m and "next release" in m for m in msgs), msgs


def test_the_type_defaults_survive_a_retired_key_in_a_partial_isr():
    """A bias build keeps do_bias=False when the user's config names only another ISR key by its old
    name (the merge is key by key, after renaming)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        cfg = effective_config(CALIB_TYPES["bias"].config_model, None, {"isr": {"overscanNumIter": 5}})
    assert cfg.isr.overscan_niter == 5 and cfg.isr.do_bias is False


def test_unknown_keys_are_still_refused():
    with pytest.raises(ValidationError, match="do_biass"):
        effective_config(CALIB_TYPES["bias"].config_model, None, {"isr": {"do_biass": False}})


def test_a_camera_file_with_old_isr_keys_loads_with_a_warning(tmp_path):
    import yaml

    from calib_core.camera import _builtin_dir

    definition = yaml.safe_load((_builtin_dir() / "democam_mini.yaml").read_text())
    definition["name"] = "oldkeys"
    definition["isr"] = {"overscanFitType": "MEDIAN_PER_ROW"}
    path = tmp_path / "oldkeys.yaml"
    path.write_text(yaml.safe_dump(definition))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        camera = load_camera(path)
    assert camera.isr == {"overscan_fit_type": "MEDIAN_PER_ROW"}
    assert any("overscanFitType" in str(w.message) and issubclass(w.category, FutureWarning) for w in caught)
    cfg = effective_config(CALIB_TYPES["flat"].config_model, camera, {})
    assert cfg.isr.overscan_fit_type == "MEDIAN_PER_ROW"


def test_cli_set_with_an_old_key_warns_once_and_passes_the_new_name(capsys):
    """``--set isr.overscanFitType=...`` (the CLI's own parsing and validation, as ``build`` and
    ``nightly`` call it) reaches the build under its new name, with one warning line."""
    from calibflow import cli

    config = cli._load_config("bias", None, ["isr.overscanFitType=MEDIAN_PER_ROW", "combine.nsigma=2.5"])
    assert config == {"isr": {"overscan_fit_type": "MEDIAN_PER_ROW"}, "combine": {"nsigma": 2.5}}
    err = capsys.readouterr().err
    assert err.count("renamed") == 1 and "isr.overscanFitType" in err and "isr.overscan_fit_type" in err


def test_defaults_are_stated_once():
    """A default lives in the Field, not again at the end of its description, where it drifted."""
    stale = []
    for m in _all_models():
        for k, f in m.model_fields.items():
            if f.is_required():
                continue
            dv = f.default if f.default_factory is None else f.default_factory()
            tail = re.search(r";\s*(?:default\s*)?([^;]+)$", f.description or "")
            if tail and tail.group(1).strip() in (str(dv), repr(dv)):
                stale.append(f"{m.__name__}.{k}")
    assert stale == []
