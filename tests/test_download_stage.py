"""The download stage, end to end: run_esd_experiment.py with workers as subprocesses, the
real huggingface_hub client against the stand-in Hub with its CDN capped as one shared link.
When each file was sent is read from the server's log, when each worker started and ended
from the run's log (gputracker's lines, millisecond stamps)."""
from __future__ import annotations

import re
import subprocess
import sys
from datetime import datetime
from pathlib import Path

import pytest

from hub_server import hub  # noqa: F401  (fixture)
from tiny_models import save_model, write_model_list

ROOT = Path(__file__).resolve().parents[1]
RUN = [sys.executable, str(ROOT / "run_esd_experiment.py")]
FAST = ["--gpus", "none", "--cpu_workers", "1", "--poll_interval", "0.05", "--max_check", "1",
        "--retry_backoff", "0.1", "--status_interval", "0.2"]
MODELS = ("org/m1", "org/m2", "org/m3")
DOWNLOAD_S = 1.5       # each model's weights take this long on the capped link
STAMP = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) INFO gputracker: job (\S+) (started|succeeded|failed)")


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    root = tmp_path_factory.mktemp("stage_models")
    return [save_model("llama", root / f"m{i}", seed=i) for i in range(1, 4)]


def run(hub, tmp_path, rows, *flags, out=None):
    out = out or tmp_path / "out"
    env = hub.subprocess_env(tmp_path / "hf_home", None)
    env.update(PYTHONPATH=str(ROOT), TOKENIZERS_PARALLELISM="false", ESD_HUB_BACKOFF_S="0.05",
               ESD_HUB_RETRIES="1")
    model_list = write_model_list(tmp_path / "models.csv", rows)
    result = subprocess.run(RUN + ["--model_list", str(model_list), "--output_dir", str(out), *FAST, *flags],
                            env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    return result, out


def worker_times(out: Path) -> dict[str, dict[str, float]]:
    """{model key: {"started": epoch, "succeeded"/"failed": epoch}} from the run's log."""
    times: dict[str, dict[str, float]] = {}
    for line in (out / "logs" / "esd_experiment.log").read_text().splitlines():
        found = STAMP.match(line)
        if found:
            when = datetime.strptime(found.group(1), "%Y-%m-%d %H:%M:%S,%f").timestamp()
            times.setdefault(found.group(2), {})[found.group(3)] = when
    return times


def weight_gets(hub, repo_dir: Path):
    """The CDN GETs of a model's weights (its blob named by the file's sha256)."""
    import hashlib
    blob = hashlib.sha256((repo_dir / "model.safetensors").read_bytes()).hexdigest()
    return [r for r in hub.requests("cdn", "GET") if r.path.endswith(blob)]


def test_models_download_ahead_of_the_one_slot_and_no_slot_waits_for_files(hub, tmp_path, built):
    for repo, path in zip(MODELS, built):
        hub.add_repo(repo, path)
    hub.faults.bandwidth_bps = (built[0] / "model.safetensors").stat().st_size / DOWNLOAD_S
    result, out = run(hub, tmp_path, [{"model_id": m} for m in MODELS])
    assert result.returncode == 0, result.stdout + result.stderr

    times = worker_times(out)
    gets = {m: weight_gets(hub, path) for m, path in zip(MODELS, built)}
    for model in MODELS:       # every byte of a model was sent before its worker got the slot
        assert gets[model] and all(r.ended is not None for r in gets[model]), model
        assert max(r.ended for r in gets[model]) <= times[model]["started"], model
    for earlier, later in zip(MODELS, MODELS[1:]):   # the link works while the slot computes
        assert min(r.time for r in gets[later]) < times[earlier]["succeeded"], (earlier, later)
    for model, path in zip(MODELS, built):    # each worker read its model from the cache
        log = (out / "logs" / "workers" / f"{model.replace('/', '--')}.log").read_text()
        assert "files in the cache" in log and "waiting for bytes 0.00s" in log, log[-2000:]

    status = [line for line in result.stdout.splitlines() + result.stderr.splitlines() if "status:" in line]
    assert any(re.search(r"downloading 1( \([\d.]+ MB/s\))?, ready \d, running 1: org/m", line)
               for line in status), status
    assert re.search(r"slots: +\S+ of slot time: \d+% computing, \d+% waiting for bytes "
                     r"\(download stage: \S+ fetching beside them\)", result.stdout + result.stderr)


def test_without_the_stage_each_worker_downloads_in_its_slot(hub, tmp_path, built):
    """The same run with --downloads 0: the check above fails (the contrast that shows it can)."""
    for repo, path in zip(MODELS[:2], built):
        hub.add_repo(repo, path)
    hub.faults.bandwidth_bps = (built[0] / "model.safetensors").stat().st_size / DOWNLOAD_S
    result, out = run(hub, tmp_path, [{"model_id": m} for m in MODELS[:2]], "--downloads", "0")
    assert result.returncode == 0, result.stdout + result.stderr
    times = worker_times(out)
    first = weight_gets(hub, built[0])
    assert max(r.ended for r in first) > times["org/m1"]["started"]
    assert min(r.time for r in weight_gets(hub, built[1])) > times["org/m1"]["succeeded"]
    assert re.search(r"slots: .*, [1-9]\d*% waiting for bytes", result.stdout + result.stderr)


def test_a_failed_download_is_typed_and_retried_by_the_policy_and_a_missing_repo_gets_no_slot(
        hub, tmp_path, built):
    hub.add_repo("org/m1", built[0])
    hub.faults.cdn_server_error = 1         # the first fetch fails (503), the policy retries it
    result, out = run(hub, tmp_path, [{"model_id": "org/m1"}, {"model_id": "org/missing"}])
    assert result.returncode == 1, result.stdout + result.stderr
    said = result.stdout + result.stderr
    assert re.search(r"retry +org/m1 .*attempt 2", said), said
    assert (out / "org--m1.csv").exists()
    times = worker_times(out)
    assert "started" in times["org/m1"] and "started" not in times["org/missing"]   # no slot
    from esd.failures import read_failures
    failed = read_failures(out)
    assert list(failed) == ["org/missing"] and failed["org/missing"].reason == "repo_not_found"
    assert "files in the cache" in (out / "logs" / "workers" / "org--m1.log").read_text()


def test_ctrl_c_mid_download_stops_the_fetch_and_the_same_command_completes(hub, tmp_path, built):
    import signal
    import time
    hub.add_repo("org/m1", built[0])
    hub.faults.bandwidth_bps = (built[0] / "model.safetensors").stat().st_size / 20   # 20 s download
    out = tmp_path / "out"
    env = hub.subprocess_env(tmp_path / "hf_home", None)
    env.update(PYTHONPATH=str(ROOT), TOKENIZERS_PARALLELISM="false")
    model_list = write_model_list(tmp_path / "models.csv", [{"model_id": "org/m1"}])
    argv = RUN + ["--model_list", str(model_list), "--output_dir", str(out), *FAST]
    proc = subprocess.Popen(argv, env=env, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)
    worker_log = out / "logs" / "workers" / "org--m1.log"
    deadline = time.time() + 60
    while time.time() < deadline and not (worker_log.exists() and "downloaded org/m1" in worker_log.read_text()):
        time.sleep(0.1)
    assert "downloaded org/m1" in worker_log.read_text()      # the fetch is moving bytes
    proc.send_signal(signal.SIGINT)
    said, _ = proc.communicate(timeout=60)
    assert proc.returncode == 130, said
    fetches = subprocess.run(["pgrep", "-f", f"{out}.*--fetch_only"], capture_output=True, text=True)
    assert fetches.stdout.strip() == "", "a fetch outlived the run"
    assert not (out / "org--m1.csv").exists()

    hub.faults.bandwidth_bps = None
    result, out = run(hub, tmp_path, [{"model_id": "org/m1"}])
    assert result.returncode == 0, result.stdout + result.stderr
    assert (out / "org--m1.csv").exists()
