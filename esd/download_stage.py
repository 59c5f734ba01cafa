"""The download stage: models' files reach the hub cache before a GPU or CPU slot is given
to them, so no slot is held while its model downloads and the link works while slots compute.

    tasks ─► [fetch: `esd_worker.py … --fetch_only`, `downloads` at once, in list order]
          ─► [the local backend's queue: a slot as soon as one is free] ─► worker

Owns: `DownloadStage`, a `Backend` wrapped around the local backend. Every task is handed to
the local backend at once but gated (`Task.ready`): its worker starts only when its fetch
has ended well. A fetch is the worker itself with `--fetch_only` (same arguments, same
resolution code, same typed failure records, same log), so a failed fetch ends its task
through the local backend (`withdraw`) with the fetch's exit status, and the supervisor
classifies and retries it like any worker's end; a retry is fetched again. At most `ahead`
models are fetched or fetching and not yet started (bounded disk ahead of the slots); under
`--disk_budget` the budget supervisor admits a task before it reaches this stage, so
downloads stay within the budget. Fetches run in their own sessions and are stopped with
the run (Ctrl-C); a fetch killed mid-file resumes from huggingface_hub's `.incomplete`.
`stages()` says what is downloading (with the rate its log shows), ready and running.

Used with the local backend in cache and bounded modes (`--stream` reads while computing;
a Slurm array's nodes download for themselves). Must not: read tensors, import torch, or
decide retries (the supervisor does).
"""
from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable, Sequence

from esd.backends.base import WORKER_SCRIPT, Backend, Hooks, Task, TaskResult
from esd.hub_cache import offline_in
from esd.progress import download_rate

log = logging.getLogger("esd_experiment")
FETCH_FLAG = "--fetch_only"
STOP_GRACE_S = 5.0       # a fetch stopped with the run gets this long after SIGTERM


@dataclass(frozen=True)
class Stages:
    """What the stage sees now, for the display: keys downloading (with their logs), how
    many are downloaded and wait for a slot, how many run."""
    downloading: tuple[tuple[str, Path | None], ...] = ()
    ready: int = 0
    running: int = 0

    def rate_mb_s(self) -> float | None:
        """The downloads' summed rate, from each fetch's last transfer line; None if none yet."""
        rates = [download_rate(log_path) for _, log_path in self.downloading]
        rates = [r for r in rates if r is not None]
        return sum(rates) if rates else None

    def text(self) -> str:
        """`downloading 2 (38.1 MB/s), ready 1, running 2`."""
        rate = self.rate_mb_s()
        speed = f" ({rate:.1f} MB/s)" if rate is not None and self.downloading else ""
        return f"downloading {len(self.downloading)}{speed}, ready {self.ready}, running {self.running}"


class _Gate:
    """A task's `ready`: open once its files are in the cache."""

    def __init__(self):
        self._open = threading.Event()

    def open(self) -> None:
        self._open.set()

    def __call__(self) -> bool:
        return self._open.is_set()


class DownloadStage(Backend):
    def __init__(self, inner: Backend, *, downloads: int = 1, ahead: int = 2,
                 fetch: Callable[[Task], bool] = lambda task: True,
                 python: str = sys.executable, worker_script: Path = WORKER_SCRIPT):
        self.inner, self.name = inner, inner.name
        self.fetch = fetch                   # whether a task's model may have files to download
        self.downloads, self.ahead = max(1, downloads), max(1, ahead)
        self.python, self.worker_script = python, worker_script
        self._cond = threading.Condition()
        self._queue: list[tuple[Task, float, _Gate]] = []   # (task, fetch not before, gate), in list order
        self._fetching: dict[str, Task] = {}
        self._ready: set[str] = set()        # fetched, not started yet
        self._running: set[str] = set()
        self._procs: dict[str, subprocess.Popen] = {}
        self._stopping = False
        self._gated = 0                      # tasks that went through the stage
        self._fetch_s = 0.0                  # summed wall time of fetches (the link's busy time)

    # ------------------------------------------------------------------ the Backend
    def run(self, tasks: Sequence[Task], hooks: Hooks) -> None:
        staged = [self._stage(task) for task in tasks]
        inner_hooks = Hooks(on_start=lambda task, when: self._started(task, when, hooks),
                            on_end=lambda result: self._ended(result, hooks),
                            on_tick=hooks.on_tick, tick_interval_s=hooks.tick_interval_s)
        threads = [threading.Thread(target=self._fetch_loop, name=f"esd-fetch-{i}", daemon=True)
                   for i in range(self.downloads)]
        for thread in threads:
            thread.start()
        try:
            self.inner.run(staged, inner_hooks)
        finally:
            self._stop(threads)

    def cancel(self, key: str) -> None:
        self.inner.cancel(key)

    def waiting_reasons(self) -> list[str]:
        return self.inner.waiting_reasons()

    def write_metrics(self, path: Path) -> None:
        self.inner.write_metrics(path)

    @property
    def fetch_seconds(self) -> float | None:
        """Summed wall time of the fetches; None while no task needed one."""
        with self._cond:
            return self._fetch_s if self._gated else None

    def stages(self) -> Stages | None:
        """What is downloading, ready and running; None while no task of the run needed a
        download (local models, offline): the display then shows what runs, as without it."""
        with self._cond:
            if not self._gated:
                return None
            downloading = tuple((key, task.log_path) for key, task in self._fetching.items())
            return Stages(downloading, len(self._ready), len(self._running))

    # ------------------------------------------------------------------ tasks in and out
    def _stage(self, task: Task) -> Task:
        """The task gated on its fetch, queued for fetching after its delay (a retry's backoff);
        a task with nothing to download (offline, a local model) goes on as it is."""
        if not self.fetch(task) or offline_in({**os.environ, **dict(task.env)}):
            return task
        gate = _Gate()
        with self._cond:
            self._gated += 1
            self._queue.append((task, time.monotonic() + task.delay_s, gate))
            self._cond.notify_all()
        return replace(task, ready=gate)

    def _started(self, task: Task, when: float, hooks: Hooks) -> None:
        with self._cond:
            self._ready.discard(task.key)
            self._running.add(task.key)
            self._cond.notify_all()     # one fewer ahead: the next fetch may start
        hooks.on_start(task, when)

    def _ended(self, result: TaskResult, hooks: Hooks) -> list[Task]:
        with self._cond:
            self._running.discard(result.key)
            self._ready.discard(result.key)
            self._cond.notify_all()
        return [self._stage(task) for task in hooks.on_end(result)]

    # ------------------------------------------------------------------ fetching
    def _next(self) -> tuple[Task, _Gate] | None:
        """The first queued task whose delay is over, once fewer than `ahead` are fetched or
        fetching and not started; None when the run stops."""
        with self._cond:
            while True:
                if self._stopping:
                    return None
                now = time.monotonic()
                due = [item for item in self._queue if item[1] <= now]
                if due and len(self._fetching) + len(self._ready) < self.ahead:
                    task, _, gate = due[0]
                    self._queue.remove(due[0])
                    self._fetching[task.key] = task
                    return task, gate
                later = [item[1] - now for item in self._queue if item[1] > now]
                self._cond.wait(timeout=min(later) if later else None)

    def _fetch_loop(self) -> None:
        while (item := self._next()) is not None:
            task, gate = item
            started = time.time()
            try:
                returncode = self._fetch(task)
            except Exception as exc:  # noqa: BLE001 - e.g. its log cannot be opened: the worker says why
                log.warning("download stage: %s: could not start its fetch (%s); its worker downloads",
                            task.key, exc)
                returncode = 0
            took = time.time() - started
            with self._cond:
                self._fetching.pop(task.key, None)
                self._fetch_s += took
                if self._stopping:
                    return
                if returncode == 0:
                    self._ready.add(task.key)
                self._cond.notify_all()
            if returncode == 0:
                gate.open()
                self._wake_inner()
            else:
                self.inner.withdraw(task.key, returncode)   # no slot time: it never had one

    def _fetch(self, task: Task) -> int:
        """`esd_worker.py <the task's arguments> --fetch_only`, its output appended to the
        model's log, in a session of its own (stopped with the run, not by a terminal's Ctrl-C)."""
        env = dict(os.environ, **dict(task.env))
        argv = [self.python, str(self.worker_script), *task.argv, FETCH_FLAG]
        log_file = subprocess.DEVNULL
        if task.log_path is not None:
            Path(task.log_path).parent.mkdir(parents=True, exist_ok=True)
            log_file = open(task.log_path, "ab", buffering=0)
            log_file.write(f"[download stage {time.strftime('%Y-%m-%dT%H:%M:%S')}] fetching "
                           f"{task.key}\n".encode())
        try:
            with self._cond:
                if self._stopping:
                    return 0
                proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log_file,
                                        stderr=subprocess.STDOUT, env=env, start_new_session=True)
                self._procs[task.key] = proc
            try:
                return proc.wait()
            finally:
                with self._cond:
                    self._procs.pop(task.key, None)
        finally:
            if log_file is not subprocess.DEVNULL:
                log_file.close()

    def _wake_inner(self) -> None:
        wake = getattr(self.inner, "wake", None)
        if wake is not None:
            wake()

    def _stop(self, threads: list[threading.Thread]) -> None:
        """The run ended or was stopped: no new fetch; running ones are stopped (SIGTERM to
        their session, SIGKILL after `STOP_GRACE_S`) — a rerun resumes their files."""
        with self._cond:
            self._stopping = True
            procs = list(self._procs.values())
            self._cond.notify_all()
        for proc in procs:
            _signal_session(proc, signal.SIGTERM)
        deadline = time.monotonic() + STOP_GRACE_S
        for proc in procs:
            try:
                proc.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                _signal_session(proc, signal.SIGKILL)
        for thread in threads:
            thread.join(timeout=STOP_GRACE_S)


def _signal_session(proc: subprocess.Popen, sig: int) -> None:
    try:
        os.killpg(proc.pid, sig)
    except (ProcessLookupError, PermissionError):
        pass

