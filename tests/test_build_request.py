"""One BuildRequest: the CLI's build options, the build-calib flow, run_build and the deployments'
entry flows all carry exactly its fields (a parameter exists everywhere or nowhere)."""

import inspect

import click
import pytest
import typer

from calib_core.buildplan import BuildRequest

FIELDS = set(BuildRequest.model_fields)


def test_the_flow_takes_exactly_the_request():
    from flows.build import build_calib, run_build

    assert set(inspect.signature(build_calib.fn).parameters) == FIELDS
    assert list(inspect.signature(run_build).parameters)[0] == "request"


def test_every_deployment_entry_flow_takes_the_request_less_its_type():
    from deployments.build import BUILD_FLOWS

    for calib_type, flow in BUILD_FLOWS.items():
        assert set(inspect.signature(flow.fn).parameters) == FIELDS - {"calib_type"}, calib_type


def test_the_cli_build_command_offers_every_field():
    from calibflow.cli import app

    command = typer.main.get_command(app).commands["build"]
    names = {p.name for p in command.params}
    # the CLI spells three fields its own way: repeatable --exposure/--detector, and the config
    # as a file plus --set overrides; -v/--verbose is the terminal's business, not the build's
    names = {{"exposure": "exposures", "detector": "detectors"}.get(n, n) for n in names}
    names = (names - {"config_file", "sets", "verbose"}) | {"config"}
    assert names == FIELDS


@pytest.mark.parametrize("bad, where", [({"calib_type": "skyy"}, "calib_type"),
                                        ({"calib_type": "bias", "night": "2026-13-45"}, "not a date"),
                                        ({"calib_type": "bias", "detectors_per_task": 0}, "detectors_per_task"),
                                        ({"calib_type": "bias", "runner": "slurm"}, "runner"),
                                        ({"calib_type": "bias", "nightt": "2026-11-20"}, "nightt")])
def test_a_bad_request_is_refused_before_anything_runs(bad, where):
    with pytest.raises(ValueError, match=where):
        BuildRequest(**bad)
