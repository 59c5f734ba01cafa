"""The Slurm backend: worker tasks as Slurm job arrays. Freeze the tasks, write a readable
sbatch script, submit it, and (with `wait`) follow it until every task has ended, reporting
each start and end to the supervisor; retries it hands back go out as a follow-up array.

Owns: `SlurmSettings`, `SlurmBackend`, `SlurmOutcome` (one array's ending), `SlurmError`,
`run_array`, and the files under `<output_dir>/slurm/<timestamp>/` (`manifest.json`,
`job.sbatch`, `submitted.json`). Knows Slurm (sbatch, squeue, scontrol, scancel) and
nothing about models or metrics: a task is a `Task` (key, the worker's arguments, the file
whose existence means success, its log). Decides nothing: the supervisor above it says
what an ending means and what to retry. Never reads `sys.argv`.

Why plain `sbatch` and not submitit: the job is a short generated bash script a user can
read, test and resubmit by hand (`sbatch <output_dir>/slurm/<ts>/job.sbatch`), and each
task runs `esd_worker.py --manifest M --task_index I` with the worker's own CLI, reading
its arguments from a JSON file (model ids never pass through a shell). submitit would
pickle a Python callable per task, which makes the tasks opaque, requires the cluster's
Python to unpickle our objects, and adds a dependency. We keep its good habits: generated
script text we test, unknown options rejected with the valid ones, files written to a
temporary name and renamed.

Following a job: `sacct` needs accounting, which many clusters (and our test cluster) do
not have, so `wait=True` polls `squeue --states=all` (and `scontrol show job` when squeue
cannot answer) and, above all, the result files themselves: a task is done when its
`result_path` exists, whatever Slurm says.
"""
from __future__ import annotations

import json
import math
import re
import shlex
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field, fields, replace
from datetime import datetime
from pathlib import Path
from typing import Callable, Sequence

from esd.atomic_files import atomic_path
from esd.backends.base import Backend, BackendError, Hooks, Task, TaskResult

REPO_DIR = Path(__file__).resolve().parents[1]
DEFAULT_WORKER_SCRIPT = REPO_DIR / "esd_worker.py"

MANIFEST_NAME = "manifest.json"
SCRIPT_NAME = "job.sbatch"
SUBMITTED_NAME = "submitted.json"

# Slurm states after which a task will not run again. Everything else (PENDING, RUNNING,
# CONFIGURING, COMPLETING, SUSPENDED, REQUEUED, ...) counts as still active.
TERMINAL_STATES = frozenset({
    "COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "OUT_OF_MEMORY", "NODE_FAIL",
    "PREEMPTED", "BOOT_FAIL", "DEADLINE", "REVOKED",
})
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
_MAX_SQUEUE_FAILURES = 12  # consecutive failed polls (about a minute at 5 s) before giving up


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


@dataclass(frozen=True)
class SlurmOutcome:
    """How one array ended (the states Slurm gave); `SlurmBackend` turns it into TaskResults."""
    job_id: str | None            # None when nothing was submitted
    n_tasks: int
    done: tuple[str, ...] = ()    # keys whose result_path exists
    failed: tuple[str, ...] = ()  # keys whose task ended in a failure state, without result
    missing: tuple[str, ...] = ()  # keys without result whose task ended "COMPLETED" or unseen
    states: dict[str, str] = field(default_factory=dict)  # key → last Slurm state seen
    finished: bool = False        # the array ended while we followed it (wait=True)
    manifest_path: Path | None = None
    script_path: Path | None = None
    exit_codes: dict[str, int] = field(default_factory=dict)  # key → exit status (scontrol)


def split_extra(values: str | Sequence[str] | None) -> tuple[str, ...]:
    """`--slurm_extra` value(s) → sbatch arguments, split like a shell (no shell runs)."""
    if values is None:
        return ()
    if isinstance(values, str):
        values = [values]
    return tuple(arg for value in values for arg in shlex.split(value))


# --------------------------------------------------------------------------- files

def _write_atomic(path: Path, text: str, mode: int | None = None) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
        if mode is not None:
            tmp.chmod(mode)


def _new_submission_dir(output_dir: Path) -> Path:
    """`<output_dir>/slurm/<timestamp>`, made unique if two submissions share a second."""
    base = output_dir / "slurm"
    base.mkdir(parents=True, exist_ok=True)
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    for n in range(1000):
        path = base / (stamp if n == 0 else f"{stamp}-{n}")
        try:
            path.mkdir()
            return path
        except FileExistsError:
            continue
    raise SlurmError(f"cannot create a new submission directory under {base}")


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


def squeue_states(job_id: str) -> dict[int, str] | None:
    """Task index → state for every task squeue still knows (`--states=all`).

    None when the job is unknown (finished and purged from the controller). Raises
    SlurmError when squeue itself fails (controller unreachable, ...).
    """
    argv = [_require("squeue"), "-h", "-r", f"--jobs={job_id}", "--states=all",
            "-o", "%i %T"]
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=60)
    if proc.returncode != 0:
        if "Invalid job id" in proc.stderr:
            return None
        raise SlurmError(f"squeue failed (exit {proc.returncode}): {proc.stderr.strip()}")
    return _parse_squeue(proc.stdout, job_id)


def _parse_squeue(text: str, job_id: str) -> dict[int, str]:
    states: dict[int, str] = {}
    for line in text.splitlines():
        parts = line.split()
        if len(parts) != 2:
            continue
        ident, state = parts
        array_id, _, index = ident.partition("_")
        if array_id != job_id or not index:
            continue
        for i in _expand_indices(index):
            states[i] = state
    return states


def _scontrol_lines(job_id: str) -> list[dict[str, str]] | None:
    """`scontrol -o show job`: one {field: value} per array task line (None: job purged)."""
    argv = [_require("scontrol"), "-o", "show", "job", job_id]
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=60)
    if proc.returncode != 0:
        if "Invalid job id" in proc.stderr:
            return None
        raise SlurmError(f"scontrol failed (exit {proc.returncode}): {proc.stderr.strip()}")
    lines = [dict(re.findall(r"(\w+)=(\S*)", line)) for line in proc.stdout.splitlines()]
    return [found for found in lines if found.get("ArrayJobId") == job_id and "JobState" in found]


def scontrol_states(job_id: str) -> dict[int, str] | None:
    """Same as `squeue_states` from `scontrol -o show job` (used when squeue cannot say)."""
    found = _scontrol_lines(job_id)
    if found is None:
        return None
    return {i: line["JobState"] for line in found for i in _expand_indices(line.get("ArrayTaskId", ""))}


def exit_codes(job_id: str) -> dict[int, int]:
    """Task index → exit status of ended tasks (`ExitCode=status:signal`; a signal gives
    -signal), while the controller still knows the job ({} when it cannot say)."""
    try:
        found = _scontrol_lines(job_id) or []
    except (SlurmError, subprocess.TimeoutExpired):
        return {}
    codes: dict[int, int] = {}
    for line in found:
        status, _, sig = line.get("ExitCode", "").partition(":")
        if not status.isdigit() or line["JobState"] in ("PENDING", "RUNNING", "CONFIGURING"):
            continue
        code = -int(sig) if sig.isdigit() and int(sig) else int(status)
        for i in _expand_indices(line.get("ArrayTaskId", "")):
            codes[i] = code
    return codes


def _poll_states(job_id: str) -> dict[int, str] | None:
    try:
        return squeue_states(job_id)
    except (SlurmError, subprocess.TimeoutExpired):
        return scontrol_states(job_id)


# --------------------------------------------------------------------------- following

@dataclass(frozen=True)
class _Watched:
    """One array task being followed: its job, its index in that job's manifest, the task."""
    job_id: str
    index: int
    task: Task


def _is_active(state: str | None) -> bool:
    """Pending, running or about to be (UNKNOWN = ended but no longer listed)."""
    return state is not None and state not in TERMINAL_STATES and state != "UNKNOWN"


_ENDED_WITHOUT_ERROR = ("COMPLETED", "UNKNOWN")


def _has_result(watched: _Watched) -> bool:
    return Path(watched.task.result_path).exists()


def _classify(watch: Sequence[_Watched], states: dict[int, str]):
    done, failed, missing = [], [], []
    for n, w in enumerate(watch):
        if _has_result(w):
            done.append(w.task.key)
        elif states.get(n, "UNKNOWN") in _ENDED_WITHOUT_ERROR:
            missing.append(w.task.key)   # ended "well" (or unseen) yet wrote no result
        else:
            failed.append(w.task.key)
    return tuple(done), tuple(failed), tuple(missing)


def _counts(watch: Sequence[_Watched], states: dict[int, str]) -> dict[str, int]:
    counts = {"done": 0, "running": 0, "pending": 0, "failed": 0}
    for n, w in enumerate(watch):
        state = states.get(n)
        if _has_result(w):
            counts["done"] += 1
        elif state in ("RUNNING", "COMPLETING", "CONFIGURING"):
            counts["running"] += 1
        elif _is_active(state):
            counts["pending"] += 1
        elif state is not None and state not in _ENDED_WITHOUT_ERROR:
            counts["failed"] += 1
    return counts


class _Progress:
    """A tqdm bar on a terminal; plain log lines otherwise (on change, at most every 30 s)."""

    def __init__(self, total: int, label: str, log: Callable[[str], None]):
        self.total, self.label, self.log = total, label, log
        self.bar = None
        self.last_line, self.last_time = "", float("-inf")
        if sys.stdout.isatty():
            from tqdm import tqdm
            self.bar = tqdm(total=total, desc=label, unit="task", file=sys.stdout)

    def update(self, counts: dict[str, int], ended: int, final: bool = False) -> None:
        if self.bar is not None:
            self.bar.n = ended
            self.bar.set_postfix(counts, refresh=True)
            return
        line = (f"{self.label}: {ended}/{self.total} ended "
                f"({counts['done']} done, {counts['running']} running, "
                f"{counts['pending']} pending, {counts['failed']} failed)")
        due = time.monotonic() - self.last_time >= 30
        if line != self.last_line and (due or final):
            self.log(line)
            self.last_line, self.last_time = line, time.monotonic()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def follow(watch: Sequence[_Watched], *, poll_interval_s: float = 5.0,
           log: Callable[[str], None] = print,
           on_poll: Callable[[dict[int, str]], None] | None = None) -> tuple[dict[int, str], bool]:
    """Poll until no watched task is pending or running; `on_poll(states)` after each poll
    (states by position in `watch`).

    Returns (last Slurm state by position in `watch`, finished). `finished` is False when
    interrupted with Ctrl-C: we stop watching and say how to cancel, but the arrays keep
    running (cancelling is the user's decision).
    """
    job_ids = sorted({w.job_id for w in watch}, key=int)
    label = f"slurm job{'s' if len(job_ids) > 1 else ''} {','.join(job_ids)}"
    states: dict[int, str] = {}
    progress = _Progress(len(watch), label, log)
    failures = 0
    seen: set[str] = set()
    try:
        while True:
            current: dict[tuple[str, int], str] = {}
            try:
                for job_id in job_ids:
                    job_states = _poll_states(job_id)
                    if not job_states and job_id not in seen:
                        raise SlurmError(f"Slurm does not list job {job_id} yet")
                    seen.add(job_id)
                    # None/empty: purged from the controller, so every task has ended
                    current.update({(job_id, i): st for i, st in (job_states or {}).items()})
                failures = 0
            except (SlurmError, subprocess.TimeoutExpired) as exc:
                failures += 1
                if failures >= _MAX_SQUEUE_FAILURES:
                    raise SlurmError(f"lost track of {label}: {exc}. It may still be "
                                     f"running: check with `squeue --jobs="
                                     f"{','.join(job_ids)}`") from exc
                log(f"warning: cannot query Slurm about {label} ({exc}); retrying")
                time.sleep(poll_interval_s)
                continue
            for n, w in enumerate(watch):
                if (w.job_id, w.index) in current:
                    states[n] = current[(w.job_id, w.index)]
                elif _is_active(states.get(n)) or n not in states:
                    states[n] = "UNKNOWN"  # no longer listed: it has ended, we missed how
            active = any(_is_active(states.get(n)) for n in range(len(watch)))
            ended = sum(1 for n, w in enumerate(watch)
                        if _has_result(w) or not _is_active(states.get(n)))
            progress.update(_counts(watch, states), ended, final=not active)
            if on_poll is not None:
                on_poll(states)
            if not active:
                return states, True
            time.sleep(poll_interval_s)
    except KeyboardInterrupt:
        progress.close()
        log(f"\nstopped following {label}; it keeps running. "
            f"Cancel it with: scancel {' '.join(job_ids)}")
        return states, False
    finally:
        progress.close()


def _resolve_unknown(watch: Sequence[_Watched], states: dict[int, str]) -> None:
    """squeue lost some tasks: ask scontrol before calling them missing."""
    for job_id in {w.job_id for n, w in enumerate(watch) if states.get(n, "UNKNOWN") == "UNKNOWN"}:
        try:
            known = scontrol_states(job_id) or {}
        except (SlurmError, subprocess.TimeoutExpired):
            continue
        for n, w in enumerate(watch):
            if w.job_id == job_id and states.get(n, "UNKNOWN") == "UNKNOWN" and w.index in known:
                states[n] = known[w.index]


# --------------------------------------------------------------------------- earlier arrays

def submissions(output_dir: Path) -> list[dict]:
    """Earlier submissions under an output directory (oldest first): the contents of each
    `submitted.json` plus `dir`, the submission's directory."""
    found = []
    for path in sorted((Path(output_dir) / "slurm").glob(f"*/{SUBMITTED_NAME}")):
        try:
            found.append({**json.loads(path.read_text(encoding="utf-8")),
                          "dir": str(path.parent)})
        except (OSError, ValueError):
            continue
    return found


def queued_tasks(output_dir: Path, recent: int = 50) -> dict[str, _Watched]:
    """Task key → where it is queued, for tasks still pending or running in the `recent`
    latest arrays submitted for this output directory ({} when Slurm cannot say)."""
    jobs = {str(s["job_id"]): Path(s["dir"]) for s in submissions(output_dir)[-recent:]
            if str(s.get("job_id", "")).isdigit()}
    if not jobs:
        return {}
    argv = [_require("squeue"), "-h", "-r", f"--jobs={','.join(jobs)}", "-o", "%i %T"]
    try:
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=60)
    except subprocess.TimeoutExpired:
        return {}
    if proc.returncode != 0:  # "Invalid job id": all of them have ended and been purged
        return {}
    queued: dict[str, _Watched] = {}
    for job_id, sub_dir in jobs.items():
        active = [i for i, state in _parse_squeue(proc.stdout, job_id).items()
                  if _is_active(state)]
        if not active:
            continue
        try:
            rows = json.loads((sub_dir / MANIFEST_NAME).read_text(encoding="utf-8"))["tasks"]
        except (OSError, ValueError, KeyError):
            continue
        for i in active:
            if i < len(rows):
                row = rows[i]
                task = Task(row["key"], tuple(row["argv"]), Path(row["result_path"]),
                            Path(row["log_path"]) if row.get("log_path") else None)
                queued[task.key] = _Watched(job_id, i, task)
    return queued


# --------------------------------------------------------------------------- entry point

def run_array(tasks: list[Task], output_dir: Path, settings: SlurmSettings, *,
              wait: bool, worker_script: Path = DEFAULT_WORKER_SCRIPT,
              python: str = sys.executable, poll_interval_s: float = 5.0,
              skip_queued: bool = True, log: Callable[[str], None] = print,
              on_poll: Callable[[Sequence[_Watched], dict[int, str]], None] | None = None
              ) -> SlurmOutcome:
    """Submit `tasks` as one job array (task i runs manifest row i) and optionally follow it.

    Writes `<output_dir>/slurm/<timestamp>/{manifest.json, job.sbatch, submitted.json}`
    and makes `<output_dir>/logs/slurm/` for the task logs. Raises SlurmError when sbatch
    is missing or rejects the job. With `wait`, returns done/failed/missing by checking
    each task's `result_path` once no task is pending or running.

    With `skip_queued`, a task whose key is still pending or running in an earlier array
    submitted for the same output directory is not submitted again (rerunning the command
    while an array runs must not start every model twice); with `wait` it is followed in
    that earlier array, and counted in done/failed/missing like the new ones.
    """
    settings.validate()
    tasks = list(tasks)
    if not tasks:
        log("slurm: nothing to submit")
        return SlurmOutcome(job_id=None, n_tasks=0, finished=True)
    keys = [t.key for t in tasks]
    if len(set(keys)) != len(keys):
        duplicates = sorted({k for k in keys if keys.count(k) > 1})
        raise SlurmError(f"duplicate task keys {duplicates}: each task must be unique")
    _require("sbatch")  # fail before writing anything when Slurm is not here

    output_dir = Path(output_dir).absolute()
    earlier, tasks = _split_queued(tasks, output_dir, log) if skip_queued else ([], tasks)

    outcome: dict = dict(job_id=None, n_tasks=0)
    if tasks:
        outcome = _submit_array(tasks, output_dir, settings, worker_script=worker_script,
                                python=python, log=log)
    else:
        log("slurm: nothing to submit")
    watch = earlier + [_Watched(outcome["job_id"], i, t) for i, t in enumerate(tasks)]
    if not wait:
        return SlurmOutcome(**outcome)

    states, finished = follow(watch, poll_interval_s=poll_interval_s, log=log,
                              on_poll=None if on_poll is None else lambda st: on_poll(watch, st))
    by_key = {watch[n].task.key: state for n, state in states.items()}
    if not finished:
        done = tuple(w.task.key for w in watch if _has_result(w))
        return SlurmOutcome(**outcome, done=done, states=by_key, finished=False)
    _resolve_unknown(watch, states)
    by_key = {watch[n].task.key: state for n, state in states.items()}
    codes = {job_id: exit_codes(job_id) for job_id in {w.job_id for w in watch}}
    by_key_codes = {w.task.key: codes[w.job_id][w.index] for w in watch if w.index in codes[w.job_id]}
    done, failed, missing = _classify(watch, states)
    _log_ended(watch, done, failed, missing, by_key, output_dir, log)
    return SlurmOutcome(**outcome, done=done, failed=failed, missing=missing,
                        states=by_key, finished=True, exit_codes=by_key_codes)


def _split_queued(tasks: list[Task], output_dir: Path, log) -> tuple[list[_Watched], list[Task]]:
    """(the tasks still pending or running in an earlier array of this output directory, as
    watched there; the tasks to submit now)."""
    queued = queued_tasks(output_dir)
    earlier = [queued[t.key] for t in tasks if t.key in queued]
    if earlier:
        jobs = ",".join(sorted({w.job_id for w in earlier}, key=int))
        log(f"slurm: {len(earlier)} task(s) already pending or running in job(s) "
            f"{jobs}; not submitted again (follow them: squeue --jobs={jobs})")
    return earlier, [t for t in tasks if t.key not in queued]


def _log_ended(watch: Sequence[_Watched], done, failed, missing, by_key: dict, output_dir: Path,
               log) -> None:
    label = ",".join(sorted({w.job_id for w in watch}, key=int))
    log(f"slurm: job {label} ended: {len(done)} done, {len(failed)} failed, "
        f"{len(missing)} without result")
    for key in failed:
        log(f"  failed: {key} ({by_key.get(key)})")
    for key in missing:
        log(f"  no result: {key} ({by_key.get(key, 'state unknown')})")
    if failed or missing:
        log(f"  see the task logs: {output_dir / 'logs' / 'slurm'}/<job>_<task>.log "
            f"(task numbers are rows of {output_dir / 'slurm'}/<timestamp>/{MANIFEST_NAME})")


def _submit_array(tasks: Sequence[Task], output_dir: Path, settings: SlurmSettings, *,
                  worker_script: Path, python: str, log: Callable[[str], None]) -> dict:
    """Write manifest + script, submit, say how to follow; returns SlurmOutcome fields."""
    (output_dir / "logs" / "slurm").mkdir(parents=True, exist_ok=True)
    sub_dir = _new_submission_dir(output_dir)
    manifest_path = sub_dir / MANIFEST_NAME
    script_path = sub_dir / SCRIPT_NAME
    _write_atomic(manifest_path, json.dumps(manifest_data(tasks), indent=1) + "\n")
    script = render_script(n_tasks=len(tasks), settings=settings,
                           manifest_path=manifest_path, output_dir=output_dir,
                           workdir=Path.cwd(), worker_script=Path(worker_script).absolute(),
                           python=python, script_path=script_path, timeout_s=_one_timeout(tasks))
    _write_atomic(script_path, script, mode=0o755)

    job_id = submit(script_path, settings)
    _write_atomic(sub_dir / SUBMITTED_NAME, json.dumps({
        "job_id": job_id, "n_tasks": len(tasks),
        "submitted_at": datetime.now().isoformat(timespec="seconds"),
        "command": sbatch_command(script_path, settings)}, indent=1) + "\n")
    logs = shlex.quote(str(output_dir / "logs" / "slurm"))
    log(f"slurm: submitted job array {job_id} with {len(tasks)} task(s) "
        f"(script {script_path})")
    log(f"  follow it:  squeue --jobs={job_id}")
    log(f"  task logs:  tail -f {logs}/{job_id}_*.log")
    log(f"  cancel it:  scancel {job_id}")
    log("  resume:     rerun the same command; only models without a result are submitted")
    return dict(job_id=job_id, n_tasks=len(tasks), manifest_path=manifest_path,
                script_path=script_path)


def _one_timeout(tasks: Sequence[Task]) -> float | None:
    """The per-attempt limit of an array (one script for all its tasks: the longest)."""
    limits = [t.timeout_s for t in tasks if t.timeout_s]
    return max(limits) if limits else None


# --------------------------------------------------------------------------- the backend

class SlurmBackend(Backend):
    """Tasks as job arrays. With `wait`, follows each array, reports starts and ends, and
    submits the retries the supervisor hands back as one follow-up array (delayed by their
    backoff with `--begin`); without `wait`, submits and returns (retries then happen when
    the command is run again)."""
    name = "slurm"

    def __init__(self, settings: SlurmSettings, output_dir: Path, *, wait: bool,
                 worker_script: Path = DEFAULT_WORKER_SCRIPT, python: str = sys.executable,
                 poll_interval_s: float = 5.0, log: Callable[[str], None] = print):
        self.settings = settings.validate()
        self.output_dir = Path(output_dir).absolute()
        self.wait, self.worker_script, self.python = wait, worker_script, python
        self.poll_interval_s, self.log = poll_interval_s, log
        self._live: dict[str, _Watched] = {}     # key -> where it runs now
        self._cancelled: set[str] = set()

    @property
    def waits(self) -> bool:
        return self.wait

    def run(self, tasks: Sequence[Task], hooks: Hooks) -> None:
        pending = list(tasks)
        if not pending:
            self.log("slurm: nothing to submit")
        while pending:
            settings = replace(self.settings, begin_delay_s=max(t.delay_s for t in pending))
            submitted_at = time.time()
            seen: dict[str, str] = {}  # key -> last state reported
            started: dict[str, float] = {}

            def on_poll(watch, states, seen=seen, started=started):
                for n, w in enumerate(watch):
                    self._live[w.task.key] = w
                    state = states.get(n)
                    if state in ("RUNNING", "COMPLETING") and w.task.key not in started:
                        started[w.task.key] = time.time()
                        hooks.on_start(w.task, started[w.task.key])
                hooks.on_tick()

            outcome = run_array(pending, self.output_dir, settings, wait=self.wait,
                                worker_script=self.worker_script, python=self.python,
                                poll_interval_s=self.poll_interval_s, log=self.log, on_poll=on_poll)
            if not self.wait or not outcome.finished:
                return  # submitted only, or the user stopped following (the arrays keep running)
            follow_ups: list[Task] = []
            for task in pending:
                state = outcome.states.get(task.key)
                cancelled = task.key in self._cancelled
                self._cancelled.discard(task.key)
                self._live.pop(task.key, None)
                result = TaskResult(task, outcome.exit_codes.get(task.key),
                                    started.get(task.key, submitted_at), time.time(), state=state,
                                    cancelled=cancelled)
                follow_ups += hooks.on_end(result)
            pending = follow_ups

    def cancel(self, key: str) -> None:
        watched = self._live.get(key)
        if watched is None or watched.job_id is None:
            return
        self._cancelled.add(key)
        subprocess.run([_require("scancel"), f"{watched.job_id}_{watched.index}"],
                       capture_output=True, timeout=60)
