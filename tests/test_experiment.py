"""End-to-end tests of the experiment: the real orchestrator dispatching real worker processes
over tiny local models in CPU mode, with failures, reruns and kill -9."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest

from tiny_models import save_gpt2, save_llama, save_lora_adapter, write_model_list

ROOT = Path(__file__).resolve().parents[1]
RUN = [sys.executable, str(ROOT / "run_esd_experiment.py")]
FAST = ["--gpus", "none", "--cpu_workers", "2", "--poll_interval", "0.05", "--max_check", "1",
        "--retry_backoff", "0.2"]
ESD_COLUMNS = json.loads((Path(__file__).parent / "golden" / "columns.json").read_text())["per_model_csv"]
GPT2_LAYERS = 10  # wte, wpe, 2 x (c_attn, attn.c_proj, c_fc, mlp.c_proj); lm_head is tied to wte


@pytest.fixture
def env(tmp_path):
    """Offline, with a private hub cache: nothing reaches the network."""
    environment = dict(os.environ, HF_HOME=str(tmp_path / "hf_home"), HF_HUB_OFFLINE="1",
                       PYTHONPATH=str(ROOT), TOKENIZERS_PARALLELISM="false")
    environment.pop("HF_HUB_CACHE", None)
    return environment


def run(args, env, cwd, timeout=300):
    return subprocess.run(RUN + args, env=env, cwd=cwd, capture_output=True, text=True, timeout=timeout)


def failed_lines(out: Path) -> list[str]:
    path = out / "failed_models.txt"
    return path.read_text().splitlines() if path.exists() else []


def result_csvs(out: Path) -> list[Path]:
    return sorted(p for p in out.glob("*.csv") if p.name not in ("summary.csv", "runs.csv"))


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    gpt2 = save_gpt2(root / "gpt2-a", seed=1)
    save_gpt2(root / "gpt2-b", seed=2)
    save_llama(root / "llama")
    save_lora_adapter(gpt2, root / "gpt2-lora", target_modules=["c_attn"], fan_in_fan_out=True)
    corrupt = save_gpt2(root / "corrupt", seed=3)
    weights = corrupt / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 3])
    return root


def test_mixed_list_good_models_complete_and_bad_ones_fail_with_stage_and_reason(models, tmp_path, env):
    out = tmp_path / "out"
    model_list = write_model_list(tmp_path / "models.csv", [
        {"model_id": str(models / "gpt2-a")},
        {"model_id": str(models / "llama")},
        {"model_id": str(models / "gpt2-lora"), "base_model_relation": "adapter"},
        {"model_id": "no-such-org/no-such-model"},
        {"model_id": str(models / "corrupt")},
        {"model_id": "x; touch pwned"},
        {"model_id": "$(touch pwned2)"},
        {"model_id": str(models / "gpt2-a")},   # duplicate: analysed once
    ])
    result = run(["--model_list", str(model_list), "--output_dir", str(out)] + FAST, env, tmp_path)
    assert result.returncode == 1, result.stdout + result.stderr
    assert "duplicate of row 2" in result.stdout

    csvs = {p.name for p in result_csvs(out)}
    good = {f"{str(models / n).lstrip('/').replace('/', '--')}.csv" for n in ("gpt2-a", "llama", "gpt2-lora")}
    assert csvs == good
    for path in result_csvs(out):
        frame = pd.read_csv(path)
        assert list(frame.columns[: len(ESD_COLUMNS)]) == ESD_COLUMNS
        assert len(frame) > 0 and frame["model_id"].nunique() == 1
    adapter = pd.read_csv(out / [c for c in csvs if "lora" in c][0])
    assert adapter["is_adapter"].all()
    assert adapter["source_model"].iloc[0] == str(models / "gpt2-a")

    failures = {line.split("\t")[0]: line.split("\t")[1] for line in failed_lines(out)}
    assert failures["no-such-org/no-such-model"].startswith("resolve: repo_not_found")
    assert failures[str(models / "corrupt")].startswith("load: corrupt_file")
    assert failures["x; touch pwned"].startswith("resolve: ")
    assert failures["$(touch pwned2)"].startswith("resolve: ")
    assert len(failures) == 4
    assert not list(tmp_path.rglob("pwned*")) and not list(ROOT.glob("pwned*"))
    assert not [p for p in out.rglob(".*.tmp*")], "half-written files were left behind"

    summary = pd.read_csv(out / "summary.csv")
    assert len(summary) == 3
    records = [json.loads(line) for line in (out / "failures.jsonl").read_text().splitlines()]
    assert {r["reason"] for r in records} >= {"repo_not_found", "corrupt_file"}
    assert all(r["retryable"] is False for r in records)
    metrics = json.loads((out / "gpu_metrics.json").read_text())
    assert metrics["jobs"] == 7 and metrics["failed"] == 4

    # rerun: nothing done is recomputed, failures are retried but never duplicated
    mtimes = {p: p.stat().st_mtime_ns for p in result_csvs(out)}
    again = run(["--model_list", str(model_list), "--output_dir", str(out)] + FAST, env, tmp_path)
    assert again.returncode == 1
    assert "3 already done" in again.stdout and "4 to run" in again.stdout
    assert {p: p.stat().st_mtime_ns for p in result_csvs(out)} == mtimes
    assert sorted(failed_lines(out)) == sorted(f"{k}\t{v}" for k, v in failures.items())
    attempts = {json.loads(l)["model_id"]: json.loads(l)["attempts"]
                for l in (out / "failures.jsonl").read_text().splitlines()}
    assert set(attempts.values()) == {2}

    # --skip_failed leaves the failed ones alone; nothing to run
    skipped = run(["--model_list", str(model_list), "--output_dir", str(out), "--skip_failed"] + FAST,
                  env, tmp_path)
    assert skipped.returncode == 0, skipped.stdout + skipped.stderr
    assert "4 skipped (failed before), 0 to run" in skipped.stdout


def test_limit_runs_only_the_first_models_left_and_overwrite_recomputes(models, tmp_path, env):
    out = tmp_path / "out"
    model_list = write_model_list(tmp_path / "models.csv", [
        {"model_id": str(models / "gpt2-a")}, {"model_id": str(models / "gpt2-b")}])
    first = run(["--model_list", str(model_list), "--output_dir", str(out), "--limit", "1"] + FAST, env, tmp_path)
    assert first.returncode == 0, first.stdout + first.stderr
    assert len(result_csvs(out)) == 1
    second = run(["--model_list", str(model_list), "--output_dir", str(out), "--limit", "1"] + FAST, env, tmp_path)
    assert "1 already done" in second.stdout and len(result_csvs(out)) == 2
    before = {p: p.stat().st_mtime_ns for p in result_csvs(out)}
    third = run(["--model_list", str(model_list), "--output_dir", str(out), "--overwrite", "--limit", "0"]
                + FAST, env, tmp_path)
    assert third.returncode == 0 and "2 to run" in third.stdout
    assert all(p.stat().st_mtime_ns != m for p, m in before.items())
    frame = pd.read_csv(result_csvs(out)[0])
    assert len(frame) == GPT2_LAYERS


def test_timeout_is_recorded_and_not_retried(models, tmp_path, env):
    out = tmp_path / "out"
    model_list = write_model_list(tmp_path / "models.csv", [{"model_id": str(models / "gpt2-a")}])
    result = run(["--model_list", str(model_list), "--output_dir", str(out), "--timeout", "0.5",
                  "--max_retries", "3"] + FAST, env, tmp_path)
    assert result.returncode == 1
    (line,) = failed_lines(out)
    assert line.startswith(f"{models / 'gpt2-a'}\tworker: timeout")
    assert "retry" not in result.stdout
    assert not result_csvs(out)


def _wait_for(predicate, timeout=120.0, interval=0.1):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return False


def _worker_pids(output_dir: Path) -> list[int]:
    pids = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                cmd = (proc / "cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if any(b"esd_worker.py" in part for part in cmd) and str(output_dir).encode() in cmd:
                pids.append(int(proc.name))
    return pids


@pytest.fixture(scope="module")
def slow_models(tmp_path_factory):
    """Models big enough (a few seconds each) to be killed mid-analysis."""
    root = tmp_path_factory.mktemp("slow")
    for i in range(4):
        save_llama(root / f"llama-{i}", seed=i, hidden=512, intermediate=1536, layers=3, vocab=2000)
    return root


def test_kill9_orchestrator_then_rerun_completes_every_model_once(slow_models, tmp_path, env):
    out = tmp_path / "out"
    rows = [{"model_id": str(slow_models / f"llama-{i}")} for i in range(4)]
    model_list = write_model_list(tmp_path / "models.csv", rows)
    args = RUN + ["--model_list", str(model_list), "--output_dir", str(out)] + FAST
    proc = subprocess.Popen(args, env=env, cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    assert _wait_for(lambda: len(result_csvs(out)) >= 1 and _worker_pids(out)), "no progress before the kill"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done_at_kill = {p: p.stat().st_ino for p in result_csvs(out)}

    rerun = subprocess.run(args, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stdout + rerun.stderr
    _wait_for(lambda: not _worker_pids(out), timeout=60)
    csvs = result_csvs(out)
    assert len(csvs) == 4
    for path in csvs:
        frame = pd.read_csv(path)
        assert len(frame) == 3 * 7 + 2 and frame["alpha"].notna().all()
    # results that existed at the kill were not recomputed
    assert {p: p.stat().st_ino for p in done_at_kill} == done_at_kill
    assert failed_lines(out) == []
    assert not [p for p in out.rglob(".*.tmp*")]


def test_kill9_orchestrator_leaves_its_run_on_record_and_the_report_shows_it_crashed(
        slow_models, tmp_path, env):
    out = tmp_path / "out"
    model_list = write_model_list(tmp_path / "models.csv", [{"model_id": str(slow_models / "llama-0")}])
    args = RUN + ["--model_list", str(model_list), "--output_dir", str(out)] + FAST
    proc = subprocess.Popen(args, env=env, cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        assert _wait_for(lambda: _worker_pids(out)), "worker never started"
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    finally:
        for pid in _worker_pids(out):
            os.kill(pid, signal.SIGKILL)
    (run_dir,) = (out / "runs").iterdir()
    record = json.loads((run_dir / "run.json").read_text())
    assert record["status"] == "running" and record["pid"] == proc.pid and record["counts"]["attempted"] == 1
    killed = pd.read_csv(out / "runs.csv")
    assert killed["run_id"].tolist() == [run_dir.name] and killed["status"].tolist() == ["running"]

    rerun = subprocess.run(args, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stdout + rerun.stderr
    rows = pd.read_csv(out / "runs.csv")
    assert rows["status"].tolist() == ["running", "completed"]   # the file says what it knew
    from analyze_results import write_report
    page = write_report(out).read_text()
    runs_table = page[page.index("<h3>Runs"):]
    runs_table = runs_table[:runs_table.index("</table>")]
    assert "crashed" in runs_table and "completed" in runs_table and ">running<" not in runs_table


def test_kill9_worker_is_retried_and_ends_done(slow_models, tmp_path, env):
    out = tmp_path / "out"
    model_list = write_model_list(tmp_path / "models.csv", [{"model_id": str(slow_models / "llama-0")}])
    proc = subprocess.Popen(RUN + ["--model_list", str(model_list), "--output_dir", str(out)] + FAST,
                            env=env, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    assert _wait_for(lambda: _worker_pids(out)), "worker never started"
    time.sleep(1.0)
    for pid in _worker_pids(out):
        os.kill(pid, signal.SIGKILL)
    output, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, output
    assert "worker_killed" in output and "retry" in output
    assert len(result_csvs(out)) == 1
    assert failed_lines(out) == []


def test_demo_command_in_a_clean_clone_writes_per_model_csvs_and_summary(tmp_path):
    """`python run_esd_experiment.py` with no arguments, in a fresh clone with an empty hub cache:
    the packaged all-MiniLM-L6-v2 reached by its hub id, and the shipped LoRA adapter."""
    clone = tmp_path / "clone"
    if (ROOT / ".git").exists():
        subprocess.run(["git", "clone", "--quiet", str(ROOT), str(clone)], check=True)
    else:
        import shutil
        shutil.copytree(ROOT, clone, ignore=shutil.ignore_patterns("results", ".*", "_work"))
    environment = dict(os.environ, HF_HOME=str(tmp_path / "empty_hf_home"))
    environment.pop("HF_HUB_CACHE", None)
    environment.pop("HF_HUB_OFFLINE", None)  # the demo must set what it needs itself
    started = time.monotonic()
    result = subprocess.run([sys.executable, "run_esd_experiment.py"], cwd=clone, env=environment,
                            capture_output=True, text=True, timeout=600)
    print(f"demo took {time.monotonic() - started:.1f}s")
    assert result.returncode == 0, result.stdout + result.stderr
    results = clone / "results"
    base = pd.read_csv(results / "sentence-transformers--all-MiniLM-L6-v2.csv")
    adapter = pd.read_csv(results / "examples--minilm-lora-demo.csv")
    assert len(base) == len(adapter) == 40 and (base["fit_status"] == "ok").sum() >= 38
    assert adapter["is_adapter"].all() and adapter["source_model"].iloc[0] == "sentence-transformers/all-MiniLM-L6-v2"
    changed = base.merge(adapter, on="longname")
    same = (changed["alpha_x"] == changed["alpha_y"]) | (changed["alpha_x"].isna() & changed["alpha_y"].isna())
    moved = changed[~same]["longname"]
    assert len(moved) > 0 and all(n.endswith(("query", "value")) for n in moved)
    summary = pd.read_csv(results / "summary.csv")
    assert set(summary["model_id"]) == {"sentence-transformers/all-MiniLM-L6-v2", "examples/minilm-lora-demo"}
    assert result.stdout.rstrip().splitlines()[-2].startswith("summary:")
    assert (tmp_path / "empty_hf_home" / "hub" / "models--sentence-transformers--all-MiniLM-L6-v2").is_dir()


def test_sigterm_stops_the_run_leaves_no_worker_and_a_rerun_finishes(slow_models, tmp_path, env):
    out = tmp_path / "out"
    model_list = write_model_list(tmp_path / "models.csv",
                                  [{"model_id": str(slow_models / f"llama-{i}")} for i in range(4)])
    args = RUN + ["--model_list", str(model_list), "--output_dir", str(out)] + FAST
    proc = subprocess.Popen(args, env=env, cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    assert _wait_for(lambda: len(_worker_pids(out)) == 2), "workers never started"
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=60) != 0
    assert _wait_for(lambda: not _worker_pids(out), timeout=10), "a worker outlived the stopped run"
    runs = pd.read_csv(out / "runs.csv")
    assert runs["status"].tolist() == ["interrupted"]
    assert failed_lines(out) == [], "an interrupted model is not a failed model"

    rerun = subprocess.run(args, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stdout + rerun.stderr
    assert len(result_csvs(out)) == 4


# ---------------------------------------------------------------- GPUs asked for that are not there

def _fake_nvml_env(env, tmp_path, n_gpus):
    fake = ROOT / "tests" / "fake_nvml"
    environment = dict(env, PYTHONPATH=os.pathsep.join([str(fake), str(ROOT)]))
    environment.pop("FAKE_NVML_SCRIPT", None)
    if n_gpus is not None:
        script = tmp_path / "fake_nvml.json"
        script.write_text(json.dumps({"gpus": [{"used_mb": 0}] * n_gpus}))
        environment["FAKE_NVML_SCRIPT"] = str(script)
    return environment


@pytest.mark.parametrize("n_gpus, says", [(2, "GPU index(es) [7] not found: NVML sees GPUs 0..1"),
                                          (None, "no GPU can be used here")])
def test_gpus_that_do_not_exist_are_a_clear_error_not_a_cpu_run(models, tmp_path, env, n_gpus, says):
    out = tmp_path / "out"
    model_list = write_model_list(tmp_path / "models.csv", [{"model_id": str(models / "gpt2-a")}])
    result = run(["--model_list", str(model_list), "--output_dir", str(out), "--gpus", "7",
                  "--poll_interval", "0.05", "--max_check", "1"], _fake_nvml_env(env, tmp_path, n_gpus), tmp_path)
    assert result.returncode == 2, result.stdout + result.stderr
    assert says in result.stderr and "Traceback" not in result.stdout + result.stderr
    assert not result_csvs(out)
    assert pd.read_csv(out / "runs.csv")["status"].tolist() == ["error"]


def test_ctrl_c_says_interrupted_writes_the_summary_and_the_rerun_counts_from_what_is_done(
        slow_models, tmp_path, env):
    out = tmp_path / "out"
    model_list = write_model_list(tmp_path / "models.csv",
                                  [{"model_id": str(slow_models / f"llama-{i}")} for i in range(4)])
    args = RUN + ["--model_list", str(model_list), "--output_dir", str(out)] + FAST
    proc = subprocess.Popen(args, env=env, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)
    assert _wait_for(lambda: len(result_csvs(out)) >= 1 and _worker_pids(out)), "no progress before Ctrl-C"
    proc.send_signal(signal.SIGINT)
    output, _ = proc.communicate(timeout=120)
    assert proc.returncode == 130, output
    assert "interrupted in" in output and "finished in" not in output
    done = len(result_csvs(out))
    assert len(pd.read_csv(out / "summary.csv")) == done
    rerun = subprocess.run(args, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stdout + rerun.stderr
    assert f"progress: {done + 1}/4 models finished" in rerun.stdout
    assert "progress: 1/" not in rerun.stdout   # not counted from zero


# ---------------------------------------------------------------- the stall watchdog (local backend)

def test_a_stop_while_the_running_worker_ends_well_still_makes_the_run_interrupted(tmp_path):
    """Ctrl-C lands just as the only running worker finishes: the models still queued make the
    run interrupted (exit 130 and "run the same command again"), not finished."""
    sys.path.insert(0, str(ROOT))
    from esd.backends.base import Task
    from esd.backends.local import LocalBackend, LocalSettings
    from esd.supervisor import Policy, Supervisor
    worker = tmp_path / "worker.py"   # asks the run to stop, then ends well when told to stop
    worker.write_text("import os, signal, sys, time\nresult = sys.argv[2]\n"
                      "def finish(*_):\n    open(result, 'w').write('done'); sys.exit(0)\n"
                      "signal.signal(signal.SIGTERM, finish)\nos.kill(os.getppid(), signal.SIGINT)\n"
                      "time.sleep(30)\n")
    out = tmp_path / "out"
    out.mkdir()
    tasks = [Task(key, (key, str(out / f"{key}.csv")), out / f"{key}.csv", out / "logs" / f"{key}.log")
             for key in ("first", "second", "third")]
    backend = LocalBackend(LocalSettings(gpus=(), cpu_workers=1, poll_interval_s=0.05, max_check=1),
                           worker_script=worker)
    outcome = Supervisor(backend, out, Policy(retry_backoff_s=0), tick_interval_s=0.2).run(tasks)
    assert outcome.succeeded == ["first"] and not outcome.failed
    assert outcome.interrupted


def test_local_worker_without_progress_is_stopped_as_stalled_and_a_talking_one_is_not(tmp_path):
    sys.path.insert(0, str(ROOT))
    from esd.backends.base import Task
    from esd.backends.local import LocalBackend, LocalSettings
    from esd.failures import read_failures
    from esd.supervisor import Policy, Supervisor
    worker = tmp_path / "worker.py"   # silent for 60 s, or a line every 0.5 s for 6 s, then done
    worker.write_text("import sys, time\nmode, result = sys.argv[1:3]\nprint('started', flush=True)\n"
                      "if mode == 'silent':\n    time.sleep(60)\n"
                      "for i in range(12):\n    print(f'layer {i}/12', flush=True); time.sleep(0.5)\n"
                      "open(result, 'w').write('done')\n")
    out = tmp_path / "out"
    tasks = [Task(mode, (mode, str(out / f"{mode}.csv")), out / f"{mode}.csv", out / "logs" / f"{mode}.log")
             for mode in ("silent", "talking")]
    out.mkdir()
    backend = LocalBackend(LocalSettings(gpus=(), cpu_workers=2, poll_interval_s=0.05, max_check=1),
                           worker_script=worker)
    started = time.monotonic()
    outcome = Supervisor(backend, out, Policy(stall_timeout_s=3, retry_backoff_s=0), tick_interval_s=0.2).run(tasks)
    assert time.monotonic() - started < 30
    assert outcome.failed == {"silent": "worker/stalled"} and outcome.succeeded == ["talking"]
    assert read_failures(out)["silent"].reason == "stalled"
