"""analyze_results.py over per-model CSVs written by the real worker from tiny local models
(and, for exact edge cases, CSVs written here): summary values, filters, queries through
the command line, plots, the self-contained report, and metrics over training steps."""
from __future__ import annotations

import base64
import html.parser
import json
import os
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

import analyze_results as ar
from esd.model_list import read_model_list, safe_id
from tiny_models import save_bert, save_gpt2, save_llama

ROOT = Path(__file__).resolve().parents[1]
ANALYZE = [sys.executable, str(ROOT / "analyze_results.py")]
GOLDEN_COLUMNS = json.loads((Path(__file__).parent / "golden" / "columns.json").read_text())
CONTRACT_SUMMARY = GOLDEN_COLUMNS["summary"]
PER_MODEL_COLUMNS = GOLDEN_COLUMNS["per_model_csv"]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def env():
    return dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=str(ROOT), TOKENIZERS_PARALLELISM="false",
                MPLBACKEND="Agg")


def analyze(*args, cwd=None):
    return subprocess.run(ANALYZE + [str(a) for a in args], capture_output=True, text=True,
                          env=env(), cwd=cwd, timeout=300)


def run_worker(model_dir, out, cwd=None):
    """The real worker, one process per model, as the orchestrator runs it."""
    return subprocess.run([sys.executable, str(ROOT / "esd_worker.py"), "--model_id", str(model_dir),
                           "--output_dir", str(out), "--save_eigs", "--device", "cpu"],
                          capture_output=True, text=True, env=env(), cwd=cwd, timeout=300)


def run_workers(model_dirs, out, cwd=None):
    with ThreadPoolExecutor(max_workers=2) as pool:
        return list(pool.map(lambda m: run_worker(m, out, cwd), model_dirs))


def assert_clean_error(result, *fragments):
    assert result.returncode != 0
    assert "Traceback" not in result.stderr, result.stderr
    for fragment in fragments:
        assert fragment in result.stderr, result.stderr


def write_layers(out: Path, model_id: str, layers: list[dict]) -> Path:
    """A per-model CSV with the contract's columns; unspecified metrics get plain values."""
    rows = []
    for i, layer in enumerate(layers):
        row = dict(model_id=model_id, is_adapter=False, source_model="", longname=f"layer.{i}",
                   layer_type="linear", M=64, N=128, Q=2.0, params=64 * 128, num_evals=64, alpha=3.0,
                   alpha_weighted=1.0, log_alpha_norm=1.0, D=0.1, xmin=0.1, xmax=2.0, num_pl_spikes=32,
                   sigma=0.3, spectral_norm=2.0, log_spectral_norm=np.log10(2.0), norm=10.0,
                   log_norm=1.0, stable_rank=5.0, matrix_rank=64, entropy=0.9, fit_status="ok")
        row.update(layer)
        rows.append(row)
    path = out / f"{safe_id(model_id)}.csv"
    out.mkdir(parents=True, exist_ok=True)
    pd.DataFrame(rows, columns=PER_MODEL_COLUMNS).to_csv(path, index=False)
    return path


def png_files(directory: Path) -> list[Path]:
    return sorted(directory.rglob("*.png"))


def assert_valid_png(path: Path) -> None:
    import matplotlib.image
    data = path.read_bytes()
    assert data.startswith(PNG_MAGIC), path
    assert len(data) > 5_000, f"{path} is suspiciously small ({len(data)} bytes)"
    image = matplotlib.image.imread(path)
    assert image.ndim == 3 and image.shape[0] > 100 and image.shape[1] > 100
    assert image[..., :3].std() > 0.01, f"{path} is blank"


# ---------------------------------------------------------------- fixtures (real worker)

@pytest.fixture(scope="module")
def worker_results(tmp_path_factory):
    """Three tiny models (GPT-2, Llama, BERT) and a corrupt one, through the real worker."""
    root = tmp_path_factory.mktemp("worker")
    models = [save_gpt2(root / "models" / "gpt2"), save_llama(root / "models" / "llama"),
              save_bert(root / "models" / "bert")]
    corrupt = save_gpt2(root / "models" / "corrupt", seed=3)
    weights = corrupt / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 3])
    out = root / "results"
    results = run_workers([*models, corrupt], out)
    for model, result in zip(models, results[:3]):
        assert result.returncode == 0, f"worker failed on {model}: {result.stderr[-2000:]}"
    assert results[3].returncode != 0
    return out, [str(m) for m in models], str(corrupt)


@pytest.fixture
def results_copy(worker_results, tmp_path):
    out, models, corrupt = worker_results
    copy = tmp_path / "results"
    shutil.copytree(out, copy)
    return copy, models, corrupt


# ---------------------------------------------------------------- summary

def test_summary_has_the_contract_columns_and_values_recomputed_with_numpy(results_copy):
    out, models, _ = results_copy
    path = ar.write_summary(out)
    assert path == out / "summary.csv"
    summary = pd.read_csv(path)
    assert list(summary.columns) == CONTRACT_SUMMARY
    assert sorted(summary["model_id"]) == sorted(models)
    for model_id in models:
        layers = pd.read_csv(out / f"{safe_id(model_id)}.csv")
        row = summary.set_index("model_id").loc[model_id]
        alpha = layers["alpha"].to_numpy(dtype=float)
        fitted = alpha[~np.isnan(alpha)]
        assert row["num_layers"] == len(layers)
        assert row["num_fit_failed"] == np.isnan(alpha).sum()
        expected = {
            "alpha_mean": fitted.mean(), "alpha_median": np.median(fitted),
            "alpha_std": fitted.std(ddof=1), "alpha_min": fitted.min(), "alpha_max": fitted.max(),
            "alpha_q25": np.percentile(fitted, 25), "alpha_q75": np.percentile(fitted, 75),
            "alpha_weighted_mean": np.nanmean(layers["alpha_weighted"]),
            "spectral_norm_mean": np.nanmean(layers["spectral_norm"]),
            "spectral_norm_max": np.nanmax(layers["spectral_norm"]),
            "log_spectral_norm_mean": np.nanmean(layers["log_spectral_norm"]),
            "stable_rank_mean": np.nanmean(layers["stable_rank"]),
            "stable_rank_median": np.nanmedian(layers["stable_rank"]),
            "entropy_mean": np.nanmean(layers["entropy"]),
            "entropy_median": np.nanmedian(layers["entropy"]),
            "total_params": layers["params"].sum(),
        }
        for column, value in expected.items():
            assert row[column] == pytest.approx(value, rel=1e-9), column
        assert bool(row["is_adapter"]) is False


def test_failed_fits_are_left_out_of_alpha_statistics_and_counted(tmp_path):
    write_layers(tmp_path, "org/m", [
        {"alpha": 2.0}, {"alpha": 4.0}, {"alpha": 9.0},
        {"alpha": np.nan, "fit_status": "too_few_eigenvalues", "spectral_norm": 100.0},
        {"alpha": np.nan, "alpha_weighted": np.nan, "fit_status": "no_candidate"},
    ])
    row = ar.build_summary(ar.load_per_layer(tmp_path)).iloc[0]
    assert row["num_layers"] == 5 and row["num_fit_failed"] == 2
    assert row["alpha_mean"] == pytest.approx(5.0)
    assert row["alpha_median"] == pytest.approx(4.0)
    assert row["alpha_std"] == pytest.approx(np.std([2, 4, 9], ddof=1))   # sample std
    assert (row["alpha_min"], row["alpha_max"]) == (2.0, 9.0)
    # a failed fit still has a spectral norm: it counts there
    assert row["spectral_norm_max"] == 100.0
    assert row["spectral_norm_mean"] == pytest.approx((4 * 2.0 + 100.0) / 5)


def test_model_whose_every_fit_failed_has_nan_alpha_statistics(tmp_path):
    write_layers(tmp_path, "org/m", [{"alpha": np.nan, "fit_status": "no_candidate"}] * 3)
    row = ar.build_summary(ar.load_per_layer(tmp_path)).iloc[0]
    assert row["num_fit_failed"] == 3
    assert np.isnan(row[["alpha_mean", "alpha_std", "alpha_q25", "alpha_max"]].astype(float)).all()


def test_layer_type_and_exclude_filters_drop_layers_before_the_statistics(tmp_path):
    write_layers(tmp_path, "org/llm", [
        {"longname": "model.embed_tokens", "layer_type": "embedding", "alpha": 10.0},
        {"longname": "model.layers.0.self_attn.q_proj", "alpha": 2.0},
        {"longname": "model.layers.0.mlp.down_proj", "alpha": 4.0},
        {"longname": "lm_head", "alpha": 20.0},
    ])
    per_layer = ar.load_per_layer(tmp_path)
    assert ar.build_summary(per_layer).iloc[0]["alpha_mean"] == pytest.approx(9.0)
    linear = ar.build_summary(per_layer, layer_types=["linear"]).iloc[0]
    assert (linear["num_layers"], linear["alpha_mean"]) == (3, pytest.approx(26 / 3))
    body = ar.build_summary(per_layer, exclude_patterns=["embed", "^lm_head$"]).iloc[0]
    assert (body["num_layers"], body["alpha_mean"]) == (2, pytest.approx(3.0))
    mlp_only = ar.build_summary(per_layer, exclude_patterns=[r"self_attn\.", "embed|lm_head"])
    assert mlp_only.iloc[0]["alpha_mean"] == pytest.approx(4.0)


def test_model_with_every_layer_filtered_out_keeps_a_row_with_zero_layers(tmp_path):
    write_layers(tmp_path, "org/a", [{"layer_type": "conv2d"}])
    write_layers(tmp_path, "org/b", [{"layer_type": "linear"}])
    summary = ar.build_summary(ar.load_per_layer(tmp_path), layer_types=["linear"])
    assert dict(zip(summary["model_id"], summary["num_layers"])) == {"org/a": 0, "org/b": 1}


def test_only_per_model_csvs_are_read_whatever_else_sits_in_the_directory(tmp_path):
    write_layers(tmp_path, "org/a", [{}, {}])
    pd.DataFrame({"model_id": ["x"], "alpha_mean": [1.0]}).to_csv(tmp_path / "summary.csv")
    (tmp_path / "runs.csv").write_text("run_id,started\n1,now\n")
    (tmp_path / "models.csv").write_text("model_id,source_model\norg/a,\n")
    (tmp_path / "merged_export.csv").write_text("model_id,longname,alpha\na,l0,2\nb,l0,3\n")
    (tmp_path / "notes.csv").write_text("")
    per_layer = ar.load_per_layer(tmp_path)
    assert list(per_layer["model_id"].unique()) == ["org/a"]
    assert list(per_layer["layer_index"]) == [0, 1]


def test_unknown_layer_type_and_bad_exclude_regex_are_clear_errors(tmp_path):
    write_layers(tmp_path, "org/a", [{}])
    assert_clean_error(analyze("--results_dir", tmp_path, "--layer_types", "dense"),
                       "unknown layer type", "linear")
    assert_clean_error(analyze("--results_dir", tmp_path, "--exclude", "*embed*"),
                       "not a regular expression", "'*embed*'")


def test_empty_or_missing_results_dir_is_a_clear_error(tmp_path):
    assert_clean_error(analyze("--results_dir", tmp_path / "nope"), "does not exist")
    assert_clean_error(analyze("--results_dir", tmp_path), "no per-model result CSVs")


# ---------------------------------------------------------------- queries on the command line

@pytest.fixture
def three_models(tmp_path):
    write_layers(tmp_path, "org/low", [{"alpha": 2.0}, {"alpha": 2.2}])
    write_layers(tmp_path, "org/mid", [{"alpha": 3.0}, {"alpha": 3.4}])
    write_layers(tmp_path, "org/lora", [{"alpha": 5.0, "is_adapter": True, "source_model": "org/mid"}])
    return tmp_path


def printed_ids(stdout: str) -> list[str]:
    return [line.split()[0] for line in stdout.splitlines()[1:] if line.strip()]


def test_cli_writes_summary_and_filter_sort_limit_select_and_order_models(three_models):
    result = analyze("--results_dir", three_models, "--filter", "alpha_mean<4.5",
                     "--sort_by", "alpha_mean", "--descending", "--show", "model_id", "alpha_mean")
    assert result.returncode == 0, result.stderr
    assert (three_models / "summary.csv").exists()
    assert printed_ids(result.stdout) == ["org/mid", "org/low"]
    assert result.stdout.splitlines()[0].split() == ["model_id", "alpha_mean"]
    limited = analyze("--results-dir", three_models, "--sort-by", "alpha_mean", "--limit", "1")
    assert printed_ids(limited.stdout) == ["org/low"]


def test_cli_filters_on_booleans_strings_and_regex(three_models):
    adapters = analyze("--results_dir", three_models, "--filter", "is_adapter=True", "--show", "model_id")
    assert printed_ids(adapters.stdout) == ["org/lora"]
    bases = analyze("--results_dir", three_models, "--filter", "is_adapter=false", "num_layers>=2",
                    "--show", "model_id")
    assert sorted(printed_ids(bases.stdout)) == ["org/low", "org/mid"]
    by_source = analyze("--results_dir", three_models, "--filter", "source_model=org/mid",
                        "--show", "model_id")
    assert printed_ids(by_source.stdout) == ["org/lora"]
    by_name = analyze("--results_dir", three_models, "--filter", "model_id~^org/(low|mid)$",
                      "model_id!=org/low", "--show", "model_id")
    assert printed_ids(by_name.stdout) == ["org/mid"]
    hidden = analyze("--results_dir", three_models, "--limit", "3", "--hide", "source_model")
    assert "source_model" not in hidden.stdout and "alpha_mean" in hidden.stdout


def test_cli_bad_filter_names_the_problem_lists_columns_and_exits_nonzero(three_models):
    bad_column = analyze("--results_dir", three_models, "--filter", "alpah_mean<3")
    assert_clean_error(bad_column, "unknown column 'alpah_mean'", "alpha_mean", "stable_rank_mean")
    assert_clean_error(analyze("--results_dir", three_models, "--filter", "alpha_mean<abc"),
                       "numeric", "'abc'")
    assert_clean_error(analyze("--results_dir", three_models, "--filter", "alpha_mean"), "COLUMN OP VALUE")
    assert_clean_error(analyze("--results_dir", three_models, "--sort_by", "nope"), "--sort_by", "nope")


def test_list_columns_prints_every_summary_column(three_models):
    result = analyze("--results_dir", three_models, "--list-columns")
    assert result.returncode == 0
    assert [line.split()[0] for line in result.stdout.splitlines()] == CONTRACT_SUMMARY


def test_output_option_writes_the_summary_elsewhere_and_leaves_no_temporary_file(three_models, tmp_path):
    target = tmp_path / "elsewhere" / "s.csv"
    assert analyze("--results_dir", three_models, "--output", target).returncode == 0
    assert list(pd.read_csv(target).columns) == CONTRACT_SUMMARY
    assert not [p for p in target.parent.iterdir() if p.name.startswith(".")]


def test_verbose_names_the_highest_and_lowest_models(tmp_path):
    for i in range(12):
        write_layers(tmp_path, f"org/m{i:02d}", [{"alpha": 2.0 + i / 2}])
    result = analyze("--results_dir", tmp_path, "--verbose")
    assert result.returncode == 0
    text = result.stdout
    assert "highest alpha_mean" in text and "lowest alpha_mean" in text
    highest = text.split("highest alpha_mean:")[1].split("lowest")[0]
    lowest = text.split("lowest alpha_mean:")[1].split("highest")[0]
    assert "org/m11" in highest and "org/m00" not in highest
    assert "org/m00" in lowest and "org/m11" not in lowest


# ---------------------------------------------------------------- plots and report

def test_plots_are_valid_pngs_including_esd_with_fit_from_saved_eigenvalues(results_copy):
    out, models, _ = results_copy
    result = analyze("--results_dir", out, "--plots", "--metric", "stable_rank_mean")
    assert result.returncode == 0, result.stderr
    plots = png_files(out / "plots")
    names = {p.relative_to(out / "plots").as_posix() for p in plots}
    assert {"alpha_distribution.png", "alpha_by_depth.png", "compare_stable_rank_mean.png"} <= names
    assert {f"esd/{safe_id(m)}.png" for m in models} <= names
    for path in plots:
        assert_valid_png(path)


def test_esd_layer_option_plots_that_layer_and_unknown_layer_is_a_clear_error(results_copy):
    out, models, _ = results_copy
    gpt2 = pd.read_csv(out / f"{safe_id(models[0])}.csv")
    layer = gpt2["longname"].iloc[2]
    per_layer = ar.load_per_layer(out)
    assert list(ar.esd_layers(per_layer, models[0], layer)["longname"]) == [layer]
    result = analyze("--results_dir", out, "--plots", "--esd_layer", layer)
    assert result.returncode == 0, result.stderr
    assert_valid_png(out / "plots" / "esd" / f"{safe_id(models[0])}.png")
    assert_clean_error(analyze("--results_dir", out, "--plots", "--esd_layer", "no.such.layer"),
                       "no.such.layer")


def test_plot_count_and_size_stay_bounded_for_many_models(tmp_path):
    rng = np.random.default_rng(0)
    for i in range(60):
        write_layers(tmp_path, f"org/model-{i:02d}",
                     [{"alpha": a} for a in rng.uniform(2, 6, size=4)])
    paths = ar.write_plots(tmp_path)
    assert len(paths) == 3          # no eigs/: no ESD plots; one file per kind whatever the count
    summary = ar.build_summary(ar.load_per_layer(tmp_path))
    ids, note = ar.pick_models(summary, "alpha_mean", ar.MAX_MODELS_PER_PLOT)
    ranked = summary.sort_values("alpha_mean", ascending=False)["model_id"].tolist()
    assert ids == ranked[:20] + ranked[-20:] and "20 highest" in note
    for path in paths:
        assert_valid_png(path)
        assert path.stat().st_size < 1_000_000


class _Page(html.parser.HTMLParser):
    def __init__(self):
        super().__init__()
        self.images, self.text, self.tags = [], [], []

    def handle_starttag(self, tag, attrs):
        self.tags.append(tag)
        if tag == "img":
            self.images.append(dict(attrs))

    def handle_data(self, data):
        self.text.append(data)


def test_report_is_one_html_file_embedding_every_plot_and_listing_failures(results_copy):
    out, models, corrupt = results_copy
    result = analyze("--results_dir", out, "--report")
    assert result.returncode == 0, result.stderr
    page = _Page()
    page.feed((out / "report.html").read_text(encoding="utf-8"))
    page.close()
    text = " ".join(page.text)
    plots = png_files(out / "plots")
    assert len(plots) >= 6
    embedded = [base64.b64decode(img["src"].split(",", 1)[1]) for img in page.images]
    assert all(img["src"].startswith("data:image/png;base64,") for img in page.images)
    assert sorted(embedded) == sorted(p.read_bytes() for p in plots)   # every plot, nothing stale
    assert "table" in page.tags and "html" in page.tags
    for model_id in models:
        assert model_id in text
    # the corrupt model failed in the real worker: its row names the stage and reason
    failures = ar.read_failure_table(out)
    assert list(failures["model_id"]) == [corrupt]
    assert corrupt in text and failures["stage"].iloc[0] in text and failures["reason"].iloc[0] in text


def test_failures_only_in_failed_models_txt_still_appear_in_the_report(tmp_path):
    write_layers(tmp_path, "org/ok", [{}, {}])
    (tmp_path / "failed_models.txt").write_text("org/gone\tresolve: repo_not_found: 404 for org/gone\n")
    failures = ar.read_failure_table(tmp_path)
    assert failures.iloc[0][["model_id", "stage", "reason"]].tolist() == ["org/gone", "resolve",
                                                                          "repo_not_found"]
    text = ar.write_report(tmp_path).read_text()
    assert "org/gone" in text and "repo_not_found" in text


def test_report_renders_in_headless_chromium(results_copy, tmp_path):
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        pytest.skip("chromium is not installed (apt-get install -y chromium) — render check skipped")
    out, _, _ = results_copy
    report = ar.write_report(out)
    shot = Path(os.environ.get("ESD_REPORT_SCREENSHOT", tmp_path / "report.png"))
    result = subprocess.run(
        [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--no-first-run",
         f"--user-data-dir={tmp_path / 'profile'}", f"--screenshot={shot}", "--window-size=1280,2000",
         report.resolve().as_uri()], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert_valid_png(shot)
    import matplotlib.image
    image = matplotlib.image.imread(shot)[..., :3]
    # images rendered: a good share of the page is neither white nor a single flat colour
    assert (image.std(axis=2) > 0.05).mean() > 0.01 or (image < 0.9).mean() > 0.05


# ---------------------------------------------------------------- over training steps

def train_and_save_checkpoints(run_dir: Path, save_at=(2, 4, 6), total_steps=8) -> None:
    """A tiny GPT-2 trained a few real AdamW steps on random tokens, saved as the training
    scripts do: checkpoint_<step>/ every two steps and final_checkpoint/ at the end."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=64, n_head=2, vocab_size=100, n_positions=32))
    optimiser = torch.optim.AdamW(model.parameters(), lr=3e-2)
    tokens = torch.randint(0, 100, (8, 16))
    for step in range(1, total_steps + 1):
        loss = model(input_ids=tokens, labels=tokens).loss
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
        if step in save_at:
            model.save_pretrained(run_dir / f"checkpoint_{step}")
    model.save_pretrained(run_dir / "final_checkpoint")


@pytest.fixture(scope="module")
def checkpoint_results(tmp_path_factory):
    """The documented pipeline: saved_models/run1/ checkpoints → `create_model_list.py
    from-checkpoints` → the real orchestrator (CPU, two real workers) → results/."""
    root = tmp_path_factory.mktemp("steps")
    train_and_save_checkpoints(root / "saved_models" / "run1")
    listing = subprocess.run([sys.executable, str(ROOT / "create_model_list.py"), "from-checkpoints",
                              "saved_models/run1/", "--output", "steps.csv"],
                             cwd=root, capture_output=True, text=True, env=env(), timeout=60)
    assert listing.returncode == 0, listing.stderr
    assert len(read_model_list(root / "steps.csv")) == 4
    experiment = subprocess.run(
        [sys.executable, str(ROOT / "run_esd_experiment.py"), "--model_list", "steps.csv",
         "--output_dir", "results", "--gpus", "none", "--cpu_workers", "2", "--poll_interval", "0.05",
         "--max_check", "1", "--save_eigs"], cwd=root, capture_output=True, text=True, env=env(),
        timeout=300)
    assert experiment.returncode == 0, experiment.stderr[-3000:] + experiment.stdout[-3000:]
    return root


def test_over_steps_with_model_list_writes_table_ordered_by_step_and_a_plot_per_metric(checkpoint_results):
    root = checkpoint_results
    result = analyze("--results_dir", "results", "--over_steps", "--model_list", "steps.csv",
                     "--metrics", "alpha", "stable_rank", "spectral_norm", cwd=root)
    assert result.returncode == 0, result.stderr
    # the orchestrator wrote the summary at the end of its run, through write_summary
    assert list(pd.read_csv(root / "results" / "summary.csv").columns) == CONTRACT_SUMMARY
    table = pd.read_csv(root / "results" / "over_steps.csv")
    assert list(table["step_label"].astype(str)) == ["2", "4", "6", "final"]
    assert table["step"].is_monotonic_increasing
    assert list(table["model_id"]) == [f"saved_models/run1/{n}" for n in
                                      ("checkpoint_2", "checkpoint_4", "checkpoint_6", "final_checkpoint")]
    for _, row in table.iterrows():
        layers = pd.read_csv(root / "results" / f"{safe_id(row['model_id'])}.csv")
        assert row["num_layers"] == len(layers)
        for metric in ("alpha", "stable_rank", "spectral_norm"):
            assert row[f"{metric}_mean"] == pytest.approx(np.nanmean(layers[metric]), rel=1e-9)
    # training moved the weights: the spectra differ between the first and last checkpoint
    assert table["spectral_norm_mean"].iloc[0] != pytest.approx(table["spectral_norm_mean"].iloc[-1])
    per_layer = pd.read_csv(root / "results" / "over_steps_layers.csv")
    assert per_layer.groupby("model_id").size().nunique() == 1
    for metric in ("alpha", "stable_rank", "spectral_norm"):
        assert_valid_png(root / "results" / "plots" / f"over_steps_{metric}.png")
    # the over-steps CSVs are not mistaken for a model's results
    assert ar.load_per_layer(root / "results")["model_id"].nunique() == 4


def test_over_steps_without_model_list_reads_steps_from_checkpoint_paths(checkpoint_results, tmp_path):
    out = tmp_path / "results"
    shutil.copytree(checkpoint_results / "results", out)
    path, plots = ar.write_over_steps(out, metrics=["alpha"])
    table = pd.read_csv(path)
    assert list(table["step_label"].astype(str)) == ["2", "4", "6", "final"]
    assert table["step"].iloc[-1] == 8          # final: one interval after the last step
    assert [p.name for p in plots] == ["over_steps_alpha.png"]


def test_report_of_a_checkpoint_series_has_an_over_steps_section(checkpoint_results, tmp_path):
    out = tmp_path / "results"
    shutil.copytree(checkpoint_results / "results", out)
    text = ar.write_report(out).read_text()
    assert "Over training steps" in text
    assert text.count("data:image/png;base64,") == len(png_files(out / "plots"))


def test_over_steps_without_any_checkpoint_says_how_to_give_steps(three_models):
    assert_clean_error(analyze("--results_dir", three_models, "--over_steps"),
                       "checkpoint_<step>", "--model_list")
    assert_clean_error(analyze("--results_dir", three_models, "--over_steps", "--metrics", "alpah"),
                       "alpah")


def test_step_is_parsed_from_checkpoint_paths():
    assert ar.step_of_model_id("saved_models/r/checkpoint_1500") == (1500.0, False)
    assert ar.step_of_model_id("/abs/run/checkpoint-20/") == (20.0, False)
    step, final = ar.step_of_model_id("saved_models/r/final_checkpoint")
    assert np.isnan(step) and final
    assert ar.step_of_model_id("EleutherAI/pythia-70m@step3000") == (3000.0, False)
    step, final = ar.step_of_model_id("org/model")
    assert np.isnan(step) and not final


def test_hub_revisions_named_step_n_form_one_run_ordered_by_step():
    per_layer = pd.DataFrame({
        "model_id": ["EleutherAI/pythia-70m@step3000", "EleutherAI/pythia-70m@step1000", "org/other"],
        "result_file": ["EleutherAI--pythia-70m@step3000", "EleutherAI--pythia-70m@step1000",
                        "org--other"]})
    table = ar.checkpoint_table(per_layer)
    assert list(table["step"]) == [1000, 3000]
    assert set(table["run"]) == {"EleutherAI/pythia-70m"}


# ---------------------------------------------------------------- what counts as a result

def test_filtered_summary_goes_to_its_own_file_naming_the_filter_and_summary_csv_stays_whole(tmp_path):
    write_layers(tmp_path, "org/a", [{"longname": "embed_tokens", "layer_type": "embedding",
                                      "alpha": 9.0}, {"alpha": 3.0}])
    result = analyze("--results_dir", tmp_path, "--exclude", "embed")
    assert result.returncode == 0, result.stderr
    whole = pd.read_csv(tmp_path / "summary.csv")
    assert list(whole.columns) == CONTRACT_SUMMARY
    assert whole["num_layers"].tolist() == [2] and whole["alpha_mean"].tolist() == [6.0]
    filtered = pd.read_csv(tmp_path / "summary_filtered.csv")
    assert filtered["num_layers"].tolist() == [1] and filtered["alpha_mean"].tolist() == [3.0]
    assert filtered["layer_filter"].tolist() == ["exclude=embed"]
    assert "exclude=embed" in result.stderr and "summary_filtered.csv" in result.stderr
    typed = analyze("--results_dir", tmp_path, "--layer_types", "embedding", "--output", tmp_path / "e.csv")
    assert pd.read_csv(tmp_path / "e.csv")["layer_filter"].tolist() == ["layer_types=embedding"]
    assert pd.read_csv(tmp_path / "summary.csv")["num_layers"].tolist() == [2]
    assert typed.returncode == 0


def test_copies_directories_links_and_fifos_named_csv_are_ignored_and_listed(tmp_path):
    original = write_layers(tmp_path, "org/a", [{}] * 10)
    text = original.read_text()
    (tmp_path / "org--a (copy).csv").write_text(text)                       # a full copy
    lines = text.splitlines(keepends=True)
    (tmp_path / "org--a.bak.csv").write_text("".join(lines[:6]))             # a truncated copy
    (tmp_path / "folder.csv").mkdir()
    (tmp_path / "dangling.csv").symlink_to(tmp_path / "nowhere")
    os.mkfifo(tmp_path / "pipe.csv")                                         # would block a reader
    result = analyze("--results_dir", tmp_path, "--show", "model_id", "num_layers")
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr
    assert pd.read_csv(tmp_path / "summary.csv")["num_layers"].tolist() == [10]
    for name in ("org--a (copy).csv", "org--a.bak.csv", "folder.csv", "dangling.csv", "pipe.csv"):
        assert f"ignored: {name}: " in result.stderr, result.stderr
    assert "whose result file is org--a.csv" in result.stderr
    scan = ar.scan_results(tmp_path)
    assert sorted(p.name for p, _ in scan.ignored) == sorted(
        ["dangling.csv", "folder.csv", "org--a (copy).csv", "org--a.bak.csv", "pipe.csv"])


def test_metric_error_lists_only_numeric_measurement_columns(three_models):
    result = analyze("--results_dir", three_models, "--plots", "--metric", "model_id")
    assert_clean_error(result, "--metric 'model_id'", "alpha_mean")
    listed = result.stderr.split("choose from", 1)[1]
    for column in ("is_adapter", "source_model", "model_id"):
        assert column not in listed


def test_final_checkpoint_step_is_read_from_trainer_state_or_marked_placed(tmp_path):
    run = tmp_path / "run1"
    (run / "final_checkpoint").mkdir(parents=True)
    per_layer = pd.DataFrame({"model_id": [str(run / "checkpoint_2"), str(run / "checkpoint_4"),
                                           str(run / "final_checkpoint")],
                              "result_file": ["c2", "c4", "final"]})
    placed = ar.checkpoint_table(per_layer)
    assert placed["step_source"].tolist() == ["id", "id", "placed"]
    (run / "final_checkpoint" / "trainer_state.json").write_text('{"global_step": 5}')
    read = ar.checkpoint_table(per_layer)
    assert read["step"].tolist() == [2, 4, 5]
    assert read["step_source"].tolist() == ["id", "id", "trainer_state.json"]


def test_report_says_how_it_was_made_and_shows_adapter_minus_base(tmp_path):
    import json
    write_layers(tmp_path, "org/base", [{"alpha": 3.0}, {"alpha": 4.0}])
    write_layers(tmp_path, "org/lora", [{"alpha": 3.0001, "is_adapter": True, "source_model": "org/base"},
                                        {"alpha": 4.0, "is_adapter": True, "source_model": "org/base"}])
    (tmp_path / "esd_settings.json").write_text(json.dumps({"fix_fingers": "xmin_mid", "bins": 100}))
    (tmp_path / "runs.csv").write_text("run_id,status,start_time,duration_s,backend,done,failed\n"
                                       "20261201-1,completed,2026-12-01T10:00:00,12.5,local,2,0\n")
    (tmp_path / "runs" / "20261201-1").mkdir(parents=True)
    (tmp_path / "runs" / "20261201-1" / "run.json").write_text(json.dumps(
        {"versions": {"torch": "2.13.0", "peft": None}, "command": ["run_esd_experiment.py", "--gpus", "none"]}))
    page = ar.write_report(tmp_path).read_text(encoding="utf-8")
    made = page.split("How these results were made", 1)[1].split("<section>", 1)[0]
    for fragment in ("fix_fingers", "xmin_mid", "20261201-1", "completed", "torch", "2.13.0",
                     "not installed", "--gpus none", "What the columns mean", "stable_rank"):
        assert fragment in made, fragment
    adapters = page.split("Adapter minus base", 1)[1].split("<section>", 1)[0]
    assert "org/lora" in adapters and "0.0001" in adapters and "5e-05" in adapters   # max, mean |Δalpha|
    assert (tmp_path / "plots" / "adapter_minus_base.png").exists()
    assert_valid_png(tmp_path / "plots" / "adapter_minus_base.png")
    assert page.count("data:image/png;base64,") == len(png_files(tmp_path / "plots"))


def test_comparison_labels_carry_the_digits_that_tell_close_models_apart():
    from esd.analysis.plots import _digits_to_tell_apart
    assert f"{3.0001:.{_digits_to_tell_apart(np.array([3.0001, 3.0]))}g}" == "3.0001"
    assert _digits_to_tell_apart(np.array([2.0, 5.0])) == 4


@pytest.mark.parametrize("low, high", [(0.5, 3.0), (1e-7, 30.0), (2.0, 2.6)])
def test_every_esd_panel_has_labelled_ticks_on_both_axes(low, high):
    plt = ar.plot_esds.__globals__["_pyplot"]()
    eigenvalues = np.geomspace(low, high, 300)
    layer = pd.Series({"longname": "x", "alpha": 2.5, "xmin": float(np.median(eigenvalues)),
                       "xmax": high, "fit_status": "ok"})
    fig, ax = plt.subplots()
    try:
        ar.plot_esd(eigenvalues, layer, ax)
        fig.canvas.draw()
        for axis, (lo, hi) in ((ax.xaxis, ax.get_xlim()), (ax.yaxis, ax.get_ylim())):
            lo, hi = sorted((lo, hi))
            shown = [t.get_text() for t in axis.get_majorticklabels()
                     if lo <= t.get_position()[axis is ax.yaxis] <= hi and t.get_text()]
            assert len(shown) >= 2, (low, high, axis.axis_name, shown)
    finally:
        plt.close(fig)


def test_a_local_model_whose_name_carries_a_hash_is_read_even_where_its_path_is_absent(tmp_path):
    from esd.model_list import safe_id as name_of
    model_id = "/elsewhere/run/a--b"            # its worker named it with local=True (a hash)
    path = write_layers(tmp_path, model_id, [{}, {}])
    path.rename(tmp_path / f"{name_of(model_id, local=True)}.csv")
    scan = ar.scan_results(tmp_path)
    assert scan.ignored == [] and scan.per_layer["model_id"].unique().tolist() == [model_id]
