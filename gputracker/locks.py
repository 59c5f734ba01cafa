"""Cross-process GPU claims: one exclusive ``flock`` per GPU in a shared lock directory.

Owns: creating the lock directory (world-writable with the sticky bit, like /tmp, so that
several users' dispatchers share it), taking and releasing non-blocking claims.

Why ``flock``: the kernel releases it when the last file descriptor of the open file is
closed, so a claim can never outlive its holders. The dispatcher passes the claim's fd to
the job (``pass_fds``): the claim then lives as long as the job *or* the dispatcher, so a
``kill -9`` of the dispatcher does not free a GPU whose job is still running, and a dead
job plus a dead dispatcher never leave a stale lock behind (there is no lock file content
to clean up; the files themselves are harmless and reused).

Must not: look at GPUs or processes. Lock files are named by NVML index (``gpu-3.lock``).
"""
from __future__ import annotations

import errno
import fcntl
import os
from pathlib import Path
from typing import Callable

DEFAULT_LOCK_DIR = Path("/tmp/gputracker-locks")
LOCK_DIR_ENV = "GPUTRACKER_LOCK_DIR"


def resolve_lock_dir(lock_dir: str | os.PathLike | None) -> Path:
    """The explicit ``lock_dir``, else ``$GPUTRACKER_LOCK_DIR``, else /tmp/gputracker-locks."""
    if lock_dir:
        return Path(lock_dir)
    from_env = os.environ.get(LOCK_DIR_ENV)
    return Path(from_env) if from_env else DEFAULT_LOCK_DIR


def ensure_lock_dir(lock_dir: Path) -> Path:
    """Create ``lock_dir`` if needed; a directory we create is made mode 1777 (shared, sticky)."""
    try:
        lock_dir.mkdir(parents=True)
    except FileExistsError:
        if not lock_dir.is_dir():
            raise NotADirectoryError(f"lock directory {lock_dir} exists and is not a directory")
    else:
        os.chmod(lock_dir, 0o1777)  # mkdir's mode is cut by the umask; chmod is not
    return lock_dir


def ensure_lock_files(lock_dir: Path, gpu_indices: list[int]) -> Path:
    """Create ``lock_dir`` and one lock file per GPU; raises PermissionError with a clear
    message when this user cannot use the directory (e.g. it is not world-writable)."""
    ensure_lock_dir(lock_dir)
    for gpu_index in gpu_indices:
        try:
            os.close(_open_lock_file(lock_path(lock_dir, gpu_index)))
        except PermissionError as exc:
            raise PermissionError(f"cannot use GPU lock directory {lock_dir} ({exc}); it must be writable by "
                                  f"every user (mode 1777), or choose another with --lock_dir / ${LOCK_DIR_ENV}") from None
    return lock_dir


def lock_path(lock_dir: Path, gpu_index: int) -> Path:
    return lock_dir / f"gpu-{gpu_index}.lock"


class GpuClaim:
    """An exclusive claim on one GPU. ``fd`` can be handed to a child via ``pass_fds``."""

    def __init__(self, gpu_index: int, fd: int, path: Path):
        self.gpu_index = gpu_index
        self.fd = fd
        self.path = path

    def release(self) -> None:
        """Unlock and close. Unlocking acts on the open file, so copies held by a child
        that already ended (or by its stray descendants) are released too."""
        if self.fd < 0:
            return
        try:
            fcntl.flock(self.fd, fcntl.LOCK_UN)
        finally:
            os.close(self.fd)
            self.fd = -1

    def __repr__(self) -> str:
        return f"GpuClaim(gpu={self.gpu_index}, fd={self.fd})"


def _open_lock_file(path: Path) -> int:
    # Open an existing file read-only first: with fs.protected_regular, O_CREAT on another
    # user's file in a sticky directory fails even when the file is readable.
    try:
        return os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        pass
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
    except FileExistsError:  # another dispatcher created it in between
        return os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    os.fchmod(fd, 0o644)  # readable by every user, which is all flock needs
    return fd


def try_claim(lock_dir: Path, gpu_index: int) -> GpuClaim | None:
    """Claim GPU ``gpu_index`` without waiting; None if another process holds it."""
    path = lock_path(lock_dir, gpu_index)
    fd = _open_lock_file(path)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        os.close(fd)
        if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
            return None
        raise
    return GpuClaim(gpu_index, fd, path)


def try_claim_some(lock_dir: Path, candidates, count: int,
                   on_try: Callable[[int, bool], None] = lambda gpu, claimed: None) -> list[GpuClaim] | None:
    """Claims on ``count`` GPUs of ``candidates`` (tried in order), or none at all (never a
    partial hold). GPUs another process holds are skipped; ``on_try(gpu, claimed)`` hears
    about every GPU tried."""
    claims: list[GpuClaim] = []
    for gpu_index in candidates:
        claim = try_claim(lock_dir, gpu_index)
        on_try(gpu_index, claim is not None)
        if claim is not None:
            claims.append(claim)
            if len(claims) == count:
                return claims
    for held in claims:
        held.release()
    return None
