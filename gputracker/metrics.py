"""``gpu_metrics.json``: what a dispatcher run did, computed from its ``JobResult``s.

Owns the metrics' shape and the atomic write (temp file in the same directory, then
``os.replace``), so a metrics file that exists is complete. Must not schedule anything.
"""
from __future__ import annotations

import json
import os
import hashlib
import socket
from collections import Counter
from datetime import datetime, timezone
from pathlib import Path

_HOST = hashlib.sha1(socket.gethostname().encode("utf-8", "replace")).hexdigest()[:6]


def _stats_s(values: list[float]) -> dict:
    if not values:
        return {"count": 0, "mean": None, "p95": None, "max": None}
    ordered = sorted(values)
    p95 = ordered[min(len(ordered) - 1, int(round(0.95 * (len(ordered) - 1))))]
    return {"count": len(values), "mean": sum(values) / len(values), "p95": p95, "max": ordered[-1]}


def regrant_latencies_s(results) -> list[float]:
    """For each GPU, the gaps between one of our jobs ending on it and our next job starting
    on it: how long a GPU we released stayed idle while jobs were waiting."""
    by_gpu: dict[int, list] = {}
    for r in results:
        if r.start_time is None:
            continue
        for gpu in r.gpus:
            by_gpu.setdefault(gpu, []).append(r)
    gaps = []
    for runs in by_gpu.values():
        runs.sort(key=lambda r: r.start_time)
        for previous, following in zip(runs, runs[1:]):
            # only count launches that were waiting for this GPU when it was released
            if previous.end_time is not None and following.start_time - following.wait_s <= previous.end_time:
                gaps.append(max(0.0, following.start_time - previous.end_time))
    return gaps


def build_metrics(results, mode: str, gpus: list[int], total_runtime_s: float, started_at: float | None) -> dict:
    """The ``gpu_metrics.json`` content. ``failed`` counts every job that did not succeed;
    ``timed_out``, ``interrupted`` and ``not_started`` are subsets of it."""
    ran = [r for r in results if r.start_time is not None]
    waits_s = [r.wait_s for r in ran]
    jobs_per_gpu = Counter(g for r in ran for g in r.gpus)
    return {
        "mode": mode,
        "gpus": list(gpus),
        "started_at": None if started_at is None else datetime.fromtimestamp(started_at, timezone.utc).isoformat(),
        "total_runtime_s": total_runtime_s,
        "jobs": len(results),
        "succeeded": sum(r.succeeded for r in results),
        "failed": sum(not r.succeeded for r in results),
        "timed_out": sum(r.timed_out for r in results),
        "interrupted": sum(r.interrupted for r in results),
        "not_started": len(results) - len(ran),
        "gpu_wait_s": _stats_s(waits_s),
        "gpu_regrant_latency_s": _stats_s(regrant_latencies_s(results)),
        "jobs_per_gpu": {str(g): jobs_per_gpu.get(g, 0) for g in gpus},
        "per_job": [
            {
                "job_id": r.job_id,
                "gpus": list(r.gpus),
                "returncode": r.returncode,
                "wait_s": r.wait_s,
                "runtime_s": r.runtime_s,
                "timed_out": r.timed_out,
                "interrupted": r.interrupted,
                "log_path": None if r.log_path is None else str(r.log_path),
            }
            for r in results
        ],
    }


def write_json_atomic(path: Path, data: dict) -> Path:
    """Write ``data`` to ``path`` so that readers see the old file or the new one, never half."""
    path.parent.mkdir(parents=True, exist_ok=True)
    # `.name.tmp<pid>-<host>`: a run removes such files of dead writers (esd.atomic_files)
    tmp_name = str(path.with_name(f".{path.name}.tmp{os.getpid()}-{_HOST}"))
    fd = os.open(tmp_name, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        with os.fdopen(fd, "w") as tmp:
            json.dump(data, tmp, indent=2)
            tmp.write("\n")
            tmp.flush()
            os.fsync(tmp.fileno())
        os.chmod(tmp_name, 0o644)
        os.replace(tmp_name, path)
    except BaseException:
        try:
            os.unlink(tmp_name)
        except FileNotFoundError:
            pass
        raise
    return path
