"""One output directory, one set of ESD settings: `esd_settings.json` claimed atomically
and held by every run (and every worker) for its whole life.

Results computed with different ESD settings are not comparable, so a directory's
`esd_settings.json` says which settings its results have. Claiming it is a check-and-write
under `.esd_settings.lock` (no two runs can both find it missing, or both rewrite it). A
claimant then holds a shared `flock` on `.esd_settings.held` until it exits; a run asking
for other settings needs that lock exclusively to rewrite the file (`--overwrite`), so it is
refused for as long as any run or worker with the stored settings is alive, not only at
the moment the other run started. Runs with the same settings share the directory freely.

When `--overwrite` replaces the settings, the results made with the old ones are moved
aside at that moment, before the new settings file is written (under both locks, so no run
or worker of the old settings is alive): `superseded/<time>/` gets the per-model CSVs, their
eigenvalues and the summaries, with the old `esd_settings.json`. So a result in the
directory was always made with the settings it names, and a run cut short (`--limit`,
Ctrl-C) leaves nothing of the old settings to be counted as done by the next run. A kill
during the move leaves the old settings file in place: the next `--overwrite` moves the rest.

Owns the file, the two locks, the move aside and the messages. Must not compute, delete or
compare results: a caller passes the settings as a plain dict (`dataclasses.asdict` of them);
a per-model result is recognised by its header (model_id, longname, alpha), nothing else is
ever moved.
"""
from __future__ import annotations

import fcntl
import json
import logging
import os
import time
from pathlib import Path

from filelock import FileLock

from esd.atomic_files import write_text_atomic

SETTINGS_FILE = "esd_settings.json"
SUPERSEDED_DIR = "superseded"
RESULT_HEADER = ("model_id", "longname", "alpha")   # the columns that make a per-model CSV
DERIVED_FROM_RESULTS = ("eigs",)                     # directories of per-model results
SUMMARY_PREFIXES = ("summary", "over_steps")         # made from the results: stale with them
_MUTEX = ".esd_settings.lock"
_HELD = ".esd_settings.held"

_holds: dict[str, int] = {}  # output dir -> fd of our shared lock (released at exit)


class SettingsConflict(ValueError):
    """The directory holds (or another live run uses) other ESD settings; the message says
    which and what to do."""


def read_settings(output_dir) -> dict | None:
    """The stored settings, None if there are none; SettingsConflict if the file is damaged."""
    path = Path(output_dir) / SETTINGS_FILE
    if not os.path.lexists(path):
        return None
    try:
        stored = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as exc:  # a directory, cut short, [[[[…
        stored = f"{type(exc).__name__}: {str(exc)[:120]}"
    if not isinstance(stored, dict):
        raise SettingsConflict(
            f"{path} is damaged (not a JSON object of ESD settings: {stored}). It records the settings "
            f"this directory's results were computed with: restore it, or remove it if you know they "
            f"match this run (it is then rewritten), or use --overwrite to recompute everything.")
    return stored


def differences(stored: dict, wanted: dict, defaults: dict | None = None) -> dict:
    """{setting: (stored, wanted)} for every setting of `wanted` the stored ones disagree on;
    a setting missing from `stored` (newer than the file) counts as its value in `defaults`."""
    defaults = defaults or {}
    return {k: (stored.get(k, defaults.get(k)), v) for k, v in wanted.items()
            if stored.get(k, defaults.get(k)) != v}


def _said(diff: dict) -> str:
    return ", ".join(f"{k}: {old!r} there, {new!r} asked" for k, (old, new) in diff.items())


def claim_settings(output_dir, wanted: dict, overwrite: bool = False, defaults: dict | None = None) -> None:
    """Claim `output_dir` for results computed with `wanted`, and hold it until this process
    exits (or `release`). `overwrite`: the stored settings may be replaced, if no live run
    uses them. Raises SettingsConflict with the message for the user."""
    output_dir = Path(output_dir)
    release(output_dir)  # this process's earlier run in the same directory has ended
    fd = os.open(output_dir / _HELD, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        with FileLock(str(output_dir / _MUTEX)):
            try:
                stored = read_settings(output_dir)
            except SettingsConflict:
                if not overwrite:
                    raise
                stored = {}
            diff = differences(stored, wanted, defaults) if stored is not None else None
            if diff:  # other settings stored: only a run that may replace them, alone, can
                if not _try_exclusive(fd):
                    raise SettingsConflict(
                        f"another run is using {output_dir} right now with other ESD settings "
                        f"({_said(diff)}); wait for it to end, or use another --output_dir")
                if not overwrite:
                    raise SettingsConflict(
                        f"{output_dir} holds results computed with other ESD settings ({_said(diff)}). "
                        f"Use another --output_dir, or --overwrite to recompute with the new settings.")
            if diff:  # --overwrite with other settings: nothing of the old ones stays in place
                _move_results_aside(output_dir, stored, diff)
            if stored is None or diff or overwrite:
                write_text_atomic(output_dir / SETTINGS_FILE, json.dumps(wanted, indent=2, default=str) + "\n")
            fcntl.flock(fd, fcntl.LOCK_SH)  # (from exclusive: under the mutex, nobody sees the gap)
    except BaseException:
        os.close(fd)
        raise
    _holds[str(output_dir)] = fd


def check_settings(output_dir, wanted: dict, defaults: dict | None = None) -> None:
    """Claim without replacing: a worker's check that the directory's results (and the ones
    it is about to write) have its settings (`defaults`: as in claim_settings)."""
    claim_settings(output_dir, wanted, overwrite=False, defaults=defaults)


def _try_exclusive(fd: int) -> bool:
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except BlockingIOError:
        return False


def release(output_dir) -> None:
    fd = _holds.pop(str(Path(output_dir)), None)
    if fd is not None:
        os.close(fd)


def _move_results_aside(output_dir: Path, stored: dict, diff: dict) -> Path | None:
    """Move the results made with `stored` into superseded/<time>/ (with their settings file);
    the directory it made, None when there was nothing to move."""
    moving = [p for p in sorted(output_dir.iterdir()) if _made_with_the_settings(p)]
    if not moving:
        return None
    aside = output_dir / SUPERSEDED_DIR / time.strftime("%Y%m%d-%H%M%S")
    suffix = 1
    while aside.exists():
        aside = aside.with_name(f"{aside.name.split('.')[0]}.{suffix}")
        suffix += 1
    aside.mkdir(parents=True)
    for path in moving:  # same file system: renames, nothing is copied or lost half-way
        os.replace(path, aside / path.name)
    if os.path.lexists(output_dir / SETTINGS_FILE) and stored:
        write_text_atomic(aside / SETTINGS_FILE, json.dumps(stored, indent=2, default=str) + "\n")
    logging.getLogger("esd_experiment").warning(
        "--overwrite with other ESD settings (%s): the %d result(s) of the old settings moved to %s",
        _said(diff), len(moving), aside)
    return aside


def _made_with_the_settings(path: Path) -> bool:
    """A per-model result CSV (by its header), the eigenvalues directory, or a summary."""
    if path.is_symlink():
        return False
    if path.is_dir():
        return path.name in DERIVED_FROM_RESULTS
    if not path.is_file() or path.suffix != ".csv":
        return False
    if path.name.startswith(SUMMARY_PREFIXES):
        return True
    try:
        with open(path, encoding="utf-8", errors="replace") as handle:
            header = handle.readline(65536).strip().split(",")
    except OSError:
        return False
    return set(RESULT_HEADER) <= set(header)
