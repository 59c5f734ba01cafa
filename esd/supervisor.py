"""Policy above the backends: what a task's ending means, whether to retry it, and the
watchdog that stops a worker which makes no progress.

Owns: `Policy` (retries, backoff, timeout, stall limit), `Outcome` (what the run achieved),
`classify` (an ending → done, interrupted, or a typed failure, from the result file,
`failures.jsonl`, the exit status and the `Ending` kind), `Supervisor` (the hooks every
backend calls), and the stall watchdog, which counts a worker's progress lines
(`esd.progress.PROGRESS_LINE`) and nothing else. Every backend gets the same policy: a backend only starts tasks and says how they ended, in the closed set of
`esd.backends.base.Ending` kinds. Knows nothing about GPUs, Slurm or metrics, and reads no
scheduler's words (a backend's own word only travels into messages).

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
from esd.backends.base import Backend, Ending, Hooks, Task, TaskResult
from esd.failures import ESDFailure, FailureRecord, clear_failure, read_failures
from esd.progress import PROGRESS_LINE, slot_times   # what a worker prints as it advances

EXIT_OK, EXIT_FAILED, EXIT_RETRYABLE = 0, 1, 75
# endings that say the worker was killed from outside through no fault of its model: retried
_KILLED = {Ending.OUT_OF_MEMORY: "ran out of memory", Ending.NODE_FAILURE: "lost its node",
           Ending.PREEMPTED: "was preempted"}
LOG_TAIL_BYTES = 16384   # the last progress line is looked for in this much of the log's end

log = logging.getLogger("esd_experiment")


@dataclass(frozen=True)
class Policy:
    max_retries: int = 2              # retries of a retryable failure
    retry_backoff_s: float = 10.0     # before the first retry, doubling
    timeout_s: float | None = None    # wall-clock limit of one attempt
    stall_timeout_s: float | None = 1800.0  # no new progress line (layer, bytes) this long: stalled

    def retry_delay_s(self, attempt: int) -> float:
        return self.retry_backoff_s * 2 ** (attempt - 1)


@dataclass
class Outcome:
    succeeded: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)   # key -> "stage/reason"
    interrupted: bool = False
    followed: bool = True     # False: handed to a backend that does not wait (Slurm without --wait)
    slot_s: float = 0.0       # seconds workers held their slots (GPU or CPU), every attempt
    waited_s: float = 0.0     # of which they waited for bytes (downloading in the slot), as they said
    fetch_s: float | None = None  # seconds the download stage fetched beside the slots (None: no stage)

    def slot_text(self) -> str:
        """`4m10s of slot time: 97% computing, 3% waiting for bytes (download stage: 3m02s)`."""
        from esd.progress import format_duration
        waiting = min(1.0, self.waited_s / self.slot_s) if self.slot_s > 0 else 0.0
        stage = "" if self.fetch_s is None else f" (download stage: {format_duration(self.fetch_s)} fetching beside them)"
        return (f"{format_duration(self.slot_s)} of slot time: {100 * (1 - waiting):.0f}% computing, "
                f"{100 * waiting:.0f}% waiting for bytes{stage}")


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
    ending, said = result.ending, f" ({result.word})" if result.word else ""
    if _result_is_new(result) and not stalled:
        return "done", None
    if ending is Ending.INTERRUPTED:
        return "interrupted", None
    if stalled:
        return "failed", ESDFailure("worker", "stalled", f"no progress (no new layer or bytes line in its log) "
                                    f"for {policy.stall_timeout_s:g}s (--stall_timeout); see {result.task.log_path}",
                                    retryable=False)
    if ending is Ending.TIMED_OUT:
        limit = result.task.timeout_s
        what = f"exceeded --timeout {limit:g}s" if limit else f"exceeded the backend's time limit{said}"
        return "failed", ESDFailure("worker", "timeout", what, retryable=False)
    record = _fresh_record(output_dir, result)
    if record is not None:
        return "failed", record
    if result.returncode == diskfull.EXIT_DISK_FULL or ending is Ending.NO_SPACE:
        return "failed", diskfull.disk_full_failure(result.task.log_path or output_dir, stage="worker",
                                                    here=False)   # the worker's disk, on its record
    if result.returncode == EXIT_RETRYABLE:
        return "failed", ESDFailure("worker", "retryable_exit", "the worker exited with status 75 (a retry can "
                                    f"help) without a failure record; see {result.task.log_path}")
    if ending in _KILLED:
        return "failed", ESDFailure("worker", "worker_killed", f"worker {_KILLED[ending]}{said}", retryable=True)
    if ending is Ending.CANCELLED:
        return "failed", ESDFailure("worker", "cancelled", f"the worker was cancelled{said or ' (scancel?)'}",
                                    retryable=False)
    if result.returncode is not None and result.returncode < 0:
        return "failed", ESDFailure("worker", "worker_killed",
                                    f"worker killed by signal {-result.returncode} (out of host memory?)")
    status = "an unknown status" if result.returncode is None else f"status {result.returncode}"
    return "failed", ESDFailure("worker", "worker_crashed", f"worker exited with {status}{said} without a "
                                f"failure record; see {result.task.log_path}", retryable=False)


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
        self._progress_at: dict[str, tuple[int, float]] = {}  # key -> (log offset of its last progress line, when seen)
        self._stalled: set[str] = set()

    def tasks_for(self, tasks: Sequence[Task]) -> list[Task]:
        return [replace(t, timeout_s=self.policy.timeout_s) for t in tasks]

    def run(self, tasks: Sequence[Task]) -> Outcome:
        hooks = Hooks(on_start=self.on_start, on_end=self.on_end, on_tick=self.on_tick,
                      tick_interval_s=self.tick_interval_s)
        self.backend.run(self.tasks_for(tasks), hooks)
        self.outcome.followed = self.backend.waits
        self.outcome.fetch_s = getattr(self.backend, "fetch_seconds", None)   # a download stage's
        return self.outcome

    def running_tasks(self) -> list[tuple[str, float, Path | None]]:
        """(key, start time, worker log) of each running task; safe from any thread (progress)."""
        with self._lock:
            return [(key, started, task.log_path) for key, (task, started) in self._running.items()]

    # ------------------------------------------------------------------ the hooks
    def on_start(self, task: Task, when: float) -> None:
        with self._lock:
            self._running[task.key] = (task, when)
            self._progress_at[task.key] = (_last_progress(task.log_path), when)

    def on_tick(self) -> None:
        """The watchdog: a running task that printed no new progress line (a layer analysed,
        bytes moved) for `stall_timeout_s` is stopped. Other output (an HTTP client's line per
        request, warnings) is not progress."""
        limit = self.policy.stall_timeout_s
        if not limit:
            return
        now = time.time()
        with self._lock:
            running = [(key, task, self._progress_at.get(key, (-1, started)))
                       for key, (task, started) in self._running.items() if key not in self._stalled]
        for key, task, (offset, since) in running:
            newest = _last_progress(task.log_path)
            if newest >= 0 and newest != offset:  # a new line (or the log was rewritten)
                with self._lock:
                    if key in self._running:
                        self._progress_at[key] = (newest, now)
                continue
            if now - since > limit:
                log.warning("stalled %s: no progress line in %s for %.0fs; stopping it", key, task.log_path,
                            now - since)
                with self._lock:
                    self._stalled.add(key)
                self.backend.cancel(key)

    def on_end(self, result: TaskResult) -> list[Task]:
        with self._lock:
            self._running.pop(result.key, None)
            self._progress_at.pop(result.key, None)
            stalled = result.key in self._stalled
            self._stalled.discard(result.key)
        kind, failure = classify(result, self.output_dir, self.policy, stalled)
        took = (result.end_time or time.time()) - (result.start_time or time.time())
        self._count_slot_time(result, took, done=kind == "done")
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

    def _count_slot_time(self, result: TaskResult, held_s: float, done: bool) -> None:
        """Slot time of an attempt that had a slot; its wait for bytes from its last line."""
        if result.start_time is None or held_s <= 0:
            return
        times = slot_times(result.task.log_path) if done else None
        with self._lock:
            self.outcome.slot_s += held_s
            self.outcome.waited_s += min(held_s, times[1]) if times else 0.0

    def _progress(self, ok: bool) -> None:
        if self.progress is not None:
            self.progress.update(ok)


def _last_progress(path: Path | None) -> int:
    """Where in the log its last progress line ends (a byte offset; -1: none in its tail)."""
    if path is None:
        return -1
    try:
        with open(path, "rb") as handle:
            size = handle.seek(0, 2)
            start = max(0, size - LOG_TAIL_BYTES)
            handle.seek(start)
            tail = handle.read()
    except OSError:
        return -1
    found = None
    for found in PROGRESS_LINE.finditer(tail):
        pass
    return -1 if found is None else start + found.end()
