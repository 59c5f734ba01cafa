"""Writing a file so that a file that exists is complete: write a temporary file beside it,
then rename it into place (one `os.replace`). A failed write (a full disk, an exception)
leaves the old file, or none, and removes its temporary file.

A writer killed with SIGKILL cannot remove its temporary file: the name carries the
writer's pid and host (`.<name>.tmp<pid>-<host>`), and `remove_stale_temp_files` (called
by a run at its start) removes those whose writer on this host is gone.

Owns only that mechanism; every writer of results, records and reports uses it.
"""
from __future__ import annotations

import hashlib
import os
import re
import socket
from contextlib import contextmanager
from pathlib import Path

_HOST = hashlib.sha1(socket.gethostname().encode("utf-8", "replace")).hexdigest()[:6]
# `.name.tmp<pid>[-<host>][suffix]`; gputracker's metrics writer uses the same form
_TEMP_NAME = re.compile(r"^\..+\.tmp(?P<pid>\d+)(?:-(?P<host>[0-9a-f]{6}))?(?:\.[^.]*)?$")


def temp_path_for(path, suffix: str = "") -> Path:
    path = Path(path)
    return path.with_name(f".{path.name}.tmp{os.getpid()}-{_HOST}{suffix}")


@contextmanager
def atomic_path(path, suffix: str = ""):
    """Yield a temporary path beside `path`; renamed to `path` when the block succeeds,
    removed when it fails. `suffix` keeps an extension tools look at (`.png`)."""
    path = Path(path)
    tmp = temp_path_for(path, suffix)
    try:
        yield tmp
        os.replace(tmp, path)
    except OSError as exc:
        if exc.filename is None:  # a failed write() names no file: name the one we meant
            exc.filename = str(path)
        raise
    finally:
        tmp.unlink(missing_ok=True)


def write_text_atomic(path, text: str) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(path)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


def stale_temp_files(directory) -> list[Path]:
    """Temporary files under `directory` whose writer (on this host) no longer runs."""
    found = []
    for root, _dirs, files in os.walk(directory):
        for name in files:
            match = _TEMP_NAME.match(name)
            if not match or (match["host"] and match["host"] != _HOST):
                continue  # another host's writer (shared filesystem): not ours to judge
            pid = int(match["pid"])
            if pid != os.getpid() and not _pid_alive(pid):
                found.append(Path(root) / name)
    return found


def remove_stale_temp_files(directory) -> int:
    """Remove what writers killed mid-write left behind; returns how many were removed."""
    removed = 0
    for path in stale_temp_files(directory):
        try:
            path.unlink()
            removed += 1
        except FileNotFoundError:
            pass
    return removed
