"""The Python API for notebooks: the same code paths as the command line.

    from esd_api import analyze_model, run_experiment, load_results
    layers = analyze_model("sentence-transformers/all-MiniLM-L6-v2", fix_fingers="DKS")
    run_experiment("models.csv", "results/", gpus="none", cpu_workers=2)
    per_layer, summary = load_results("results/")

`analyze_model` runs in this process (what `esd_worker.py` does, without writing files);
`run_experiment` is `run_esd_experiment.py` with keyword arguments for flags.
"""
from __future__ import annotations

from dataclasses import fields, replace
from pathlib import Path

from esd_worker import ESDSettings, compute_model_metrics
from esd.model_list import RevisionConflict, make_entry

ESD_OPTIONS = tuple(f.name for f in fields(ESDSettings))


def _esd_settings(options: dict) -> ESDSettings:
    unknown = set(options) - set(ESD_OPTIONS)
    if unknown:
        raise TypeError(f"unknown ESD option(s) {sorted(unknown)}; valid: {list(ESD_OPTIONS)}")
    settings = replace(ESDSettings(), **options)
    settings.validate()
    return settings


def analyze_model(model_id: str, source_model: str | None = None, *, revision: str | None = None,
                  device: str = "auto", trust_remote_code: bool = False, eigs_out: dict | None = None,
                  **esd_options):
    """Per-layer metrics of one model (hub id, `org/name@rev`, or local directory) as a DataFrame
    with the per-model CSV columns. Raises `failures.ESDFailure` (stage, reason) on failure."""
    try:
        entry = make_entry(model_id, revision, source_model)
    except RevisionConflict as exc:
        raise ValueError(str(exc)) from None
    return compute_model_metrics(entry, _esd_settings(esd_options), device=device,
                                 trust_remote_code=trust_remote_code, eigs_out=eigs_out)


def run_experiment(model_list, output_dir, **options) -> int:
    """Run (or resume) an experiment; options are the command-line flags without dashes
    (`gpus="none"`, `cpu_workers=2`, `fix_fingers="DKS"`, `overwrite=True`, …).
    Returns the command's exit status (0: every model done)."""
    from run_esd_experiment import main
    argv = ["--model_list", str(model_list), "--output_dir", str(output_dir)]
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


def load_results(output_dir):
    """(per_layer, summary) DataFrames of an output directory; the summary is recomputed from
    the per-model CSVs, so it is current even if `summary.csv` is older."""
    from analyze_results import build_summary, load_per_layer
    per_layer = load_per_layer(Path(output_dir))
    return per_layer, build_summary(per_layer)
