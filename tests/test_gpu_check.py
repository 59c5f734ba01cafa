"""bench/gpu_check.py cannot rot: its --small run works on CPU (the end-to-end step through the
real orchestrator included, on its CPU path), its verdict catches a metric that disagrees with
the float64 SVD, and the end-to-end comparison catches two result CSVs that disagree."""
import math
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
import gpu_check  # noqa: E402


def test_gpu_check_small_runs_on_cpu_reports_every_metric_within_1e_4_and_two_orchestrator_runs_agree(tmp_path):
    done = subprocess.run([sys.executable, str(ROOT / "bench" / "gpu_check.py"), "--small", "--skip_ww",
                           "--work_dir", str(tmp_path)], capture_output=True, text=True, timeout=1800)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    assert "RESULT: OK" in done.stdout and "models/hour/GPU" in done.stdout
    for metric in gpu_check.METRICS:
        assert f"  {metric} " in done.stdout, metric
    for stage in ("read (bf16 -> float32)", "host -> device", "eigensolver", "fit + metrics"):
        assert stage in done.stdout
    # the end-to-end step: three models through run_esd_experiment.py twice, each one compared
    if not torch.cuda.is_available():
        assert "GPU dispatch SKIPPED: no GPU is visible" in done.stdout
        assert "CPU (--cpu_workers 1)" in done.stdout and "CPU (--cpu_workers 2)" in done.stdout
    for name, _, _, _ in gpu_check.E2E_MODELS:
        assert re.search(rf"^  PASS  {re.escape(name)}: 16 columns agree on every layer", done.stdout, re.M), name
        assert re.search(rf"^  {re.escape(name)}\s+\d+\.\d\s+\d+\.\d$", done.stdout, re.M), name  # wall times
    assert "FAIL" not in done.stdout and "END TO END: PASS" in done.stdout
    assert re.search(r"^  whole run\s+\d+\.\d\s+\d+\.\d$", done.stdout, re.M)
    scratch = Path(re.search(r"scratch (\S+)\)", done.stdout).group(1))
    assert scratch.name.startswith("gpu_check_e2e_") and not scratch.exists()  # a temp dir, gone on PASS


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


def _result_csv(path: Path, rows: list) -> Path:
    pd.DataFrame(rows).to_csv(path, index=False)
    return path


@pytest.fixture(scope="module")
def real_rows(tmp_path_factory):
    """Result rows of two layers of a heavy-tailed checkpoint, metrics of their float64 SVD."""
    name, _, sizes, seed = gpu_check.E2E_MODELS[1]
    model_dir = gpu_check.build_checkpoint(tmp_path_factory.mktemp("m") / name, sizes, "cpu", seed=seed)
    settings = gpu_check.net_esd.ESDSettings(fix_fingers="DKS")
    rows = []
    for layer in ("model.layers.0.self_attn.q_proj", "model.layers.0.mlp.down_proj"):
        row = gpu_check.reference_row(gpu_check.read_tensor(model_dir, layer), settings)
        rows.append(dict(row, longname=layer))
    return rows


def test_end_to_end_comparison_passes_within_1e_4_and_fails_beyond_it_naming_layer_and_column(tmp_path, real_rows):
    first = _result_csv(tmp_path / "a.csv", real_rows)
    worst, problems = gpu_check.compare_results(first, _result_csv(tmp_path / "same.csv", real_rows))
    assert problems == [] and set(worst) == set(gpu_check.COMPARED)
    assert gpu_check.model_verdict("m", worst, problems).startswith("PASS  m: 16 columns agree")

    close = [dict(row) for row in real_rows]
    close[1]["alpha"] *= 1 + 5e-5
    worst, problems = gpu_check.compare_results(first, _result_csv(tmp_path / "close.csv", close))
    assert problems == [] and worst["alpha"][0] == pytest.approx(5e-5, rel=1e-3)

    off = [dict(row) for row in real_rows]
    off[1]["alpha"] *= 1 + 3e-4
    worst, problems = gpu_check.compare_results(first, _result_csv(tmp_path / "off.csv", off))
    assert problems == ["model.layers.0.mlp.down_proj: alpha differs by 3.0e-04 (> 1e-04)"]
    assert worst["alpha"][1] == "model.layers.0.mlp.down_proj"
    assert gpu_check.model_verdict("m", worst, problems).startswith("FAIL  m: model.layers.0.mlp.down_proj: alpha")


def test_end_to_end_comparison_reports_a_missing_layer_a_changed_fit_status_and_a_missing_csv(tmp_path, real_rows):
    first = _result_csv(tmp_path / "a.csv", real_rows)
    _, problems = gpu_check.compare_results(first, _result_csv(tmp_path / "short.csv", real_rows[:1]))
    assert problems == ["layer model.layers.0.mlp.down_proj only in the first run"]
    changed = [dict(real_rows[0]), dict(real_rows[1], fit_status="failed")]
    _, problems = gpu_check.compare_results(first, _result_csv(tmp_path / "status.csv", changed))
    assert problems == ["model.layers.0.mlp.down_proj: fit_status 'ok' != 'failed'"]
    _, problems = gpu_check.compare_results(first, tmp_path / "never_written.csv")
    assert problems == [f"no result CSV {tmp_path / 'never_written.csv'}"]


def test_end_to_end_log_columns_near_zero_are_held_to_1e_4_absolute_not_relative():
    # log10 of a spectral norm of 1.001: a 1e-5 relative error of the norm moves it by 4e-6
    assert gpu_check.relative_difference(4.34e-4 + 4e-6, 4.34e-4, floor=1.0) < gpu_check.RTOL
    assert gpu_check.relative_difference(4.34e-4 + 4e-6, 4.34e-4) > gpu_check.RTOL
    assert gpu_check.relative_difference(5.0 * (1 + 2e-4), 5.0, floor=1.0) == pytest.approx(2e-4)


def test_a_gpu_run_that_gputracker_ran_on_cpu_or_another_gpu_is_a_failure():
    dirs = [Path("/m/a"), Path("/m/b")]
    on_gpu = gpu_check.OrchestratorRun("GPU 0", 1.0, 0, gpus={"a": [0], "b": [0]}, mode="gpu")
    assert gpu_check.run_failures(on_gpu, dirs, want_gpu=True) == []
    fell_back = gpu_check.OrchestratorRun("GPU 0", 1.0, 0, gpus={"a": [], "b": []}, mode="cpu")
    why = gpu_check.run_failures(fell_back, dirs, want_gpu=True)
    assert "GPU 0: gputracker ran in 'cpu' mode, not on GPU 0 (does NVML see it?)" in why and len(why) == 3
    other = gpu_check.OrchestratorRun("GPU 0", 1.0, 0, gpus={"a": [0], "b": [1]}, mode="gpu")
    assert gpu_check.run_failures(other, dirs, want_gpu=True) == ["GPU 0: b ran on GPUs [1], not [0]"]
    stopped = gpu_check.OrchestratorRun("CPU", 1.0, None, mode="cpu")
    assert gpu_check.run_failures(stopped, dirs, want_gpu=False) == ["CPU: stopped at the timeout"]
    assert gpu_check.run_failures(gpu_check.OrchestratorRun("CPU", 1.0, 1), dirs, want_gpu=False) == [
        "CPU: exit status 1"]


def test_a_subprocess_past_its_timeout_is_stopped_with_its_process_group_even_if_it_ignores_sigint(tmp_path):
    # the child ignores SIGINT (as a stuck orchestrator might) and leaves a grandchild sleeping
    script = ("import signal, subprocess, sys, time\n"
              "signal.signal(signal.SIGINT, signal.SIG_IGN)\n"
              "child = subprocess.Popen(['sleep', '300'])\n"
              "print(child.pid, flush=True)\n"
              "time.sleep(300)\n")
    done = gpu_check.run_bounded([sys.executable, "-c", script], timeout_s=5, grace_s=1)
    assert done.returncode is None and "stopped after 5 s" in done.stderr
    grandchild = int(done.stdout.split()[0])
    for _ in range(600):  # SIGKILL lands asynchronously; a generous bound, not a timing goal
        if not _alive(grandchild):
            break
        time.sleep(0.1)
    assert not _alive(grandchild), f"process {grandchild} of the stopped group is still alive"


def _alive(pid: int) -> bool:
    """Running (a zombie waiting for its reaper counts as gone)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (FileNotFoundError, ProcessLookupError):
        return False


def test_the_gpu_run_of_the_end_to_end_step_is_granted_gpu_0_by_gputracker_on_a_fake_nvml(tmp_path, monkeypatch):
    # NVML is the one part that cannot exist here: a fake of pynvml's API with one idle GPU; the
    # worker then finds no CUDA and computes on CPU, everything else is the GPU run as on GPU day
    script = tmp_path / "fake_nvml.json"
    script.write_text('{"gpus": [{"used_mb": 0}]}')
    monkeypatch.setenv("PYTHONPATH", str(ROOT / "tests" / "fake_nvml"))
    monkeypatch.setenv("FAKE_NVML_SCRIPT", str(script))
    name, _, sizes, seed = gpu_check.E2E_MODELS[1]
    model_dirs = [gpu_check.build_checkpoint(tmp_path / "models" / name, sizes, "cpu", seed=seed)]
    model_list = gpu_check.write_e2e_model_list(model_dirs, tmp_path / "models.csv")
    run = gpu_check.run_orchestrator("GPU 0", model_list, tmp_path / "out", ["--gpus", "0"], 900, tmp_path)
    assert gpu_check.run_failures(run, model_dirs, want_gpu=True) == [], run.output_tail
    assert run.mode == "gpu" and run.gpus == {model_dirs[0].name: [0]} and run.runtime_s[model_dirs[0].name] > 0
    log = next((tmp_path / "out" / "logs" / "workers").glob("*.log")).read_text()
    assert f"job {model_dirs[0]} on GPU 0:" in log  # CUDA_VISIBLE_DEVICES=0 for the worker
    assert len(list((tmp_path / "out").glob("*llama-heavy-b.csv"))) == 1
