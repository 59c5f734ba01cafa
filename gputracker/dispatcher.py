"""Scheduling and launching: which job runs on which GPU, and when; nothing about models.

Owns the dispatch loop (one thread: the one calling ``Dispatcher.run``), the grant rule,
launching children without a shell, their timeouts, their exit codes and their cleanup.

The grant rule
--------------
Every ``poll_interval_s`` each GPU that we do not hold is read once (through ``nvml.Nvml``).
A read under ``memory_threshold_mb`` adds one to the GPU's ``free_polls`` counter; a read at
or above it, or a failed read, sets it to 0. A GPU is granted when ``free_polls >= max_check``
and its cross-process claim (``locks.try_claim``) succeeds; a failed claim means another
dispatcher holds it, which counts as busy (counter back to 0).

The counters live as long as the dispatcher, not one job: an idle GPU is granted once after
``max_check`` polls, and later jobs do not wait again. A GPU held by one of our jobs is not
polled and not granted until that job (its whole process group) has ended. When we release
it, its counter is set to ``max_check - 1`` and it is read at once: it was ours, so the only
question is whether someone else started using it meanwhile -- one fresh read under the
threshold re-grants it immediately. A read at or above the threshold right at release is
given the benefit of the doubt until the next regular poll (the driver may still be freeing
our job's memory); if that poll also sees it busy, it has to earn ``max_check`` polls again.

Launching
---------
Children get an argument list (never a shell), a copy of our environment plus the job's
``env``, ``CUDA_VISIBLE_DEVICES`` (the granted NVML indices, comma-joined; "" on CPU) and
``CUDA_DEVICE_ORDER=PCI_BUS_ID``, their own session/process group and their own log file
(stdout+stderr, appended). The GPU claims' file descriptors are passed to the child, so a
claim lasts as long as the job even if this dispatcher is killed with SIGKILL. When a job's
main process exits, processes left in its group are terminated (SIGTERM, SIGKILL after
``kill_grace_s``) before its GPUs are released: a finished job must not keep a GPU busy.
"""
from __future__ import annotations

import logging
import os
import selectors
import shlex
import signal
import subprocess
import threading
import time
from collections import deque
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Callable

from . import locks
from .metrics import build_metrics, write_json_atomic
from .nvml import Nvml

GROUP_CHECK_INTERVAL_S = 0.05  # how often we look for leftovers in a finished job's group
NO_PIDFD_REAP_INTERVAL_S = 0.05  # child polling period where pidfd_open is missing


@dataclass
class Job:
    """One command to run. ``not_before`` is a ``time.monotonic()`` instant (retry backoff);
    ``ready``, when given, is asked before launching: the job waits in the queue until it
    returns True (e.g. while its inputs are fetched; whoever makes it true calls ``wake``);
    ``log_path=None`` lets the child write to the dispatcher's own stdout/stderr."""

    job_id: str
    argv: list[str]
    log_path: Path | None
    timeout_s: float | None = None
    env: dict | None = None
    not_before: float = 0.0
    ready: Callable[[], bool] | None = None

    def is_ready(self, now: float) -> bool:
        return self.not_before <= now and (self.ready is None or bool(self.ready()))


@dataclass(frozen=True)
class JobResult:
    """How one job ended. ``returncode``: the exit status, negative = killed by that signal,
    None = never ran (launch error, or still queued when the dispatcher was stopped).
    ``start_time``/``end_time`` are ``time.time()`` epochs (None if it never ran);
    ``wait_s`` is the time from the job being ready (submitted and past ``not_before``) to
    its launch."""

    job_id: str
    argv: list[str]
    returncode: int | None
    gpus: tuple[int, ...]
    start_time: float | None
    end_time: float | None
    wait_s: float
    timed_out: bool
    interrupted: bool
    log_path: Path | None
    launch_error: OSError | None = None  # why it never ran (e.g. ENOSPC opening its log)

    @property
    def succeeded(self) -> bool:
        return self.returncode == 0 and not self.timed_out and not self.interrupted

    @property
    def runtime_s(self) -> float:
        if self.start_time is None or self.end_time is None:
            return 0.0
        return self.end_time - self.start_time


@dataclass
class _Queued:
    job: Job
    submitted_mono: float


@dataclass
class _Running:
    job: Job
    proc: subprocess.Popen
    pidfd: int | None
    gpus: tuple[int, ...]
    claims: list
    start_time: float
    start_mono: float
    wait_s: float
    deadline_mono: float | None
    returncode: int | None = None  # set once the main process has been reaped
    end_time: float | None = None
    timed_out: bool = False
    interrupted: bool = False
    term_sent_mono: float | None = None
    kill_sent: bool = False
    next_group_check_mono: float = 0.0


@dataclass
class _GpuState:
    free_polls: int = 0
    held_by: str | None = None  # job_id of our job holding it
    release_grace: bool = False  # just released by us: a busy read waits for the next poll
    # for ``waiting_reasons`` only (the grant rule does not read them):
    last_used_mb: float | None = None  # the latest memory read; None: not read yet / failed
    read_failed: bool = False
    claimed_elsewhere: bool = False  # our last claim failed: another dispatcher holds it


class Dispatcher:
    """Runs jobs on GPUs that stay free, one GPU set per job, across processes safely.

    ``gpus=None`` uses every GPU NVML sees; ``gpus=[]`` (or no usable NVML) is CPU mode with
    ``cpu_slots`` concurrent jobs. Callbacks receive the ``Job`` / ``JobResult`` and run in
    the dispatcher thread; ``on_job_end`` may call ``submit`` (e.g. to retry).
    """

    def __init__(
        self,
        gpus: list[int] | None = None,
        memory_threshold_mb: float = 500,
        max_check: int = 10,
        poll_interval_s: float = 10.0,
        num_gpus_per_job: int = 1,
        cpu_slots: int = 1,
        lock_dir: str | os.PathLike | None = None,
        logger: logging.Logger | None = None,
        on_job_start: Callable[[Job], None] | None = None,
        on_job_end: Callable[[JobResult], None] | None = None,
        kill_grace_s: float = 5.0,
    ):
        if max_check < 1:
            raise ValueError(f"max_check must be >= 1, got {max_check}")
        if poll_interval_s <= 0:
            raise ValueError(f"poll_interval_s must be > 0, got {poll_interval_s}")
        if num_gpus_per_job < 1:
            raise ValueError(f"num_gpus_per_job must be >= 1, got {num_gpus_per_job}")
        if cpu_slots < 1:
            raise ValueError(f"cpu_slots must be >= 1, got {cpu_slots}")
        self.logger = logger or logging.getLogger("gputracker")
        self.memory_threshold_mb = float(memory_threshold_mb)
        self.max_check = int(max_check)
        self.poll_interval_s = float(poll_interval_s)
        self.num_gpus_per_job = int(num_gpus_per_job)
        self.cpu_slots = int(cpu_slots)
        self.kill_grace_s = float(kill_grace_s)
        self.on_job_start = on_job_start
        self.on_job_end = on_job_end

        self._nvml = Nvml(self.logger)
        self.gpus: list[int] = self._choose_gpus(gpus)
        self.mode = "gpu" if self.gpus else "cpu"
        self.lock_dir = locks.resolve_lock_dir(lock_dir)
        if self.mode == "gpu":
            locks.ensure_lock_files(self.lock_dir, self.gpus)  # fail now, not mid-run
        self._gpu_state = {g: _GpuState() for g in self.gpus}

        self._queue: deque[_Queued] = deque()
        self._queue_lock = threading.Lock()
        self._running: dict[int, _Running] = {}  # by pid
        self._results: list[JobResult] = []
        self._stop_requests = 0  # plain int: request_stop must be safe in a signal handler
        self._cancel_requests: set[str] = set()  # job ids to terminate (``cancel``)
        self._withdrawals: dict[str, tuple] = {}  # queued job id -> how it ended elsewhere (``withdraw``)
        self._stopping = False
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._next_poll_mono = 0.0
        self._run_started_mono: float | None = None
        self._run_started_time: float | None = None
        self._run_ended_mono: float | None = None

    # ----------------------------------------------------------------- set-up
    def _choose_gpus(self, gpus: list[int] | None) -> list[int]:
        """The NVML indices to use; [] means CPU mode (logged once, with the reason)."""
        if gpus is not None and len(gpus) == 0:
            self.logger.info("gputracker: no GPUs requested; CPU mode")
            return []
        if not self._nvml.open():
            self.logger.warning(
                "gputracker: %s; CPU mode: jobs run with CUDA_VISIBLE_DEVICES=''",
                self._nvml.unavailable_reason,
            )
            return []
        count = self._nvml.device_count()
        if count == 0:
            self.logger.warning("gputracker: NVML sees no GPU; CPU mode: jobs run with CUDA_VISIBLE_DEVICES=''")
            return []
        if gpus is None:
            chosen = list(range(count))
        else:
            chosen = list(dict.fromkeys(int(g) for g in gpus))
            unknown = [g for g in chosen if not 0 <= g < count]
            if unknown:
                raise ValueError(f"GPU index(es) {unknown} not found: NVML sees GPUs 0..{count - 1}")
        if self.num_gpus_per_job > len(chosen):
            raise ValueError(f"num_gpus_per_job={self.num_gpus_per_job} but only GPUs {chosen} may be used")
        for g in chosen:
            info = self._nvml.gpu_info(g)
            if info is not None:
                self.logger.info("gputracker: GPU %d: %s, %.0f MB, %s", g, info.name, info.memory_total_mb, info.uuid)
        return chosen

    # ------------------------------------------------------------- public API
    def submit(self, job: Job) -> None:
        """Queue ``job``; safe from any thread and from the callbacks."""
        if isinstance(job.argv, (str, bytes)) or not job.argv:
            raise TypeError(f"job {job.job_id}: argv must be a non-empty list of arguments "
                            f"(no shell is used; split a command line with shlex.split), got {job.argv!r}")
        with self._queue_lock:
            self._queue.append(_Queued(job, time.monotonic()))
        self._wake()

    def request_stop(self) -> None:
        """Stop dispatching and terminate running jobs' process groups (SIGTERM, then
        SIGKILL after ``kill_grace_s``; a second request kills at once). Signal-safe."""
        self._stop_requests += 1
        self._wake()

    def cancel(self, job_id: str) -> None:
        """Terminate the running job ``job_id`` (SIGTERM to its group, SIGKILL after
        ``kill_grace_s``); its result then reports the signal. Safe from any thread."""
        with self._queue_lock:
            self._cancel_requests.add(job_id)
        self._wake()

    def withdraw(self, job_id: str, returncode: int, start_time: float | None = None,
                 end_time: float | None = None) -> None:
        """End the queued job ``job_id`` without launching it: what it waited for failed
        with ``returncode`` (between ``start_time`` and ``end_time``). Its result reaches
        ``on_job_end`` from the dispatch thread like any other. Safe from any thread; a job
        that is no longer queued is left alone."""
        with self._queue_lock:
            self._withdrawals[job_id] = (returncode, start_time, end_time)
        self._wake()

    def wake(self) -> None:
        """Look at the queue again now (a job's ``ready`` became true). Safe from any thread."""
        self._wake()

    def run(self, jobs: list[Job] | tuple[Job, ...] = ()) -> list[JobResult]:
        """Run ``jobs`` (and anything submitted meanwhile) until the queue is empty and no
        job runs, or until stopped. Returns every result of this call, in end order; jobs
        still queued at a stop are returned with ``interrupted=True, returncode=None``."""
        for job in jobs:
            self.submit(job)
        first_result = len(self._results)
        self._run_started_mono = time.monotonic()
        self._run_started_time = time.time()
        self._run_ended_mono = None
        self._stopping = False
        self._next_poll_mono = self._run_started_mono
        selector = selectors.DefaultSelector()
        selector.register(self._wake_r, selectors.EVENT_READ)
        try:
            while True:
                self._drain_wake()
                now = time.monotonic()
                if self._stop_requests and not self._stopping:
                    self._begin_stop(now)
                self._reap(selector)
                self._end_withdrawn()
                self._tend_running(time.monotonic())
                if not self._stopping:
                    now = time.monotonic()
                    if now >= self._next_poll_mono:
                        self._poll_gpus()
                        self._next_poll_mono = max(self._next_poll_mono + self.poll_interval_s, now)
                    self._launch_ready(selector)
                if not self._running and (self._stopping or not self._has_queued()):
                    break
                timeout_s = self._seconds_to_next_event(time.monotonic())
                selector.select(timeout_s)
        finally:
            self._kill_all_now()
            selector.close()
            if self._stopping:
                self._drop_queue()
            self._run_ended_mono = time.monotonic()
        return self._results[first_result:]

    def metrics(self) -> dict:
        """Counts, GPU wait times, runtime and per-GPU job counts of the results so far."""
        end = self._run_ended_mono if self._run_ended_mono is not None else time.monotonic()
        total_runtime_s = 0.0 if self._run_started_mono is None else end - self._run_started_mono
        return build_metrics(
            self._results, mode=self.mode, gpus=self.gpus, total_runtime_s=total_runtime_s,
            started_at=self._run_started_time,
        )

    def write_metrics(self, path: str | os.PathLike) -> Path:
        """Write ``metrics()`` as JSON atomically (temp file + rename); returns the path."""
        return write_json_atomic(Path(path), self.metrics())

    def waiting_reasons(self) -> list[str]:
        """Why queued jobs are not running yet, one short line per cause, e.g.
        ``GPU 0: 30000 MB used > 500 MB threshold``, ``GPU 1: 2/10 free polls``; empty when
        no job waits. Safe from any thread: a snapshot, at most one poll old."""
        now = time.monotonic()
        with self._queue_lock:
            queued = [q.job for q in self._queue]
        if not queued:
            return []
        reasons = []
        ready = sum(job.is_ready(now) for job in queued)
        if ready:
            if self.mode == "cpu":
                reasons.append(f"{ready} queued: all {self.cpu_slots} CPU slot(s) busy")
            else:
                reasons += [self._gpu_reason(gpu, state) for gpu, state in list(self._gpu_state.items())]
        for job in queued:
            if job.not_before > now:
                reasons.append(f"{job.job_id}: retry in {job.not_before - now:.0f} s")
        waiting_inputs = sum(job.not_before <= now and not job.is_ready(now) for job in queued)
        if waiting_inputs:
            reasons.append(f"{waiting_inputs} waiting for their inputs")
        return reasons

    def _gpu_reason(self, gpu: int, state: _GpuState) -> str:
        held_by, used_mb = state.held_by, state.last_used_mb  # read once: another thread writes them
        if held_by is not None:
            return f"GPU {gpu}: running {held_by}"
        if state.claimed_elsewhere:
            return f"GPU {gpu}: claimed by another dispatcher"
        if state.read_failed:
            return f"GPU {gpu}: memory cannot be read (NVML error)"
        if used_mb is not None and used_mb >= self.memory_threshold_mb:
            return f"GPU {gpu}: {used_mb:.0f} MB used > {self.memory_threshold_mb:.0f} MB threshold"
        return f"GPU {gpu}: {min(state.free_polls, self.max_check)}/{self.max_check} free polls"

    def close(self) -> None:
        """Shut NVML down and close the wake pipe. The dispatcher is unusable afterwards."""
        self._nvml.close()
        wake_fds, self._wake_r, self._wake_w = (self._wake_r, self._wake_w), -1, -1
        for fd in wake_fds:  # -1 first: a late request_stop must not write into a reused fd
            try:
                os.close(fd)
            except OSError:
                pass

    def __enter__(self) -> "Dispatcher":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ----------------------------------------------------------- wake / queue
    def _wake(self) -> None:
        if self._wake_w < 0:
            return
        try:
            os.write(self._wake_w, b"\0")
        except (BlockingIOError, OSError):
            pass  # pipe full (a wake-up is already pending) or closed

    def _drain_wake(self) -> None:
        try:
            while os.read(self._wake_r, 4096):
                pass
        except (BlockingIOError, OSError):
            pass

    def _has_queued(self) -> bool:
        with self._queue_lock:
            return bool(self._queue)

    def _end_withdrawn(self) -> None:
        """Queued jobs ``withdraw`` ended: out of the queue, their results reported."""
        with self._queue_lock:
            if not self._withdrawals:
                return
            requests, self._withdrawals = self._withdrawals, {}
            ended = [q for q in self._queue if q.job.job_id in requests]
            for queued in ended:
                self._queue.remove(queued)
        for queued in ended:
            job = queued.job
            returncode, start_time, end_time = requests[job.job_id]
            self._finish_result(JobResult(job.job_id, list(job.argv), returncode, (), start_time, end_time,
                                          0.0, False, False, job.log_path))

    def _drop_queue(self) -> None:
        with self._queue_lock:
            dropped, self._queue = list(self._queue), deque()
        now = time.monotonic()
        for queued in dropped:
            job = queued.job
            self.logger.info("gputracker: job %s not started (stopped)", job.job_id)
            wait_s = max(0.0, now - max(queued.submitted_mono, job.not_before))
            self._record(JobResult(job.job_id, list(job.argv), None, (), None, None, wait_s, False, True, job.log_path))

    # ---------------------------------------------------------------- polling
    def _poll_gpus(self) -> None:
        for gpu, state in self._gpu_state.items():
            if state.held_by is None:
                self._observe(gpu, state)

    def _observe(self, gpu: int, state: _GpuState) -> None:
        memory_used_mb = self._nvml.memory_used_mb(gpu)
        state.last_used_mb, state.read_failed = memory_used_mb, memory_used_mb is None
        is_free = memory_used_mb is not None and memory_used_mb < self.memory_threshold_mb
        if is_free:
            state.free_polls += 1
        elif not state.release_grace:
            state.free_polls = 0
        state.release_grace = False

    def _ready_gpus(self) -> list[int]:
        return [g for g, s in self._gpu_state.items() if s.held_by is None and s.free_polls >= self.max_check]

    # -------------------------------------------------------------- launching
    def _launch_ready(self, selector) -> None:
        while True:
            queued = self._next_eligible(time.monotonic())
            if queued is None:
                return
            if self.mode == "gpu":
                claims = self._claim_gpus()
                if claims is None:
                    return
            else:
                if len(self._running) >= self.cpu_slots:
                    return
                claims = []
            with self._queue_lock:
                self._queue.remove(queued)
            self._launch(queued, claims, selector)

    def _next_eligible(self, now: float) -> _Queued | None:
        with self._queue_lock:
            for queued in self._queue:
                if queued.job.is_ready(now):
                    return queued
        return None

    def _claim_gpus(self) -> list | None:
        """Claims on ``num_gpus_per_job`` ready GPUs, all or nothing."""
        return locks.try_claim_some(self.lock_dir, self._ready_gpus(), self.num_gpus_per_job,
                                    self._note_claim)

    def _note_claim(self, gpu: int, claimed: bool) -> None:
        state = self._gpu_state[gpu]
        state.claimed_elsewhere = not claimed
        if not claimed:  # another dispatcher's job has it: busy, whatever its memory says
            self.logger.debug("gputracker: GPU %d is claimed by another dispatcher", gpu)
            state.free_polls = 0

    def _launch(self, queued: _Queued, claims: list, selector) -> None:
        job = queued.job
        argv = [os.fspath(a) if isinstance(a, os.PathLike) else str(a) for a in job.argv]
        gpus = tuple(c.gpu_index for c in claims)
        env = dict(os.environ)
        env.update(job.env or {})
        env["CUDA_VISIBLE_DEVICES"] = ",".join(str(g) for g in gpus)
        env["CUDA_DEVICE_ORDER"] = "PCI_BUS_ID"
        start_mono = time.monotonic()
        start_time = time.time()
        wait_s = max(0.0, start_mono - max(queued.submitted_mono, job.not_before))
        where = f"GPU {env['CUDA_VISIBLE_DEVICES']}" if gpus else "CPU"
        log_file = None
        try:
            if job.log_path is not None:
                Path(job.log_path).parent.mkdir(parents=True, exist_ok=True)
                # unbuffered: nothing is left to flush at close, so closing cannot fail later
                log_file = open(job.log_path, "ab", buffering=0)
                stamp = datetime.now().isoformat(timespec="seconds")
                _write_best_effort(log_file, f"[gputracker {stamp}] job {job.job_id} on {where}: "
                                             f"{shlex.join(argv)}\n".encode())
            proc = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=log_file,
                stderr=subprocess.STDOUT if log_file is not None else None,
                env=env,
                start_new_session=True,  # own process group: we can signal the job as a whole
                pass_fds=tuple(c.fd for c in claims),  # the claims live as long as the job
            )
        except OSError as exc:  # this job never runs; the others (running or queued) go on
            self.logger.error("gputracker: job %s could not be launched: %s", job.job_id, exc)
            if log_file is not None:
                _write_best_effort(log_file, f"[gputracker] launch failed: {exc}\n".encode())
            for claim in claims:
                claim.release()
            end_time = time.time()
            self._finish_result(JobResult(job.job_id, list(job.argv), None, gpus, start_time, end_time,
                                          wait_s, False, False, job.log_path, launch_error=exc))
            return
        finally:
            if log_file is not None:
                try:
                    log_file.close()
                except OSError:  # a log we cannot close must not stop the dispatch loop
                    pass
        for gpu in gpus:
            self._gpu_state[gpu].held_by = job.job_id
        pidfd = _pidfd_open(proc.pid)
        if pidfd is not None:
            selector.register(pidfd, selectors.EVENT_READ)
        deadline = start_mono + job.timeout_s if job.timeout_s else None
        self._running[proc.pid] = _Running(job, proc, pidfd, gpus, claims, start_time, start_mono, wait_s, deadline)
        self.logger.info("gputracker: job %s started on %s (pid %d, waited %.1f s): %s",
                         job.job_id, where, proc.pid, wait_s, shlex.join(argv))
        self._call(self.on_job_start, job)

    # ----------------------------------------------------- running / cleanup
    def _reap(self, selector) -> None:
        for run in self._running.values():
            if run.returncode is not None:
                continue
            returncode = run.proc.poll()
            if returncode is None:
                continue
            run.returncode = returncode
            run.end_time = time.time()
            if run.pidfd is not None:
                selector.unregister(run.pidfd)
                os.close(run.pidfd)
                run.pidfd = None

    def _tend_running(self, now: float) -> None:
        """Timeouts, cancellations, SIGKILL after the grace period, finishing ended jobs."""
        with self._queue_lock:
            cancel, self._cancel_requests = self._cancel_requests, set()
        for run in self._running.values():
            if run.job.job_id in cancel and run.returncode is None:
                self.logger.warning("gputracker: job %s cancelled; terminating it", run.job.job_id)
                self._terminate(run, now)
        for pid, run in list(self._running.items()):
            if run.returncode is None:
                if run.deadline_mono is not None and now >= run.deadline_mono and not run.timed_out:
                    run.timed_out = True
                    self.logger.warning("gputracker: job %s timed out after %.1f s; terminating it",
                                        run.job.job_id, run.job.timeout_s)
                    self._terminate(run, now)
                self._kill_if_grace_over(run, now)
                continue
            # main process ended: its GPUs are released once nothing of the job is left
            if run.kill_sent or not _group_alive(pid):
                self._finish(pid, run)
            elif now >= run.next_group_check_mono:
                if run.term_sent_mono is None:
                    self.logger.info("gputracker: job %s left processes behind; terminating them", run.job.job_id)
                    self._terminate(run, now)
                self._kill_if_grace_over(run, now)
                run.next_group_check_mono = now + GROUP_CHECK_INTERVAL_S
                if run.kill_sent:
                    self._finish(pid, run)

    def _terminate(self, run: _Running, now: float) -> None:
        if run.term_sent_mono is None:
            run.term_sent_mono = now
            _signal_group(run.proc.pid, signal.SIGTERM)

    def _kill_if_grace_over(self, run: _Running, now: float) -> None:
        grace_s = 0.0 if self._stop_requests > 1 else self.kill_grace_s
        if run.term_sent_mono is not None and not run.kill_sent and now >= run.term_sent_mono + grace_s:
            run.kill_sent = True
            _signal_group(run.proc.pid, signal.SIGKILL)

    def _begin_stop(self, now: float) -> None:
        self._stopping = True
        self.logger.warning("gputracker: stop requested; terminating %d running job(s)", len(self._running))
        for run in self._running.values():
            if run.returncode is None:  # a job already ended on its own keeps its result
                run.interrupted = True
            self._terminate(run, now)

    def _kill_all_now(self) -> None:
        """Last resort on the way out of ``run``: nothing of ours survives us."""
        for pid, run in list(self._running.items()):
            run.interrupted = run.interrupted or run.returncode is None
            _signal_group(pid, signal.SIGKILL)
            if run.returncode is None:
                try:
                    run.returncode = run.proc.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    run.returncode = None
                run.end_time = time.time()
            if run.pidfd is not None:
                os.close(run.pidfd)
                run.pidfd = None
            self._finish(pid, run)

    def _finish(self, pid: int, run: _Running) -> None:
        del self._running[pid]
        for claim in run.claims:
            claim.release()
        for gpu in run.gpus:
            state = self._gpu_state[gpu]
            state.held_by = None
            # it was ours: one fresh read decides (see the module docstring)
            state.free_polls = self.max_check - 1
            state.release_grace = True
            if not self._stopping:
                self._observe(gpu, state)
        end_time = run.end_time if run.end_time is not None else time.time()
        result = JobResult(run.job.job_id, list(run.job.argv), run.returncode, run.gpus, run.start_time,
                           end_time, run.wait_s, run.timed_out, run.interrupted, run.job.log_path)
        self._finish_result(result)

    def _finish_result(self, result: JobResult) -> None:
        status = "succeeded" if result.succeeded else (
            "timed out" if result.timed_out else "interrupted" if result.interrupted else "failed")
        self.logger.info("gputracker: job %s %s (exit %s, %.1f s)", result.job_id, status,
                         result.returncode, result.runtime_s)
        self._record(result)
        self._call(self.on_job_end, result)

    def _record(self, result: JobResult) -> None:
        self._results.append(result)

    def _call(self, callback, arg) -> None:
        if callback is None:
            return
        try:
            callback(arg)
        except Exception:  # a buggy callback must not leave jobs unsupervised
            self.logger.exception("gputracker: callback %r raised", callback)

    def _seconds_to_next_event(self, now: float) -> float:
        events = []
        if not self._stopping:
            events.append(self._next_poll_mono)
            with self._queue_lock:
                events.extend(q.job.not_before for q in self._queue if q.job.not_before > now)
        grace_s = 0.0 if self._stop_requests > 1 else self.kill_grace_s
        for run in self._running.values():
            if run.returncode is None:
                if run.deadline_mono is not None and not run.timed_out:
                    events.append(run.deadline_mono)
                if run.term_sent_mono is not None and not run.kill_sent:
                    events.append(run.term_sent_mono + grace_s)
                if run.pidfd is None:
                    events.append(now + NO_PIDFD_REAP_INTERVAL_S)
            else:
                events.append(run.next_group_check_mono)
        if not events:
            return 1.0
        return min(max(0.0, min(events) - now), 60.0)


def _write_best_effort(handle, data: bytes) -> None:
    """A line of our own in a job's log; a full disk must not stop the job from launching
    (the job then meets the full disk itself, and says so in its own way)."""
    try:
        handle.write(data)
    except OSError:
        pass


def _pidfd_open(pid: int) -> int | None:
    """A descriptor that becomes readable when ``pid`` exits (Linux >= 5.3), else None."""
    try:
        return os.pidfd_open(pid)
    except (AttributeError, OSError):
        return None


def _signal_group(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def _group_alive(pgid: int) -> bool:
    """Whether any process of group ``pgid`` is still running. Zombies do not count: where
    PID 1 does not reap orphans (some containers), a dead grandchild stays a zombie."""
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return _has_running_member(pgid)


def _has_running_member(pgid: int) -> bool:
    try:
        entries = os.listdir("/proc")
    except OSError:
        return True  # no /proc: trust kill(0)
    for entry in entries:
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as f:
                stat = f.read()
        except OSError:
            continue
        # "pid (comm) state ppid pgrp ...": comm may contain spaces and parentheses
        fields = stat[stat.rfind(b")") + 2:].split()
        if len(fields) >= 3 and int(fields[2]) == pgid and fields[0] not in (b"Z", b"X"):
            return True
    return False
