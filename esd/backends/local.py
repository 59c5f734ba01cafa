"""The local backend: worker processes on this machine's free GPUs (or CPU slots), through
`gputracker.Dispatcher`.

Owns: turning `Task`s into gputracker jobs and gputracker results into `TaskResult`s, the
CPU thread share of concurrent workers, `gpu_metrics.json`. Decides nothing about retries
or failures (the supervisor does); knows nothing about models.
"""
from __future__ import annotations

import logging
import os
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from esd.backends.base import WORKER_SCRIPT, Backend, BackendError, Ending, Hooks, Task, TaskResult


@dataclass(frozen=True)
class LocalSettings:
    gpus: tuple[int, ...] | None = None      # None: all NVML sees; (): CPU only
    cpu_workers: int = 1
    num_gpus_per_job: int = 1
    gpu_memory_threshold_mb: float = 500
    max_check: int = 10
    poll_interval_s: float = 10.0


class LocalBackend(Backend):
    name = "local"

    def __init__(self, settings: LocalSettings, logger: logging.Logger | None = None,
                 python: str = sys.executable, worker_script: Path = WORKER_SCRIPT):
        self.settings = settings
        self.logger = logger or logging.getLogger("esd_experiment.dispatch")
        self.python, self.worker_script = python, worker_script
        self._dispatcher = None
        self._cancelled: set[str] = set()
        self._ran_any = False
        self._lock = threading.Lock()      # the dispatcher appearing vs `withdraw` from other threads
        self._early: list[tuple] = []      # withdrawn before the dispatcher existed

    def _env(self, task: Task) -> dict:
        env = dict(task.env)
        if self.settings.gpus == ():  # CPU: share the cores between concurrent workers
            threads = str(max(1, (os.cpu_count() or 1) // self.settings.cpu_workers))
            env.update(OMP_NUM_THREADS=threads, MKL_NUM_THREADS=threads)
        return env

    def _job(self, task: Task):
        import gputracker
        return gputracker.Job(job_id=task.key, argv=[self.python, str(self.worker_script), *task.argv],
                              log_path=task.log_path, timeout_s=task.timeout_s, env=self._env(task),
                              not_before=time.monotonic() + task.delay_s, ready=task.ready)

    def run(self, tasks: Sequence[Task], hooks: Hooks) -> None:
        import gputracker
        by_key = {t.key: t for t in tasks}

        def on_job_start(job) -> None:
            hooks.on_start(by_key[job.job_id], time.time())

        def on_job_end(result) -> None:
            task = by_key[result.job_id]
            cancelled = result.job_id in self._cancelled
            self._cancelled.discard(result.job_id)
            ended = TaskResult(task, result.returncode, result.start_time, result.end_time,
                               ending=_ending(result, cancelled))
            for follow_up in hooks.on_end(ended):
                by_key[follow_up.key] = follow_up
                dispatcher.submit(self._job(follow_up))

        s = self.settings
        try:
            dispatcher = gputracker.Dispatcher(
                gpus=None if s.gpus is None else list(s.gpus), memory_threshold_mb=s.gpu_memory_threshold_mb,
                max_check=s.max_check, poll_interval_s=s.poll_interval_s,
                num_gpus_per_job=s.num_gpus_per_job, cpu_slots=s.cpu_workers, logger=self.logger,
                on_job_start=on_job_start, on_job_end=on_job_end)
        except ValueError as exc:  # e.g. --gpus 7 where NVML sees GPUs 0..1
            raise BackendError(str(exc)) from None
        if s.gpus and dispatcher.mode == "cpu":  # GPUs asked for by number, none usable
            why = getattr(dispatcher._nvml, "unavailable_reason", None) or "NVML sees no GPU"
            dispatcher.close()
            raise BackendError(f"--gpus {' '.join(map(str, s.gpus))}: no GPU can be used here ({why}); "
                               f"use --gpus none to run on CPU")
        stop_ticking = threading.Event()
        ticker = threading.Thread(target=_tick, args=(hooks, stop_ticking), daemon=True,
                                  name="esd-watchdog")
        with dispatcher:
            with self._lock:
                self._dispatcher = dispatcher
                for early in self._early:
                    dispatcher.withdraw(*early)
                self._early.clear()
            ticker.start()
            try:
                with gputracker.install_signal_handlers(dispatcher):
                    results = dispatcher.run([self._job(t) for t in tasks])
                # queued when the run was stopped: never started, so never through on_job_end;
                # they still make the run interrupted, even if every running job ended well
                for result in results:
                    if result.start_time is None and result.interrupted and result.job_id in by_key:
                        hooks.on_end(TaskResult(by_key[result.job_id], None, None, None, Ending.INTERRUPTED))
            finally:
                stop_ticking.set()
                ticker.join()
                with self._lock:
                    self._dispatcher = None
                self._ran_any = bool(tasks)
                self._metrics = dispatcher.metrics()

    def cancel(self, key: str) -> None:
        dispatcher = self._dispatcher
        if dispatcher is not None:
            self._cancelled.add(key)
            dispatcher.cancel(key)

    def wake(self) -> None:
        """A queued task's `ready` became true: look at the queue now (any thread)."""
        dispatcher = self._dispatcher
        if dispatcher is not None:
            dispatcher.wake()

    def withdraw(self, key: str, returncode: int, start_time: float | None = None,
                 end_time: float | None = None) -> None:
        """End the queued task `key` without starting it: what it waited for ended with
        `returncode` (reported through `on_end` like a worker's end; any thread)."""
        with self._lock:
            if self._dispatcher is None:
                self._early.append((key, returncode, start_time, end_time))
                return
            self._dispatcher.withdraw(key, returncode, start_time, end_time)

    def waiting_reasons(self) -> list[str]:
        dispatcher = self._dispatcher
        return dispatcher.waiting_reasons() if dispatcher is not None else []

    def write_metrics(self, path: Path) -> None:
        if self._ran_any:
            from gputracker.metrics import write_json_atomic
            write_json_atomic(Path(path), self._metrics)


def from_config(config, worker_script: Path = WORKER_SCRIPT) -> LocalBackend:
    """`--backend local`: the GPU and CPU flags of the experiment's config."""
    return LocalBackend(LocalSettings(
        gpus=config.gpus, cpu_workers=config.cpu_workers, num_gpus_per_job=config.num_gpus_per_job,
        gpu_memory_threshold_mb=config.gpu_memory_threshold, max_check=config.max_check,
        poll_interval_s=config.poll_interval), logger=logging.getLogger("esd_experiment.dispatch"),
        worker_script=worker_script)


def _ending(result, cancelled: bool) -> Ending:
    """A gputracker `JobResult` in the closed set of endings."""
    if result.interrupted:
        return Ending.INTERRUPTED
    if result.timed_out:
        return Ending.TIMED_OUT
    if cancelled:
        return Ending.CANCELLED
    if _disk_full(getattr(result, "launch_error", None)):
        return Ending.NO_SPACE
    if result.returncode is None:
        return Ending.LOST
    return Ending.SUCCEEDED if result.returncode == 0 else Ending.FAILED


def _disk_full(exc) -> bool:
    """The job could not even start for want of space (e.g. its log file): say so."""
    from esd.diskfull import is_disk_full
    return is_disk_full(exc)


def _tick(hooks: Hooks, stop: threading.Event) -> None:
    """The supervisor's periodic look at running tasks, beside the dispatcher's own loop."""
    while not stop.wait(hooks.tick_interval_s):
        try:
            hooks.on_tick()
        except Exception:  # noqa: BLE001 - a watchdog bug must not stop the run
            logging.getLogger("esd_experiment").exception("watchdog tick failed")
