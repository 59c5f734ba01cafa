"""The one table of output columns: every column of a per-model CSV and every statistic of
`summary.csv`, with what it means, its unit, who writes it, the setting that adds it and how
it is summarised.

Derived from this table (nowhere else is a column listed):
- the columns of a metrics row (`net_esd.ESD_COLUMNS`, `esd_columns(settings)`) and of a
  per-model CSV (`csv_columns(settings)`: the model's identity, then the metrics row);
- the columns of `summary.csv` and how each is computed (`SUMMARY_COLUMNS`, `SUMMARY_STATS`,
  used by `esd/analysis/summary.py`);
- the report's "what the columns mean" legend (`esd/analysis/report.py`);
- the column tables of `docs/metrics.md` and `docs/interface.md`, between
  `<!-- generated: NAME -->` and `<!-- end generated: NAME -->` markers
  (`python -m esd.metrics_table` rewrites them; a test checks they are current).

A new metric: one `Column` row here (and, if a flag turns it on, one boolean `ESDSettings`
field named in `enabled_by`) and its computation in `net_esd.py`; the CSV, the summary, the
report and the docs follow. Column order here is the order users see: never reorder.

Torch-free and pandas-free: the orchestrator, the analysis and the docs tool import it.
"""
from __future__ import annotations

import re
import sys
from dataclasses import dataclass
from pathlib import Path

# WeightWatcher's usual range of well-trained layer alphas (below: over-trained, above:
# under-trained), meaningful only for fits on its scale: every --fix_fingers but xmin_mid.
WELL_TRAINED_ALPHA = (2.0, 6.0)

# Statistics a column may have in summary.csv, each over the model's selected layers of one
# layer mode. NaN and ±inf values are skipped by every statistic but `nan_count`.
STATISTICS = {
    "first": "the model's value (the same on every row)",
    "count": "number of layers",
    "nan_count": "layers where it is NaN",
    "mean": "mean over layers", "median": "median over layers",
    "std": "sample standard deviation over layers (ddof=1; NaN with fewer than two)",
    "min": "minimum over layers", "max": "maximum over layers",
    "q25": "25th percentile over layers (linear interpolation)",
    "q75": "75th percentile over layers (linear interpolation)",
    "sum": "sum over layers",
}


@dataclass(frozen=True)
class Column:
    """One column of the per-model CSV.

    written_by: "worker" (the model's identity, the same on every row of the model) or
        "metrics" (net_esd's row for each layer, on the rows of every layer mode).
    enabled_by: the boolean ESDSettings field that adds the column (None: always written).
    summary: its statistics in summary.csv, in order: a STATISTICS name (the summary column
        is `<name>_<statistic>`) or a pair (summary column name, statistic).
    """
    name: str
    unit: str
    meaning: str
    written_by: str = "metrics"
    enabled_by: str | None = None
    summary: tuple = ()


COLUMNS: tuple[Column, ...] = (
    Column("model_id", "text", "the model's id as written in the model list", "worker",
           summary=("first",)),
    Column("is_adapter", "bool", "the model is a LoRA adapter (analysed merged into its base)",
           "worker", summary=("first",)),
    Column("source_model", "text", "the model's base (an adapter's or fine-tune's parent); empty "
           "for a base", "worker", summary=("first",)),
    Column("longname", "text", "the layer's qualified module name without `.weight`; rows of "
           "--delta_from_base / --adapter_update end in `.delta_from_base` / `.adapter_update`",
           summary=(("num_layers", "count"),)),
    Column("layer_type", "text", "linear, conv1d, conv2d or embedding"),
    Column("M", "count", "the smaller dimension of the weight matrix"),
    Column("N", "count", "the larger dimension of the weight matrix"),
    Column("Q", "ratio", "N / M"),
    Column("params", "count", "number of elements of the weight tensor",
           summary=(("total_params", "sum"),)),
    Column("num_evals", "count", "number of eigenvalues before filtering (M × conv slices)"),
    Column("alpha", "exponent", "power-law exponent of the tail of the eigenvalue density of WᵀW; "
           "smaller = heavier tail = more correlation learned (how the tail is chosen: "
           "--fix_fingers; a failed fit is NaN)",
           summary=(("num_fit_failed", "nan_count"), "mean", "median", "std", "min", "max",
                    "q25", "q75")),
    Column("alpha_weighted", "exponent·log10(λ)", "α · log10(λ_max): alpha weighted by the "
           "layer's scale", summary=("mean",)),
    Column("log_alpha_norm", "log10(λ^α)", "log10(Σ λᵢ^α) over the kept eigenvalues, computed "
           "stably as α·log10(λ_max) + log10 Σ (λᵢ/λ_max)^α"),
    Column("D", "distance", "Kolmogorov–Smirnov distance of the power-law fit (smaller = better "
           "fit)"),
    Column("xmin", "eigenvalue", "the fitted start of the tail (not the smallest eigenvalue)"),
    Column("xmax", "eigenvalue", "the largest kept eigenvalue"),
    Column("num_pl_spikes", "count", "eigenvalues in the fitted tail (from xmin to λ_max)"),
    Column("sigma", "exponent", "standard error of alpha, (α − 1)/√num_pl_spikes"),
    Column("spectral_norm", "eigenvalue", "λ_max, the largest eigenvalue of WᵀW (the squared "
           "largest singular value)", summary=("mean", "max")),
    Column("log_spectral_norm", "log10(eigenvalue)", "log10(λ_max)", summary=("mean",)),
    Column("norm", "eigenvalue", "Σ λ over all eigenvalues = ‖W‖_F² (scaled conv slices "
           "included)"),
    Column("log_norm", "log10(eigenvalue)", "log10(norm)"),
    Column("stable_rank", "ratio", "norm / λ_max: how many directions carry the layer's energy",
           summary=("mean", "median")),
    Column("matrix_rank", "count", "number of σᵢ > σ_max · max(M, N) · ε, ε = float32 machine "
           "epsilon (transpose-invariant)"),
    Column("entropy", "0–1", "spectral entropy −Σ pᵢ ln pᵢ / ln(matrix_rank), pᵢ = λᵢ / Σλ over "
           "the kept eigenvalues, pᵢ = 0 terms dropped (1 = energy spread evenly); NaN when "
           "matrix_rank ≤ 1",
           summary=("mean", "median")),
    Column("fit_status", "text", "ok, or why no alpha was fitted (too_few_eigenvalues, "
           "no_candidate, …); a failed fit is NaN and left out of the alpha statistics"),
    Column("num_fingers", "count", "eigenvalues clipped from the top by --fix_fingers clip_xmax "
           "(NaN otherwise)"),
    Column("raw_alpha", "exponent", "alpha before clip_xmax's clipping (NaN otherwise)"),
    Column("warning", "text", "under-trained (α > 6), over-trained (α < 2) or empty; empty for a "
           "failed fit, under --fix_fingers xmin_mid and on delta / adapter-update rows"),
    Column("max_rand_eval", "eigenvalue", "λ_max of the element-shuffled W",
           enabled_by="randomize"),
    Column("ww_softrank", "ratio", "max_rand_eval / λ_max: near 1 for noise, small when the top "
           "of the spectrum is structure", enabled_by="randomize"),
    Column("rand_distance", "distance", "Jensen–Shannon distance (natural log, in [0, √ln 2 ≈ "
           "0.83]) between the sorted eigenvalue vectors of W and of its shuffle, each normalised "
           "to sum 1 (WeightWatcher's definition: it compares where the spectral mass sits, index "
           "by index, not two histograms); 0 for noise", enabled_by="randomize"),
    Column("rand_num_spikes", "count", "`num_spikes` of the MP fit of the shuffled spectrum: "
           "WeightWatcher's `rand_num_spikes` / `num_traps` (correlation traps: large elements "
           "that survive shuffling)", enabled_by="randomize"),
    Column("num_spikes", "count", "number of eigenvalues beyond the MP bulk edge plus the "
           "Tracy–Widom margin", enabled_by="mp_fit"),
    Column("sigma_mp", "scale", "the fitted σ of the rescaled spectrum (1 for a pure-noise "
           "matrix)", enabled_by="mp_fit"),
    Column("mp_softrank", "ratio", "λ₊ / max x: ≥ 1 for noise, small when the top eigenvalue "
           "stands far out of the bulk", enabled_by="mp_fit"),
    Column("bulk_min", "eigenvalue", "λ₋, the MP bulk's lower edge in the units of λ (divided back by the "
           "rescaling)",
           enabled_by="mp_fit"),
    Column("bulk_max", "eigenvalue", "λ₊, the MP bulk's upper edge in the units of λ (divided back by the "
           "rescaling)",
           enabled_by="mp_fit"),
)
BY_NAME = {column.name: column for column in COLUMNS}


def _enabled(column: Column, settings) -> bool:
    return column.enabled_by is None or bool(getattr(settings, column.enabled_by, False))


def metric_columns(settings=None) -> list[str]:
    """The columns of one metrics row (net_esd), in order; with `settings` (an ESDSettings or
    anything with its boolean fields) those its flags add; without, the always-written ones."""
    return [c.name for c in COLUMNS if c.written_by == "metrics" and _enabled(c, settings)]


def csv_columns(settings=None) -> list[str]:
    """The columns of a per-model CSV under `settings`: the model's identity, then its rows."""
    return [c.name for c in COLUMNS if c.written_by == "worker"] + metric_columns(settings)


def columns_enabled_by(setting: str) -> list[str]:
    """The columns a setting's flag adds (`randomize`, `mp_fit`), in order."""
    return [c.name for c in COLUMNS if c.enabled_by == setting]


@dataclass(frozen=True)
class SummaryStat:
    """One column of summary.csv: `statistic` of the per-layer column `of`."""
    name: str
    of: str
    statistic: str


def _summary_stats() -> tuple[SummaryStat, ...]:
    """Identity first, then the statistics in the table's order, then the totals (`sum`)."""
    stats = []
    for column in COLUMNS:
        for spec in column.summary:
            name, statistic = spec if isinstance(spec, tuple) else (
                column.name if spec == "first" else f"{column.name}_{spec}", spec)
            if statistic not in STATISTICS:
                raise ValueError(f"metrics table: {column.name}: unknown statistic {statistic!r}")
            stats.append(SummaryStat(name, column.name, statistic))
    rank = {"first": 0, "sum": 2}
    return tuple(sorted(stats, key=lambda s: rank.get(s.statistic, 1)))   # stable


SUMMARY_STATS = _summary_stats()
SUMMARY_COLUMNS = tuple(stat.name for stat in SUMMARY_STATS)
IDENTITY_COLUMNS = tuple(stat.name for stat in SUMMARY_STATS if stat.statistic == "first")


def legend(present=None) -> list[tuple[str, str]]:
    """(column, meaning) for the report's legend: every measured column (not the identity),
    in table order, restricted to `present` when given."""
    return [(c.name, c.meaning) for c in COLUMNS if c.written_by == "metrics"
            and (present is None or c.name in present)]


# ----------------------------------------------------------------------------- docs tables

def _cell(text: str) -> str:
    return str(text).replace("|", "\\|")


def _when(column: Column) -> str:
    return f"`--{column.enabled_by}`" if column.enabled_by else "always"


def _summarised_as(column: Column) -> str:
    names = [f"`{s.name}`" for s in SUMMARY_STATS if s.of == column.name]
    return ", ".join(names)


def per_model_csv_table() -> str:
    lines = ["| column | unit | written | in summary.csv | meaning |", "| --- | --- | --- | --- | --- |"]
    lines += [f"| `{c.name}` | {_cell(c.unit)} | {_when(c)} | {_summarised_as(c)} | {_cell(c.meaning)} |"
              for c in COLUMNS]
    return "\n".join(lines)


def summary_table() -> str:
    lines = ["| column | of the per-layer column | statistic |", "| --- | --- | --- |"]
    lines += [f"| `{s.name}` | `{s.of}` | {_cell(STATISTICS[s.statistic])} |" for s in SUMMARY_STATS]
    return "\n".join(lines)


def enabled_by_table(setting: str) -> str:
    lines = ["| column | definition |", "| --- | --- |"]
    lines += [f"| `{c.name}` | {_cell(c.meaning)} |" for c in COLUMNS if c.enabled_by == setting]
    return "\n".join(lines)


# Which generated block goes into which doc, by marker name.
DOC_BLOCKS = {
    "docs/metrics.md": {"per_model_csv": per_model_csv_table,
                        "randomize_columns": lambda: enabled_by_table("randomize"),
                        "mp_fit_columns": lambda: enabled_by_table("mp_fit")},
    "docs/interface.md": {"summary_columns": summary_table},
}
_BLOCK = re.compile(r"(<!-- generated: (?P<name>[\w]+) -->\n)(?P<body>.*?)(<!-- end generated: (?P=name) -->)",
                    re.S)


def regenerate(text: str, blocks: dict) -> str:
    """`text` with the body between each pair of markers replaced by its block's table."""
    def replace(match):
        make = blocks.get(match["name"])
        if make is None:
            return match[0]
        return f"{match[1]}{make()}\n{match[4]}"
    return _BLOCK.sub(replace, text)


def stale_docs(root) -> list[str]:
    """The docs (relative paths) whose generated tables differ from the table, or that lack
    a block's markers."""
    stale = []
    for relative, blocks in DOC_BLOCKS.items():
        text = (Path(root) / relative).read_text(encoding="utf-8")
        found = {m["name"] for m in _BLOCK.finditer(text)}
        if regenerate(text, blocks) != text or not set(blocks) <= found:
            stale.append(relative)
    return stale


def write_docs(root) -> list[str]:
    """Rewrite the generated tables of the docs under `root`; returns the docs changed."""
    changed = []
    for relative, blocks in DOC_BLOCKS.items():
        path = Path(root) / relative
        text = path.read_text(encoding="utf-8")
        new = regenerate(text, blocks)
        if new != text:
            path.write_text(new, encoding="utf-8")
            changed.append(relative)
    return changed


def main(argv=None) -> int:
    """`python -m esd.metrics_table [--check]`: rewrite (or check) the docs' column tables."""
    argv = sys.argv[1:] if argv is None else argv
    root = Path(__file__).resolve().parents[1]
    if argv == ["--check"]:
        stale = stale_docs(root)
        for relative in stale:
            print(f"{relative}: generated column tables are out of date "
                  f"(run: python -m esd.metrics_table)", file=sys.stderr)
        return 1 if stale else 0
    if argv:
        print("usage: python -m esd.metrics_table [--check]", file=sys.stderr)
        return 2
    for relative in write_docs(root):
        print(f"rewrote the column tables of {relative}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
