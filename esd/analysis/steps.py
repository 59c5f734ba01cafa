"""Metrics over training steps: a run's checkpoints ordered by step.

`over_steps.csv` (one row per checkpoint, ordered by step: mean and median of each metric)
and `over_steps_layers.csv` (one row per checkpoint and layer), plus one figure per metric.
Owns reading steps (model list `step` column, `checkpoint_<step>` in the id, a hub revision
`@step<N>`, a checkpoint's own `trainer_state.json`) and the tables; draws its own figures.
"""
from __future__ import annotations

import os
import re
import sys
from pathlib import Path

import numpy as np
import pandas as pd

from esd.analysis.plots import _pyplot, _save, _short
from esd.analysis.results import AnalysisError, load_per_layer, require_results, select_layers, write_csv_atomic

DEFAULT_STEP_METRICS = ("alpha", "stable_rank", "spectral_norm")
MAX_STEP_RUNS = 6             # training runs drawn in each over-steps figure

CHECKPOINT_STEP = re.compile(r"checkpoint[_-](\d+)")
FINAL_CHECKPOINT = re.compile(r"(^|[/\\])final_checkpoint([/\\]|$)")
REVISION_STEP = re.compile(r"@step(\d+)$")     # hub revisions such as Pythia's org/name@step3000


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
    from esd.model_list import ID_COLUMNS, RevisionConflict, make_entry
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
            try:  # the result file's name, as the run derived it
                stem = make_entry(row[id_column], row.get("revision"), base_dir=path.parent).safe_id
            except RevisionConflict as exc:
                raise AnalysisError(f"model list {path}, row {line_number}: {exc}") from None
            text = row.get("step", "")
            try:
                step = float(text) if text else np.nan
            except ValueError:
                raise AnalysisError(f"model list {path}, row {line_number}: step {text!r} is "
                                    f"not a number") from None
            steps[stem] = step
    return steps


def checkpoint_table(per_layer: pd.DataFrame, model_list=None) -> pd.DataFrame:
    """One row per checkpoint model: model_id, result_file, run, step, step_label.

    The step comes from the model list's `step` column, else from `checkpoint_<step>` in
    the id, else from the checkpoint's own `trainer_state.json` (`global_step`). A
    `final_checkpoint` whose step none of these gives is only *placed* one typical interval
    after its run's last step, labelled `final`, and its `step_source` says `placed`
    (never passed off as a real step). With a model list only its models are kept;
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
        source = "model list"
        if np.isnan(step):
            step, source = path_step, "id"
        if np.isnan(step):
            step, source = _trainer_state_step(model_id), "trainer_state.json"
        if np.isnan(step) and not is_final:
            continue
        if by_revision:     # org/name@step3000: the run is the hub model
            run = str(model_id).partition("@")[0]
        else:               # saved_models/<run_id>/checkpoint_<step>: the run is the directory
            run = os.path.dirname(str(model_id).rstrip("/\\")) or "."
        rows.append({"model_id": model_id, "result_file": result_file, "run": run,
                     "step": step, "is_final": is_final,
                     "step_source": "placed" if np.isnan(step) else source})
    table = pd.DataFrame(rows, columns=["model_id", "result_file", "run", "step", "is_final",
                                        "step_source"])
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


def _trainer_state_step(model_id) -> float:
    """`global_step` of a HuggingFace Trainer checkpoint directory, else NaN."""
    import json
    try:
        state = json.loads((Path(str(model_id)) / "trainer_state.json").read_text(encoding="utf-8"))
        return float(state["global_step"])
    except (OSError, ValueError, KeyError, TypeError):
        return np.nan


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
        row = {k: checkpoint[k] for k in ("run", "step", "step_label", "step_source", "model_id")}
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
    per_layer = require_results(load_per_layer(results_dir), results_dir)
    selected = select_layers(per_layer, layer_types, exclude_patterns)
    table, layers = build_over_steps(selected, model_list, tuple(metrics))
    results_dir = Path(results_dir)
    path = write_csv_atomic(table, results_dir / "over_steps.csv")
    write_csv_atomic(layers, results_dir / "over_steps_layers.csv")
    return path, plot_over_steps(table, layers, metrics, results_dir / "plots")

