"""``python -m gputracker`` as users run it: real processes, the fake pynvml on PYTHONPATH."""
from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gputracker_testkit import (  # noqa: E402
    JobFactory, assert_no_gpu_overlap, load_fake_pynvml, process_is_running, record_intervals, subprocess_env,
    wait_until, write_fake_gpus,
)

from gputracker import DispatchThread  # noqa: E402


def gputracker_cmd(commands_file: Path, *flags) -> list[str]:
    return [sys.executable, "-m", "gputracker", str(commands_file), *map(str, flags)]


def write_commands(path: Path, lines: list[str]) -> Path:
    path.write_text("\n".join(lines) + "\n")
    return path


def test_cli_runs_commands_in_cpu_mode_skipping_comments_with_hyphenated_flags_and_fails_on_a_failed_job(tmp_path):
    jobs = JobFactory(tmp_path)
    commands = write_commands(tmp_path / "cmds.txt", [
        "# a comment", "", jobs.command_line("a", sleep_s=0), "   ",
        jobs.command_line("b", sleep_s=0, exit_code=4), "GT_EXTRA='two words' " + jobs.command_line("c", sleep_s=0),
    ])
    log_dir = tmp_path / "logs"
    proc = subprocess.run(gputracker_cmd(commands, "--gpus", "none", "--cpu-slots", "2", "--log-dir", log_dir,
                                         "--poll-interval", "0.05", "--max-check", "1"),
                          env=subprocess_env(None), capture_output=True, text=True, timeout=60)

    assert proc.returncode == 1, proc.stderr
    summary = proc.stdout.strip().splitlines()
    assert len(summary) == 1 and "3 jobs" in summary[0] and "1 failed" in summary[0]
    assert sorted(p.name for p in log_dir.glob("job_*.log")) == ["job_0000.log", "job_0001.log", "job_0002.log"]
    metrics = json.loads((log_dir / "gpu_metrics.json").read_text())
    assert (metrics["mode"], metrics["jobs"], metrics["succeeded"], metrics["failed"]) == ("cpu", 3, 2, 1)
    records = jobs.records()
    assert records["c"]["extra_env"] == "two words"
    assert all(r["cuda_visible_devices"] == "" for r in records.values())


def test_cli_without_nvml_falls_back_to_cpu_with_a_clear_message(tmp_path):
    jobs = JobFactory(tmp_path)
    commands = write_commands(tmp_path / "cmds.txt", [jobs.command_line("a", sleep_s=0)])
    proc = subprocess.run(gputracker_cmd(commands, "--log_dir", tmp_path / "logs"), env=subprocess_env(None),
                          capture_output=True, text=True, timeout=60)

    assert proc.returncode == 0, proc.stderr
    assert proc.stderr.count("CPU mode") == 1 and "NVML" in proc.stderr
    assert jobs.records()["a"]["cuda_visible_devices"] == ""


def test_cli_rejects_bad_arguments_with_usage_status(tmp_path):
    commands = write_commands(tmp_path / "cmds.txt", ["true"])
    for flags in (["--max_check", "0"], ["--gpus", "zero"], ["--poll-interval", "-1"]):
        proc = subprocess.run(gputracker_cmd(commands, *flags), env=subprocess_env(None),
                              capture_output=True, text=True, timeout=60)
        assert proc.returncode == 2 and "error" in proc.stderr, flags


def test_two_dispatcher_processes_on_one_lock_dir_never_share_a_gpu(tmp_path):
    jobs = JobFactory(tmp_path)
    script = write_fake_gpus(tmp_path / "fake.json", [{"used_mb": 0}, {"used_mb": 0}])
    flags = ["--poll_interval", "0.03", "--max_check", "2", "--lock_dir", tmp_path / "locks"]
    procs = []
    for user in ("alice", "bob"):
        commands = write_commands(tmp_path / f"{user}.txt",
                                  [jobs.command_line(f"{user}{i}", sleep_s=0.25) for i in range(4)])
        procs.append(subprocess.Popen(gputracker_cmd(commands, *flags, "--log_dir", tmp_path / user),
                                      env=subprocess_env(script), stdout=subprocess.PIPE, stderr=subprocess.PIPE))
    for proc in procs:
        out, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, err.decode()

    records = jobs.records()
    assert len(records) == 8
    assert_no_gpu_overlap(record_intervals(records))


def test_claim_outlives_a_kill9_dispatcher_while_its_job_still_runs(tmp_path):
    jobs = JobFactory(tmp_path)
    script = write_fake_gpus(tmp_path / "fake.json", [{"used_mb": 0}])
    flags = ["--poll_interval", "0.03", "--max_check", "1", "--lock_dir", tmp_path / "locks"]
    first = subprocess.Popen(gputracker_cmd(write_commands(tmp_path / "a.txt", [jobs.command_line("orphan", sleep_s=2)]),
                                            *flags, "--log_dir", tmp_path / "a"),
                             env=subprocess_env(script), stderr=subprocess.DEVNULL)
    assert wait_until(lambda: "orphan" in jobs.records(), 30)
    first.kill()  # SIGKILL: no cleanup at all in the dispatcher
    first.wait(timeout=30)

    second = subprocess.run(gputracker_cmd(write_commands(tmp_path / "b.txt", [jobs.command_line("next", sleep_s=0)]),
                                           *flags, "--log_dir", tmp_path / "b"),
                            env=subprocess_env(script), capture_output=True, timeout=60)

    records = jobs.records()
    assert second.returncode == 0
    assert records["orphan"]["end"] is not None, "the orphaned job should have run to its end"
    assert records["next"]["start"] > records["orphan"]["end"], "GPU given away while the orphaned job held it"


def test_sigint_to_the_cli_terminates_every_child_and_grandchild(tmp_path):
    jobs = JobFactory(tmp_path)
    script = write_fake_gpus(tmp_path / "fake.json", [{"used_mb": 0}, {"used_mb": 0}])
    commands = write_commands(tmp_path / "cmds.txt",
                              [jobs.command_line(f"s{i}", sleep_s=120, grandchild=True) for i in range(3)])
    proc = subprocess.Popen(gputracker_cmd(commands, "--poll_interval", "0.03", "--max_check", "1",
                                           "--kill_grace", "2", "--lock_dir", tmp_path / "locks",
                                           "--log_dir", tmp_path / "logs"),
                            env=subprocess_env(script), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert wait_until(lambda: {"s0", "s1"} <= set(jobs.records()), 30), "two jobs should be running"
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=60)

    assert proc.returncode == 130, err.decode()
    pids = [p for r in jobs.records().values() for p in (r["pid"], r["grandchild_pid"])]
    assert len(pids) == 4
    assert wait_until(lambda: not any(process_is_running(p) for p in pids), 10), "a child or grandchild survived"
    metrics = json.loads((tmp_path / "logs" / "gpu_metrics.json").read_text())
    assert metrics["interrupted"] == 3 and metrics["not_started"] == 1


def test_dispatch_thread_runs_old_style_command_strings_without_a_shell(tmp_path, monkeypatch):
    jobs = JobFactory(tmp_path)
    load_fake_pynvml(monkeypatch, write_fake_gpus(tmp_path / "fake.json", [{"used_mb": 0}, {"used_mb": 9000}]))
    commands = [jobs.command_line(f"old{i}", sleep_s=0.1) for i in range(3)]
    commands.append(f"{sys.executable} -c 'import sys; sys.exit(len(sys.argv))' '>' out.txt")
    thread = DispatchThread("experiment", commands, logging.getLogger("test"), 500, [0, 1], 2, 1,
                            poll_interval_s=0.03, log_dir=tmp_path / "logs", lock_dir=tmp_path / "locks")
    thread.start()
    thread.join()

    assert [r.returncode for r in thread.results] == [0, 0, 0, 3]  # '>' and out.txt reached argv
    assert not (tmp_path / "out.txt").exists()
    assert all(r["cuda_visible_devices"] == "0" for r in jobs.records().values())
    assert_no_gpu_overlap(record_intervals(jobs.records()))


def test_cli_uses_only_the_listed_gpus_given_as_nvml_indices(tmp_path):
    jobs = JobFactory(tmp_path)
    script = write_fake_gpus(tmp_path / "fake.json", [{"used_mb": 0}, {"used_mb": 0}, {"used_mb": 0}])
    commands = write_commands(tmp_path / "cmds.txt", [jobs.command_line(f"g{i}", sleep_s=0.2) for i in range(4)])
    proc = subprocess.run(gputracker_cmd(commands, "--gpus", "0,2", "--poll_interval", "0.03", "--max_check", "1",
                                         "--lock_dir", tmp_path / "locks", "--log_dir", tmp_path / "logs"),
                          env=subprocess_env(script), capture_output=True, text=True, timeout=60)

    assert proc.returncode == 0, proc.stderr
    assert {r["cuda_visible_devices"] for r in jobs.records().values()} <= {"0", "2"}
    assert all(r["cuda_device_order"] == "PCI_BUS_ID" for r in jobs.records().values())
