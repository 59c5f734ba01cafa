"""gputracker in a hostile world: a job whose log is on a full disk, SIGHUP, a SIGKILLed
writer's temporary file. Real subprocess jobs; the full disk is the kernel's `/dev/full`
(every write fails with ENOSPC), not a fake of our code."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gputracker_testkit import JobFactory, subprocess_env, wait_until  # noqa: E402

from gputracker import Dispatcher, Job  # noqa: E402
from gputracker.metrics import write_json_atomic  # noqa: E402

DEV_FULL = Path("/dev/full")


@pytest.mark.skipif(not DEV_FULL.exists(), reason="no /dev/full on this system")
def test_a_job_whose_log_is_on_a_full_disk_never_kills_a_healthy_running_job(tmp_path):
    jobs = JobFactory(tmp_path)
    healthy = Job("healthy", jobs.argv("healthy", sleep_s=1.5), tmp_path / "logs" / "healthy.log")
    on_full_disk = Job("full", jobs.argv("full", sleep_s=0.0), DEV_FULL)
    ended = []
    dispatcher = Dispatcher(gpus=[], cpu_slots=2, poll_interval_s=0.05, max_check=1, kill_grace_s=1.0,
                            lock_dir=tmp_path / "locks", on_job_end=ended.append)
    results = {r.job_id: r for r in dispatcher.run([healthy, on_full_disk])}

    assert results["healthy"].returncode == 0 and not results["healthy"].interrupted
    assert jobs.records()["healthy"]["end"] is not None, "the healthy job was killed"
    assert not results["full"].interrupted
    assert {r.job_id for r in ended} == {"healthy", "full"}


def test_sighup_stops_the_cli_like_sigterm_and_it_reports_the_run(tmp_path):
    jobs = JobFactory(tmp_path)
    commands = tmp_path / "commands.txt"
    commands.write_text(jobs.command_line("long", sleep_s=60) + "\n")
    proc = subprocess.Popen([sys.executable, "-m", "gputracker", str(commands), "--gpus", "none",
                             "--poll_interval", "0.05", "--max_check", "1", "--log_dir", str(tmp_path / "logs"),
                             "--kill_grace", "1", "--lock_dir", str(tmp_path / "locks")],
                            env=subprocess_env(None), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert wait_until(lambda: "long" in jobs.records(), 30)
    child_pid = jobs.records()["long"]["pid"]
    proc.send_signal(signal.SIGHUP)
    stdout, stderr = proc.communicate(timeout=30)
    assert proc.returncode == 130, stdout + stderr
    assert "1 interrupted" in stdout and "Traceback" not in stderr
    assert wait_until(lambda: not Path(f"/proc/{child_pid}").exists()
                      or b") Z" in Path(f"/proc/{child_pid}/stat").read_bytes(), 10)


def test_metrics_temp_file_names_its_writer_so_a_later_run_can_remove_it(tmp_path):
    from esd.atomic_files import remove_stale_temp_files, stale_temp_files
    # a writer killed with SIGKILL half-way: its temporary file stays behind
    writer = subprocess.run([sys.executable, "-c", (
        "import os, sys; sys.path.insert(0, sys.argv[2]); from pathlib import Path\n"
        "import gputracker.metrics as m\n"
        "real = os.replace\n"
        "os.replace = lambda *a: os.kill(os.getpid(), 9)\n"
        "m.write_json_atomic(Path(sys.argv[1]) / 'gpu_metrics.json', {'a': 1})\n"),
        str(tmp_path), str(Path(__file__).resolve().parents[1])])
    assert writer.returncode == -9
    left = [p for p in tmp_path.iterdir() if p.name.startswith(".gpu_metrics.json.tmp")]
    assert len(left) == 1 and stale_temp_files(tmp_path) == left
    write_json_atomic(tmp_path / "live.json", {"b": 2})  # a live writer's files are never touched
    assert remove_stale_temp_files(tmp_path) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["live.json"]
    assert json.loads((tmp_path / "live.json").read_text()) == {"b": 2}


def test_cli_output_into_a_closed_pipe_is_no_traceback(tmp_path):
    jobs = JobFactory(tmp_path)
    commands = tmp_path / "commands.txt"
    commands.write_text(jobs.command_line("quick", sleep_s=0.0) + "\n")
    reader, writer = os.pipe()
    os.close(reader)  # like `| head` having exited
    try:
        result = subprocess.run([sys.executable, "-m", "gputracker", str(commands), "--gpus", "none",
                                 "--poll_interval", "0.05", "--max_check", "1", "--log_dir", str(tmp_path / "logs"),
                                 "--lock_dir", str(tmp_path / "locks")], env=subprocess_env(None), stdout=writer,
                                stderr=subprocess.PIPE, text=True, timeout=60)
    finally:
        os.close(writer)
    assert "Traceback" not in result.stderr and "BrokenPipe" not in result.stderr, result.stderr
    assert jobs.records()["quick"]["end"] is not None
