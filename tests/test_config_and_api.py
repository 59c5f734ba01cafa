"""Reproducible runs (YAML config, runs/ records, the ESD-settings guard), the model list's
validation, and the notebook API agreeing with the command line."""
from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from esd import model_list
from tiny_models import save_gpt2, write_model_list

ROOT = Path(__file__).resolve().parents[1]
RUN = [sys.executable, str(ROOT / "run_esd_experiment.py")]
FAST = ["--gpus", "none", "--poll_interval", "0.05", "--max_check", "1"]


@pytest.fixture
def env(tmp_path):
    return dict(os.environ, HF_HOME=str(tmp_path / "hf_home"), HF_HUB_OFFLINE="1", PYTHONPATH=str(ROOT))


@pytest.fixture(scope="module")
def gpt2_dir(tmp_path_factory):
    return save_gpt2(tmp_path_factory.mktemp("m") / "gpt2", seed=5)


def run(args, env, cwd):
    return subprocess.run(RUN + args, env=env, cwd=cwd, capture_output=True, text=True, timeout=300)


def test_yaml_config_run_equals_flag_run_and_cli_overrides_it(gpt2_dir, tmp_path, env):
    models = write_model_list(tmp_path / "models.csv", [{"model_id": str(gpt2_dir)}])
    by_flags = run(["--model_list", str(models), "--output_dir", str(tmp_path / "a"),
                    "--fix_fingers", "DKS", "--bins", "50"] + FAST, env, tmp_path)
    assert by_flags.returncode == 0, by_flags.stdout + by_flags.stderr
    config = tmp_path / "experiment.yaml"
    config.write_text("model_list: models.csv\noutput_dir: b\nfix-fingers: DKS\nbins: 50\n"
                      "gpus: none\npoll_interval: 0.05\nmax_check: 1\nlimit: 5\n")
    by_yaml = run(["--config", str(config), "--limit", "none"], env, tmp_path)
    assert by_yaml.returncode == 0, by_yaml.stdout + by_yaml.stderr
    (a,) = [p for p in (tmp_path / "a").glob("*.csv") if p.name not in ("summary.csv", "runs.csv")]
    b = tmp_path / "b" / a.name
    assert a.read_bytes() == b.read_bytes()
    resolved = (tmp_path / "b" / "runs").glob("*/config.yaml")
    import yaml
    (saved,) = [yaml.safe_load(p.read_text()) for p in resolved]
    assert saved["fix_fingers"] == "DKS" and saved["bins"] == 50 and saved["limit"] is None


def test_unknown_config_key_is_refused_with_the_valid_ones(tmp_path, env):
    config = tmp_path / "bad.yaml"
    config.write_text("fix_finger: DKS\n")
    result = run(["--config", str(config)], env, tmp_path)
    assert result.returncode == 2
    assert "unknown setting 'fix_finger'" in result.stderr and "fix_fingers" in result.stderr
    assert "Traceback" not in result.stderr


def test_each_run_appends_one_row_to_runs_csv_and_writes_its_record(gpt2_dir, tmp_path, env):
    models = write_model_list(tmp_path / "models.csv", [{"model_id": str(gpt2_dir)}])
    out = tmp_path / "out"
    for _ in range(2):
        result = run(["--model_list", str(models), "--output_dir", str(out)] + FAST, env, tmp_path)
        assert result.returncode == 0, result.stdout + result.stderr
    with open(out / "runs.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == 2
    assert [r["done"] for r in rows] == ["1", "0"] and rows[1]["already_done"] == "1"
    records = [json.loads(p.read_text()) for p in sorted((out / "runs").glob("*/run.json"))]
    assert {r["run_id"] for r in records} == {r["run_id"] for r in rows}
    assert all(r["versions"]["torch"] and r["config"]["fix_fingers"] == "xmin_mid" for r in records)


def test_rerun_with_other_esd_settings_into_same_dir_is_refused_unless_overwrite(gpt2_dir, tmp_path, env):
    models = write_model_list(tmp_path / "models.csv", [{"model_id": str(gpt2_dir)}])
    out = tmp_path / "out"
    assert run(["--model_list", str(models), "--output_dir", str(out)] + FAST, env, tmp_path).returncode == 0
    refused = run(["--model_list", str(models), "--output_dir", str(out), "--fix_fingers", "DKS"] + FAST,
                  env, tmp_path)
    assert refused.returncode == 2
    assert "fix_fingers: 'xmin_mid' there, 'DKS' asked" in refused.stderr
    accepted = run(["--model_list", str(models), "--output_dir", str(out), "--fix_fingers", "DKS",
                    "--overwrite"] + FAST, env, tmp_path)
    assert accepted.returncode == 0, accepted.stdout + accepted.stderr
    assert json.loads((out / "esd_settings.json").read_text())["fix_fingers"] == "DKS"


def test_api_per_layer_frame_equals_the_csv_the_cli_writes(gpt2_dir, tmp_path, env, monkeypatch):
    models = write_model_list(tmp_path / "models.csv", [{"model_id": str(gpt2_dir)}])
    out = tmp_path / "out"
    assert run(["--model_list", str(models), "--output_dir", str(out)] + FAST, env, tmp_path).returncode == 0
    from esd_api import analyze_model, load_results
    frame = analyze_model(str(gpt2_dir))
    csv_frame = pd.read_csv(out / f"{model_list.safe_id(str(gpt2_dir))}.csv")
    round_tripped = pd.read_csv(__import__("io").StringIO(frame.to_csv(index=False)))
    pd.testing.assert_frame_equal(round_tripped, csv_frame)
    per_layer, summary = load_results(out)
    assert len(per_layer) == len(csv_frame) and summary["model_id"].tolist() == [str(gpt2_dir)]


def test_api_rejects_unknown_esd_option():
    from esd_api import analyze_model
    with pytest.raises(TypeError, match="fix_fingers"):
        analyze_model("anything", fix_finger="DKS")


def test_model_list_without_id_column_names_the_columns_found(tmp_path):
    path = tmp_path / "m.csv"
    path.write_text("name_of_model,foo\na,b\n")
    with pytest.raises(model_list.ModelListError, match=r"no id column: found \['name_of_model', 'foo'\]"):
        model_list.read_model_list(path)


def test_model_list_accepts_full_name_skips_empty_rows_and_keeps_duplicates_once(tmp_path):
    path = tmp_path / "m.csv"
    path.write_text("full_name,revision\norg/a,\n,\norg/a@v1,\norg/a,\norg/b,main\n")
    warnings = []
    entries = model_list.read_model_list(path, warn=warnings.append)
    assert [e.key for e in entries] == ["org/a", "org/a@v1", "org/b@main"]
    assert any("row 3: empty full_name" in w for w in warnings)
    assert any("row 5: duplicate of row 2" in w for w in warnings)


def test_model_list_revision_conflict_names_the_row(tmp_path):
    path = tmp_path / "m.csv"
    path.write_text("model_id,revision\norg/a@v1,v2\n")
    with pytest.raises(model_list.ModelListError, match="row 2"):
        model_list.read_model_list(path)


def test_safe_id_follows_the_contract_and_never_collides_on_unsafe_characters():
    assert model_list.safe_id("org/name") == "org--name"
    assert model_list.safe_id("org/name", "v1.0") == "org--name@v1.0"
    a, b = model_list.safe_id("x; touch pwned"), model_list.safe_id("x: touch pwned")
    assert a != b and all(c not in a for c in ";/ $`'\"")
    assert not model_list.safe_id("../../etc/passwd").startswith(".")


def test_out_of_memory_errors_become_retryable_failures_and_others_do_not():
    import torch
    from esd_worker import _oom_failure
    cuda_oom = _oom_failure(torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"))
    host_oom = _oom_failure(MemoryError())
    assert (cuda_oom.stage, cuda_oom.reason, cuda_oom.retryable) == ("analyze", "out_of_memory", True)
    assert host_oom.reason == "out_of_memory" and host_oom.retryable
    assert _oom_failure(ValueError("bad shape")) is None


def test_api_run_experiment_takes_flags_as_keywords_including_switching_one_off(gpt2_dir, tmp_path, monkeypatch):
    from esd_api import load_results, run_experiment
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    models = write_model_list(tmp_path / "models.csv", [{"model_id": str(gpt2_dir)}])
    out = tmp_path / "out"
    status = run_experiment(models, out, gpus="none", poll_interval=0.05, max_check=1,
                            filter_zeros=False, overwrite=False)
    assert status == 0
    assert json.loads((out / "esd_settings.json").read_text())["filter_zeros"] is False
    per_layer, summary = load_results(out)
    assert len(summary) == 1 and len(per_layer) > 0
    with pytest.raises(ValueError, match="invalid options"):
        run_experiment(models, out, no_such_flag=3)


def test_slurm_time_in_a_yaml_config_stays_the_text_slurm_expects(tmp_path):
    import run_esd_experiment
    (tmp_path / "models.csv").write_text("model_id\norg/a\n")
    config = tmp_path / "experiment.yaml"
    config.write_text("model_list: models.csv\nbackend: slurm\nslurm_time: 02:00:00\nbins: 50\n"
                      "evals_thresh: 1.0e-5\n")
    parsed = run_esd_experiment.parse_config(["--config", str(config)])
    assert parsed.slurm_time == "02:00:00"
    assert parsed.esd.bins == 50 and parsed.esd.evals_thresh == 1e-5


# ---------------------------------------------------------------- one model identity

def test_ids_whose_readable_names_coincide_get_distinct_result_files(tmp_path):
    (tmp_path / "x" / "a" / "b").mkdir(parents=True)
    (tmp_path / "x" / "a--b").mkdir(parents=True)
    (tmp_path / "org--name").mkdir()
    deep, dashed = model_list.make_entry(str(tmp_path / "x/a/b")), model_list.make_entry(str(tmp_path / "x/a--b"))
    assert deep.safe_id != dashed.safe_id
    hub, local = model_list.make_entry("org/name"), model_list.make_entry(str(tmp_path / "org--name"))
    assert hub.safe_id == "org--name" and local.safe_id != "org--name"
    assert model_list.safe_id("/org/name", local=True) != model_list.safe_id("org/name", local=False)
    # the readable form stays where it was already unambiguous
    assert deep.safe_id == str(tmp_path / "x/a/b").lstrip("/").replace("/", "--")


def test_both_spellings_of_a_local_directory_are_one_model(tmp_path, monkeypatch):
    (tmp_path / "models" / "m1").mkdir(parents=True)
    (tmp_path / "link").symlink_to(tmp_path / "models" / "m1")
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "list.csv"
    path.write_text(f"model_id\nmodels/m1\n{tmp_path}/models/m1\n./link\n")
    warnings = []
    entries = model_list.read_model_list(path, warn=warnings.append)
    assert [e.key for e in entries] == ["models/m1"]
    assert sum("duplicate of row 2" in w for w in warnings) == 2


@pytest.mark.parametrize("name", ["summary", "runs", "failed_models", "gpu_metrics", "esd_settings", "Summary",
                                  "summary_filtered", "over_steps_layers"])
def test_no_model_is_named_like_a_file_the_run_owns(tmp_path, name):
    (tmp_path / name).mkdir()
    entry = model_list.make_entry(str(tmp_path / name))
    assert model_list.make_entry(name).safe_id.split("~")[0] == name
    assert model_list.make_entry(name).safe_id != name      # hub-like or local: never the run's file
    assert entry.paths(tmp_path).result_csv.name not in ("summary.csv", "runs.csv")


def test_worker_argv_round_trips_the_entry(tmp_path):
    import esd_worker
    (tmp_path / "adapter").mkdir()
    entry = model_list.make_entry(str(tmp_path / "adapter"), None, "org/base", "lora")
    argv = esd_worker.worker_argv(entry, tmp_path / "out", esd_worker.ESDSettings())
    config = esd_worker.parse_config(argv)
    assert config.entry == entry and config.entry.local_dir == entry.local_dir
    hub = model_list.make_entry("-x/--help@v2")
    assert esd_worker.parse_config(esd_worker.worker_argv(hub, tmp_path, esd_worker.ESDSettings())).entry == hub
    paths = entry.paths(tmp_path / "out")
    assert {p.name.rsplit(".", 1)[0] for p in (paths.result_csv, paths.eigs, paths.lock, paths.worker_log)} \
        == {entry.safe_id}


def test_relative_paths_in_a_model_list_resolve_against_its_folder(tmp_path, monkeypatch):
    (tmp_path / "lists" / "m1").mkdir(parents=True)
    (tmp_path / "lists" / "models.csv").write_text("model_id\nm1\n")
    monkeypatch.chdir(tmp_path)       # not the list's folder
    (entry,) = model_list.read_model_list(tmp_path / "lists" / "models.csv")
    assert entry.local_dir == str(tmp_path / "lists" / "m1") and entry.is_local


def test_the_demo_list_finds_its_adapter_from_any_directory(tmp_path, monkeypatch):
    import run_esd_experiment
    monkeypatch.chdir(tmp_path)
    entries, warnings = run_esd_experiment.read_entries(run_esd_experiment.parse_config([]))
    adapter = [e for e in entries if "lora" in e.model_id][0]
    assert adapter.key == "examples/minilm-lora-demo" and adapter.safe_id == "examples--minilm-lora-demo"
    assert adapter.local_dir == str(ROOT / "esd" / "demo" / "examples" / "minilm-lora-demo") and not warnings


def test_an_id_read_as_a_hub_id_whose_folder_exists_hints_a_local_path(tmp_path, monkeypatch):
    (tmp_path / "lists").mkdir()
    (tmp_path / "saved").mkdir()
    (tmp_path / "lists" / "models.csv").write_text("model_id\nsaved/run-1\n")
    monkeypatch.chdir(tmp_path)
    warnings = []
    model_list.read_model_list(tmp_path / "lists" / "models.csv", warn=warnings.append)
    assert len(warnings) == 1 and "row 2" in warnings[0] and "a local path?" in warnings[0]
