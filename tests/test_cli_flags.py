"""Every command refuses abbreviated flags, accepts the seeds' spellings where they mean the
same, and refuses the others with what to type instead."""
import pytest

import analyze_results
import create_model_list
import esd_worker
import run_esd_experiment
import test_setup
from gputracker import __main__ as gputracker_cli

PARSERS = {
    "run_esd_experiment": run_esd_experiment.build_parser,
    "esd_worker": esd_worker.build_parser,
    "analyze_results": analyze_results.build_parser,
    "create_model_list": create_model_list.build_parser,
    "gputracker": gputracker_cli.build_parser,
}


def _error(capsys, parse, argv) -> str:
    with pytest.raises(SystemExit) as stopped:
        parse(argv)
    assert stopped.value.code == 2
    return capsys.readouterr().err


@pytest.mark.parametrize("name, argv, typed, meant", [
    ("run_esd_experiment", ["--over"], "--over", "--overwrite"),
    ("esd_worker", ["--model_id", "x", "--base_model", "B"], "--base_model", None),
    ("esd_worker", ["--model_id", "x", "--over"], "--over", "--overwrite"),
    ("analyze_results", ["--results", "r"], "--results", "--results_dir"),
    ("analyze_results", ["--results_dir", "r", "--exclud", "x"], "--exclud", "--exclude"),
    ("create_model_list", ["merge", "a.csv", "--dedup"], "--dedup", "--deduplicate"),
    ("gputracker", ["cmds.txt", "--cpu_s", "3"], "--cpu_s", None),
])
def test_an_abbreviated_flag_is_refused_with_a_suggestion(capsys, name, argv, typed, meant):
    err = _error(capsys, PARSERS[name]().parse_args, argv)
    assert typed in err
    if meant:
        assert f"did you mean {meant}" in err


def test_the_setup_doctor_refuses_abbreviations(capsys):
    err = _error(capsys, test_setup.parse_args, ["--out", "x"])
    assert "--out (did you mean --output_dir?)" in err


def test_base_model_is_not_read_as_base_model_relation(capsys):
    err = _error(capsys, run_esd_experiment.parse_config, ["--base-model", "gpt2"])
    assert "source_model column" in err


def test_seed_gpu_flags_are_aliases_of_the_same_meaning():
    config = run_esd_experiment.parse_config(
        ["--gpu-list", "0", "1", "--gpu-mem-threshold", "1000", "--max-checks", "3",
         "--gpus-per-job", "2"])
    assert (config.gpus, config.gpu_memory_threshold, config.max_check,
            config.num_gpus_per_job) == ((0, 1), 1000, 3, 2)
    assert run_esd_experiment.parse_config(["--device-ids", "3"]).gpus == (3,)
    cli = gputracker_cli.build_parser().parse_args(
        ["c.txt", "--device-ids", "2", "--gpu-mem-threshold", "700", "--max-checks", "4",
         "--gpus-per-job", "2", "--log-dir", "L"])
    assert (cli.gpus, cli.gpu_memory_threshold, cli.max_check, cli.num_gpus_per_job,
            str(cli.log_dir)) == (["2"], 700, 4, 2, "L")


def test_seed_single_model_and_base_model_are_the_workers_id_and_base():
    args = esd_worker.build_parser().parse_args(["--single-model", "a/b", "--base-model", "c/d"])
    assert (args.model_id, args.source_model) == ("a/b", "c/d")


@pytest.mark.parametrize("flag, hint", [
    ("--max-gpus", "--gpus 0 1 2 3"), ("--num-workers", "--cpu_workers"),
    ("--single-model", "esd_worker.py --model_id"), ("--log-dir", "OUTPUT_DIR/logs"),
])
def test_seed_flags_of_another_meaning_are_refused_with_what_to_type(capsys, flag, hint):
    err = _error(capsys, run_esd_experiment.parse_config, [f"{flag}=4"])
    assert flag in err and hint in err


def test_seed_aliases_stay_out_of_help(capsys):
    help_text = run_esd_experiment.build_parser().format_help()
    assert "--gpu-list" not in help_text and "--gpus" in help_text


def test_switch_off_flags_are_in_help():
    help_text = run_esd_experiment.build_parser().format_help()
    assert "--no_overwrite" in help_text and "--no_skip_failed" in help_text
    assert run_esd_experiment.parse_config(["--overwrite", "--no_overwrite"]).overwrite is False


@pytest.mark.parametrize("argv, says", [
    (["--mode", "esd"], "`--mode esd` is what run_esd_experiment.py does"),
    (["--max-gpu-workers", "4"], "--num_gpus_per_job N gives each model N GPUs"),
    (["--no-parallel-gpu"], "one by default (--num_gpus_per_job 1)"),
    (["--checkpoint-freq", "10"], "each model's CSV is written the moment it is done"),
])
def test_seed_flags_say_what_they_meant_here_in_the_last_line_after_a_short_usage(capsys, argv, says):
    lines = _error(capsys, run_esd_experiment.parse_config, argv).strip().splitlines()
    assert len(lines) == 2 and lines[0].startswith("usage: ") and lines[0].endswith(" --help)")
    assert f"error: {argv[0]} is not a flag of this command" in lines[1] and says in lines[1]
    assert "did you mean" not in lines[1]
