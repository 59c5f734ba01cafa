"""Typed failures and the two files that record them.

Owns: `ESDFailure` (stage, reason, retryable: the orchestrator decides without parsing
text), and `failed_models.txt` / `failures.jsonl` under an output directory. Both files
hold the current state: one line per failed model, rewritten under a file lock and
replaced atomically, so reruns never duplicate a line and a crash never half-writes one.
A model that later succeeds is removed from both.
"""
from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from filelock import FileLock

from esd.atomic_files import write_text_atomic

STAGES = ("resolve", "load", "merge", "analyze", "save", "worker")

# Reasons a retry can help with; everything else is final.
RETRYABLE_REASONS = frozenset({
    "download_interrupted", "network_error", "out_of_memory", "worker_killed",
    "hub_unavailable",
})

FAILED_MODELS_TXT = "failed_models.txt"
FAILURES_JSONL = "failures.jsonl"

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


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


def _lock(output_dir: Path) -> FileLock:
    return FileLock(str(output_dir / ".failures.lock"))


def _parse_record(line: str) -> FailureRecord | None:
    """One line of failures.jsonl, or None if it is not a record (e.g. cut short by a crash)."""
    try:
        data = json.loads(line)
        return FailureRecord(**data) if isinstance(data, dict) else None
    except (ValueError, TypeError):  # not JSON, or not the record's fields
        return None


def _read_records(output_dir: Path) -> dict[str, FailureRecord]:
    """Every readable record; an unreadable line is reported and left out (the next write
    drops it), so one damaged line cannot stop every worker from recording its failure."""
    path = output_dir / FAILURES_JSONL
    records: dict[str, FailureRecord] = {}
    if path.exists():
        text = path.read_bytes().decode("utf-8", errors="replace")
        for number, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            record = _parse_record(line)
            if record is None:
                log.warning("%s, line %d is not a failure record (cut short?); ignored: %.80s",
                            path, number, line)
                continue
            records[record.model_id] = record
    return records


def _write_records(output_dir: Path, records: dict[str, FailureRecord]) -> None:
    ordered = sorted(records.values(), key=lambda r: r.model_id)
    write_text_atomic(output_dir / FAILURES_JSONL,
                  "".join(json.dumps(asdict(r)) + "\n" for r in ordered))
    write_text_atomic(output_dir / FAILED_MODELS_TXT,
                  "".join(f"{r.model_id}\t{r.stage}: {r.reason}: {_one_line(r.message)}\n"
                          for r in ordered))


def record_failure(output_dir, model_id: str, failure: ESDFailure) -> FailureRecord:
    """Record (or replace) the failure of one model; counts attempts across reruns."""
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    with _lock(output_dir):
        records = _read_records(output_dir)
        previous = records.get(model_id)
        attempts = previous.attempts + 1 if previous else 1
        record = FailureRecord.from_failure(model_id, failure, attempts)
        records[model_id] = record
        _write_records(output_dir, records)
    return record


def clear_failure(output_dir, model_id: str) -> None:
    """Forget a model's failure (it has succeeded)."""
    output_dir = Path(output_dir)
    if not (output_dir / FAILURES_JSONL).exists():
        return
    with _lock(output_dir):
        records = _read_records(output_dir)
        if records.pop(model_id, None) is not None:
            _write_records(output_dir, records)


def read_failures(output_dir) -> dict[str, FailureRecord]:
    """The current failure of every failed model, by model key."""
    output_dir = Path(output_dir)
    if not (output_dir / FAILURES_JSONL).exists():
        return {}
    with _lock(output_dir):
        return _read_records(output_dir)
