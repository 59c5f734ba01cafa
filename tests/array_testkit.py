"""A test scheduler for the array backend's hooks (`esd.backends.array.Scheduler`): each
array task is a local bash process running the rendered script with its task index, as a
batch scheduler would on a node. It is a second, real implementation of the hooks beside
Slurm (its processes, exit statuses and signals are real); what it has no need of (queues,
nodes) it does not pretend to have. Also the module a test's backend-table row names
(`from_config`), and `TASK_SCRIPT`, a stand-in worker with the worker's manifest entry point.
"""
from __future__ import annotations

import itertools
import os
import shlex
import signal
import subprocess
import textwrap
from pathlib import Path
from typing import Sequence

from esd.backends.array import ArrayBackend, ArrayJob, Scheduler, TaskState
from esd.backends.base import Ending

# A stand-in for esd_worker.py: reads its manifest row, writes its output to the row's log,
# and behaves as its argv says.
TASK_SCRIPT = textwrap.dedent("""\
    import argparse, json, os, sys, time
    parser = argparse.ArgumentParser()
    parser.add_argument("--manifest", required=True)
    parser.add_argument("--task_index", type=int, required=True)
    args = parser.parse_args()
    row = json.load(open(args.manifest))["tasks"][args.task_index]
    argv = row["argv"]
    def value(flag):
        return argv[argv.index(flag) + 1]
    if row["log_path"]:
        os.makedirs(os.path.dirname(row["log_path"]), exist_ok=True)
        sys.stdout = open(row["log_path"], "a", buffering=1)
    print("task", args.task_index, row["key"], "argv", argv, flush=True)
    if "--wait_for" in argv:   # end only once another task's result exists (bounded)
        for _ in range(int(float(value("--wait_bound")) * 10)):
            if os.path.exists(value("--wait_for")):
                print("saw", value("--wait_for"), flush=True)
                break
            time.sleep(0.1)
        else:
            sys.exit(3)
    if "--sleep" in argv:
        time.sleep(float(value("--sleep")))
    if "--fail" in argv:
        sys.exit(3)
    if "--fail_first" in argv:  # exit 75 (retryable) until the Nth attempt
        counter = row["result_path"] + ".attempts"
        n = int(open(counter).read()) + 1 if os.path.exists(counter) else 1
        open(counter, "w").write(str(n))
        if n <= int(value("--fail_first")):
            sys.exit(75)
    tmp = row["result_path"] + ".tmp"
    with open(tmp, "w") as handle:
        json.dump({"argv": argv, "task_id": os.environ.get("TEST_ARRAY_TASK_ID")}, handle)
    os.replace(tmp, row["result_path"])
    """)


class LocalProcessScheduler(Scheduler):
    """Array task i = `bash <script>` with TEST_ARRAY_TASK_ID=i, in its own session."""
    name = "testsched"
    script_name = "job.sh"

    def __init__(self):
        self.jobs: dict[str, list[subprocess.Popen]] = {}
        self.submitted: list[ArrayJob] = []
        self.cancelled: set[tuple[str, int]] = set()
        self._ids = itertools.count(100)

    def render(self, job: ArrayJob) -> str:
        q = shlex.quote
        run = (f"{q(job.python)} {q(str(job.worker_script))} --manifest {q(str(job.manifest_path))} "
               f'--task_index "$TEST_ARRAY_TASK_ID"')
        if job.timeout_s:
            run = f"timeout {job.timeout_s:g} {run}"
        return "\n".join(["#!/bin/bash", f"# {len(job.tasks)} task(s)",
                          f"sleep {job.delay_s:g}" if job.delay_s else "", f"exec {run}", ""])

    def submit_command(self, job: ArrayJob) -> list[str]:
        return ["bash", str(job.script_path)]

    def submit(self, job: ArrayJob) -> str:
        job_id = str(next(self._ids))
        procs = []
        for i in range(len(job.tasks)):
            with open(job.log_dir / f"{job_id}_{i}.log", "wb") as log:
                procs.append(subprocess.Popen(["bash", str(job.script_path)], cwd=job.workdir, stdout=log,
                                              stderr=subprocess.STDOUT, start_new_session=True,
                                              env={**os.environ, "TEST_ARRAY_TASK_ID": str(i)}))
        self.jobs[job_id] = procs
        self.submitted.append(job)
        return job_id

    def poll(self, job_ids: Sequence[str]) -> dict[tuple[str, int], TaskState]:
        found = {}
        for job_id in job_ids:
            for i, proc in enumerate(self.jobs.get(job_id, ())):
                code = proc.poll()
                if code is None:
                    found[(job_id, i)] = TaskState(running=True, word="running")
                elif (job_id, i) in self.cancelled:
                    found[(job_id, i)] = TaskState(ending=Ending.CANCELLED, returncode=code, word="cancelled")
                else:
                    found[(job_id, i)] = TaskState(ending=ending_of(code), returncode=code, word=f"exit {code}")
        return found

    def cancel(self, job_id: str, index: int) -> None:
        proc = self.jobs[job_id][index]
        if proc.poll() is None:
            self.cancelled.add((job_id, index))
            os.killpg(proc.pid, signal.SIGTERM)

    def follow_command(self, job_ids: Sequence[str]) -> str:
        return "ps -s " + ",".join(str(p.pid) for j in job_ids for p in self.jobs.get(j, ()))

    def cancel_command(self, job_ids: Sequence[str]) -> str:
        return "kill -- " + " ".join(f"-{p.pid}" for j in job_ids for p in self.jobs.get(j, ()))

    def stop_all(self) -> None:
        for procs in self.jobs.values():
            for proc in procs:
                if proc.poll() is None:
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()


def ending_of(code: int) -> Ending:
    """This scheduler's words (a bash exit status) in the closed set of endings."""
    if code == 0:
        return Ending.SUCCEEDED
    if code == 124:          # coreutils `timeout` in the script
        return Ending.TIMED_OUT
    return Ending.FAILED


def from_config(config, worker_script: Path) -> ArrayBackend:
    """The construction a backend-table row names: `--backend testsched`."""
    return ArrayBackend(LocalProcessScheduler(), config.output_dir, wait=True, worker_script=worker_script,
                        poll_interval_s=0.1, log=lambda line: None)
