"""Adapter minus base: how much an adapter (or fine-tune) moved each layer's spectrum.

For every model in the results whose `source_model` is also in the results, the layers of
both are matched by longname and the differences (model − base) of alpha, spectral norm,
stable rank and entropy are tabulated and drawn. A LoRA changes a layer by a low-rank
update, so differences of 1e-4 are usual: the axes are fitted to the differences, never
to 0-based bars. Reads per-layer tables; computes no spectral metric.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

DELTA_METRICS = ("alpha", "spectral_norm", "stable_rank", "entropy")
MAX_PAIRS = 6                 # pairs drawn (the table lists all)


def adapter_base_pairs(per_layer: pd.DataFrame) -> list[tuple[str, str]]:
    """(model_id, base model_id) for each model whose source_model has results too."""
    if "source_model" not in per_layer:
        return []
    ids = set(per_layer["model_id"].astype(str))
    pairs = []
    for model_id, layers in per_layer.groupby("model_id", sort=True):
        bases = layers["source_model"].dropna().astype(str)
        base = bases.iloc[0] if len(bases) else ""
        if base and base in ids and base != model_id:
            pairs.append((str(model_id), base))
    return pairs


def layer_deltas(per_layer: pd.DataFrame, model_id: str, base_id: str) -> pd.DataFrame:
    """One row per layer present in both: longname, layer_index (the model's), and
    `<metric>_model`, `<metric>_base`, `d_<metric>` = model − base."""
    metrics = [m for m in DELTA_METRICS if m in per_layer]
    model = per_layer[per_layer["model_id"] == model_id][["longname", "layer_index", *metrics]]
    base = per_layer[per_layer["model_id"] == base_id][["longname", *metrics]]
    both = model.merge(base, on="longname", suffixes=("_model", "_base"))
    for metric in metrics:
        both[f"d_{metric}"] = (pd.to_numeric(both[f"{metric}_model"], errors="coerce")
                               - pd.to_numeric(both[f"{metric}_base"], errors="coerce"))
    return both.sort_values("layer_index", kind="stable").reset_index(drop=True)


def delta_summary(per_layer: pd.DataFrame) -> pd.DataFrame:
    """Per pair: layers matched and changed, mean |Δ alpha|, the largest |Δ| of each metric,
    and the layer whose alpha moved most."""
    rows = []
    for model_id, base_id in adapter_base_pairs(per_layer):
        deltas = layer_deltas(per_layer, model_id, base_id)
        row = {"model_id": model_id, "base": base_id, "layers_matched": len(deltas)}
        if len(deltas) and "d_alpha" in deltas and deltas["d_alpha"].notna().any():
            row["most_moved_layer"] = deltas.loc[deltas["d_alpha"].abs().idxmax(), "longname"]
        if "d_alpha" in deltas:
            row["layers_changed"] = int((deltas["d_alpha"].fillna(0) != 0).sum())
            row["mean_abs_d_alpha"] = deltas["d_alpha"].abs().mean()
        for metric in DELTA_METRICS:
            if f"d_{metric}" in deltas:
                row[f"max_abs_d_{metric}"] = deltas[f"d_{metric}"].abs().max()
        rows.append(row)
    return pd.DataFrame(rows)


def delta_limits(values: np.ndarray) -> tuple[float, float]:
    """Axis limits fitted to the Δs with 0 in view: a side with no Δ gets only a small margin
    (not a mirror of the other side, which would leave half the panel empty)."""
    low, high = min(float(values.min()), 0.0), max(float(values.max()), 0.0)
    span = max(high - low, 1e-12)
    return low - 0.08 * span, high + 0.08 * span


def plot_deltas(per_layer: pd.DataFrame, path) -> Path | None:
    """Per pair one row of panels: Δ of each metric against the layer index, zero marked."""
    from esd.analysis.plots import _pyplot, _save, _short
    pairs = adapter_base_pairs(per_layer)[:MAX_PAIRS]
    if not pairs:
        return None
    plt = _pyplot()
    metrics = [m for m in DELTA_METRICS if m in per_layer]
    fig, axes = plt.subplots(len(pairs), len(metrics), figsize=(3.6 * len(metrics), 2.9 * len(pairs)),
                             squeeze=False)
    for row, (model_id, base_id) in zip(axes, pairs):
        deltas = layer_deltas(per_layer, model_id, base_id)
        for ax, metric in zip(row, metrics):
            values = deltas[f"d_{metric}"]
            ax.axhline(0, color="grey", lw=0.8)
            ax.plot(deltas["layer_index"], values, marker="o", ms=3, lw=0.8, color="tab:purple")
            finite = values[np.isfinite(values)]
            if len(finite):
                ax.set_ylim(*delta_limits(finite.to_numpy()))
            ax.ticklabel_format(axis="y", style="sci", scilimits=(-3, 3))
            ax.set_title(f"Δ {metric}", fontsize=9)
            ax.set_xlabel("layer index", fontsize=8)
            ax.tick_params(labelsize=7)
        row[0].set_ylabel(f"{_short(model_id, 28)}\nminus {_short(base_id, 28)}", fontsize=8)
    fig.suptitle("Adapter minus base, per layer (model − base)", fontsize=10)
    fig.tight_layout()
    return _save(fig, path)
