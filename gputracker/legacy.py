"""``DispatchThread``: the old gputracker scripts' entry point, on top of ``Dispatcher``.

Same constructor as the tool in circulation, so old experiment scripts keep working; the
commands are now split with ``shlex`` and run without a shell (see ``commands.py``).
"""
from __future__ import annotations

import logging
import threading
from pathlib import Path

from .commands import parse_command
from .dispatcher import Dispatcher, Job, JobResult


class DispatchThread(threading.Thread):
    """Runs ``bash_command_list`` on free GPUs in a background thread: ``.start()``, ``.join()``.

    ``gpu_m_th`` is the memory threshold in MB, ``maxcheck`` the consecutive free polls before
    a GPU is granted, ``num_gpus_needed`` the GPUs per command. Each command's output goes to
    ``log_dir/job_NNNN.log`` when ``log_dir`` is given, else to this process's stdout/stderr
    (as with the old tool). Ctrl-C while the main thread is in ``join()`` stops the jobs;
    ``results`` holds the ``JobResult`` list afterwards.
    """

    def __init__(self, name, bash_command_list, logger=None, gpu_m_th=500, gpu_list=None, maxcheck=10,
                 num_gpus_needed=1, *, poll_interval_s=10.0, log_dir=None, lock_dir=None, cpu_slots=1,
                 timeout_s=None):
        super().__init__(name=name)
        self.logger = logger or logging.getLogger("gputracker")
        self.jobs = []
        for number, command in enumerate(bash_command_list):
            argv, env = parse_command(command, self.logger)
            log_path = None if log_dir is None else Path(log_dir) / f"job_{number:04d}.log"
            self.jobs.append(Job(f"job_{number:04d}", argv, log_path, timeout_s=timeout_s, env=env))
        self.dispatcher = Dispatcher(
            gpus=None if gpu_list is None else list(gpu_list), memory_threshold_mb=gpu_m_th,
            max_check=maxcheck, poll_interval_s=poll_interval_s, num_gpus_per_job=num_gpus_needed,
            cpu_slots=cpu_slots, lock_dir=lock_dir, logger=self.logger)
        self.results: list[JobResult] = []

    def run(self) -> None:
        self.results = self.dispatcher.run(self.jobs)

    def join(self, timeout=None) -> None:
        try:
            super().join(timeout)
        except KeyboardInterrupt:
            self.logger.warning("gputracker: interrupted; stopping jobs")
            self.dispatcher.request_stop()
            super().join()
            raise
