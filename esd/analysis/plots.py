"""The standard figures (PNG under `DIR/plots/`), bounded however many models there are.

`alpha_distribution.png` (box per model), `alpha_by_depth.png` (small multiples, one panel
per model), `compare_<metric>.png` (dots on an axis fitted to the values), `esd/<safe_id>.png`
(with `eigs/`: log-log ESD, fitted power law, xmin; default layers: lowest, median and
highest alpha). Beyond the caps below a plot shows the models at both ends of the ranking.
Owns drawing only: reads tables and `eigs/*.npz`, computes no metric.
"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd

from esd.analysis.results import (LAYER_TYPES, AnalysisError, load_per_layer, require_results, select_layers,
                                  well_trained_range)
from esd.analysis.queries import numeric_columns
from esd.analysis.summary import build_summary
from esd.atomic_files import atomic_path


# Bounds that keep the plot count and size fixed however many models there are. Beyond
# a cap, plots show the models at both ends of the ranking (half highest, half lowest).
MAX_MODELS_PER_PLOT = 40      # boxes in the alpha distribution, bars in the comparison
MAX_DEPTH_PANELS = 24         # small multiples of alpha by depth
MAX_ESD_MODELS = 8            # one ESD figure per model with saved eigenvalues
ESD_LAYERS_PER_MODEL = 3      # default: the layers with the lowest, median and highest alpha


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


def plot_alpha_distribution(per_layer, summary, path, alpha_range=None) -> Path:
    """Box plot of the layer alphas of each model (one box per model, fitted layers only).
    `alpha_range` (results.well_trained_range): the usual well-trained range, dashed, only
    where the fit supports it (never for xmin_mid alphas)."""
    plt = _pyplot()
    ids, note = pick_models(summary, "alpha_median", MAX_MODELS_PER_PLOT)
    data = [per_layer.loc[per_layer["model_id"] == m, "alpha"].dropna().to_numpy() for m in ids]
    fig, ax = plt.subplots(figsize=(10, 1.5 + 0.32 * len(ids)))
    ax.boxplot([d if len(d) else [np.nan] for d in data], orientation="horizontal", widths=0.6)
    ax.set_yticks(range(1, len(ids) + 1), [_short(m) for m in ids], fontsize=8)
    ax.invert_yaxis()
    if alpha_range:
        for bound in alpha_range:
            ax.axvline(bound, color="grey", lw=0.8, ls="--")
        ax.set_xlabel(f"layer alpha (dashed: {alpha_range[0]:g} and {alpha_range[1]:g}, the usual "
                      f"well-trained range of WeightWatcher-scale fits)")
    else:
        ax.set_xlabel("layer alpha (compare models with each other; the 2–6 range holds "
                      "only for fits such as --fix_fingers DKS)")
    ax.set_title(f"Distribution of layer alphas per model{note}", fontsize=10)
    fig.tight_layout()
    return _save(fig, path)


def plot_alpha_by_depth(per_layer, summary, path) -> Path:
    """Small multiples: each model's layer alphas in model order, coloured by layer type."""
    plt = _pyplot()
    ids, note = pick_models(summary, "alpha_mean", MAX_DEPTH_PANELS)
    cols = min(4, len(ids))
    rows = math.ceil(len(ids) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.6 * cols, 2.4 * rows + 0.9), squeeze=False,
                             sharey=True, layout="constrained")
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
    # the legend sits beside the title, in the layout's own margin (no band above the panels)
    fig.legend(handles.values(), handles.keys(), loc="outside upper right", ncol=4, fontsize=8)
    fig.supxlabel("layer index (model order, 0 = first)", fontsize=9)
    fig.supylabel("alpha", fontsize=9)
    fig.suptitle(f"Alpha by layer depth{note}", fontsize=10, x=0.02, ha="left")
    return _save(fig, path)


def plot_metric_comparison(summary, metric, path) -> Path:
    """One dot per model on an axis fitted to the values (sorted), each value written beside
    its dot: bars from 0 would hide a difference of 1e-4 between an adapter and its base."""
    plt = _pyplot()
    if metric not in numeric_columns(summary):
        raise AnalysisError(f"--metric {metric!r} is not a numeric summary column; choose from "
                            f"{', '.join(numeric_columns(summary))}")
    ids, note = pick_models(summary, metric, MAX_MODELS_PER_PLOT)
    values = summary.set_index("model_id").loc[ids, metric].astype(float)
    fig, ax = plt.subplots(figsize=(10, 1.4 + 0.32 * len(ids)))
    positions = np.arange(len(ids))
    finite = values[np.isfinite(values)]
    ax.hlines(positions, finite.min() if len(finite) else 0, values.fillna(np.nan), color="#ccc", lw=1)
    ax.plot(values.to_numpy(), positions, "o", color="tab:blue")
    if len(finite):
        low, high = float(finite.min()), float(finite.max())
        pad = (high - low) * 0.25 or abs(high) * 0.01 or 1.0
        ax.set_xlim(low - pad, high + pad)
        digits = _digits_to_tell_apart(finite.to_numpy())
        for y, value in zip(positions, values):
            label = f"{value:.{digits}g}" if np.isfinite(value) else "NaN"
            ax.annotate(label, (value if np.isfinite(value) else low, y), xytext=(6, 0),
                        textcoords="offset points", va="center", fontsize=7)
    ax.ticklabel_format(axis="x", useOffset=False, style="plain")
    ax.set_yticks(positions, [_short(m) for m in ids], fontsize=8)
    ax.set_ylim(len(ids) - 0.5, -0.5)
    ax.set_xlabel(f"{metric} (axis fitted to the values, not from 0)")
    ax.set_title(f"{metric} by model{note}", fontsize=10)
    ax.grid(axis="x", color="#eee")
    fig.tight_layout()
    return _save(fig, path)


def _digits_to_tell_apart(values: np.ndarray) -> int:
    """Significant digits that show the smallest difference between distinct values."""
    distinct = np.unique(values)
    if len(distinct) < 2:
        return 4
    gap = float(np.min(np.diff(distinct)))
    scale = float(np.max(np.abs(distinct))) or 1.0
    return int(min(12, max(4, np.ceil(np.log10(scale / gap)) + 2)))


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
    _label_log_axes(ax)
    ax.set_xlabel("eigenvalue λ", fontsize=8)
    ax.set_ylabel("density", fontsize=8)
    ax.set_title(f"{_short(str(layer['longname']), 45)} ({layer.get('fit_status', '')})", fontsize=8)
    ax.legend(fontsize=7)
    ax.tick_params(labelsize=7)


def _label_log_axes(ax) -> None:
    """Labelled ticks on both log axes of every panel: decades on a wide range, 1-2-5 steps
    within a decade or two (where matplotlib's default may label nothing)."""
    from matplotlib.ticker import LogFormatterSciNotation, LogLocator, NullFormatter
    for axis, limits in ((ax.xaxis, ax.get_xlim()), (ax.yaxis, ax.get_ylim())):
        low, high = sorted(limits)
        decades = np.log10(high / low) if low > 0 and high > 0 else 0.0
        if decades > 2.5:
            axis.set_major_locator(LogLocator(base=10, numticks=12))
            axis.set_major_formatter(LogFormatterSciNotation())
        else:
            axis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0), numticks=12))
            axis.set_major_formatter(LogFormatterSciNotation(labelOnlyBase=False))
        axis.set_minor_formatter(NullFormatter())   # minor labels overlap on short ranges


def plot_esds(results_dir, per_layer, summary, esd_layer=None, plots_dir=None) -> list[Path]:
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
        paths.append(_save(fig, Path(plots_dir or Path(results_dir) / "plots") / "esd"
                           / f"{files[model_id]}.png"))
    return paths


def write_plots(results_dir, per_layer=None, summary=None, metric="alpha_mean", esd_layer=None,
                layer_types=None, exclude_patterns=None, layer_mode="weights") -> list[Path]:
    """The standard plots under `results_dir/plots/` (those of another layer mode than the
    weights under `plots/<mode>/`, drawn from that mode's rows only); returns their paths."""
    if per_layer is None:
        per_layer = require_results(load_per_layer(results_dir), results_dir)
    selected = select_layers(per_layer, layer_types, exclude_patterns, layer_mode)
    if selected.empty and layer_mode != "weights":
        raise AnalysisError(f"no {layer_mode} rows to plot (computed by a run with --{layer_mode})")
    if summary is None:
        summary = build_summary(per_layer, layer_types, exclude_patterns, layer_mode)
    plots = Path(results_dir) / "plots" / ("" if layer_mode == "weights" else layer_mode)
    return [
        plot_alpha_distribution(selected, summary, plots / "alpha_distribution.png",
                                well_trained_range(results_dir)),
        plot_alpha_by_depth(selected, summary, plots / "alpha_by_depth.png"),
        plot_metric_comparison(summary, metric, plots / f"compare_{metric}.png"),
        *plot_esds(results_dir, selected, summary, esd_layer, plots),
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
    """`text` in at most `width` characters: its start (the org of a hub id) and its end (the
    name's distinguishing suffix) kept, the middle elided."""
    text = str(text)
    if len(text) <= width:
        return text
    head = (width - 1) * 2 // 5
    return text[:head] + "…" + text[len(text) - (width - 1 - head):]

