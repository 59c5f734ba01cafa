"""The model summary: one row per model with the columns users' scripts depend on.

Owns `SUMMARY_COLUMNS` (fixed by the file contract), the statistics, and where a summary is
written: `summary.csv` is always the whole (every layer); a summary of selected layers
(`--layer_types`, `--exclude`) goes to `summary_filtered.csv` (or `--output`) with a
`layer_filter` column saying what was selected. Reads per-layer tables, writes CSVs.

Statistics: a layer whose fit failed (alpha is NaN) is left out of every alpha statistic
and counted in `num_fit_failed`; every other column skips its own NaNs, so a layer whose
fit failed still contributes its spectral norm, stable rank and entropy. `alpha_std` is
the sample standard deviation (ddof=1; NaN with fewer than two fitted layers); quartiles
interpolate linearly. `num_layers` and `total_params` count every selected layer.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from esd.analysis.results import load_per_layer, require_results, select_layers, write_csv_atomic

SUMMARY_COLUMNS = (
    "model_id", "is_adapter", "source_model", "num_layers", "num_fit_failed",
    "alpha_mean", "alpha_median", "alpha_std", "alpha_min", "alpha_max", "alpha_q25",
    "alpha_q75", "alpha_weighted_mean", "spectral_norm_mean", "spectral_norm_max",
    "log_spectral_norm_mean", "stable_rank_mean", "stable_rank_median", "entropy_mean",
    "entropy_median", "total_params",
)


def build_summary(per_layer_df, layer_types=None, exclude_patterns=None) -> pd.DataFrame:
    """One row per model with exactly SUMMARY_COLUMNS, sorted by model_id.

    A model whose every layer is filtered out keeps its row (num_layers 0, NaN statistics),
    so no model disappears from the summary without a trace.
    """
    selected = select_layers(per_layer_df, layer_types, exclude_patterns)
    chosen = {model_id: layers for model_id, layers in selected.groupby("model_id", sort=False)}
    rows = []
    for model_id, whole in per_layer_df.groupby("model_id", sort=True):
        rows.append(_summarise_model(model_id, whole, chosen.get(model_id, whole.iloc[:0])))
    summary = pd.DataFrame(rows, columns=list(SUMMARY_COLUMNS))
    for column in ("num_layers", "num_fit_failed"):
        summary[column] = summary[column].astype("int64")
    return summary


def _summarise_model(model_id, whole: pd.DataFrame, layers: pd.DataFrame) -> dict:
    def column(name) -> pd.Series:
        if name not in layers:
            return pd.Series(dtype=float)
        return pd.to_numeric(layers[name], errors="coerce").replace([np.inf, -np.inf], np.nan)

    alpha = column("alpha")
    fitted = alpha.dropna()
    spectral = column("spectral_norm").dropna()
    stable = column("stable_rank").dropna()
    entropy = column("entropy").dropna()
    params = column("params")
    return {
        "model_id": model_id,
        "is_adapter": _first(whole, "is_adapter"),
        "source_model": _first(whole, "source_model"),
        "num_layers": len(layers),
        "num_fit_failed": int(alpha.isna().sum()),
        "alpha_mean": _stat(fitted, "mean"),
        "alpha_median": _stat(fitted, "median"),
        "alpha_std": fitted.std(ddof=1) if len(fitted) > 1 else np.nan,
        "alpha_min": _stat(fitted, "min"),
        "alpha_max": _stat(fitted, "max"),
        "alpha_q25": fitted.quantile(0.25) if len(fitted) else np.nan,
        "alpha_q75": fitted.quantile(0.75) if len(fitted) else np.nan,
        "alpha_weighted_mean": _stat(column("alpha_weighted").dropna(), "mean"),
        "spectral_norm_mean": _stat(spectral, "mean"),
        "spectral_norm_max": _stat(spectral, "max"),
        "log_spectral_norm_mean": _stat(column("log_spectral_norm").dropna(), "mean"),
        "stable_rank_mean": _stat(stable, "mean"),
        "stable_rank_median": _stat(stable, "median"),
        "entropy_mean": _stat(entropy, "mean"),
        "entropy_median": _stat(entropy, "median"),
        "total_params": int(params.fillna(0).sum()),
    }


def _stat(values: pd.Series, name: str) -> float:
    return float(getattr(values, name)()) if len(values) else np.nan


def _first(frame: pd.DataFrame, column: str):
    if column not in frame:
        return np.nan
    values = frame[column].dropna()
    return values.iloc[0] if len(values) else np.nan


def describe_layer_filter(layer_types=None, exclude_patterns=None) -> str:
    """`layer_types=linear; exclude=embed lm_head`, or "" when every layer is selected."""
    parts = []
    if layer_types:
        parts.append("layer_types=" + " ".join(layer_types))
    if exclude_patterns:
        parts.append("exclude=" + " ".join(exclude_patterns))
    return "; ".join(parts)


def filtered_summary(per_layer, layer_types=None, exclude_patterns=None) -> pd.DataFrame:
    """The summary of the selected layers, with a `layer_filter` column naming the selection."""
    summary = build_summary(per_layer, layer_types, exclude_patterns)
    summary["layer_filter"] = describe_layer_filter(layer_types, exclude_patterns)
    return summary


def write_summary(results_dir, output=None, layer_types=None, exclude_patterns=None,
                  per_layer=None) -> Path:
    """Write the summary of `results_dir` (atomically) and return its path.

    Every layer: to `output` (default `results_dir/summary.csv`). Selected layers: the whole
    still goes to `summary.csv`, the selection to `output` (default `summary_filtered.csv`)
    with its `layer_filter` column, so `summary.csv` is never a partial view."""
    results_dir = Path(results_dir)
    if per_layer is None:
        per_layer = require_results(load_per_layer(results_dir), results_dir)
    whole = build_summary(per_layer)
    if not describe_layer_filter(layer_types, exclude_patterns):
        return write_csv_atomic(whole, Path(output) if output else results_dir / "summary.csv")
    write_csv_atomic(whole, results_dir / "summary.csv")
    return write_csv_atomic(filtered_summary(per_layer, layer_types, exclude_patterns),
                            Path(output) if output else results_dir / "summary_filtered.csv")
