"""One form for every option: the fields of ESDSettings, WorkerOptions and ExperimentConfig
are the flags (orchestrator and worker), the worker's argv and the run's record; a new option
is one field."""
from __future__ import annotations

from dataclasses import dataclass, fields, replace
from pathlib import Path

import pytest

import esd_worker
import run_esd_experiment as run
from esd.cli_flags import FlagParser
from esd.model_list import make_entry
from esd.options import add_options, option, option_fields, options_argv, options_from_args, options_record
from esd.settings import ESDSettings, WorkerOptions


def test_every_option_field_is_a_flag_of_the_orchestrator_and_lands_in_the_record():
    help_text = run.build_parser().format_help()
    record = run.config_as_dict(run.parse_config([]))
    for cls in (run.ExperimentConfig, WorkerOptions, ESDSettings):
        for item in option_fields(cls):
            assert f"--{item.name}" in help_text
            assert item.name in record
    assert set(record) == {f.name for f in option_fields(run.ExperimentConfig)} | {f.name for f in fields(ESDSettings)}


def test_the_orchestrators_worker_options_reach_the_worker_whole(tmp_path):
    config = run.parse_config(["--gpus", "none", "--overwrite", "--save_eigs", "--stream",
                               "--disk_budget", "2.5", "--trust_remote_code", "--bins", "7"])
    (task,) = run.plan_tasks(run.Plan((entry := make_entry("org/a"),), (), (), (entry,), ()), config)
    worker = esd_worker.parse_config(list(task.argv))
    assert WorkerOptions(**{f.name: getattr(worker, f.name) for f in fields(WorkerOptions)}) == \
        WorkerOptions(overwrite=True, save_eigs=True, trust_remote_code=True, disk_budget=2.5, stream=True)
    assert worker.esd == config.esd and worker.esd.bins == 7 and worker.device == "auto"


def test_defaults_are_the_fields_defaults_on_every_side():
    config = run.parse_config([])
    assert config == run.ExperimentConfig()
    worker = esd_worker.parse_config(["--model_id", "org/a", "--output_dir", "out"])
    assert WorkerOptions(**{f.name: getattr(worker, f.name) for f in fields(WorkerOptions)}) == WorkerOptions()


def test_a_new_option_is_one_field():
    @dataclass(frozen=True)
    class Things:
        count: int = option(3, "how many (%(default)s)")
        ratio: float = option(0.1, "a fraction")
        name: str | None = option(None, "a name", type=str)
        verbose: bool = option(False, "say more")
        where: Path = option(Path("x"), "a path", type=Path)

    parser = FlagParser()
    add_options(parser, Things)
    assert options_from_args(Things, parser.parse_args([])) == Things()
    changed = Things(count=5, ratio=1 / 3, name="-n", verbose=True, where=Path("y z"))
    assert options_from_args(Things, parser.parse_args(options_argv(changed))) == changed
    assert options_from_args(Things, parser.parse_args(options_argv(replace(changed, name=None)))) == \
        replace(changed, name=None)
    assert options_record(changed) == {"count": 5, "ratio": 1 / 3, "name": "-n", "verbose": True, "where": "y z"}
    assert "--no_verbose" in parser.format_help() and "how many (3)" in parser.format_help()
