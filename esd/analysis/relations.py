"""The model tree: per base, its children (fine-tunes, adapters, … whose `source_model` is
the base) beside it, and which layers they move.

Outputs (`analyze_results.py --by_relation`, and a section of the report):
- `by_relation.csv`: per base, the base's row (relation `base`) then one row per child:
  base, model_id, relation, the summary's statistics, and `d_<stat>` = child − base of
  every mean statistic (`alpha_mean`, …);
- `by_relation_layers.csv`: one row per child and layer present in both: base, model_id,
  relation, longname, layer_type, layer_index (the base's), alpha, base_alpha,
  d_alpha = alpha − base_alpha (the distribution of the children's Δalpha per layer);
- `plots/by_relation/<base safe id>.png`: one figure per base, Δalpha by layer (each child
  a point, coloured by relation, the median line over children) and a violin of Δalpha per
  layer type.

A child's relation is the model list's `base_model_relation` (esd/analysis/listed.py), else
`adapter` for an adapter, else `derived`. Weight rows only. Reads tables; computes no
spectral metric.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from esd import metrics_table
from esd.analysis.adapters import adapter_base_pairs, layer_deltas
from esd.analysis.results import LAYER_TYPES, counted, select_layers, write_csv_atomic

BY_RELATION_CSV = "by_relation.csv"
BY_RELATION_LAYERS_CSV = "by_relation_layers.csv"
# the summary statistics compared child − base: every mean of the metrics table
COMPARED = tuple(s.name for s in metrics_table.SUMMARY_STATS if s.statistic == "mean")
RELATION_COLORS = {"adapter": "tab:purple", "finetune": "tab:blue", "merge": "tab:green",
                   "quantized": "tab:red"}


def children_by_base(per_layer: pd.DataFrame) -> dict[str, list[str]]:
    """{base model_id: [child model_ids]} for the bases with results and children."""
    tree: dict[str, list[str]] = {}
    for child, base in adapter_base_pairs(per_layer):
        tree.setdefault(base, []).append(child)
    return tree


def relation_of(model_id: str, per_layer: pd.DataFrame, relations: dict) -> str:
    listed = str(relations.get(model_id, "") or "")
    if listed:
        return listed
    flags = per_layer.loc[per_layer["model_id"] == model_id, "is_adapter"] if "is_adapter" in per_layer else []
    return "adapter" if len(flags) and str(flags.iloc[0]).lower() == "true" else "derived"


def relation_summary(summary: pd.DataFrame, per_layer: pd.DataFrame, relations: dict) -> pd.DataFrame:
    """by_relation.csv's table (see the module docstring)."""
    weights = select_layers(per_layer)
    indexed = summary.set_index("model_id")
    stats = [c for c in summary.columns if c not in metrics_table.IDENTITY_COLUMNS]
    rows = []
    for base, children in children_by_base(weights).items():
        base_row = indexed.loc[base]
        rows.append({"base": base, "model_id": base, "relation": "base", **base_row[stats].to_dict(),
                     **{f"d_{name}": 0.0 for name in COMPARED if name in indexed}})
        for child in children:
            row = indexed.loc[child]
            rows.append({"base": base, "model_id": child,
                         "relation": relation_of(child, weights, relations), **row[stats].to_dict(),
                         **{f"d_{name}": row[name] - base_row[name] for name in COMPARED if name in indexed}})
    return pd.DataFrame(rows, columns=["base", "model_id", "relation", *stats,
                                       *(f"d_{n}" for n in COMPARED if n in indexed)])


def relation_layers(per_layer: pd.DataFrame, relations: dict) -> pd.DataFrame:
    """by_relation_layers.csv's table: every child's Δalpha, layer by layer."""
    weights = select_layers(per_layer)
    frames = []
    for base, children in children_by_base(weights).items():
        base_layers = weights[weights["model_id"] == base].drop_duplicates("longname")
        base_index = base_layers.set_index("longname")
        for child in children:
            deltas = layer_deltas(weights, child, base)
            frames.append(pd.DataFrame({
                "base": base, "model_id": child, "relation": relation_of(child, weights, relations),
                "longname": deltas["longname"],
                "layer_type": deltas["longname"].map(base_index["layer_type"]),
                "layer_index": deltas["longname"].map(base_index["layer_index"]),
                "alpha": deltas["alpha_model"], "base_alpha": deltas["alpha_base"],
                "d_alpha": deltas["d_alpha"]}))
    columns = ["base", "model_id", "relation", "longname", "layer_type", "layer_index", "alpha",
               "base_alpha", "d_alpha"]
    if not frames:
        return pd.DataFrame(columns=columns)
    table = pd.concat(frames, ignore_index=True)[columns]
    return table.sort_values(["base", "layer_index", "model_id"], kind="stable").reset_index(drop=True)


def plot_relation(layers: pd.DataFrame, base: str, path) -> Path:
    """One base's figure: Δalpha per layer (children as points, median over children as a
    line, 0 = the base) and a violin of Δalpha per layer type."""
    from esd.analysis.plots import _pyplot, _save, _short
    plt = _pyplot()
    mine = layers[layers["base"] == base].dropna(subset=["d_alpha"])
    types = [t for t in LAYER_TYPES if t in set(mine["layer_type"])]
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 3.8), width_ratios=(3, 1), layout="constrained")
    left.axhline(0, color="grey", lw=0.8)
    rng = np.random.default_rng(0)   # a fixed jitter: the same figure on every run
    for relation, group in mine.groupby("relation", sort=True):
        x = group["layer_index"].to_numpy(dtype=float) + rng.uniform(-0.18, 0.18, len(group))
        left.scatter(x, group["d_alpha"], s=12, alpha=0.7, color=RELATION_COLORS.get(relation, "tab:gray"),
                     label=f"{relation} ({counted(group['model_id'].nunique(), 'model')})")
    median = mine.groupby("layer_index")["d_alpha"].median()
    left.plot(median.index, median.to_numpy(), color="black", lw=1, label="median over children")
    left.set_xlabel("layer index of the base (model order, 0 = first)", fontsize=9)
    left.set_ylabel("Δalpha = child − base", fontsize=9)
    left.legend(fontsize=7, loc="best")
    left.tick_params(labelsize=8)
    data = [mine.loc[mine["layer_type"] == t, "d_alpha"].to_numpy() for t in types]
    if data:
        right.violinplot(data, showmedians=True)
        right.set_xticks(range(1, len(types) + 1), types, fontsize=8)
    right.axhline(0, color="grey", lw=0.8)
    right.set_ylabel("Δalpha by layer type", fontsize=9)
    right.tick_params(labelsize=8)
    children = mine["model_id"].nunique()
    fig.suptitle(f"{_short(base, 70)}: {counted(children, 'child', 'children')}, alpha minus the base's, "
                 f"layer by layer", fontsize=10)
    return _save(fig, path)


def write_by_relation(results_dir, per_layer: pd.DataFrame, summary: pd.DataFrame,
                      relations: dict) -> tuple[Path, Path, list[Path]]:
    """by_relation.csv, by_relation_layers.csv and one figure per base under
    plots/by_relation/; returns their paths."""
    results_dir = Path(results_dir)
    table = relation_summary(summary, per_layer, relations)
    layers = relation_layers(per_layer, relations)
    files = per_layer.drop_duplicates("model_id").set_index("model_id")["result_file"]
    plots = [plot_relation(layers, base, results_dir / "plots" / "by_relation" / f"{files[base]}.png")
             for base in layers["base"].drop_duplicates()]
    return (write_csv_atomic(table, results_dir / BY_RELATION_CSV),
            write_csv_atomic(layers, results_dir / BY_RELATION_LAYERS_CSV), plots)
