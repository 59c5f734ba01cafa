"""Dispatcher behaviour with real subprocess jobs on scripted fake GPUs (in-process API)."""
from __future__ import annotations

import logging
import os
import signal
import sys
import threading
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gputracker_testkit import (  # noqa: E402
    JobFactory, assert_no_gpu_overlap, gpus_of, load_fake_pynvml, max_concurrency, process_is_running,
    record_intervals, result_intervals, wait_until, write_fake_gpus,
)

from gputracker import Dispatcher, Job, JobResult, install_signal_handlers  # noqa: E402

POLL_S = 0.05


@pytest.fixture
def jobs(tmp_path) -> JobFactory:
    return JobFactory(tmp_path)


@pytest.fixture
def fake_gpus(tmp_path, monkeypatch):
    """``fake_gpus([{...}, ...])`` scripts the GPUs NVML sees, in this process."""
    script = tmp_path / "fake_nvml.json"

    def make(gpus, **top):
        write_fake_gpus(script, gpus, **top)
        load_fake_pynvml(monkeypatch, script)
        return script

    return make


def make_dispatcher(tmp_path, **kwargs) -> Dispatcher:
    kwargs.setdefault("poll_interval_s", POLL_S)
    kwargs.setdefault("max_check", 3)
    kwargs.setdefault("kill_grace_s", 1.0)
    kwargs.setdefault("lock_dir", tmp_path / "locks")
    return Dispatcher(**kwargs)


def recording_jobs(jobs: JobFactory, tmp_path, count, **kwargs) -> list[Job]:
    return [Job(f"j{i}", jobs.argv(f"j{i}", **kwargs), tmp_path / "logs" / f"j{i}.log") for i in range(count)]


def test_jobs_still_loading_with_low_memory_are_never_double_booked(tmp_path, jobs, fake_gpus):
    fake_gpus([{"used_mb": 0}, {"used_mb": 0}])  # jobs never raise the memory: as if still loading
    d = make_dispatcher(tmp_path)
    results = d.run(recording_jobs(jobs, tmp_path, 6, sleep_s=0.3))

    assert [r.returncode for r in results] == [0] * 6
    assert_no_gpu_overlap(result_intervals(results))
    assert_no_gpu_overlap(record_intervals(jobs.records()))
    assert max_concurrency(result_intervals(results)) <= 2
    assert {g for r in results for g in r.gpus} == {0, 1}
    for r in results:  # the job saw exactly the GPUs the dispatcher says it gave
        record = jobs.records()[r.job_id]
        assert gpus_of(record) == r.gpus
        assert record["cuda_device_order"] == "PCI_BUS_ID"


def test_gpu_used_by_another_user_is_skipped_until_free_and_one_that_never_frees_gets_no_job(
        tmp_path, jobs, fake_gpus):
    script = fake_gpus([
        {"used_mb": [[0, 9000], [1.0, 100]]},  # another user's job until t=1 s, then idle
        {"used_mb": 30000},                    # busy for the whole run
        {"used_mb": 0},
    ])
    d = make_dispatcher(tmp_path, memory_threshold_mb=500)
    results = d.run(recording_jobs(jobs, tmp_path, 6, sleep_s=0.3))
    t0 = __import__("json").loads(script.read_text())["t0"]

    assert all(r.succeeded for r in results)
    assert not any(1 in r.gpus for r in results), "a job landed on the GPU that never freed"
    on_gpu0 = [r for r in results if 0 in r.gpus]
    assert on_gpu0, "GPU 0 was never used after it was freed"
    assert all(r.start_time >= t0 + 1.0 for r in on_gpu0), "GPU 0 was used while another user had it"
    assert_no_gpu_overlap(result_intervals(results))


def test_nvml_errors_mid_run_skip_that_gpu_for_the_poll_and_the_loop_goes_on(tmp_path, jobs, fake_gpus, caplog):
    script = fake_gpus([
        {"used_mb": [[0, 0], [0.5, "raise"], [1.5, 0]]},
        {"used_mb": [[0, 0], [0.5, "raise:GPU_IS_LOST"], [1.2, 0]]},
    ])
    t0 = __import__("json").loads(script.read_text())["t0"]
    caplog.set_level(logging.INFO, logger="gputracker")
    d = make_dispatcher(tmp_path)
    results = d.run(recording_jobs(jobs, tmp_path, 8, sleep_s=0.2))

    assert all(r.succeeded for r in results)
    margin_s = 0.05  # a read just before the error window may launch just after it starts
    for r in results:
        if 0 in r.gpus:
            assert not (t0 + 0.5 + margin_s < r.start_time < t0 + 1.5), f"{r.job_id} launched on GPU 0 while NVML failed"
        if 1 in r.gpus:
            assert not (t0 + 0.5 + margin_s < r.start_time < t0 + 1.2), f"{r.job_id} launched on GPU 1 while lost"
    unreadable = [m for m in caplog.messages if "not readable" in m]
    assert 1 <= len(unreadable) <= 4, "each failing GPU is logged when it fails, not on every poll"
    assert any("readable again" in m for m in caplog.messages)


def test_multi_gpu_jobs_get_all_their_gpus_at_once_and_never_share(tmp_path, jobs, fake_gpus):
    fake_gpus([{"used_mb": 0}, {"used_mb": 0}, {"used_mb": 0}, {"used_mb": 8000}])  # GPU 3 busy
    d = make_dispatcher(tmp_path, num_gpus_per_job=2)
    results = d.run(recording_jobs(jobs, tmp_path, 3, sleep_s=0.3))

    assert all(r.succeeded for r in results)
    for r in results:
        assert len(r.gpus) == 2 and 3 not in r.gpus
        assert gpus_of(jobs.records()[r.job_id]) == r.gpus
    # three free GPUs hold one pair at a time: the third is never held alone
    assert max_concurrency(result_intervals(results)) == 1
    assert_no_gpu_overlap(record_intervals(jobs.records()))


def test_exit_codes_are_preserved_and_signals_give_negative_codes(tmp_path, jobs, fake_gpus):
    fake_gpus([{"used_mb": 0}])
    d = make_dispatcher(tmp_path, max_check=1)
    specs = {"ok": "0", "three": "3", "killed": "self-kill"}
    batch = [Job(name, jobs.argv(name, sleep_s=0, exit_code=code), tmp_path / f"{name}.log") for name, code in specs.items()]
    batch.append(Job("missing", ["/nonexistent/program"], tmp_path / "missing.log"))
    results = {r.job_id: r for r in d.run(batch)}

    assert results["ok"].returncode == 0 and results["ok"].succeeded
    assert results["three"].returncode == 3 and not results["three"].succeeded
    assert results["killed"].returncode == -signal.SIGKILL
    assert results["missing"].returncode is None and not results["missing"].succeeded
    assert "launch failed" in (tmp_path / "missing.log").read_text()
    m = d.metrics()
    assert (m["jobs"], m["succeeded"], m["failed"]) == (4, 1, 3)


def test_timeout_terminates_the_jobs_whole_process_group(tmp_path, jobs, fake_gpus):
    fake_gpus([{"used_mb": 0}])
    d = make_dispatcher(tmp_path, max_check=1, kill_grace_s=1.0)
    job = Job("slow", jobs.argv("slow", sleep_s=60, grandchild=True), tmp_path / "slow.log", timeout_s=0.5)
    started = time.monotonic()
    [result] = d.run([job])

    assert time.monotonic() - started < 20
    assert result.timed_out and not result.succeeded
    assert result.returncode == -signal.SIGTERM
    record = jobs.records()["slow"]
    assert wait_until(lambda: not process_is_running(record["grandchild_pid"]), 10)
    assert d.metrics()["timed_out"] == 1


def test_processes_a_finished_job_leaves_behind_are_terminated_before_its_gpu_is_reused(tmp_path, jobs, fake_gpus):
    fake_gpus([{"used_mb": 0}])
    d = make_dispatcher(tmp_path, max_check=1, kill_grace_s=1.0)
    results = d.run([Job("leaver", jobs.argv("leaver", sleep_s=0, grandchild=True), tmp_path / "a.log"),
                     Job("next", jobs.argv("next", sleep_s=0), tmp_path / "b.log")])
    records = jobs.records()

    assert [r.returncode for r in results] == [0, 0]
    assert not process_is_running(records["leaver"]["grandchild_pid"])
    assert records["next"]["start"] > records["leaver"]["end"]


def test_first_job_on_idle_gpu_waits_about_max_check_polls_and_a_released_gpu_is_regranted_at_once(
        tmp_path, jobs, fake_gpus):
    fake_gpus([{"used_mb": 0}])
    poll_s, max_check = 0.1, 10  # earning a grant takes ~1 s; re-grant must not
    d = make_dispatcher(tmp_path, poll_interval_s=poll_s, max_check=max_check)
    results = d.run(recording_jobs(jobs, tmp_path, 4, sleep_s=0.05))

    first = results[0]
    assert (max_check - 1) * poll_s * 0.9 <= first.wait_s < 10.0
    gaps_s = [b.start_time - a.end_time for a, b in zip(results, results[1:])]
    assert max(gaps_s) < 0.5 * max_check * poll_s, f"released GPU waited {gaps_s} s before re-grant"
    assert d.metrics()["gpu_regrant_latency_s"]["count"] == 3


def test_released_gpu_taken_by_someone_else_meanwhile_is_not_regranted(tmp_path, jobs, fake_gpus):
    # another user grabs GPU 0 at t=0.6 s, while our first job (1 s) still runs there
    fake_gpus([{"used_mb": [[0, 0], [0.6, 9000], [3.0, 0]]}, {"used_mb": 20000}])
    d = make_dispatcher(tmp_path, max_check=3)
    results = d.run([Job("first", jobs.argv("first", sleep_s=1.0), tmp_path / "1.log"),
                     Job("second", jobs.argv("second", sleep_s=0), tmp_path / "2.log")])
    import json
    t0 = json.loads((tmp_path / "fake_nvml.json").read_text())["t0"]

    assert [r.gpus for r in results] == [(0,), (0,)]
    assert results[1].start_time >= t0 + 3.0, "GPU 0 was re-granted while another user held it"


def test_cpu_mode_without_nvml_logs_once_and_runs_jobs_with_empty_cuda_visible_devices(
        tmp_path, jobs, monkeypatch, caplog):
    load_fake_pynvml(monkeypatch, None)  # no FAKE_NVML_SCRIPT: like a machine without libnvidia-ml
    caplog.set_level(logging.INFO, logger="gputracker")
    d = make_dispatcher(tmp_path, gpus=None, cpu_slots=2)
    results = d.run(recording_jobs(jobs, tmp_path, 4, sleep_s=0.3))

    assert d.mode == "cpu"
    nvml_messages = [m for m in caplog.messages if "CPU mode" in m]
    assert len(nvml_messages) == 1 and "NVML Shared Library Not Found" in nvml_messages[0]
    assert all(r.succeeded and r.gpus == () for r in results)
    assert all(rec["cuda_visible_devices"] == "" for rec in jobs.records().values())
    assert max_concurrency(result_intervals(results)) <= 2
    assert d.metrics()["mode"] == "cpu"


def test_explicit_empty_gpu_list_is_cpu_mode_even_with_gpus_present(tmp_path, fake_gpus):
    fake_gpus([{"used_mb": 0}])
    assert make_dispatcher(tmp_path, gpus=[]).mode == "cpu"


def test_unknown_gpu_index_is_rejected_with_the_indices_nvml_sees(tmp_path, fake_gpus):
    fake_gpus([{"used_mb": 0}, {"used_mb": 0}])
    with pytest.raises(ValueError, match=r"\[5\].*0\.\.1"):
        make_dispatcher(tmp_path, gpus=[0, 5])


def test_on_job_end_can_resubmit_a_failed_job_with_backoff(tmp_path, jobs, fake_gpus):
    fake_gpus([{"used_mb": 0}])
    started, attempts = [], []
    flaky = tmp_path / "flaky.py"
    flaky.write_text(f"import os, sys\nmarker = {str(tmp_path / 'tried')!r}\n"
                     "if os.path.exists(marker): sys.exit(0)\nopen(marker, 'w').close(); sys.exit(7)\n")

    def on_end(result: JobResult):
        attempts.append(result)
        if result.returncode != 0:
            d.submit(Job(result.job_id, result.argv, result.log_path, not_before=time.monotonic() + 0.3))

    d = make_dispatcher(tmp_path, max_check=1, on_job_start=started.append, on_job_end=on_end)
    results = d.run([Job("flaky", [sys.executable, str(flaky)], tmp_path / "flaky.log")])

    assert [r.returncode for r in results] == [7, 0]
    assert results[1].start_time - results[0].end_time >= 0.25  # not_before respected
    assert len(started) == 2 and len(attempts) == 2
    assert (tmp_path / "flaky.log").read_text().count("[gputracker") == 2  # log appended, not truncated


def test_child_env_is_a_copy_with_job_env_and_parent_environ_is_untouched(tmp_path, jobs, fake_gpus):
    fake_gpus([{"used_mb": 0}, {"used_mb": 0}])
    before = dict(os.environ)
    d = make_dispatcher(tmp_path, max_check=1)
    d.run([Job("e", jobs.argv("e", sleep_s=0), tmp_path / "e.log", env={"GT_EXTRA": "yes"})])

    record = jobs.records()["e"]
    assert record["extra_env"] == "yes" and record["cuda_device_order"] == "PCI_BUS_ID"
    assert dict(os.environ) == before


def test_request_stop_from_another_thread_terminates_running_jobs_and_reports_queued_ones(
        tmp_path, jobs, fake_gpus):
    fake_gpus([{"used_mb": 0}])
    d = make_dispatcher(tmp_path, max_check=1, kill_grace_s=1.0)
    batch = [Job(f"s{i}", jobs.argv(f"s{i}", sleep_s=60, grandchild=True), tmp_path / f"s{i}.log") for i in range(2)]
    threading.Thread(target=lambda: wait_until(lambda: "s0" in jobs.records(), 20) and d.request_stop()).start()
    results = {r.job_id: r for r in d.run(batch)}

    assert results["s0"].interrupted and results["s0"].returncode == -signal.SIGTERM
    assert results["s1"].interrupted and results["s1"].returncode is None and results["s1"].start_time is None
    rec = jobs.records()["s0"]
    assert wait_until(lambda: not process_is_running(rec["pid"]) and not process_is_running(rec["grandchild_pid"]), 10)


def test_install_signal_handlers_turns_sigint_into_a_graceful_stop_and_restores_handlers(tmp_path, jobs, fake_gpus):
    fake_gpus([{"used_mb": 0}])
    d = make_dispatcher(tmp_path, max_check=1, kill_grace_s=1.0)
    previous = signal.getsignal(signal.SIGINT)
    threading.Thread(target=lambda: wait_until(lambda: "k" in jobs.records(), 20)
                     and os.kill(os.getpid(), signal.SIGINT)).start()
    with install_signal_handlers(d) as received:
        [result] = d.run([Job("k", jobs.argv("k", sleep_s=60), tmp_path / "k.log")])

    assert received == [signal.SIGINT]
    assert result.interrupted
    assert signal.getsignal(signal.SIGINT) is previous


def test_metrics_file_is_written_atomically_with_counts_waits_and_per_gpu_jobs(tmp_path, jobs, fake_gpus):
    import json
    fake_gpus([{"used_mb": 0}, {"used_mb": 0}])
    d = make_dispatcher(tmp_path, max_check=1)
    d.run(recording_jobs(jobs, tmp_path, 3, sleep_s=0))
    path = d.write_metrics(tmp_path / "out" / "gpu_metrics.json")

    m = json.loads(path.read_text())
    assert (m["jobs"], m["succeeded"], m["failed"], m["timed_out"]) == (3, 3, 0, 0)
    assert sum(m["jobs_per_gpu"].values()) == 3 and set(m["jobs_per_gpu"]) == {"0", "1"}
    assert m["gpu_wait_s"]["max"] >= m["gpu_wait_s"]["mean"] >= 0
    assert len(m["per_job"]) == 3 and m["total_runtime_s"] > 0
    assert [p.name for p in path.parent.iterdir()] == ["gpu_metrics.json"]  # no temp file left


def test_submit_rejects_a_command_string_because_no_shell_is_used(tmp_path, fake_gpus):
    fake_gpus([{"used_mb": 0}])
    d = make_dispatcher(tmp_path)
    with pytest.raises(TypeError, match="shlex.split"):
        d.submit(Job("s", "python -c pass", tmp_path / "s.log"))


def test_a_job_whose_inputs_are_not_ready_waits_in_the_queue_and_starts_once_woken(tmp_path, jobs, fake_gpus):
    fake_gpus([{"used_mb": 0}])
    inputs = threading.Event()
    d = make_dispatcher(tmp_path, max_check=1, poll_interval_s=30.0)   # no poll wakes it: only `wake`
    opened = []

    def open_inputs():
        time.sleep(0.5)
        assert "gated" not in jobs.records()        # not launched while its inputs are missing
        assert "1 waiting for their inputs" in d.waiting_reasons()
        opened.append(time.time())
        inputs.set()
        d.wake()

    threading.Thread(target=open_inputs).start()
    results = d.run([Job("gated", jobs.argv("gated", sleep_s=0), tmp_path / "g.log", ready=inputs.is_set)])

    assert [r.returncode for r in results] == [0]
    assert results[0].start_time >= opened[0]


def test_a_withdrawn_queued_job_ends_with_the_given_status_and_never_runs(tmp_path, jobs, fake_gpus):
    fake_gpus([{"used_mb": 0}])
    ended = []
    d = make_dispatcher(tmp_path, max_check=1, on_job_end=ended.append)
    never = threading.Event()
    threading.Thread(target=lambda: (time.sleep(0.3), d.withdraw("w", 75, 1.0, 2.0))).start()
    results = d.run([Job("w", jobs.argv("w", sleep_s=0), tmp_path / "w.log", ready=never.is_set),
                     Job("x", jobs.argv("x", sleep_s=0), tmp_path / "x.log")])

    by_id = {r.job_id: r for r in results}
    assert by_id["w"].returncode == 75 and (by_id["w"].start_time, by_id["w"].end_time) == (1.0, 2.0)
    assert not by_id["w"].interrupted and "w" not in jobs.records()
    assert by_id["x"].returncode == 0 and [r.job_id for r in ended] == [r.job_id for r in results]
