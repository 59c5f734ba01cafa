"""gputracker: run commands on GPUs that stay free, safely shared between users.

Knows processes and GPUs, nothing about models. Modules: ``nvml`` (the one NVML wrapper),
``locks`` (cross-process GPU claims), ``dispatcher`` (grant rule, launching, cleanup),
``metrics`` (gpu_metrics.json), ``commands`` (shell-free command lines), ``signals``,
``legacy`` (``DispatchThread`` for old scripts) and ``__main__`` (the CLI).
"""
from .dispatcher import Dispatcher, Job, JobResult
from .legacy import DispatchThread
from .locks import DEFAULT_LOCK_DIR, LOCK_DIR_ENV
from .signals import install_signal_handlers

__all__ = ["Dispatcher", "Job", "JobResult", "DispatchThread", "install_signal_handlers",
           "DEFAULT_LOCK_DIR", "LOCK_DIR_ENV"]
