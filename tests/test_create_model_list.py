"""create_model_list.py through its command line: every subcommand writes a list that
model_list.read_model_list reads back; bad input is one clear message, never a traceback."""
from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import pytest

from esd.model_list import ModelEntry, read_model_list, write_model_list

ROOT = Path(__file__).resolve().parents[1]
CREATE = [sys.executable, str(ROOT / "create_model_list.py")]


def run(args, cwd):
    return subprocess.run(CREATE + [str(a) for a in args], cwd=cwd, capture_output=True,
                          text=True, timeout=60)


def rows_of(path: Path) -> list[dict]:
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def assert_clean_error(result, *fragments):
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    for fragment in fragments:
        assert fragment in result.stderr, result.stderr


def test_create_writes_ids_revisions_and_adapter_columns_that_read_model_list_reads(tmp_path):
    out = tmp_path / "models.csv"
    result = run(["create", "--models", "gpt2", "org/name@v2", "org/lora", "--source_model", "gpt2",
                  "--base-model-relation", "adapter", "--output", out], tmp_path)
    assert result.returncode == 0, result.stderr
    entries = read_model_list(out)
    assert [(e.model_id, e.revision) for e in entries] == [
        ("gpt2", None), ("org/name", "v2"), ("org/lora", None)]
    assert all(e.source_model == "gpt2" and e.relation_says_adapter for e in entries)


def test_from_text_skips_comments_and_blank_lines_and_keeps_order(tmp_path):
    ids = tmp_path / "ids.txt"
    ids.write_text("# my models\ngpt2\n\norg/b@main   # pinned\n  org/a  \n")
    out = tmp_path / "models.csv"
    assert run(["from-text", ids, "--output", out], tmp_path).returncode == 0
    assert [e.key for e in read_model_list(out)] == ["gpt2", "org/b@main", "org/a"]


def test_from_text_line_with_columns_is_refused_naming_the_line(tmp_path):
    ids = tmp_path / "ids.txt"
    ids.write_text("gpt2\norg/a,org/base\n")
    assert_clean_error(run(["from_text", ids], tmp_path), "ids.txt, line 2", "from-csv")


@pytest.mark.parametrize("id_column", ["model_id", "full_name", "model_name", "model", "Name"])
def test_from_csv_detects_the_id_column_and_keeps_source_relation_revision(tmp_path, id_column):
    source = tmp_path / "export.csv"
    source.write_text(f"downloads,{id_column},source_model,base_model_relation,revision\n"
                      f"10,org/lora,org/base,adapter,\n"
                      f"20,org/base,,base,abc123\n")
    out = tmp_path / "models.csv"
    result = run(["from-csv", source, "--output", out], tmp_path)
    assert result.returncode == 0, result.stderr
    assert read_model_list(out) == [ModelEntry("org/lora", None, "org/base", "adapter"),
                                    ModelEntry("org/base", "abc123", None, "base")]


def test_from_csv_id_column_option_overrides_detection(tmp_path):
    source = tmp_path / "export.csv"
    source.write_text("name,repo\nLlama two,meta-llama/Llama-2-7b-hf\n")
    out = tmp_path / "models.csv"
    assert run(["from-csv", source, "--id-column", "repo", "--output", out], tmp_path).returncode == 0
    assert [e.model_id for e in read_model_list(out)] == ["meta-llama/Llama-2-7b-hf"]


def test_from_csv_without_id_column_names_the_file_and_the_columns_found(tmp_path):
    source = tmp_path / "bad.csv"
    source.write_text("repo,downloads\norg/a,3\n")
    assert_clean_error(run(["from-csv", source], tmp_path), "bad.csv", "no id column",
                       "'repo'", "model_id")


def test_from_csv_revision_conflict_names_the_row(tmp_path):
    source = tmp_path / "bad.csv"
    source.write_text("model_id,revision\norg/a,\norg/b@v1,v2\n")
    assert_clean_error(run(["from-csv", source], tmp_path), "bad.csv, row 3", "'v1'", "'v2'")


def test_from_csv_empty_id_rows_are_skipped_with_a_warning_naming_the_row(tmp_path):
    source = tmp_path / "list.csv"
    source.write_text("model_id\norg/a\n\"\"\norg/b\n")
    out = tmp_path / "models.csv"
    result = run(["from-csv", source, "--output", out], tmp_path)
    assert result.returncode == 0
    assert "row 3" in result.stderr
    assert [e.model_id for e in read_model_list(out)] == ["org/a", "org/b"]


def test_missing_input_file_is_a_clear_error(tmp_path):
    assert_clean_error(run(["from-text", tmp_path / "nope.txt"], tmp_path), "nope.txt", "no such file")
    assert_clean_error(run(["merge", tmp_path / "nope.csv"], tmp_path), "nope.csv")


def test_merge_keeps_repeats_unless_deduplicate_which_keeps_the_first_and_fills_blanks(tmp_path):
    a = tmp_path / "a.csv"
    a.write_text("model_id,source_model\norg/x,\norg/y,\n")
    b = tmp_path / "b.txt"
    b.write_text("org/z\norg/x\n")
    c = tmp_path / "c.csv"
    c.write_text("full_name,source_model\norg/y,org/base\n")
    kept = tmp_path / "kept.csv"
    result = run(["merge", a, b, c, "--output", kept], tmp_path)
    assert result.returncode == 0 and "--deduplicate" in result.stderr
    assert [r["model_id"] for r in rows_of(kept)] == ["org/x", "org/y", "org/z", "org/x", "org/y"]
    merged = tmp_path / "merged.csv"
    assert run(["merge", a, b, c, "--deduplicate", "--output", merged], tmp_path).returncode == 0
    assert read_model_list(merged) == [ModelEntry("org/x"), ModelEntry("org/y", source_model="org/base"),
                                       ModelEntry("org/z")]


def test_template_is_a_model_list_with_base_adapter_revision_and_checkpoint_examples(tmp_path):
    out = tmp_path / "template.csv"
    assert run(["template", "--output", out], tmp_path).returncode == 0
    entries = read_model_list(out, warn=pytest.fail)
    assert any(e.relation_says_adapter and e.source_model for e in entries)
    assert any(e.revision for e in entries)
    assert any("checkpoint_" in e.model_id for e in entries)


def test_without_output_the_list_goes_to_stdout(tmp_path):
    result = run(["create", "--models", "gpt2", "org/a"], tmp_path)
    assert result.returncode == 0
    assert result.stdout.splitlines() == ["model_id,source_model,base_model_relation,revision",
                                          "gpt2,,,", "org/a,,,"]


def _checkpoint(path: Path, step_in_state: int | None = None) -> None:
    path.mkdir(parents=True)
    (path / "config.json").write_text("{}")
    (path / "model.safetensors").write_bytes(b"")
    if step_in_state is not None:
        (path / "trainer_state.json").write_text(json.dumps({"global_step": step_in_state}))


def test_from_checkpoints_orders_by_step_final_last_and_records_steps(tmp_path):
    run_dir = tmp_path / "saved_models" / "run1"
    for name in ("checkpoint_10", "checkpoint-2", "final_checkpoint", "checkpoint_100"):
        _checkpoint(run_dir / name)
    (run_dir / "checkpoint_7").mkdir()          # still being written: no files yet
    (run_dir / "config.yaml").write_text("x: 1")
    out = tmp_path / "steps.csv"
    result = run(["from-checkpoints", "saved_models/run1/", "--output", out], tmp_path)
    assert result.returncode == 0, result.stderr
    assert "checkpoint_7" in result.stderr      # skipped with a warning
    rows = rows_of(out)
    assert [(r["model_id"], r["step"]) for r in rows] == [
        ("saved_models/run1/checkpoint-2", "2"), ("saved_models/run1/checkpoint_10", "10"),
        ("saved_models/run1/checkpoint_100", "100"), ("saved_models/run1/final_checkpoint", "")]
    assert [e.model_id for e in read_model_list(out)] == [r["model_id"] for r in rows]


def test_from_checkpoints_of_a_directory_of_runs_lists_each_run_and_reads_final_step(tmp_path):
    for run_id in ("runA", "runB"):
        _checkpoint(tmp_path / "saved_models" / run_id / "checkpoint_5")
        _checkpoint(tmp_path / "saved_models" / run_id / "final_checkpoint", step_in_state=9)
    out = tmp_path / "steps.csv"
    assert run(["from_checkpoints", "saved_models", "--absolute", "--output", out], tmp_path).returncode == 0
    rows = rows_of(out)
    assert [(Path(r["model_id"]).parent.name, Path(r["model_id"]).name, r["step"]) for r in rows] == [
        ("runA", "checkpoint_5", "5"), ("runA", "final_checkpoint", "9"),
        ("runB", "checkpoint_5", "5"), ("runB", "final_checkpoint", "9")]
    assert all(Path(r["model_id"]).is_absolute() for r in rows)


def test_from_checkpoints_without_checkpoints_is_a_clear_error(tmp_path):
    (tmp_path / "empty_run").mkdir()
    assert_clean_error(run(["from-checkpoints", "empty_run"], tmp_path), "empty_run",
                       "checkpoint_<step>")


def test_write_model_list_extra_columns_round_trip_and_are_ignored_by_read_model_list(tmp_path):
    path = write_model_list([ModelEntry("a/b"), ModelEntry("c", revision="r")], tmp_path / "l.csv",
                            extra_columns={"step": [3, None]})
    assert [r["step"] for r in rows_of(path)] == ["3", ""]
    assert read_model_list(path) == [ModelEntry("a/b"), ModelEntry("c", revision="r")]


def test_deduplicate_says_how_many_rows_it_dropped_and_repeats_are_one_warning(tmp_path):
    a = tmp_path / "a.csv"
    a.write_text("model_id\norg/x\norg/y\n")
    b = tmp_path / "b.txt"
    b.write_text("org/x\norg/y\norg/x\norg/z\n")
    dropped = run(["merge", a, b, "--deduplicate", "--output", tmp_path / "m.csv"], tmp_path)
    assert dropped.returncode == 0
    assert "dropped 3 duplicate row(s) (first: org/x); 3 models left" in dropped.stderr
    kept = run(["merge", a, b, "--output", tmp_path / "k.csv"], tmp_path)
    warnings = [line for line in kept.stderr.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1 and "3 repeated row(s), first: org/x" in warnings[0]
