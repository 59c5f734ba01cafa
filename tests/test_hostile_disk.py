"""A full disk: a real small filesystem (tmpfs, mounted by the test as root) filled up
around the output directory. Expect no traceback, no half-written file, a typed
`disk_full` failure, one last line saying what to free, and a rerun that completes."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from esd.failures import read_failures
from hostile_kit import can_mount, fill_leaving, half_files, small_disk, tracebacks
from tiny_models import save_gpt2, write_model_list, offline_env

ROOT = Path(__file__).resolve().parents[1]
RUN = [sys.executable, str(ROOT / "run_esd_experiment.py")]
WORKER = [sys.executable, str(ROOT / "esd_worker.py")]
FAST = ["--gpus", "none", "--poll_interval", "0.05", "--max_check", "1", "--retry_backoff", "0.1"]
GPT2_LAYERS = 10

pytestmark = pytest.mark.skipif(not can_mount(), reason="mounting a small tmpfs needs root")


@pytest.fixture
def env(tmp_path):
    return offline_env(tmp_path)


@pytest.fixture
def disk(tmp_path):
    with small_disk(tmp_path / "disk", 256) as mounted:
        yield mounted


def test_a_run_on_a_full_disk_fails_typed_says_what_to_free_and_the_rerun_completes(tmp_path, env, disk):
    model = save_gpt2(tmp_path / "gpt2", seed=1)
    models = write_model_list(tmp_path / "models.csv", [{"model_id": str(model)}])
    out = disk / "out"
    args = RUN + ["--model_list", str(models), "--output_dir", str(out), "--max_retries", "0"] + FAST
    filler = fill_leaving(disk, 12)  # room for the settings and a log, not for the results
    full = subprocess.run(args, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    said = full.stdout + full.stderr
    assert full.returncode == 1, said
    assert tracebacks(said) == 0, said
    last = said.strip().splitlines()[-1]
    assert "disk full" in last and "MB free" in last and "run the same command again" in last, said
    assert half_files(out, GPT2_LAYERS) == []
    records = read_failures(out)
    assert all(r.reason == "disk_full" and r.retryable for r in records.values())

    filler.unlink()
    again = subprocess.run(args, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stdout + again.stderr
    assert read_failures(out) == {} and half_files(out, GPT2_LAYERS) == []
    assert len([p for p in out.glob("*.csv") if p.name not in ("summary.csv", "runs.csv")]) == 1


def test_a_worker_whose_result_does_not_fit_records_a_retryable_disk_full_failure(tmp_path, env, disk):
    model = save_gpt2(tmp_path / "gpt2", seed=1)
    out = disk / "out"
    out.mkdir()
    fill_leaving(disk, 4)  # one page: the failure record fits, the CSV (and the log) do not
    log_path = tmp_path / "worker.log"  # the worker's output on a disk with room, as a user would read it
    with log_path.open("w") as log:
        result = subprocess.run(WORKER + ["--model_id", str(model), "--output_dir", str(out)], env=env,
                                stdout=log, stderr=subprocess.STDOUT, timeout=300)
    said = log_path.read_text()
    assert result.returncode in (74, 75), said
    assert tracebacks(said) == 0, said
    assert "disk_full" in said and "free" in said
    assert half_files(out) == [] and not list(out.glob("*.csv"))
    if result.returncode == 75:  # the record fitted
        record = read_failures(out)[str(model)]
        assert record.reason == "disk_full" and record.retryable and str(out) in record.message


def test_closing_the_run_log_on_a_full_disk_is_no_traceback(disk):
    """The log's last lines cannot be written: the run has said the disk is full, and closing
    the log (which flushes them once more) must not end in a traceback."""
    from esd import diskfull, run_record
    out = disk / "out"
    out.mkdir()
    run_record.setup_logging(out)
    try:
        fill_leaving(disk, 0)
        with pytest.raises(OSError):  # the disk is really full: not one more byte fits
            with open(disk / "one_more", "wb") as handle:
                handle.write(b"x" * 4096)
        run_record.log.info("a line that stays in the handler's buffer")  # said nothing: guarded
        run_record.teardown_logging()  # used to raise OSError [Errno 28] from the close
        assert not run_record.log.handlers and str(out / "logs" / "esd_experiment.log") in diskfull.seen()
    finally:
        run_record.teardown_logging()
        diskfull._seen.clear()
