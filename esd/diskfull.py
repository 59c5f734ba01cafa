"""A full disk (ENOSPC, or a full quota: EDQUOT) as a typed, retryable failure and one
line telling the user what to free, instead of tracebacks.

Owns: recognising the error, the free space it is reported with, the `disk_full` failure
of a model, and remembering (per process) that the disk filled up so the run's last line
says so — naming the disk that filled (the hub cache's, when a worker's download filled
it, read back from the model's `disk_full` record), not the output directory's by default.
Must not retry or delete anything: the orchestrator decides, the user frees space.
"""
from __future__ import annotations

import errno
import os
import sys
from pathlib import Path

from esd.failures import ESDFailure

EXIT_DISK_FULL = 74  # sysexits EX_IOERR: a worker that could not even record its failure

_seen: list[str] = []  # paths whose writes failed for want of space, in this process


def is_disk_full(exc: BaseException | None) -> bool:
    """Whether an OSError means the filesystem (or the user's quota) is full."""
    return isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT)


def free_space_text(path) -> str:
    """`12.3 MB free on /mount/point` for the filesystem holding `path` (or its parent)."""
    path = Path(path)
    while not path.exists() and path != path.parent:
        path = path.parent
    try:
        stats = os.statvfs(path)
    except OSError:
        return "free space unknown"
    free_mb = stats.f_bavail * stats.f_frsize / 1e6
    return f"{free_mb:.1f} MB free of {stats.f_blocks * stats.f_frsize / 1e6:.1f} MB"


def mount_point(path) -> Path:
    """The mount point of the filesystem holding `path` (or its nearest existing parent)."""
    path = Path(os.path.abspath(path))
    while not path.exists() and path != path.parent:
        path = path.parent
    while not os.path.ismount(path) and path != path.parent:
        path = path.parent
    return path


def note(path) -> None:
    """Remember that writing `path` failed for want of space (the run's last line says so)."""
    _seen.append(str(path))


def seen() -> list[str]:
    return list(_seen)


_WRITING = "no space left on the disk writing "


def disk_full_failure(path, stage: str = "save", *, here: bool = True) -> ESDFailure:
    """The typed failure of a write that found no space; `here`: in this process (its last
    line says so), not in a worker whose failure record says it."""
    if here:
        note(path)
    return ESDFailure(stage, "disk_full", f"{_WRITING}{path} ({free_space_text(path)}); free "
                      "space there and rerun", retryable=True)


def _written_path(message: str) -> str | None:
    """The path a `disk_full_failure` message names (None for another message)."""
    if not message.startswith(_WRITING):
        return None
    return message[len(_WRITING):].rsplit(" (", 1)[0] or None


def write_failure(path, exc: OSError, stage: str = "save") -> ESDFailure:
    """The typed failure of a write of `path` that raised `exc`."""
    if is_disk_full(exc):
        return disk_full_failure(path, stage)
    return ESDFailure(stage, "write_failed", f"could not write {path}: {exc}")


def _within(path: Path, folder: Path) -> bool:
    try:
        Path(os.path.abspath(path)).relative_to(os.path.abspath(folder))
        return True
    except ValueError:
        return False


def run_message(output_dir=None, failed_path=None) -> str:
    """The one line a run ends with when the disk filled up: which disk (its mount point),
    how much is free, what to do there."""
    where = Path(failed_path) if failed_path else Path(output_dir or ".")
    if output_dir is not None and _within(where, output_dir):
        what = f"under {Path(output_dir)} "
    else:
        what = f"{where} "
    return (f"disk full: writing {what}failed ({free_space_text(where)} on the disk mounted at "
            f"{mount_point(where)}); free space on that disk ({_elsewhere(where)}) and run the "
            "same command again to resume")


def _elsewhere(where: Path) -> str:
    """How to write `where` on another disk: the hub cache moves with HF_HOME (or
    HF_HUB_CACHE), everything else with --output_dir."""
    from esd.hub_cache import hub_cache_dir
    if _within(where, hub_cache_dir()):
        return "or point HF_HOME at a disk with room: the hub cache is there"
    return "or use another --output_dir"


def final_line(output_dir, failed_reasons) -> str | None:
    """`run_message` if this process met a full disk or some model failed with `disk_full`
    (then about the disk its record names: a worker's download may have filled the cache)."""
    hit = seen()
    if hit:
        return run_message(output_dir, hit[0])
    if any(str(r).endswith("disk_full") for r in failed_reasons):
        return run_message(output_dir, _recorded_path(output_dir))
    return None


def _recorded_path(output_dir) -> str | None:
    """The path the first `disk_full` failure recorded in `output_dir` names, if any."""
    from esd.failures import read_failures
    try:
        records = read_failures(output_dir)
    except OSError:
        return None
    for record in records.values():
        if record.reason == "disk_full":
            path = _written_path(record.message)
            if path:
                return path
    return None


def record_or_remember(output_dir, model_id: str, failure: ESDFailure):
    """Record a failure; on a full disk keep it in memory only (returned all the same), so
    the orchestrator still classifies the job and the run still ends with `run_message`."""
    from esd.failures import FailureRecord, record_failure
    try:
        return record_failure(output_dir, model_id, failure)
    except OSError as exc:
        if not is_disk_full(exc):
            raise
        note(getattr(exc, "filename", None) or output_dir)
        return FailureRecord.from_failure(model_id, failure)


def worker_exit(output_dir, model_id: str, exc: OSError, retryable_code: int) -> int:
    """A worker's way out of a full disk met outside its result write: recorded if one line
    still fits (exit `retryable_code`), else exit EXIT_DISK_FULL, which the orchestrator
    records as `disk_full` (it may have room by then; if not, it says so at the end)."""
    from esd.failures import record_failure
    failure = disk_full_failure(getattr(exc, "filename", None) or output_dir)
    try:
        record_failure(output_dir, model_id, failure)
    except OSError:
        print(f"{model_id}: FAILED {failure} (could not be recorded)", file=sys.stderr, flush=True)
        return EXIT_DISK_FULL
    print(f"{model_id}: FAILED {failure} (retryable: True)", file=sys.stderr, flush=True)
    return retryable_code


def tolerate(call, *args, **kwargs):
    """`call(...)`, except that a full disk is remembered (for the run's last line) instead
    of raised: for the run's own records, which must not hide the report of what happened."""
    try:
        return call(*args, **kwargs)
    except OSError as exc:
        if not is_disk_full(exc):
            raise
        note(getattr(exc, "filename", None) or "the output directory")
        return None
