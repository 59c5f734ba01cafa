"""The Slurm hooks of the array backend (`esd/backends/array.py`): worker tasks as Slurm
job arrays. Renders a readable sbatch script, submits it with `sbatch --parsable`, polls
`squeue` (and `scontrol` for exit codes and when squeue cannot say), cancels with `scancel`,
and maps Slurm's job states to the closed set of `Ending` kinds.

Owns: `SlurmSettings` (the sbatch options), `SlurmScheduler` (the hooks), `SlurmError`, the
script text (`render_script`), Slurm's state words (`TERMINAL_STATES`, `ENDINGS`), and the
`--backend slurm` row's construction (`from_config`). Knows nothing about models or metrics
and decides nothing: following, resubmitting, the manifest and the progress display are the
array backend's; what an ending means is the supervisor's. Never reads `sys.argv`.

Why plain `sbatch` and not submitit: the job is a short generated bash script a user can
read, test and resubmit by hand (`sbatch <output_dir>/slurm/<ts>/job.sbatch`), and each
task runs `esd_worker.py --manifest M --task_index I` with the worker's own CLI, reading
its arguments from a JSON file (model ids never pass through a shell). submitit would
pickle a Python callable per task, which makes the tasks opaque, requires the cluster's
Python to unpickle our objects, and adds a dependency. We keep its good habits: generated
script text we test, unknown options rejected with the valid ones, files written to a
temporary name and renamed, a scheduler as a few hooks under one executor.

Following a job: `sacct` needs accounting, which many clusters (and our test cluster) do
not have, so the state comes from `squeue --states=all` and `scontrol show job`.
"""
from __future__ import annotations

import math
import re
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass, fields, replace
from datetime import datetime
from pathlib import Path
from typing import Callable, Sequence

from esd.backends.array import (WORKER_SCRIPT, ArrayBackend, ArrayJob, ArrayOutcome, Scheduler, TaskState,
                                manifest_data, submissions)
from esd.backends.base import BackendError, Ending, Task

DEFAULT_WORKER_SCRIPT = WORKER_SCRIPT
SCRIPT_NAME = "job.sbatch"

# Slurm states after which a task will not run again. Everything else (PENDING, RUNNING,
# CONFIGURING, COMPLETING, SUSPENDED, REQUEUED, ...) counts as still active.
TERMINAL_STATES = frozenset({
    "COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "OUT_OF_MEMORY", "NODE_FAIL",
    "PREEMPTED", "BOOT_FAIL", "DEADLINE", "REVOKED",
})
RUNNING_STATES = frozenset({"RUNNING", "COMPLETING", "CONFIGURING", "SUSPENDED", "STOPPED"})
# Slurm's words for an ending, in the closed set of kinds the supervisor understands
ENDINGS = {
    "COMPLETED": Ending.SUCCEEDED, "FAILED": Ending.FAILED, "CANCELLED": Ending.CANCELLED,
    "REVOKED": Ending.CANCELLED, "TIMEOUT": Ending.TIMED_OUT, "DEADLINE": Ending.TIMED_OUT,
    "OUT_OF_MEMORY": Ending.OUT_OF_MEMORY, "NODE_FAIL": Ending.NODE_FAILURE,
    "BOOT_FAIL": Ending.NODE_FAILURE, "PREEMPTED": Ending.PREEMPTED,
}
EXIT_TIMEOUT = 124  # coreutils `timeout`: the script's own limit of one attempt (--timeout)
# Options the backend sets itself; passing them through `extra` would break the
# array/manifest/log contract.
_MANAGED_OPTIONS = {
    "--array": "the array is built from the task list",
    "-a": "the array is built from the task list",
    "--output": "task logs go to <output_dir>/logs/slurm/",
    "-o": "task logs go to <output_dir>/logs/slurm/",
    "--chdir": "tasks run in the submitting directory",
    "-D": "tasks run in the submitting directory",
    "--parsable": "always used",
    "--wrap": "the backend writes the script",
}


class SlurmError(BackendError):
    """Slurm cannot be used or refused the job; the message says why and what to do."""


@dataclass(frozen=True)
class SlurmSettings:
    partition: str | None = None        # --partition (cluster default when None)
    time: str | None = None             # --time, e.g. "02:00:00" or "1-00:00:00"
    gres: str | None = None             # --gres, e.g. "gpu:1"
    array_parallelism: int | None = None  # the %K of --array=0-N%K: tasks running at once
    extra: tuple[str, ...] = ()         # more sbatch arguments, already split ("--mem=8G", ...)
    job_name: str = "esd"
    begin_delay_s: float = 0.0          # --begin=now+N: a follow-up array's retry backoff

    def validate(self) -> "SlurmSettings":
        """Raise SlurmError naming the bad value; `run_array` calls this before anything,
        so callers get the message where they already handle SlurmError."""
        if self.array_parallelism is not None and (
                not isinstance(self.array_parallelism, int) or self.array_parallelism < 1):
            raise SlurmError(f"array_parallelism must be a positive integer, "
                             f"got {self.array_parallelism!r}")
        if isinstance(self.extra, str):
            raise SlurmError("extra must be a tuple of arguments; split a string with "
                             "esd.backends.slurm.split_extra()")
        for value in self.extra:
            option = value.split("=", 1)[0]
            if option in _MANAGED_OPTIONS or (
                    option[:2] in _MANAGED_OPTIONS and not option.startswith("--")):
                name = option if option in _MANAGED_OPTIONS else option[:2]
                raise SlurmError(f"extra sbatch argument {value!r} is not allowed: "
                                 f"{_MANAGED_OPTIONS[name]}")
        for name in ("partition", "time", "gres", "job_name"):
            value = getattr(self, name)
            if value is not None and (not str(value).strip() or "\n" in str(value)):
                raise SlurmError(f"{name} must be a non-empty single line, got {value!r}")
        return self

    @classmethod
    def from_options(cls, **options) -> "SlurmSettings":
        """Build settings from keyword options, rejecting unknown ones with the valid list.

        `extra` may be a string or a list of strings; each is split like a shell would
        (`"--mem=8G --qos 'high prio'"` → `("--mem=8G", "--qos", "high prio")`).
        """
        valid = [f.name for f in fields(cls)]
        unknown = sorted(set(options) - set(valid))
        if unknown:
            raise SlurmError(f"unknown Slurm option(s) {unknown}; valid options: {valid}")
        if "extra" in options:
            options["extra"] = split_extra(options["extra"])
        return cls(**{k: v for k, v in options.items() if v is not None}).validate()


SlurmOutcome = ArrayOutcome   # how one `run_array` ended


def split_extra(values: str | Sequence[str] | None) -> tuple[str, ...]:
    """`--slurm_extra` value(s) → sbatch arguments, split like a shell (no shell runs)."""
    if values is None:
        return ()
    if isinstance(values, str):
        values = [values]
    return tuple(arg for value in values for arg in shlex.split(value))


# --------------------------------------------------------------------------- the script

def time_limit(settings: SlurmSettings, timeout_s: float | None) -> str | None:
    """sbatch --time: `--slurm_time` when given, else derived from the per-model --timeout
    (whole minutes, rounded up, plus two for starting Python and loading; Slurm counts in
    minutes). The exact limit is the script's own `timeout` of the worker."""
    if settings.time:
        return settings.time
    if not timeout_s:
        return None
    return str(math.ceil(timeout_s / 60) + 2)


def array_spec(n_tasks: int, parallelism: int | None) -> str:
    """`0-{n-1}` plus `%K` when at most K tasks may run at once."""
    spec = f"0-{n_tasks - 1}"
    return f"{spec}%{parallelism}" if parallelism else spec


def sbatch_command(script_path: Path, settings: SlurmSettings) -> list[str]:
    """The exact argv used to submit (no shell): extra args go on sbatch's command line."""
    begin = [f"--begin=now+{math.ceil(settings.begin_delay_s)}"] if settings.begin_delay_s > 0 else []
    return ["sbatch", "--parsable", *begin, *settings.extra, str(script_path)]


def _quote(value: str) -> str:
    """One bash word for `value`: shlex.quote, or `$'...'` escapes when it holds a control
    character (a newline inside quotes would be safe, yet read like a line of its own)."""
    if not re.search(r"[\x00-\x1f\x7f]", value):
        return shlex.quote(value)
    escaped = "".join(c if c.isprintable() and c not in "\\'" else
                      "\\" + c if c in "\\'" else f"\\x{ord(c):02x}" for c in value)
    return f"$'{escaped}'"


def _comment(text: str) -> str:
    """A value shown in a `#` comment line: one line, whatever it holds (a newline in a path
    must not end the comment and become a command)."""
    return text.encode("unicode_escape").decode("ascii")


def render_script(*, n_tasks: int, settings: SlurmSettings, manifest_path: Path,
                  output_dir: Path, workdir: Path, worker_script: Path, python: str,
                  script_path: Path, created: str | None = None,
                  timeout_s: float | None = None) -> str:
    """The sbatch script: a comment header, #SBATCH lines, one `exec` of the worker (under
    coreutils `timeout` when there is a per-model limit). Every value is quoted; a value
    that an #SBATCH line cannot carry (a newline) is refused."""
    q = _quote
    log_pattern = output_dir / "logs" / "slurm" / "%A_%a.log"
    submit = shlex.join(sbatch_command(script_path, settings))
    created = created or datetime.now().isoformat(timespec="seconds")
    for what, value in (("--output_dir", str(output_dir)), ("the working directory", str(workdir))):
        if "\n" in value or "\r" in value:
            raise SlurmError(f"{what} {value!r} holds a line break, which an #SBATCH line cannot "
                             f"carry; use a directory without one")
    limit = time_limit(settings, timeout_s)
    run_worker = f"{q(python)} {q(str(worker_script))} --manifest {q(str(manifest_path))} " \
                 f'--task_index "$SLURM_ARRAY_TASK_ID"'
    if timeout_s:  # exit 124 when the limit is reached (SIGKILL 30 s after SIGTERM)
        run_worker = f"timeout --kill-after=30 {timeout_s:g} {run_worker}"
    lines = [
        "#!/bin/bash",
        "# ESD experiment as a Slurm job array: one task per model, task i runs row i of",
        f"# {_comment(str(manifest_path))}",
        f"# Generated by esd/backends/slurm.py on {created} for {n_tasks} task(s).",
        f"# Submitted with: {_comment(submit)}",
        "# Resubmitting this file by hand reruns the same tasks; rerunning the experiment",
        "# command instead submits only the models that have no result yet.",
        f"#SBATCH --job-name={q(settings.job_name)}",
        f"#SBATCH --array={array_spec(n_tasks, settings.array_parallelism)}",
    ]
    if settings.partition:
        lines.append(f"#SBATCH --partition={q(settings.partition)}")
    if limit:
        lines.append(f"#SBATCH --time={q(limit)}")
    if settings.gres:
        lines.append(f"#SBATCH --gres={q(settings.gres)}")
    lines += [
        f"#SBATCH --output={q(str(log_pattern))}",
        f"#SBATCH --chdir={q(str(workdir))}",
        "",
        'echo "[esd] job ${SLURM_ARRAY_JOB_ID}_${SLURM_ARRAY_TASK_ID} on $(hostname)'
        ' at $(date -Is), CUDA_VISIBLE_DEVICES=${CUDA_VISIBLE_DEVICES:-}"',
        f"exec {run_worker}",
        "",
    ]
    return "\n".join(lines)


# --------------------------------------------------------------------------- Slurm calls

def _require(command: str) -> str:
    path = shutil.which(command)
    if path is None:
        raise SlurmError(
            f"`{command}` not found on PATH: the Slurm backend must run where Slurm's "
            f"client commands are installed (a cluster login node). Use --backend local "
            f"to run on this machine, or install Slurm (Debian/Ubuntu: apt-get install "
            f"slurm-wlm; for tests: tests/slurm_local.sh start).")
    return path


def submit(script_path: Path, settings: SlurmSettings) -> str:
    """Submit with `sbatch --parsable`; returns the job id, or raises with sbatch's words."""
    argv = sbatch_command(script_path, settings)
    argv[0] = _require("sbatch")
    try:
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=120)
    except subprocess.TimeoutExpired as exc:
        raise SlurmError(f"sbatch did not answer within 120 s (is slurmctld up?): "
                         f"{shlex.join(argv)}") from exc
    if proc.returncode != 0:
        message = (proc.stderr or proc.stdout).strip()
        if "array" in message.lower():
            message += _array_size_hint()
        raise SlurmError(f"sbatch rejected the job array (exit {proc.returncode}):\n"
                         f"{message}\nscript: {script_path}\ncommand: {shlex.join(argv)}")
    job_id = proc.stdout.strip().split(";")[0]  # --parsable: "ID" or "ID;cluster"
    if not re.fullmatch(r"\d+", job_id):
        raise SlurmError(f"sbatch printed no job id (stdout {proc.stdout!r}, "
                         f"stderr {proc.stderr!r})")
    return job_id


def _array_size_hint() -> str:
    """Why an array can be refused: more tasks than the cluster's MaxArraySize allows."""
    try:
        proc = subprocess.run([_require("scontrol"), "show", "config"], capture_output=True,
                              text=True, timeout=30)
        found = re.search(r"^MaxArraySize\s*=\s*(\d+)", proc.stdout, re.MULTILINE)
    except (SlurmError, subprocess.TimeoutExpired):
        found = None
    if not found:
        return ""
    return (f"\n(this cluster's MaxArraySize is {found.group(1)}: an array holds at most "
            f"{found.group(1)} tasks; run the first models with --limit, then "
            f"rerun the command for the rest)")


def _expand_indices(text: str) -> list[int]:
    """`3`, `2-5`, `[2-5%2]`, `1,4-6` → task indices (the %K throttle is ignored)."""
    text = text.strip("[]").split("%")[0]
    indices: list[int] = []
    for part in filter(None, text.split(",")):
        low, _, high = part.partition("-")
        if low.isdigit() and (not high or high.isdigit()):
            indices.extend(range(int(low), int(high or low) + 1))
    return indices


def squeue_states(job_ids: Sequence[str]) -> dict[tuple[str, int], str]:
    """(job id, task index) → state for every task squeue still knows (`--states=all`);
    a job finished and purged from the controller is not listed. Raises SlurmError when
    squeue itself fails (controller unreachable, ...)."""
    argv = [_require("squeue"), "-h", "-r", f"--jobs={','.join(job_ids)}", "--states=all", "-o", "%i %T"]
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=60)
    if proc.returncode != 0:
        if "Invalid job id" in proc.stderr:  # every one of them purged
            return {}
        raise SlurmError(f"squeue failed (exit {proc.returncode}): {proc.stderr.strip()}")
    return _parse_squeue_lines(proc.stdout)


def _parse_squeue_lines(text: str) -> dict[tuple[str, int], str]:
    states: dict[tuple[str, int], str] = {}
    for line in text.splitlines():
        parts = line.split()
        if len(parts) != 2:
            continue
        ident, state = parts
        array_id, _, index = ident.partition("_")
        for i in _expand_indices(index) if index else ():
            states[(array_id, i)] = state
    return states


def _parse_squeue(text: str, job_id: str) -> dict[int, str]:
    return {i: state for (job, i), state in _parse_squeue_lines(text).items() if job == job_id}


def scontrol_tasks(job_id: str) -> dict[int, tuple[str, int | None]] | None:
    """Task index → (state, exit status) from `scontrol -o show job` (`ExitCode=status:signal`;
    a signal gives -signal; None while it runs). None: the job is purged from the controller."""
    argv = [_require("scontrol"), "-o", "show", "job", job_id]
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=60)
    if proc.returncode != 0:
        if "Invalid job id" in proc.stderr:
            return None
        raise SlurmError(f"scontrol failed (exit {proc.returncode}): {proc.stderr.strip()}")
    tasks: dict[int, tuple[str, int | None]] = {}
    for line in proc.stdout.splitlines():
        found = dict(re.findall(r"(\w+)=(\S*)", line))
        if found.get("ArrayJobId") != job_id or "JobState" not in found:
            continue
        status, _, sig = found.get("ExitCode", "").partition(":")
        code = None
        if status.isdigit() and found["JobState"] in TERMINAL_STATES:
            code = -int(sig) if sig.isdigit() and int(sig) else int(status)
        for i in _expand_indices(found.get("ArrayTaskId", "")):
            tasks[i] = (found["JobState"], code)
    return tasks


def task_state(word: str, returncode: int | None = None) -> TaskState:
    """A Slurm state word (and exit status) as a `TaskState` with its `Ending` kind."""
    if word not in TERMINAL_STATES:
        return TaskState(running=word in RUNNING_STATES, word=word)
    ending = ENDINGS[word]
    if ending is Ending.FAILED and returncode == EXIT_TIMEOUT:
        ending = Ending.TIMED_OUT   # the script's own `timeout` of one attempt
    return TaskState(ending=ending, returncode=returncode, word=word)


# --------------------------------------------------------------------------- the hooks

class SlurmScheduler(Scheduler):
    """The array backend's hooks for Slurm (sbatch, squeue, scontrol, scancel)."""
    name = "slurm"
    script_name = SCRIPT_NAME
    error = SlurmError

    def __init__(self, settings: SlurmSettings):
        self.settings = settings.validate()
        self._ended: dict[tuple[str, int], TaskState] = {}   # endings with their exit status, once known

    def check(self) -> None:
        _require("sbatch")

    def _settings(self, job: ArrayJob) -> SlurmSettings:
        return replace(self.settings, begin_delay_s=job.delay_s)

    def render(self, job: ArrayJob) -> str:
        return render_script(n_tasks=len(job.tasks), settings=self._settings(job), manifest_path=job.manifest_path,
                             output_dir=job.output_dir, workdir=job.workdir, worker_script=job.worker_script,
                             python=job.python, script_path=job.script_path, timeout_s=job.timeout_s)

    def submit_command(self, job: ArrayJob) -> list[str]:
        return sbatch_command(job.script_path, self._settings(job))

    def submit(self, job: ArrayJob) -> str:
        return submit(job.script_path, self._settings(job))

    def poll(self, job_ids: Sequence[str]) -> dict[tuple[str, int], TaskState]:
        """squeue for the states; scontrol for the exit status of a task seen ended for the
        first time, and for the jobs squeue does not list (or when squeue fails)."""
        try:
            words = squeue_states(job_ids)
        except (SlurmError, subprocess.TimeoutExpired):
            words = {}
        listed = {job for job, _ in words}
        ask = {job for (job, i), word in words.items() if word in TERMINAL_STATES and (job, i) not in self._ended}
        found = {where: task_state(word) for where, word in words.items()}
        for job in sorted(ask | (set(job_ids) - listed)):
            for i, (word, code) in (scontrol_tasks(job) or {}).items():
                found[(job, i)] = task_state(word, code)
                if found[(job, i)].ended:
                    self._ended[(job, i)] = found[(job, i)]
        found.update({where: state for where, state in self._ended.items() if where in found})
        return found

    def active(self, job_ids: Sequence[str]) -> set[tuple[str, int]]:
        return {where for where, word in squeue_states(job_ids).items() if word not in TERMINAL_STATES}

    def cancel(self, job_id: str, index: int) -> None:
        subprocess.run([_require("scancel"), f"{job_id}_{index}"], capture_output=True, timeout=60)

    def follow_command(self, job_ids: Sequence[str]) -> str:
        return f"squeue --jobs={','.join(job_ids)}"

    def cancel_command(self, job_ids: Sequence[str]) -> str:
        return f"scancel {' '.join(job_ids)}"

    def task_logs(self, job: ArrayJob, job_id: str) -> str:
        return f"{shlex.quote(str(job.log_dir))}/{job_id}_*.log"


# --------------------------------------------------------------------------- entry points

class SlurmBackend(ArrayBackend):
    """The array backend on Slurm."""

    def __init__(self, settings: SlurmSettings, output_dir: Path, *, wait: bool,
                 worker_script: Path = DEFAULT_WORKER_SCRIPT, python: str = sys.executable,
                 poll_interval_s: float = 5.0, log: Callable[[str], None] = print):
        super().__init__(SlurmScheduler(settings), output_dir, wait=wait, worker_script=worker_script,
                         python=python, poll_interval_s=poll_interval_s, log=log)


def run_array(tasks: Sequence[Task], output_dir: Path, settings: SlurmSettings, *, wait: bool,
              worker_script: Path = DEFAULT_WORKER_SCRIPT, python: str = sys.executable,
              poll_interval_s: float = 5.0, skip_queued: bool = True,
              log: Callable[[str], None] = print) -> ArrayOutcome:
    """`esd.backends.array.run_array` on Slurm: submit `tasks` as one job array (task i runs
    manifest row i) and, with `wait`, follow it to its end. Writes
    `<output_dir>/slurm/<timestamp>/{manifest.json, job.sbatch, submitted.json}`; raises
    SlurmError when the settings are bad, sbatch is missing or rejects the job."""
    from esd.backends.array import run_array as run
    return run(SlurmScheduler(settings), tasks, output_dir, wait=wait, worker_script=worker_script,
               python=python, poll_interval_s=poll_interval_s, skip_queued=skip_queued, log=log)


def from_config(config, worker_script: Path = DEFAULT_WORKER_SCRIPT) -> ArrayBackend:
    """`--backend slurm`: the `--slurm_*` flags and `--wait` of the experiment's config."""
    import logging
    try:
        settings = SlurmSettings.from_options(
            partition=config.slurm_partition, time=config.slurm_time, gres=config.slurm_gres,
            array_parallelism=config.slurm_array_parallelism, extra=config.slurm_extra)
    except ValueError as exc:  # --slurm_extra with an open quote
        raise SlurmError(f"--slurm_extra: {exc}") from None
    return SlurmBackend(settings, config.output_dir, wait=config.wait, worker_script=worker_script,
                        log=logging.getLogger("esd_experiment").info)


__all__ = ["SlurmError", "SlurmSettings", "SlurmScheduler", "SlurmBackend", "SlurmOutcome", "run_array",
           "render_script", "sbatch_command", "split_extra", "manifest_data", "submissions"]
