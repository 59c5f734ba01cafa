"""`report.html`: one self-contained page (plots embedded as base64 PNG) that says what was
found and how it was made.

Owns the page: overview (and what kind of alphas these are), how it was made (ESD settings,
run info, a line per column), failed models, plots, adapter-minus-base, each base beside
its children (by relation), over steps, summary (with the model list's extra columns),
fit statuses, and the
summaries of the rows of --delta_from_base / --adapter_update in a section of their own
(every other section uses the weight rows only). Reads only the results directory;
computes no spectral metric.
"""
from __future__ import annotations

import base64
import html
import time
from pathlib import Path

import pandas as pd

from esd.analysis.listed import listed_rows, relations, with_list_columns
from esd.analysis.plots import write_plots
from esd.analysis.relations import COMPARED, children_by_base, write_by_relation
from esd.analysis.adapters import delta_summary, plot_deltas
from esd.analysis.results import (layer_modes, read_esd_settings, scan_results, select_layers,
                                  well_trained_range)
from esd.analysis.steps import DEFAULT_STEP_METRICS, _names_checkpoint, write_over_steps
from esd.analysis.summary import build_summary, describe_layer_filter, mode_summaries
from esd import metrics_table
from esd.atomic_files import write_text_atomic
from esd.failures import FAILED_MODELS_TXT, read_failures

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
    """`results_dir/report.html`: one file with every plot embedded (base64 PNG), how the
    results were made (ESD settings, runs, versions, what each metric means), failed
    models, adapter-minus-base, the summary and layer fit statuses; opens in a browser
    without a server. Adds the over-steps section when some model is a training checkpoint."""
    results_dir = Path(results_dir)
    scan = scan_results(results_dir)
    per_layer = scan.per_layer
    failures = read_failure_table(results_dir)
    sections = [_overview_html(results_dir, per_layer, failures, scan.ignored,
                               describe_layer_filter(layer_types, exclude_patterns)),
                _provenance_html(results_dir, set(per_layer.columns))]
    if not failures.empty:
        sections.append(_section("Failed models", _table_html(failures, scroll=True)))
    if not per_layer.empty:
        selected = select_layers(per_layer, layer_types, exclude_patterns)
        rows = listed_rows(results_dir, model_list)
        summary = with_list_columns(build_summary(per_layer, layer_types, exclude_patterns), per_layer, rows)
        plots = write_plots(results_dir, per_layer, summary, metric, esd_layer,
                            layer_types, exclude_patterns)
        sections.append(_section("Models", "".join(_img_html(p) for p in plots[:3])))
        deltas = delta_summary(selected)
        if not deltas.empty:
            figure = plot_deltas(selected, results_dir / "plots" / "adapter_minus_base.png")
            sections.append(_section("Adapter minus base", _ADAPTER_NOTE + _table_html(deltas, scroll=True, digits=3)
                                     + (_img_html(figure) if figure else "")))
        if children_by_base(select_layers(per_layer)):
            table_path, _, relation_plots = write_by_relation(
                results_dir, per_layer, with_list_columns(build_summary(per_layer), per_layer, rows),
                relations(per_layer, rows))
            table = pd.read_csv(table_path)
            shown = ["base", "model_id", "relation", "num_layers", *COMPARED,
                     *(c for c in table.columns if c.startswith("d_"))]
            sections.append(_section("By relation: each base and its children", _RELATION_NOTE
                                     + _table_html(table[[c for c in shown if c in table]], scroll=True)
                                     + "".join(_img_html(p) for p in relation_plots)))
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
        extra = mode_summaries(per_layer)
        if extra:
            sections.append(_section("Fine-tune deltas and adapter updates", _MODES_NOTE + "".join(
                f"<h3>{html.escape(mode)}</h3>" + _table_html(table, scroll=True)
                for mode, table in extra.items())))
        if "fit_status" in selected:
            statuses = (selected.groupby(["layer_type", "fit_status"]).size()
                        .rename("layers").reset_index())
            sections.append(_section("Layer fit status", _table_html(statuses)))
    page = _REPORT_TEMPLATE.format(title=html.escape(f"ESD report: {results_dir}"),
                                   body="\n".join(sections))
    return write_text_atomic(results_dir / "report.html", page)


_ADAPTER_NOTE = ("<p>Each model whose base (<code>source_model</code>) is in these results, "
                 "layer by layer (matched by name): Δ = model − base. A LoRA adapter moves a "
                 "layer by a low-rank update, so small differences are expected; the plot's "
                 "axes are fitted to them.</p>")


_RELATION_NOTE = ("<p>Per base, its children (models whose <code>source_model</code> is the base: "
                  "fine-tunes, adapters, … with the model list's <code>base_model_relation</code>) "
                  "beside it, every layer; <code>d_</code> columns are child − base "
                  "(by_relation.csv). The figures show, layer by layer, each child's alpha minus "
                  "the base's (by_relation_layers.csv): which layers the derivatives move.</p>")


_MODES_NOTE = ("<p>Rows of a run with <code>--delta_from_base</code> (W<sub>ft</sub> − W<sub>base</sub>, "
               "base = <code>source_model</code>) or <code>--adapter_update</code> (a LoRA's "
               "(α/r)·B·A alone), summarised as summary.csv is (summary_&lt;mode&gt;.csv); "
               "every other section of this page uses the weight rows only.</p>")


def _overview_html(results_dir, per_layer, failures, ignored, selection) -> str:
    models = per_layer["model_id"].nunique() if not per_layer.empty else 0
    modes = layer_modes(per_layer).value_counts() if not per_layer.empty else pd.Series(dtype=int)
    per_layer = select_layers(per_layer) if not per_layer.empty else per_layer   # weight rows
    failed_fits = int(per_layer["alpha"].isna().sum()) if not per_layer.empty else 0
    items = [("results directory", str(Path(results_dir).resolve())),
             ("generated", time.strftime("%Y-%m-%d %H:%M:%S")),
             ("models with results", models), ("layers", len(per_layer)),
             ("layers whose fit failed (NaN alpha)", failed_fits),
             ("failed models", len(failures)),
             ("layers selected", selection or "all")]
    items += [(f"{mode} rows (their own summary below)", int(count))
              for mode, count in modes.items() if mode != "weights"]
    if ignored:
        names = ", ".join(p.name for p, _ in ignored[:5]) + (" …" if len(ignored) > 5 else "")
        items.append(("files ignored (not the run's own results)", f"{len(ignored)}: {names}"))
    return _section("Overview", _pairs_html(items) + _alphas_note(results_dir))


def _alphas_note(results_dir) -> str:
    """What kind of alphas these are, and whether the 2–6 range may be read against them."""
    settings = read_esd_settings(results_dir)
    fix_fingers = (settings or {}).get("fix_fingers")
    low, high = metrics_table.WELL_TRAINED_ALPHA
    if fix_fingers and well_trained_range(results_dir):
        text = (f"These alphas are <code>--fix_fingers {html.escape(str(fix_fingers))}</code> fits, "
                f"on WeightWatcher's scale{' (its own default fit)' if fix_fingers == 'DKS' else ''}: "
                f"{low:g}–{high:g} is the usual range of well-trained layers (dashed in the figures; "
                f"the <code>warning</code> column flags layers outside it).")
    else:
        known = ("These alphas are <code>--fix_fingers xmin_mid</code> fits (the default, as the "
                 "seeds' <code>net_esd_estimator</code> computes them)" if fix_fingers else
                 "The ESD settings of these results are unknown (no esd_settings.json); with the "
                 "default, <code>--fix_fingers xmin_mid</code>, alphas")
        text = (f"{known}: the tail starts at the median eigenvalue, which gives alpha 2–3.5 even on "
                f"random matrices, so they are for comparing models with each other (over training, "
                f"adapter vs base, a family of fine-tunes), not for the {low:g}–{high:g} range of "
                f"well-trained layers, and no such range is drawn. "
                f"<code>--fix_fingers DKS</code> gives WeightWatcher's numbers.")
    return f'<p class="note">{text}</p>'



def _provenance_html(results_dir: Path, present=None) -> str:
    """ESD settings, the runs that wrote the directory (latest last), versions, meanings."""
    parts = []
    values = read_esd_settings(results_dir)
    if values is not None:
        parts.append("<h3>ESD settings</h3>" + _wide_pairs_html(
            [(k, v) for k, v in values.items() if not isinstance(v, (dict, list))]))
    else:
        parts.append("<p>No esd_settings.json: these results were not written by "
                     "run_esd_experiment.py, so their ESD settings are unknown.</p>")
    runs = _read_runs(results_dir)
    if runs is not None and len(runs):
        shown = [c for c in ("run_id", "status", "start_time", "duration_s", "backend", "attempted",
                             "done", "failed", "already_done", "model_list") if c in runs]
        parts.append(f"<h3>Runs ({len(runs)}, latest last)</h3>" + _table_html(runs[shown].tail(10)))
        record = _read_json(results_dir / "runs" / str(runs["run_id"].iloc[-1]) / "run.json")
        if isinstance(record, dict) and isinstance(record.get("versions"), dict):
            parts.append("<h3>Versions (latest run)</h3>" + _pairs_html(
                [(k, v if v is not None else "not installed") for k, v in record["versions"].items()]))
            if record.get("command"):
                parts.append("<p>Command: <code>" + html.escape(" ".join(map(str, record["command"])))
                             + "</code></p>")
    parts.append(_legend_html(present))
    return _section("How these results were made", "".join(parts))


def _legend_html(present) -> str:
    """What each measured column of these results means (esd/metrics_table.py)."""
    meanings = "".join(f"<dt><code>{html.escape(name)}</code></dt><dd>{html.escape(text)}</dd>"
                       for name, text in metrics_table.legend(present))
    return (f'<h3>What the columns mean</h3><dl class="meanings">{meanings}</dl>'
            "<p>Summary columns are statistics of these over a model's layers "
            "(<code>alpha_mean</code>, <code>stable_rank_median</code>, …: docs/interface.md).</p>")


def _read_json(path: Path):
    import json
    try:
        if not path.is_file():
            return None
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError):
        return None


def _read_runs(results_dir: Path):
    """runs.csv, a `running` run whose process is gone shown as `crashed` (esd/run_record.py)."""
    from esd.run_record import run_state
    path = results_dir / "runs.csv"
    try:
        runs = pd.read_csv(path) if path.is_file() else None
    except (OSError, ValueError, pd.errors.ParserError):
        return None
    if runs is not None and {"status", "pid", "host"} <= set(runs.columns):
        runs["status"] = [run_state(*row) for row in zip(runs["status"], runs["pid"], runs["host"])]
    return runs


def _pairs_html(items) -> str:
    rows = "".join(f"<tr><th>{html.escape(str(k))}</th><td>{html.escape(str(v))}</td></tr>"
                   for k, v in items)
    return f'<table class="overview">{rows}</table>'


def _wide_pairs_html(items, per_row: int = 4) -> str:
    """name/value pairs side by side, `per_row` pairs a row: a dozen settings in three rows,
    not a column that pushes the figures down the page."""
    items = list(items)
    rows = []
    for start in range(0, len(items), per_row):
        cells = "".join(f"<th>{html.escape(str(k))}</th><td>{html.escape(str(v))}</td>"
                        for k, v in items[start:start + per_row])
        rows.append(f"<tr>{cells}</tr>")
    return f'<table class="overview">{"".join(rows)}</table>'


def _section(title, body) -> str:
    return f"<section><h2>{html.escape(title)}</h2>\n{body}\n</section>"


def _table_html(frame: pd.DataFrame, scroll=False, digits=4) -> str:
    """An HTML table that fits the page: numbers right-aligned on one line, text (ids,
    layer names) wrapping where the column ends (the cell holds the id as written, so it
    can be searched and copied), headers wrapping after `_`. `scroll`:
    at most 40em tall on screen (it scrolls), printed whole."""
    def cell(value) -> str:
        if isinstance(value, float):
            return ("num", "" if pd.isna(value) else f"{value:.{digits}g}")
        if isinstance(value, (bool, int)) or hasattr(value, "dtype"):
            return ("num", str(value))
        return ("text", "" if value is None or (not isinstance(value, str) and pd.isna(value)) else str(value))

    head = "".join(f"<th>{_breakable(str(c), '_')}</th>" for c in frame.columns)
    rows = []
    for values in frame.itertuples(index=False):
        cells = (cell(v) for v in values)
        rows.append("<tr>" + "".join(f'<td class="{kind}">{html.escape(text)}</td>'
                                      for kind, text in cells) + "</tr>")
    table = f'<table class="data"><thead><tr>{head}</tr></thead><tbody>{"".join(rows)}</tbody></table>'
    return f'<div class="scroll">{table}</div>' if scroll else table


def _breakable(text: str, after: str) -> str:
    """`text` escaped, with a line-break opportunity after each character of `after`."""
    escaped = html.escape(text)
    for char in after:
        escaped = escaped.replace(char, char + "<wbr>")
    return escaped


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
  {{ border: 1px solid #ddd; padding: 2px 6px; text-align: right; vertical-align: top; }}
table.overview th, table.data td.text {{ text-align: left; }}
table.data td.num {{ white-space: nowrap; }}
table.data td.text {{ min-width: 8em; max-width: 26em; overflow-wrap: anywhere; }}
table.data th {{ background: #f0f0f0; position: sticky; top: 0; font-weight: 600; min-width: 3.5em; }}
div.scroll {{ max-height: 40em; max-width: 100%; overflow: auto; }}
figure {{ margin: 0.5em 0 1.5em 0; }} img {{ max-width: 100%; border: 1px solid #eee; }}
figcaption {{ font-size: 0.75em; color: #666; }}
h3 {{ font-size: 1em; margin: 1em 0 0.3em 0; }}
p.note {{ background: #fff8e1; border-left: 3px solid #f0b400; padding: 0.4em 0.8em; max-width: 60em; }}
dl.meanings {{ font-size: 0.85em; display: grid; grid-template-columns: max-content 1fr;
  gap: 2px 12px; }} dl.meanings dd {{ margin: 0; }}
@media print {{
  @page {{ size: landscape; margin: 1cm; }}
  body {{ margin: 0; }}
  div.scroll {{ max-height: none; overflow: visible; }}
  table.data {{ width: 100%; font-size: 6.5pt; }}
  table.data td.num {{ white-space: normal; }}
  table.data th, table.data td {{ overflow-wrap: anywhere; padding: 1px 3px; }}
  table.data th {{ position: static; min-width: 0; }}
  table.data td.text {{ min-width: 0; }}
  figure, tr {{ break-inside: avoid; }}
}}
</style></head>
<body><h1>{title}</h1>
{body}
</body></html>
"""

