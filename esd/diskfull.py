"""A full disk (ENOSPC, or a full quota: EDQUOT) as a typed, retryable failure and one
line telling the user what to free, instead of tracebacks.

Owns: recognising the error, the free space it is reported with, the `disk_full` failure
of a model, and remembering (per process) that the disk filled up so the run's last line
says so. Must not retry or delete anything: the orchestrator decides, the user frees space.
"""
from __future__ import annotations

import errno
import os
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


def note(path) -> None:
    """Remember that writing `path` failed for want of space (the run's last line says so)."""
    _seen.append(str(path))


def seen() -> list[str]:
    return list(_seen)


def disk_full_failure(path, stage: str = "save") -> ESDFailure:
    note(path)
    return ESDFailure(stage, "disk_full", f"no space left on the disk writing {path} "
                      f"({free_space_text(path)}); free space there and rerun", retryable=True)


def write_failure(path, exc: OSError, stage: str = "save") -> ESDFailure:
    """The typed failure of a write of `path` that raised `exc`."""
    if is_disk_full(exc):
        return disk_full_failure(path, stage)
    return ESDFailure(stage, "write_failed", f"could not write {path}: {exc}")


def run_message(output_dir, failed_path=None) -> str:
    """The one line a run ends with when the disk filled up: where, how much is free, what to do."""
    where = Path(failed_path) if failed_path else Path(output_dir)
    return (f"disk full: writing under {Path(output_dir)} failed ({free_space_text(where)}, "
            f"first at {where}); free space on that filesystem (or use another --output_dir) "
            f"and run the same command again to resume")
