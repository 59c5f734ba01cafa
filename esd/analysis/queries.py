"""Questions asked of a summary from the shell: filter, sort, choose columns, extremes.

Owns the filter language (`COLUMN OP VALUE`, OP in = != < <= > >= ~) and the text tables;
reads DataFrames only, writes nothing.
"""
from __future__ import annotations

import re

import numpy as np
import pandas as pd

from esd import metrics_table
from esd.analysis.results import AnalysisError, counted

FILTER_EXPR = re.compile(r"^\s*(.+?)\s*(<=|>=|!=|==|=|<|>|~)\s*(.*?)\s*$")


# the model's identity (esd/metrics_table.py) and the filtered summary's selection: not measurements
IDENTITY_COLUMNS = (*metrics_table.IDENTITY_COLUMNS, "layer_filter")


def numeric_columns(frame: pd.DataFrame) -> list[str]:
    """The columns that hold measurements (not ids, flags or text), in frame order."""
    return [c for c in frame.columns if c not in IDENTITY_COLUMNS
            and pd.api.types.is_numeric_dtype(frame[c]) and not pd.api.types.is_bool_dtype(frame[c])]


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
    lines = [f"{counted(len(summary), 'model')}, {counted(int(summary['num_layers'].sum()), 'layer')}, "
             f"{counted(int(summary['num_fit_failed'].sum()), 'failed fit')}"]
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

