"""Policy above the backends: what a task's ending means, whether to retry it, and the
watchdog that stops a worker which makes no progress.

Owns: `Policy` (retries, backoff, timeout, stall limit), `Outcome` (what the run achieved),
`classify` (an ending → done, interrupted, or a typed failure, from the result file,
`failures.jsonl`, the exit status and the backend's word), `Supervisor` (the hooks every
backend calls). Every backend gets the same policy: a backend only starts tasks and says
how they ended (`esd/backends/base.py`). Knows nothing about GPUs, Slurm or metrics.

Exit status of a worker: 0 done, 1 failed for good, 75 failed and a retry can help (the
worker's failure record says why). A worker that could not record its failure (killed,
timed out, crashed) gets its record written here.
"""
from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Sequence

from esd import diskfull
from esd.backends.base import Backend, Hooks, Task, TaskResult
from esd.failures import ESDFailure, FailureRecord, clear_failure, read_failures

EXIT_OK, EXIT_FAILED, EXIT_RETRYABLE = 0, 1, 75
EXIT_TIMEOUT = 124  # coreutils `timeout` (the Slurm script's limit of one attempt)
# Slurm endings that say the task was killed from outside (memory, node, preemption)
_KILLED_STATES = {"OUT_OF_MEMORY": "out of memory (Slurm OUT_OF_MEMORY)", "NODE_FAIL": "its node failed",
                  "PREEMPTED": "preempted", "BOOT_FAIL": "its node did not boot"}

log = logging.getLogger("esd_experiment")


@dataclass(frozen=True)
class Policy:
    max_retries: int = 2              # retries of a retryable failure
    retry_backoff_s: float = 10.0     # before the first retry, doubling
    timeout_s: float | None = None    # wall-clock limit of one attempt
    stall_timeout_s: float | None = 1800.0  # no output in the worker's log this long: stalled

    def retry_delay_s(self, attempt: int) -> float:
        return self.retry_backoff_s * 2 ** (attempt - 1)


@dataclass
class Outcome:
    succeeded: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)   # key -> "stage/reason"
    interrupted: bool = False
    followed: bool = True     # False: handed to a backend that does not wait (Slurm without --wait)


def _fresh_record(output_dir: Path, result: TaskResult) -> FailureRecord | None:
    """The worker's own failure record of this attempt (not one left by an earlier run)."""
    record = read_failures(output_dir).get(result.key)
    if record is None:
        return None
    if result.start_time is not None and record.time < result.start_time - 1:
        return None
    return record


def _result_is_new(result: TaskResult) -> bool:
    """The result file exists and this attempt stands behind it: it said so (exit 0), or the
    file was written after it started (killed between the rename and its exit)."""
    path = result.task.result_path
    try:
        written = path.stat().st_mtime
    except OSError:
        return False
    return result.returncode == EXIT_OK or (result.start_time is not None and written >= result.start_time - 1)


def classify(result: TaskResult, output_dir: Path, policy: Policy, stalled: bool = False):
    """("done", None), ("interrupted", None) or ("failed", ESDFailure | FailureRecord)."""
    if _result_is_new(result) and not stalled:
        return "done", None
    if result.interrupted:
        return "interrupted", None
    if stalled:
        return "failed", ESDFailure("worker", "stalled", f"no progress (nothing new in its log) for "
                                    f"{policy.stall_timeout_s:g}s (--stall_timeout); see {result.task.log_path}",
                                    retryable=False)
    if result.timed_out or result.returncode == EXIT_TIMEOUT or result.state == "TIMEOUT":
        limit = result.task.timeout_s
        said = f"exceeded --timeout {limit:g}s" if limit else "exceeded the Slurm time limit (--slurm_time)"
        return "failed", ESDFailure("worker", "timeout", said, retryable=False)
    record = _fresh_record(output_dir, result)
    if record is not None:
        return "failed", record
    if result.returncode == diskfull.EXIT_DISK_FULL or result.state == "DISK_FULL":
        return "failed", diskfull.disk_full_failure(result.task.log_path or output_dir, stage="worker")
    if result.returncode == EXIT_RETRYABLE:
        return "failed", ESDFailure("worker", "retryable_exit", "the worker exited with status 75 (a retry can "
                                    f"help) without a failure record; see {result.task.log_path}", retryable=True)
    if result.state in _KILLED_STATES:
        return "failed", ESDFailure("worker", "worker_killed", f"worker {_KILLED_STATES[result.state]}",
                                    retryable=True)
    if result.returncode is not None and result.returncode < 0 and not result.cancelled:
        return "failed", ESDFailure("worker", "worker_killed",
                                    f"worker killed by signal {-result.returncode} (out of host memory?)")
    if result.cancelled or result.state == "CANCELLED":
        return "failed", ESDFailure("worker", "cancelled", "the worker was cancelled (scancel?)", retryable=False)
    status = "an unknown status" if result.returncode is None else f"status {result.returncode}"
    return "failed", ESDFailure("worker", "worker_crashed", f"worker exited with {status} without a failure "
                                f"record; see {result.task.log_path}", retryable=False)


class Supervisor:
    """Runs tasks on a backend under one policy; `run` returns the `Outcome`.

    The hooks are called by the backend: `on_start`/`on_end` from its loop, `on_tick` maybe
    from another thread (hence the lock).
    """

    def __init__(self, backend: Backend, output_dir: Path, policy: Policy, progress=None,
                 tick_interval_s: float = 5.0):
        self.backend, self.output_dir, self.policy = backend, Path(output_dir), policy
        self.progress = progress
        self.tick_interval_s = tick_interval_s
        self.outcome = Outcome()
        self._lock = threading.Lock()
        self._running: dict[str, tuple[Task, float]] = {}   # key -> (task, start time)
        self._stalled: set[str] = set()

    def tasks_for(self, tasks: Sequence[Task]) -> list[Task]:
        return [replace(t, timeout_s=self.policy.timeout_s) for t in tasks]

    def run(self, tasks: Sequence[Task]) -> Outcome:
        hooks = Hooks(on_start=self.on_start, on_end=self.on_end, on_tick=self.on_tick,
                      tick_interval_s=self.tick_interval_s)
        self.backend.run(self.tasks_for(tasks), hooks)
        self.outcome.followed = self.backend.waits
        return self.outcome

    def running_tasks(self) -> list[tuple[str, float, Path | None]]:
        """(key, start time, worker log) of each running task; safe from any thread (progress)."""
        with self._lock:
            return [(key, started, task.log_path) for key, (task, started) in self._running.items()]

    # ------------------------------------------------------------------ the hooks
    def on_start(self, task: Task, when: float) -> None:
        with self._lock:
            self._running[task.key] = (task, when)

    def on_tick(self) -> None:
        """The watchdog: a running task whose log has not grown for `stall_timeout_s` is stopped."""
        limit = self.policy.stall_timeout_s
        if not limit:
            return
        now = time.time()
        with self._lock:
            running = [(key, task, started) for key, (task, started) in self._running.items()
                       if key not in self._stalled]
        for key, task, started in running:
            last = max(started, _mtime(task.log_path))
            if now - last > limit:
                log.warning("stalled %s: nothing new in %s for %.0fs; stopping it", key, task.log_path, now - last)
                with self._lock:
                    self._stalled.add(key)
                self.backend.cancel(key)

    def on_end(self, result: TaskResult) -> list[Task]:
        with self._lock:
            self._running.pop(result.key, None)
            stalled = result.key in self._stalled
            self._stalled.discard(result.key)
        kind, failure = classify(result, self.output_dir, self.policy, stalled)
        took = (result.end_time or time.time()) - (result.start_time or time.time())
        if kind == "interrupted":
            self.outcome.interrupted = True
            return []
        if kind == "done":
            clear_failure(self.output_dir, result.key)  # a done model is never listed as failed
            self.outcome.succeeded.append(result.key)
            log.info("done    %s (%.0fs)", result.key, took)
            self._progress(True)
            return []
        if isinstance(failure, ESDFailure):
            failure = diskfull.record_or_remember(self.output_dir, result.key, failure)  # full disk: kept in memory
        attempt = result.task.attempt
        if failure.retryable and attempt <= self.policy.max_retries:
            delay = self.policy.retry_delay_s(attempt)
            log.warning("retry   %s in %.0fs (attempt %d of %d): %s/%s: %s", result.key, delay, attempt + 1,
                        self.policy.max_retries + 1, failure.stage, failure.reason, failure.message)
            return [replace(result.task, attempt=attempt + 1, delay_s=delay)]
        self.outcome.failed[result.key] = f"{failure.stage}/{failure.reason}"
        log.warning("FAILED  %s: %s/%s: %s", result.key, failure.stage, failure.reason, failure.message)
        self._progress(False)
        return []

    def _progress(self, ok: bool) -> None:
        if self.progress is not None:
            self.progress.update(ok)


def _mtime(path: Path | None) -> float:
    try:
        return path.stat().st_mtime if path is not None else 0.0
    except OSError:
        return 0.0
