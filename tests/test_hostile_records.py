"""The failure files and the model list against hostile input: ids with newlines and ANSI
escapes, 100,000 nested brackets, a done model left listed as failed, writers killed
mid-write, a long failing list. Real files, real worker processes where the user runs one."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from esd import failures
from esd.atomic_files import remove_stale_temp_files, stale_temp_files
from esd.failures import (ESDFailure, clear_failures, compact_failures, escape_line_text,
                          read_failures, record_failure)
from esd.model_list import ModelListError, read_model_list
from tiny_models import save_gpt2, write_model_list, offline_env

ROOT = Path(__file__).resolve().parents[1]
WORKER = [sys.executable, str(ROOT / "esd_worker.py")]
RUN = [sys.executable, str(ROOT / "run_esd_experiment.py")]
FAST = ["--gpus", "none", "--poll_interval", "0.05", "--max_check", "1", "--retry_backoff", "0.1"]
DEEP = "[" * 100_000 + "]" * 100_000


@pytest.fixture
def env(tmp_path):
    return offline_env(tmp_path)


def txt_lines(out: Path) -> list[str]:
    path = out / failures.FAILED_MODELS_TXT
    return path.read_text(encoding="utf-8").split("\n")[:-1] if path.exists() else []


# ---------------------------------------------------------------- a done model is never listed

def test_a_finished_model_leaves_the_failure_files_when_its_worker_runs_again(tmp_path, env):
    model = save_gpt2(tmp_path / "gpt2", seed=1)
    out = tmp_path / "out"
    first = subprocess.run(WORKER + ["--model_id", str(model), "--output_dir", str(out)], env=env,
                           capture_output=True, text=True, timeout=300)
    assert first.returncode == 0, first.stdout + first.stderr
    # as if its worker had been killed after the rename and the orchestrator had said so
    record_failure(out, str(model), ESDFailure("worker", "worker_killed", "x"))
    again = subprocess.run(WORKER + ["--model_id", str(model), "--output_dir", str(out)], env=env,
                           capture_output=True, text=True, timeout=300)
    assert again.returncode == 0 and "already done" in again.stdout, again.stdout + again.stderr
    assert read_failures(out) == {} and txt_lines(out) == []


def test_planning_clears_the_records_of_models_whose_result_exists(tmp_path):
    import run_esd_experiment
    from esd.model_list import ModelEntry, result_csv_path
    out = tmp_path / "out"
    done, failing = ModelEntry("org/done"), ModelEntry("org/failing")
    for entry in (done, failing):
        record_failure(out, entry.key, ESDFailure("worker", "worker_killed", "killed"))
    result_csv_path(out, done).write_text("model_id\norg/done\n")
    config = run_esd_experiment.ExperimentConfig(model_list=tmp_path / "m.csv", output_dir=out)
    plan = run_esd_experiment.plan_models([done, failing], config)
    assert plan.done == (done,) and plan.pending == (failing,)
    assert set(read_failures(out)) == {"org/failing"}
    assert [line.split("\t")[0] for line in txt_lines(out)] == ["org/failing"]


# ---------------------------------------------------------------- hostile text in the files

def test_ids_with_newlines_tabs_and_ansi_escapes_stay_one_escaped_line_each(tmp_path):
    hostile = ["org/a\nphantom/model\tload: x", "org/b\r\x1b[2J\x1b[31mred", "org/c\u2028d"]
    for number, model_id in enumerate(hostile):
        record_failure(tmp_path, model_id, ESDFailure("load", "corrupt_file", f"bad\x1b[0m\nline {number}"))
    lines = txt_lines(tmp_path)
    assert len(lines) == 3
    assert all("\x1b" not in line and "\r" not in line and line.count("\t") == 1 for line in lines)
    assert lines[0].startswith("org/a\\nphantom/model\\tload: x\t")
    assert set(read_failures(tmp_path)) == set(hostile)  # the JSON keeps the exact ids
    compact_failures(tmp_path)
    assert sorted(txt_lines(tmp_path)) == sorted(lines)
    assert escape_line_text("café ok") == "café ok"


def test_a_failures_jsonl_line_of_100000_nested_brackets_is_a_damaged_record(tmp_path, caplog):
    good = {"model_id": "org/old", "stage": "load", "reason": "corrupt_file", "message": "m",
            "retryable": False, "attempts": 1, "time": 1.0}
    (tmp_path / failures.FAILURES_JSONL).write_text(DEEP + "\n" + json.dumps(good) + "\n")
    assert set(read_failures(tmp_path)) == {"org/old"}
    assert "line 1 is not a failure record" in caplog.text
    record_failure(tmp_path, "org/new", ESDFailure("resolve", "repo_not_found", "gone"))
    assert set(read_failures(tmp_path)) == {"org/old", "org/new"}


def test_an_esd_settings_json_of_100000_nested_brackets_is_refused_with_a_message(tmp_path, env):
    out = tmp_path / "out"
    out.mkdir()
    (out / "esd_settings.json").write_text(DEEP)
    models = write_model_list(tmp_path / "models.csv", [{"model_id": "org/model"}])
    result = subprocess.run(RUN + ["--model_list", str(models), "--output_dir", str(out)] + FAST, env=env,
                            cwd=tmp_path, capture_output=True, text=True, timeout=120)
    said = result.stdout + result.stderr
    assert result.returncode == 2, said
    assert "Traceback" not in said and "esd_settings.json is damaged" in said


def test_model_list_rows_with_control_characters_are_skipped_naming_the_row(tmp_path):
    path = tmp_path / "models.csv"
    path.write_text('model_id,source_model\n"org/a\nphantom",\norg/ok,\n"org/\x1b[31mred",\n'
                    'org/adapter,"base\rx"\n', encoding="utf-8")
    warnings: list[str] = []
    entries = read_model_list(path, warn=warnings.append)
    assert [e.model_id for e in entries] == ["org/ok"]
    assert len(warnings) == 3 and all("control characters" in w and "row skipped" in w for w in warnings)
    assert "row 2" in warnings[0] and "row 4" in warnings[1] and "row 5" in warnings[2]  # CSV records
    assert "'org/a\\nphantom'" in warnings[0]
    assert not any("\x1b" in w or "\r" in w or "\n" in w for w in warnings)


def test_worker_refuses_an_id_with_control_characters_without_a_traceback(tmp_path, env):
    result = subprocess.run(WORKER + ["--model_id=org/x\x1b[2J", "--output_dir", str(tmp_path / "out")], env=env,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and "control characters" in result.stderr
    assert "\x1b" not in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------- linear over a long failing list

def test_a_failure_is_appended_to_the_journal_never_rewriting_it(tmp_path):
    for i in range(50):
        record_failure(tmp_path, f"org/m{i}", ESDFailure("resolve", "repo_not_found", "gone"))
    path = tmp_path / failures.FAILURES_JSONL
    before_inode, before = path.stat().st_ino, path.read_bytes()
    record_failure(tmp_path, "org/m7", ESDFailure("load", "corrupt_file", "cut"))
    assert path.stat().st_ino == before_inode and path.read_bytes().startswith(before)
    assert read_failures(tmp_path)["org/m7"].attempts == 2
    assert len(txt_lines(tmp_path)) == 50
    clear_failures(tmp_path, ["org/m1", "org/m2"])
    assert len(read_failures(tmp_path)) == 48 and len(txt_lines(tmp_path)) == 48
    compact_failures(tmp_path)  # between runs: exactly one line per failed model
    lines = path.read_text().splitlines()
    assert len(lines) == 48 and len({json.loads(line)["model_id"] for line in lines}) == 48


def test_recording_or_clearing_a_failure_reads_nothing_of_a_long_journal(tmp_path):
    """A new worker process records a failure, or a model's next one: what it reads does not
    grow with the journal (counted by the kernel: /proc/self/io rchar; the journal is ~4 MB).
    (Clearing a model, or a failure with other words, rewrites failed_models.txt without its
    old line: that file must lose the line, so that one reads the listing.)"""
    lines = "".join(json.dumps({"model_id": f"org/m{i}", "stage": "resolve", "reason": "repo_not_found",
                                "message": "gone " * 10, "retryable": False, "attempts": 1, "time": 1.0}) + "\n"
                    for i in range(20_000))
    (tmp_path / failures.FAILURES_JSONL).write_text(lines)
    compact_failures(tmp_path)  # the orchestrator's start of a run
    code = """if True:
        import sys
        from pathlib import Path
        from esd.failures import ESDFailure, record_failure
        def read_so_far():
            return int(Path("/proc/self/io").read_text().split("rchar: ")[1].split()[0])
        out = sys.argv[1]
        record_failure(out, "org/warm-up", ESDFailure("load", "corrupt_file", "x"))  # imports done
        before = read_so_far()
        record_failure(out, "org/new", ESDFailure("load", "corrupt_file", "cut"))
        again = record_failure(out, "org/m7", ESDFailure("resolve", "repo_not_found", "gone " * 10))
        print(read_so_far() - before, again.attempts)
    """
    done = subprocess.run([sys.executable, "-c", code, str(tmp_path)], cwd=ROOT, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    read_bytes, attempts = map(int, done.stdout.split())
    journal_bytes = (tmp_path / failures.FAILURES_JSONL).stat().st_size
    assert journal_bytes > 3_000_000 and read_bytes < 256 * 1024, (read_bytes, journal_bytes)
    assert attempts == 2
    current = read_failures(tmp_path)
    assert "org/new" in current and current["org/m7"].attempts == 2
    listed = [line.split("\t")[0] for line in txt_lines(tmp_path)]
    assert len(listed) == len(set(listed)) == 20_000 + 2


def test_a_reader_sees_appends_by_other_processes_and_a_compaction(tmp_path):
    record_failure(tmp_path, "org/a", ESDFailure("resolve", "repo_not_found", "gone"))
    assert set(read_failures(tmp_path)) == {"org/a"}
    code = ("import sys; from esd.failures import *; "
            "record_failure(sys.argv[1], 'org/b', ESDFailure('load', 'corrupt_file', 'x')); "
            "clear_failures(sys.argv[1], ['org/a']); compact_failures(sys.argv[1]); "
            "record_failure(sys.argv[1], 'org/c', ESDFailure('load', 'corrupt_file', 'y'))")
    subprocess.run([sys.executable, "-c", code, str(tmp_path)], check=True, cwd=ROOT, timeout=60)
    assert set(read_failures(tmp_path)) == {"org/b", "org/c"}


# ---------------------------------------------------------------- writers killed mid-write

def test_a_temp_file_of_a_writer_killed_mid_write_is_removed_by_the_next_run(tmp_path, env):
    out = tmp_path / "out"
    code = ("import os, sys; from esd.atomic_files import atomic_path\n"
            "with atomic_path(sys.argv[1]) as tmp:\n"
            "    tmp.write_text('half')\n"
            "    os.kill(os.getpid(), 9)\n")
    out.mkdir()
    killed = subprocess.run([sys.executable, "-c", code, str(out / "org--model.csv")], cwd=ROOT, env=env, timeout=60)
    assert killed.returncode == -9
    assert len(stale_temp_files(out)) == 1 and not (out / "org--model.csv").exists()
    models = write_model_list(tmp_path / "models.csv", [{"model_id": "org/model"}])
    subprocess.run(RUN + ["--model_list", str(models), "--output_dir", str(out), "--max_retries", "0"] + FAST,
                   env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert not [p for p in out.rglob(".*.tmp*")]
    assert remove_stale_temp_files(out) == 0


# ---------------------------------------------------------------- hundreds of warnings

def test_hundreds_of_duplicate_rows_are_summarised_in_a_few_lines(tmp_path, env):
    rows = [{"model_id": "no-such-org/model"}] * 213 + [{"model_id": ""}] * 5
    models = write_model_list(tmp_path / "models.csv", rows)
    result = subprocess.run(RUN + ["--model_list", str(models), "--output_dir", str(tmp_path / "out"),
                                   "--max_retries", "0"] + FAST, env=env, cwd=tmp_path, capture_output=True,
                            text=True, timeout=300)
    warnings = [line for line in result.stdout.splitlines() if line.startswith("model list ")]
    assert len(warnings) == 8, result.stdout
    assert f"model list {models}: 212 duplicate rows (analysed once) in all, first: row 3" in result.stdout
    assert "5 rows with an empty model_id (skipped) in all, first: row 215" in result.stdout


def test_console_log_lines_never_carry_raw_terminal_escapes(tmp_path):
    import io
    import logging
    from esd.safe_output import guard_logging
    console = io.StringIO()
    logger = logging.getLogger("test_hostile_console")
    logger.propagate = False
    handler = logging.StreamHandler(console)
    handler.setFormatter(logging.Formatter("%(message)s"))
    logger.addHandler(handler)
    guard_logging(logger)
    logger.warning("FAILED  %s: %s", "org/x", "config says \x1b]0;owned\x07\x1b[2J\rdone\nsecond line")
    text = console.getvalue()
    assert "\x1b" not in text and "\r" not in text and "\x07" not in text
    assert text == "FAILED  org/x: config says \\x1b]0;owned\\x07\\x1b[2J\\rdone\nsecond line\n"
