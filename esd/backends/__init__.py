"""Where worker tasks run, and the one table of backends.

`base.py` is the interface (`Backend`, `Task`, `TaskResult`, the `Ending` kinds); `local.py`
runs tasks on this machine's GPUs or CPU slots (gputracker); `array.py` runs them as job
arrays of a batch scheduler, whose hooks a scheduler module fills (`slurm.py`). The
supervisor above (`esd/supervisor.py`) gives every backend retries, timeouts, the stall
watchdog and failure records without any code of its own.

Owns: `BACKENDS`, the table from which `--backend`'s choices, its help and each backend's
construction follow. A new scheduler (PBS, …) is one module with a `Scheduler` subclass and a
`from_config(config, worker_script)`, plus one row here. Importing this package imports no
backend module: a row names its module, imported when the backend is chosen.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass
from pathlib import Path

from esd.backends.base import Backend, BackendError, Ending, Hooks, Task, TaskResult


@dataclass(frozen=True)
class BackendRow:
    name: str                     # the `--backend` choice
    summary: str                  # one line for --help
    module: str                   # defines `from_config(config, worker_script) -> Backend`
    options: tuple[str, ...] = ()  # the experiment options (flags) it reads


BACKENDS: dict[str, BackendRow] = {row.name: row for row in (
    BackendRow("local", "this machine's free GPUs, or CPU slots", "esd.backends.local",
               ("gpus", "cpu_workers", "num_gpus_per_job", "gpu_memory_threshold", "max_check",
                "poll_interval")),
    BackendRow("slurm", "a Slurm job array (sbatch); --wait follows it to its end", "esd.backends.slurm",
               ("slurm_partition", "slurm_time", "slurm_gres", "slurm_array_parallelism", "slurm_extra",
                "wait")),
)}


def backend_names() -> list[str]:
    return list(BACKENDS)


def backends_help() -> str:
    """`--backend`'s help: each choice and what it is."""
    return "where workers run: " + "; ".join(f"{row.name}: {row.summary}" for row in BACKENDS.values())


def make_backend(config, worker_script: Path) -> Backend:
    """The backend `config.backend` names, built from the config by its module; BackendError
    names what is wrong."""
    row = BACKENDS.get(config.backend)
    if row is None:
        raise BackendError(f"unknown backend {config.backend!r}; valid backends: {backend_names()}")
    return importlib.import_module(row.module).from_config(config, worker_script)


__all__ = ["Backend", "BackendError", "BackendRow", "BACKENDS", "Ending", "Hooks", "Task", "TaskResult",
           "backend_names", "backends_help", "make_backend"]
