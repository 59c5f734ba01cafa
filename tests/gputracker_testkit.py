"""Shared helpers of the gputracker tests: scripted fake GPUs, recording jobs, overlap checks.

The jobs are real subprocesses (``python job.py ...``) that record the GPUs they were given
(``CUDA_VISIBLE_DEVICES``), their pid, an optional grandchild's pid and their start/end times.
The GPUs come from ``tests/fake_nvml/pynvml.py`` (a fake of the pynvml module, not of our code).
"""
from __future__ import annotations

import importlib.util
import json
import os
import sys
import time
from pathlib import Path

TESTS_DIR = Path(__file__).resolve().parent
REPO_ROOT = TESTS_DIR.parent
FAKE_NVML_DIR = TESTS_DIR / "fake_nvml"
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

JOB_SCRIPT = r'''
import json, os, subprocess, sys, time
record_dir, job_id, sleep_s, exit_code, grandchild = sys.argv[1:6]
record = {"job_id": job_id, "pid": os.getpid(), "pgid": os.getpgid(0),
          "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES"),
          "cuda_device_order": os.environ.get("CUDA_DEVICE_ORDER"),
          "extra_env": os.environ.get("GT_EXTRA"), "start": time.time(), "end": None, "grandchild_pid": None}
def save():
    path = os.path.join(record_dir, job_id + ".json")
    with open(path + ".tmp", "w") as f:
        json.dump(record, f)
    os.replace(path + ".tmp", path)
if grandchild == "1":
    record["grandchild_pid"] = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"]).pid
save()
time.sleep(float(sleep_s))
record["end"] = time.time()
save()
if exit_code == "self-kill":
    os.kill(os.getpid(), 9)
sys.exit(int(exit_code))
'''


def write_fake_gpus(path: Path, gpus: list[dict], **top) -> Path:
    """Script the fake GPUs (see tests/fake_nvml/pynvml.py); t0 = now. Atomic replace."""
    data = {"t0": time.time(), "gpus": gpus, **top}
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data))
    os.replace(tmp, path)
    return path


def load_fake_pynvml(monkeypatch, script_path: Path | None):
    """Make ``import pynvml`` in this process return the fake (the real one needs a GPU)."""
    spec = importlib.util.spec_from_file_location("pynvml", FAKE_NVML_DIR / "pynvml.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    monkeypatch.setitem(sys.modules, "pynvml", module)
    if script_path is None:
        monkeypatch.delenv("FAKE_NVML_SCRIPT", raising=False)
    else:
        monkeypatch.setenv("FAKE_NVML_SCRIPT", str(script_path))
    return module


def subprocess_env(script_path: Path | None, **extra) -> dict:
    """Environment for a ``python -m gputracker`` child that sees the fake pynvml."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(FAKE_NVML_DIR), str(REPO_ROOT), env.get("PYTHONPATH", "")])
    env.pop("FAKE_NVML_SCRIPT", None)
    if script_path is not None:
        env["FAKE_NVML_SCRIPT"] = str(script_path)
    env.update(extra)
    return env


class JobFactory:
    """Builds argv lists of recording jobs that write into ``record_dir``."""

    def __init__(self, tmp_path: Path):
        self.record_dir = tmp_path / "records"
        self.record_dir.mkdir(exist_ok=True)
        self.script = tmp_path / "job.py"
        self.script.write_text(JOB_SCRIPT)

    def argv(self, job_id: str, sleep_s: float = 0.1, exit_code="0", grandchild: bool = False) -> list[str]:
        return [sys.executable, str(self.script), str(self.record_dir), job_id, str(sleep_s), str(exit_code),
                "1" if grandchild else "0"]

    def command_line(self, *args, **kwargs) -> str:
        import shlex
        return shlex.join(self.argv(*args, **kwargs))

    def records(self) -> dict[str, dict]:
        return {p.stem: json.loads(p.read_text()) for p in self.record_dir.glob("*.json")}


def gpus_of(record: dict) -> tuple[int, ...]:
    value = record["cuda_visible_devices"]
    return tuple(int(g) for g in value.split(",")) if value else ()


def assert_no_gpu_overlap(intervals):
    """``intervals``: (label, start, end, gpus). No two overlapping in time share a GPU."""
    intervals = list(intervals)
    for i, (label_a, start_a, end_a, gpus_a) in enumerate(intervals):
        for label_b, start_b, end_b, gpus_b in intervals[i + 1:]:
            if start_a < end_b and start_b < end_a:
                shared = set(gpus_a) & set(gpus_b)
                assert not shared, f"{label_a} and {label_b} overlap in time on GPU(s) {sorted(shared)}"


def max_concurrency(intervals) -> int:
    events = sorted([(s, 1) for _, s, _, _ in intervals] + [(e, -1) for _, _, e, _ in intervals],
                    key=lambda x: (x[0], x[1]))
    running = peak = 0
    for _, delta in events:
        running += delta
        peak = max(peak, running)
    return peak


def record_intervals(records: dict[str, dict]):
    return [(r["job_id"], r["start"], r["end"], gpus_of(r)) for r in records.values() if r["end"] is not None]


def result_intervals(results):
    return [(r.job_id, r.start_time, r.end_time, r.gpus) for r in results if r.start_time is not None]


def process_is_running(pid: int) -> bool:
    """True while ``pid`` exists and is not a zombie (PID 1 may not reap orphans here)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_bytes()
    except OSError:
        return False
    return stat[stat.rfind(b")") + 2:].split()[0] not in (b"Z", b"X")


def wait_until(predicate, timeout_s: float, interval_s: float = 0.05) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval_s)
    return predicate()
