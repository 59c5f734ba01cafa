"""The one table of output columns (esd/metrics_table.py) against the contract and its docs.

The contract is tests/golden/columns.json (the columns users' scripts depend on, in order);
the docs' column tables are generated from the table and must be current.
"""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd

from esd import metrics_table

ROOT = Path(__file__).resolve().parents[1]
GOLDEN = json.loads((Path(__file__).parent / "golden" / "columns.json").read_text())


class Flags:
    """The boolean settings a column may be enabled by, as ESDSettings carries them."""
    def __init__(self, **on):
        self.__dict__.update(on)


def test_the_table_gives_the_contracts_columns_in_order():
    assert metrics_table.csv_columns() == GOLDEN["per_model_csv"]
    assert metrics_table.csv_columns(Flags(randomize=True, mp_fit=True)) == (
        GOLDEN["per_model_csv"] + GOLDEN["randomize"] + GOLDEN["mp_fit"])
    assert metrics_table.csv_columns(Flags(mp_fit=True)) == GOLDEN["per_model_csv"] + GOLDEN["mp_fit"]
    assert metrics_table.columns_enabled_by("randomize") == GOLDEN["randomize"]
    assert list(metrics_table.SUMMARY_COLUMNS) == GOLDEN["summary"]


def test_every_summary_statistic_names_a_column_and_a_known_statistic():
    for stat in metrics_table.SUMMARY_STATS:
        assert stat.of in metrics_table.BY_NAME and stat.statistic in metrics_table.STATISTICS
    assert len(set(metrics_table.SUMMARY_COLUMNS)) == len(metrics_table.SUMMARY_COLUMNS)
    assert len(metrics_table.BY_NAME) == len(metrics_table.COLUMNS)


def test_the_docs_column_tables_are_generated_from_the_table():
    assert metrics_table.stale_docs(ROOT) == [], "run: python -m esd.metrics_table"
    result = subprocess.run([sys.executable, "-m", "esd.metrics_table", "--check"], cwd=ROOT,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    interface = (ROOT / "docs" / "interface.md").read_text()
    metrics = (ROOT / "docs" / "metrics.md").read_text()
    assert all(f"| `{name}` |" in interface for name in GOLDEN["summary"])
    assert all(f"| `{name}` |" in metrics for name in GOLDEN["per_model_csv"] + GOLDEN["mp_fit"])


def test_a_stale_docs_table_is_found_and_rewritten(tmp_path):
    for relative in metrics_table.DOC_BLOCKS:
        (tmp_path / relative).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(ROOT / relative, tmp_path / relative)
    doc = tmp_path / "docs" / "interface.md"
    doc.write_text(doc.read_text().replace("| `alpha_q75` | `alpha` | 75th percentile over layers "
                                           "(linear interpolation) |\n", ""))
    assert metrics_table.stale_docs(tmp_path) == ["docs/interface.md"]
    assert metrics_table.write_docs(tmp_path) == ["docs/interface.md"]
    assert metrics_table.stale_docs(tmp_path) == []
    assert doc.read_text() == (ROOT / "docs" / "interface.md").read_text()


def test_the_table_imports_without_torch_or_pandas():
    code = ("import sys, esd.metrics_table; "
            "print(sorted(m for m in ('torch', 'pandas', 'numpy') if m in sys.modules))")
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


def test_the_summary_follows_the_tables_statistics():
    """Each summary column is its statistic of its per-layer column (NaN and inf skipped)."""
    from esd.analysis.summary import build_summary
    layers = pd.DataFrame({
        "model_id": "m", "is_adapter": False, "source_model": "b",
        "longname": ["a", "b", "c", "d"], "layer_type": "linear", "params": [10, 20, 30, 40],
        "alpha": [2.0, float("nan"), 4.0, 9.0], "alpha_weighted": [1.0, 2.0, float("inf"), 3.0],
        "spectral_norm": [1.0, 5.0, 2.0, 3.0], "log_spectral_norm": [0.0, 0.5, 0.25, 0.75],
        "stable_rank": [4.0, 1.0, 2.0, 3.0], "entropy": [0.5, 0.7, 0.9, float("nan")]})
    row = build_summary(layers).iloc[0]
    expected = {"num_layers": 4, "num_fit_failed": 1, "alpha_mean": 5.0, "alpha_median": 4.0,
                "alpha_std": pd.Series([2.0, 4.0, 9.0]).std(), "alpha_min": 2.0, "alpha_max": 9.0,
                "alpha_q25": 3.0, "alpha_q75": 6.5, "alpha_weighted_mean": 2.0,
                "spectral_norm_mean": 2.75, "spectral_norm_max": 5.0, "log_spectral_norm_mean": 0.375,
                "stable_rank_mean": 2.5, "stable_rank_median": 2.5, "entropy_mean": 0.7,
                "entropy_median": 0.7, "total_params": 100}
    for name, value in expected.items():
        assert abs(float(row[name]) - value) < 1e-12, name
    assert (row["model_id"], row["is_adapter"], row["source_model"]) == ("m", False, "b")


def test_a_new_table_row_reaches_the_csv_the_summary_the_legend_and_the_docs(monkeypatch, tmp_path):
    """Adding a metric is one row: no other list to edit."""
    from esd.analysis.summary import build_summary
    row = metrics_table.Column("numerical_rank", "count", "singular values above rank_tol · σ_max",
                               summary=("mean", "max"))
    columns = metrics_table.COLUMNS + (row,)
    monkeypatch.setattr(metrics_table, "COLUMNS", columns)
    monkeypatch.setattr(metrics_table, "BY_NAME", {c.name: c for c in columns})
    stats = metrics_table._summary_stats()
    monkeypatch.setattr(metrics_table, "SUMMARY_STATS", stats)
    monkeypatch.setattr(metrics_table, "SUMMARY_COLUMNS", tuple(s.name for s in stats))
    assert metrics_table.csv_columns() == GOLDEN["per_model_csv"] + ["numerical_rank"]
    expected = GOLDEN["summary"][:-1] + ["numerical_rank_mean", "numerical_rank_max", "total_params"]
    assert list(metrics_table.SUMMARY_COLUMNS) == expected     # totals stay last
    layers = pd.DataFrame({"model_id": "m", "is_adapter": False, "source_model": "", "longname": ["a", "b"],
                           "layer_type": "linear", "params": [1, 2], "alpha": [3.0, 4.0],
                           "numerical_rank": [10, 30]})
    summary = build_summary(layers)
    assert list(summary.columns) == expected
    assert summary.loc[0, "numerical_rank_mean"] == 20 and summary.loc[0, "numerical_rank_max"] == 30
    assert ("numerical_rank", row.meaning) in metrics_table.legend({"numerical_rank", "alpha"})
    for relative in metrics_table.DOC_BLOCKS:
        (tmp_path / relative).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(ROOT / relative, tmp_path / relative)
    assert sorted(metrics_table.write_docs(tmp_path)) == ["docs/interface.md", "docs/metrics.md"]
    assert "| `numerical_rank_max` | `numerical_rank` |" in (tmp_path / "docs/interface.md").read_text()
    assert "| `numerical_rank` | count | always | `numerical_rank_mean`, `numerical_rank_max` |" in (
        tmp_path / "docs/metrics.md").read_text()
