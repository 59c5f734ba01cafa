"""The model summary: one row per model with the columns users' scripts depend on.

Owns how the statistics of `esd/metrics_table.py` (`SUMMARY_COLUMNS`, `SUMMARY_STATS`: which
columns, which statistic of which per-layer column) are computed, and where a summary is
written: `summary.csv` is always the whole (every weight layer); a summary of selected layers
(`--layer_types`, `--exclude`) goes to `summary_filtered.csv` (or `--output`) with a
`layer_filter` column saying what was selected. Reads per-layer tables, writes CSVs.

Layer modes: `summary.csv` is computed from the weight rows only, so a run with
--delta_from_base / --adapter_update has the same summary.csv as one without. The extra rows
get their own summary with the same columns, one file per mode, with only the models that
have such rows: `summary_delta_from_base.csv`, `summary_adapter_update.csv` (a filtered one:
`summary_<mode>_filtered.csv`).

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

from esd import metrics_table
from esd.analysis.listed import listed_rows, with_list_columns
from esd.analysis.results import (LAYER_MODES, AnalysisError, check_layer_mode, layer_modes, load_per_layer,
                                  require_results, select_layers, summary_file_name,
                                  write_csv_atomic)

# The columns and their statistics come from the one table of output columns.
SUMMARY_COLUMNS = metrics_table.SUMMARY_COLUMNS
_COUNTS = ("count", "nan_count")   # integer columns


def build_summary(per_layer_df, layer_types=None, exclude_patterns=None,
                  layer_mode: str = "weights") -> pd.DataFrame:
    """One row per model with exactly SUMMARY_COLUMNS, sorted by model_id, from the rows of
    `layer_mode` (default the weights; `esd.schema.LAYER_MODES`).

    A model whose every layer is filtered out keeps its row (num_layers 0, NaN statistics),
    so no model disappears from the summary without a trace. For another mode, only the
    models that have rows of that mode have a row.
    """
    selected = select_layers(per_layer_df, layer_types, exclude_patterns, layer_mode)
    chosen = {model_id: layers for model_id, layers in selected.groupby("model_id", sort=False)}
    having = None
    if layer_mode != "weights" and len(per_layer_df):
        having = set(per_layer_df.loc[layer_modes(per_layer_df) == layer_mode, "model_id"])
    rows = []
    for model_id, whole in per_layer_df.groupby("model_id", sort=True):
        if having is not None and model_id not in having:
            continue
        rows.append(_summarise_model(model_id, whole, chosen.get(model_id, whole.iloc[:0])))
    summary = pd.DataFrame(rows, columns=list(metrics_table.SUMMARY_COLUMNS))
    for stat in metrics_table.SUMMARY_STATS:
        if stat.statistic in _COUNTS:
            summary[stat.name] = summary[stat.name].astype("int64")
    return summary


def _summarise_model(model_id, whole: pd.DataFrame, layers: pd.DataFrame) -> dict:
    """SUMMARY_COLUMNS of one model: identity from all its rows (`whole`), statistics from
    the selected `layers`."""
    row = {}
    for stat in metrics_table.SUMMARY_STATS:
        if stat.statistic == "first":
            row[stat.name] = model_id if stat.of == "model_id" else _first(whole, stat.of)
        elif stat.statistic == "count":
            row[stat.name] = len(layers)
        else:
            row[stat.name] = _statistic(_numbers(layers, stat.of), stat.statistic)
    return row


def _numbers(layers: pd.DataFrame, name: str) -> pd.Series:
    """A per-layer column as floats, ±inf as NaN (a missing column: no values)."""
    if name not in layers:
        return pd.Series(dtype=float)
    return pd.to_numeric(layers[name], errors="coerce").replace([np.inf, -np.inf], np.nan)


def _statistic(values: pd.Series, statistic: str):
    """One STATISTICS entry of metrics_table over a column's values; NaNs skipped but by
    nan_count, NaN where there is no value to take it of."""
    if statistic == "nan_count":
        return int(values.isna().sum())
    if statistic == "sum":
        return int(values.fillna(0).sum())
    values = values.dropna()
    if statistic == "std":
        return values.std(ddof=1) if len(values) > 1 else np.nan
    if statistic in ("q25", "q75"):
        return values.quantile(int(statistic[1:]) / 100) if len(values) else np.nan
    return _stat(values, statistic)


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


def filtered_summary(per_layer, layer_types=None, exclude_patterns=None,
                     layer_mode: str = "weights") -> pd.DataFrame:
    """The summary of the selected layers, with a `layer_filter` column naming the selection."""
    summary = build_summary(per_layer, layer_types, exclude_patterns, layer_mode)
    summary["layer_filter"] = describe_layer_filter(layer_types, exclude_patterns)
    return summary


def mode_summaries(per_layer) -> dict[str, pd.DataFrame]:
    """{mode: its summary} for every mode other than the weights that has rows."""
    present = set(layer_modes(per_layer)) if len(per_layer) else set()
    return {mode: build_summary(per_layer, layer_mode=mode)
            for mode in LAYER_MODES if mode != "weights" and mode in present}


def write_mode_summaries(results_dir, per_layer) -> dict[str, pd.DataFrame]:
    """`summary_<mode>.csv` for each extra mode with rows (returned as {mode: summary}); one
    left from an earlier run whose rows are gone (recomputed with --overwrite without the
    flag) is removed."""
    results_dir = Path(results_dir)
    summaries = mode_summaries(per_layer)
    for mode in LAYER_MODES:
        stale = results_dir / summary_file_name(mode)
        if mode != "weights" and mode not in summaries and stale.is_file():
            stale.unlink()
    for mode, summary in summaries.items():
        write_csv_atomic(summary, results_dir / summary_file_name(mode))
    return summaries


def write_summary(results_dir, output=None, layer_types=None, exclude_patterns=None,
                  per_layer=None, layer_mode: str = "weights", model_list=None) -> Path:
    """Write the summary of `results_dir` (atomically) and return its path.

    Every layer: to `output` (default `results_dir/summary.csv`). Selected layers: the whole
    still goes to `summary.csv`, the selection to `output` (default `summary_filtered.csv`)
    with its `layer_filter` column, so `summary.csv` is never a partial view. The rows of
    the extra layer modes always get their `summary_<mode>.csv` too; `layer_mode` names the
    mode whose summary (selected or whole) goes to `output` and is returned.

    The model list's extra columns (`downloads`, `likes`, …: esd/analysis/listed.py, from the
    runs' copies of their lists and `model_list`) follow each model's statistics in
    `summary.csv` and the filtered summary."""
    results_dir = Path(results_dir)
    check_layer_mode(layer_mode)
    if per_layer is None:
        per_layer = require_results(load_per_layer(results_dir), results_dir)
    if layer_mode != "weights" and not (layer_modes(per_layer) == layer_mode).any():
        raise AnalysisError(f"no {layer_mode} rows in {results_dir}: they are computed by a run "
                            f"with --{layer_mode}")
    rows = listed_rows(results_dir, model_list)
    whole = with_list_columns(build_summary(per_layer), per_layer, rows)
    summaries = write_mode_summaries(results_dir, per_layer)
    if describe_layer_filter(layer_types, exclude_patterns):
        write_csv_atomic(whole, results_dir / "summary.csv")
        selected = filtered_summary(per_layer, layer_types, exclude_patterns, layer_mode)
        if layer_mode == "weights":
            selected = with_list_columns(selected, per_layer, rows)
        return write_csv_atomic(selected, Path(output) if output else
                                results_dir / summary_file_name(layer_mode, True))
    if layer_mode == "weights":
        return write_csv_atomic(whole, Path(output) if output else results_dir / "summary.csv")
    write_csv_atomic(whole, results_dir / "summary.csv")
    if output is None:
        return results_dir / summary_file_name(layer_mode)   # written by write_mode_summaries
    return write_csv_atomic(summaries[layer_mode], Path(output))
