"""bench/gpu_check.py cannot rot: its --small run works on CPU, and its verdict catches a
metric that disagrees with the float64 SVD."""
import math
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
import gpu_check  # noqa: E402


def test_gpu_check_small_runs_on_cpu_and_reports_every_metric_within_1e_4(tmp_path):
    done = subprocess.run([sys.executable, str(ROOT / "bench" / "gpu_check.py"), "--small", "--skip_ww",
                           "--work_dir", str(tmp_path)], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    assert "RESULT: OK" in done.stdout and "models/hour/GPU" in done.stdout
    for metric in gpu_check.METRICS:
        assert f"  {metric} " in done.stdout, metric
    for stage in ("read (bf16 -> float32)", "host -> device", "eigensolver", "fit + metrics"):
        assert stage in done.stdout


def test_gpu_check_verdict_flags_a_metric_off_by_more_than_1e_4(tmp_path):
    model_dir = gpu_check.build_checkpoint(tmp_path / "m", gpu_check.SMALL, "cpu")
    names = gpu_check.reference_subset(gpu_check.SMALL)[:2]
    rows = []
    for name in names:
        row = gpu_check.reference_row(gpu_check.read_tensor(model_dir, name), gpu_check.net_esd.ESDSettings(fix_fingers="DKS"))
        rows.append(dict(row, longname=name))
    exact = gpu_check.largest_differences(pd.DataFrame(rows), model_dir, names)
    assert all(value == 0 or value < 1e-12 for value in exact.values())
    rows[1]["alpha"] *= 1 + 3e-4
    off = gpu_check.largest_differences(pd.DataFrame(rows), model_dir, names)
    assert off["alpha"] == pytest.approx(3e-4, rel=1e-3) and off["D"] < 1e-12
    assert not math.isnan(off["entropy"])
