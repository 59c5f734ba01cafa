"""The generic array backend (esd/backends/array.py) driven by a second scheduler beside Slurm:
`tests/array_testkit.py` runs each array task as a local bash process through the same hooks.
Also the table of backends (esd/backends/__init__.py): a row is all a new backend needs."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from array_testkit import TASK_SCRIPT, LocalProcessScheduler  # noqa: E402
from esd.backends import BACKENDS, BackendRow, backend_names  # noqa: E402
from esd.backends.array import ArrayBackend, run_array  # noqa: E402
from esd.backends.base import Ending, Task  # noqa: E402
from esd.failures import read_failures  # noqa: E402
from esd.supervisor import Policy, Supervisor  # noqa: E402


@pytest.fixture
def task_script(tmp_path) -> Path:
    path = tmp_path / "task script.py"
    path.write_text(TASK_SCRIPT)
    return path


@pytest.fixture
def scheduler():
    made = LocalProcessScheduler()
    yield made
    made.stop_all()


def make_tasks(out: Path, n: int, extra: dict[int, tuple[str, ...]] | None = None) -> list[Task]:
    extra = extra or {}
    return [Task(f"org/model-{i}", ("--model_id", f"org/model-{i}", *extra.get(i, ())),
                 out / f"org--model-{i}.json", out / "logs" / f"model-{i}.log") for i in range(n)]


def supervise(scheduler, out, tasks, task_script, **policy):
    """The orchestrator's own policy over the array backend on the test scheduler."""
    lines: list[str] = []
    backend = ArrayBackend(scheduler, out, wait=True, worker_script=task_script, poll_interval_s=0.1,
                           log=lines.append)
    outcome = Supervisor(backend, out, Policy(**{"retry_backoff_s": 0, **policy}), tick_interval_s=0.1).run(tasks)
    return outcome, lines


def manifest_keys(out: Path, name: str = "testsched") -> list[list[str]]:
    return [[row["key"] for row in json.loads(m.read_text())["tasks"]]
            for m in sorted((out / name).glob("*/manifest.json"))]


def test_array_backend_runs_every_task_of_an_array_on_another_scheduler(tmp_path, scheduler, task_script):
    out = tmp_path / "out"
    tasks = make_tasks(out, 3, {1: ("--fail",)})
    lines: list[str] = []
    outcome = run_array(scheduler, tasks, out, wait=True, worker_script=task_script, poll_interval_s=0.1,
                        log=lines.append)
    assert outcome.finished and outcome.n_tasks == 3
    assert outcome.done == ("org/model-0", "org/model-2") and outcome.failed == ("org/model-1",)
    assert outcome.states == {"org/model-0": "exit 0", "org/model-1": "exit 3", "org/model-2": "exit 0"}
    assert outcome.exit_codes == {"org/model-0": 0, "org/model-1": 3, "org/model-2": 0}
    # the same files as on Slurm, under the scheduler's name: manifest, script, submitted.json
    submitted = json.loads((outcome.manifest_path.parent / "submitted.json").read_text())
    assert submitted["job_id"] == outcome.job_id and submitted["command"] == ["bash", str(outcome.script_path)]
    assert outcome.manifest_path.parent.parent == out / "testsched"
    assert [json.loads(t.result_path.read_text())["task_id"] for t in (tasks[0], tasks[2])] == ["0", "2"]
    assert any(f"submitted job array {outcome.job_id} with 3 task(s)" in line for line in lines)
    assert any("3/3 ended (2 done, 0 running, 0 pending, 1 failed)" in line for line in lines)


def test_retryable_failures_are_resubmitted_as_follow_up_arrays_up_to_max_retries(tmp_path, scheduler,
                                                                                  task_script):
    out = tmp_path / "out"
    tasks = make_tasks(out, 3, {1: ("--fail_first", "1"), 2: ("--fail_first", "5")})
    outcome, _ = supervise(scheduler, out, tasks, task_script, max_retries=2)
    assert sorted(outcome.succeeded) == ["org/model-0", "org/model-1"]
    assert outcome.failed == {"org/model-2": "worker/retryable_exit"}
    rows = manifest_keys(out)
    assert rows[0] == ["org/model-0", "org/model-1", "org/model-2"]
    assert sorted(key for keys in rows[1:] for key in keys) == ["org/model-1", "org/model-2", "org/model-2"]
    assert (out / "org--model-2.json.attempts").read_text() == "3"
    assert set(read_failures(out)) == {"org/model-2"}


def test_a_task_that_ends_early_is_reported_and_retried_before_a_slow_task_of_its_array_ends(
        tmp_path, scheduler, task_script):
    """model-0 fails at once (retryable); model-1, in the same array, ends only once model-0's
    result exists, which only model-0's retry can write. Had the retry waited for the whole
    array, model-1 would give up (after 60 s) and fail."""
    out = tmp_path / "out"
    tasks = make_tasks(out, 2, {0: ("--fail_first", "1"),
                                1: ("--wait_for", str(out / "org--model-0.json"), "--wait_bound", "60")})
    ended: list[tuple[str, Ending]] = []   # (key, ending) in the order reported

    class Recording(Supervisor):
        def on_end(self, result):
            ended.append((result.key, result.ending))
            return super().on_end(result)

    backend = ArrayBackend(scheduler, out, wait=True, worker_script=task_script, poll_interval_s=0.1,
                           log=lambda line: None)
    outcome = Recording(backend, out, Policy(retry_backoff_s=0), tick_interval_s=0.1).run(tasks)
    assert sorted(outcome.succeeded) == ["org/model-0", "org/model-1"] and not outcome.failed
    # model-0's failure was reported while model-1 still ran; the two then ended well
    assert ended[0] == ("org/model-0", Ending.FAILED)
    assert sorted(ended[1:]) == [("org/model-0", Ending.SUCCEEDED), ("org/model-1", Ending.SUCCEEDED)]
    assert manifest_keys(out) == [["org/model-0", "org/model-1"], ["org/model-0"]]
    assert "saw" in tasks[1].log_path.read_text()


def test_timeout_is_the_scripts_limit_and_a_typed_timeout_not_retried(tmp_path, scheduler, task_script):
    out = tmp_path / "out"
    tasks = make_tasks(out, 2, {1: ("--sleep", "60")})
    outcome, _ = supervise(scheduler, out, tasks, task_script, timeout_s=1, max_retries=3)
    assert outcome.succeeded == ["org/model-0"]
    assert outcome.failed == {"org/model-1": "worker/timeout"}
    assert len(manifest_keys(out)) == 1          # not resubmitted
    assert "exec timeout 1 " in next((out / "testsched").glob("*/job.sh")).read_text()


def test_a_task_without_progress_is_cancelled_as_stalled(tmp_path, scheduler, task_script):
    out = tmp_path / "out"
    tasks = make_tasks(out, 1, {0: ("--sleep", "60")})
    outcome, _ = supervise(scheduler, out, tasks, task_script, stall_timeout_s=1)
    assert outcome.failed == {"org/model-0": "worker/stalled"}
    assert all(proc.poll() is not None for procs in scheduler.jobs.values() for proc in procs)


def test_a_task_cancelled_from_outside_is_a_typed_cancellation_not_retried(tmp_path, scheduler, task_script):
    out = tmp_path / "out"
    tasks = make_tasks(out, 1, {0: ("--sleep", "60")})
    backend = ArrayBackend(scheduler, out, wait=True, worker_script=task_script, poll_interval_s=0.1,
                           log=lambda line: None)

    class CancelOnStart(Supervisor):   # a user's `scancel` once the task runs
        def on_start(self, task, when):
            super().on_start(task, when)
            job_id = next(iter(scheduler.jobs))
            scheduler.cancel(job_id, 0)

    outcome = CancelOnStart(backend, out, Policy(retry_backoff_s=0, max_retries=3), tick_interval_s=0.1).run(tasks)
    assert outcome.failed == {"org/model-0": "worker/cancelled"}
    assert "(cancelled)" in read_failures(out)["org/model-0"].message
    assert len(manifest_keys(out)) == 1


def test_rerun_while_an_array_runs_submits_only_new_tasks_and_follows_the_rest(tmp_path, scheduler, task_script):
    out = tmp_path / "out"
    first = run_array(scheduler, make_tasks(out, 2, {0: ("--sleep", "60"), 1: ("--sleep", "60")}), out,
                      wait=False, worker_script=task_script, log=lambda line: None)
    lines: list[str] = []
    again = run_array(scheduler, make_tasks(out, 3), out, wait=False, worker_script=task_script, log=lines.append)
    assert f"2 task(s) already pending or running in job(s) {first.job_id}" in lines[0]
    assert again.n_tasks == 1 and manifest_keys(out)[-1] == ["org/model-2"]


def test_without_wait_the_backend_returns_after_submitting(tmp_path, scheduler, task_script):
    out = tmp_path / "out"
    outcome = run_array(scheduler, make_tasks(out, 2, {0: ("--sleep", "60")}), out, wait=False,
                        worker_script=task_script, log=lambda line: None)
    assert outcome.job_id and not outcome.finished and outcome.done == ()
    assert scheduler.jobs[outcome.job_id][0].poll() is None   # still running: not followed


def test_duplicate_keys_and_an_empty_list_submit_nothing(tmp_path, scheduler, task_script):
    out = tmp_path / "out"
    tasks = make_tasks(out, 2)
    with pytest.raises(Exception, match="duplicate"):
        run_array(scheduler, tasks + tasks[:1], out, wait=True, worker_script=task_script)
    lines: list[str] = []
    outcome = run_array(scheduler, [], out, wait=True, worker_script=task_script, log=lines.append)
    assert outcome.job_id is None and outcome.finished and lines == ["testsched: nothing to submit"]
    assert not scheduler.jobs and not out.exists()


# ---------------------------------------------------------------------------- the table of backends

@pytest.fixture
def test_backend_row(monkeypatch):
    row = BackendRow("testsched", "local processes as job arrays (tests)", "array_testkit")
    monkeypatch.setitem(BACKENDS, row.name, row)
    return row


def test_a_backend_registered_in_the_table_is_a_backend_choice_and_is_built_from_its_row(
        test_backend_row, tmp_path):
    import run_esd_experiment
    assert backend_names() == ["local", "slurm", "testsched"]
    help_text = run_esd_experiment.build_parser().format_help()
    assert "testsched: local processes as job arrays (tests)" in " ".join(help_text.split())
    model_list = tmp_path / "models.csv"
    model_list.write_text("model_id\norg/m\n")
    config = run_esd_experiment.parse_config(["--model_list", str(model_list), "--output_dir",
                                              str(tmp_path / "out"), "--backend", "testsched"])
    backend = run_esd_experiment.make_backend(config)
    assert isinstance(backend, ArrayBackend) and isinstance(backend.scheduler, LocalProcessScheduler)
    assert backend.worker_script == run_esd_experiment.WORKER_SCRIPT


def test_a_backend_not_in_the_table_is_refused_with_the_choices(tmp_path, capsys):
    import run_esd_experiment
    model_list = tmp_path / "models.csv"
    model_list.write_text("model_id\norg/m\n")
    with pytest.raises(SystemExit):
        run_esd_experiment.parse_config(["--model_list", str(model_list), "--backend", "pbs"])
    err = capsys.readouterr().err
    assert "'pbs'" in err and "'local', 'slurm'" in err


def test_the_experiment_runs_on_a_backend_added_by_one_table_row(tmp_path):
    """The orchestrator, the real worker and tiny real models, on the test scheduler registered
    by one row: every model gets its result CSV."""
    from tiny_models import save_gpt2
    models = [save_gpt2(tmp_path / "models" / f"tiny-gpt2-{i}", seed=i) for i in range(2)]
    model_list = tmp_path / "models.csv"
    model_list.write_text("model_id\n" + "".join(f"{p}\n" for p in models))
    out = tmp_path / "results"
    code = (f"import sys; sys.path[:0] = [{str(REPO)!r}, {str(REPO / 'tests')!r}]\n"
            "from esd.backends import BACKENDS, BackendRow\n"
            "BACKENDS['testsched'] = BackendRow('testsched', 'local processes as job arrays', 'array_testkit')\n"
            "import run_esd_experiment\n"
            f"sys.exit(run_esd_experiment.main(['--model_list', {str(model_list)!r}, '--output_dir', {str(out)!r}, "
            "'--backend', 'testsched']))\n")
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True,
                          env={**__import__("os").environ, "HF_HUB_OFFLINE": "1"}, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    from esd.model_list import ModelEntry, result_csv_path
    assert all(result_csv_path(out, ModelEntry(str(p))).exists() for p in models)
    assert manifest_keys(out) == [[str(p) for p in models]]


def test_a_scheduler_that_cannot_answer_is_asked_again_then_the_run_says_it_lost_track(tmp_path, task_script):
    from esd.backends.base import BackendError

    class Flaky(LocalProcessScheduler):
        def __init__(self, failures):
            super().__init__()
            self.failures = failures

        def poll(self, job_ids):
            if self.failures:
                self.failures -= 1
                raise BackendError("controller unreachable")
            return super().poll(job_ids)

    out = tmp_path / "out"
    lines: list[str] = []
    flaky, gone = Flaky(2), Flaky(10 ** 6)
    try:
        outcome = run_array(flaky, make_tasks(out, 1), out, wait=True, worker_script=task_script,
                            poll_interval_s=0.05, log=lines.append)
        assert outcome.done == ("org/model-0",)
        assert sum("cannot query testsched" in line for line in lines) == 2
        with pytest.raises(BackendError, match="lost track of testsched job .*It may still be running"):
            run_array(gone, make_tasks(tmp_path / "out2", 1), tmp_path / "out2", wait=True,
                      worker_script=task_script, poll_interval_s=0.01, log=lambda line: None)
    finally:
        flaky.stop_all()
        gone.stop_all()
