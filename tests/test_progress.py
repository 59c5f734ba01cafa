"""The run shows signs of life: elapsed time and ETA tick, running models show their layer,
and waiting says why (real orchestrator, real subprocess workers, a fake pynvml where the
GPUs cannot exist; the terminal is a real tmux pane)."""
from __future__ import annotations

import contextlib
import io
import logging
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

import esd_worker
from esd.progress import RunProgress, current_layer
from gputracker_testkit import FAKE_NVML_DIR, write_fake_gpus
from tiny_models import save_gpt2, write_model_list

ROOT = Path(__file__).resolve().parents[1]
BUSY = "GPU 0: 30000 MB used > 500 MB threshold"


def test_current_layer_is_the_last_layer_line_the_worker_printed(tmp_path):
    log = tmp_path / "worker.log"
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        for i, name in enumerate(["h.0.attn", "h.0.mlp", "h.1.attn"], start=1):
            esd_worker._print_layer_done(i, name)
    log.write_text("[gputracker] job x on CPU: python esd_worker.py\n" + printed.getvalue())
    assert current_layer(log) == "layer 3"
    with log.open("a") as handle:
        handle.write("  layer 4/12  h.1.mlp\n")
    assert current_layer(log) == "layer 4/12"
    assert current_layer(tmp_path / "missing.log") is None


def test_not_on_a_terminal_a_status_line_names_counts_eta_running_and_waiting(tmp_path):
    log_path = tmp_path / "w.log"
    log_path.write_text("  layer    7  model.layers.3.mlp\n")
    records: list[str] = []
    logger = logging.getLogger("test_progress.status")
    handler = logging.Handler()
    handler.emit = lambda record: records.append(record.getMessage())
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    progress = RunProgress(3, done_before=1, log=logger, tty=False, tick_s=0.05, status_every_s=0.2)
    progress.follow(running=lambda: [("org/a", time.time() - 5, log_path)], waiting=lambda: [BUSY])
    try:
        time.sleep(0.5)
        progress.update(True)
        time.sleep(0.5)
    finally:
        progress.close()
        logger.removeHandler(handler)
    status = [r for r in records if r.startswith("status: ")]
    assert len(status) >= 2
    assert status[0].startswith("status: 1/4 models finished (0 failed)")
    assert "ETA after the first model ends" in status[0]
    assert "running: org/a (layer 7, " in status[0] and f"waiting: {BUSY}" in status[0]
    assert re.search(r"2/4 models finished \(0 failed\), \d+s elapsed, ETA \d+s", status[-1])
    assert any(r.startswith("progress: 2/4 models finished") for r in records)


def test_the_eta_moves_with_the_layers_of_a_running_model_before_any_model_ends(tmp_path):
    log_path = tmp_path / "w.log"
    progress = RunProgress(2, tty=False).follow(running=lambda: [("org/big", time.time(), log_path)])
    try:
        log_path.write_text("  layer    3/10  model.layers.0.mlp\n")
        early = progress.counts_text(now=progress.started + 30)
        with log_path.open("a") as handle:
            handle.write("  layer    6/10  model.layers.2.mlp\n")
        later = progress.counts_text(now=progress.started + 60)
    finally:
        progress.close()
    # 0.3 of a model in 30s: 1.7 models left take 170s; then 0.6 in 60s: 1.4 left take 140s
    assert early == "0/2 models finished (0 failed), 30s elapsed, ETA 2m50s"
    assert later == "0/2 models finished (0 failed), 1m00s elapsed, ETA 2m20s"


# ---------------------------------------------------------------- the real orchestrator

@pytest.fixture(scope="module")
def two_models(tmp_path_factory):
    root = tmp_path_factory.mktemp("progress")
    paths = [save_gpt2(root / "models" / f"m{i}", seed=i) for i in range(2)]
    write_model_list(root / "models.csv", [{"model_id": str(p)} for p in paths])
    return root


def orchestrator_env(tmp_path: Path) -> dict:
    gpus = write_fake_gpus(tmp_path / "gpus.json", [{"used_mb": 30000}, {"used_mb": 0}])
    env = dict(os.environ, FAKE_NVML_SCRIPT=str(gpus), GPUTRACKER_LOCK_DIR=str(tmp_path / "locks"),
               PYTHONPATH=os.pathsep.join([str(FAKE_NVML_DIR), str(ROOT)]), HF_HUB_OFFLINE="1",
               TOKENIZERS_PARALLELISM="false", HF_HOME=str(tmp_path / "hf"))
    env.pop("HF_HUB_CACHE", None)
    return env


def run_args(root: Path, out: Path) -> list[str]:
    return [sys.executable, str(ROOT / "run_esd_experiment.py"), "--model_list",
            str(root / "models.csv"), "--output_dir", str(out), "--max_check", "3",
            "--poll_interval", "0.5"]


def test_under_nohup_status_lines_say_what_runs_and_why_the_rest_waits(two_models, tmp_path):
    out = tmp_path / "out"
    result = subprocess.run(run_args(two_models, out) + ["--status_interval", "1"],
                            env=orchestrator_env(tmp_path), capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    log = (out / "logs" / "esd_experiment.log").read_text()
    status = [line for line in log.splitlines() if " status: " in line]
    assert status, log
    assert any(BUSY in line for line in status)
    assert any(re.search(r"GPU 1: [0-2]/3 free polls", line) for line in status)
    assert any("running: " in line and "GPU 1: running " in line for line in status)
    # every line while models remain gives an ETA (one after the last model ended has none)
    remaining = [line for line in status if not re.search(r"status: (\d+)/\1 models finished", line)]
    assert remaining and all("ETA" in line for line in remaining), status


def _pane(session: str) -> str:
    return subprocess.run(["tmux", "capture-pane", "-p", "-t", session], capture_output=True,
                          text=True).stdout


def test_on_a_terminal_the_bar_ticks_and_shows_why_it_waits(two_models, tmp_path):
    if shutil.which("tmux") is None:
        pytest.skip("tmux is not installed (apt-get install -y tmux) — terminal check skipped")
    out, session = tmp_path / "out", f"esd-progress-{os.getpid()}"
    env = orchestrator_env(tmp_path)
    command = " ".join(f"'{a}'" for a in run_args(two_models, out)) + "; echo EXIT=$?; sleep 60"
    exports = " ".join(f"{k}='{env[k]}'" for k in ("FAKE_NVML_SCRIPT", "GPUTRACKER_LOCK_DIR",
                                                 "PYTHONPATH", "HF_HUB_OFFLINE", "HF_HOME"))
    subprocess.run(["tmux", "new", "-d", "-s", session, "-x", "230", "-y", "40",
                    f"env {exports} sh -c \"{command}\""], check=True)
    try:
        panes, deadline = [], time.monotonic() + 240
        while time.monotonic() < deadline:
            panes.append(_pane(session))
            if "EXIT=" in panes[-1]:
                break
            time.sleep(0.5)
    finally:
        subprocess.run(["tmux", "kill-session", "-t", session], capture_output=True)
    assert "EXIT=0" in panes[-1], panes[-1]
    elapsed = {m for pane in panes for m in re.findall(r"\d/2 \[(\d\d:\d\d)<", pane)}
    assert len(elapsed) >= 3, panes[-1]        # the clock moved while no model had ended
    assert any(BUSY in pane for pane in panes)
    assert any("running: " in pane and "GPU 1: running " in pane for pane in panes), \
        "\n=====\n".join(panes[::4])
    assert "models: 100%" in panes[-1] and "2/2" in panes[-1]


def test_without_nvml_the_console_says_once_and_plainly_that_it_runs_on_cpu(two_models, tmp_path):
    env = orchestrator_env(tmp_path)
    env.pop("FAKE_NVML_SCRIPT")                  # the fake then behaves like a machine without NVML
    args = run_args(two_models, tmp_path / "out")
    result = subprocess.run(args[:4] + ["--output_dir", str(tmp_path / "out")], env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    console = result.stdout + result.stderr
    notices = [line for line in console.splitlines() if "CPU" in line and "GPU" in line]
    assert len(notices) == 1, console
    assert notices[0].startswith("no GPU can be used (") and "running on CPU" in notices[0]
    assert "CUDA_VISIBLE_DEVICES" not in console
    log = (tmp_path / "out" / "logs" / "esd_experiment.log").read_text()
    assert "CUDA_VISIBLE_DEVICES=''" in log        # the log file keeps gputracker's own words


def test_gpus_named_on_a_machine_without_nvml_say_one_thing_the_error(two_models, tmp_path):
    env = orchestrator_env(tmp_path)
    env.pop("FAKE_NVML_SCRIPT")                  # a machine without NVML
    args = run_args(two_models, tmp_path / "out")
    result = subprocess.run(args[:4] + ["--output_dir", str(tmp_path / "out"), "--gpus", "0", "1", "2", "3"],
                            env=env, capture_output=True, text=True, timeout=300)
    console = result.stdout + result.stderr
    assert result.returncode == 2, console
    assert "running on CPU" not in console and "CPU mode" not in console, console
    said = [line for line in console.splitlines() if "GPU" in line]
    assert len(said) == 1 and said[0].startswith("error: ") and "--gpus 0 1 2 3: no GPU can be used here" in said[0]
    assert "use --gpus none to run on CPU" in said[0]


def test_with_a_download_stage_the_status_counts_downloading_ready_running_and_the_link_rate(tmp_path):
    from esd.download_stage import Stages
    from esd.progress import TransferLines
    fetching = [tmp_path / "b.log", tmp_path / "c.log"]
    for log_path, rate in zip(fetching, (10.0, 30.0)):     # what each fetch's TransferLines printed
        log_path.write_text(f"[download stage] fetching\n  downloaded org/x: 20.0 of 90.0 MB at {rate} MB/s\n")
    quiet = tmp_path / "d.log"
    lines = []
    TransferLines(lines.append)("downloaded", "org/d", 0, 1000)      # nothing moved yet: 0.0 MB/s
    quiet.write_text("\n".join(lines) + "\n")
    running = tmp_path / "a.log"
    running.write_text("  layer   3/8  model.layers.1.mlp\n")
    stages = Stages(downloading=(("org/b", fetching[0]), ("org/c", fetching[1])), ready=1, running=1)
    progress = RunProgress(4, log=logging.getLogger("test_progress.stages"), tty=False)
    progress.follow(running=lambda: [("org/a", time.time() - 3, running)], stages=lambda: stages)
    try:
        text = progress.activity_text()
    finally:
        progress.close()
    assert text.startswith("downloading 2 (40.0 MB/s), ready 1, running 1: org/a (layer 3/8, ")
    assert Stages(downloading=(("org/d", quiet),), ready=0, running=0).text() == "downloading 1 (0.0 MB/s), ready 0, running 0"
    assert Stages().text() == "downloading 0, ready 0, running 0"
