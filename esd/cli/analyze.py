"""Everything that happens after the workers, from the shell: per-model CSVs ─► summary.csv,
queries, plots, a self-contained report.html, and metrics over training steps.

    python analyze_results.py --results_dir results/ [--output CSV] [--verbose]
        [--layer_types linear conv2d] [--exclude embed lm_head] [--layer_mode delta_from_base]
        [--filter "alpha_mean<3" "is_adapter=True"] [--sort_by COL [--descending]]
        [--show COL …] [--hide COL …] [--limit N] [--list_columns]
        [--plots] [--metric alpha_mean] [--esd_layer LONGNAME] [--report]
        [--over_steps [--model_list LIST] [--metrics alpha stable_rank spectral_norm]]
        [--by_relation]

This file is the command line only; the work lives in `esd/analysis/`, one module per job:
    results.py  which files are results (only the run's own `<safe_id>.csv`; others listed
                as ignored), the per-layer table, layer selection
    summary.py  summary.csv (always every weight layer), summary_filtered.csv (selected
                layers), summary_<mode>.csv (rows of --delta_from_base / --adapter_update)
    queries.py  --filter / --sort_by / --show / --hide / --limit, --verbose extremes
    plots.py    the PNG figures under DIR/plots/
    steps.py    --over_steps: over_steps.csv, over_steps_layers.csv and their figures
    listed.py   the model list's rows (runs/<id>/model_list.csv): extra columns, relations
    relations.py --by_relation: per base, its children beside it and their Δalpha per layer
    report.py   report.html
The names below are re-exported, so `import analyze_results` keeps working in notebooks.

Layer selection (`--layer_types`, `--exclude`) applies to everything: filtered summary,
plots, report and over-steps; `summary.csv` stays the summary of every layer. `--exclude`
patterns are Python regular expressions searched anywhere in the layer's longname
(case-sensitive): `embed` drops `model.embed_tokens`, `lm_head` drops `lm_head`,
`^transformer\\.wte$` one exact layer.

Layer modes: the rows a run adds with --delta_from_base (`<layer>.delta_from_base`) and
--adapter_update (`<layer>.adapter_update`) are never mixed with the weight rows.
`summary.csv`, plots, report figures and over-steps use the weight rows; the extra rows get
`summary_delta_from_base.csv` / `summary_adapter_update.csv` (same columns, written with
every summary), and `--layer_mode MODE` points the queries, --verbose and --plots
(under DIR/plots/MODE/) at one of them.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import pandas as pd

from esd.analysis.plots import (ESD_LAYERS_PER_MODEL, MAX_DEPTH_PANELS, MAX_ESD_MODELS,
                                MAX_MODELS_PER_PLOT, esd_layers, pick_models, plot_alpha_by_depth,
                                plot_alpha_distribution, plot_esd, plot_esds, plot_metric_comparison,
                                write_plots)
from esd.analysis.queries import (apply_filters, describe_extremes, format_table,
                                  numeric_columns, parse_filter, query_summary)
from esd.analysis.listed import listed_rows, relations, with_list_columns
from esd.analysis.relations import children_by_base, write_by_relation
from esd.analysis.report import read_failure_table, write_report
from esd.analysis.results import (LAYER_MODES, LAYER_TYPES, OWN_OUTPUTS, PER_MODEL_KEY_COLUMNS,
                                  AnalysisError, counted, load_per_layer, require_results, scan_results,
                                  select_layers, write_csv_atomic)
from esd.analysis.steps import (DEFAULT_STEP_METRICS, MAX_STEP_RUNS, build_over_steps,
                                checkpoint_table, plot_over_steps, step_of_model_id,
                                steps_from_model_list, write_over_steps)
from esd.analysis.summary import (SUMMARY_COLUMNS, build_summary, describe_layer_filter,
                                  write_summary)
from esd.cli_flags import FlagParser, add_flag

__all__ = [
    'AnalysisError', 'DEFAULT_STEP_METRICS', 'ESD_LAYERS_PER_MODEL', 'LAYER_TYPES',
    'MAX_DEPTH_PANELS', 'MAX_ESD_MODELS', 'MAX_MODELS_PER_PLOT', 'MAX_STEP_RUNS', 'OWN_OUTPUTS',
    'PER_MODEL_KEY_COLUMNS', 'SUMMARY_COLUMNS', 'apply_filters', 'build_over_steps',
    'build_summary', 'checkpoint_table', 'describe_extremes', 'describe_layer_filter',
    'esd_layers', 'format_table', 'load_per_layer', 'numeric_columns', 'parse_filter',
    'pick_models', 'plot_alpha_by_depth', 'plot_alpha_distribution', 'plot_esd', 'plot_esds',
    'plot_metric_comparison', 'plot_over_steps', 'query_summary', 'read_failure_table',
    'require_results', 'scan_results', 'select_layers', 'step_of_model_id',
    'steps_from_model_list', 'write_csv_atomic', 'write_over_steps', 'write_plots',
    'write_report', 'write_summary', 'build_parser', 'main'
]


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
    add_flag(layers, "--layer_mode", choices=list(LAYER_MODES), default="weights",
             help="which rows the queries, --verbose and --plots see: the weights (default), or the "
                  "rows of a run with --delta_from_base / --adapter_update (summary_MODE.csv)")
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
    add_flag(plots, "--by_relation", action="store_true",
             help="per base, its children (source_model = the base) beside it and their alpha minus "
                  "the base's, layer by layer: DIR/by_relation.csv, DIR/by_relation_layers.csv, "
                  "DIR/plots/by_relation/")
    steps = parser.add_argument_group("over training steps")
    add_flag(steps, "--over_steps", action="store_true",
         help="metrics against checkpoint step: DIR/over_steps.csv and plots")
    add_flag(steps, "--model_list", metavar="CSV",
             help="model list: its step column (--over_steps), its base_model_relation (--by_relation) "
                  "and extra columns (downloads, …) for summary.csv; by default the runs' own copies")
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
    mode = args.layer_mode
    scan = scan_results(args.results_dir)
    for line in scan.ignored_lines():
        print(line, file=sys.stderr)
    per_layer = require_results(scan.per_layer, args.results_dir)
    summary = build_summary(per_layer, **filters, layer_mode=mode)
    if args.list_columns:
        for column in summary.columns:
            print(f"{column:24s} {summary[column].dtype}")
        return 0
    if args.plots or args.report:
        _check_metric(summary, args.metric)
    output = write_summary(args.results_dir, args.output, per_layer=per_layer, **filters,
                           layer_mode=mode, model_list=args.model_list)
    selection = describe_layer_filter(**filters)
    what = f"summary of {counted(len(summary), 'model')}" + ("" if mode == "weights" else f", {mode} rows")
    if selection:
        print(f"{what}, layers selected by {selection}, written to {output} "
              f"({Path(args.results_dir) / 'summary.csv'} stays the summary of every layer)",
              file=sys.stderr)
    else:
        rows = len(select_layers(per_layer, layer_mode=mode))
        print(f"{what} ({counted(rows, 'layer')}) written to {output}", file=sys.stderr)
    # Read back what was written, so filters see the same types a notebook would.
    view = query_summary(pd.read_csv(output), args.filter, args.sort_by, args.descending,
                         args.show, args.hide, args.limit)
    if any([args.filter, args.sort_by, args.show, args.hide, args.limit is not None]):
        print(format_table(view))
    if args.verbose:
        print(describe_extremes(summary))
    if args.plots and not args.report:
        for path in write_plots(args.results_dir, per_layer, summary, args.metric,
                                args.esd_layer, **filters, layer_mode=mode):
            print(f"plot: {path}")
    if args.over_steps:
        table_path, step_plots = write_over_steps(args.results_dir, args.model_list,
                                                  args.metrics, **filters)
        print(format_table(pd.read_csv(table_path)))
        print(f"over-steps table: {table_path}")
        for path in step_plots:
            print(f"plot: {path}")
    if args.by_relation:
        _by_relation(args, per_layer)
    if args.report:
        path = write_report(args.results_dir, metric=args.metric, esd_layer=args.esd_layer,
                            model_list=args.model_list, metrics=args.metrics, **filters)
        print(f"report: {path}")
    return 0


def _by_relation(args, per_layer) -> None:
    rows = listed_rows(args.results_dir, args.model_list)
    summary = with_list_columns(build_summary(per_layer), per_layer, rows)
    if not children_by_base(select_layers(per_layer)):
        print("by relation: no model whose source_model has results here (a base and its "
              "fine-tunes or adapters analysed in one directory)", file=sys.stderr)
        return
    table_path, layers_path, plots = write_by_relation(args.results_dir, per_layer, summary,
                                                       relations(per_layer, rows))
    table = pd.read_csv(table_path)
    print(format_table(table[["base", "model_id", "relation", "num_layers",
                              *(c for c in table.columns if c.startswith("d_"))]]))
    print(f"by relation: {table_path}, {layers_path}")
    for path in plots:
        print(f"plot: {path}")


def _check_metric(summary: pd.DataFrame, metric: str) -> None:
    if metric not in numeric_columns(summary):
        raise AnalysisError(f"--metric {metric!r} is not a numeric summary column; choose from "
                            f"{', '.join(numeric_columns(summary))}")


if __name__ == "__main__":
    sys.exit(main())
