"""The Python API for notebooks: the same code paths as the command line.

    from esd.api import analyze_model, get_summary, run_experiment, load_results
    # (in a checkout also `from esd_api import …`)
    layers = analyze_model("sentence-transformers/all-MiniLM-L6-v2", fix_fingers="DKS")
    layers = analyze_model(my_torch_module)                 # a model already in memory
    layers = analyze_model("my/fine-tune", source_model="my/base", delta_from_base=True)
    get_summary(layers)                                     # one dict: alpha_mean, … (summary.csv's row)
    run_experiment(["org/a", "org/b"], "results/", gpus="none", cpu_workers=2)
    per_layer, summary = load_results("results/")

`analyze_model` runs in this process (what the worker, `esd-worker`, does, without writing
files); `run_experiment` is the orchestrator (`esd-run`) with keyword arguments for flags
and a model list given as a CSV path, a list of ids or a DataFrame.
"""
from __future__ import annotations

import hashlib
import os
from dataclasses import fields, replace
from pathlib import Path

from esd.model_list import ID_COLUMNS, RevisionConflict, make_entry
from esd.cli.worker import compute_model_metrics, pick_device
from esd.settings import ESDSettings

ESD_OPTIONS = tuple(f.name for f in fields(ESDSettings))


def _esd_settings(options: dict) -> ESDSettings:
    unknown = set(options) - set(ESD_OPTIONS)
    if unknown:
        raise TypeError(f"unknown ESD option(s) {sorted(unknown)}; valid: {list(ESD_OPTIONS)}")
    return replace(ESDSettings(), **options)   # validates: a bad value raises ValueError


def analyze_model(model, source_model: str | None = None, *, revision: str | None = None,
                  device: str = "auto", trust_remote_code: bool = False, eigs_out: dict | None = None,
                  name: str | None = None, **esd_options):
    """Per-layer metrics of one model as a DataFrame with the per-model CSV columns.

    `model`: a hub id (`org/name`, `org/name@rev`), a local directory, or an in-memory
    `torch.nn.Module` (every Linear, Conv1D, Conv1d, Conv2d and Embedding; tied weights
    once), whose rows get `name` (default: its class name) as model_id. Raises
    `esd.failures.ESDFailure` (stage, reason) when a model cannot be loaded or analysed.

    `delta_from_base=True` adds the rows `<layer>.delta_from_base` (W − W_base, base =
    `source_model`) for a full model with a `source_model`; `adapter_update=True` adds the
    rows `<layer>.adapter_update` ((α/r)·B·A alone) for a LoRA adapter; either adds nothing
    (with a log note) to a model it does not apply to. `get_summary` of the result is
    computed from the weight rows only."""
    settings = _esd_settings(esd_options)
    import torch
    if isinstance(model, torch.nn.Module):
        if settings.delta_from_base or settings.adapter_update:
            raise ValueError("delta_from_base / adapter_update read a model's files and its base's: "
                             "give a hub id or a local directory, not an in-memory module")
        return _analyze_module(model, settings, device, eigs_out, name or type(model).__name__)
    try:
        entry = make_entry(str(model), revision, source_model)
    except RevisionConflict as exc:
        raise ValueError(str(exc)) from None
    return compute_model_metrics(entry, settings, device=device,
                                 trust_remote_code=trust_remote_code, eigs_out=eigs_out)


def _analyze_module(module, settings: ESDSettings, device: str, eigs_out, name: str):
    from net_esd import analyze_layers, iter_model_layers
    device_name, device_ids = pick_device(device)
    frame = analyze_layers(iter_model_layers(module), settings, device_ids=device_ids,
                           device=device_name, eigs_out=eigs_out)
    is_adapter = bool(getattr(module, "peft_config", None))
    frame.insert(0, "source_model", "")
    frame.insert(0, "is_adapter", is_adapter)
    frame.insert(0, "model_id", name)
    return frame


def get_summary(model, **options) -> dict:
    """One model's summary row (the columns of summary.csv: alpha_mean, alpha_weighted_mean,
    stable_rank_mean, …) as a dict, like WeightWatcher's `get_summary`. `model` is a
    per-layer DataFrame from `analyze_model`, or anything `analyze_model` takes (then
    `options` are its keywords)."""
    import pandas as pd
    from esd.analysis.summary import build_summary
    layers = model if isinstance(model, pd.DataFrame) else analyze_model(model, **options)
    summary = build_summary(layers)
    if len(summary) != 1:
        raise ValueError(f"get_summary takes one model's layers; these hold {len(summary)} models "
                         f"(use esd.analysis.summary.build_summary for a table)")
    return summary.iloc[0].to_dict()


def run_experiment(models, output_dir, **options) -> int:
    """Run (or resume) an experiment; options are the command-line flags without dashes
    (`gpus="none"`, `cpu_workers=2`, `fix_fingers="DKS"`, `overwrite=True`, …).

    `models`: a model list CSV path, a list of ids, or a DataFrame with a `model_id` (or
    `full_name`) column and optional `source_model`, `base_model_relation`, `revision`. A
    list or DataFrame is written to `output_dir/runs/api_models_<hash>.csv` (local paths made
    absolute), so a rerun with the same models resumes. Returns the command's exit status
    (0: every model done)."""
    from esd.cli.run import main
    argv = ["--model_list", str(_model_list_path(models, Path(output_dir))),
            "--output_dir", str(output_dir)]
    for name, value in options.items():
        if value is None:
            continue
        flag = f"--{name}"
        if value is True:
            argv.append(flag)
        elif value is False:
            argv.append(f"--no_{name}")   # overwrite=False, filter_zeros=False, …
        elif isinstance(value, (list, tuple)):
            argv += [flag, *map(str, value)]
        else:
            argv += [flag, str(value)]
    try:
        return main(argv)
    except SystemExit as exc:  # argparse rejected an option; its message is already printed
        raise ValueError(f"run_experiment: invalid options {options}") from exc


def _model_list_path(models, output_dir: Path) -> Path:
    import pandas as pd
    if isinstance(models, (str, os.PathLike)):
        return Path(models)
    if isinstance(models, pd.DataFrame):
        frame = models.copy()
    elif isinstance(models, (list, tuple)) and all(isinstance(m, (str, os.PathLike)) for m in models):
        frame = pd.DataFrame({"model_id": [str(m) for m in models]})
    else:
        raise TypeError("run_experiment: models must be a CSV path, a list of ids or a DataFrame, "
                        f"not {type(models).__name__}")
    id_column = next((c for c in ID_COLUMNS if c in frame.columns), None)
    if id_column is None:
        raise ValueError(f"run_experiment: the DataFrame needs a {' or '.join(ID_COLUMNS)} column; "
                         f"it has {list(frame.columns)}")
    frame[id_column] = [os.path.abspath(i) if isinstance(i, str) and os.path.exists(i) else i
                        for i in frame[id_column]]
    text = frame.to_csv(index=False)
    path = output_dir / "runs" / f"api_models_{hashlib.sha1(text.encode()).hexdigest()[:8]}.csv"
    path.parent.mkdir(parents=True, exist_ok=True)
    if not path.exists():
        from esd.atomic_files import write_text_atomic
        write_text_atomic(path, text)
    return path


def load_results(output_dir):
    """(per_layer, summary) DataFrames of an output directory; the summary is recomputed from
    the per-model CSVs, so it is current even if `summary.csv` is older."""
    from esd.analysis.results import load_per_layer
    from esd.analysis.summary import build_summary
    per_layer = load_per_layer(Path(output_dir))
    return per_layer, build_summary(per_layer)
