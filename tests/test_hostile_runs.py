"""Runs against each other and against their terminal: two runs with different ESD settings
in one directory, a worker waiting for a model another worker fails, SIGHUP, stdout into a
closed pipe. Real orchestrator and worker processes, real locks."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from filelock import FileLock

from esd import run_lock
from esd.failures import ESDFailure, read_failures, record_failure
from esd.model_list import ModelEntry, safe_id
from tiny_models import save_gpt2, write_model_list, offline_env

ROOT = Path(__file__).resolve().parents[1]
RUN = [sys.executable, str(ROOT / "run_esd_experiment.py")]
WORKER = [sys.executable, str(ROOT / "esd_worker.py")]
FAST = ["--gpus", "none", "--poll_interval", "0.05", "--max_check", "1", "--retry_backoff", "0.1"]
DEFAULTS = {"fix_fingers": "xmin_mid", "evals_thresh": 1e-5, "bins": 100, "xmin_pos": 2,
            "conv_norm": 0.5, "filter_zeros": True}


@pytest.fixture
def env(tmp_path):
    return offline_env(tmp_path)


def wait_for(predicate, timeout_s=120.0):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return False


# ---------------------------------------------------------------- one directory, one set of settings

def test_settings_claimed_by_a_live_run_cannot_be_replaced_even_with_overwrite(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", (
        "import sys, time; from esd import run_lock\n"
        f"run_lock.claim_settings(sys.argv[1], {DEFAULTS!r})\n"
        "print('held', flush=True); time.sleep(60)\n"), str(out)], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        other = dict(DEFAULTS, fix_fingers="DKS")
        with pytest.raises(run_lock.SettingsConflict, match="another run is using .* right now"):
            run_lock.claim_settings(out, other, overwrite=True)
        run_lock.claim_settings(out, DEFAULTS)  # the same settings share the directory
        run_lock.release(out)
    finally:
        holder.kill()
        holder.wait()
    run_lock.claim_settings(out, dict(DEFAULTS, fix_fingers="DKS"), overwrite=True)  # nobody uses it now
    run_lock.release(out)
    assert json.loads((out / "esd_settings.json").read_text())["fix_fingers"] == "DKS"


def test_overwrite_with_new_settings_cut_short_leaves_no_old_result_to_count_as_done(tmp_path, env):
    models = [save_gpt2(tmp_path / f"gpt2-{i}", seed=i) for i in range(2)]
    model_list = write_model_list(tmp_path / "models.csv", [{"model_id": str(m)} for m in models])
    out = tmp_path / "out"
    args = RUN + ["--model_list", str(model_list), "--output_dir", str(out)] + FAST
    first = subprocess.run(args, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert first.returncode == 0, first.stdout + first.stderr
    names = [f"{safe_id(str(m))}.csv" for m in models]
    old = {name: (out / name).read_bytes() for name in names}

    dks = args + ["--fix_fingers", "DKS"]
    cut = subprocess.run(dks + ["--overwrite", "--limit", "1"], env=env, cwd=tmp_path, capture_output=True,
                         text=True, timeout=600)
    assert cut.returncode == 0, cut.stdout + cut.stderr
    (aside,) = (out / "superseded").iterdir()   # the old settings' results, with their settings
    assert {name: (aside / name).read_bytes() for name in names} == old
    assert json.loads((aside / "esd_settings.json").read_text())["fix_fingers"] == "xmin_mid"
    (new,) = [out / name for name in names if (out / name).exists()]   # only what the new settings made
    assert new.read_bytes() != old[new.name]

    rerun = subprocess.run(dks, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stdout + rerun.stderr
    assert "1 already done, 0 skipped (failed before), 1 to run" in rerun.stdout, rerun.stdout
    assert all((out / name).exists() for name in names) and len(list((out / "superseded").iterdir())) == 1


def test_a_second_run_with_other_settings_is_refused_while_the_first_runs(tmp_path, env):
    model = save_gpt2(tmp_path / "gpt2", seed=1)
    models = write_model_list(tmp_path / "models.csv", [{"model_id": str(model)}])
    out = tmp_path / "out"
    first = subprocess.Popen(RUN + ["--model_list", str(models), "--output_dir", str(out)] + FAST, env=env,
                             cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert wait_for(lambda: list((out / "logs" / "workers").glob("*.log")))  # its worker runs
        second = subprocess.run(RUN + ["--model_list", str(models), "--output_dir", str(out), "--overwrite",
                                       "--fix_fingers", "DKS"] + FAST, env=env, cwd=tmp_path,
                                capture_output=True, text=True, timeout=120)
    finally:
        stdout, stderr = first.communicate(timeout=300)
    said = second.stdout + second.stderr
    assert second.returncode == 2 and "another run is using" in said and "Traceback" not in said, said
    assert first.returncode == 0, stdout + stderr
    assert json.loads((out / "esd_settings.json").read_text())["fix_fingers"] == "xmin_mid"


def test_a_worker_with_other_settings_than_its_directory_fails_typed_and_writes_no_result(tmp_path, env):
    out = tmp_path / "out"
    out.mkdir()
    (out / "esd_settings.json").write_text(json.dumps(DEFAULTS))
    result = subprocess.run(WORKER + ["--model_id", "org/model", "--output_dir", str(out), "--fix_fingers", "DKS"],
                            env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 1 and "Traceback" not in result.stdout + result.stderr
    record = read_failures(out)["org/model"]
    assert (record.stage, record.reason, record.retryable) == ("worker", "settings_mismatch", False)
    assert "fix_fingers: 'xmin_mid' there, 'DKS' asked" in record.message
    assert not list(out.glob("*.csv"))


# ---------------------------------------------------------------- the model lock covers failures

def test_a_worker_that_waited_for_a_failing_attempt_takes_its_failure_instead_of_recomputing(tmp_path, env):
    out = tmp_path / "out"
    entry = ModelEntry("org/model")
    (out / ".locks").mkdir(parents=True)
    lock = FileLock(str(out / ".locks" / f"{safe_id(entry.model_id)}.lock"))
    lock.acquire()  # another worker (of another orchestrator) is analysing the model
    waiting = subprocess.Popen(WORKER + ["--model_id", "org/model", "--output_dir", str(out)], env=env,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        assert wait_for(lambda: (out / "esd_settings.json").exists())
        time.sleep(1.0)
        record_failure(out, entry.key, ESDFailure("load", "out_of_memory", "the other attempt ran out"))
    finally:
        lock.release()
    said, _ = waiting.communicate(timeout=120)
    assert waiting.returncode == 75, said
    assert "FAILED meanwhile in another worker: load/out_of_memory" in said
    assert read_failures(out)["org/model"].attempts == 1  # one attempt, not two


# ---------------------------------------------------------------- the terminal goes away

def test_sighup_stops_the_run_like_sigterm_and_records_it(tmp_path, env):
    model = save_gpt2(tmp_path / "gpt2", seed=1)
    models = write_model_list(tmp_path / "models.csv", [{"model_id": str(model)}])
    out = tmp_path / "out"
    proc = subprocess.Popen(RUN + ["--model_list", str(models), "--output_dir", str(out)] + FAST, env=env,
                            cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert wait_for(lambda: list((out / "logs" / "workers").glob("*.log")))
    proc.send_signal(signal.SIGHUP)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130, stdout + stderr
    assert "Traceback" not in stderr and "run the same command again to resume" in stdout + stderr
    runs = list((out / "runs").glob("*/run.json"))
    assert len(runs) == 1 and json.loads(runs[0].read_text())["status"] == "interrupted"


def test_stdout_into_a_closed_pipe_is_no_traceback(tmp_path, env):
    rows = [{"model_id": f"no-such-org/model-{i}"} for i in range(6)]
    models = write_model_list(tmp_path / "models.csv", rows + rows[:3])  # duplicates: more lines
    out = tmp_path / "out"
    reader_fd, writer_fd = os.pipe()
    os.close(reader_fd)  # like `| head -1` having exited
    try:
        result = subprocess.run(RUN + ["--model_list", str(models), "--output_dir", str(out), "--max_retries", "0",
                                       "--cpu_workers", "2"] + FAST, env=env, cwd=tmp_path, stdout=writer_fd,
                                stderr=subprocess.PIPE, text=True, timeout=300)
    finally:
        os.close(writer_fd)
    assert "Traceback" not in result.stderr and "BrokenPipe" not in result.stderr, result.stderr
    assert result.returncode == 1  # the models failed (no such repo); the run itself went on
    assert len(read_failures(out)) == 6
