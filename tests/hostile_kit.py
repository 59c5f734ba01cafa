"""Helpers of the hostile-world tests and `bench/bench_hostile.py`: a small real filesystem
that fills up (a tmpfs mount; root only), and the checks that a results directory holds no
half-written file and that no output shows a traceback."""
from __future__ import annotations

import contextlib
import csv
import json
import os
import subprocess
from pathlib import Path


def can_mount() -> bool:
    return os.geteuid() == 0 and Path("/proc/filesystems").read_text().count("tmpfs") > 0


@contextlib.contextmanager
def small_disk(path: Path, size_kb: int):
    """A tmpfs of `size_kb` KB mounted at `path` (a real filesystem that says ENOSPC)."""
    path.mkdir(parents=True, exist_ok=True)
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_kb}k", "tmpfs", str(path)],
                             capture_output=True, text=True)
    if mounted.returncode != 0:
        raise OSError(f"cannot mount a tmpfs at {path}: {mounted.stderr.strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], capture_output=True)


def fill_leaving(disk: Path, free_kb: int) -> Path:
    """A filler file leaving about `free_kb` KB free on `disk`; remove it to free the space."""
    stats = os.statvfs(disk)
    free = stats.f_bavail * stats.f_frsize
    filler = disk / "filler"
    with open(filler, "wb") as handle:
        left = max(0, free - free_kb * 1024)
        chunk = b"\0" * (1 << 16)
        while left > 0:
            left -= handle.write(chunk[:min(left, len(chunk))])
    return filler


def half_files(out: Path, expected_rows: int | None = None) -> list[str]:
    """Files under `out` that are not complete: temporary files, empty or unparsable JSON,
    YAML and CSV files (locks and logs excepted: empty by design, or append-only text)."""
    import yaml
    problems = []
    for path in out.rglob("*"):
        if not path.is_file() or path.name == "filler":
            continue
        rel = path.relative_to(out)
        if ".tmp" in path.name:
            problems.append(f"{rel}: temporary file left behind")
        elif path.suffix in (".lock", ".held", ".log") or path.name in ("failures.jsonl", "failed_models.txt"):
            continue
        elif path.suffix == ".json":
            try:
                json.loads(path.read_text())
            except ValueError:
                problems.append(f"{rel}: not complete JSON")
        elif path.suffix == ".yaml":
            if not path.read_text().strip() or not isinstance(yaml.safe_load(path.read_text()), dict):
                problems.append(f"{rel}: empty or not a mapping")
        elif path.suffix == ".csv":
            with path.open(newline="") as handle:
                rows = list(csv.reader(handle))
            if not rows or (len(rows) > 1 and len({len(r) for r in rows}) != 1):
                problems.append(f"{rel}: empty or ragged CSV")
            elif expected_rows is not None and path.parent == out and path.name not in (
                    "summary.csv", "runs.csv") and len(rows) - 1 != expected_rows:
                problems.append(f"{rel}: {len(rows) - 1} rows, expected {expected_rows}")
    for line_file in (out / "failures.jsonl",):
        if line_file.exists() and line_file.read_bytes() and not line_file.read_bytes().endswith(b"\n"):
            problems.append(f"{line_file.name}: last line cut short")
    return problems


def tracebacks(*texts: str) -> int:
    return sum(text.count("Traceback (most recent call last)") for text in texts)
