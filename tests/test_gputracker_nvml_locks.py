"""The NVML wrapper against the fake pynvml, and cross-process GPU claims."""
from __future__ import annotations

import os
import stat
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gputracker_testkit import load_fake_pynvml, write_fake_gpus  # noqa: E402

from gputracker import locks  # noqa: E402
from gputracker.nvml import Nvml  # noqa: E402


def test_nvml_reports_used_memory_in_mb_and_a_failing_gpu_as_none_without_raising(tmp_path, monkeypatch):
    load_fake_pynvml(monkeypatch, write_fake_gpus(tmp_path / "f.json", [
        {"used_mb": 1234, "total_mb": 8000, "name": "Fake A100"}, {"used_mb": "raise:GPU_IS_LOST"}]))
    nvml = Nvml()
    assert nvml.open() and nvml.device_count() == 2
    assert nvml.memory_used_mb(0) == 1234
    assert nvml.memory_used_mb(1) is None
    assert nvml.memory_used_mb(7) is None  # invalid index is an NVML error too, not a crash
    info = nvml.gpu_info(0)
    assert (info.name, info.memory_total_mb) == ("Fake A100", 8000)
    nvml.close()


def test_nvml_missing_library_or_driver_is_unavailable_with_the_reason(tmp_path, monkeypatch):
    load_fake_pynvml(monkeypatch, None)
    nvml = Nvml()
    assert not nvml.open() and "NVML Shared Library Not Found" in nvml.unavailable_reason
    assert nvml.memory_used_mb(0) is None and nvml.device_count() == 0
    load_fake_pynvml(monkeypatch, write_fake_gpus(tmp_path / "f.json", [], init_error="DRIVER_NOT_LOADED"))
    nvml = Nvml()
    assert not nvml.open() and "Driver Not Loaded" in nvml.unavailable_reason


def test_fake_pynvml_raises_the_same_error_classes_as_nvidia_ml_py(tmp_path, monkeypatch):
    fake = load_fake_pynvml(monkeypatch, write_fake_gpus(tmp_path / "f.json", [{"used_mb": "raise"}]))
    import pynvml as real_or_fake  # noqa: F401  (sys.modules holds the fake here)
    assert fake.NVMLError(fake.NVML_ERROR_GPU_IS_LOST).__class__ is fake.NVMLError_GpuIsLost
    assert isinstance(fake.NVMLError_LibraryNotFound(), fake.NVMLError)
    fake.nvmlInit()
    try:
        fake.nvmlDeviceGetMemoryInfo(fake.nvmlDeviceGetHandleByIndex(0))
    except fake.NVMLError as exc:
        assert exc.value == fake.NVML_ERROR_UNKNOWN
    else:
        raise AssertionError("scripted 'raise' did not raise")
    finally:
        fake.nvmlShutdown()


def test_claims_are_exclusive_until_released(tmp_path):
    lock_dir = locks.ensure_lock_dir(tmp_path / "locks")
    first = locks.try_claim(lock_dir, 0)
    assert first is not None
    assert locks.try_claim(lock_dir, 0) is None  # a second open file cannot take it, even in-process
    assert locks.try_claim(lock_dir, 1) is not None
    first.release()
    assert locks.try_claim(lock_dir, 0) is not None


def test_claim_some_is_all_or_nothing(tmp_path):
    lock_dir = locks.ensure_lock_dir(tmp_path / "locks")
    held = locks.try_claim(lock_dir, 2)
    tried = []
    assert locks.try_claim_some(lock_dir, [0, 1, 2], 3, lambda gpu, ok: tried.append((gpu, ok))) is None
    assert tried == [(0, True), (1, True), (2, False)]
    again = [locks.try_claim(lock_dir, 0), locks.try_claim(lock_dir, 1)]  # nothing was kept
    assert None not in again
    for claim in again:
        claim.release()
    two = locks.try_claim_some(lock_dir, [2, 0, 1], 2)  # the held GPU is skipped
    assert [c.gpu_index for c in two] == [0, 1]
    for claim in two:
        claim.release()
    held.release()


def test_claim_held_by_another_process_blocks_us_and_is_freed_when_it_dies(tmp_path):
    lock_dir = locks.ensure_lock_dir(tmp_path / "locks")
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from gputracker import locks; from pathlib import Path; "
         "c = locks.try_claim(Path(sys.argv[1]), 0); print(c is not None, flush=True); time.sleep(60)",
         str(lock_dir)], stdout=subprocess.PIPE, text=True,
        env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])})
    try:
        assert holder.stdout.readline().strip() == "True"
        assert locks.try_claim(lock_dir, 0) is None
    finally:
        holder.kill()
        holder.wait()
    assert locks.try_claim(lock_dir, 0) is not None  # the kernel dropped the dead holder's claim


def test_lock_dir_is_created_shared_and_sticky_and_env_var_overrides_default(tmp_path, monkeypatch):
    lock_dir = locks.ensure_lock_dir(tmp_path / "shared" / "locks")
    mode = stat.S_IMODE(lock_dir.stat().st_mode)
    assert mode == 0o1777
    monkeypatch.setenv(locks.LOCK_DIR_ENV, str(tmp_path / "from_env"))
    assert locks.resolve_lock_dir(None) == tmp_path / "from_env"
    assert locks.resolve_lock_dir(tmp_path / "explicit") == tmp_path / "explicit"
    monkeypatch.delenv(locks.LOCK_DIR_ENV)
    assert locks.resolve_lock_dir(None) == locks.DEFAULT_LOCK_DIR
