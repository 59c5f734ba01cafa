"""Typed failures and the two files that record them.

Owns: `ESDFailure` (stage, reason, retryable: the orchestrator decides without parsing
text), and `failed_models.txt` / `failures.jsonl` under an output directory.

What readers see: one current record per failed model (`read_failures`); a model that
later succeeds, or whose result file exists, is in neither file. `failed_models.txt` has
one line per failed model, no duplicates, every control character in it escaped (an id
with a newline is still one line).

How it stays linear over a long failing list: `failures.jsonl` is a journal. A failure
appends its record (one line, under the lock); a success appends a `"cleared"` line; the
last line of a model wins. `compact_failures` rewrites the journal to one line per failed
model, atomically; the orchestrator calls it at the start and the end of a run, so between
runs the file holds exactly the current records. `read_failures` remembers what it read and
reads only the lines appended since (a long-lived orchestrator never re-reads the file per
job). A write that fails half-way (a full disk) is cut back, so no line is ever half there.

Recording or clearing one model never reads the journal: `.failures/` holds each failed
model's current record in a file of its own (named by a hash of its key), which gives the
previous attempt (to count attempts, and to know whether failed_models.txt lists it) in
one small read, however long the journal is. The journal stays the record readers read;
`.failures/` is rebuilt from it whenever it is missing (a directory from before it existed),
atomically, and dropped with the journal.

Must not: decide retries (the orchestrator does), or know about models beyond their key.
"""
from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from filelock import FileLock

from esd.atomic_files import write_text_atomic

STAGES = ("resolve", "load", "merge", "analyze", "save", "worker")

# Reasons a retry can help with; everything else is final. A new retryable reason is one
# word here: `ESDFailure(stage, reason, message)` reads it.
RETRYABLE_REASONS = frozenset({
    "download_interrupted", "network_error", "out_of_memory", "worker_killed",
    "hub_unavailable", "disk_full", "rate_limited", "expired_url", "retryable_exit",
})

FAILED_MODELS_TXT = "failed_models.txt"
FAILURES_JSONL = "failures.jsonl"
CURRENT_DIR = ".failures"   # one file per failed model: its current record

log = logging.getLogger("esd_experiment.failures")  # under the run's log; the worker's root log


class ESDFailure(Exception):
    """A failure with a stage (`resolve`, `load`, `merge`, `analyze`, `save`), a reason
    (`repo_not_found`, `gated`, `adapter_base_unresolved`, `corrupt_file`, …) and whether
    a retry can help."""

    def __init__(self, stage: str, reason: str, message: str, retryable: bool | None = None):
        super().__init__(message)
        self.stage = stage
        self.reason = reason
        self.message = message
        self.retryable = reason in RETRYABLE_REASONS if retryable is None else retryable

    def __str__(self) -> str:
        return f"{self.stage}/{self.reason}: {self.message}"


@dataclass(frozen=True)
class FailureRecord:
    model_id: str        # ModelEntry.key: `org/name` or `org/name@rev`
    stage: str
    reason: str
    message: str
    retryable: bool
    attempts: int = 1
    time: float = 0.0

    @classmethod
    def from_failure(cls, model_id: str, failure: ESDFailure, attempts: int = 1) -> "FailureRecord":
        return cls(model_id, failure.stage, failure.reason, failure.message,
                   failure.retryable, attempts, time.time())


# ---------------------------------------------------------------- text that stays one line

_LINE_BREAKING = frozenset("\x85\u2028\u2029")  # str.splitlines() breaks on these too


def escape_line_text(text: object) -> str:
    """`text` with every control character (newline, tab, ESC of an ANSI sequence, …)
    written as a visible escape (`\\n`, `\\x1b`), so it stays on one line of a line-based
    file and never drives a terminal."""
    text = str(text)
    if text.isprintable() and not _LINE_BREAKING.intersection(text):
        return text
    out = []
    for char in text:
        if char.isprintable() and char not in _LINE_BREAKING:
            out.append(char)
        elif char == " ":
            out.append(char)
        else:
            out.append(char.encode("unicode_escape").decode("ascii"))
    return "".join(out)


def _one_line(text: str) -> str:
    return escape_line_text(" ".join(str(text).split()))


def _txt_line(record: FailureRecord) -> str:
    return f"{escape_line_text(record.model_id)}\t{record.stage}: {record.reason}: {_one_line(record.message)}\n"


# ---------------------------------------------------------------- the journal

def _lock(output_dir: Path) -> FileLock:
    return FileLock(str(output_dir / ".failures.lock"))


def _parse_line(line: str):
    """('record', FailureRecord) | ('cleared', model_id) | None for a line that is neither
    (cut short by a crash, damaged, or nested too deep to parse)."""
    try:
        data = json.loads(line)
    except (ValueError, RecursionError):  # RecursionError: `[[[[…` 100,000 deep
        return None
    if not isinstance(data, dict) or not isinstance(data.get("model_id"), str):
        return None
    if data.get("cleared") is True:
        return "cleared", data["model_id"]
    try:
        return "record", FailureRecord(**data)
    except TypeError:  # not the record's fields
        return None


@dataclass
class _View:
    """What this process has folded of one journal: up to `offset`, whose last bytes are
    `tail` (a compaction replaces the file; a changed inode or tail means read it again)."""
    inode: tuple[int, int]
    offset: int
    tail: bytes
    lines: int
    records: dict


_views: dict[str, _View] = {}
_TAIL_BYTES = 256


def _fold(data: bytes, records: dict, path: Path, first_line: int) -> None:
    """Apply the lines of `data` to `records` (read under the lock: a last line without its
    newline is a writer's crash, not a write in progress; the next append ends it)."""
    number = first_line
    for raw in data.split(b"\n"):
        number += 1
        line = raw.decode("utf-8", errors="replace")
        if not line.strip():
            continue
        parsed = _parse_line(line)
        if parsed is None:
            log.warning("%s, line %d is not a failure record (cut short?); ignored: %.80s",
                        path, number, escape_line_text(line))
        elif parsed[0] == "cleared":
            records.pop(parsed[1], None)
        else:
            records[parsed[1].model_id] = parsed[1]


def _read_records(output_dir: Path) -> dict[str, FailureRecord]:
    """Every current record (call under the lock). Reads only what was appended since
    this process last looked, unless the file was replaced. An unreadable line is reported
    and left out (the next compaction drops it), so one damaged line cannot stop every
    worker from recording its failure."""
    path = output_dir / FAILURES_JSONL
    try:
        handle = open(path, "rb")
    except FileNotFoundError:
        _views.pop(str(path), None)
        return {}
    with handle:
        stat = os.fstat(handle.fileno())
        inode = (stat.st_dev, stat.st_ino)
        view = _views.get(str(path))
        if view is not None and view.inode == inode and stat.st_size >= view.offset:
            handle.seek(max(0, view.offset - _TAIL_BYTES))
            if handle.read(view.offset - max(0, view.offset - _TAIL_BYTES)) != view.tail:
                view = None
        else:
            view = None
        if view is None:
            view = _View(inode, 0, b"", 0, {})
            handle.seek(0)
        new = handle.read()
    _fold(new, view.records, path, view.lines)
    view.lines += new.count(b"\n")
    view.offset += len(new)
    view.tail = (view.tail + new)[-_TAIL_BYTES:]
    _views[str(path)] = view
    return dict(view.records)


def _append(path: Path, text: str) -> None:
    """Append one complete line; a write that fails half-way (ENOSPC) is cut back, and a
    previous line left without its newline (a writer killed mid-line) gets one first."""
    data = text.encode("utf-8")
    fd = os.open(path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        size = os.fstat(fd).st_size
        if size and os.pread(fd, 1, size - 1) != b"\n":
            data = b"\n" + data
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
        except OSError:
            os.ftruncate(fd, size)
            raise
    finally:
        os.close(fd)


# ---------------------------------------------------------------- each failed model's current record

def _current_path(output_dir: Path, model_id: str) -> Path:
    return output_dir / CURRENT_DIR / (hashlib.sha256(model_id.encode("utf-8", "surrogatepass")).hexdigest()[:40] + ".json")


def _current_record(output_dir: Path, model_id: str) -> FailureRecord | None:
    """The model's current record (call under the lock, after `_current_index`): one small read."""
    try:
        text = _current_path(output_dir, model_id).read_text(encoding="utf-8")
    except (FileNotFoundError, NotADirectoryError):
        return None
    parsed = _parse_line(text)
    return parsed[1] if parsed and parsed[0] == "record" and parsed[1].model_id == model_id else None


def _set_current(output_dir: Path, record: FailureRecord) -> None:
    write_text_atomic(_current_path(output_dir, record.model_id), json.dumps(asdict(record)) + "\n")


def _current_index(output_dir: Path) -> None:
    """Make `.failures/` agree with the journal (call under the lock): built from the journal
    when missing (once), removed when the journal is gone. Two stats when all is in place."""
    index, journal = output_dir / CURRENT_DIR, output_dir / FAILURES_JSONL
    if not journal.exists():
        if index.exists():
            shutil.rmtree(index, ignore_errors=True)
        return
    if not index.is_dir():
        _write_index(output_dir, _read_records(output_dir))


def _sync_index(output_dir: Path, records: dict[str, FailureRecord]) -> None:
    """`.failures/` holding exactly the files of `records` (the compaction's check): missing
    ones written, others removed; the ones in place are kept as they are."""
    index = output_dir / CURRENT_DIR
    if not index.is_dir():
        _write_index(output_dir, records)
        return
    wanted = {_current_path(output_dir, r.model_id).name: r for r in records.values()}
    present = set(os.listdir(index))
    for name in present - wanted.keys():
        (index / name).unlink(missing_ok=True)
    for name in wanted.keys() - present:
        _set_current(output_dir, wanted[name])


def _write_index(output_dir: Path, records: dict[str, FailureRecord]) -> None:
    """`.failures/` replaced whole by one file per record; renamed into place when complete."""
    index = output_dir / CURRENT_DIR
    building = output_dir / f"{CURRENT_DIR}.building-{os.getpid()}"
    shutil.rmtree(building, ignore_errors=True)
    building.mkdir()
    try:
        for record in records.values():
            path = building / _current_path(output_dir, record.model_id).name
            path.write_text(json.dumps(asdict(record)) + "\n", encoding="utf-8")
        old = output_dir / f"{CURRENT_DIR}.old-{os.getpid()}"
        if index.exists():
            os.replace(index, old)
        os.replace(building, index)
        shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(building, ignore_errors=True)


def _rewrite_txt_without(output_dir: Path, model_ids: set[str]) -> None:
    path = output_dir / FAILED_MODELS_TXT
    escaped = {escape_line_text(m) for m in model_ids}
    try:
        lines = path.read_text(encoding="utf-8", errors="replace").split("\n")
    except FileNotFoundError:
        return
    kept = [line + "\n" for line in lines if line and line.partition("\t")[0] not in escaped]
    write_text_atomic(path, "".join(kept))


def _write_compacted(output_dir: Path, records: dict[str, FailureRecord]) -> None:
    ordered = sorted(records.values(), key=lambda r: r.model_id)
    write_text_atomic(output_dir / FAILURES_JSONL, "".join(json.dumps(asdict(r)) + "\n" for r in ordered))
    write_text_atomic(output_dir / FAILED_MODELS_TXT, "".join(_txt_line(r) for r in ordered))


# ---------------------------------------------------------------- the public functions

def record_failure(output_dir, model_id: str, failure: ESDFailure) -> FailureRecord:
    """Record (or replace) the failure of one model; counts attempts across reruns."""
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    with _lock(output_dir):
        _current_index(output_dir)
        previous = _current_record(output_dir, model_id)
        record = FailureRecord.from_failure(model_id, failure, previous.attempts + 1 if previous else 1)
        _append(output_dir / FAILURES_JSONL, json.dumps(asdict(record)) + "\n")
        txt = output_dir / FAILED_MODELS_TXT
        if not txt.exists():  # e.g. a journal from before: the listing is rebuilt whole
            _write_compacted(output_dir, _read_records(output_dir))
        elif previous is None:
            _append(txt, _txt_line(record))
        elif _txt_line(previous) != _txt_line(record):
            _rewrite_txt_without(output_dir, {model_id})
            _append(txt, _txt_line(record))
        (output_dir / CURRENT_DIR).mkdir(exist_ok=True)  # (a journal just begun)
        _set_current(output_dir, record)
    return record


def clear_failures(output_dir, model_ids) -> int:
    """Forget the failures of models that have succeeded (or whose result file exists);
    returns how many were listed."""
    output_dir = Path(output_dir)
    wanted = set(model_ids)
    if not wanted or not (output_dir / FAILURES_JSONL).exists():
        return 0
    with _lock(output_dir):
        _current_index(output_dir)
        listed = {m for m in wanted if _current_path(output_dir, m).exists()}
        if listed:
            stamp = time.time()
            try:
                _append(output_dir / FAILURES_JSONL,
                        "".join(json.dumps({"model_id": m, "cleared": True, "time": stamp}) + "\n"
                                for m in sorted(listed)))
                _rewrite_txt_without(output_dir, listed)
                for model_id in listed:
                    _current_path(output_dir, model_id).unlink(missing_ok=True)
            except OSError as exc:  # the result exists; the next run's planning clears it
                if exc.errno not in (errno.ENOSPC, errno.EDQUOT):
                    raise
                log.warning("could not record that %d model(s) are done (disk full); the next run "
                            "clears them from %s", len(listed), FAILED_MODELS_TXT)
    return len(listed)


def clear_failure(output_dir, model_id: str) -> None:
    """Forget a model's failure (it has succeeded)."""
    clear_failures(output_dir, [model_id])


def read_failures(output_dir) -> dict[str, FailureRecord]:
    """The current failure of every failed model, by model key."""
    output_dir = Path(output_dir)
    if not (output_dir / FAILURES_JSONL).exists():
        return {}
    with _lock(output_dir):
        return _read_records(output_dir)


def compact_failures(output_dir) -> None:
    """Rewrite both files to exactly one line per currently failed model (sorted)."""
    output_dir = Path(output_dir)
    if not (output_dir / FAILURES_JSONL).exists():
        return
    with _lock(output_dir):
        records = _read_records(output_dir)
        _write_compacted(output_dir, records)
        _sync_index(output_dir, records)



def failure_recorded_since(output_dir, model_id: str, since: float) -> FailureRecord | None:
    """The model's current failure if it was recorded at or after `since` (epoch seconds):
    another worker's attempt that ended while we waited for the model's lock."""
    output_dir = Path(output_dir)
    if not (output_dir / FAILURES_JSONL).exists():
        return None
    with _lock(output_dir):
        _current_index(output_dir)
        record = _current_record(output_dir, model_id)
    return record if record is not None and record.time >= since else None
