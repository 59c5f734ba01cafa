"""``python -m gputracker COMMANDS_FILE``: run one shell-free command per line on free GPUs.

Per-job logs go to ``--log_dir`` as ``job_NNNN.log`` (NNNN = the command's position among
the file's commands, from 0000), with ``gpu_metrics.json`` next to them. Exit status: 0 if
every job succeeded, 1 if any failed, 2 on bad arguments, 130 if stopped by SIGINT/SIGTERM.
"""
from __future__ import annotations

import argparse
import logging
import sys
from dataclasses import dataclass
from pathlib import Path

from .commands import parse_command, read_commands_file
from .dispatcher import Dispatcher, Job
from .locks import DEFAULT_LOCK_DIR, LOCK_DIR_ENV
from .signals import install_signal_handlers

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_STOPPED = 0, 1, 2, 130


@dataclass(frozen=True)
class CliConfig:
    commands_file: Path
    gpus: list[int] | None  # None = all NVML sees, [] = CPU
    gpu_memory_threshold_mb: float
    max_check: int
    poll_interval_s: float
    num_gpus_per_job: int
    log_dir: Path
    cpu_slots: int
    timeout_s: float | None
    lock_dir: Path | None
    kill_grace_s: float
    verbose: bool


def _gpu_list(values: list[str] | None) -> list[int] | None:
    if values is None:
        return None
    if len(values) == 1 and values[0].lower() in ("none", "cpu"):
        return []
    try:  # "--gpus 0 1" and "--gpus 0,1" both work
        return [int(v) for value in values for v in value.split(",") if v]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--gpus takes GPU indices or 'none', got {' '.join(values)}") from None


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        allow_abbrev=False,  # `--max` must not silently mean --max_check
        prog="python -m gputracker",
        description="Run one command per line of COMMANDS_FILE on GPUs whose used memory stays under a "
                    "threshold. Lines are split like a shell would split words, but no shell runs them: "
                    "pipes, '&&' and redirections are not interpreted ('#' lines and blank lines are skipped).")
    parser.add_argument("commands_file", type=Path, metavar="COMMANDS_FILE")
    parser.add_argument("--gpus", "--gpu-list", "--device-ids", nargs="+", metavar="GPU",
                        help="NVML indices that may be used, or 'none' for CPU (default: all NVML sees)")
    parser.add_argument("--gpu_memory_threshold", "--gpu-memory-threshold", "--gpu-mem-threshold", type=float, default=500, metavar="MB",
                        help="a GPU is free while its used memory stays under this many MB (500)")
    parser.add_argument("--max_check", "--max-check", "--max-checks", type=int, default=10, metavar="N",
                        help="consecutive free polls before a GPU is granted (10)")
    parser.add_argument("--poll_interval", "--poll-interval", type=float, default=10.0, metavar="S",
                        help="seconds between NVML polls (10)")
    parser.add_argument("--num_gpus_per_job", "--num-gpus-per-job", "--gpus-per-job", type=int, default=1, metavar="N",
                        help="GPUs given to each command at once (1)")
    parser.add_argument("--log_dir", "--log-dir", type=Path, default=Path("gputracker_logs"), metavar="DIR",
                        help="per-job logs job_NNNN.log and gpu_metrics.json (./gputracker_logs)")
    parser.add_argument("--cpu_slots", "--cpu-slots", type=int, default=1, metavar="N",
                        help="concurrent jobs in CPU mode (1)")
    parser.add_argument("--timeout", type=float, default=None, metavar="S",
                        help="wall-clock limit per job; its process group is terminated after it (none)")
    parser.add_argument("--lock_dir", "--lock-dir", type=Path, default=None, metavar="DIR",
                        help=f"shared directory of GPU claims (${LOCK_DIR_ENV} or {DEFAULT_LOCK_DIR})")
    parser.add_argument("--kill_grace", "--kill-grace", type=float, default=5.0, metavar="S",
                        help="seconds between SIGTERM and SIGKILL when stopping a job (5)")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    return parser


def parse_args(argv: list[str] | None = None) -> CliConfig:
    parser = build_parser()
    ns = parser.parse_args(argv)
    try:
        gpus = _gpu_list(ns.gpus)
    except argparse.ArgumentTypeError as exc:
        parser.error(str(exc))
    for flag, value, minimum in (("--max_check", ns.max_check, 1), ("--num_gpus_per_job", ns.num_gpus_per_job, 1),
                                 ("--cpu_slots", ns.cpu_slots, 1)):
        if value < minimum:
            parser.error(f"{flag} must be >= {minimum}, got {value}")
    if ns.poll_interval <= 0:
        parser.error(f"--poll_interval must be > 0, got {ns.poll_interval}")
    if ns.timeout is not None and ns.timeout <= 0:
        parser.error(f"--timeout must be > 0, got {ns.timeout}")
    if not ns.commands_file.is_file():
        parser.error(f"commands file {ns.commands_file} not found")
    return CliConfig(ns.commands_file, gpus, ns.gpu_memory_threshold, ns.max_check, ns.poll_interval,
                     ns.num_gpus_per_job, ns.log_dir, ns.cpu_slots, ns.timeout, ns.lock_dir, ns.kill_grace,
                     ns.verbose)


def build_jobs(config: CliConfig, logger: logging.Logger) -> list[Job]:
    jobs = []
    for number, (line_number, line) in enumerate(read_commands_file(config.commands_file)):
        try:
            argv, env = parse_command(line, logger)
        except ValueError as exc:
            raise ValueError(f"{config.commands_file}:{line_number}: {exc}") from None
        job_id = f"job_{number:04d}"
        jobs.append(Job(job_id, argv, config.log_dir / f"{job_id}.log", timeout_s=config.timeout_s, env=env))
    return jobs


def main(argv: list[str] | None = None) -> int:
    config = parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if config.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(message)s", stream=sys.stderr)
    logger = logging.getLogger("gputracker")
    try:
        jobs = build_jobs(config, logger)
        dispatcher = Dispatcher(
            gpus=config.gpus, memory_threshold_mb=config.gpu_memory_threshold_mb, max_check=config.max_check,
            poll_interval_s=config.poll_interval_s, num_gpus_per_job=config.num_gpus_per_job,
            cpu_slots=config.cpu_slots, lock_dir=config.lock_dir, logger=logger, kill_grace_s=config.kill_grace_s)
    except (ValueError, OSError) as exc:
        print(f"gputracker: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    config.log_dir.mkdir(parents=True, exist_ok=True)
    with dispatcher, install_signal_handlers(dispatcher) as received_signals:
        results = dispatcher.run(jobs)
        metrics_path = dispatcher.write_metrics(config.log_dir / "gpu_metrics.json")
    m = dispatcher.metrics()
    where = f"GPUs {','.join(map(str, dispatcher.gpus))}" if dispatcher.mode == "gpu" else "CPU"
    mean_wait = m["gpu_wait_s"]["mean"]
    print(f"gputracker: {m['jobs']} jobs on {where}: {m['succeeded']} succeeded, {m['failed']} failed "
          f"({m['timed_out']} timed out, {m['interrupted']} interrupted); "
          f"mean wait {0.0 if mean_wait is None else mean_wait:.1f} s; total {m['total_runtime_s']:.1f} s; "
          f"logs and {metrics_path.name} in {config.log_dir}", flush=True)
    if received_signals:
        return EXIT_STOPPED
    return EXIT_OK if all(r.succeeded for r in results) else EXIT_FAILED


def _main_closed_pipe_safe() -> int:
    """`python -m gputracker cmds.txt | head`: a closed stdout is not a traceback."""
    try:
        code = main()
        sys.stdout.flush()
        return code
    except BrokenPipeError:
        import os
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # the flush at exit must not fail again
        return EXIT_FAILED


if __name__ == "__main__":
    sys.exit(_main_closed_pipe_safe())
