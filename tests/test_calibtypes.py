"""The calib-type table (calib_core/builds/calibtypes.py): one place for each type's facts."""

import inspect

import pytest
from pydantic import BaseModel

from calib_core.builds.calibtypes import CALIB_TYPES, ISR_STEP, calib_type, dependency_order, product_cards
from calib_core.isr.process import IsrConfig


def test_every_type_comes_after_what_its_inputs_isr_applies():
    order = dependency_order()
    assert sorted(order) == sorted(CALIB_TYPES)
    for name, spec in CALIB_TYPES.items():
        assert all(order.index(dep) < order.index(name) for dep in spec.isr_calibs), name
    # the nightly order is this order, and a subset keeps it
    from flows.nightly import ORDER
    assert list(ORDER) == order
    assert dependency_order(["sky", "bias", "flat"]) == ["bias", "flat", "sky"]


def test_specs_are_complete_and_consistent():
    isr_fields = set(IsrConfig.model_fields)
    for name, spec in CALIB_TYPES.items():
        assert spec.name == name
        assert issubclass(spec.config_model, BaseModel)
        spec.config_model()                                   # every type has defaults
        assert set(spec.isr_calibs) <= set(CALIB_TYPES)
        assert (spec.combine is None) == (spec.barrier == "sky_passes"), name
        assert list(inspect.signature(spec.process).parameters)[:4] == ["raw", "calibs", "exposure", "cfg"]
        if spec.isr_step:
            assert spec.isr_step in isr_fields, spec.isr_step
        # the ISR a type's inputs get switches on exactly the calibs it depends on
        isr = spec.config_model().isr
        on = {t for t, step in ISR_STEP.items() if getattr(isr, step)}
        assert on == set(spec.isr_calibs), (name, on)
    assert product_cards("bias", "x", ["a"])["EXPTIME"] == 0.0
    # the registry's lookup knows which types are one product for all filters
    from calib_core.repository import FILTERLESS_TYPES
    assert set(FILTERLESS_TYPES) == {n for n, t in CALIB_TYPES.items() if not t.filtered}


def test_unknown_type_is_refused_with_the_known_ones():
    with pytest.raises(ValueError, match="unknown calib type 'skyy'; choose one of bias, dark, defects, ptc, flat"):
        calib_type("skyy")
    from flows.nightly import NightlyPolicy
    with pytest.raises(ValueError, match="skyy"):
        NightlyPolicy(types=["skyy"])


def _paths(d, key, prefix=()):
    for k, v in d.items():
        if k == key:
            yield (*prefix, k)
        elif isinstance(v, dict):
            yield from _paths(v, key, (*prefix, k))


@pytest.mark.parametrize("name", list(CALIB_TYPES))
def test_a_mistyped_choice_is_refused_at_validation(name):
    """Every statistic, overscan fit and interpolation choice of every type's config is a closed
    set: a typo fails when the config is read, naming the allowed values, not later inside a task."""
    from pydantic import ValidationError

    model = CALIB_TYPES[name].config_model
    dumped = model().model_dump(mode="json")
    checked = 0
    for key in ("statistic", "overscan_fit_type", "algorithm", "undersample_style", "ptc_fit_type"):
        for path in _paths(dumped, key):
            bad = dumped
            for p in path[:-1]:
                bad = bad[p]
            original, bad[path[-1]] = bad[path[-1]], "MEDAIN"
            with pytest.raises(ValidationError, match="Input should be"):
                model.model_validate(dumped)
            bad[path[-1]] = original
            checked += 1
    assert checked >= 2, name
