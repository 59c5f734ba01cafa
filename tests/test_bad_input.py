"""Bad input gets a clear message naming what was wrong (the file, the row, the flag), never a
traceback, and never lost or half-written results. Real subprocesses where the user would see
the message; the model-list and record readers are called directly where that is the same code."""
from __future__ import annotations

import csv
import json
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from filelock import FileLock

from esd import failures
from esd import model_list, run_record
import run_esd_experiment
from esd.failures import ESDFailure, read_failures, record_failure
from tiny_models import write_model_list, offline_env

ROOT = Path(__file__).resolve().parents[1]
RUN = [sys.executable, str(ROOT / "run_esd_experiment.py")]
WORKER = [sys.executable, str(ROOT / "esd_worker.py")]
FAST = ["--gpus", "none", "--poll_interval", "0.05", "--max_check", "1"]


@pytest.fixture
def env(tmp_path):
    return offline_env(tmp_path)


@pytest.fixture
def models_csv(tmp_path):
    return write_model_list(tmp_path / "models.csv", [{"model_id": "org/model"}])


def run(cmd, env, cwd, timeout=120):
    return subprocess.run(cmd, env=env, cwd=cwd, capture_output=True, text=True, timeout=timeout)


def assert_refused(result, *words):
    said = result.stdout + result.stderr
    assert result.returncode == 2, said
    assert "Traceback" not in said, said
    for word in words:
        assert word in said, said


# ---------------------------------------------------------------- the model list

def test_model_list_not_utf8_is_refused_naming_the_row_and_nothing_is_written(tmp_path, env):
    bad = tmp_path / "latin1.csv"
    bad.write_bytes("model_id\norg/caf\u00e9\n".encode("latin-1"))
    result = run(RUN + ["--model_list", str(bad), "--output_dir", str(tmp_path / "out")] + FAST, env, tmp_path)
    assert_refused(result, "latin1.csv, row 2", "UTF-8")
    assert not (tmp_path / "out").exists(), "a refused run leaves no output directory behind"


def test_header_only_model_list_is_refused_as_having_no_models(tmp_path, env):
    empty = tmp_path / "header.csv"
    empty.write_text("model_id,revision\n")
    result = run(RUN + ["--model_list", str(empty), "--output_dir", str(tmp_path / "out")] + FAST, env, tmp_path)
    assert_refused(result, "header.csv has no models")


@pytest.mark.parametrize("kind, content, says", [
    ("excel", b"PK\x03\x04\x14\x00\x00\x00\x08\x00", "spreadsheet (Excel)"),
    ("nul", b"model_id\norg/a\x00b\n", "row 2: contains a NUL byte"),
    ("utf16", "model_id\norg/a\n".encode("utf-16-le"), "row 1: contains a NUL byte"),
    ("huge_field", b"model_id\norg/a\n" + b"x" * 200_000, "row 3: not readable as CSV"),
    ("directory", None, "is a directory"),
], ids=lambda value: value if isinstance(value, str) and len(value) < 20 else "")
def test_model_list_that_is_not_a_csv_file_is_refused_saying_what_it_is(tmp_path, kind, content, says):
    path = tmp_path / "models.csv"
    if content is None:
        path.mkdir()
    else:
        path.write_bytes(content)
    with pytest.raises(model_list.ModelListError, match=re.escape(says)):
        model_list.read_model_list(path)


def test_bom_and_quoted_commas_are_read_as_plain_csv(tmp_path):
    path = tmp_path / "models.csv"
    path.write_bytes(b'\xef\xbb\xbfmodel_id,source_model\n"org/a","base,with,commas"\n')
    (entry,) = model_list.read_model_list(path)
    assert (entry.model_id, entry.source_model) == ("org/a", "base,with,commas")


def test_ids_sharing_a_result_file_are_one_model_analysed_once(tmp_path):
    path = write_model_list(tmp_path / "models.csv", [{"model_id": "/data/run1"}, {"model_id": "/data/run1/"},
                                                       {"model_id": "org/a"}, {"model_id": "org/a@main"}])
    warnings = []
    entries = model_list.read_model_list(path, warn=warnings.append)
    assert [e.key for e in entries] == ["/data/run1", "org/a", "org/a@main"]
    assert warnings == [f"model list {path}, row 3: duplicate of row 2 (/data/run1/); analysed once"]


# ---------------------------------------------------------------- flags and the config file

@pytest.mark.parametrize("flags, says", [
    (["--limit", "x"], "--limit: expected a whole number >= 0 or 'none', got 'x'"),
    (["--timeout", "-1"], "--timeout: expected a number >= 0"),
    (["--timeout", "nan"], "--timeout: expected a number >= 0"),
    (["--retry_backoff", "-5"], "--retry_backoff must be >= 0"),
    (["--poll_interval", "nan"], "--poll_interval must be a number of seconds > 0"),
    (["--max_retries", "-1"], "--max_retries must be >= 0, got -1"),
    (["--gpus", "-1"], "--gpus takes GPU indices"),
    (["--conv_norm", "inf"], "--conv_norm must be a finite number"),
    (["--evals_thresh", "inf"], "--evals_thresh must be a finite number"),
    (["--backend", "slurm", "--slurm_array_parallelism", "0"], "--slurm_array_parallelism must be at least 1"),
    (["--output_dir", ""], "--output_dir/--output-dir: expected a path, got an empty value"),
])
def test_bad_flag_value_is_refused_naming_the_flag(models_csv, tmp_path, capsys, flags, says):
    argv = ["--model_list", str(models_csv), "--output_dir", str(tmp_path / "out")] + FAST + flags
    try:
        status = run_esd_experiment.main(argv)
    except SystemExit as exc:  # argparse's own refusal
        status = exc.code
    assert status == 2
    assert says in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_output_dir_that_is_a_file_or_under_a_file_is_refused_with_a_message(models_csv, tmp_path, env):
    regular = tmp_path / "results"
    regular.write_text("not a directory")
    for output_dir, says in ((regular, "is an existing file, not a directory"),
                             (regular / "sub", "cannot be created: Not a directory")):
        result = run(RUN + ["--model_list", str(models_csv), "--output_dir", str(output_dir)] + FAST, env, tmp_path)
        assert_refused(result, f"--output_dir {output_dir} {says}")


@pytest.mark.parametrize("yaml_text, says", [
    ("bins: [1, 2]\n", "bins: expected a single value"),
    ("cpu_workers: 2.5\n", "cpu_workers: 2.5 is not a valid value"),
    ("overwrite: maybe\n", "overwrite: expected true or false"),
    ("model_list: [a.csv]\n", "model_list: expected a single value"),
    ("timeout: -5\n", "timeout: -5 is not a valid value"),
    ("model_list: null\n", "model_list: needs a value"),
])
def test_config_value_of_the_wrong_type_is_refused_naming_the_file_and_key(models_csv, tmp_path, capsys,
                                                                           yaml_text, says):
    config = tmp_path / "experiment.yaml"
    config.write_text(yaml_text)
    argv = ["--config", str(config), "--model_list", str(models_csv), "--output_dir", str(tmp_path / "out")]
    assert run_esd_experiment.main(argv + FAST) == 2  # a file's bad value is refused even if a flag overrides it
    assert f"--config {config}: {says}" in capsys.readouterr().err


def test_config_file_not_utf8_is_refused(models_csv, tmp_path, capsys):
    config = tmp_path / "experiment.yaml"
    config.write_bytes(b"\xff\xfebins: 3\n")
    argv = ["--config", str(config), "--model_list", str(models_csv), "--output_dir", str(tmp_path / "out")]
    assert run_esd_experiment.main(argv + FAST) == 2
    assert f"--config {config} is not UTF-8 text" in capsys.readouterr().err


# ---------------------------------------------------------------- records in the output directory

@pytest.mark.parametrize("damage", ["cut_short", "directory"])
def test_damaged_esd_settings_json_is_refused_naming_the_file_to_fix(models_csv, tmp_path, env, damage):
    out = tmp_path / "out"
    out.mkdir()
    if damage == "directory":
        (out / "esd_settings.json").mkdir()
    else:
        (out / "esd_settings.json").write_text('{"fix_fingers": "xmin_mid", "evals')
    result = run(RUN + ["--model_list", str(models_csv), "--output_dir", str(out)] + FAST, env, tmp_path)
    assert_refused(result, f"{out / 'esd_settings.json'} is damaged", "--overwrite")


def test_truncated_failures_jsonl_line_is_skipped_with_a_warning_and_new_failures_are_recorded(tmp_path, caplog):
    good = {"model_id": "org/old", "stage": "load", "reason": "corrupt_file", "message": "m",
            "retryable": False, "attempts": 1, "time": 1.0}
    (tmp_path / failures.FAILURES_JSONL).write_text(json.dumps(good) + '\n{"model_id": "org/cut", "sta')
    assert set(read_failures(tmp_path)) == {"org/old"}
    assert "failures.jsonl, line 2 is not a failure record" in caplog.text
    record_failure(tmp_path, "org/new", ESDFailure("resolve", "repo_not_found", "gone"))
    assert set(read_failures(tmp_path)) == {"org/old", "org/new"}
    lines = (tmp_path / failures.FAILED_MODELS_TXT).read_text().splitlines()
    assert [line.split("\t")[0] for line in lines] == ["org/new", "org/old"]


def test_runs_csv_from_an_older_version_keeps_rows_aligned_under_the_union_of_columns(tmp_path):
    runs_csv = tmp_path / "runs.csv"
    runs_csv.write_text("run_id,status,old_column\nr1,completed,kept\n")
    run_record._append_run_row(runs_csv, {"run_id": "r2", "done": 3, "status": "interrupted"})
    with runs_csv.open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert rows == [{"run_id": "r1", "status": "completed", "old_column": "kept", "done": ""},
                    {"run_id": "r2", "status": "interrupted", "old_column": "", "done": "3"}]


def test_a_runs_csv_field_of_200_kb_is_read_back_and_kept(tmp_path):
    runs_csv = tmp_path / "runs.csv"
    long_path = "models/" + "x" * 200_000 + ".csv"   # the csv module's default limit is 128 kB
    run_record._append_run_row(runs_csv, {"run_id": "r1", "status": "completed", "model_list": long_path})
    run_record._append_run_row(runs_csv, {"run_id": "r2", "status": "completed", "model_list": "m.csv"})
    with runs_csv.open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert [(r["run_id"], r["model_list"]) for r in rows] == [("r1", long_path), ("r2", "m.csv")]


# ---------------------------------------------------------------- Ctrl-C

# Ctrl-C tests wait for what the program announces (a line, a file), never a fixed time; this
# bound only turns a hang into a failure, and is far beyond any loaded machine's slowness.
HANG_GUARD_S = 600


def _announced(proc: subprocess.Popen, happened) -> bool:
    """Wait until `happened()` (an event the program announces) or the program ends."""
    while not happened():
        if proc.poll() is not None:
            return happened()
        time.sleep(0.05)
    return True


def test_ctrl_c_before_dispatch_says_how_to_resume_without_a_traceback(tmp_path, env):
    out = tmp_path / "out"
    out.mkdir()
    record_failure(out, "org/other", ESDFailure("resolve", "repo_not_found", "gone"))
    models = write_model_list(tmp_path / "models.csv", [{"model_id": "org/model"}])
    with FileLock(str(out / ".failures.lock")):  # --skip_failed waits here, before any worker starts
        proc = subprocess.Popen(RUN + ["--model_list", str(models), "--output_dir", str(out), "--skip_failed"] + FAST,
                                env=env, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        # the run's log exists: the run is past its imports and inside its Ctrl-C handling,
        # and then waits for the lock we hold (however long a loaded machine takes to get there)
        assert _announced(proc, lambda: (out / "logs" / "esd_experiment.log").exists())
        proc.send_signal(signal.SIGINT)
        stdout, stderr = proc.communicate(timeout=HANG_GUARD_S)
    assert proc.returncode == 130, stdout + stderr
    assert "Traceback" not in stderr and "run the same command again to resume" in stderr


# ---------------------------------------------------------------- esd_worker.py

@pytest.mark.parametrize("make_args, says", [
    (lambda d: ["--manifest", str(d / "missing.json"), "--task_index", "0"], "missing.json does not exist"),
    (lambda d: ["--manifest", str(d / "cut.json"), "--task_index", "0"], "is not a readable JSON manifest"),
    (lambda d: ["--manifest", str(d / "list.json"), "--task_index", "0"], "has no 'tasks' list"),
    (lambda d: ["--manifest", str(d / "cut.json"), "--task_index", "0", "--model_id", "org/a"],
     "do not also give --model_id"),
    (lambda d: ["--model_id", "org/a", "--output_dir", str(d), "--task_index", "3"], "--task_index goes with --manifest"),
    (lambda d: ["--model_id", "org/a", "--output_dir", str(d / "file")], "is an existing file, not a directory"),
])
def test_worker_with_bad_or_contradictory_arguments_exits_with_a_message(tmp_path, env, make_args, says):
    (tmp_path / "cut.json").write_text('{"tasks": [')
    (tmp_path / "list.json").write_text("[1]")
    (tmp_path / "file").write_text("")
    result = run(WORKER + make_args(tmp_path), env, tmp_path)
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    assert says in result.stderr


def test_worker_output_dir_under_a_regular_file_exits_with_a_message(tmp_path, env):
    (tmp_path / "file").write_text("")
    result = run(WORKER + ["--model_id", "org/a", "--output_dir", str(tmp_path / "file" / "out")], env, tmp_path)
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr
    assert "cannot be created: Not a directory" in result.stderr


def test_model_list_values_starting_with_a_dash_reach_the_worker_as_values(tmp_path):
    import esd_worker
    entry = model_list.ModelEntry("--help", "-rev", "-x", "--overwrite")
    argv = esd_worker.worker_argv(entry, tmp_path, esd_worker.ESDSettings())
    config = esd_worker.parse_config(argv)
    assert config.entry == entry and config.output_dir == tmp_path and not config.overwrite


def test_ctrl_c_on_a_waiting_worker_exits_130_with_a_message_and_writes_nothing(tmp_path, env):
    out = tmp_path / "out"
    (out / ".locks").mkdir(parents=True)
    with FileLock(str(out / ".locks" / "org--a.lock")):  # as if another worker held the model
        proc = subprocess.Popen(WORKER + ["--model_id", "org/a", "--output_dir", str(out)], env=env, cwd=tmp_path,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        line = proc.stdout.readline()
        assert "waiting for it" in line, line
        proc.send_signal(signal.SIGINT)
        stdout, stderr = proc.communicate(timeout=HANG_GUARD_S)
    assert proc.returncode == 130 and "Traceback" not in stderr, stderr
    assert "org/a: interrupted" in stderr
    assert not list(out.glob("*.csv")) and not (out / failures.FAILURES_JSONL).exists()


def test_slurm_submission_that_cannot_happen_is_recorded_as_error_not_interrupted(models_csv, tmp_path, env):
    out = tmp_path / "out"
    no_slurm = dict(env, PATH=str(Path(sys.executable).parent))  # no sbatch on PATH
    result = run(RUN + ["--model_list", str(models_csv), "--output_dir", str(out), "--backend", "slurm"] + FAST,
                 no_slurm, tmp_path)
    assert_refused(result, "sbatch")
    with (out / "runs.csv").open(newline="") as handle:
        assert [row["status"] for row in csv.DictReader(handle)] == ["error"]
