"""The analysis of a model tree and the report's reading aids: the model list's extra columns
in summary.csv and the report, `--by_relation` (each base beside its fine-tunes and
adapters, Δalpha per layer), the well-trained band only where the fit supports it, and the
report's layout (tables that fit and print, ids kept readable, plural forms).

The tree test runs the real orchestrator on real tiny models (a GPT-2 base, two fine-tunes
of it, one LoRA adapter of it) and checks the numbers against the per-model CSVs.
"""
from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

import analyze_results as ar
from esd.analysis import plots, relations
from esd.analysis.adapters import delta_limits
from esd.analysis.report import _table_html
from esd.analysis.results import counted, well_trained_range
from esd.model_list import safe_id
from tiny_models import offline_env, save_fine_tune, save_gpt2, save_lora_adapter

ROOT = Path(__file__).resolve().parents[1]
GOLDEN = json.loads((Path(__file__).parent / "golden" / "columns.json").read_text())
EXTRA = ["downloads", "likes", "library_name", "gated"]


def analyze(*args, cwd=None, env=None):
    return subprocess.run([sys.executable, str(ROOT / "analyze_results.py"), *map(str, args)],
                          capture_output=True, text=True, cwd=cwd, env=env, timeout=600)


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    """A finished run over a base, two fine-tunes and an adapter, listed with metadata."""
    root = tmp_path_factory.mktemp("tree")
    base = save_gpt2(root / "models" / "base", seed=1)
    ft1 = save_fine_tune(base, root / "models" / "ft-one", seed=11, scale=0.05)
    ft2 = save_fine_tune(base, root / "models" / "ft-two", seed=12, scale=0.2)
    lora = save_lora_adapter(base, root / "models" / "lora", target_modules=["c_attn"],
                             fan_in_fan_out=True)
    listed = [  # (id, source_model, relation, downloads, likes, library_name, gated)
        (base, "", "base", 1000, 50, "transformers", "False"),
        (ft1, base, "finetune", 300, 7, "transformers", "False"),
        (ft2, base, "finetune", 20, 0, "transformers", "manual"),
        (lora, base, "adapter", 5, 1, "peft", "False"),
    ]
    model_list = root / "tree.csv"
    with model_list.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["model_id", "source_model", "base_model_relation", *EXTRA])
        for model, source, relation, *extra in listed:
            writer.writerow([str(model), str(source) if source else "", relation, *extra])
    env = offline_env(root)
    result = subprocess.run(
        [sys.executable, str(ROOT / "run_esd_experiment.py"), "--model_list", str(model_list),
         "--output_dir", str(root / "out"), "--gpus", "none", "--cpu_workers", "2",
         "--poll_interval", "0.05", "--max_check", "1", "--fix_fingers", "DKS"],
        cwd=root, capture_output=True, text=True, env=env, timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    ids = {name: str(model) for name, model in
           (("base", base), ("ft1", ft1), ("ft2", ft2), ("lora", lora))}
    (model_list).unlink()   # the run's own copy is what the analysis reads from now on
    return root / "out", ids, listed, env


def per_model(out: Path, model_id: str) -> pd.DataFrame:
    frame = pd.read_csv(out / f"{safe_id(model_id)}.csv")
    return frame[~frame["longname"].str.contains(r"\.(?:delta_from_base|adapter_update)$")]


def test_the_lists_extra_columns_follow_each_models_statistics_in_summary_csv(tree):
    out, ids, listed, _ = tree
    (copy,) = out.glob("runs/*/model_list.csv")   # the run kept its list
    assert {str(m) for m, *_ in listed} <= set(pd.read_csv(copy)["model_id"])
    summary = pd.read_csv(out / "summary.csv")   # written by the run itself
    assert list(summary.columns) == GOLDEN["summary"] + EXTRA
    by_id = summary.set_index("model_id")
    for model, _, _, downloads, likes, library, gated in listed:
        row = by_id.loc[str(model)]
        assert (row["downloads"], row["likes"], row["library_name"], str(row["gated"])) == (
            downloads, likes, library, gated)
    assert pd.api.types.is_integer_dtype(summary["downloads"])   # numbers stay numbers
    # the analysis alone (no list given, the original gone) writes the same columns
    result = analyze("--results_dir", out, "--filter", "downloads>=300", "--show", "model_id",
                     "downloads")
    assert result.returncode == 0, result.stderr
    assert ids["base"] in result.stdout and ids["ft1"] in result.stdout
    assert ids["ft2"] not in result.stdout


def test_by_relation_puts_each_child_beside_its_base_with_the_csvs_alpha_differences(tree):
    out, ids, _, env = tree
    result = analyze("--results_dir", out, "--by_relation", env=env)
    assert result.returncode == 0, result.stderr
    table = pd.read_csv(out / "by_relation.csv")
    assert list(table["model_id"]) == [ids["base"], ids["ft1"], ids["ft2"], ids["lora"]]
    assert list(table["relation"]) == ["base", "finetune", "finetune", "adapter"]
    assert set(table["base"]) == {ids["base"]}
    summary = pd.read_csv(out / "summary.csv").set_index("model_id")
    for _, row in table.iterrows():
        for stat in ("alpha_mean", "stable_rank_mean", "entropy_mean"):
            assert row[stat] == pytest.approx(summary.loc[row["model_id"], stat], rel=1e-12)
            assert row[f"d_{stat}"] == pytest.approx(
                summary.loc[row["model_id"], stat] - summary.loc[ids["base"], stat], rel=1e-9, abs=1e-12)
        assert row["downloads"] == summary.loc[row["model_id"], "downloads"]

    layers = pd.read_csv(out / "by_relation_layers.csv")
    base = per_model(out, ids["base"]).set_index("longname")
    for name in ("ft1", "ft2", "lora"):
        child = per_model(out, ids[name]).set_index("longname")
        mine = layers[layers["model_id"] == ids[name]].set_index("longname")
        assert set(mine.index) == set(child.index) & set(base.index)
        expected = child.loc[mine.index, "alpha"] - base.loc[mine.index, "alpha"]
        np.testing.assert_allclose(mine["d_alpha"], expected, rtol=0, atol=1e-12)
        np.testing.assert_allclose(mine["base_alpha"], base.loc[mine.index, "alpha"])
        assert list(mine["layer_type"]) == list(base.loc[mine.index, "layer_type"])
    # the adapter touched only c_attn: every other layer of it is the base's, Δ = 0
    lora = layers[layers["model_id"] == ids["lora"]]
    untouched = lora[~lora["longname"].str.contains("c_attn")]
    assert len(untouched) and (untouched["d_alpha"].abs() < 1e-9).all()
    assert (lora.loc[lora["longname"].str.contains("c_attn"), "d_alpha"].abs() > 0).all()
    # a fine-tune moved every weight: its layers' alphas differ from the base's
    for name in ("ft1", "ft2"):
        assert (layers.loc[layers["model_id"] == ids[name], "d_alpha"].abs() > 0).mean() > 0.5
    figure = out / "plots" / "by_relation" / f"{safe_id(ids['base'])}.png"
    assert figure.read_bytes().startswith(b"\x89PNG")
    assert f"plot: {figure}" in result.stdout


def test_the_report_shows_the_tree_and_the_lists_columns(tree):
    out, ids, _, _ = tree
    page = ar.write_report(out).read_text(encoding="utf-8")
    assert "By relation: each base and its children" in page
    assert "plots/by_relation" not in page or "base64" in page
    summary_part = page[page.index("<h2>Summary</h2>"):]
    assert "downloads" in summary_part[:summary_part.index("</table>")]
    assert "library<wbr>_name" in summary_part or "library_<wbr>name" in summary_part
    # DKS alphas: the well-trained range applies, and the page says so
    assert "usual range of well-trained layers" in page


def test_no_children_says_so_in_one_line(tmp_path):
    from test_analyze_results import write_layers
    write_layers(tmp_path, "org/a", [{}, {}])
    result = analyze("--results_dir", tmp_path, "--by_relation")
    assert result.returncode == 0, result.stderr
    assert "by relation: no model whose source_model has results here" in result.stderr
    assert not (tmp_path / "by_relation.csv").exists()


# ---------------------------------------------------------------- the well-trained band

def _captured_figures(monkeypatch) -> list:
    figures = []

    def keep(fig, path):
        figures.append(fig)
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path)
        return Path(path)
    monkeypatch.setattr(plots, "_save", keep)
    return figures


@pytest.mark.parametrize("fix_fingers, band", [("xmin_mid", False), (None, False), ("DKS", True),
                                               ("clip_xmax", True)])
def test_the_2_to_6_band_is_drawn_only_on_alphas_of_a_fit_that_supports_it(tmp_path, monkeypatch,
                                                                           fix_fingers, band):
    from test_analyze_results import write_layers
    write_layers(tmp_path, "org/a", [{"alpha": 2.5}, {"alpha": 3.5}])
    if fix_fingers:
        (tmp_path / "esd_settings.json").write_text(json.dumps({"fix_fingers": fix_fingers}))
    assert (well_trained_range(tmp_path) == (2.0, 6.0)) is band
    figures = _captured_figures(monkeypatch)
    plots.write_plots(tmp_path)
    distribution = figures[0].axes[0]
    vertical = [line.get_xdata()[0] for line in distribution.get_lines()
                if len(set(line.get_xdata())) == 1 and line.get_linestyle() == "--"]
    assert sorted(vertical) == ([2.0, 6.0] if band else [])
    label = distribution.get_xlabel()
    assert ("well-trained range" in label) is band
    page = ar.write_report(tmp_path).read_text(encoding="utf-8")
    if band:
        assert "usual range of well-trained layers" in page
    else:
        assert "for comparing models with each other" in page
        assert "<code>--fix_fingers DKS</code> gives WeightWatcher's numbers" in page
        assert "usual well-trained range" not in page and "usual range of well-trained" not in page


# ---------------------------------------------------------------- layout

def test_long_ids_keep_their_org_and_their_end():
    text = "meta-llama-research-org/Llama-3.2-1B-Instruct-finetuned-on-dataset-3-lora"
    short = plots._short(text, 36)
    assert len(short) == 36 and short.startswith("meta-llama-res") and short.endswith("dataset-3-lora")
    assert plots._short("org/a", 36) == "org/a"


def test_delta_axes_fit_one_sided_deltas_instead_of_mirroring_them():
    low, high = delta_limits(np.array([0.01, 0.05, 0.2]))
    assert low < 0 < high and -low < 0.1 * high      # 0 in view, no empty mirrored half
    low, high = delta_limits(np.array([-0.3, 0.1]))
    assert low < -0.3 and high > 0.1 and high < 0.3


def test_alpha_by_depth_has_no_empty_band_above_its_panels(tmp_path, monkeypatch):
    from test_analyze_results import write_layers
    for name in ("org/a", "org/b"):
        write_layers(tmp_path, name, [{"alpha": 2 + i / 10} for i in range(6)])
    figures = _captured_figures(monkeypatch)
    plots.write_plots(tmp_path)
    depth = figures[1]
    depth.canvas.draw()
    top = max(ax.get_position().y1 for ax in depth.axes if ax.get_visible())
    title_room = 1 - top   # the share of the figure above the panels: title, legend, panel titles
    assert title_room * depth.get_figheight() < 0.75   # inches: one line of title, no band


def test_tables_wrap_headers_and_ids_and_print_whole():
    frame = pd.DataFrame({"model_id": ["org/a-very-long-name"], "alpha_weighted_mean": [1.23456],
                          "num_layers": [3]})
    table = _table_html(frame, scroll=True)
    assert "alpha_<wbr>weighted_<wbr>mean" in table
    assert '<td class="text">org/a-very-long-name</td>' in table   # the id as written, wrapped by CSS
    assert '<td class="num">1.235</td>' in table and '<td class="num">3</td>' in table
    from esd.analysis.report import _REPORT_TEMPLATE
    print_css = _REPORT_TEMPLATE[_REPORT_TEMPLATE.index("@media print"):]
    assert "max-height: none" in print_css and "overflow: visible" in print_css
    screen_css = _REPORT_TEMPLATE[:_REPORT_TEMPLATE.index("@media print")]
    assert "td.text {{ min-width: 8em; max-width: 26em; overflow-wrap: anywhere; }}" in screen_css


def test_counts_in_messages_take_the_plural_only_when_plural(tmp_path):
    assert [counted(n, "model") for n in (0, 1, 2)] == ["0 models", "1 model", "2 models"]
    assert counted(1, "child", "children") == "1 child" and counted(3, "child", "children") == "3 children"
    from test_analyze_results import write_layers
    write_layers(tmp_path, "org/a", [{}])
    result = analyze("--results_dir", tmp_path, "--verbose")
    assert result.returncode == 0, result.stderr
    assert "summary of 1 model (1 layer)" in result.stderr
    assert "1 model, 1 layer, 0 failed fits" in result.stdout
