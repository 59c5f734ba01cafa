"""The generic array backend: tasks as job arrays of a batch scheduler (Slurm, PBS, …).
Written once here: the frozen manifest, the submission directory, the submit → follow →
resubmit cycle, not submitting twice what an earlier array still runs, the progress line,
and Ctrl-C (stop following, never cancel). A scheduler fills a few hooks (`Scheduler`):
render its script, submit it, poll its tasks, cancel one, and say how a user follows or
cancels a job by hand (submitit's `Executor` with its `_submit_command` / `_make_submission_file_text`
hooks is the model).

Owns: `Scheduler` (the hooks), `TaskState` (one array task at one poll), `ArrayJob` (what a
script needs), `ArrayBackend`, `run_array` (submit and follow without a policy, for scripts
and tests), `ArrayOutcome`, and the files under `<output_dir>/<scheduler>/<timestamp>/`
(`manifest.json`, the script, `submitted.json`). Each task's end is reported to the
supervisor at the poll that sees it, and the retries the supervisor hands back go out as a
follow-up array at once, without waiting for the rest of their array.

Must not: decide anything about an ending (the supervisor does, from `Ending` kinds which each
scheduler maps its own states to); know models or metrics; read `sys.argv`.
"""
from __future__ import annotations

import abc
import json
import subprocess
import sys
import time
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Callable, ClassVar, Sequence

from esd.atomic_files import atomic_path, write_text_atomic
from esd.backends.base import WORKER_SCRIPT, Backend, BackendError, Ending, Hooks, Task, TaskResult

MANIFEST_NAME = "manifest.json"
SUBMITTED_NAME = "submitted.json"
MAX_POLL_FAILURES = 12  # consecutive failed polls (about a minute at 5 s) before giving up


# --------------------------------------------------------------------------- the hooks

@dataclass(frozen=True)
class TaskState:
    """One array task as the scheduler sees it at one poll."""
    running: bool = False            # started (pending otherwise), while `ending` is None
    ending: Ending | None = None     # set once it has ended; never changes afterwards
    returncode: int | None = None    # exit status when ended (negative: that signal); None: unknown
    word: str | None = None          # the scheduler's own word (`RUNNING`, `TIMEOUT`…), for messages

    @property
    def ended(self) -> bool:
        return self.ending is not None


LOST = TaskState(ending=Ending.LOST)


@dataclass(frozen=True)
class ArrayJob:
    """One array to submit: task i runs row i of `manifest_path`."""
    tasks: tuple[Task, ...]
    manifest_path: Path
    script_path: Path
    output_dir: Path
    log_dir: Path                    # the scheduler's own per-task logs go here
    workdir: Path                    # tasks run in this directory
    worker_script: Path
    python: str
    timeout_s: float | None = None   # one attempt's limit (the longest of its tasks)
    delay_s: float = 0.0             # start no task before this many seconds (retry backoff)


class Scheduler(abc.ABC):
    """What a batch scheduler fills in. Every method but `render` may run a command; a
    scheduler that cannot answer raises `error`, a `BackendError`."""
    name: ClassVar[str]              # "slurm": the submission directory, the log lines
    script_name: ClassVar[str]       # "job.sbatch"
    error: ClassVar[type[BackendError]] = BackendError

    def check(self) -> None:
        """Raise `error` when the scheduler cannot be used here (its commands are missing);
        called before anything is written."""

    @abc.abstractmethod
    def render(self, job: ArrayJob) -> str:
        """The script text submitted for `job` (readable, resubmittable by hand)."""

    @abc.abstractmethod
    def submit_command(self, job: ArrayJob) -> list[str]:
        """The exact argv that submits `job.script_path` (recorded in submitted.json)."""

    @abc.abstractmethod
    def submit(self, job: ArrayJob) -> str:
        """Submit the written script; returns the job id."""

    @abc.abstractmethod
    def poll(self, job_ids: Sequence[str]) -> dict[tuple[str, int], TaskState]:
        """(job id, task index) → state, for every task of these jobs the scheduler still
        knows. A task not listed has ended unseen (or its job is not listed yet)."""

    def active(self, job_ids: Sequence[str]) -> set[tuple[str, int]]:
        """The tasks of these jobs still pending or running (an earlier array's, on a rerun)."""
        return {where for where, state in self.poll(job_ids).items() if not state.ended}

    @abc.abstractmethod
    def cancel(self, job_id: str, index: int) -> None:
        """Stop one task of an array."""

    @abc.abstractmethod
    def follow_command(self, job_ids: Sequence[str]) -> str:
        """What a user types to see these jobs (`squeue --jobs=…`)."""

    @abc.abstractmethod
    def cancel_command(self, job_ids: Sequence[str]) -> str:
        """What a user types to cancel these jobs (`scancel …`)."""

    def task_logs(self, job: ArrayJob, job_id: str) -> str:
        """Where the scheduler's per-task logs of `job_id` are (a glob)."""
        return f"{job.log_dir}/{job_id}*"


# --------------------------------------------------------------------------- files

def manifest_data(tasks: Sequence[Task], created: str | None = None) -> dict:
    """The manifest: `tasks[i]` is what array task i runs (`argv` follows the worker script;
    the worker sends its output to `log_path`). Read by `esd_worker.read_manifest_task`.

    {"version": 1, "created": ISO time, "n_tasks": n,
     "tasks": [{"key": ..., "argv": [...], "result_path": absolute path,
                "log_path": absolute path or null}, ...]}
    """
    return {
        "version": 1,
        "created": created or datetime.now().isoformat(timespec="seconds"),
        "n_tasks": len(tasks),
        "tasks": [{"key": t.key, "argv": [str(a) for a in t.argv],
                   "result_path": str(Path(t.result_path).absolute()),
                   "log_path": str(Path(t.log_path).absolute()) if t.log_path else None}
                  for t in tasks],
    }


def manifest_tasks(path: Path) -> list[Task]:
    """The tasks of a written manifest, row by row."""
    rows = json.loads(Path(path).read_text(encoding="utf-8"))["tasks"]
    return [Task(row["key"], tuple(row["argv"]), Path(row["result_path"]),
                 Path(row["log_path"]) if row.get("log_path") else None) for row in rows]


def _new_submission_dir(base: Path, error: type[BackendError]) -> Path:
    """`<base>/<timestamp>`, made unique if two submissions share a second."""
    base.mkdir(parents=True, exist_ok=True)
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    for n in range(1000):
        path = base / (stamp if n == 0 else f"{stamp}-{n}")
        try:
            path.mkdir()
            return path
        except FileExistsError:
            continue
    raise error(f"cannot create a new submission directory under {base}")


def submissions(output_dir: Path, scheduler_name: str = "slurm") -> list[dict]:
    """Earlier submissions under an output directory (oldest first): the contents of each
    `submitted.json` plus `dir`, the submission's directory."""
    found = []
    for path in sorted((Path(output_dir) / scheduler_name).glob(f"*/{SUBMITTED_NAME}")):
        try:
            found.append({**json.loads(path.read_text(encoding="utf-8")), "dir": str(path.parent)})
        except (OSError, ValueError):
            continue
    return found


@dataclass(frozen=True)
class _Watched:
    """One array task being followed: its job, its row in that job's manifest, the task."""
    job_id: str
    index: int
    task: Task


def queued_tasks(scheduler: Scheduler, output_dir: Path, recent: int = 50) -> dict[str, _Watched]:
    """Task key → where it is queued, for tasks still pending or running in the `recent`
    latest arrays submitted for this output directory ({} when the scheduler cannot say)."""
    jobs = {str(s["job_id"]): Path(s["dir"]) for s in submissions(output_dir, scheduler.name)[-recent:]
            if s.get("job_id")}
    if not jobs:
        return {}
    try:
        active = scheduler.active(list(jobs))
    except (BackendError, subprocess.TimeoutExpired, OSError):
        return {}
    queued: dict[str, _Watched] = {}
    for job_id, sub_dir in jobs.items():
        indices = sorted(i for job, i in active if job == job_id)
        if not indices:
            continue
        try:
            rows = manifest_tasks(sub_dir / MANIFEST_NAME)
        except (OSError, ValueError, KeyError):
            continue
        for i in indices:
            if i < len(rows):
                queued[rows[i].key] = _Watched(job_id, i, rows[i])
    return queued


# --------------------------------------------------------------------------- progress

class _Progress:
    """A tqdm bar on a terminal; plain log lines otherwise (on change, at most every 30 s)."""

    def __init__(self, log: Callable[[str], None]):
        self.log = log
        self.bar = None
        self.last_line, self.last_time = "", float("-inf")
        if sys.stdout.isatty():
            from tqdm import tqdm
            self.bar = tqdm(total=0, unit="task", file=sys.stdout)

    def update(self, label: str, total: int, ended: int, counts: dict[str, int], final: bool = False) -> None:
        if self.bar is not None:
            self.bar.total, self.bar.n = total, ended
            self.bar.set_description(label, refresh=False)
            self.bar.set_postfix(counts, refresh=True)
            return
        line = (f"{label}: {ended}/{total} ended ({counts['done']} done, {counts['running']} running, "
                f"{counts['pending']} pending, {counts['failed']} failed)")
        due = time.monotonic() - self.last_time >= 30
        if line != self.last_line and (due or final):
            self.log(line)
            self.last_line, self.last_time = line, time.monotonic()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def _has_result(task: Task) -> bool:
    return Path(task.result_path).exists()


# --------------------------------------------------------------------------- the backend

class ArrayBackend(Backend):
    """Tasks as job arrays of `scheduler`. With `wait`, follows them, reports each start and
    each end at the poll that sees it, and submits the retries the supervisor hands back as a
    follow-up array (their backoff as the array's start delay); without `wait`, submits and
    returns (retries then happen when the command is run again).

    After `run`: `submitted` (the first array's ArrayJob and job id, or None), `results` (key →
    the last TaskResult seen), `finished` (False when following was stopped by Ctrl-C)."""

    def __init__(self, scheduler: Scheduler, output_dir: Path, *, wait: bool,
                 worker_script: Path = WORKER_SCRIPT, python: str = sys.executable,
                 poll_interval_s: float = 5.0, skip_queued: bool = True,
                 log: Callable[[str], None] = print):
        self.scheduler, self.name = scheduler, scheduler.name
        self.output_dir = Path(output_dir).absolute()
        self.wait, self.worker_script, self.python = wait, Path(worker_script), python
        self.poll_interval_s, self.skip_queued, self.log = poll_interval_s, skip_queued, log
        self.submitted: tuple[ArrayJob, str] | None = None
        self.results: dict[str, TaskResult] = {}
        self.finished = False
        self._live: dict[str, _Watched] = {}     # key -> where it runs now
        self._cancelled: set[str] = set()
        self._job_ids: list[str] = []            # every array followed, in order

    @property
    def waits(self) -> bool:
        return self.wait

    def run(self, tasks: Sequence[Task], hooks: Hooks) -> None:
        tasks = list(tasks)
        keys = [t.key for t in tasks]
        if len(set(keys)) != len(keys):
            duplicates = sorted({k for k in keys if keys.count(k) > 1})
            raise self.scheduler.error(f"duplicate task keys {duplicates}: each task must be unique")
        if not tasks:
            self.log(f"{self.name}: nothing to submit")
            self.finished = True
            return
        self.scheduler.check()  # before anything is written
        earlier, tasks = self._split_queued(tasks) if self.skip_queued else ([], tasks)
        watch = earlier + (self._submit(tasks) if tasks else [])
        if not tasks:
            self.log(f"{self.name}: nothing to submit")
        if self.wait:
            self._follow(watch, hooks)

    def cancel(self, key: str) -> None:
        watched = self._live.get(key)
        if watched is not None:
            self._cancelled.add(key)
            self.scheduler.cancel(watched.job_id, watched.index)

    # ------------------------------------------------------------------ submitting
    def _split_queued(self, tasks: list[Task]) -> tuple[list[_Watched], list[Task]]:
        """(the tasks still pending or running in an earlier array of this output directory, as
        watched there; the tasks to submit now)."""
        queued = queued_tasks(self.scheduler, self.output_dir)
        earlier = [queued[t.key] for t in tasks if t.key in queued]
        if earlier:
            jobs = sorted({w.job_id for w in earlier}, key=_job_order)
            self.log(f"{self.name}: {len(earlier)} task(s) already pending or running in job(s) "
                     f"{','.join(jobs)}; not submitted again (follow them: "
                     f"{self.scheduler.follow_command(jobs)})")
        return earlier, [t for t in tasks if t.key not in queued]

    def _submit(self, tasks: Sequence[Task]) -> list[_Watched]:
        """Write manifest + script, submit, say how to follow; the tasks as watched."""
        s = self.scheduler
        log_dir = self.output_dir / "logs" / s.name
        log_dir.mkdir(parents=True, exist_ok=True)
        sub_dir = _new_submission_dir(self.output_dir / s.name, s.error)
        limits = [t.timeout_s for t in tasks if t.timeout_s]
        job = ArrayJob(tuple(tasks), sub_dir / MANIFEST_NAME, sub_dir / s.script_name, self.output_dir,
                       log_dir, Path.cwd(), self.worker_script.absolute(), self.python,
                       timeout_s=max(limits) if limits else None, delay_s=max(t.delay_s for t in tasks))
        write_text_atomic(job.manifest_path, json.dumps(manifest_data(tasks), indent=1) + "\n")
        with atomic_path(job.script_path) as tmp:  # executable once it exists under its name
            tmp.write_text(s.render(job), encoding="utf-8")
            tmp.chmod(0o755)
        job_id = s.submit(job)
        write_text_atomic(sub_dir / SUBMITTED_NAME, json.dumps({
            "job_id": job_id, "n_tasks": len(tasks),
            "submitted_at": datetime.now().isoformat(timespec="seconds"),
            "command": s.submit_command(job)}, indent=1) + "\n")
        self.log(f"{s.name}: submitted job array {job_id} with {len(tasks)} task(s) (script {job.script_path})")
        self.log(f"  follow it:  {s.follow_command([job_id])}")
        self.log(f"  task logs:  tail -f {s.task_logs(job, job_id)}")
        self.log(f"  cancel it:  {s.cancel_command([job_id])}")
        self.log("  resume:     rerun the same command; only models without a result are submitted")
        if self.submitted is None:
            self.submitted = (job, job_id)
        return [_Watched(job_id, i, t) for i, t in enumerate(tasks)]

    # ------------------------------------------------------------------ following
    def _follow(self, watch: list[_Watched], hooks: Hooks) -> None:
        """Poll until no followed task is pending or running; report each start and end as
        it is seen; submit the follow-ups `hooks.on_end` hands back at once."""
        self._live = {w.task.key: w for w in watch}
        self._job_ids = sorted({w.job_id for w in watch}, key=_job_order)
        states: dict[str, TaskState] = {}          # key -> last state seen, this attempt
        started: dict[str, float] = {}
        listed: set[str] = set()                   # jobs the scheduler has listed at least once
        attempts = len(watch)
        last_poll = time.time()
        progress = _Progress(self.log)
        try:
            self.log(f"{self.name}: following {self._label()}; Ctrl-C stops following (the jobs keep running)")
            while self._live:
                found = self._poll(listed)
                now, follow_ups = time.time(), []
                for key, w in list(self._live.items()):
                    state = found.get((w.job_id, w.index), LOST)
                    states[key] = state
                    if (state.running or state.ended) and key not in started:
                        started[key] = last_poll   # it started after the previous poll
                        hooks.on_start(w.task, last_poll)
                    if state.ended:
                        del self._live[key]
                        follow_ups += hooks.on_end(self._result(w, state, started[key], now))
                hooks.on_tick()
                if follow_ups:
                    added = self._submit(follow_ups)
                    attempts += len(added)
                    self._live.update({w.task.key: w for w in added})
                    self._job_ids.append(added[0].job_id)
                    for w in added:
                        started.pop(w.task.key, None)
                        states.pop(w.task.key, None)
                progress.update(self._label(), attempts, attempts - len(self._live),
                                self._counts(states), final=not self._live)
                last_poll = now
                if self._live:
                    time.sleep(self.poll_interval_s)
            self.finished = True
            self._log_ended()
        except KeyboardInterrupt:
            progress.close()
            self.log(f"\nstopped following {self._label()}; it keeps running. "
                     f"Cancel it with: {self.scheduler.cancel_command(self._job_ids)}")
        finally:
            progress.close()

    def _poll(self, listed: set[str]) -> dict[tuple[str, int], TaskState]:
        """The live tasks' states; a scheduler that cannot answer is asked again, up to
        MAX_POLL_FAILURES times in a row."""
        failures = 0
        while True:
            jobs = sorted({w.job_id for w in self._live.values()}, key=_job_order)
            try:
                found = self.scheduler.poll(jobs)
                listed.update(job for job, _ in found)
                unseen = [job for job in jobs if job not in listed]
                if not unseen:
                    return found
                # just submitted: not listed yet (a job listed once and gone has ended)
                raise self.scheduler.error(f"{self.name} does not list job(s) {','.join(unseen)} yet")
            except (BackendError, subprocess.TimeoutExpired, OSError) as exc:
                failures += 1
                if failures == MAX_POLL_FAILURES:
                    raise self.scheduler.error(
                        f"lost track of {self._label()}: {exc}. It may still be running: check with "
                        f"`{self.scheduler.follow_command(self._job_ids)}`") from exc
                self.log(f"warning: cannot query {self.name} about {self._label()} ({exc}); retrying")
                time.sleep(self.poll_interval_s)

    def _result(self, w: _Watched, state: TaskState, started: float, now: float) -> TaskResult:
        cancelled = w.task.key in self._cancelled
        self._cancelled.discard(w.task.key)
        result = TaskResult(w.task, state.returncode, started, now,
                            ending=Ending.CANCELLED if cancelled else state.ending, word=state.word)
        self.results[w.task.key] = result
        return result

    def _label(self) -> str:
        return f"{self.name} job{'s' if len(self._job_ids) > 1 else ''} {','.join(self._job_ids)}"

    def _counts(self, states: dict[str, TaskState]) -> dict[str, int]:
        counts = {"done": 0, "running": 0, "pending": 0, "failed": 0}
        for key, state in states.items():
            if state.ended:
                counts["done" if key in self.results and _has_result(self.results[key].task) else "failed"] += 1
            else:
                counts["running" if state.running else "pending"] += 1
        return counts

    def _log_ended(self) -> None:
        done, failed, missing = split_results(self.results.values())
        self.log(f"{self._label()} ended: {len(done)} done, {len(failed)} failed, {len(missing)} without result")
        for key in failed:
            self.log(f"  failed: {key} ({self.results[key].word or self.results[key].ending.value})")
        for key in missing:
            self.log(f"  no result: {key} ({self.results[key].word or 'state unknown'})")
        if failed or missing:
            self.log(f"  see the task logs under {self.output_dir / 'logs' / self.name}/ (task numbers are "
                     f"rows of {self.output_dir / self.name}/<timestamp>/{MANIFEST_NAME})")


def _job_order(job_id: str):
    return (0, int(job_id), "") if job_id.isdigit() else (1, 0, job_id)


def split_results(results) -> tuple[tuple[str, ...], tuple[str, ...], tuple[str, ...]]:
    """(done: a result file, failed: an ending other than success, missing: ended well or
    unseen yet wrote no result) of each task's last attempt."""
    done, failed, missing = [], [], []
    for result in results:
        if _has_result(result.task):
            done.append(result.key)
        elif result.ending in (Ending.SUCCEEDED, Ending.LOST):
            missing.append(result.key)
        else:
            failed.append(result.key)
    return tuple(done), tuple(failed), tuple(missing)


# --------------------------------------------------------------------------- without a policy

@dataclass(frozen=True)
class ArrayOutcome:
    """How one `run_array` ended."""
    job_id: str | None            # the array submitted; None when nothing was
    n_tasks: int                  # tasks in that array
    done: tuple[str, ...] = ()    # keys whose result_path exists
    failed: tuple[str, ...] = ()  # keys whose task ended in a failure, without result
    missing: tuple[str, ...] = ()  # keys without result whose task ended well or unseen
    states: dict[str, str] = field(default_factory=dict)  # key → the scheduler's last word
    finished: bool = False        # every followed task ended while we followed (wait=True)
    manifest_path: Path | None = None
    script_path: Path | None = None
    exit_codes: dict[str, int] = field(default_factory=dict)  # key → exit status, when known


def run_array(scheduler: Scheduler, tasks: Sequence[Task], output_dir: Path, *, wait: bool,
              worker_script: Path = WORKER_SCRIPT, python: str = sys.executable,
              poll_interval_s: float = 5.0, skip_queued: bool = True,
              log: Callable[[str], None] = print) -> ArrayOutcome:
    """Submit `tasks` as one job array and, with `wait`, follow it to its end; no retries.

    With `skip_queued`, a task whose key is still pending or running in an earlier array
    submitted for the same output directory is not submitted again (rerunning the command
    while an array runs must not start every model twice); with `wait` it is followed in
    that earlier array, and counted like the new ones."""
    backend = ArrayBackend(scheduler, output_dir, wait=wait, worker_script=worker_script, python=python,
                           poll_interval_s=poll_interval_s, skip_queued=skip_queued, log=log)
    backend.run(tasks, Hooks())
    job, job_id = backend.submitted or (None, None)
    where = dict(job_id=job_id, n_tasks=len(job.tasks) if job else 0,
                 manifest_path=job.manifest_path if job else None, script_path=job.script_path if job else None)
    if not wait or not backend.finished:
        done = tuple(t.key for t in tasks if _has_result(t)) if wait else ()
        return ArrayOutcome(**where, done=done, finished=backend.finished and not tasks)
    order = {t.key: n for n, t in enumerate(tasks)}
    results = sorted(backend.results.values(), key=lambda r: order.get(r.key, len(order)))
    done, failed, missing = split_results(results)
    return ArrayOutcome(**where, done=done, failed=failed, missing=missing, finished=True,
                        states={r.key: r.word or "UNKNOWN" for r in results},
                        exit_codes={r.key: r.returncode for r in results if r.returncode is not None})
