"""The setup doctor (`python test_setup.py`), run as a user runs it: a real subprocess.

GPUs cannot exist here, so NVML is the fake of the *library* (`tests/fake_nvml/pynvml.py`,
scripted by `$FAKE_NVML_SCRIPT`) put first on PYTHONPATH; everything else is real: the
installed packages, huggingface_hub reading the token, the file system, the Slurm commands.
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
from pathlib import Path


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


def run_doctor(tmp_path: Path, *args: str, env: dict | None = None, fake_gpus: dict | None = None,
               cwd: Path | None = None) -> subprocess.CompletedProcess:
    """`python test_setup.py ARGS` with a private HF_HOME; with `fake_gpus` (a fake-NVML
    script) the fake pynvml comes first on PYTHONPATH."""
    full_env = {k: v for k, v in os.environ.items() if k not in _SCRUBBED_ENV}
    full_env["HF_HOME"] = str(tmp_path / "hf_home")
    if fake_gpus is not None:
        script = tmp_path / "nvml_script.json"
        script.write_text(json.dumps(fake_gpus))
        full_env["PYTHONPATH"] = str(FAKE_NVML_DIR)
        full_env["FAKE_NVML_SCRIPT"] = str(script)
    full_env.update(env or {})
    return subprocess.run([sys.executable, str(DOCTOR), *args], cwd=cwd or tmp_path, env=full_env,
                          capture_output=True, text=True, timeout=120)


def check_lines(stdout: str) -> list[str]:
    return stdout.strip().splitlines()[:-1]  # the last line is the counts


def line_of(stdout: str, name: str) -> str:
    matches = [line for line in check_lines(stdout) if line.split()[1:] and
               " ".join(line.split()[1:1 + len(name.split())]) == name]
    assert len(matches) == 1, f"no single line for check {name!r} in:\n{stdout}"
    return matches[0]


# ------------------------------------------------------------------ the machine as it is

def test_on_a_machine_without_gpu_reports_cpu_mode_and_exits_0(tmp_path):
    done = run_doctor(tmp_path)  # default --output_dir results/, relative to cwd

    assert done.returncode == 0, done.stdout + done.stderr
    lines = check_lines(done.stdout)
    assert len(lines) >= 10
    for line in lines:
        assert line.split()[0] in STATUSES, line
    assert "no CUDA: models will be analysed on CPU" in line_of(done.stdout, "torch cuda")
    nvml = line_of(done.stdout, "nvml")
    assert nvml.startswith("WARN")
    assert "NVML not available" in nvml and "CPU mode (--cpu_workers N)" in nvml
    assert re.fullmatch(r"\d+ OK, \d+ WARN, 0 FAIL: ready.*", done.stdout.strip().splitlines()[-1])
    assert "Traceback" not in done.stderr
    # the write test leaves no results/ behind when there was none
    assert "results is writable" in line_of(done.stdout, "output dir")
    assert not (tmp_path / "results").exists()


# ------------------------------------------------------------------ GPUs through fake NVML

TWO_GPUS = {
    "driver_version": "550.54.15",
    "gpus": [
        {"name": "NVIDIA A100-SXM4-80GB", "total_mb": 81920, "used_mb": 1024},
        {"name": "NVIDIA RTX A6000", "total_mb": 49140, "used_mb": 300},
    ],
}


def test_fake_nvml_with_two_gpus_lists_both_with_memory_in_mb(tmp_path):
    done = run_doctor(tmp_path, fake_gpus=TWO_GPUS)

    assert done.returncode == 0, done.stdout + done.stderr
    assert "driver 550.54.15, 2 GPU(s), 2 readable" in line_of(done.stdout, "nvml")
    gpu0, gpu1 = line_of(done.stdout, "gpu 0"), line_of(done.stdout, "gpu 1")
    assert gpu0.startswith("OK") and "NVIDIA A100-SXM4-80GB" in gpu0
    assert "1024 / 81920 MB used" in gpu0 and "busy" in gpu0
    assert gpu1.startswith("OK") and "NVIDIA RTX A6000" in gpu1
    assert "300 / 49140 MB used" in gpu1 and "free" in gpu1
    # NVML sees GPUs, the installed torch is the CPU build: that mismatch is pointed out
    assert "torch has no CUDA" in line_of(done.stdout, "gpu vs torch")


def test_nvml_error_on_one_gpu_marks_it_unavailable_and_still_lists_the_other(tmp_path):
    script = {"gpus": [{"name": "NVIDIA A100-SXM4-80GB", "used_mb": "raise:GPU_IS_LOST"},
                       {"name": "NVIDIA RTX A6000", "total_mb": 49140, "used_mb": 300}]}

    done = run_doctor(tmp_path, fake_gpus=script)

    assert done.returncode == 0, done.stdout + done.stderr
    assert "Traceback" not in done.stderr
    gpu0 = line_of(done.stdout, "gpu 0")
    assert gpu0.startswith("WARN") and "unavailable" in gpu0 and "GPU is lost" in gpu0
    gpu1 = line_of(done.stdout, "gpu 1")
    assert gpu1.startswith("OK") and "300 / 49140 MB used" in gpu1
    assert "2 GPU(s), 1 readable" in line_of(done.stdout, "nvml")


# ------------------------------------------------------------------ HuggingFace token

def _random_hf_token(length: int = 30) -> str:
    """`hf_` + `length` random characters cycling digit, upper, lower: every 4-character
    piece mixes classes the way no word, path or version in the report does, so a match
    in the output can only be a leak."""
    classes = (string.digits, string.ascii_uppercase, string.ascii_lowercase)
    return "hf_" + "".join(secrets.choice(classes[i % 3]) for i in range(length))


def _leaked_pieces(token: str, text: str, size: int = 4) -> list[str]:
    # any leaked substring of >= 4 characters contains a leaked 4-character one
    return [token[i:i + size] for i in range(len(token) - size + 1) if token[i:i + size] in text]


def test_hf_token_is_reported_configured_without_any_part_of_it(tmp_path):
    token = _random_hf_token()

    done = run_doctor(tmp_path, env={"HF_TOKEN": token})

    line = line_of(done.stdout, "hf token")
    assert line.startswith("OK") and line.split()[3] == "configured"
    assert _leaked_pieces(token, done.stdout) == []
    assert _leaked_pieces(token, done.stderr) == []
    assert str(len(token)) not in line  # not even its length


def test_json_output_has_every_requirement_the_exit_status_and_no_token(tmp_path):
    token = _random_hf_token()

    done = run_doctor(tmp_path, "--json", env={"HF_TOKEN": token})

    report = json.loads(done.stdout)  # stdout is the JSON document and nothing else
    assert {c["status"] for c in report["checks"]} <= set(STATUSES)
    checked = {c["name"].removeprefix("package ") for c in report["checks"]
               if c["name"].startswith("package ")}
    required = {r.name for r in test_setup.read_requirements(REPO_ROOT / "requirements.txt")}
    assert checked == required
    assert report["counts"]["FAIL"] == 0 and report["ok"] is True and done.returncode == 0
    hf = next(c for c in report["checks"] if c["name"] == "hf token")
    assert hf["status"] == "OK" and hf["finding"].startswith("configured")
    assert hf["details"] == {"configured": True}
    assert _leaked_pieces(token, done.stdout) == []
    assert _leaked_pieces(token, done.stderr) == []


def test_hf_token_file_and_offline_mode_are_reported(tmp_path):
    token = _random_hf_token()
    (tmp_path / "hf_home").mkdir()
    (tmp_path / "hf_home" / "token").write_text(token)  # where `hf auth login` stores it

    done = run_doctor(tmp_path, env={"HF_HUB_OFFLINE": "1"})

    assert "configured (from the token file)" in line_of(done.stdout, "hf token")
    assert line_of(done.stdout, "hf offline").startswith("WARN")
    assert "offline mode" in line_of(done.stdout, "hf offline")
    assert str(tmp_path / "hf_home" / "hub") in line_of(done.stdout, "hf cache")
    assert _leaked_pieces(token, done.stdout + done.stderr) == []
    assert done.returncode == 0


# ------------------------------------------------------------------ output dir, Slurm

def test_unwritable_output_dir_fails_and_the_hint_names_the_directory(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a directory\n")
    output_dir = blocker / "results"

    done = run_doctor(tmp_path, "--output_dir", str(output_dir))

    assert done.returncode != 0
    line = line_of(done.stdout, "output dir")
    assert line.startswith("FAIL")
    finding, _, hint = line.partition("  -> ")
    assert str(output_dir) in hint
    assert f"{blocker} is a file" in finding
    assert blocker.read_text() == "not a directory\n"
    assert done.stdout.strip().splitlines()[-1].endswith("fix the FAIL lines, then run again")


def test_slurm_without_sbatch_on_path_fails_naming_sbatch(tmp_path):
    bin_dir = tmp_path / "bin"  # a PATH with the other Slurm commands but no sbatch
    bin_dir.mkdir()
    for command in ("squeue", "scontrol"):
        if shutil.which(command):
            (bin_dir / command).symlink_to(shutil.which(command))

    done = run_doctor(tmp_path, "--slurm", env={"PATH": str(bin_dir)})

    assert done.returncode != 0
    sbatch = line_of(done.stdout, "slurm sbatch")
    assert sbatch.startswith("FAIL") and "sbatch not found on PATH" in sbatch
    assert line_of(done.stdout, "slurm sinfo").startswith("WARN")
    assert "Traceback" not in done.stderr


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
