"""The policy above the backends (esd/supervisor.py): what each `Ending` kind means, whatever
the scheduler's own word; how Slurm's and gputracker's words map to the kinds; and the stall
watchdog, which counts layer and bytes lines as progress and nothing else."""
from __future__ import annotations

import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from esd.backends.base import Ending, Task, TaskResult  # noqa: E402
from esd.backends.slurm import ENDINGS, TERMINAL_STATES, task_state  # noqa: E402
from esd.failures import ESDFailure, record_failure  # noqa: E402
from esd.supervisor import Policy, classify  # noqa: E402


def _result(tmp_path, ending, returncode=None, word=None, timeout_s=None) -> TaskResult:
    task = Task("org/m", (), tmp_path / "org--m.csv", tmp_path / "m.log", timeout_s=timeout_s)
    return TaskResult(task, returncode, time.time() - 5, time.time(), ending=ending, word=word)


# (ending, exit status) -> (what the policy makes of it, the reason, whether it is retried)
EXPECTED = [
    (Ending.INTERRUPTED, None, "interrupted", None, None),
    (Ending.TIMED_OUT, 124, "failed", "timeout", False),
    (Ending.OUT_OF_MEMORY, None, "failed", "worker_killed", True),
    (Ending.NODE_FAILURE, None, "failed", "worker_killed", True),
    (Ending.PREEMPTED, None, "failed", "worker_killed", True),
    (Ending.CANCELLED, -15, "failed", "cancelled", False),
    (Ending.NO_SPACE, None, "failed", "disk_full", None),
    (Ending.FAILED, 75, "failed", "retryable_exit", True),
    (Ending.FAILED, 3, "failed", "worker_crashed", False),
    (Ending.FAILED, -9, "failed", "worker_killed", None),
    (Ending.LOST, None, "failed", "worker_crashed", False),
    (Ending.SUCCEEDED, 0, "failed", "worker_crashed", False),   # exit 0 yet no result file
]


@pytest.mark.parametrize("ending, code, kind, reason, retryable", EXPECTED)
def test_each_ending_kind_has_one_meaning_whatever_the_schedulers_word(tmp_path, ending, code, kind,
                                                                       reason, retryable):
    answers = set()
    for word in (None, "TIMEOUT", "CANCELLED", "Exit_status=-29", "exit 3"):
        got, failure = classify(_result(tmp_path, ending, code, word), tmp_path, Policy())
        answers.add((got, failure and failure.reason, failure and (failure.retryable if retryable is not None
                                                                    else None)))
    assert answers == {(kind, reason, retryable)}


def test_the_schedulers_word_reaches_the_message_only(tmp_path):
    _, failure = classify(_result(tmp_path, Ending.OUT_OF_MEMORY, word="OUT_OF_MEMORY"), tmp_path, Policy())
    assert failure.message == "worker ran out of memory (OUT_OF_MEMORY)"
    _, failure = classify(_result(tmp_path, Ending.TIMED_OUT, word="TIMEOUT", timeout_s=30), tmp_path, Policy())
    assert failure.message == "exceeded --timeout 30s"


def test_a_result_written_by_the_attempt_is_done_whatever_the_ending(tmp_path):
    (tmp_path / "org--m.csv").write_text("done")
    for ending in Ending:
        if ending is not Ending.INTERRUPTED:
            assert classify(_result(tmp_path, ending, 1), tmp_path, Policy()) == ("done", None)


def test_the_workers_own_failure_record_wins_over_its_exit(tmp_path):
    record_failure(tmp_path, "org/m", ESDFailure("load", "corrupt_file", "bad header"))
    got, failure = classify(_result(tmp_path, Ending.FAILED, 1, "FAILED"), tmp_path, Policy())
    assert (got, failure.stage, failure.reason) == ("failed", "load", "corrupt_file")


@pytest.mark.parametrize("word, code, ending", [
    ("COMPLETED", 0, Ending.SUCCEEDED), ("FAILED", 3, Ending.FAILED), ("FAILED", 124, Ending.TIMED_OUT),
    ("TIMEOUT", 0, Ending.TIMED_OUT), ("DEADLINE", None, Ending.TIMED_OUT),
    ("CANCELLED", 0, Ending.CANCELLED), ("OUT_OF_MEMORY", 0, Ending.OUT_OF_MEMORY),
    ("NODE_FAIL", None, Ending.NODE_FAILURE), ("BOOT_FAIL", None, Ending.NODE_FAILURE),
    ("PREEMPTED", None, Ending.PREEMPTED),
])
def test_slurm_states_map_to_the_ending_kinds(word, code, ending):
    state = task_state(word, code)
    assert (state.ended, state.ending, state.returncode, state.word) == (True, ending, code, word)


@pytest.mark.parametrize("word, running", [("PENDING", False), ("RUNNING", True), ("COMPLETING", True),
                                           ("REQUEUED", False), ("CONFIGURING", True)])
def test_slurm_states_that_have_not_ended_are_pending_or_running(word, running):
    state = task_state(word)
    assert not state.ended and state.running == running


def test_every_terminal_slurm_state_has_a_kind():
    assert set(ENDINGS) == set(TERMINAL_STATES)


def test_gputracker_endings_map_to_the_kinds(tmp_path):
    from gputracker.dispatcher import JobResult
    from esd.backends.local import _ending

    def job(returncode, timed_out=False, interrupted=False, launch_error=None):
        return JobResult("k", [], returncode, (), None, None, 0.0, timed_out, interrupted, None, launch_error)
    assert _ending(job(0), False) is Ending.SUCCEEDED
    assert _ending(job(3), False) is Ending.FAILED
    assert _ending(job(-9), False) is Ending.FAILED            # a signal nobody here sent
    assert _ending(job(-15), True) is Ending.CANCELLED          # the supervisor's cancel
    assert _ending(job(-15, timed_out=True), False) is Ending.TIMED_OUT
    assert _ending(job(None, interrupted=True), False) is Ending.INTERRUPTED
    assert _ending(job(None, launch_error=OSError(28, "No space left on device")), False) is Ending.NO_SPACE
    assert _ending(job(None), False) is Ending.LOST


# ---------------------------------------------------------------------------- the watchdog

def test_a_worker_whose_log_grows_without_progress_lines_is_stalled_and_one_with_them_is_not(tmp_path):
    """A worker looping on HTTP requests writes a line per request (as httpx logs at INFO);
    that is not progress. Layer lines and bytes lines are."""
    from esd.backends.local import LocalBackend, LocalSettings
    from esd.failures import read_failures
    from esd.supervisor import Supervisor
    worker = tmp_path / "worker.py"
    worker.write_text(
        "import sys, time\nmode, result = sys.argv[1:3]\n"
        "for i in range(600 if mode == 'looping' else 16):\n"
        "    if mode == 'looping':\n"
        "        print(f'HTTP Request: GET http://127.0.0.1:1/api/models/org/m/tree/main?p={i} "
        "\"HTTP/1.1 200 OK\"', flush=True)\n"
        "    elif mode == 'downloading':\n"
        "        print(f'  bytes {i * 1048576}/{16 * 1048576}  org/m', flush=True)\n"
        "    else:\n"
        "        print(f'  layer {i:4d}/16  h.{i}.attn', flush=True)\n"
        "    time.sleep(0.1 if mode == 'looping' else 0.4)\n"
        "open(result, 'w').write('done')\n")
    out = tmp_path / "out"
    out.mkdir()
    tasks = [Task(mode, (mode, str(out / f"{mode}.csv")), out / f"{mode}.csv", out / "logs" / f"{mode}.log")
             for mode in ("looping", "downloading", "analysing")]
    backend = LocalBackend(LocalSettings(gpus=(), cpu_workers=3, poll_interval_s=0.05, max_check=1),
                           worker_script=worker)
    outcome = Supervisor(backend, out, Policy(stall_timeout_s=3, retry_backoff_s=0), tick_interval_s=0.2).run(tasks)
    assert outcome.failed == {"looping": "worker/stalled"}
    assert sorted(outcome.succeeded) == ["analysing", "downloading"]
    assert read_failures(out)["looping"].reason == "stalled"
    # its log grew all along, a line per request, faster than the stall limit
    assert (out / "logs" / "looping.log").read_text().count("HTTP Request") >= 10
