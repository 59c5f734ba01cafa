"""The setup doctor (`python test_setup.py`), run as a user runs it: a real subprocess.

GPUs cannot exist here, so NVML is the fake of the *library* (`tests/fake_nvml/pynvml.py`,
scripted by `$FAKE_NVML_SCRIPT`) put first on PYTHONPATH; everything else is real: the
installed packages, huggingface_hub reading the token, the file system, the Slurm commands.

Each run imports torch (its CUDA check; a few seconds of CPU), so the runs the selected tests
need are started together, two at a time, when the first of them is asked for; each test
names its scenario with `@scenario(...)` and asserts on the finished run.
"""
from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import string
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
DOCTOR = REPO_ROOT / "test_setup.py"
FAKE_NVML_DIR = REPO_ROOT / "tests" / "fake_nvml"
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

import test_setup  # noqa: E402  (the doctor imports nothing heavy at module level)

STATUSES = ("OK", "WARN", "FAIL")
# Variables of the user's shell that would change what the doctor finds.
_SCRUBBED_ENV = ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_TOKEN_PATH", "HF_HUB_OFFLINE",
                 "TRANSFORMERS_OFFLINE", "HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE",
                 "FAKE_NVML_SCRIPT", "PYTHONPATH", "CUDA_VISIBLE_DEVICES")

TWO_GPUS = {
    "driver_version": "550.54.15",
    "gpus": [
        {"name": "NVIDIA A100-SXM4-80GB", "total_mb": 81920, "used_mb": 1024},
        {"name": "NVIDIA RTX A6000", "total_mb": 49140, "used_mb": 300},
    ],
}
FIRST_GPU_LOST = {"gpus": [{"name": "NVIDIA A100-SXM4-80GB", "used_mb": "raise:GPU_IS_LOST"},
                           {"name": "NVIDIA RTX A6000", "total_mb": 49140, "used_mb": 300}]}


@dataclass(frozen=True)
class Run:
    tmp: Path                 # the run's own directory (cwd, HF_HOME under it)
    env: dict                 # what the scenario added to the environment
    done: subprocess.CompletedProcess

    @property
    def stdout(self) -> str:
        return self.done.stdout


def run_doctor(tmp_path: Path, args: tuple = (), env: dict | None = None,
               fake_gpus: dict | None = None) -> subprocess.CompletedProcess:
    """`python test_setup.py ARGS` in `tmp_path` with a private HF_HOME; with `fake_gpus`
    (a fake-NVML script) the fake pynvml comes first on PYTHONPATH."""
    full_env = {k: v for k, v in os.environ.items() if k not in _SCRUBBED_ENV}
    full_env["HF_HOME"] = str(tmp_path / "hf_home")
    full_env["HF_ENDPOINT"] = "http://127.0.0.1:9"   # the hub check stays on loopback (no answer)
    if fake_gpus is not None:
        script = tmp_path / "nvml_script.json"
        script.write_text(json.dumps(fake_gpus))
        full_env["PYTHONPATH"] = str(FAKE_NVML_DIR)
        full_env["FAKE_NVML_SCRIPT"] = str(script)
    full_env.update(env or {})
    return subprocess.run([sys.executable, str(DOCTOR), *args], cwd=tmp_path, env=full_env,
                          capture_output=True, text=True, timeout=300)


def _random_hf_token(length: int = 30) -> str:
    """`hf_` + `length` random characters cycling digit, upper, lower: every 4-character
    piece mixes classes the way no word, path or version in the report does, so a match
    in the output can only be a leak."""
    classes = (string.digits, string.ascii_uppercase, string.ascii_lowercase)
    return "hf_" + "".join(secrets.choice(classes[i % 3]) for i in range(length))


def _leaked_pieces(token: str, text: str, size: int = 4) -> list[str]:
    # any leaked substring of >= 4 characters contains a leaked 4-character one
    return [token[i:i + size] for i in range(len(token) - size + 1) if token[i:i + size] in text]


def _token_file_and_offline(tmp: Path) -> dict:
    (tmp / "hf_home").mkdir()
    (tmp / "hf_home" / "token").write_text(_random_hf_token())  # where `hf auth login` puts it
    return {"env": {"HF_HUB_OFFLINE": "1"}}


def _output_dir_under_a_file(tmp: Path) -> dict:
    (tmp / "a_file").write_text("not a directory\n")
    return {"args": ("--output_dir", str(tmp / "a_file" / "results"))}


def _slurm_path_without_sbatch(tmp: Path) -> dict:
    bin_dir = tmp / "bin"  # a PATH with the other Slurm commands but no sbatch
    bin_dir.mkdir()
    for command in ("squeue", "scontrol"):
        if shutil.which(command):
            (bin_dir / command).symlink_to(shutil.which(command))
    return {"args": ("--slurm",), "env": {"PATH": str(bin_dir)}}


# scenario name -> prepare(tmp) returning run_doctor's keyword arguments
SCENARIOS = {
    "no_gpu": lambda tmp: {},  # this machine as it is, default --output_dir results/
    "two_fake_gpus": lambda tmp: {"fake_gpus": TWO_GPUS},
    "first_fake_gpu_lost": lambda tmp: {"fake_gpus": FIRST_GPU_LOST},
    "hf_token_env": lambda tmp: {"env": {"HF_TOKEN": _random_hf_token()}},
    "json_with_hf_token_env": lambda tmp: {"args": ("--json",),
                                           "env": {"HF_TOKEN": _random_hf_token()}},
    "hf_token_file_offline": _token_file_and_offline,
    "output_dir_under_a_file": _output_dir_under_a_file,
    "slurm_without_sbatch": _slurm_path_without_sbatch,
}


def scenario(name: str):
    """Marks the test as reading the run of scenario `name` (via the `doctor` fixture)."""
    assert name in SCENARIOS, name

    def mark(test):
        test.doctor_scenario = name
        return test
    return mark


@pytest.fixture(scope="module")
def doctor(request, tmp_path_factory):
    """`doctor(name) -> Run`; the first call starts every scenario the selected tests use."""
    wanted = {getattr(getattr(item, "function", None), "doctor_scenario", None)
              for item in request.session.items} & SCENARIOS.keys()
    pool = ThreadPoolExecutor(max_workers=2)
    started: dict[str, tuple] = {}

    def start(name):
        tmp = tmp_path_factory.mktemp(name)
        kwargs = SCENARIOS[name](tmp)
        started[name] = (tmp, kwargs.get("env", {}), pool.submit(run_doctor, tmp, **kwargs))

    def get(name: str) -> Run:
        if not started:
            for each in sorted(wanted):
                start(each)
        if name not in started:
            start(name)
        tmp, env, future = started[name]
        return Run(tmp, env, future.result())

    yield get
    pool.shutdown(wait=True, cancel_futures=True)


def check_lines(stdout: str) -> list[str]:
    return stdout.strip().splitlines()[:-1]  # the last line is the counts


def line_of(stdout: str, name: str) -> str:
    matches = [line for line in check_lines(stdout) if line.split()[1:] and
               " ".join(line.split()[1:1 + len(name.split())]) == name]
    assert len(matches) == 1, f"no single line for check {name!r} in:\n{stdout}"
    return matches[0]


# ------------------------------------------------------------------ the machine as it is

@scenario("no_gpu")
def test_on_a_machine_without_gpu_reports_cpu_mode_and_exits_0(doctor):
    run = doctor("no_gpu")

    assert run.done.returncode == 0, run.stdout + run.done.stderr
    lines = check_lines(run.stdout)
    assert len(lines) >= 10
    for line in lines:
        assert line.split()[0] in STATUSES, line
    assert re.fullmatch(r"\d+ OK, \d+ WARN, 0 FAIL: ready.*", run.stdout.strip().splitlines()[-1])
    assert "no CUDA: models will be analysed on CPU" in line_of(run.stdout, "torch cuda")
    nvml = line_of(run.stdout, "nvml")
    assert nvml.startswith("WARN")
    assert "NVML not available" in nvml and "CPU mode (--cpu_workers N)" in nvml
    assert "Traceback" not in run.done.stderr
    # the write test leaves no results/ behind when there was none
    assert f"{run.tmp / 'results'} is writable" in line_of(run.stdout, "output dir")
    assert not (run.tmp / "results").exists()


@scenario("json_with_hf_token_env")
def test_json_output_has_every_requirement_the_exit_status_and_no_token(doctor):
    run = doctor("json_with_hf_token_env")

    report = json.loads(run.stdout)  # stdout is the JSON document and nothing else
    assert {c["status"] for c in report["checks"]} <= set(STATUSES)
    checked = {c["name"].removeprefix("package ") for c in report["checks"]
               if c["name"].startswith("package ")}
    required = {r.name for r in test_setup.read_requirements(REPO_ROOT / "requirements.txt")}
    assert checked == required
    assert report["counts"]["FAIL"] == 0 and report["ok"] is True and run.done.returncode == 0
    hf = next(c for c in report["checks"] if c["name"] == "hf token")
    assert hf["status"] == "OK" and hf["finding"].startswith("configured")
    assert hf["details"] == {"configured": True}
    token = run.env["HF_TOKEN"]
    assert _leaked_pieces(token, run.stdout) == []
    assert _leaked_pieces(token, run.done.stderr) == []


# ------------------------------------------------------------------ GPUs through fake NVML

@scenario("two_fake_gpus")
def test_fake_nvml_with_two_gpus_lists_both_with_memory_in_mb(doctor):
    run = doctor("two_fake_gpus")

    assert run.done.returncode == 0, run.stdout + run.done.stderr
    assert "driver 550.54.15, 2 GPU(s), 2 readable" in line_of(run.stdout, "nvml")
    gpu0, gpu1 = line_of(run.stdout, "gpu 0"), line_of(run.stdout, "gpu 1")
    assert gpu0.startswith("OK") and "NVIDIA A100-SXM4-80GB" in gpu0
    assert "1024 / 81920 MB used" in gpu0 and "busy" in gpu0
    assert gpu1.startswith("OK") and "NVIDIA RTX A6000" in gpu1
    assert "300 / 49140 MB used" in gpu1 and "free" in gpu1
    # NVML sees GPUs, the installed torch is the CPU build: that mismatch is pointed out
    assert "torch has no CUDA" in line_of(run.stdout, "gpu vs torch")


@scenario("first_fake_gpu_lost")
def test_nvml_error_on_one_gpu_marks_it_unavailable_and_still_lists_the_other(doctor):
    run = doctor("first_fake_gpu_lost")

    assert run.done.returncode == 0, run.stdout + run.done.stderr
    assert "Traceback" not in run.done.stderr
    gpu0 = line_of(run.stdout, "gpu 0")
    assert gpu0.startswith("WARN") and "unavailable" in gpu0 and "GPU is lost" in gpu0
    gpu1 = line_of(run.stdout, "gpu 1")
    assert gpu1.startswith("OK") and "300 / 49140 MB used" in gpu1
    assert "2 GPU(s), 1 readable" in line_of(run.stdout, "nvml")


# ------------------------------------------------------------------ HuggingFace token

@scenario("hf_token_env")
def test_hf_token_is_reported_configured_without_any_part_of_it(doctor):
    run = doctor("hf_token_env")
    token = run.env["HF_TOKEN"]

    line = line_of(run.stdout, "hf token")
    assert line.startswith("OK") and line.split()[3] == "configured"
    assert _leaked_pieces(token, run.stdout) == []
    assert _leaked_pieces(token, run.done.stderr) == []
    assert str(len(token)) not in line  # not even its length


@scenario("hf_token_file_offline")
def test_hf_token_file_and_offline_mode_are_reported(doctor):
    run = doctor("hf_token_file_offline")
    token = (run.tmp / "hf_home" / "token").read_text()

    assert "configured (from the token file)" in line_of(run.stdout, "hf token")
    assert line_of(run.stdout, "hf offline").startswith("WARN")
    assert "offline mode" in line_of(run.stdout, "hf offline")
    assert str(run.tmp / "hf_home" / "hub") in line_of(run.stdout, "hf cache")
    assert _leaked_pieces(token, run.stdout + run.done.stderr) == []
    assert run.done.returncode == 0


# ------------------------------------------------------------------ output dir, Slurm

@scenario("output_dir_under_a_file")
def test_unwritable_output_dir_fails_and_the_hint_names_the_directory(doctor):
    run = doctor("output_dir_under_a_file")
    blocker = run.tmp / "a_file"

    assert run.done.returncode != 0
    line = line_of(run.stdout, "output dir")
    assert line.startswith("FAIL")
    finding, _, hint = line.partition("  -> ")
    assert str(blocker / "results") in hint
    assert f"{blocker} is a file" in finding
    assert blocker.read_text() == "not a directory\n"
    assert run.stdout.strip().splitlines()[-1].endswith("fix the FAIL lines, then run again")


@scenario("slurm_without_sbatch")
def test_slurm_without_sbatch_on_path_fails_naming_sbatch(doctor):
    run = doctor("slurm_without_sbatch")

    assert run.done.returncode != 0
    sbatch = line_of(run.stdout, "slurm sbatch")
    assert sbatch.startswith("FAIL") and "sbatch not found on PATH" in sbatch
    assert line_of(run.stdout, "slurm sinfo").startswith("WARN")
    assert "Traceback" not in run.done.stderr


# ------------------------------------------------------------------ in-process rules

def test_version_rules_fail_when_too_old_and_warn_when_newer_than_a_pin():
    Req = test_setup.Requirement
    assert test_setup._version_problem("2.13.0+cpu", Req("torch", "==", "2.13.0")) is None
    assert test_setup._version_problem("4.45.0", Req("transformers", ">=", "4.45")) is None
    assert test_setup._version_problem("4.9.1", Req("transformers", ">=", "4.45"))[0] == "FAIL"
    assert test_setup._version_problem("2.12.1+cu121", Req("torch", "==", "2.13.0"))[0] == "FAIL"
    assert test_setup._version_problem("2.14.0", Req("torch", "==", "2.13.0"))[0] == "WARN"


def test_missing_or_too_old_package_fails_with_the_install_hint(tmp_path):
    requirements = tmp_path / "requirements.txt"
    requirements.write_text("# comment\n-r other.txt\nnumpy>=999.0\n"
                            "no-such-package-esd-doctor>=1.0\nfilelock\n")

    checks = {c.name: c for c in test_setup.check_required_packages(requirements)}

    assert checks["package numpy"].status == "FAIL" and "too old" in checks["package numpy"].finding
    missing = checks["package no-such-package-esd-doctor"]
    assert missing.status == "FAIL" and "not installed" in missing.finding
    assert missing.hint == "pip install -r requirements.txt"
    assert checks["package filelock"].status == "OK"


def test_importing_the_doctor_runs_nothing_and_defines_no_test_functions():
    done = subprocess.run([sys.executable, "-c", "import test_setup, sys; "
                           "print(sorted(m for m in ('torch', 'pynvml', 'huggingface_hub') "
                           "if m in sys.modules))"],
                          cwd=REPO_ROOT, capture_output=True, text=True, timeout=60)
    assert done.stdout.strip() == "[]" and done.stderr == ""
    assert not [name for name in vars(test_setup) if name.startswith("test")]


# ------------------------------------------------------------------ finding and printing packages

def test_pytest_xdist_is_found_by_its_module_xdist():
    import importlib.metadata
    pytest.importorskip("xdist")
    (check,) = [c for c in test_setup.check_optional_packages() if c.name == "optional pytest-xdist"]
    assert check.status == "OK" and check.finding == importlib.metadata.version("pytest-xdist")


def test_the_package_checks_import_no_package():
    done = subprocess.run([sys.executable, "-c", "import sys, test_setup; "
                           "checks = test_setup.check_required_packages(); "
                           "print(sorted(m for m in ('torch', 'transformers', 'peft', 'pandas') if m in sys.modules), "
                           "[c.status for c in checks if c.name == 'package torch'])"],
                          cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
    assert done.stdout.strip() == "[] ['OK']", done.stdout + done.stderr


def test_each_check_line_is_printed_as_its_check_ends(tmp_path):
    """`sbatch --version` (the last checks) waits until the test has read every line before it:
    a doctor that prints at the end would make it wait until its 15 s timeout, answerless."""
    bin_dir, go = tmp_path / "bin", tmp_path / "go"
    bin_dir.mkdir()
    (bin_dir / "sbatch").write_text(f"#!/bin/sh\nwhile [ ! -e '{go}' ]; do sleep 0.05; done\necho 'slurm 99.1'\n")
    (bin_dir / "sbatch").chmod(0o755)
    env = {k: v for k, v in os.environ.items() if k not in _SCRUBBED_ENV}
    env.update(HF_HOME=str(tmp_path / "hf_home"), HF_ENDPOINT="http://127.0.0.1:9",
               PATH=os.pathsep.join([str(bin_dir), os.environ.get("PATH", "")]))
    proc = subprocess.Popen([sys.executable, str(DOCTOR), "--slurm"], cwd=tmp_path, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    early = []
    while not early or early[-1].split()[1:3] != ["output", "dir"]:  # the check before Slurm's
        line = proc.stdout.readline()
        assert line, "".join(early)
        early.append(line)
    go.write_text("")
    rest, _ = proc.communicate(timeout=300)
    assert [line.split()[1] for line in early[:2]] == ["python", "package"]
    assert "slurm 99.1" in line_of(rest, "slurm sbatch"), "".join(early) + rest
