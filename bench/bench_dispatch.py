"""Benchmark of the gputracker dispatcher on fake GPUs (no GPU needed).

    python bench/bench_dispatch.py [--jobs 200] [--gpus 4] [--poll 0.05]

Phase A -- throughput: ``--jobs`` trivial jobs (``true``, run without a shell) on ``--gpus``
idle fake GPUs. Reported:
  * overhead per job = (wall time from the first launch to the end of the run
    - sum of job runtimes / number of GPUs) / jobs. A job's runtime is the dispatcher's
    start_time (just before fork/exec) to its end_time (reaped through a pidfd), so the cost of
    fork/exec counts as job time; everything else -- reaping, releasing the claim, the
    confirming NVML read, re-granting, opening the log -- is overhead.
  * dispatcher CPU per job: CPU time of the dispatching thread (including fork/exec) / jobs.
  * re-grant latency: per GPU, from one job's end to the next launch on it (mean/p95/max).
Phase B -- scripted release: every GPU is busy (9000 MB) until t=0.5 s, then free. Latency =
launch time of the first job on each GPU - 0.5 s, with max_check=1 (a GPU must be seen free
once) and max_check=3, against the poll interval.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import logging
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))


def load_fake_pynvml():
    spec = importlib.util.spec_from_file_location("pynvml", REPO_ROOT / "tests" / "fake_nvml" / "pynvml.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    sys.modules["pynvml"] = module


def write_script(path: Path, gpus: list[dict]) -> float:
    t0 = time.time()
    path.write_text(json.dumps({"t0": t0, "gpus": gpus}))
    os.environ["FAKE_NVML_SCRIPT"] = str(path)
    return t0


def stats(values):
    if not values:
        return "n=0"
    ordered = sorted(values)
    p95 = ordered[min(len(ordered) - 1, int(round(0.95 * (len(ordered) - 1))))]
    return (f"mean {1000 * sum(values) / len(values):7.1f} ms  p95 {1000 * p95:7.1f} ms  "
            f"max {1000 * ordered[-1]:7.1f} ms  (n={len(values)})")


def regrant_gaps(results):
    by_gpu = {}
    for r in results:
        for g in r.gpus:
            by_gpu.setdefault(g, []).append(r)
    gaps = []
    for runs in by_gpu.values():
        runs.sort(key=lambda r: r.start_time)
        gaps += [b.start_time - a.end_time for a, b in zip(runs, runs[1:])]
    return gaps


def phase_throughput(work: Path, n_jobs: int, n_gpus: int, poll_s: float, max_check: int):
    from gputracker import Dispatcher, Job

    write_script(work / "idle.json", [{"used_mb": 0} for _ in range(n_gpus)])
    true_path = shutil.which("true") or "/bin/true"
    jobs = [Job(f"job_{i:04d}", [true_path], work / "logs" / f"job_{i:04d}.log") for i in range(n_jobs)]
    d = Dispatcher(poll_interval_s=poll_s, max_check=max_check, lock_dir=work / "locks")
    cpu0 = time.thread_time()
    wall0 = time.monotonic()
    results = d.run(jobs)
    wall_s = time.monotonic() - wall0
    cpu_s = time.thread_time() - cpu0
    assert all(r.succeeded for r in results), "a trivial job failed"
    first_launch = min(r.start_time for r in results)
    last_end = max(r.end_time for r in results)
    busy_s = sum(r.runtime_s for r in results)
    overhead_s = ((last_end - first_launch) - busy_s / n_gpus) / n_jobs
    print(f"Phase A: {n_jobs} x `true` on {n_gpus} fake GPUs, poll {poll_s} s, max_check {max_check}")
    print(f"  wall time                 {wall_s:7.2f} s  (first launch after {min(r.wait_s for r in results):.2f} s)")
    print(f"  mean job runtime          {1000 * busy_s / n_jobs:7.1f} ms  (fork/exec of `true` + reaping)")
    print(f"  overhead per job          {1000 * overhead_s:7.1f} ms")
    print(f"  dispatcher CPU per job    {1000 * cpu_s / n_jobs:7.1f} ms")
    print(f"  re-grant latency          {stats(regrant_gaps(results))}  (2 polls = {2 * poll_s * 1000:.0f} ms)")
    print(f"  jobs per GPU              {d.metrics()['jobs_per_gpu']}")
    d.close()


def phase_release(work: Path, n_gpus: int, poll_s: float, max_check: int):
    from gputracker import Dispatcher, Job

    release_after_s = 0.5
    t0 = write_script(work / f"release{max_check}.json",
                      [{"used_mb": [[0, 9000], [release_after_s, 0]]} for _ in range(n_gpus)])
    jobs = [Job(f"r{i}", ["sleep", "0.3"], None) for i in range(n_gpus)]
    d = Dispatcher(poll_interval_s=poll_s, max_check=max_check, lock_dir=work / "locks")
    results = d.run(jobs)
    latencies = [r.start_time - (t0 + release_after_s) for r in results]
    print(f"Phase B: {n_gpus} GPUs released at t={release_after_s} s, max_check {max_check}: "
          f"release-to-launch {stats(latencies)}  (max_check x poll = {1000 * max_check * poll_s:.0f} ms)")
    d.close()


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--jobs", type=int, default=200)
    parser.add_argument("--gpus", type=int, default=4)
    parser.add_argument("--poll", type=float, default=0.05)
    parser.add_argument("--max_check", "--max-check", type=int, default=3)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    load_fake_pynvml()
    with tempfile.TemporaryDirectory(prefix="gputracker-bench-") as tmp:
        work = Path(tmp)
        phase_throughput(work, args.jobs, args.gpus, args.poll, args.max_check)
        phase_release(work, args.gpus, args.poll, 1)
        phase_release(work, args.gpus, args.poll, args.max_check)


if __name__ == "__main__":
    from _report import figures_to_docs   # bench/ is sys.path[0] when run as a script
    with figures_to_docs(__file__, __doc__):
        main()
