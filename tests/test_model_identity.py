"""A model's identity is parsed once, at the model list: its base is an entry of its own,
every file name is derived there, and the run records which result file holds which model
so the analysis looks names up (directories written before that record still read)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

import esd_worker
from esd.analysis.results import scan_results
from esd.model_list import (ModelEntry, make_entry, read_model_list, recorded_result_files,
                            record_result_file)
from tiny_models import save_gpt2, write_model_list

ROOT = Path(__file__).resolve().parents[1]


def test_the_base_is_parsed_once_into_an_entry_split_at_the_last_at_sign():
    entry = make_entry("org/tuned@v2", None, "org/base@main@weird")
    assert entry.base == ModelEntry("org/base@main", "weird")
    assert entry.source_model == "org/base@main@weird"          # the text as written, for records
    assert ModelEntry("org/tuned", source_model="org/base@r1").base == ModelEntry("org/base", "r1")
    assert make_entry("org/plain").base is None


def test_a_relative_base_is_found_beside_the_model_list_and_reaches_the_worker(tmp_path, monkeypatch):
    lists = tmp_path / "lists"
    (lists / "models" / "base").mkdir(parents=True)
    (lists / "models" / "tuned").mkdir()
    write_model_list(lists / "models.csv", [{"model_id": "models/tuned", "source_model": "models/base"}])
    monkeypatch.chdir(tmp_path)                                  # not the list's folder
    (entry,) = read_model_list(lists / "models.csv")
    assert entry.base.local_dir == os.path.realpath(lists / "models" / "base")
    config = esd_worker.parse_config(esd_worker.worker_argv(entry, tmp_path / "out", esd_worker.ESDSettings()))
    assert config.entry == entry and config.entry.base.local_dir == entry.base.local_dir


def test_the_index_of_result_files_names_each_model_once(tmp_path):
    a, b = make_entry("org/a@v1"), make_entry("org/b")
    for entry in (a, b, a):
        record_result_file(tmp_path, entry)
    assert recorded_result_files(tmp_path) == {"org--a@v1.csv": "org/a@v1", "org--b.csv": "org/b"}
    (tmp_path / "runs" / "models.json").write_text("{not json")
    assert recorded_result_files(tmp_path) == {}


def _result_csv(path: Path, model_id: str) -> None:
    pd.DataFrame({"model_id": [model_id], "longname": ["h.0.attn"], "alpha": [3.0]}).to_csv(path, index=False)


def test_the_analysis_looks_result_files_up_in_the_runs_record(tmp_path):
    # a name no derivation gives (e.g. a naming rule of a later version) is read because
    # the run recorded it; a file recorded for another model is a copy, though its name
    # would be derived from its content
    (tmp_path / "runs").mkdir()
    (tmp_path / "runs" / "models.json").write_text(json.dumps(
        {"models": {"renamed.csv": "org/a", "org--b.csv": "org/c"}}))
    _result_csv(tmp_path / "renamed.csv", "org/a")
    _result_csv(tmp_path / "org--b.csv", "org/b")
    _result_csv(tmp_path / "org--d.csv", "org/d")                # not recorded: derived, as before
    scan = scan_results(tmp_path)
    assert sorted(scan.per_layer["model_id"]) == ["org/a", "org/d"]
    (why,) = [why for path, why in scan.ignored if path.name == "org--b.csv"]
    assert "org/b" in why


def test_the_worker_records_its_result_file(tmp_path):
    model = save_gpt2(tmp_path / "gpt2")
    out = tmp_path / "out"
    result = subprocess.run([sys.executable, str(ROOT / "esd_worker.py"), "--model_id", str(model),
                             "--output_dir", str(out), "--device", "cpu"], capture_output=True, text=True,
                            env=dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=str(ROOT)), timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    entry = make_entry(str(model))
    assert recorded_result_files(out) == {entry.paths(out).result_csv.name: entry.key}
    assert list(scan_results(out).per_layer["model_id"].unique()) == [entry.key]
