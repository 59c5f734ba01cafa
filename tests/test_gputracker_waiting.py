"""Dispatcher.waiting_reasons: why queued jobs wait, read from another thread while real
subprocess jobs run on fake GPUs (tests/fake_nvml, a fake of pynvml's own API)."""
from __future__ import annotations

import threading
import time

import pytest

from gputracker_testkit import JobFactory, load_fake_pynvml, write_fake_gpus

from gputracker import Dispatcher, Job


def sample_reasons(dispatcher, jobs, interval_s=0.02) -> list[list[str]]:
    """Run `jobs`, sampling waiting_reasons() from a second thread; the samples in order."""
    samples, done = [], threading.Event()

    def sampler():
        while not done.is_set():
            samples.append(dispatcher.waiting_reasons())
            time.sleep(interval_s)

    thread = threading.Thread(target=sampler)
    thread.start()
    try:
        dispatcher.run(jobs)
    finally:
        done.set()
        thread.join()
    samples.append(dispatcher.waiting_reasons())
    return samples


@pytest.fixture
def factory(tmp_path):
    return JobFactory(tmp_path)


def test_busy_gpu_and_counting_free_polls_are_named(monkeypatch, tmp_path, factory):
    script = write_fake_gpus(tmp_path / "gpus.json", [{"used_mb": 30000}, {"used_mb": 0}])
    load_fake_pynvml(monkeypatch, script)
    with Dispatcher(max_check=5, poll_interval_s=0.1, lock_dir=tmp_path / "locks") as dispatcher:
        jobs = [Job(f"j{i}", factory.argv(f"j{i}", sleep_s=0.6), None) for i in range(2)]
        samples = sample_reasons(dispatcher, jobs)
    seen = {line for sample in samples for line in sample}
    assert "GPU 0: 30000 MB used > 500 MB threshold" in seen
    counting = {line for line in seen if line.startswith("GPU 1:") and "free polls" in line}
    assert counting and all(line.endswith("/5 free polls") for line in counting)
    assert "GPU 1: running j0" in seen          # j1 waits while j0 holds the only free GPU
    assert samples[-1] == []                     # nothing waits once the queue is empty


def test_cpu_slots_and_retry_backoff_are_named(tmp_path, factory):
    with Dispatcher(gpus=[], cpu_slots=1) as dispatcher:
        later = time.monotonic() + 0.8
        jobs = [Job("a", factory.argv("a", sleep_s=0.4), None), Job("b", factory.argv("b"), None),
                Job("c", factory.argv("c"), None, not_before=later)]
        samples = sample_reasons(dispatcher, jobs)
    seen = {line for sample in samples for line in sample}
    assert "1 queued: all 1 CPU slot(s) busy" in seen
    assert any(line.startswith("c: retry in ") and line.endswith(" s") for line in seen)


def test_unreadable_gpu_is_named(monkeypatch, tmp_path, factory):
    script = write_fake_gpus(tmp_path / "gpus.json", [{"used_mb": "raise"}, {"used_mb": 0}])
    load_fake_pynvml(monkeypatch, script)
    with Dispatcher(max_check=2, poll_interval_s=0.1, lock_dir=tmp_path / "locks") as dispatcher:
        samples = sample_reasons(dispatcher, [Job("j", factory.argv("j", sleep_s=0.2), None)])
    assert "GPU 0: memory cannot be read (NVML error)" in {l for s in samples for l in s}
