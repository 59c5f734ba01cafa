"""Writing a file so that a file that exists is complete: write a temporary file beside it,
then rename it into place (one `os.replace`). A failed write leaves the old file, or none.

Owns only that mechanism; every writer of results, records and reports uses it.
"""
from __future__ import annotations

import os
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def atomic_path(path, suffix: str = ""):
    """Yield a temporary path beside `path`; renamed to `path` when the block succeeds,
    removed when it fails. `suffix` keeps an extension tools look at (`.png`)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}{suffix}")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_text_atomic(path, text: str) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(path)
