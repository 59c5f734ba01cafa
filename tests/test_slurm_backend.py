"""The Slurm backend: the generated script and manifest (pure), and real job arrays on a
single-node Slurm started by tests/slurm_local.sh (marked `slurm`)."""
from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from esd.backends import slurm as slurm_backend  # noqa: E402
from esd.backends.base import Task  # noqa: E402
from esd.backends.slurm import (SlurmError, SlurmSettings, render_script, run_array,  # noqa: E402
                                sbatch_command, split_extra)

SLURM_LOCAL = REPO / "tests" / "slurm_local.sh"

# A stand-in for esd_worker.py with the same Slurm entry point: reads its row of the
# manifest, fails when its argv says so, else writes its result atomically with the GPUs
# Slurm gave it.
TASK_SCRIPT = textwrap.dedent("""\
    import argparse, json, os, sys, time
    parser = argparse.ArgumentParser()
    parser.add_argument("--manifest", required=True)
    parser.add_argument("--task_index", type=int, required=True)
    args = parser.parse_args()
    row = json.load(open(args.manifest))["tasks"][args.task_index]
    print("task", args.task_index, row["key"], "argv", row["argv"], flush=True)
    if "--wait_for" in row["argv"]:   # end only once another task's result exists (bounded)
        other = row["argv"][row["argv"].index("--wait_for") + 1]
        for _ in range(1200):
            if os.path.exists(other):
                break
            time.sleep(0.1)
        else:
            sys.exit(3)
    if "--sleep" in row["argv"]:
        time.sleep(float(row["argv"][row["argv"].index("--sleep") + 1]))
    if "--fail" in row["argv"]:
        sys.exit(3)
    if "--fail_first" in row["argv"]:  # exit 75 (retryable) until the Nth attempt
        counter = row["result_path"] + ".attempts"
        n = int(open(counter).read()) + 1 if os.path.exists(counter) else 1
        open(counter, "w").write(str(n))
        if n <= int(row["argv"][row["argv"].index("--fail_first") + 1]):
            sys.exit(75)
    if "--no_result" in row["argv"]:
        sys.exit(0)
    tmp = row["result_path"] + ".tmp"
    with open(tmp, "w") as handle:
        json.dump({"cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES"),
                   "argv": row["argv"], "cwd": os.getcwd()}, handle)
    os.replace(tmp, row["result_path"])
    """)


@pytest.fixture
def task_script(tmp_path) -> Path:
    path = tmp_path / "task script.py"   # a space on purpose: paths are quoted
    path.write_text(TASK_SCRIPT)
    return path


def make_tasks(out: Path, n: int, extra: dict[int, tuple[str, ...]] | None = None):
    extra = extra or {}
    return [Task(key=f"org/model-{i}", argv=("--model_id", f"org/model-{i}", *extra.get(i, ())),
                 result_path=out / f"org--model-{i}.json") for i in range(n)]


def render(tmp_path, settings, n=5, python="/opt/py env/bin/python"):
    out = tmp_path / "my results"
    return render_script(n_tasks=n, settings=settings,
                         manifest_path=out / "slurm" / "ts" / "manifest.json",
                         output_dir=out, workdir=tmp_path / "work dir",
                         worker_script=tmp_path / "repo dir" / "esd_worker.py",
                         python=python, script_path=out / "slurm" / "ts" / "job.sbatch")


def sbatch_lines(script: str) -> list[str]:
    return [line[len("#SBATCH "):] for line in script.splitlines() if line.startswith("#SBATCH ")]


# ---------------------------------------------------------------------------- pure tests

def test_script_sets_array_with_parallelism_partition_time_gres_and_logs(tmp_path):
    script = render(tmp_path, SlurmSettings(partition="gpu", time="02:00:00", gres="gpu:1",
                                            array_parallelism=3, job_name="esd"))
    options = [shlex.split(line)[0] for line in sbatch_lines(script)]
    assert options == [
        "--job-name=esd", "--array=0-4%3", "--partition=gpu", "--time=02:00:00",
        "--gres=gpu:1", f"--output={tmp_path}/my results/logs/slurm/%A_%a.log",
        f"--chdir={tmp_path}/work dir"]
    assert script.startswith("#!/bin/bash\n# ESD experiment as a Slurm job array")


def test_script_omits_unset_options_and_throttle(tmp_path):
    options = sbatch_lines(render(tmp_path, SlurmSettings(), n=1))
    assert "--array=0-0" in options
    assert not any(o.startswith(("--partition", "--time", "--gres")) for o in options)


def test_script_runs_exactly_the_worker_on_its_manifest_row_with_quoted_paths(tmp_path):
    script = render(tmp_path, SlurmSettings())
    exec_line = script.strip().splitlines()[-1]
    assert exec_line == (
        f"exec '/opt/py env/bin/python' '{tmp_path}/repo dir/esd_worker.py' "
        f"--manifest '{tmp_path}/my results/slurm/ts/manifest.json' "
        f'--task_index "$SLURM_ARRAY_TASK_ID"')


def test_script_body_passes_paths_with_spaces_intact_when_run_by_bash(tmp_path):
    # Run the generated script (not through Slurm) with a "python" that prints its argv.
    fake_python = tmp_path / "bin dir" / "python"
    fake_python.parent.mkdir()
    fake_python.write_text('#!/bin/sh\nfor a in "$@"; do echo "[$a]"; done\n')
    fake_python.chmod(0o755)
    script = render(tmp_path, SlurmSettings(), python=str(fake_python))
    env = {**os.environ, "SLURM_ARRAY_TASK_ID": "3", "SLURM_ARRAY_JOB_ID": "7"}
    proc = subprocess.run(["bash", "-c", script], capture_output=True, text=True, env=env,
                          check=True)
    assert proc.stdout.splitlines()[1:] == [
        f"[{tmp_path}/repo dir/esd_worker.py]", "[--manifest]",
        f"[{tmp_path}/my results/slurm/ts/manifest.json]", "[--task_index]", "[3]"]


def test_extra_args_are_split_like_a_shell_and_go_on_the_sbatch_command_line(tmp_path):
    extra = split_extra("--mem=8G --qos 'high prio' --account=abc")
    assert extra == ("--mem=8G", "--qos", "high prio", "--account=abc")
    settings = SlurmSettings(extra=extra)
    script_path = tmp_path / "job.sbatch"
    assert sbatch_command(script_path, settings) == [
        "sbatch", "--parsable", "--mem=8G", "--qos", "high prio", "--account=abc",
        str(script_path)]
    script = render(tmp_path, settings)
    assert not any("mem" in line for line in sbatch_lines(script))
    assert "# Submitted with: sbatch --parsable --mem=8G --qos 'high prio' --account=abc" in script


@pytest.mark.parametrize("bad", ["--array=0-3", "-a", "--output=x.log", "-ox.log",
                                 "--chdir=/tmp", "--wrap=true"])
def test_extra_args_that_would_break_the_array_contract_are_rejected(bad):
    with pytest.raises(SlurmError, match="not allowed"):
        SlurmSettings(extra=(bad,)).validate()


def test_unknown_settings_are_rejected_with_the_valid_ones():
    with pytest.raises(SlurmError) as info:
        SlurmSettings.from_options(partition="gpu", gpus=2)
    assert "gpus" in str(info.value) and "array_parallelism" in str(info.value)
    settings = SlurmSettings.from_options(partition="gpu", extra="--mem=4G -c 2", time=None)
    assert settings == SlurmSettings(partition="gpu", extra=("--mem=4G", "-c", "2"))


@pytest.mark.parametrize("value", [0, -1])
def test_array_parallelism_must_be_positive(value):
    with pytest.raises(SlurmError, match="array_parallelism"):
        SlurmSettings(array_parallelism=value).validate()


def test_invalid_settings_are_reported_by_run_array_before_anything_is_written(tmp_path):
    with pytest.raises(SlurmError, match="array_parallelism"):
        run_array(make_tasks(tmp_path / "out", 1), tmp_path / "out",
                  SlurmSettings(array_parallelism=0), wait=False)
    assert not (tmp_path / "out").exists()


def test_manifest_rows_hold_key_argv_and_absolute_result_path(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    from esd_worker import read_manifest_task
    tasks = [Task("org/a", ("--model_id", "org/a"), Path("out/org--a.csv")),
             Task("b c", ("--model_id", "b c; rm -rf /"), tmp_path / "b.csv", Path("logs/b.log"))]
    data = slurm_backend.manifest_data(tasks)
    assert data["n_tasks"] == 2
    assert data["tasks"] == [
        {"key": "org/a", "argv": ["--model_id", "org/a"],
         "result_path": str(tmp_path / "out" / "org--a.csv"), "log_path": None},
        {"key": "b c", "argv": ["--model_id", "b c; rm -rf /"],
         "result_path": str(tmp_path / "b.csv"), "log_path": str(tmp_path / "logs" / "b.log")}]
    manifest = tmp_path / "manifest.json"
    manifest.write_text(json.dumps(data))
    assert read_manifest_task(str(manifest), 1).argv == ["--model_id", "b c; rm -rf /"]
    with pytest.raises(ValueError, match="2 task"):
        read_manifest_task(str(manifest), 2)


def test_the_real_worker_reads_its_arguments_from_our_manifest(tmp_path):
    esd_worker = pytest.importorskip("esd_worker")
    out = tmp_path / "out"
    tasks = [Task("org/a@v1", ("--model_id", "org/a@v1", "--output_dir", str(out),
                               "--source_model", "org/base"), out / "org--a@v1.csv")]
    manifest = tmp_path / "manifest.json"
    manifest.write_text(json.dumps(slurm_backend.manifest_data(tasks)))
    config = esd_worker.parse_config(["--manifest", str(manifest), "--task_index", "0"])
    assert (config.entry.model_id, config.entry.revision) == ("org/a", "v1")
    assert config.entry.source_model == "org/base"


def test_the_default_worker_script_is_the_projects_worker():
    from esd.backends import local
    assert slurm_backend.DEFAULT_WORKER_SCRIPT == REPO / "esd_worker.py" == local.WORKER_SCRIPT
    assert slurm_backend.DEFAULT_WORKER_SCRIPT.is_file()


def test_zero_tasks_submit_nothing(tmp_path):
    lines = []
    outcome = run_array([], tmp_path / "out", SlurmSettings(), wait=True, log=lines.append)
    assert outcome.job_id is None and outcome.n_tasks == 0
    assert any("nothing to submit" in line for line in lines)
    assert not (tmp_path / "out").exists()


def test_missing_sbatch_is_a_clear_error_and_writes_nothing(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    with pytest.raises(SlurmError) as info:
        run_array(make_tasks(tmp_path / "out", 2), tmp_path / "out", SlurmSettings(), wait=False)
    message = str(info.value)
    assert "`sbatch` not found" in message and "--backend local" in message
    assert not (tmp_path / "out").exists()


def test_duplicate_task_keys_are_rejected(tmp_path):
    tasks = make_tasks(tmp_path, 2)
    with pytest.raises(SlurmError, match="duplicate"):
        run_array(tasks + tasks[:1], tmp_path, SlurmSettings(), wait=False)


def test_squeue_lines_become_states_by_task_index():
    text = "12_0 COMPLETED\n12_1 RUNNING\n12_[2-4%2] PENDING\n13_0 RUNNING\n\n"
    assert slurm_backend._parse_squeue(text, "12") == {
        0: "COMPLETED", 1: "RUNNING", 2: "PENDING", 3: "PENDING", 4: "PENDING"}
    assert slurm_backend._expand_indices("1,4-6%3") == [1, 4, 5, 6]


# ---------------------------------------------------------------------------- real Slurm

def _daemons_running() -> bool:
    return subprocess.run(["bash", str(SLURM_LOCAL), "status"], capture_output=True).returncode == 0


@pytest.fixture(scope="session")
def slurm_cluster():
    """A real single-node Slurm (2 fake GPUs); stopped at the end if this session started it."""
    if shutil.which("slurmctld") is None:
        pytest.skip("slurmctld is not installed (apt-get install -y slurm-wlm); "
                    "real-Slurm tests need it")
    already_running = _daemons_running()
    proc = subprocess.run(["bash", str(SLURM_LOCAL), "start"], capture_output=True, text=True)
    if proc.returncode != 0:
        pytest.fail(f"Slurm is installed but tests/slurm_local.sh start failed:\n"
                    f"{proc.stdout}\n{proc.stderr}", pytrace=False)
    yield
    if not already_running:
        subprocess.run(["bash", str(SLURM_LOCAL), "stop"], capture_output=True)


def _gpu_settings(**kw) -> SlurmSettings:
    return SlurmSettings(gres="gpu:1", job_name="esd-test", **kw)


@pytest.mark.slurm
def test_wait_completes_every_task_each_on_one_of_the_two_gpus(slurm_cluster, tmp_path,
                                                              task_script, monkeypatch):
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "out dir"
    tasks = make_tasks(out, 5)
    lines: list[str] = []
    outcome = run_array(tasks, out, _gpu_settings(array_parallelism=4), wait=True,
                        worker_script=task_script, poll_interval_s=0.3, log=lines.append)
    assert outcome.finished and outcome.n_tasks == 5
    assert outcome.done == tuple(t.key for t in tasks)
    assert outcome.failed == () and outcome.missing == ()
    assert set(outcome.states.values()) == {"COMPLETED"}
    results = [json.loads(t.result_path.read_text()) for t in tasks]
    assert {r["cuda_visible_devices"] for r in results} <= {"0", "1"}
    assert results[3]["argv"] == ["--model_id", "org/model-3"]
    assert results[0]["cwd"] == str(tmp_path)            # --chdir: where we submitted from
    # the frozen manifest and the script next to it, the logs where we said
    manifest = json.loads(outcome.manifest_path.read_text())
    assert [row["key"] for row in manifest["tasks"]] == [t.key for t in tasks]
    assert outcome.manifest_path.parent.parent == out / "slurm"
    assert "#SBATCH --array=0-4%4" in outcome.script_path.read_text()
    logs = sorted((out / "logs" / "slurm").glob(f"{outcome.job_id}_*.log"))
    assert len(logs) == 5 and "CUDA_VISIBLE_DEVICES=" in logs[0].read_text()
    assert any(f"submitted job array {outcome.job_id} with 5 task(s)" in line for line in lines)
    assert any(f"scancel {outcome.job_id}" in line for line in lines)
    assert any("5/5 ended (5 done" in line for line in lines)


@pytest.mark.slurm
def test_failing_task_is_failed_and_silent_task_is_missing(slurm_cluster, tmp_path, task_script):
    out = tmp_path / "out"
    tasks = make_tasks(out, 3, {1: ("--fail",), 2: ("--no_result",)})
    outcome = run_array(tasks, out, _gpu_settings(), wait=True, worker_script=task_script,
                        poll_interval_s=0.3, log=lambda line: None)
    assert outcome.done == ("org/model-0",)
    assert outcome.failed == ("org/model-1",)
    assert outcome.missing == ("org/model-2",)
    assert outcome.states == {"org/model-0": "COMPLETED", "org/model-1": "FAILED",
                              "org/model-2": "COMPLETED"}


@pytest.mark.slurm
def test_without_wait_returns_after_submitting(slurm_cluster, tmp_path, task_script):
    out = tmp_path / "out"
    outcome = run_array(make_tasks(out, 2), out, _gpu_settings(), wait=False,
                        worker_script=task_script, log=lambda line: None)
    assert outcome.job_id and not outcome.finished and outcome.done == ()
    submitted = json.loads((outcome.manifest_path.parent / "submitted.json").read_text())
    assert submitted["job_id"] == outcome.job_id
    subprocess.run(["scancel", outcome.job_id], check=True)


@pytest.mark.slurm
def test_rerun_while_an_array_runs_submits_only_new_tasks_and_follows_the_rest(
        slurm_cluster, tmp_path, task_script):
    out = tmp_path / "out"
    slow = make_tasks(out, 2, {0: ("--sleep", "3"), 1: ("--sleep", "3")})
    first = run_array(slow, out, SlurmSettings(array_parallelism=1), wait=False,
                      worker_script=task_script, log=lambda line: None)
    try:
        lines: list[str] = []
        again = run_array(slow, out, SlurmSettings(), wait=False, worker_script=task_script,
                          log=lines.append)
        assert again.job_id is None and again.n_tasks == 0
        assert lines[-1] == "slurm: nothing to submit"
        assert f"2 task(s) already pending or running in job(s) {first.job_id}" in lines[0]
        assert len(list((out / "slurm").glob("*/manifest.json"))) == 1

        tasks = make_tasks(out, 3)   # the same two keys and one new one
        second = run_array(tasks, out, SlurmSettings(), wait=True, worker_script=task_script,
                           poll_interval_s=0.3, log=lines.append)
        assert second.n_tasks == 1 and second.job_id != first.job_id
        rows = json.loads(second.manifest_path.read_text())["tasks"]
        assert [row["key"] for row in rows] == ["org/model-2"]
        # followed to the end: the two tasks of the first array as well as the new one
        assert second.finished and sorted(second.done) == [t.key for t in tasks]
    finally:
        subprocess.run(["scancel", first.job_id])


@pytest.mark.slurm
@pytest.mark.parametrize("settings, says", [
    (SlurmSettings(gres="gpu:3"), "Requested node configuration is not available"),
    (SlurmSettings(partition="no-such-partition"), "invalid partition"),
    (SlurmSettings(time="soon"), "Invalid --time specification"),
])
def test_sbatch_rejection_carries_its_message(slurm_cluster, tmp_path, task_script,
                                              settings, says):
    with pytest.raises(SlurmError) as info:
        run_array(make_tasks(tmp_path, 1), tmp_path, settings, wait=True,
                  worker_script=task_script, log=lambda line: None)
    assert "sbatch rejected the job array" in str(info.value)
    assert says.lower() in str(info.value).lower()


@pytest.mark.slurm
def test_array_larger_than_the_cluster_allows_is_refused_with_its_limit(slurm_cluster, tmp_path,
                                                                         task_script):
    # Debian's default MaxArraySize=1001 (task ids 0..1000)
    with pytest.raises(SlurmError, match=r"MaxArraySize is 1001.*--limit"):
        run_array(make_tasks(tmp_path, 1002), tmp_path, SlurmSettings(), wait=False,
                  worker_script=task_script, log=lambda line: None)


@pytest.mark.slurm
def test_ctrl_c_stops_following_but_does_not_cancel(slurm_cluster, tmp_path, task_script):
    out = tmp_path / "out"
    code = textwrap.dedent(f"""\
        import sys; sys.path.insert(0, {str(REPO)!r})
        from pathlib import Path
        from esd.backends.slurm import SlurmSettings, run_array
        from esd.backends.base import Task
        tasks = [Task("slow", ("--sleep", "60"), Path({str(out / "slow.json")!r}))]
        outcome = run_array(tasks, Path({str(out)!r}), SlurmSettings(), wait=True,
                            worker_script=Path({str(task_script)!r}), poll_interval_s=0.2,
                            log=lambda line: print(line, flush=True))
        print("finished:", outcome.finished, flush=True)
        """)
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    job_id = None
    try:
        # wait for what the program announces (no fixed wall time): the array submitted, then
        # the loop that follows it entered; only then is Ctrl-C "stop following"
        for line in proc.stdout:
            if "submitted job array" in line:
                job_id = line.split("submitted job array ")[1].split()[0]
            if "following" in line and "Ctrl-C stops following" in line:
                break
        assert job_id, "run_array did not submit"
        proc.send_signal(signal.SIGINT)
        # the task sleeps 60 s: had the signal been missed, the program would still end
        # (saying "finished: True"), so reading to the end needs no deadline of its own
        rest = proc.stdout.read()
        proc.wait()
        assert f"Cancel it with: scancel {job_id}" in rest
        assert "finished: False" in rest
        listed = subprocess.run(["squeue", "-h", f"--jobs={job_id}", "-o", "%T"],
                                capture_output=True, text=True).stdout.split()
        assert listed and listed[0] in ("RUNNING", "PENDING")
    finally:
        proc.kill()
        if job_id:
            subprocess.run(["scancel", job_id])


# ---------------------------------------------------------------------------- end to end

def _orchestrator_missing_reason() -> str | None:
    if not (REPO / "run_esd_experiment.py").exists() or not (REPO / "esd_worker.py").exists():
        return "run_esd_experiment.py / esd_worker.py not merged yet"
    for module in ("net_esd", "model_loader", "analyze_results"):
        if not (REPO / f"{module}.py").exists():
            return f"{module}.py (needed by the experiment) not merged yet"
    return None


def _run_experiment(cwd: Path, model_list: Path, out: Path) -> subprocess.CompletedProcess:
    argv = [sys.executable, str(REPO / "run_esd_experiment.py"), "--model_list", str(model_list),
            "--output_dir", str(out), "--backend", "slurm", "--slurm_gres", "gpu:1", "--wait"]
    # Offline with a private hub cache; sbatch passes this environment on to the tasks.
    env = dict(os.environ, HF_HOME=str(cwd / "hf_home"), HF_HUB_OFFLINE="1",
               TOKENIZERS_PARALLELISM="false")
    env.pop("HF_HUB_CACHE", None)
    return subprocess.run(argv, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)


@pytest.mark.slurm
@pytest.mark.slow
@pytest.mark.skipif(_orchestrator_missing_reason() is not None,
                    reason=str(_orchestrator_missing_reason()))
def test_experiment_on_slurm_completes_every_model_and_resumes_only_what_is_missing(
        slurm_cluster, tmp_path):
    from esd.model_list import ModelEntry, result_csv_path

    from tiny_models import save_gpt2  # GPT2Config(n_layer=2, n_embd=64, n_head=2, ...)

    models = [save_gpt2(tmp_path / "models" / f"tiny-gpt2-{i}", seed=i) for i in range(3)]
    model_list = tmp_path / "models.csv"
    model_list.write_text("model_id\n" + "".join(f"{p}\n" for p in models))
    out = tmp_path / "results"

    def manifests():
        return sorted((out / "slurm").glob("*/manifest.json"))

    first = _run_experiment(tmp_path, model_list, out)
    assert first.returncode == 0, first.stdout + first.stderr
    csvs = [result_csv_path(out, ModelEntry(str(p))) for p in models]
    assert all(c.exists() for c in csvs), first.stdout + first.stderr
    assert len(manifests()) == 1
    assert json.loads(manifests()[0].read_text())["n_tasks"] == 3
    logs = list((out / "logs" / "slurm").glob("*.log"))
    assert len(logs) == 3
    assert all(re.search(r"CUDA_VISIBLE_DEVICES=[01]\n", log.read_text()) for log in logs)

    again = _run_experiment(tmp_path, model_list, out)
    assert again.returncode == 0, again.stdout + again.stderr
    assert "nothing to submit" in again.stdout + again.stderr
    assert len(manifests()) == 1

    csvs[1].unlink()
    third = _run_experiment(tmp_path, model_list, out)
    assert third.returncode == 0, third.stdout + third.stderr
    assert len(manifests()) == 2
    rows = json.loads(manifests()[-1].read_text())["tasks"]
    assert [row["key"] for row in rows] == [str(models[1])]
    assert "with 1 task(s)" in third.stdout + third.stderr
    assert all(c.exists() for c in csvs)


# ---------------------------------------------------------------------------- policy on Slurm

def _supervise(out, tasks, task_script, **policy):
    """The orchestrator's own policy (esd/supervisor.py) over a real Slurm backend."""
    from esd.backends.slurm import SlurmBackend
    from esd.supervisor import Policy, Supervisor
    lines: list[str] = []
    backend = SlurmBackend(_gpu_settings(), out, wait=True, worker_script=task_script,
                           poll_interval_s=0.3, log=lines.append)
    supervisor = Supervisor(backend, out, Policy(**{"retry_backoff_s": 0, **policy}),
                            tick_interval_s=0.3)
    return supervisor.run(tasks), lines


@pytest.mark.slurm
def test_slurm_resubmits_retryable_failures_as_a_follow_up_array_up_to_max_retries(
        slurm_cluster, tmp_path, task_script):
    out = tmp_path / "out"
    tasks = make_tasks(out, 3, {1: ("--fail_first", "1"), 2: ("--fail_first", "5")})
    outcome, lines = _supervise(out, tasks, task_script, max_retries=2)
    assert sorted(outcome.succeeded) == ["org/model-0", "org/model-1"]
    assert outcome.failed == {"org/model-2": "worker/retryable_exit"}
    manifests = sorted((out / "slurm").glob("*/manifest.json"))
    rows = [[row["key"] for row in json.loads(m.read_text())["tasks"]] for m in manifests]
    assert rows[0] == ["org/model-0", "org/model-1", "org/model-2"]   # first array
    # each retry goes out as a follow-up array as soon as its task has failed (two tasks
    # failing at the same poll share one): model-1 once more, model-2 twice more
    retried = [key for keys in rows[1:] for key in keys]
    assert sorted(retried) == ["org/model-1", "org/model-2", "org/model-2"]
    assert all(len(set(keys)) == len(keys) for keys in rows)
    assert (out / "org--model-2.json.attempts").read_text() == "3"
    from esd.failures import read_failures
    assert set(read_failures(out)) == {"org/model-2"}


@pytest.mark.slurm
def test_slurm_reports_a_task_that_ends_early_and_retries_it_before_the_slow_task_of_its_array_ends(
        slurm_cluster, tmp_path, task_script):
    """model-0 fails at once (retryable); model-1, in the same array, ends only once model-0's
    result exists, which only model-0's retry can write (it gives up and fails after 120 s)."""
    out = tmp_path / "out"
    tasks = make_tasks(out, 2, {0: ("--fail_first", "1"), 1: ("--wait_for", str(out / "org--model-0.json"))})
    outcome, _ = _supervise(out, tasks, task_script, max_retries=1)
    assert sorted(outcome.succeeded) == ["org/model-0", "org/model-1"] and not outcome.failed
    manifests = sorted((out / "slurm").glob("*/manifest.json"))
    rows = [[row["key"] for row in json.loads(m.read_text())["tasks"]] for m in manifests]
    assert rows == [["org/model-0", "org/model-1"], ["org/model-0"]]


@pytest.mark.slurm
def test_slurm_timeout_sets_the_time_limit_and_is_a_typed_timeout_not_retried(
        slurm_cluster, tmp_path, task_script):
    out = tmp_path / "out"
    tasks = make_tasks(out, 2, {1: ("--sleep", "30")})
    started = time.monotonic()
    outcome, _ = _supervise(out, tasks, task_script, timeout_s=2, max_retries=3)
    assert time.monotonic() - started < 25
    assert outcome.succeeded == ["org/model-0"]
    assert outcome.failed == {"org/model-1": "worker/timeout"}
    (script,) = (out / "slurm").glob("*/job.sbatch")      # not resubmitted
    text = script.read_text()
    assert "#SBATCH --time=3" in text.splitlines()       # ceil(2 s / 60) + 2 minutes
    assert "exec timeout --kill-after=30 2 " in text


@pytest.mark.slurm
def test_slurm_task_without_progress_is_stopped_as_stalled(slurm_cluster, tmp_path, task_script):
    out = tmp_path / "out"
    tasks = make_tasks(out, 1, {0: ("--sleep", "60")})
    started = time.monotonic()
    outcome, _ = _supervise(out, tasks, task_script, stall_timeout_s=3)
    assert time.monotonic() - started < 40
    assert outcome.failed == {"org/model-0": "worker/stalled"}
    listed = subprocess.run(["squeue", "-h", "-o", "%i %T"], capture_output=True, text=True).stdout
    assert not [line for line in listed.splitlines() if "RUNNING" in line and "esd-test" in line]


# ---------------------------------------------------------------------------- hostile paths

HOSTILE = ["x; touch PWNED", "$(touch PWNED2)", "`touch PWNED3`", "it's \"quoted\"", "a\\b", "--help"]


@pytest.mark.parametrize("name", HOSTILE)
def test_script_with_hostile_paths_parses_and_runs_only_the_worker(tmp_path, name):
    fake_python = tmp_path / name / "python"
    fake_python.parent.mkdir(parents=True)
    fake_python.write_text('#!/bin/sh\nfor a in "$@"; do printf "[%s]\\n" "$a"; done\n')
    fake_python.chmod(0o755)
    out = tmp_path / name / "results"
    script = render_script(n_tasks=2, settings=SlurmSettings(partition="gpu"),
                           manifest_path=out / "slurm" / "ts" / "manifest.json", output_dir=out,
                           workdir=tmp_path / name, worker_script=tmp_path / name / "esd_worker.py",
                           python=str(fake_python), script_path=out / "slurm" / "ts" / "job.sbatch",
                           timeout_s=5)
    path = tmp_path / "job.sbatch"
    path.write_text(script)
    assert subprocess.run(["bash", "-n", str(path)], capture_output=True).returncode == 0
    env = {**os.environ, "SLURM_ARRAY_TASK_ID": "1", "SLURM_ARRAY_JOB_ID": "9"}
    proc = subprocess.run(["bash", str(path)], capture_output=True, text=True, env=env, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines()[1:] == [
        f"[{tmp_path / name / 'esd_worker.py'}]", "[--manifest]",
        f"[{out / 'slurm' / 'ts' / 'manifest.json'}]", "[--task_index]", "[1]"]
    assert not list(tmp_path.rglob("PWNED*"))
    for line in script.splitlines():   # every #SBATCH value is one shell word
        if line.startswith("#SBATCH "):
            assert len(shlex.split(line[len("#SBATCH "):])) == 1


@pytest.mark.parametrize("where", ["output_dir", "workdir"])
def test_a_line_break_in_the_output_or_working_directory_is_refused(tmp_path, where):
    bad = tmp_path / "a\ntouch PWNED"
    dirs = {"output_dir": tmp_path / "out", "workdir": tmp_path}
    dirs[where] = bad
    with pytest.raises(SlurmError, match="line break"):
        render_script(n_tasks=1, settings=SlurmSettings(), manifest_path=dirs["output_dir"] / "m.json",
                      output_dir=dirs["output_dir"], workdir=dirs["workdir"],
                      worker_script=tmp_path / "w.py", python="python", script_path=tmp_path / "j.sbatch")


def test_a_line_break_in_the_python_or_worker_path_stays_inside_one_quoted_word(tmp_path):
    odd = tmp_path / "bin\ntouch PWNED"
    odd.mkdir()
    (odd / "python").write_text('#!/bin/sh\necho "[$1]"\n')
    (odd / "python").chmod(0o755)
    script = render_script(n_tasks=1, settings=SlurmSettings(), manifest_path=tmp_path / "m.json",
                           output_dir=tmp_path / "out", workdir=tmp_path, worker_script=odd / "w.py",
                           python=str(odd / "python"), script_path=tmp_path / "j.sbatch")
    assert all(not line.startswith("touch") for line in script.splitlines())
    proc = subprocess.run(["bash", "-c", script], capture_output=True, text=True, cwd=tmp_path,
                          env={**os.environ, "SLURM_ARRAY_TASK_ID": "0"})
    assert proc.returncode == 0 and proc.stdout.endswith(f"\n[{odd / 'w.py'}]\n")
    assert not list(tmp_path.rglob("PWNED*"))


def test_an_sbatch_option_the_backend_manages_is_a_one_line_error_of_the_run(tmp_path):
    model_list = tmp_path / "models.csv"
    model_list.write_text("model_id\norg/m\n")
    proc = subprocess.run([sys.executable, str(REPO / "run_esd_experiment.py"), "--model_list", str(model_list),
                           "--output_dir", str(tmp_path / "out"), "--backend", "slurm", "--slurm_extra", "--array=1"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert proc.returncode != 0 and "Traceback" not in proc.stdout + proc.stderr
    assert ("error: slurm: extra sbatch argument '--array=1' is not allowed: the array is built from the task list"
            in (proc.stdout + proc.stderr).splitlines())
