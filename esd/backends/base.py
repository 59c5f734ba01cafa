"""The one interface every backend implements (modelled on submitit's `Executor`).

Owns: `Task` (what to run: a key, the worker's arguments, the file whose existence means
success, the log file, the limits), `Ending` (the closed set of ways a task can end, in no
scheduler's words), `TaskResult` (how one run of a task ended), `Backend`, and
`WORKER_SCRIPT`, the project's worker every task runs. A backend only starts tasks and
reports how they ended; it decides nothing. Retries, the stall watchdog and the
classification of an ending into done / a typed failure live above the backends
(`esd/supervisor.py`), so every backend gets them. A batch scheduler (PBS, …) is not a new
`Backend` but a few hooks of the array backend (`esd/backends/array.py`).
"""
from __future__ import annotations

import abc
import enum
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, ClassVar, Sequence


# What every task runs: a checkout's `esd_worker.py` beside the package, else the installed
# package's own worker module (`esd/cli/worker.py`, runnable as a file).
WORKER_SCRIPT = next(path for path in (Path(__file__).resolve().parents[2] / "esd_worker.py",
                                       Path(__file__).resolve().parents[1] / "cli" / "worker.py")
                     if path.is_file())


class BackendError(RuntimeError):
    """The backend cannot be used or refused the work; the message says why and what to do."""


@dataclass(frozen=True)
class Task:
    key: str                       # what the task is for (a model key); unique in one run
    argv: tuple[str, ...]          # the worker's arguments (after `python esd_worker.py`)
    result_path: Path              # exists <=> the task succeeded (written atomically)
    log_path: Path | None = None   # the worker's own output (stdout and stderr)
    timeout_s: float | None = None  # wall-clock limit of one attempt; the backend enforces it
    attempt: int = 1               # 1 for the first run, 2 for the first retry, ...
    delay_s: float = 0.0           # do not start before this many seconds from now (backoff)
    env: tuple[tuple[str, str], ...] = ()  # extra environment variables of the worker
    # not started before ready() is true (its model's files are being downloaded: esd/download_stage.py)
    ready: Callable[[], bool] | None = field(default=None, compare=False)


class Ending(enum.Enum):
    """How one attempt of a task ended, as the backend saw it. Each backend maps its own
    words to these (`TIMEOUT` in Slurm, a timer in gputracker, `Exit_status=-29` in PBS…);
    the supervisor (`esd/supervisor.py`) decides from these alone, so it needs no scheduler's
    vocabulary. The set is closed: a backend picks the nearest kind and keeps its own word in
    `TaskResult.word` for messages."""
    SUCCEEDED = "succeeded"          # exit status 0 (the result file still decides "done")
    FAILED = "failed"                # exit status != 0, or killed by a signal nobody sent on purpose
    TIMED_OUT = "timed_out"          # stopped at its time limit (ours or the scheduler's)
    CANCELLED = "cancelled"          # stopped on purpose: the supervisor's `cancel`, or a user (scancel)
    INTERRUPTED = "interrupted"      # stopped because the run was stopped (Ctrl-C, SIGTERM)
    OUT_OF_MEMORY = "out_of_memory"  # killed by the scheduler for exceeding its memory
    NODE_FAILURE = "node_failure"    # its machine failed or did not boot
    PREEMPTED = "preempted"          # made way for other work
    NO_SPACE = "no_space"            # could not even start for want of disk space (its log file)
    LOST = "lost"                    # ended, but nobody can say how (the scheduler forgot it)


@dataclass(frozen=True)
class TaskResult:
    """How one attempt of a task ended, as the backend saw it (no judgement)."""
    task: Task
    returncode: int | None         # exit status; negative: killed by that signal; None: unknown
    start_time: float | None = None  # time.time() epochs; None: never started
    end_time: float | None = None
    ending: Ending = Ending.LOST
    word: str | None = None        # the backend's own word for the ending (a Slurm state, ...): messages only

    @property
    def key(self) -> str:
        return self.task.key


# The supervisor's hooks: a task started; a task ended (returns the tasks to run next, i.e.
# its retry, or nothing); and a periodic tick while tasks run (the watchdog: it may call
# `Backend.cancel`).
OnStart = Callable[[Task, float], None]
OnEnd = Callable[[TaskResult], Sequence[Task]]
OnTick = Callable[[], None]


@dataclass
class Hooks:
    on_start: OnStart = lambda task, when: None
    on_end: OnEnd = lambda result: ()
    on_tick: OnTick = lambda: None
    tick_interval_s: float = 5.0


class Backend(abc.ABC):
    """Runs tasks; reports each start and each end through `Hooks`.

    `run` returns once every task (and every task `on_end` handed back) has ended, or when
    the run is stopped; `waits` says whether it follows tasks to their end at all (a Slurm
    array submitted without `--wait` does not: `run` returns after submitting).
    """
    name: ClassVar[str]

    @property
    def waits(self) -> bool:
        return True

    @abc.abstractmethod
    def run(self, tasks: Sequence[Task], hooks: Hooks) -> None:
        """Start `tasks`, report through `hooks`, return when they have all ended."""

    @abc.abstractmethod
    def cancel(self, key: str) -> None:
        """Stop the running task `key` (its end is then reported as `Ending.CANCELLED`)."""

    def waiting_reasons(self) -> list[str]:
        """Why tasks that could start have not, one short line each (for the progress display;
        any thread). Empty by default."""
        return []

    def write_metrics(self, path: Path) -> None:
        """Write what the backend measured (GPU waits, ...), if anything; a no-op by default."""
