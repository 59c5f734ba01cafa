"""`report.html`: one self-contained page (plots embedded as base64 PNG) that says what was
found and how it was made.

Owns the page: overview, how it was made (ESD settings, run info, a line per metric),
failed models, plots, adapter-minus-base, over steps, summary, fit statuses. Reads only
the results directory; computes no spectral metric.
"""
from __future__ import annotations

import base64
import html
import time
from pathlib import Path

import pandas as pd

from esd.analysis.plots import write_plots
from esd.analysis.results import load_per_layer, select_layers
from esd.analysis.steps import DEFAULT_STEP_METRICS, _names_checkpoint, write_over_steps
from esd.analysis.summary import build_summary
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

