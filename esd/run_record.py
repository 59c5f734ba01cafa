"""The record of each run of the orchestrator, and where its log lines go.

Owns: `runs/<run_id>/` (`config.yaml`, `run.json`) and `runs.csv` (one row per run), and the
orchestrator's logging set-up (`logs/esd_experiment.log` plus the console).

A record is written when a run starts, with status `running`, the process id and the host,
and finished when the run ends (`completed`, `interrupted`, `submitted`, `error`). A run
killed with kill -9 (or by a power cut) never finishes its record: its row stays `running`
while no process has its id, and `run_state` says `crashed` for it.

`runs.csv` is rewritten whole and atomically under `.runs.lock` at each change: columns
that appear in a newer version are added, earlier rows keep their values under the union of
the columns, and a field of any size is read back (the csv module refuses fields over 128 kB
unless told otherwise).

Must not: decide anything about the run, or know how its counts are made (the caller passes
the counts, the failed models and the settings as plain values).
"""
from __future__ import annotations

import csv
import json
import logging
import os
import platform
import socket
import sys
import time
from importlib import metadata
from pathlib import Path

from filelock import FileLock

from esd import diskfull, safe_output
from esd.atomic_files import atomic_path, write_text_atomic
from esd.progress import PlainCpuNotice

TRACKED_PACKAGES = ("torch", "transformers", "peft", "safetensors", "huggingface_hub", "numpy",
                    "pandas", "nvidia-ml-py")
RUNS_CSV = "runs.csv"
RUNNING, CRASHED = "running", "crashed"
_CSV_FIELD_LIMIT = 2**31 - 1   # the C long of every platform: a field of any length we wrote

log = logging.getLogger("esd_experiment")
dispatch_log = logging.getLogger("esd_experiment.dispatch")


# ---------------------------------------------------------------- the record of a run

def package_versions() -> dict:
    versions = {"python": platform.python_version()}
    for name in TRACKED_PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def _stamp(epoch: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(epoch))


def start_run_record(output_dir: Path, run_id: str, started: float, *, settings: dict, counts: dict,
                     row: dict, failed: dict | None = None) -> None:
    """`runs/<run_id>/` and a `running` row in runs.csv, before any model is dispatched, so a
    run killed with kill -9 is still on record. `settings`: the resolved configuration;
    `row`: the columns of runs.csv beyond the record's own (model list, backend, settings)."""
    record_run(output_dir, run_id, started, RUNNING, settings=settings, counts=counts, row=row,
               failed=failed)


def record_run(output_dir: Path, run_id: str, started: float, status: str, *, settings: dict,
               counts: dict, row: dict, failed: dict | None = None) -> None:
    """runs/<run_id>/run.json (resolved config, versions, times, counts, the process) and the
    run's row in runs.csv, replaced in place when the run already has one."""
    import yaml
    ended = None if status == RUNNING else time.time()
    run_dir = Path(output_dir) / "runs" / run_id
    run_dir.mkdir(parents=True, exist_ok=True)
    write_text_atomic(run_dir / "config.yaml", yaml.safe_dump(settings, sort_keys=True))
    record = {"run_id": run_id, "status": status, "command": sys.argv,
              "start_time": _stamp(started), "end_time": _stamp(ended) if ended else "",
              "duration_s": round(ended - started, 2) if ended else "",
              "pid": os.getpid(), "host": socket.gethostname(),
              "counts": counts, "failed": failed or {}, "config": settings,
              "versions": package_versions()}
    write_text_atomic(run_dir / "run.json", json.dumps(record, indent=2, default=str) + "\n")
    columns = {"run_id": run_id, "status": status, "start_time": record["start_time"],
               "end_time": record["end_time"], "duration_s": record["duration_s"], **counts, **row,
               "pid": record["pid"], "host": record["host"]}
    with FileLock(str(Path(output_dir) / ".runs.lock")):
        _put_run_row(Path(output_dir) / RUNS_CSV, columns)


def read_runs_csv(runs_csv: Path) -> tuple[list[str], list[dict]]:
    """(columns, rows) of runs.csv; ([], []) when it does not exist."""
    if not runs_csv.exists():
        return [], []
    csv.field_size_limit(_CSV_FIELD_LIMIT)
    with runs_csv.open(newline="", encoding="utf-8", errors="replace") as handle:
        reader = csv.DictReader(handle)
        return list(reader.fieldnames or []), list(reader)


def _put_run_row(runs_csv: Path, row: dict) -> None:
    """The run's row replaced (same run_id), or added at the end."""
    columns, rows = read_runs_csv(runs_csv)
    mine = [i for i, r in enumerate(rows) if r.get("run_id") == str(row["run_id"])]
    if mine:
        rows = rows[:mine[0]] + rows[mine[0] + 1:]
        rows.insert(mine[0], row)
        _write_runs_csv(runs_csv, columns, rows, row)
    else:
        _append_run_row(runs_csv, row)


def _append_run_row(runs_csv: Path, row: dict) -> None:
    """Add a row to runs.csv, rewritten whole and atomically: when the columns changed between
    versions, earlier rows keep their values under the union of the columns."""
    columns, rows = read_runs_csv(runs_csv)
    _write_runs_csv(runs_csv, columns, rows + [row], row)


def _write_runs_csv(runs_csv: Path, columns: list[str], rows: list[dict], row: dict) -> None:
    columns = columns + [c for c in row if c not in columns]
    with atomic_path(runs_csv) as tmp, tmp.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns, restval="", extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)


def run_state(status, pid, host) -> str:
    """A row's status as it stands: `crashed` for a `running` run whose process is gone from
    this host (killed with kill -9, or the machine went down); other statuses as they are.
    A run on another host cannot be checked from here and stays `running`."""
    if str(status) != RUNNING:
        return str(status)
    try:
        pid = int(float(pid))
    except (TypeError, ValueError):
        return RUNNING  # a row from before the process was recorded
    if str(host) != socket.gethostname():
        return RUNNING
    return RUNNING if _alive(pid) else CRASHED


def _alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process has that id now
        return True
    return True


# ---------------------------------------------------------------- logging

class _ConsoleHandler(logging.StreamHandler):
    """Console lines that do not tear a progress bar apart (tqdm.write clears and redraws it)."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            from tqdm import tqdm
            tqdm.write(self.format(record), file=self.stream)
        except Exception:  # noqa: BLE001 - logging must never raise
            self.handleError(record)


def setup_logging(output_dir: Path, *, gpus_asked: bool = False) -> Path:
    """The run's log file and console. `gpus_asked`: GPUs were named with --gpus, so a machine
    where none can be used is an error said once by the run, not a CPU-mode notice first."""
    log_path = output_dir / "logs" / "esd_experiment.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    log.setLevel(logging.INFO)
    log.propagate = False
    for handler in list(log.handlers):
        log.removeHandler(handler)
        _close_quietly(handler)
    file_handler = logging.FileHandler(log_path, encoding="utf-8")
    file_handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    console = _ConsoleHandler(sys.stdout)
    console.setFormatter(logging.Formatter("%(message)s"))
    log.addHandler(file_handler)
    log.addHandler(console)
    # the dispatcher's per-job lines go to the log file; only its warnings reach the console
    dispatch_log.setLevel(logging.INFO)
    dispatch_log.propagate = False
    for handler in list(dispatch_log.handlers):
        dispatch_log.removeHandler(handler)
    quiet_console = _ConsoleHandler(sys.stdout)
    quiet_console.setLevel(logging.WARNING)
    quiet_console.setFormatter(console.formatter)
    # "no GPU can be used (…): running on CPU", once; nothing when --gpus named GPUs
    quiet_console.addFilter(PlainCpuNotice(cpu_fallback=not gpus_asked))
    dispatch_log.addHandler(file_handler)
    dispatch_log.addHandler(quiet_console)
    safe_output.guard_logging(log, dispatch_log)  # a full disk or `| head`: no logging tracebacks
    return log_path


def teardown_logging() -> None:
    """Give the loggers back as they were (the API runs us inside a notebook or a test)."""
    for logger in (log, dispatch_log):
        for handler in list(logger.handlers):
            logger.removeHandler(handler)
            if isinstance(handler, logging.FileHandler):
                _close_quietly(handler)
        logger.propagate = True


def _close_quietly(handler: logging.Handler) -> None:
    """Close a handler whose last lines may not fit: on a full disk the close flushes what is
    still buffered and fails; the run has already said the disk is full."""
    try:
        handler.close()  # (the stream is closed even when its last flush fails)
    except OSError as exc:
        if exc.errno not in safe_output.DEAD_OUTPUT:
            raise
        if diskfull.is_disk_full(exc):
            diskfull.note(getattr(handler, "baseFilename", "the log"))
