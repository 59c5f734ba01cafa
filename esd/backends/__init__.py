"""Where worker tasks run. `base.py` is the interface (`Backend`, `Task`, `TaskResult`);
`local.py` runs them on this machine's GPUs or CPU slots (gputracker), `slurm.py` as Slurm
job arrays. A new backend (PBS, a cloud batch service) is one more subclass of `Backend`,
named in `BACKENDS`; the supervisor above (`esd/supervisor.py`) gives it retries, timeouts,
the stall watchdog and failure records without any code of its own."""
from esd.backends.base import Backend, BackendError, Hooks, Task, TaskResult

BACKENDS = ("local", "slurm")

__all__ = ["Backend", "BackendError", "Hooks", "Task", "TaskResult", "BACKENDS"]
