"""The model list's own rows, beside the results: where each model came from and what the
list said of it (`base_model_relation`, and any extra column such as `downloads`, `likes`,
`created_at`, `library_name`, `pipeline_tag`, `gated` from `create_model_list.py from-hub`).

Owns `runs/<run_id>/model_list.csv`, the copy of its model list each run keeps (written by
the orchestrator through `keep_model_list`, so the analysis does not depend on where the
list was, or whether it still exists), and reading those copies back: every run's list,
oldest first, a later run's row replacing an earlier one of the same model. A list given to
the analysis (`--model_list`) is read last. Rows are matched to results by the model's
result file (its safe id), as the run named it.

Importing this module is cheap (no pandas until a list is read): the orchestrator imports it.
"""
from __future__ import annotations

from pathlib import Path

from esd.atomic_files import atomic_path

MODEL_LIST_COPY = "model_list.csv"          # under runs/<run_id>/
# columns the tool itself reads from a model list; every other column is carried along
OWN_LIST_COLUMNS = ("model_id", "full_name", "source_model", "base_model_relation", "revision", "step")


def keep_model_list(model_list, output_dir, run_id: str, entries) -> Path | None:
    """Copy the run's model list to `output_dir/runs/<run_id>/model_list.csv` (atomically),
    with a `result_file` column added: the safe id of the entry the run parsed from each row
    (`entries`, by their `row`; a row the run skipped gets none), so the copy is read
    correctly from anywhere and no row is parsed twice. None when there is no list file."""
    import csv
    from esd.model_list import ID_COLUMNS
    source = Path(model_list)
    if not source.is_file():
        return None
    with source.open(newline="", encoding="utf-8-sig") as handle:
        reader = csv.DictReader(handle)
        columns = [(c or "").strip() for c in reader.fieldnames or []]
        rows = [{(k or "").strip(): (v or "").strip() for k, v in raw.items() if k} for raw in reader]
    if not any(c in columns for c in ID_COLUMNS):
        return None
    result_files = {entry.row: entry.safe_id for entry in entries}
    for number, row in enumerate(rows, start=2):      # numbered as read_model_list numbers them
        row["result_file"] = result_files.get(number, "")
    target = Path(output_dir) / "runs" / run_id / MODEL_LIST_COPY
    target.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(target) as tmp, tmp.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=[c for c in columns if c != "result_file"]
                                + ["result_file"], extrasaction="ignore", restval="")
        writer.writeheader()
        writer.writerows(rows)
    return target


def listed_rows(results_dir, model_list=None):
    """One row per listed model (pandas DataFrame): `result_file` (its safe id) and the
    list's columns as the list wrote them (numbers as numbers). From every run's copy,
    oldest run first, then `model_list`; a later row of a model replaces an earlier one.
    Empty (no columns but result_file) when no list is known. An unreadable copy is
    skipped (it is a record, not an input); an unreadable `model_list` raises AnalysisError."""
    import pandas as pd
    frames = [frame for path in sorted(Path(results_dir).glob(f"runs/*/{MODEL_LIST_COPY}"))
              if (frame := _read_list(path, strict=False)) is not None]
    if model_list is not None:
        frames.append(_read_list(Path(model_list), strict=True))
    if not frames:
        return pd.DataFrame(columns=["result_file"])
    rows = pd.concat(frames, ignore_index=True)
    return rows.drop_duplicates("result_file", keep="last").reset_index(drop=True)


def extra_columns(rows) -> list[str]:
    """The list's columns the tool does not read itself (`downloads`, `likes`, …), in order."""
    return [c for c in rows.columns if c != "result_file" and c not in OWN_LIST_COLUMNS]


def with_list_columns(summary, per_layer, rows):
    """`summary` with the extra list columns appended after its own (one value per model;
    empty for a model no list names)."""
    extras = extra_columns(rows)
    if not extras or summary.empty:
        return summary
    files = per_layer.drop_duplicates("model_id").set_index("model_id")["result_file"]
    by_file = rows.set_index("result_file")[extras]
    values = by_file.reindex(summary["model_id"].map(files).to_numpy())
    values.index = summary.index
    return summary.join(values.rename(columns=lambda c: c if c not in summary else f"list_{c}"))


def relations(per_layer, rows) -> dict:
    """{model_id: base_model_relation} of the results' models, as their lists said ("" if
    none did)."""
    if "base_model_relation" not in rows or per_layer.empty:
        return {}
    by_file = rows.set_index("result_file")["base_model_relation"].fillna("").astype(str)
    files = per_layer.drop_duplicates("model_id").set_index("model_id")["result_file"]
    return {model_id: by_file.get(stem, "") for model_id, stem in files.items()}


def _read_list(path: Path, strict: bool):
    import pandas as pd
    from esd.analysis.results import AnalysisError
    from esd.model_list import ID_COLUMNS, make_entry
    try:
        frame = pd.read_csv(path, dtype=str, keep_default_na=False, encoding="utf-8-sig")
    except (OSError, ValueError, pd.errors.ParserError, UnicodeDecodeError) as error:
        if strict:
            raise AnalysisError(f"model list {path} cannot be read: {error}") from None
        return None
    frame.columns = [str(c).strip() for c in frame.columns]
    id_column = next((c for c in ID_COLUMNS if c in frame.columns), None)
    if id_column is None:
        if strict:
            raise AnalysisError(f"model list {path} has no id column ({list(ID_COLUMNS)}); "
                                f"found {list(frame.columns)}")
        return None
    frame = frame[frame[id_column].str.strip() != ""].copy()
    if "result_file" in frame:   # a run's copy: the names as the run derived them
        frame = frame[frame["result_file"] != ""]
        return _typed(frame).reset_index(drop=True)
    stems = []
    for text, revision in zip(frame[id_column].str.strip(), frame.get("revision", [""] * len(frame))):
        try:   # the result file's name, as the run derived it
            stems.append(make_entry(text, revision.strip() or None, base_dir=path.parent).safe_id)
        except Exception:  # noqa: BLE001 - a row the run refused has no results to join
            stems.append(None)
    frame["result_file"] = stems
    frame = frame[frame["result_file"].notna()]
    return _typed(frame).reset_index(drop=True)


def _typed(frame):
    """Extra columns holding only numbers (and blanks) as numbers, so they can be plotted."""
    import pandas as pd
    for column in extra_columns(frame):
        filled = frame[column] != ""
        numbers = pd.to_numeric(frame[column].where(filled), errors="coerce")
        if filled.any() and numbers[filled].notna().all():
            frame[column] = numbers
    return frame
