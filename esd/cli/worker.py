"""One model, one process: resolve it, stream its layers (merging any adapter on CPU),
run the estimator, write `<output_dir>/<safe_id>.csv` atomically.

    python esd_worker.py --model_id org/name --output_dir results/ [--source_model BASE]
                         [--revision REV] [ESD flags] [--device cpu|cuda] [--overwrite]
    python esd_worker.py --manifest results/slurm/<stamp>/manifest.json --task_index 3

Owns: the worker's flags (derived from `esd.settings.ESDSettings` and `WorkerOptions`,
shared with the orchestrator, plus `--device`; `worker_argv` writes them), which layer modes
a model gets (its weight rows, then with --delta_from_base a fine-tune's W_ft − W_base rows
and with --adapter_update a LoRA's (α/r)·B·A rows: `analysed_modes`), the progress line
`layer i/n` (n over all modes), the per-model CSV and eigenvalue files, turning any failure
into a typed record in `failed_models.txt` / `failures.jsonl`. Exit status: 0 done, 1 failed (final),
75 failed (a retry can help), 74 the disk is full and not even the failure could be recorded
(the orchestrator records it as `disk_full`). The loader and whatever it needs (torch,
transformers, peft) are imported inside functions, only when a model needs them: importing
this module (as the orchestrator does, for `worker_argv`) loads no torch.
"""
from __future__ import annotations

if __name__ == "__main__":  # started as a file (a backend's `python …/esd/cli/worker.py`):
    import os as _os         # import the package `esd`, not modules of this folder
    import sys as _sys
    _sys.path[0] = _os.path.dirname(_os.path.dirname(_os.path.dirname(_os.path.abspath(__file__))))

import argparse
import contextlib
import itertools
import json
import logging
import sys
import time
import traceback
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

from filelock import FileLock, Timeout

from esd import diskfull, run_lock, safe_output
from esd.atomic_files import atomic_path
from esd.cli_flags import FlagParser, add_flag
from esd.failures import ESDFailure, clear_failure, failure_recorded_since, record_failure
from esd.model_list import (ENTRY_FLAGS, ModelEntry, RevisionConflict, add_entry_flags, entry_argv,
                            entry_from_args, record_result_file, unsafe_characters)
from esd.options import add_options, option, options_argv, options_from_args
from esd.progress import TransferLines, slot_line
from esd.schema import LAYER_MODES, layer_mode_of
from esd.settings import (ESDSettings, WorkerOptions, add_esd_arguments,  # noqa: F401 - re-exported
                          esd_argv, esd_settings_from_args)

EXIT_OK, EXIT_FAILED, EXIT_RETRYABLE = 0, 1, 75

log = logging.getLogger("esd_worker")


@dataclass(frozen=True, kw_only=True)
class WorkerConfig(WorkerOptions):
    """One worker's task: the model, where its results go, the run's settings and options."""
    entry: ModelEntry
    output_dir: Path
    esd: ESDSettings
    device: str = option("auto", "where eigenvalues are computed (auto: cuda when visible)",
                         choices=("auto", "cpu", "cuda"))
    fetch_only: bool = option(False, "only download the model's files (an adapter's or, with "
                              "--delta_from_base, a fine-tune's base too) into the hub cache; "
                              "the orchestrator's download stage runs this")
    log_path: Path | None = None   # Slurm manifest task: send our output there
    started: float = field(default_factory=time.time)   # the process's start: its slot time


def worker_argv(entry: ModelEntry, output_dir, esd: ESDSettings,
                options: WorkerOptions = WorkerOptions(), *, device: str = "auto") -> list[str]:
    """The worker's arguments for one model (after the script path); no shell involved.
    The model's part is `model_list.entry_argv` (read back by `entry_from_args`), the rest
    is derived from the settings' fields (`esd/options.py`)."""
    return (entry_argv(entry) + ["--output_dir", str(output_dir)] + esd_argv(esd)
            + ["--device", device] + options_argv(options))


def build_parser() -> argparse.ArgumentParser:
    parser = FlagParser(description="Analyse one model and write its per-layer ESD metrics CSV.")
    add_entry_flags(parser)
    add_flag(parser, "output_dir", help="where the per-model CSV goes")
    add_esd_arguments(parser)
    add_options(parser, WorkerConfig)   # device and the run's WorkerOptions
    add_flag(parser, "manifest", help="run task --task_index of a Slurm manifest instead")
    add_flag(parser, "task_index", type=int, help="index into --manifest (Slurm: $SLURM_ARRAY_TASK_ID)")
    return parser


MODEL_FLAGS = (*ENTRY_FLAGS, "output_dir")


@dataclass(frozen=True)
class ManifestTask:
    argv: list[str]              # the worker's arguments
    log_path: Path | None        # where the worker's output goes (None: stdout, the Slurm log)


def read_manifest_task(manifest: str, task_index: int) -> ManifestTask:
    """Task `task_index` of a Slurm manifest (written by `esd/backends/slurm.py`); ValueError
    says what is wrong."""
    try:
        data = json.loads(Path(manifest).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ValueError(f"--manifest {manifest} does not exist") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"--manifest {manifest} is not a readable JSON manifest: {exc}") from None
    tasks = data.get("tasks") if isinstance(data, dict) else None
    if not isinstance(tasks, list):
        raise ValueError(f"--manifest {manifest} has no 'tasks' list (not a manifest written by the Slurm backend?)")
    if not 0 <= task_index < len(tasks):
        raise ValueError(f"--task_index {task_index} is outside the manifest's {len(tasks)} tasks")
    task = tasks[task_index]
    argv = task.get("argv") if isinstance(task, dict) else None
    if not (isinstance(argv, list) and all(isinstance(a, str) for a in argv)):
        raise ValueError(f"--manifest {manifest}, task {task_index}: no 'argv' list of strings")
    log_path = task.get("log_path")
    return ManifestTask(argv, Path(log_path) if isinstance(log_path, str) and log_path else None)


def _send_output_to(log_path: Path) -> None:
    """stdout and stderr (ours and any child's) appended to the task's log, as the local
    backend does: `logs/workers/<safe_id>.log` under every backend, watched for progress."""
    import os
    log_path.parent.mkdir(parents=True, exist_ok=True)
    sys.stdout.flush()
    sys.stderr.flush()
    fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)


def parse_config(argv: list[str]) -> WorkerConfig:
    parser = build_parser()
    args = parser.parse_args(argv)
    log_path = None
    if args.manifest:
        if args.task_index is None:
            parser.error("--manifest needs --task_index")
        given = [f"--{name}" for name in MODEL_FLAGS if getattr(args, name) is not None]
        if given:
            parser.error(f"--manifest names the model and output directory; do not also give {', '.join(given)}")
        try:
            task = read_manifest_task(args.manifest, args.task_index)
        except ValueError as exc:
            parser.error(str(exc))
        args = parser.parse_args(task.argv)
        log_path = task.log_path
    elif args.task_index is not None:
        parser.error("--task_index goes with --manifest")
    if not args.model_id or not args.output_dir:
        parser.error("--model_id and --output_dir are required")
    for flag in ("model_id", "source_model", "revision"):
        unsafe = getattr(args, flag) and unsafe_characters(getattr(args, flag))
        if unsafe:
            parser.error(f"--{flag} has control characters ({unsafe}); refused")
    if Path(args.output_dir).exists() and not Path(args.output_dir).is_dir():
        parser.error(f"--output_dir {args.output_dir} is an existing file, not a directory")
    try:
        entry = entry_from_args(args)
    except RevisionConflict as exc:
        parser.error(str(exc))
    try:
        esd = esd_settings_from_args(args)
    except ValueError as exc:
        parser.error(str(exc))
    return options_from_args(WorkerConfig, args, entry=entry, output_dir=Path(args.output_dir),
                             esd=esd, log_path=log_path)


def pick_device(requested: str):
    """(device, device_ids) for the estimator: every visible GPU, or the CPU."""
    import torch
    if requested == "cpu" or (requested == "auto" and not torch.cuda.is_available()):
        return "cpu", None
    if not torch.cuda.is_available():
        raise ESDFailure("analyze", "cuda_unavailable", "--device cuda was asked but torch sees no GPU")
    return "cuda", list(range(torch.cuda.device_count()))


def _oom_failure(exc: BaseException) -> ESDFailure | None:
    import torch
    if isinstance(exc, torch.cuda.OutOfMemoryError) or "CUDA out of memory" in str(exc):
        return ESDFailure("analyze", "out_of_memory", f"CUDA out of memory: {exc}".splitlines()[0])
    if isinstance(exc, MemoryError):
        return ESDFailure("analyze", "out_of_memory", "host memory exhausted (MemoryError)")
    return None


def analysed_modes(esd: ESDSettings, resolved) -> tuple[tuple[str, ...], list[str]]:
    """The layer modes (`esd.schema.LAYER_MODES`) this model gets, weights first, and a note
    for each flag that adds nothing to it: deltas need a full model with a `source_model`,
    updates a plain LoRA adapter (not IA3, LoHa, DoRA, …). A flag that does not apply is no
    failure."""
    modes, notes = ["weights"], []
    if esd.delta_from_base:
        if resolved.is_adapter:
            notes.append("--delta_from_base adds nothing: an adapter's difference from its base "
                         "is its update (--adapter_update)")
        elif not resolved.source_model:
            notes.append("--delta_from_base adds nothing: no source_model (not a fine-tune of a "
                         "named base)")
        else:
            modes.append("delta_from_base")
    if esd.adapter_update:
        from esd.loader import adapter_update_unsupported
        if not resolved.is_adapter:
            notes.append("--adapter_update adds nothing: not an adapter")
        elif unsupported := adapter_update_unsupported(resolved):
            notes.append(f"--adapter_update adds nothing: the adapter has no plain LoRA update "
                         f"(α/r)·B·A ({unsupported})")
        else:
            modes.append("adapter_update")
    return tuple(modes), notes


class LayerProgress:
    """`layer i/n` after each layer, n = the layers of every mode together, as the loader's
    plans announce them (`iter_layers(on_plan=...)`); `layer i` while n is not known."""

    def __init__(self, modes, show: Callable[[int, str, int | None], None]):
        self.modes, self.show, self.counts = tuple(modes), show, {}

    def planned(self, counts: dict) -> None:
        self.counts.update({mode: n for mode, n in counts.items() if mode in self.modes})

    def total(self) -> int | None:
        known = [self.counts.get(mode) for mode in self.modes]
        return None if None in known else sum(known)

    def __call__(self, layers_done: int, longname: str) -> None:
        self.show(layers_done, longname, self.total())


def _weights_first(frame):
    """The rows in LAYER_MODES order (weights, delta_from_base, adapter_update), each mode's
    rows in their model order."""
    rank = frame["longname"].astype(str).map(lambda name: list(LAYER_MODES).index(layer_mode_of(name)))
    return frame.iloc[rank.argsort(kind="stable")].reset_index(drop=True)


def compute_model_metrics(entry: ModelEntry, esd: ESDSettings, *, device: str = "auto",
                          trust_remote_code: bool = False, eigs_out: dict | None = None,
                          progress: Callable[[int, str, int | None], None] | None = None,
                          note: Callable[[str], None] = log.warning):
    """Per-layer metrics of one model as a DataFrame with the per-model CSV columns: its
    weights, then (as `esd` asks and the model allows, `analysed_modes`) its delta from its
    base and its adapter update, each row named with its mode's suffix.

    The same path serves the worker, the notebook API and the tests. Raises ESDFailure.
    progress(layers_done, longname, layers_total or None) after each layer; note(text) once
    for each mode flag that adds nothing to this model.
    """
    from esd.loader import iter_layers, resolve_model
    from net_esd import analyze_layers

    resolved = resolve_model(entry, trust_remote_code=trust_remote_code, warn=log.warning)
    modes, notes = analysed_modes(esd, resolved)
    for text in notes:
        note(f"{entry.key}: {text}")
    device_name, device_ids = pick_device(device)
    counter = LayerProgress(modes, progress or (lambda done, name, total: None))
    # Deltas are computed first, so a missing or mismatched base fails before any layer is
    # computed; the CSV still lists the weight rows first (below).
    computed = sorted(modes, key=lambda mode: mode != "delta_from_base")
    layers = itertools.chain.from_iterable(  # lazily: a mode's files are opened when it starts
        iter_layers(resolved, mode=mode, on_plan=counter.planned) for mode in computed)
    try:
        frame = analyze_layers(layers, esd, device_ids=device_ids, device=device_name,
                               eigs_out=eigs_out, progress=counter)
    except ESDFailure:
        raise
    except Exception as exc:  # noqa: BLE001 - classified below, never lost
        failure = _oom_failure(exc)
        if failure is None:
            traceback.print_exc()
            failure = ESDFailure("analyze", "internal_error", f"{type(exc).__name__}: {exc}")
        raise failure from exc
    if frame.empty:
        raise ESDFailure("analyze", "no_layers",
                         "no Linear, Conv1D, Conv1d, Conv2d or Embedding weights were found")
    frame = _weights_first(frame)
    # a difference's alpha says nothing of how well a model is trained
    frame.loc[frame["longname"].astype(str).map(layer_mode_of) != "weights", "warning"] = ""
    frame.insert(0, "source_model", resolved.source_model or "")
    frame.insert(0, "is_adapter", bool(resolved.is_adapter))
    frame.insert(0, "model_id", entry.key)
    return frame


def _save_npz(path: Path, arrays: dict) -> None:
    import numpy as np
    with open(path, "wb") as handle:  # a file handle: numpy would append ".npz" to a name
        np.savez_compressed(handle, **arrays)


def save_results(config: WorkerConfig, frame, eigs: dict | None) -> Path:
    paths = config.entry.paths(config.output_dir)
    out = paths.result_csv
    try:
        record_result_file(config.output_dir, config.entry)  # which model this file holds
        if eigs is not None:  # eigenvalues first: an existing CSV implies its eigs exist
            target = paths.eigs
            target.parent.mkdir(parents=True, exist_ok=True)
            with atomic_path(target) as tmp:
                _save_npz(tmp, eigs)
        with atomic_path(out) as tmp:
            frame.to_csv(tmp, index=False)
    except OSError as exc:  # a full disk is `disk_full` (retryable), with the free space
        raise diskfull.write_failure(out, exc) from exc
    return out


@contextlib.contextmanager
def model_lock(config: WorkerConfig):
    """Hold `.locks/<safe_id>.lock` while working, so a rerun never computes a model that a
    surviving worker of a killed run is still computing: it waits, then finds the CSV (or
    the failure recorded meanwhile). Yields when the wait began, None if it did not wait."""
    path = config.entry.paths(config.output_dir).lock
    path.parent.mkdir(parents=True, exist_ok=True)
    lock = FileLock(str(path))
    waited_since = None
    try:
        lock.acquire(timeout=0)
    except Timeout:
        waited_since = time.time()
        print(f"another worker is analysing {config.entry.key}; waiting for it", flush=True)
        lock.acquire()
    try:
        yield waited_since
    finally:
        lock.release()


def _print_layer_done(layers_done: int, longname: str, layers_total: int | None = None) -> None:
    """`  layer   12/74  encoder.layer.5.output.dense`: read by the run's progress display
    (esd/progress.py) and by whoever runs `tail -f` on the worker's log."""
    of = f"/{layers_total}" if layers_total is not None else ""
    print(f"  layer {layers_done:4d}{of}  {longname}", flush=True)


def _print_note(text: str) -> None:
    print(f"note: {text}", flush=True)


def _rows_said(frame) -> str:
    """`74 layers` or `74 layers (37 weights, 37 delta_from_base)`."""
    modes = frame["longname"].astype(str).map(layer_mode_of).value_counts()
    if set(modes.index) <= {"weights"}:
        return f"{len(frame)} layers"
    parts = ", ".join(f"{modes[m]} {m}" for m in LAYER_MODES if m in modes)
    return f"{len(frame)} layers ({parts})"



def download_ledger(config):
    """The run's download ledger, passed to the hub session (loading never imports the disk
    budget): under `--disk_budget` (which it enforces) or `--stream`, else None."""
    if config.disk_budget is None and not config.stream:
        return None
    from esd.disk_budget import DownloadLedger
    from esd.loading.hub import hub_cache_dir
    from esd.units import GB
    budget = int(config.disk_budget * GB) if config.disk_budget is not None else None
    return DownloadLedger(config.output_dir, hub_cache_dir(), budget_bytes=budget)

def run_worker(config: WorkerConfig) -> int:
    entry = config.entry
    out = entry.paths(config.output_dir).result_csv
    try:
        config.output_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:  # nowhere to record a failure: say it on stderr
        print(f"error: --output_dir {config.output_dir} cannot be created: {exc.strerror or exc}", file=sys.stderr)
        return EXIT_FAILED
    try:  # held for the worker's life: no run with other settings can take the directory
        run_lock.check_settings(config.output_dir, asdict(config.esd), defaults=asdict(ESDSettings()))
    except run_lock.SettingsConflict as exc:
        record = record_failure(config.output_dir, entry.key, ESDFailure("worker", "settings_mismatch", str(exc), False))
        print(f"{entry.key}: FAILED {record.stage}/{record.reason}: {record.message}", flush=True)
        return EXIT_FAILED
    with model_lock(config) as waited_since:
        if out.exists() and not config.overwrite:
            clear_failure(config.output_dir, entry.key)  # a done model is never in the failure files
            print(f"{entry.key}: already done ({out})", flush=True)
            return EXIT_OK
        earlier = waited_since and failure_recorded_since(config.output_dir, entry.key, waited_since)
        if earlier:  # the worker we waited for failed: its attempt stands for ours
            print(f"{entry.key}: FAILED meanwhile in another worker: {earlier.stage}/{earlier.reason}: "
                  f"{earlier.message}", flush=True)
            return EXIT_RETRYABLE if earlier.retryable else EXIT_FAILED
        if config.fetch_only:
            return fetch_files(config)
        started = time.time()
        from esd.loading.hub import hub_session
        from esd.loading.plans import use_plan_cache
        use_plan_cache(config.output_dir / ".cache" / "plans")  # the run's workers share plans
        try:
            eigs = {} if config.save_eigs else None
            with hub_session(entry.key, ledger=download_ledger(config), stream=config.stream,
                             report=TransferLines(lambda line: print(line, flush=True))) as session:
                frame = compute_model_metrics(entry, config.esd, device=config.device,
                                              trust_remote_code=config.trust_remote_code, eigs_out=eigs,
                                              progress=_print_layer_done, note=_print_note)
                save_results(config, frame, eigs)
        except ESDFailure as failure:
            record = record_failure(config.output_dir, entry.key, failure)
            print(f"{entry.key}: FAILED {failure} (retryable: {record.retryable})", flush=True)
            return EXIT_RETRYABLE if record.retryable else EXIT_FAILED
    clear_failure(config.output_dir, entry.key)
    print(f"{entry.key}: {_rows_said(frame)} in {time.time() - started:.1f}s -> {out}", flush=True)
    print(slot_line(time.time() - config.started, session.waited_s), flush=True)
    return EXIT_OK


def fetch_files(config: WorkerConfig) -> int:
    """`--fetch_only`: the files this model's worker will read, into the hub cache — the
    model's, an adapter's base's, with --delta_from_base a fine-tune's base's — and nothing
    else (no tensor read, no torch imported). Under --disk_budget they stay on the run's
    ledger for the model's worker, which releases them when its CSV is written."""
    from esd.loading.hub import hub_session
    from esd.loading.resolve import resolve_model
    entry, started = config.entry, time.time()
    try:
        with hub_session(entry.key, ledger=download_ledger(config), keep=True,
                         report=TransferLines(lambda line: print(line, flush=True))):
            resolved = resolve_model(entry, trust_remote_code=config.trust_remote_code, warn=log.warning)
            if config.esd.delta_from_base and entry.base is not None and not resolved.is_adapter:
                resolve_model(entry.base, trust_remote_code=config.trust_remote_code, warn=log.warning)
    except ESDFailure as failure:
        record = record_failure(config.output_dir, entry.key, failure)
        print(f"{entry.key}: FAILED {failure} (retryable: {record.retryable})", flush=True)
        return EXIT_RETRYABLE if record.retryable else EXIT_FAILED
    print(f"{entry.key}: files in the cache ({time.time() - started:.1f}s)", flush=True)
    return EXIT_OK


EXIT_INTERRUPTED = 130


def main(argv: list[str] | None = None) -> int:
    safe_output.tolerant_std_streams()  # its log on a full disk, or stdout into `head`: never a traceback
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    logging.getLogger("httpx2").setLevel(logging.WARNING)   # no line per hub request in the log
    config = parse_config(sys.argv[1:] if argv is None else argv)
    if config.log_path is not None:
        print(f"[esd] output of this task goes to {config.log_path}", flush=True)
        _send_output_to(config.log_path)
    try:
        return run_worker(config)
    except KeyboardInterrupt:  # nothing half-written: results are written to a temporary name first
        print(f"{config.entry.key}: interrupted; nothing was written for it", file=sys.stderr, flush=True)
        return EXIT_INTERRUPTED
    except OSError as exc:
        if not diskfull.is_disk_full(exc):
            raise
        return diskfull.worker_exit(config.output_dir, config.entry.key, exc, EXIT_RETRYABLE)


if __name__ == "__main__":
    sys.exit(main())
