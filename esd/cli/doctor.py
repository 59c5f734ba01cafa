"""The setup doctor: `python test_setup.py [--output_dir DIR] [--slurm] [--json]`.

The first command a new user runs. It checks, one line each, what a run of the experiment
needs: Python, the packages of requirements.txt at their minimum versions, torch and CUDA,
the GPUs NVML sees, the HuggingFace token (configured or not -- never any part of it), the
hub cache and its free disk, that the output directory is writable, and with `--slurm` the
Slurm commands. Each check says OK / WARN / FAIL, what it found and, when not OK, what to
do; the exit status is non-zero iff a check FAILs. `--json` prints the same for scripts.

Owns: the `Check` result and one `check_*` function per concern; `iter_checks()` makes them
one by one (the report prints each line as its check ends: a loaded machine takes most of
a minute to import torch, and only the checks that need torch import it); `run_checks()`
collects them.
Must not: change anything it inspects (the output directory is created for the write test
only if missing, and removed again), print a secret, or run work at import time. Despite
its historical name this is not a pytest module (pytest.ini collects `tests/` only) and it
defines no `test_*` functions.
"""
from __future__ import annotations

import argparse
import contextlib
import logging
import importlib
import importlib.metadata
import importlib.util
import io
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Iterator

from esd.units import GB as BYTES_PER_GB   # the one GB of the project: 10^9 bytes

OK, WARN, FAIL = "OK", "WARN", "FAIL"
STATUSES = (OK, WARN, FAIL)

MIN_PYTHON = (3, 10)
MIN_FREE_CACHE_GB = 20.0  # a 7B model in bf16 is ~15 GB of safetensors
DEFAULT_GPU_MEMORY_THRESHOLD_MB = 500  # run_esd_experiment.py --gpu_memory_threshold default
SLURM_COMMANDS = ("sbatch", "squeue", "scontrol")
COMMAND_TIMEOUT_S = 15

REPO_DIR = Path(__file__).resolve().parents[2]   # a checkout (installed: no requirements files)
REQUIREMENTS = REPO_DIR / "requirements.txt"
TEST_REQUIREMENTS = REPO_DIR / "requirements-test.txt"
INSTALL_HINT = "pip install -r requirements.txt"
TEST_INSTALL_HINT = "pip install -r requirements-test.txt (needed only to run the tests)"
CPU_MODE = "the experiment will run in CPU mode (--cpu_workers N)"

# Distributions whose import name is not their normalised distribution name.
IMPORT_NAMES = {"nvidia-ml-py": "pynvml", "pyyaml": "yaml", "pillow": "PIL",
                "scikit-learn": "sklearn"}


@dataclass(frozen=True)
class Check:
    """One finding. `details` carries machine-readable facts for `--json` (never secrets)."""

    status: str  # OK / WARN / FAIL
    name: str
    finding: str
    hint: str = ""
    details: dict = field(default_factory=dict)


@dataclass(frozen=True)
class Requirement:
    """One line of a requirements file: `name`, operator (`>=`, `==`, ...) and version."""

    name: str
    op: str = ""
    version: str = ""

    @property
    def import_name(self) -> str:
        key = _normalise(self.name)
        return IMPORT_NAMES.get(key, key.replace("-", "_"))

    def __str__(self) -> str:
        return f"{self.name}{self.op}{self.version}"


# --------------------------------------------------------------------------- requirements

_REQUIREMENT_LINE = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)\s*(?:\[[^\]]*\])?\s*"
                               r"(?:(==|>=|<=|~=|!=|>|<)\s*([^\s,;]+))?")


def read_requirements(path: Path) -> list[Requirement]:
    """The packages of a pip requirements file; `-r`/options, comments and markers skipped.

    Only the first version clause of a line is kept (our files use one); parsed by hand so
    the doctor works before `packaging` or anything else is installed.
    """
    requirements = []
    for raw in _requirement_lines(Path(path)):
        line = raw.split("#", 1)[0].strip()
        if not line or line.startswith("-"):
            continue
        match = _REQUIREMENT_LINE.match(line)
        if match:
            name, op, version = match.groups()
            requirements.append(Requirement(name, op or "", version or ""))
    return requirements


def _requirement_lines(path: Path) -> list[str]:
    """The lines of a requirements file; installed from a wheel, where the checkout's file is
    absent, requirements.txt's lines are the package's own dependencies (its metadata)."""
    if not path.exists() and path == REQUIREMENTS:
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            return [line.split(";", 1)[0] for line in importlib.metadata.requires("esd-experiment") or []]
    return path.read_text().splitlines()


def _normalise(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def version_tuple(version: str) -> tuple[int, ...]:
    """Release numbers of a version: `2.13.0+cpu` -> (2, 13, 0), `4.45.0rc1` -> (4, 45, 0)."""
    match = re.match(r"\s*v?(\d+(?:\.\d+)*)", version)
    return tuple(int(part) for part in match.group(1).split(".")) if match else ()


def _compare(found: str, wanted: str) -> int:
    a, b = version_tuple(found), version_tuple(wanted)
    width = max(len(a), len(b))
    a, b = a + (0,) * (width - len(a)), b + (0,) * (width - len(b))
    return (a > b) - (a < b)


def _version_problem(found: str, req: Requirement) -> tuple[str, str] | None:
    """(status, reason) when `found` does not meet `req`, None when it does.

    Older than a minimum or a pin is FAIL; newer than a pin is only WARN (the pin is what
    we test with, e.g. torch, whose CUDA build you install to match your driver)."""
    if not req.op or not found:
        return None
    cmp = _compare(found, req.version)
    if req.op in (">=", "==") and cmp < 0:
        kind = "minimum" if req.op == ">=" else "pinned version"
        return FAIL, f"too old: {found} < {kind} {req.version}"
    if req.op == "==" and cmp > 0:
        return WARN, f"newer than the tested pin {req.version}"
    satisfied = {">": cmp > 0, "<": cmp < 0, "<=": cmp <= 0, "!=": cmp != 0,
                 "~=": cmp >= 0}.get(req.op, True)
    return None if satisfied else (WARN, f"{found} does not satisfy {req.op}{req.version}")


def _installed_version(req: Requirement) -> str:
    try:
        return importlib.metadata.version(req.name)
    except importlib.metadata.PackageNotFoundError:
        return ""


def check_python() -> list[Check]:
    version = ".".join(map(str, sys.version_info[:3]))
    in_venv = sys.prefix != getattr(sys, "base_prefix", sys.prefix) or "CONDA_PREFIX" in os.environ
    finding = f"{version} ({sys.executable}{', virtual env' if in_venv else ''})"
    details = {"version": version, "executable": sys.executable}
    if sys.version_info[:2] < MIN_PYTHON:
        need = ".".join(map(str, MIN_PYTHON))
        return [Check(FAIL, "python", finding, f"use Python >= {need}", details)]
    return [Check(OK, "python", finding, details=details)]


def check_required_packages(requirements_path: Path = REQUIREMENTS) -> list[Check]:
    """Each package of requirements.txt imports and meets its minimum version."""
    try:
        requirements = read_requirements(requirements_path)
    except OSError as exc:
        return [Check(FAIL, "requirements", f"cannot read {requirements_path}: {exc.strerror}",
                      "run the doctor from a checkout of the repository")]
    return [_check_required_package(req) for req in requirements]


def _check_required_package(req: Requirement) -> Check:
    """Installed (by its distribution's metadata), its modules findable, at the right version;
    nothing is imported (torch alone takes most of a minute on a loaded machine; the checks
    that need torch import it)."""
    name = f"package {req.name}"
    found = _installed_version(req)
    missing = [m for m in _module_names(req) if not _findable(m)]
    if not found and missing:
        return Check(FAIL, name, f"not installed (need {req})", INSTALL_HINT)
    if missing:
        return Check(FAIL, name, f"{found} installed, but its module {missing[0]} cannot be found "
                     f"(a broken install; need {req})", INSTALL_HINT, {"version": found})
    details = {"version": found, "required": f"{req.op}{req.version}"}
    if not found:
        return Check(WARN, name, f"importable, version unknown (need {req})", INSTALL_HINT, details)
    problem = _version_problem(found, req)
    if problem:
        status, reason = problem
        return Check(status, name, f"{found}: {reason}", INSTALL_HINT, details)
    return Check(OK, name, found + (f" ({req.op}{req.version})" if req.op else ""),
                 details=details)


def _module_names(req: Requirement) -> list[str]:
    """The top-level modules a distribution installs, from its own metadata (`pytest-xdist`
    installs `xdist`, `PyYAML` installs `yaml`); the name's usual spelling when unknown."""
    names = sorted(module for module, dists in _distributions_of_modules().items()
                   if _normalise(req.name) in dists and module.isidentifier())
    return names[:1] or [req.import_name]


_MODULE_DISTRIBUTIONS: dict[str, set[str]] | None = None


def _distributions_of_modules() -> dict[str, set[str]]:
    global _MODULE_DISTRIBUTIONS
    if _MODULE_DISTRIBUTIONS is None:
        try:
            found = importlib.metadata.packages_distributions()
        except Exception:  # noqa: BLE001 - a damaged metadata directory: fall back to the names
            found = {}
        _MODULE_DISTRIBUTIONS = {module: {_normalise(d) for d in dists} for module, dists in found.items()}
    return _MODULE_DISTRIBUTIONS


def _findable(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def check_optional_packages(requirements_path: Path = TEST_REQUIREMENTS) -> list[Check]:
    """Test-only packages (pytest, pytest-xdist, weightwatcher): installed or WARN, found by
    their distribution's metadata (pytest-xdist's module is `xdist`); not imported (slow)."""
    try:
        requirements = read_requirements(requirements_path)
    except OSError:
        requirements = [Requirement("pytest", ">=", "8"), Requirement("weightwatcher")]
    return [_check_optional_package(req) for req in requirements]


def _check_optional_package(req: Requirement) -> Check:
    name = f"optional {req.name}"
    if not _installed_version(req) and not any(_findable(m) for m in _module_names(req)):
        return Check(WARN, name, f"not installed (need {req} to run the tests)", TEST_INSTALL_HINT)
    found = _installed_version(req)
    problem = _version_problem(found, req)
    if problem:
        return Check(WARN, name, f"{found}: {problem[1]}", TEST_INSTALL_HINT, {"version": found})
    return Check(OK, name, found or "installed", details={"version": found})


# --------------------------------------------------------------------------- torch, NVML

def check_torch_cuda() -> list[Check]:
    """torch's CUDA view: device count and names (CUDA indices), or CPU mode."""
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            import torch
    except Exception as exc:
        return [Check(FAIL, "torch cuda", f"cannot import torch: {_first_line(exc)}",
                      INSTALL_HINT)]
    build = f"torch {torch.__version__}, " + (
        f"CUDA {torch.version.cuda} build" if torch.version.cuda else "CPU-only build")
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        build += f", CUDA_VISIBLE_DEVICES={visible!r}"
    if not torch.cuda.is_available():
        hint = ("fine for small models; for GPUs install the torch build matching your "
                "driver (https://pytorch.org/get-started/locally/)")
        return [Check(WARN, "torch cuda", f"no CUDA: models will be analysed on CPU ({build})",
                      hint, {"cuda_device_count": 0})]
    count = torch.cuda.device_count()
    names = []
    for index in range(count):
        try:
            names.append(f"cuda:{index} {torch.cuda.get_device_name(index)}")
        except Exception as exc:
            names.append(f"cuda:{index} unreadable ({_first_line(exc)})")
    return [Check(OK, "torch cuda", f"{count} CUDA device(s): {'; '.join(names)} ({build})",
                  details={"cuda_device_count": count, "devices": names})]


def check_nvml() -> list[Check]:
    """The GPUs NVML sees (NVML indices, PCI bus order) with memory used/total in MB, asked
    through gputracker's NVML wrapper, the same reads the scheduler makes.

    NVML missing (no library, no driver) is a WARN: the experiment runs on CPU. An error on
    one GPU marks that GPU unavailable; the others are still listed."""
    from gputracker.nvml import Nvml
    quiet = logging.getLogger("test_setup.nvml")  # the wrapper's own warnings: said as checks
    quiet.addHandler(logging.NullHandler())
    quiet.propagate = False
    nvml = Nvml(logger=quiet)
    if not nvml.open():
        return [Check(WARN, "nvml", f"NVML not available ({nvml.unavailable_reason}): {CPU_MODE}",
                      "pip install nvidia-ml-py, and on a GPU server check the NVIDIA driver with "
                      "`nvidia-smi`; on a CPU-only machine nothing to do", {"gpu_count": 0})]
    try:
        return _nvml_gpus(nvml)
    finally:
        nvml.close()


def _nvml_gpus(nvml) -> list[Check]:
    count = nvml.device_count()
    driver = nvml.driver_version()
    driver = f"driver {driver}, " if driver else ""
    if count == 0:
        return [Check(WARN, "nvml", f"{driver}NVML sees no GPU: {CPU_MODE}",
                      "check `nvidia-smi` and the GPUs allocated to you", {"gpu_count": 0})]
    gpus = [_nvml_gpu(nvml, index) for index in range(count)]
    readable = sum(gpu.status == OK for gpu in gpus)
    summary = Check(OK, "nvml", f"{driver}{count} GPU(s), {readable} readable",
                    details={"gpu_count": count, "readable": readable})
    return [summary, *gpus]


def _nvml_gpu(nvml, index: int) -> Check:
    name = f"gpu {index}"
    info = nvml.gpu_info(index)
    used_mb = nvml.memory_used_mb(index) if info is not None else None
    if info is None or used_mb is None:
        reason = _first_line(nvml.read_errors.get(index, "")) or "unreadable"
        return Check(WARN, name, f"unavailable: NVML error ({reason})",
                     "check this GPU with `nvidia-smi`; the scheduler skips it while NVML "
                     "cannot read it", {"index": index, "available": False})
    busy = used_mb >= DEFAULT_GPU_MEMORY_THRESHOLD_MB
    state = (f"busy (over the default {DEFAULT_GPU_MEMORY_THRESHOLD_MB} MB threshold)"
             if busy else "free")
    return Check(OK, name, f"{info.name}, {used_mb:.0f} / {info.memory_total_mb:.0f} MB used, {state}",
                 details={"index": index, "available": True, "name": info.name,
                          "memory_used_mb": round(used_mb, 1),
                          "memory_total_mb": round(info.memory_total_mb, 1)})


def check_gpu_consistency(checks: list[Check]) -> list[Check]:
    """NVML sees GPUs but torch has no CUDA: the classic CPU-only torch on a GPU server."""
    nvml_gpus = max((c.details.get("gpu_count", 0) for c in checks if c.name == "nvml"),
                    default=0)
    cuda_devices = max((c.details.get("cuda_device_count", 0) for c in checks
                        if c.name == "torch cuda"), default=0)
    if nvml_gpus and not cuda_devices:
        return [Check(WARN, "gpu vs torch", f"NVML sees {nvml_gpus} GPU(s) but torch has no "
                      "CUDA: workers would run on CPU",
                      "install the torch build for your driver after requirements.txt "
                      "(https://pytorch.org/get-started/locally/)")]
    return []


# --------------------------------------------------------------------------- HuggingFace

def check_hf_token() -> list[Check]:
    """Whether a token is configured. Only a yes/no and where it comes from is printed."""
    try:
        import huggingface_hub
        configured = bool(huggingface_hub.get_token())  # the token itself is not kept
    except Exception as exc:
        # type name only: an exception message is not trusted to be free of the token
        return [Check(WARN, "hf token", f"cannot check ({type(exc).__name__})", INSTALL_HINT)]
    if not configured:
        return [Check(WARN, "hf token", "not configured (public models only)",
                      "gated models (e.g. meta-llama/*) need one: `hf auth login` "
                      "(older: `huggingface-cli login`) or export HF_TOKEN",
                      {"configured": False})]
    source = next((f"{var} environment variable" for var in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN")
                   if os.environ.get(var, "").strip()), "token file")
    return [Check(OK, "hf token", f"configured (from the {source})",
                  details={"configured": True})]


def check_hf_offline() -> list[Check]:
    try:
        from huggingface_hub import constants
        offline = bool(constants.HF_HUB_OFFLINE)
    except Exception as exc:
        return [Check(WARN, "hf offline", f"cannot check ({_first_line(exc)})", INSTALL_HINT)]
    offline = offline or os.environ.get("TRANSFORMERS_OFFLINE", "").strip().lower() in (
        "1", "on", "yes", "true")
    if offline:
        return [Check(WARN, "hf offline", "offline mode (HF_HUB_OFFLINE / TRANSFORMERS_OFFLINE): "
                      "only models already in the hub cache can be loaded",
                      "unset HF_HUB_OFFLINE and TRANSFORMERS_OFFLINE to download models",
                      {"offline": True})]
    return [Check(OK, "hf offline", "online: models are downloaded on demand",
                  details={"offline": False})]


HUB_PROBE_ID = "sentence-transformers/all-MiniLM-L6-v2"   # the demo's model


def check_hf_hub_reachable(timeout_s: float = 3.0) -> list[Check]:
    """Whether the hub answers (one HEAD, short timeout): online runs ask it about every model;
    when it does not answer, cached models are used at once and others fail (retryable)."""
    from urllib import error, request
    endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co").rstrip("/")
    offline = os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "on", "yes", "true")
    if offline:
        return [Check(OK, "hf hub reachable", f"not contacted (offline mode): {endpoint}",
                      details={"endpoint": endpoint, "reachable": None})]
    try:
        request.urlopen(request.Request(f"{endpoint}/api/models/{HUB_PROBE_ID}", method="HEAD"),
                        timeout=timeout_s).close()
    except error.HTTPError:
        pass  # any HTTP answer: the hub is there
    except (OSError, ValueError) as exc:
        reason = getattr(exc, "reason", exc)
        return [Check(WARN, "hf hub reachable", f"{endpoint} does not answer within "
                      f"{timeout_s:g}s ({_first_line(reason)})",
                      "models in the hub cache still run; on a machine without internet access "
                      "set HF_HUB_OFFLINE=1 (no hub requests at all)",
                      {"endpoint": endpoint, "reachable": False})]
    return [Check(OK, "hf hub reachable", f"{endpoint} answers",
                  details={"endpoint": endpoint, "reachable": True})]


def check_hf_cache(min_free_gb: float = MIN_FREE_CACHE_GB) -> list[Check]:
    """Where models are downloaded (HF_HUB_CACHE, under HF_HOME) and the free disk there."""
    try:
        from huggingface_hub import constants
        cache = Path(constants.HF_HUB_CACHE)
    except Exception as exc:
        return [Check(WARN, "hf cache", f"cannot locate ({_first_line(exc)})", INSTALL_HINT)]
    existing = _nearest_existing(cache)
    state = "exists" if cache.is_dir() else "will be created"
    try:
        free_gb = shutil.disk_usage(existing).free / BYTES_PER_GB
    except OSError as exc:
        return [Check(WARN, "hf cache", f"{cache} ({state}): cannot read free space "
                      f"({exc.strerror})", "set HF_HOME to a directory on a local disk")]
    finding = f"{cache} ({state}), {free_gb:.1f} GB free"
    details = {"path": str(cache), "free_gb": round(free_gb, 1)}
    if not os.access(existing, os.W_OK):
        return [Check(FAIL, "hf cache", f"{finding}, not writable: downloads will fail",
                      f"fix permissions of {existing} or set HF_HOME (or HF_HUB_CACHE) to a "
                      "directory you can write", details)]
    if free_gb < min_free_gb:
        return [Check(WARN, "hf cache", f"{finding}: under {min_free_gb:.0f} GB, large models "
                      "will not fit", "set HF_HOME (or HF_HUB_CACHE) to a disk with more space; "
                      "a 7B model needs ~15 GB", details)]
    return [Check(OK, "hf cache", finding, details=details)]


def _nearest_existing(path: Path) -> Path:
    path = path.absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


# --------------------------------------------------------------------------- output dir

def check_output_dir(output_dir: str | os.PathLike) -> list[Check]:
    """The output directory can be created and written: a temp file is written and deleted;
    directories created for the test are removed again."""
    path = Path(output_dir).expanduser().absolute()
    existed = path.is_dir()
    created: list[Path] = []
    hint = f"--output_dir {path}: choose a directory you can write to, or fix its permissions"
    try:
        for directory in _missing_directories(path):
            directory.mkdir()
            created.append(directory)
        with tempfile.NamedTemporaryFile(dir=path, prefix=".esd_doctor_") as probe:
            probe.write(b"ok\n")
            probe.flush()
        free_gb = shutil.disk_usage(path).free / BYTES_PER_GB
    except OSError as exc:
        blocker = _nearest_existing(path)
        reason = (f"{blocker} is a file, not a directory" if not blocker.is_dir()
                  else exc.strerror or str(exc))
        return [Check(FAIL, "output dir", f"{path} is not writable: {reason}", hint,
                      {"path": str(path)})]
    finally:
        for directory in reversed(created):
            with contextlib.suppress(OSError):
                directory.rmdir()
    state = "exists" if existed else "will be created by the run"
    return [Check(OK, "output dir", f"{path} is writable ({state}), {free_gb:.1f} GB free",
                  details={"path": str(path), "existed": existed})]


def _missing_directories(path: Path) -> list[Path]:
    """`path` and its missing ancestors, outermost first."""
    missing = []
    while not path.exists() and path != path.parent:
        missing.append(path)
        path = path.parent
    return list(reversed(missing))


# --------------------------------------------------------------------------- Slurm

def check_slurm_commands() -> list[Check]:
    """sbatch, squeue, scontrol on PATH (asked for with --slurm, so missing is FAIL)."""
    checks = []
    for command in SLURM_COMMANDS:
        where = shutil.which(command)
        if where is None:
            checks.append(Check(FAIL, f"slurm {command}", f"{command} not found on PATH",
                                "load Slurm (e.g. `module load slurm`) or use --backend local"))
            continue
        version = _run([where, "--version"])
        suffix = f" ({version[1].strip()})" if version and version[0] == 0 and version[1].strip() else ""
        checks.append(Check(OK, f"slurm {command}", f"{where}{suffix}"))
    return checks


def check_sinfo() -> list[Check]:
    """Partitions, their state and node states, if `sinfo` runs."""
    where = shutil.which("sinfo")
    if where is None:
        return [Check(WARN, "slurm sinfo", "sinfo not found on PATH: partitions unknown",
                      "load Slurm (e.g. `module load slurm`)")]
    result = _run([where, "--noheader", "--format=%P|%a|%D|%T"])
    if result is None or result[0] != 0:
        reason = "timed out or could not start" if result is None else \
            (_first_line(result[2]) or f"exit status {result[0]}")
        return [Check(WARN, "slurm sinfo", f"sinfo failed: {reason}",
                      "is the Slurm controller reachable? try `scontrol ping`")]
    partitions = summarise_sinfo(result[1])
    if not partitions:
        return [Check(WARN, "slurm sinfo", "sinfo lists no partition",
                      "ask your admin which partition to use (--slurm_partition)")]
    return [Check(OK, "slurm sinfo", "; ".join(partitions), details={"partitions": partitions})]


def summarise_sinfo(output: str) -> list[str]:
    """`debug*|up|2|idle` lines -> ["debug* (up): 2 idle, 1 mixed", ...]."""
    states: dict[tuple[str, str], list[str]] = {}
    for line in output.splitlines():
        parts = line.strip().split("|")
        if len(parts) != 4:
            continue
        partition, avail, nodes, state = parts
        states.setdefault((partition, avail), []).append(f"{nodes} {state}")
    return [f"{partition} ({avail}): {', '.join(nodes)}"
            for (partition, avail), nodes in states.items()]


def _run(argv: list[str]) -> tuple[int, str, str] | None:
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=COMMAND_TIMEOUT_S)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return done.returncode, done.stdout, done.stderr


# --------------------------------------------------------------------------- running

def _first_line(value) -> str:
    text = str(value).strip()
    return text.splitlines()[0] if text else ""


def _guarded(check: Callable[..., list[Check]], *args) -> list[Check]:
    """A check that raises is a FAIL of that check, never a crash of the doctor."""
    try:
        return check(*args)
    except Exception as exc:
        name = check.__name__.removeprefix("check_").replace("_", " ")
        return [Check(FAIL, name, f"the check itself failed: {type(exc).__name__}",
                      "please report this with the full output")]


def iter_checks(output_dir: str | os.PathLike = "results", slurm: bool = False) -> Iterator[Check]:
    """Every check, in the order a user fixes things, each as soon as it is made."""
    made: list[Check] = []
    steps: list[tuple] = [(check_python,), (check_required_packages,), (check_optional_packages,),
                          (check_torch_cuda,), (check_nvml,), (check_gpu_consistency, made),
                          (check_hf_token,), (check_hf_offline,), (check_hf_hub_reachable,),
                          (check_hf_cache,), (check_output_dir, output_dir)]
    if slurm:
        steps += [(check_slurm_commands,), (check_sinfo,)]
    for check, *args in steps:
        if check is check_required_packages or check is check_optional_packages:
            found = _per_requirement(check)   # one line per package as it is checked
        else:
            found = iter(_guarded(check, *args))
        for each in found:
            made.append(each)
            yield each


def _per_requirement(check: Callable[..., list[Check]]) -> Iterator[Check]:
    """check_required_packages / check_optional_packages one requirement at a time."""
    required = check is check_required_packages
    path = REQUIREMENTS if required else TEST_REQUIREMENTS
    try:
        requirements = read_requirements(path)
    except OSError:
        yield from _guarded(check)  # says it cannot read the file (or uses its fallback)
        return
    for req in requirements:
        try:
            yield _check_required_package(req) if required else _check_optional_package(req)
        except Exception as exc:  # noqa: BLE001 - as _guarded: that check fails, the doctor goes on
            yield Check(FAIL, f"package {req.name}", f"the check itself failed: {type(exc).__name__}",
                        "please report this with the full output")


def run_checks(output_dir: str | os.PathLike = "results", slurm: bool = False) -> list[Check]:
    """All checks, in the order a user fixes things."""
    return list(iter_checks(output_dir, slurm))


def count_statuses(checks: list[Check]) -> dict[str, int]:
    return {status: sum(c.status == status for c in checks) for status in STATUSES}


def format_check(check: Check, name_width: int = 24) -> str:
    line = f"{check.status:<4}  {check.name:<{name_width}} {check.finding}"
    return f"{line}  -> {check.hint}" if check.hint and check.status != OK else line


def format_report(checks: list[Check]) -> str:
    counts = count_statuses(checks)
    width = max((len(c.name) for c in checks), default=0) + 1
    verdict = ("fix the FAIL lines, then run again" if counts[FAIL]
               else "ready" + (" (see WARN lines)" if counts[WARN] else ""))
    lines = [format_check(c, width) for c in checks]
    lines.append(f"{counts[OK]} OK, {counts[WARN]} WARN, {counts[FAIL]} FAIL: {verdict}")
    return "\n".join(lines)


def format_json(checks: list[Check]) -> str:
    counts = count_statuses(checks)
    return json.dumps({"ok": counts[FAIL] == 0, "counts": counts,
                       "checks": [asdict(c) for c in checks]}, indent=2)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    from esd.cli_flags import FlagParser  # no abbreviations, "did you mean" (as every command)
    parser = FlagParser(
        description="Check that this machine is ready to run the ESD experiment.")
    parser.add_argument("--output_dir", "--output-dir", default="results",
                        help="output directory to test for writing (default: results/)")
    parser.add_argument("--slurm", action="store_true",
                        help="also check the Slurm commands (sbatch, squeue, scontrol, sinfo)")
    parser.add_argument("--json", action="store_true", help="print the results as JSON")
    return parser.parse_args(argv)


def name_width() -> int:
    """The width of the name column, known before any check runs (lines print as they come)."""
    names = ["gpu vs torch", "hf hub reachable", "slurm scontrol"]
    for prefix, path in (("package", REQUIREMENTS), ("optional", TEST_REQUIREMENTS)):
        with contextlib.suppress(OSError):
            names += [f"{prefix} {req.name}" for req in read_requirements(path)]
    return max(map(len, names)) + 1


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.json:
        checks = run_checks(args.output_dir, slurm=args.slurm)
        print(format_json(checks), flush=True)
    else:  # each line as its check ends: importing torch alone can take a minute
        checks, width = [], name_width()
        for check in iter_checks(args.output_dir, slurm=args.slurm):
            checks.append(check)
            print(format_check(check, width), flush=True)
        print(format_report(checks).splitlines()[-1], flush=True)
    return 1 if any(c.status == FAIL for c in checks) else 0


if __name__ == "__main__":
    sys.exit(main())
