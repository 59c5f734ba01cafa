"""Everything that happens after the workers: per-model CSVs ─► summary.csv, queries,
plots, a self-contained report.html, and metrics over training steps.

    python analyze_results.py --results_dir results/ [--output CSV] [--verbose]
        [--layer_types linear conv2d] [--exclude embed lm_head]
        [--filter "alpha_mean<3" "is_adapter=True"] [--sort_by COL [--descending]]
        [--show COL …] [--hide COL …] [--limit N] [--list_columns]
        [--plots] [--metric alpha_mean] [--esd_layer LONGNAME] [--report]
        [--over_steps [--model_list LIST] [--metrics alpha stable_rank spectral_norm]]

Owns: reading per-model CSVs (recognised by their columns, not their names), the model
summary (columns fixed by interface.md), the query language, the plots, the report and
the over-steps table. Reads only files under the results directory (and the model list
it is given); never loads a model and computes no spectral metric itself.

Statistics: a layer whose fit failed (alpha is NaN) is left out of every alpha statistic
and counted in `num_fit_failed`; every other column skips its own NaNs, so a layer whose
fit failed still contributes its spectral norm, stable rank and entropy. `alpha_std` is
the sample standard deviation (ddof=1; NaN with fewer than two fitted layers); quartiles
interpolate linearly. `num_layers` and `total_params` count every selected layer.

Layer selection (`--layer_types`, `--exclude`) applies to everything: summary, plots,
report and over-steps. `--exclude` patterns are Python regular expressions searched
anywhere in the layer's longname (case-sensitive): `embed` drops `model.embed_tokens`,
`lm_head` drops `lm_head`, `^transformer\\.wte$` one exact layer.

Plots (`DIR/plots/`, PNG): `alpha_distribution.png` (box per model), `alpha_by_depth.png`
(small multiples, one panel per model), `compare_<metric>.png` (bars), `esd/<safe_id>.png`
(with `eigs/`: log-log ESD, fitted power law, xmin; default layers: lowest, median and
highest alpha), `over_steps_<metric>.png`. The file count does not grow with the number
of models: beyond the caps below a plot shows the models at both ends of the ranking.
Over steps: `over_steps.csv` (one row per checkpoint, ordered by step: mean and median of
each metric) and `over_steps_layers.csv` (one row per checkpoint and layer).
"""
from __future__ import annotations

import argparse
import base64
import html
import io
import math
import os
import re
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd

from esd.atomic_files import atomic_path, write_text_atomic
from esd.cli_flags import FlagParser, add_flag
from esd.failures import FAILED_MODELS_TXT, read_failures

SUMMARY_COLUMNS = (
    "model_id", "is_adapter", "source_model", "num_layers", "num_fit_failed",
    "alpha_mean", "alpha_median", "alpha_std", "alpha_min", "alpha_max", "alpha_q25",
    "alpha_q75", "alpha_weighted_mean", "spectral_norm_mean", "spectral_norm_max",
    "log_spectral_norm_mean", "stable_rank_mean", "stable_rank_median", "entropy_mean",
    "entropy_median", "total_params",
)
PER_MODEL_KEY_COLUMNS = ("model_id", "longname", "alpha")   # what makes a CSV a per-model CSV
LAYER_TYPES = ("linear", "conv1d", "conv2d", "embedding")
OWN_OUTPUTS = ("summary.csv", "over_steps.csv", "over_steps_layers.csv")
DEFAULT_STEP_METRICS = ("alpha", "stable_rank", "spectral_norm")

# Bounds that keep the plot count and size fixed however many models there are. Beyond
# a cap, plots show the models at both ends of the ranking (half highest, half lowest).
MAX_MODELS_PER_PLOT = 40      # boxes in the alpha distribution, bars in the comparison
MAX_DEPTH_PANELS = 24         # small multiples of alpha by depth
MAX_ESD_MODELS = 8            # one ESD figure per model with saved eigenvalues
ESD_LAYERS_PER_MODEL = 3      # default: the layers with the lowest, median and highest alpha
MAX_STEP_RUNS = 6             # training runs drawn in each over-steps figure

CHECKPOINT_STEP = re.compile(r"checkpoint[_-](\d+)")
FINAL_CHECKPOINT = re.compile(r"(^|[/\\])final_checkpoint([/\\]|$)")
REVISION_STEP = re.compile(r"@step(\d+)$")     # hub revisions such as Pythia's org/name@step3000
FILTER_EXPR = re.compile(r"^\s*(.+?)\s*(<=|>=|!=|==|=|<|>|~)\s*(.*?)\s*$")


class AnalysisError(ValueError):
    """The request cannot be answered; the message says why and what would work."""


# ================================================================ loading

def load_per_layer(results_dir) -> pd.DataFrame:
    """All per-model CSVs of `results_dir`, concatenated in file-name order.

    A per-model CSV is any `*.csv` with the columns model_id, longname and alpha that
    holds one model (summary.csv, run tables and model lists are skipped). Added columns:
    `layer_index` (position in its model, 0 = first = shallowest) and `result_file`
    (the CSV's stem, i.e. the model's safe id; `eigs/<result_file>.npz` holds its
    eigenvalues when the run used --save_eigs).
    """
    results_dir = Path(results_dir)
    if not results_dir.is_dir():
        raise AnalysisError(f"results directory {results_dir} does not exist")
    frames = []
    for path in sorted(results_dir.glob("*.csv")):
        if path.name in OWN_OUTPUTS:
            continue
        frame = _read_per_model_csv(path)
        if frame is not None and len(frame):
            frames.append(frame)
    if not frames:
        return pd.DataFrame(columns=[*PER_MODEL_KEY_COLUMNS, "layer_index", "result_file"])
    return pd.concat(frames, ignore_index=True)


def _read_per_model_csv(path: Path) -> pd.DataFrame | None:
    try:
        header = pd.read_csv(path, nrows=0).columns
        if not set(PER_MODEL_KEY_COLUMNS) <= set(header):
            return None
        frame = pd.read_csv(path)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as error:
        print(f"warning: {path}: unreadable CSV skipped ({error})", file=sys.stderr)
        return None
    if frame["model_id"].nunique() > 1:
        return None     # a table of many models (e.g. someone's merged export), not a result
    frame["layer_index"] = np.arange(len(frame))
    frame["result_file"] = path.stem
    return frame


def select_layers(per_layer: pd.DataFrame, layer_types=None, exclude_patterns=None) -> pd.DataFrame:
    """The rows of the chosen layer types whose longname matches no exclude pattern."""
    selected = per_layer
    if layer_types:
        unknown = sorted(set(layer_types) - set(LAYER_TYPES))
        if unknown:
            raise AnalysisError(f"unknown layer type(s) {unknown}; choose from {list(LAYER_TYPES)}")
        selected = selected[selected["layer_type"].isin(list(layer_types))]
    for pattern in exclude_patterns or ():
        try:
            regex = re.compile(pattern)
        except re.error as error:
            raise AnalysisError(f"--exclude {pattern!r} is not a regular expression ({error}); "
                                f"e.g. use 'embed' or '.*embed.*', not '*embed*'") from None
        names = selected["longname"].astype(str)
        selected = selected[~names.map(lambda name: bool(regex.search(name)))]
    return selected


# ================================================================ summary

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


def write_summary(results_dir, output=None, layer_types=None, exclude_patterns=None) -> Path:
    """Build the summary of `results_dir` and write it (atomically) to `output`
    (default `results_dir/summary.csv`)."""
    per_layer = _require_results(load_per_layer(results_dir), results_dir)
    summary = build_summary(per_layer, layer_types, exclude_patterns)
    return _write_csv_atomic(summary, Path(output) if output else Path(results_dir) / "summary.csv")


def _require_results(per_layer: pd.DataFrame, results_dir) -> pd.DataFrame:
    if per_layer.empty:
        raise AnalysisError(f"no per-model result CSVs (with columns model_id, longname, alpha) "
                            f"in {results_dir}")
    return per_layer


def _write_csv_atomic(frame: pd.DataFrame, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        frame.to_csv(tmp, index=False)
    return path


# ================================================================ queries

def parse_filter(expression: str, frame: pd.DataFrame):
    """`"alpha_mean<3"` → ("alpha_mean", "<", 3.0), the value typed after its column."""
    match = FILTER_EXPR.match(expression)
    if not match:
        raise AnalysisError(f"cannot read filter {expression!r}: write COLUMN OP VALUE with OP "
                            f"one of = != < <= > >= ~ (regex match), e.g. \"alpha_mean<3\"")
    column, op, text = match.groups()
    if column not in frame.columns:
        raise AnalysisError(f"unknown column {column!r} in filter {expression!r}; columns: "
                            f"{', '.join(frame.columns)}")
    text = text.strip().strip("'\"")
    series = frame[column]
    if op == "~":
        try:
            return column, op, re.compile(text)
        except re.error as error:
            raise AnalysisError(f"filter {expression!r}: bad regular expression ({error})") from None
    if pd.api.types.is_bool_dtype(series) or _looks_boolean(series):
        value = _parse_bool(text)
        if value is None:
            raise AnalysisError(f"filter {expression!r}: {column} is true/false, not {text!r}")
        return column, op, value
    if pd.api.types.is_numeric_dtype(series):
        try:
            return column, op, float(text)
        except ValueError:
            raise AnalysisError(f"filter {expression!r}: {column} is numeric, {text!r} is not a "
                                f"number") from None
    return column, op, text


def apply_filters(frame: pd.DataFrame, expressions) -> pd.DataFrame:
    """Rows meeting every filter; comparisons with a missing value are false."""
    for expression in expressions or ():
        column, op, value = parse_filter(expression, frame)
        series = frame[column]
        if isinstance(value, bool):
            series = series.map(_parse_bool_value)
        if op == "~":
            mask = series.astype(str).map(lambda s: bool(value.search(s)))
        else:
            present = series.notna()
            compare = {"=": series.eq, "==": series.eq, "!=": series.ne, "<": series.lt,
                       "<=": series.le, ">": series.gt, ">=": series.ge}[op]
            mask = compare(value).fillna(False).astype(bool) & present
        frame = frame[mask.to_numpy(dtype=bool)]
    return frame


def query_summary(summary, filters=None, sort_by=None, descending=False, show=None,
                  hide=None, limit=None) -> pd.DataFrame:
    """The experiment-tracker view: filter, sort, choose columns, limit."""
    result = apply_filters(summary, filters)
    for name, columns in (("--sort_by", [sort_by] if sort_by else []), ("--show", show or []),
                          ("--hide", hide or [])):
        unknown = [c for c in columns if c not in summary.columns]
        if unknown:
            raise AnalysisError(f"{name}: unknown column(s) {unknown}; columns: "
                                f"{', '.join(summary.columns)}")
    if sort_by:
        result = result.sort_values(sort_by, ascending=not descending, na_position="last",
                                    kind="stable")
    if show:
        result = result[list(show)]
    if hide:
        result = result.drop(columns=list(hide))
    if limit is not None:
        result = result.head(limit)
    return result


def format_table(frame: pd.DataFrame) -> str:
    if frame.empty:
        return "(no models match)"
    return frame.to_string(index=False, float_format=lambda x: f"{x:.4g}", na_rep="NaN")


def _looks_boolean(series: pd.Series) -> bool:
    values = series.dropna()
    return len(values) > 0 and values.map(lambda v: _parse_bool_value(v) is not None).all()


def _parse_bool(text: str):
    return {"true": True, "false": False, "yes": True, "no": False, "1": True,
            "0": False}.get(text.strip().lower())


def _parse_bool_value(value):
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    if isinstance(value, str):
        return {"true": True, "false": False}.get(value.strip().lower())
    return None


def describe_extremes(summary: pd.DataFrame, n: int = 5) -> str:
    """The --verbose report: the models at both ends of the key metrics."""
    lines = [f"{len(summary)} models, {int(summary['num_layers'].sum())} layers, "
             f"{int(summary['num_fit_failed'].sum())} failed fits"]
    for metric in ("alpha_mean", "alpha_weighted_mean", "spectral_norm_max", "stable_rank_mean",
                   "entropy_mean"):
        ranked = summary.dropna(subset=[metric]).sort_values(metric, kind="stable")
        if ranked.empty:
            continue
        view = ["model_id", metric, "num_layers"]
        if len(ranked) <= 2 * n:
            lines += ["", f"by {metric}, highest first:", format_table(ranked.iloc[::-1][view])]
        else:
            lines += ["", f"highest {metric}:", format_table(ranked.tail(n).iloc[::-1][view]),
                      f"lowest {metric}:", format_table(ranked.head(n)[view])]
    failed = summary[summary["num_fit_failed"] > 0].sort_values("num_fit_failed", ascending=False)
    if len(failed):
        lines += ["", "models with failed fits:",
                  format_table(failed.head(n)[["model_id", "num_fit_failed", "num_layers"]])]
    return "\n".join(lines)


# ================================================================ plots

def _pyplot():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def pick_models(summary: pd.DataFrame, metric: str, cap: int) -> tuple[list, str]:
    """All model ids ranked by `metric` (high first), or the cap/2 highest and lowest."""
    ranked = summary.sort_values(metric, ascending=False, na_position="last", kind="stable")
    ids = list(ranked["model_id"])
    if len(ids) <= cap:
        return ids, ""
    top, bottom = ids[:cap // 2], ids[len(ids) - (cap - cap // 2):]
    return top + bottom, f" ({cap // 2} highest and {cap - cap // 2} lowest {metric} of {len(ids)})"


def plot_alpha_distribution(per_layer, summary, path) -> Path:
    """Box plot of the layer alphas of each model (one box per model, fitted layers only)."""
    plt = _pyplot()
    ids, note = pick_models(summary, "alpha_median", MAX_MODELS_PER_PLOT)
    data = [per_layer.loc[per_layer["model_id"] == m, "alpha"].dropna().to_numpy() for m in ids]
    fig, ax = plt.subplots(figsize=(10, 1.5 + 0.32 * len(ids)))
    ax.boxplot([d if len(d) else [np.nan] for d in data], orientation="horizontal", widths=0.6)
    ax.set_yticks(range(1, len(ids) + 1), [_short(m) for m in ids], fontsize=8)
    ax.invert_yaxis()
    ax.axvline(2, color="grey", lw=0.8, ls="--")
    ax.axvline(6, color="grey", lw=0.8, ls="--")
    ax.set_xlabel("layer alpha (dashed: 2 and 6, the usual well-trained range)")
    ax.set_title(f"Distribution of layer alphas per model{note}", fontsize=10)
    fig.tight_layout()
    return _save(fig, path)


def plot_alpha_by_depth(per_layer, summary, path) -> Path:
    """Small multiples: each model's layer alphas in model order, coloured by layer type."""
    plt = _pyplot()
    ids, note = pick_models(summary, "alpha_mean", MAX_DEPTH_PANELS)
    cols = min(4, len(ids))
    rows = math.ceil(len(ids) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.6 * cols, 2.6 * rows + 0.6), squeeze=False,
                             sharey=True)
    colors = dict(zip(LAYER_TYPES, ("tab:blue", "tab:orange", "tab:green", "tab:red")))
    for ax, model_id in zip(axes.flat, ids):
        layers = per_layer[per_layer["model_id"] == model_id]
        ax.plot(layers["layer_index"], layers["alpha"], color="lightgrey", lw=0.8, zorder=1)
        for layer_type, group in layers.groupby("layer_type"):
            ax.scatter(group["layer_index"], group["alpha"], s=10, zorder=2,
                       color=colors.get(layer_type, "black"), label=layer_type)
        mean = summary.loc[summary["model_id"] == model_id, "alpha_mean"].iloc[0]
        ax.set_title(f"{_short(model_id, 36)} (mean {mean:.2f})", fontsize=8)
        ax.tick_params(labelsize=7)
    for ax in axes.flat[len(ids):]:
        ax.set_visible(False)
    handles = {}
    for ax in axes.flat[:len(ids)]:
        for handle, label in zip(*ax.get_legend_handles_labels()):
            handles.setdefault(label, handle)
    fig.legend(handles.values(), handles.keys(), loc="upper right", ncol=4, fontsize=8)
    fig.supxlabel("layer index (model order, 0 = first)", fontsize=9)
    fig.supylabel("alpha", fontsize=9)
    fig.suptitle(f"Alpha by layer depth{note}", fontsize=10, x=0.02, ha="left")
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.45 / fig.get_figheight()))
    return _save(fig, path)


def plot_metric_comparison(summary, metric, path) -> Path:
    """Horizontal bars of one summary metric, one bar per model, sorted."""
    plt = _pyplot()
    if metric not in summary.columns or not pd.api.types.is_numeric_dtype(summary[metric]):
        numeric = [c for c in summary.columns if pd.api.types.is_numeric_dtype(summary[c])]
        raise AnalysisError(f"--metric {metric!r} is not a numeric summary column; choose from "
                            f"{', '.join(numeric)}")
    ids, note = pick_models(summary, metric, MAX_MODELS_PER_PLOT)
    values = summary.set_index("model_id").loc[ids, metric]
    fig, ax = plt.subplots(figsize=(10, 1.5 + 0.3 * len(ids)))
    ax.barh(range(len(ids)), values.fillna(0).to_numpy(), color="tab:blue")
    ax.set_yticks(range(len(ids)), [_short(m) for m in ids], fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel(metric)
    ax.set_title(f"{metric} by model{note}", fontsize=10)
    fig.tight_layout()
    return _save(fig, path)


def esd_layers(per_layer: pd.DataFrame, model_id, esd_layer=None) -> pd.DataFrame:
    """The layers whose ESD is drawn: `esd_layer` if given, else the fitted layers with
    the lowest, median and highest alpha (the most telling three)."""
    layers = per_layer[per_layer["model_id"] == model_id]
    if esd_layer:
        return layers[layers["longname"] == esd_layer]
    fitted = layers.dropna(subset=["alpha"]).sort_values("alpha", kind="stable")
    if len(fitted) <= ESD_LAYERS_PER_MODEL:
        return fitted
    picks = sorted({0, len(fitted) // 2, len(fitted) - 1})
    return fitted.iloc[picks]


def plot_esd(eigenvalues: np.ndarray, layer: pd.Series, ax) -> None:
    """Log-log histogram density of one layer's eigenvalues, the fitted power law
    p(x) ∝ x^-alpha over [xmin, xmax] (scaled to the tail's share of the eigenvalues),
    and xmin marked."""
    from matplotlib.ticker import NullFormatter
    x = np.asarray(eigenvalues, dtype=float)
    x = x[np.isfinite(x) & (x > 0)]
    if len(x) < 2:
        ax.text(0.5, 0.5, "no positive eigenvalues", ha="center", transform=ax.transAxes)
        return
    bins = np.logspace(np.log10(x.min()), np.log10(x.max()), 50)
    ax.hist(x, bins=bins, density=True, color="tab:blue", alpha=0.6, label="ESD")
    alpha, xmin, xmax = (float(layer.get(k, np.nan)) for k in ("alpha", "xmin", "xmax"))
    if np.isfinite(alpha) and np.isfinite(xmin) and xmin > 0:
        tail_share = np.mean(x >= xmin)
        top = xmax if np.isfinite(xmax) and xmax > xmin else x.max()
        grid = np.logspace(np.log10(xmin), np.log10(top), 50)
        density = tail_share * (alpha - 1) / xmin * (grid / xmin) ** (-alpha)
        ax.plot(grid, density, color="tab:red", lw=2, label=f"power law, alpha={alpha:.2f}")
        ax.axvline(xmin, color="black", ls="--", lw=1, label=f"xmin={xmin:.3g}")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.xaxis.set_minor_formatter(NullFormatter())   # minor labels overlap on short ranges
    ax.yaxis.set_minor_formatter(NullFormatter())
    ax.set_xlabel("eigenvalue λ", fontsize=8)
    ax.set_ylabel("density", fontsize=8)
    ax.set_title(f"{_short(str(layer['longname']), 45)} ({layer.get('fit_status', '')})", fontsize=8)
    ax.legend(fontsize=7)
    ax.tick_params(labelsize=7)


def plot_esds(results_dir, per_layer, summary, esd_layer=None) -> list[Path]:
    """One figure per model with saved eigenvalues (at most MAX_ESD_MODELS: the extremes
    by alpha_mean), one panel per chosen layer. Nothing without an `eigs/` directory."""
    eigs_dir = Path(results_dir) / "eigs"
    if not eigs_dir.is_dir():
        if esd_layer:
            raise AnalysisError(f"--esd_layer needs eigenvalues: {eigs_dir} does not exist "
                                f"(run the experiment with --save_eigs)")
        return []
    files = per_layer.drop_duplicates("model_id").set_index("model_id")["result_file"]
    with_eigs = summary[summary["model_id"].map(lambda m: (eigs_dir / f"{files[m]}.npz").exists())]
    ids, _ = pick_models(with_eigs, "alpha_mean", MAX_ESD_MODELS)
    if esd_layer and not (per_layer["longname"] == esd_layer).any():
        raise AnalysisError(f"--esd_layer {esd_layer!r}: no layer of that name; e.g. "
                            f"{', '.join(per_layer['longname'].astype(str).unique()[:5])}")
    plt = _pyplot()
    paths = []
    for model_id in ids:
        layers = esd_layers(per_layer, model_id, esd_layer)
        with np.load(eigs_dir / f"{files[model_id]}.npz") as eigs:
            layers = layers[layers["longname"].isin(eigs.files)]
            if layers.empty:
                continue
            fig, axes = plt.subplots(1, len(layers), figsize=(4.2 * len(layers), 3.6), squeeze=False)
            for ax, (_, layer) in zip(axes.flat, layers.iterrows()):
                plot_esd(eigs[layer["longname"]], layer, ax)
        fig.suptitle(f"ESD of {_short(model_id, 70)}", fontsize=10)
        fig.tight_layout()
        paths.append(_save(fig, Path(results_dir) / "plots" / "esd" / f"{files[model_id]}.png"))
    return paths


def write_plots(results_dir, per_layer=None, summary=None, metric="alpha_mean", esd_layer=None,
                layer_types=None, exclude_patterns=None) -> list[Path]:
    """The standard plots under `results_dir/plots/`; returns their paths."""
    if per_layer is None:
        per_layer = _require_results(load_per_layer(results_dir), results_dir)
    selected = select_layers(per_layer, layer_types, exclude_patterns)
    if summary is None:
        summary = build_summary(per_layer, layer_types, exclude_patterns)
    plots = Path(results_dir) / "plots"
    return [
        plot_alpha_distribution(selected, summary, plots / "alpha_distribution.png"),
        plot_alpha_by_depth(selected, summary, plots / "alpha_by_depth.png"),
        plot_metric_comparison(summary, metric, plots / f"compare_{metric}.png"),
        *plot_esds(results_dir, selected, summary, esd_layer),
    ]


def _save(fig, path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        with atomic_path(path, suffix=".png") as tmp:  # savefig picks the format by extension
            fig.savefig(tmp, dpi=100)
    finally:
        _pyplot().close(fig)
    return path


def _short(text, width=45) -> str:
    text = str(text)
    return text if len(text) <= width else "…" + text[-(width - 1):]


# ================================================================ over training steps

def step_of_model_id(model_id: str) -> tuple[float, bool]:
    """(step, is_final) read from a checkpoint path (`checkpoint_<step>`, `checkpoint-<step>`,
    `final_checkpoint`) or a hub revision `@step<N>`; (nan, False) when it names no step."""
    found = CHECKPOINT_STEP.findall(str(model_id))
    if found:
        return float(found[-1]), False
    if FINAL_CHECKPOINT.search(str(model_id)):
        return np.nan, True
    found = REVISION_STEP.search(str(model_id))
    if found:
        return float(found.group(1)), False
    return np.nan, False


def _names_checkpoint(model_id) -> bool:
    step, is_final = step_of_model_id(model_id)
    return is_final or not np.isnan(step)


def steps_from_model_list(path) -> dict[str, float]:
    """{result file stem: step} from a model list's `step` column (empty steps omitted)."""
    import csv
    from esd.model_list import ID_COLUMNS, parse_model_id, safe_id
    path = Path(path)
    if not path.is_file():
        raise AnalysisError(f"model list {path} does not exist")
    steps = {}
    with path.open(newline="", encoding="utf-8-sig") as handle:
        reader = csv.DictReader(handle)
        columns = [(c or "").strip() for c in reader.fieldnames or []]
        id_column = next((c for c in ID_COLUMNS if c in columns), None)
        if id_column is None:
            raise AnalysisError(f"model list {path} has no id column ({list(ID_COLUMNS)}); "
                                f"found {columns}")
        for line_number, raw in enumerate(reader, start=2):
            row = {(k or "").strip(): (v or "").strip() for k, v in raw.items() if k}
            if not row.get(id_column):
                continue
            model_id, revision = parse_model_id(row[id_column])
            text = row.get("step", "")
            try:
                step = float(text) if text else np.nan
            except ValueError:
                raise AnalysisError(f"model list {path}, row {line_number}: step {text!r} is "
                                    f"not a number") from None
            steps[safe_id(model_id, revision)] = step
    return steps


def checkpoint_table(per_layer: pd.DataFrame, model_list=None) -> pd.DataFrame:
    """One row per checkpoint model: model_id, result_file, run, step, step_label.

    The step comes from the model list's `step` column, else from `checkpoint_<step>` in
    the id; `final_checkpoint` without a step is placed one typical interval after its
    run's last step and labelled `final`. With a model list only its models are kept;
    without one, every model whose id names a checkpoint.
    """
    models = per_layer.drop_duplicates("model_id")[["model_id", "result_file"]].copy()
    listed = steps_from_model_list(model_list) if model_list else None
    rows = []
    for model_id, result_file in models.itertuples(index=False):
        if listed is not None and result_file not in listed:
            continue
        path_step, is_final = step_of_model_id(model_id)
        by_revision = not is_final and not CHECKPOINT_STEP.search(str(model_id))
        if np.isnan(path_step) and not is_final:   # a revision may be in the file name only
            path_step, _ = step_of_model_id(result_file)
        step = listed.get(result_file, np.nan) if listed is not None else np.nan
        step = path_step if np.isnan(step) else step
        if np.isnan(step) and not is_final:
            continue
        if by_revision:     # org/name@step3000: the run is the hub model
            run = str(model_id).partition("@")[0]
        else:               # saved_models/<run_id>/checkpoint_<step>: the run is the directory
            run = os.path.dirname(str(model_id).rstrip("/\\")) or "."
        rows.append({"model_id": model_id, "result_file": result_file, "run": run,
                     "step": step, "is_final": is_final})
    table = pd.DataFrame(rows, columns=["model_id", "result_file", "run", "step", "is_final"])
    if listed is not None:
        missing = len(listed) - len(table)
        if missing > 0:
            print(f"warning: {missing} model(s) of {model_list} have no results (yet)",
                  file=sys.stderr)
    if table.empty:
        raise AnalysisError("no checkpoints to follow over steps: no model id names "
                            "checkpoint_<step> or final_checkpoint"
                            + (f" and {model_list} gives no steps" if model_list else
                               " (pass --model_list with a step column)"))
    for run, group in table.groupby("run"):
        known = np.sort(group["step"].dropna().unique())
        gap = float(np.median(np.diff(known))) if len(known) > 1 else 1.0
        last = known[-1] if len(known) else 0.0
        unknown = group.index[group["step"].isna()]
        table.loc[unknown, "step"] = last + gap
    table["step_label"] = [("final" if final else f"{step:g}")
                           for step, final in zip(table["step"], table["is_final"])]
    return table.sort_values(["run", "step", "is_final"], kind="stable").reset_index(drop=True)


def build_over_steps(per_layer, model_list=None, metrics=DEFAULT_STEP_METRICS):
    """(per-checkpoint table ordered by step, per-layer long table). The first has, per
    checkpoint, num_layers, num_fit_failed and the mean and median of each metric over
    layers (NaN skipped)."""
    unknown = [m for m in metrics if m not in per_layer.columns]
    if unknown:
        numeric = [c for c in per_layer.columns if pd.api.types.is_numeric_dtype(per_layer[c])]
        raise AnalysisError(f"--metrics: unknown per-layer column(s) {unknown}; choose from "
                            f"{', '.join(numeric)}")
    checkpoints = checkpoint_table(per_layer, model_list)
    # a model is its result file: two revisions of one hub id share a model_id, not a file
    layer_columns = ["result_file", "layer_index", "longname", "layer_type", *metrics]
    if "fit_status" in per_layer and "fit_status" not in metrics:
        layer_columns.append("fit_status")
    layers = checkpoints.merge(per_layer[list(dict.fromkeys(layer_columns))], on="result_file",
                               how="inner")
    layers = layers.sort_values(["run", "step", "is_final", "layer_index"], kind="stable")
    rows = []
    for _, checkpoint in checkpoints.iterrows():
        group = layers[layers["result_file"] == checkpoint["result_file"]]
        row = {k: checkpoint[k] for k in ("run", "step", "step_label", "model_id")}
        row["num_layers"] = len(group)
        row["num_fit_failed"] = int(group["alpha"].isna().sum()) if "alpha" in group else 0
        for metric in metrics:
            values = pd.to_numeric(group[metric], errors="coerce")
            row[f"{metric}_mean"] = values.mean()
            row[f"{metric}_median"] = values.median()
        rows.append(row)
    table = pd.DataFrame(rows)
    return table, layers.drop(columns=["is_final", "result_file"]).reset_index(drop=True)


def plot_over_steps(table, layers, metrics, plots_dir) -> list[Path]:
    """Per metric one figure: for each run (at most MAX_STEP_RUNS), every layer's value
    against step (coloured by depth) and the mean over layers with its 25–75% band."""
    plt = _pyplot()
    from matplotlib import cm, colors
    runs = list(dict.fromkeys(table["run"]))[:MAX_STEP_RUNS]
    paths = []
    for metric in metrics:
        fig, axes = plt.subplots(len(runs), 2, figsize=(12, 3.6 * len(runs)), squeeze=False)
        for (ax_layers, ax_mean), run in zip(axes, runs):
            run_layers = layers[layers["run"] == run]
            depth = colors.Normalize(0, max(1, run_layers["layer_index"].max()))
            for _, layer in run_layers.groupby("longname", sort=False):
                ax_layers.plot(layer["step"], layer[metric], lw=0.8, marker=".", ms=3,
                               color=cm.viridis(depth(layer["layer_index"].iloc[0])))
            fig.colorbar(cm.ScalarMappable(depth, cm.viridis), ax=ax_layers, label="layer index")
            per_step = run_layers.groupby("step")[metric]
            mean = per_step.mean()
            ax_mean.fill_between(mean.index, per_step.quantile(0.25), per_step.quantile(0.75),
                                 color="tab:blue", alpha=0.2, label="25–75% of layers")
            ax_mean.plot(mean.index, mean, color="tab:blue", marker="o", label="mean over layers")
            ax_mean.legend(fontsize=8)
            run_table = table[table["run"] == run]
            final_steps = run_table.loc[run_table["step_label"] == "final", "step"]
            for ax, title in ((ax_layers, f"{metric} per layer"), (ax_mean, f"mean {metric}")):
                if len(run_table) <= 12:
                    ax.set_xticks(run_table["step"], run_table["step_label"], fontsize=8)
                for step in final_steps:     # many checkpoints: numeric ticks, final marked
                    ax.axvline(step, color="grey", ls=":", lw=1)
                ax.set_xlabel("training step")
                ax.set_ylabel(metric)
                ax.set_title(f"{_short(run, 50)}: {title}", fontsize=9)
        fig.tight_layout()
        paths.append(_save(fig, Path(plots_dir) / f"over_steps_{metric}.png"))
    return paths


def write_over_steps(results_dir, model_list=None, metrics=DEFAULT_STEP_METRICS,
                     layer_types=None, exclude_patterns=None) -> tuple[Path, list[Path]]:
    """`results_dir/over_steps.csv` (one row per checkpoint, ordered by step),
    `over_steps_layers.csv` (one row per checkpoint and layer) and one plot per metric."""
    per_layer = _require_results(load_per_layer(results_dir), results_dir)
    selected = select_layers(per_layer, layer_types, exclude_patterns)
    table, layers = build_over_steps(selected, model_list, tuple(metrics))
    results_dir = Path(results_dir)
    path = _write_csv_atomic(table, results_dir / "over_steps.csv")
    _write_csv_atomic(layers, results_dir / "over_steps_layers.csv")
    return path, plot_over_steps(table, layers, metrics, results_dir / "plots")


# ================================================================ report

def read_failure_table(results_dir) -> pd.DataFrame:
    """Failed models from failures.jsonl, plus any line of failed_models.txt it lacks."""
    columns = ["model_id", "stage", "reason", "retryable", "attempts", "message"]
    records = read_failures(results_dir)
    rows = [{c: getattr(r, c) for c in columns} for r in records.values()]
    text_file = Path(results_dir) / FAILED_MODELS_TXT
    if text_file.exists():
        for line in text_file.read_text(encoding="utf-8", errors="replace").splitlines():
            model_id, _, rest = line.partition("\t")
            if not model_id.strip() or model_id in records:
                continue
            parts = [p.strip() for p in rest.split(":", 2)]
            stage, reason, message = (parts + ["", "", ""])[:3] if len(parts) == 3 else ("", "", rest)
            rows.append({"model_id": model_id, "stage": stage, "reason": reason,
                         "retryable": None, "attempts": None, "message": message})
    return pd.DataFrame(rows, columns=columns).sort_values("model_id", kind="stable")


def write_report(results_dir, layer_types=None, exclude_patterns=None, metric="alpha_mean",
                 esd_layer=None, model_list=None, metrics=DEFAULT_STEP_METRICS) -> Path:
    """`results_dir/report.html`: one file with every plot embedded (base64 PNG), the
    summary, layer fit statuses and failed models; opens in a browser without a server.
    Adds the over-steps section when some model is a training checkpoint."""
    results_dir = Path(results_dir)
    per_layer = load_per_layer(results_dir)
    failures = read_failure_table(results_dir)
    sections = [_overview_html(results_dir, per_layer, failures)]
    if not failures.empty:
        sections.append(_section("Failed models", _table_html(failures, scroll=True)))
    if not per_layer.empty:
        selected = select_layers(per_layer, layer_types, exclude_patterns)
        summary = build_summary(per_layer, layer_types, exclude_patterns)
        plots = write_plots(results_dir, per_layer, summary, metric, esd_layer,
                            layer_types, exclude_patterns)
        sections.append(_section("Models", "".join(_img_html(p) for p in plots[:3])))
        if plots[3:]:
            sections.append(_section("Empirical spectral densities",
                                     "".join(_img_html(p) for p in plots[3:])))
        if model_list or any(_names_checkpoint(m) for m in per_layer["model_id"].unique()):
            table_path, step_plots = write_over_steps(results_dir, model_list, metrics,
                                                      layer_types, exclude_patterns)
            sections.append(_section("Over training steps",
                                     _table_html(pd.read_csv(table_path), scroll=True)
                                     + "".join(_img_html(p) for p in step_plots)))
        sections.append(_section("Summary", _table_html(summary, scroll=True)))
        if "fit_status" in selected:
            statuses = (selected.groupby(["layer_type", "fit_status"]).size()
                        .rename("layers").reset_index())
            sections.append(_section("Layer fit status", _table_html(statuses)))
    page = _REPORT_TEMPLATE.format(title=html.escape(f"ESD report: {results_dir}"),
                                   body="\n".join(sections))
    return write_text_atomic(results_dir / "report.html", page)


def _overview_html(results_dir, per_layer, failures) -> str:
    models = per_layer["model_id"].nunique() if not per_layer.empty else 0
    failed_fits = int(per_layer["alpha"].isna().sum()) if not per_layer.empty else 0
    items = [("results directory", str(Path(results_dir).resolve())),
             ("generated", time.strftime("%Y-%m-%d %H:%M:%S")),
             ("models with results", models), ("layers", len(per_layer)),
             ("layers whose fit failed (NaN alpha)", failed_fits),
             ("failed models", len(failures))]
    rows = "".join(f"<tr><th>{html.escape(k)}</th><td>{html.escape(str(v))}</td></tr>"
                   for k, v in items)
    return _section("Overview", f'<table class="overview">{rows}</table>')


def _section(title, body) -> str:
    return f"<section><h2>{html.escape(title)}</h2>\n{body}\n</section>"


def _table_html(frame: pd.DataFrame, scroll=False) -> str:
    table = frame.to_html(index=False, na_rep="", border=0, classes="data",
                          float_format=lambda x: f"{x:.4g}")
    return f'<div class="scroll">{table}</div>' if scroll else table


def _img_html(path: Path) -> str:
    data = base64.b64encode(Path(path).read_bytes()).decode("ascii")
    name = html.escape(Path(path).name)
    return (f'<figure><img alt="{name}" src="data:image/png;base64,{data}">'
            f"<figcaption>{name}</figcaption></figure>")


_REPORT_TEMPLATE = """<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{title}</title>
<style>
body {{ font-family: sans-serif; margin: 1.5em; color: #222; }}
h1 {{ font-size: 1.4em; }} h2 {{ font-size: 1.15em; border-bottom: 1px solid #ccc; }}
table.data, table.overview {{ border-collapse: collapse; font-size: 0.8em; }}
table.data th, table.data td, table.overview th, table.overview td
  {{ border: 1px solid #ddd; padding: 2px 6px; text-align: right; }}
table.overview th, table.data td:first-child {{ text-align: left; }}
table.data th {{ background: #f0f0f0; position: sticky; top: 0; }}
div.scroll {{ max-height: 40em; overflow: auto; }}
figure {{ margin: 0.5em 0 1.5em 0; }} img {{ max-width: 100%; border: 1px solid #eee; }}
figcaption {{ font-size: 0.75em; color: #666; }}
</style></head>
<body><h1>{title}</h1>
{body}
</body></html>
"""


# ================================================================ command line

def build_parser() -> argparse.ArgumentParser:
    parser = FlagParser(
        description="Summarise, query and plot the per-model ESD results of a results directory.",
        epilog="Filters: COLUMN OP VALUE with OP in = != < <= > >= ~ (regex), e.g. "
               "--filter \"alpha_mean<3\" \"is_adapter=True\" \"model_id~llama\".")
    add_flag(parser, "--results_dir", required=True, metavar="DIR", help="the experiment's output_dir")
    add_flag(parser, "--output", metavar="CSV", help="summary path (default DIR/summary.csv)")
    add_flag(parser, "--verbose", action="store_true", help="print the most extreme models")
    layers = parser.add_argument_group("layer selection (applies to everything)")
    add_flag(layers, "--layer_types", nargs="+", metavar="TYPE", help=f"only {', '.join(LAYER_TYPES)}")
    add_flag(layers, "--exclude", nargs="+", metavar="REGEX", default=[],
         help="drop layers whose longname matches (re.search), e.g. embed lm_head")
    query = parser.add_argument_group("query the summary")
    add_flag(query, "--filter", nargs="+", metavar="EXPR", default=[], help="keep rows meeting all")
    add_flag(query, "--sort_by", metavar="COL")
    add_flag(query, "--descending", action="store_true")
    add_flag(query, "--show", nargs="+", metavar="COL", help="only these columns")
    add_flag(query, "--hide", nargs="+", metavar="COL", help="not these columns")
    add_flag(query, "--limit", type=int, metavar="N", help="at most N rows")
    add_flag(query, "--list_columns", action="store_true", help="list the summary's columns")
    plots = parser.add_argument_group("plots and report")
    add_flag(plots, "--plots", action="store_true", help="write plots under DIR/plots/")
    add_flag(plots, "--metric", default="alpha_mean", help="summary metric of the comparison chart")
    add_flag(plots, "--esd_layer", metavar="LONGNAME", help="ESD plot of this layer (needs eigs/)")
    add_flag(plots, "--report", action="store_true", help="write DIR/report.html (with all plots)")
    steps = parser.add_argument_group("over training steps")
    add_flag(steps, "--over_steps", action="store_true",
         help="metrics against checkpoint step: DIR/over_steps.csv and plots")
    add_flag(steps, "--model_list", metavar="CSV", help="model list with a step column")
    add_flag(steps, "--metrics", nargs="+", default=list(DEFAULT_STEP_METRICS), metavar="COL",
         help="per-layer columns to follow (default: alpha stable_rank spectral_norm)")
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if args.limit is not None and args.limit < 0:
        print("error: --limit must be 0 or more", file=sys.stderr)
        return 2
    try:
        return _run(args)
    except AnalysisError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2


def _run(args) -> int:
    filters = {"layer_types": args.layer_types, "exclude_patterns": args.exclude}
    per_layer = _require_results(load_per_layer(args.results_dir), args.results_dir)
    summary = build_summary(per_layer, **filters)
    if args.list_columns:
        for column in summary.columns:
            print(f"{column:24s} {summary[column].dtype}")
        return 0
    output = Path(args.output) if args.output else Path(args.results_dir) / "summary.csv"
    _write_csv_atomic(summary, output)
    print(f"summary of {len(summary)} models ({len(per_layer)} layers) written to {output}",
          file=sys.stderr)
    # Read back what was written, so filters see the same types a notebook would.
    view = query_summary(pd.read_csv(output), args.filter, args.sort_by, args.descending,
                         args.show, args.hide, args.limit)
    if any([args.filter, args.sort_by, args.show, args.hide, args.limit is not None]):
        print(format_table(view))
    if args.verbose:
        print(describe_extremes(summary))
    if args.plots and not args.report:
        for path in write_plots(args.results_dir, per_layer, summary, args.metric,
                                args.esd_layer, **filters):
            print(f"plot: {path}")
    if args.over_steps:
        table_path, step_plots = write_over_steps(args.results_dir, args.model_list,
                                                  args.metrics, **filters)
        print(format_table(pd.read_csv(table_path)))
        print(f"over-steps table: {table_path}")
        for path in step_plots:
            print(f"plot: {path}")
    if args.report:
        path = write_report(args.results_dir, metric=args.metric, esd_layer=args.esd_layer,
                            model_list=args.model_list, metrics=args.metrics, **filters)
        print(f"report: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
