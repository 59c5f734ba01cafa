"""The notebook API: in-memory modules, ids or DataFrames as a model list, one-call summary,
and README's example run as written."""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from esd_api import analyze_model, get_summary, run_experiment
from tiny_models import build, save_gpt2

ROOT = Path(__file__).resolve().parents[1]


def test_an_in_memory_module_gives_the_rows_of_the_same_model_saved_and_loaded(tmp_path):
    saved = save_gpt2(tmp_path / "gpt2")
    from_disk = analyze_model(str(saved), device="cpu")
    in_memory = analyze_model(build("gpt2"), device="cpu", name="tiny")
    assert set(in_memory["model_id"]) == {"tiny"} and not in_memory["is_adapter"].any()
    assert list(in_memory.columns) == list(from_disk.columns)
    merged = from_disk.merge(in_memory, on="longname", suffixes=("_disk", "_memory"))
    assert len(merged) == len(from_disk)
    np.testing.assert_allclose(merged["alpha_disk"], merged["alpha_memory"], rtol=1e-6)


def test_get_summary_is_the_summary_row_of_one_model():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.Linear(128, 32))
    layers = analyze_model(model, device="cpu")
    summary = get_summary(layers)
    assert summary["model_id"] == "Sequential" and summary["num_layers"] == 2
    assert summary["alpha_mean"] == pytest.approx(layers["alpha"].mean())
    assert get_summary(model, device="cpu")["alpha_mean"] == pytest.approx(summary["alpha_mean"])
    with pytest.raises(ValueError, match="one model"):
        get_summary(pd.concat([layers, layers.assign(model_id="other")]))


def test_run_experiment_takes_a_list_of_ids_or_a_dataframe_and_resumes(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    a, b = save_gpt2(tmp_path / "m" / "a"), save_gpt2(tmp_path / "m" / "b", seed=1)
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "out"
    out.mkdir()
    (out / "folder.csv").mkdir()                 # junk named *.csv: never read, never blocking
    os.mkfifo(out / "pipe.csv")
    assert run_experiment(["m/a"], out, gpus="none") == 0     # a relative path, made absolute
    assert pd.read_csv(out / "summary.csv")["model_id"].tolist() == [str(a)]
    lists = list((out / "runs").glob("api_models_*.csv"))
    assert len(lists) == 1 and pd.read_csv(lists[0])["model_id"].tolist() == [str(a)]
    frame = pd.DataFrame({"model_id": [str(a), str(b)]})
    assert run_experiment(frame, out, gpus="none") == 0
    summary = pd.read_csv(out / "summary.csv")
    assert sorted(summary["model_id"]) == sorted([str(a), str(b)])
    with pytest.raises(ValueError, match="model_id or full_name"):
        run_experiment(pd.DataFrame({"name": ["x"]}), out)
    with pytest.raises(TypeError, match="CSV path, a list of ids or a DataFrame"):
        run_experiment(42, out)


def test_the_readme_api_example_runs_as_written(tmp_path):
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    section = readme.split("## In a notebook", 1)[1]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    env = dict(os.environ, HF_HOME=str(tmp_path / "hf"), HF_HUB_OFFLINE="1", PYTHONPATH=str(ROOT),
               TOKENIZERS_PARALLELISM="false", TMPDIR=str(tmp_path))   # the example's temp dir here
    env.pop("HF_HUB_CACHE", None)
    # the example's hub model: the packaged all-MiniLM-L6-v2 placed in this test's hub cache
    setup = subprocess.run([sys.executable, "-c", "import run_esd_experiment as r; r.prepare_demo()"],
                           env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert setup.returncode == 0, setup.stderr[-2000:]
    result = subprocess.run([sys.executable, "-c", code], env=env, cwd=tmp_path, capture_output=True,
                            text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    assert "fit_status" in result.stdout and "alpha_mean" in result.stdout
    assert result.stdout.splitlines()[-2].startswith("0 ")        # run_experiment's exit status
    [out] = tmp_path.glob("esd_api_*")                            # the example's output directory
    summary = pd.read_csv(out / "summary.csv")
    assert summary["model_id"].tolist() == ["sentence-transformers/all-MiniLM-L6-v2"]
