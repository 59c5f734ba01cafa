"""Which files of a results directory are results, read into one per-layer table.

Owns: recognising the run's own per-model CSVs (a regular file `<safe_id>.csv` holding the
one model the run recorded for that name in `runs/models.json` — in directories written
before that record, one whose model id maps back onto that very name — so copies,
truncated backups and merged exports are ignored and listed, never merged into a model),
the per-layer table, layer selection,
and the one atomic CSV write of the analysis. Never opens anything but regular files (a
FIFO named `x.csv` would block a reader forever) and computes no statistic.
"""
from __future__ import annotations

import os
import re
import stat
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from esd import metrics_table
from esd.atomic_files import atomic_path
from esd.model_list import parse_model_id, recorded_result_files, safe_id
from esd.schema import LAYER_MODES, LAYER_TYPES, layer_mode_of  # (re-exported here)

PER_MODEL_KEY_COLUMNS = ("model_id", "longname", "alpha")   # what makes a CSV a per-model CSV


def counted(number: int, noun: str, plural: str | None = None) -> str:
    """`1 model`, `2 models`, `0 models` (`plural` where adding "s" is wrong)."""
    return f"{number} {noun if number == 1 else plural or noun + 's'}"


def summary_file_name(layer_mode: str = "weights", filtered: bool = False) -> str:
    """`summary.csv` (weights), `summary_delta_from_base.csv`, `summary_filtered.csv`, …"""
    return ("summary" + ("" if layer_mode == "weights" else f"_{layer_mode}")
            + ("_filtered" if filtered else "") + ".csv")


# files of the run and of the analysis itself: never results, never listed as ignored
OWN_OUTPUTS = (*(summary_file_name(mode, filtered) for mode in LAYER_MODES for filtered in (False, True)),
               "over_steps.csv", "over_steps_layers.csv", "runs.csv", "by_relation.csv",
               "by_relation_layers.csv")


class AnalysisError(ValueError):
    """The request cannot be answered; the message says why and what would work."""


@dataclass
class ResultScan:
    """The per-layer table of a results directory and the `*.csv` entries left out of it."""
    per_layer: pd.DataFrame
    ignored: list[tuple[Path, str]] = field(default_factory=list)   # (path, why)

    def ignored_lines(self) -> list[str]:
        return [f"ignored: {path.name}: {why}" for path, why in self.ignored]


def scan_results(results_dir) -> ResultScan:
    """The run's per-model CSVs of `results_dir`, concatenated in file-name order.

    A per-model CSV is a regular file `<name>.csv` with the columns model_id, longname and
    alpha, holding one model whose result file is that very name (as the worker writes it:
    `result_csv_path`). Anything else named `*.csv` (directories, dangling links, FIFOs,
    copies such as `org--a (1).csv`, merged exports, model lists) is left out and listed in
    `ignored` with the reason; the run's and the analysis' own files are skipped silently.
    Added columns: `layer_mode` (`weights`, or `delta_from_base` / `adapter_update` for the
    rows of --delta_from_base / --adapter_update, read from the longname's suffix),
    `layer_index` (position in its model among the rows of its mode, 0 = first =
    shallowest) and `result_file` (the CSV's stem, i.e. the model's safe id;
    `eigs/<result_file>.npz` holds its eigenvalues when the run used --save_eigs).
    """
    results_dir = Path(results_dir)
    if not results_dir.is_dir():
        raise AnalysisError(f"results directory {results_dir} does not exist")
    frames, ignored = [], []
    recorded = recorded_result_files(results_dir)
    for path in sorted(results_dir.glob("*.csv")):
        if path.name in OWN_OUTPUTS:
            continue
        frame, why = _read_per_model_csv(path, recorded)
        if why:
            ignored.append((path, why))
        elif len(frame):
            frames.append(frame)
    if not frames:
        empty = pd.DataFrame(columns=[*PER_MODEL_KEY_COLUMNS, "layer_mode", "layer_index", "result_file"])
        return ResultScan(empty, ignored)
    return ResultScan(pd.concat(frames, ignore_index=True), ignored)


def load_per_layer(results_dir) -> pd.DataFrame:
    """`scan_results(results_dir).per_layer`: the per-layer table of the run's own CSVs."""
    return scan_results(results_dir).per_layer


def _is_regular_file(path: Path) -> bool:
    try:
        return stat.S_ISREG(os.stat(path).st_mode)   # follows links; a dangling one raises
    except OSError:
        return False


def _own_result_names(model_id: str) -> set[str]:
    """For a results directory written before runs recorded their result files
    (`runs/models.json`): the file names the worker may have given the result of `model_id`
    (the CSV's model_id column, `org/name@rev` or a local path). Where the path is not here
    (another machine, another working directory) it is unknown whether the id was split at
    `@` or was a local directory, so every reading is allowed; each is still that id's own
    name."""
    model_id = str(model_id)
    readings = {parse_model_id(model_id), (model_id, None)}
    base, _, revision = model_id.rpartition("@")
    if base and revision:
        readings.add((base, revision))
    return {f"{safe_id(name, rev, local=local)}.csv" for name, rev in readings for local in (True, False)}


def _expected_result_name(model_id: str, path: Path, recorded: dict[str, str]) -> str | None:
    """None if `path` is the result file of `model_id`, else the file name that would be:
    looked up in the run's record (`runs/models.json`), derived for files it does not name."""
    if path.name in recorded:
        if recorded[path.name] == model_id:
            return None
        return next((name for name, key in sorted(recorded.items()) if key == model_id),
                    sorted(_own_result_names(model_id))[0])
    if path.name in _own_result_names(model_id):
        return None
    return sorted(_own_result_names(model_id))[0]


def _read_per_model_csv(path: Path, recorded: dict[str, str] | None = None
                        ) -> tuple[pd.DataFrame | None, str | None]:
    """(frame, None) for a result file of the run, else (None, why it is not one).
    `recorded`: the run's {result file name: model key} (`recorded_result_files`)."""
    if not _is_regular_file(path):
        kind = ("a directory" if path.is_dir() else "a dangling link" if path.is_symlink()
                and not path.exists() else "not a regular file")
        return None, kind
    try:
        header = pd.read_csv(path, nrows=0).columns
        if not set(PER_MODEL_KEY_COLUMNS) <= set(header):
            return None, "not a per-model result (no model_id, longname and alpha columns)"
        frame = pd.read_csv(path, dtype={"warning": str})  # text even where every cell is empty
    except pd.errors.EmptyDataError:
        return None, "empty"
    except (pd.errors.ParserError, UnicodeDecodeError, OSError) as error:
        return None, f"unreadable CSV ({str(error).splitlines()[0] if str(error) else type(error).__name__})"
    ids = frame["model_id"].dropna().astype(str).unique()
    if len(ids) != 1:
        return None, f"holds {len(ids)} model ids, not one model's result"
    expected = _expected_result_name(str(ids[0]), path, recorded or {})
    if expected is not None:
        return None, (f"a copy? it holds {ids[0]!r}, whose result file is {expected}; "
                      f"only the run's own result files are read")
    frame["layer_mode"] = layer_modes(frame)
    frame["layer_index"] = frame.groupby("layer_mode", sort=False).cumcount().to_numpy()
    frame["result_file"] = path.stem
    return frame, None


def layer_modes(per_layer: pd.DataFrame) -> pd.Series:
    """Each row's layer mode: its `layer_mode` column, else read from its longname."""
    if "layer_mode" in per_layer:
        return per_layer["layer_mode"]
    return per_layer["longname"].astype(str).map(layer_mode_of)


def check_layer_mode(layer_mode: str) -> str:
    if layer_mode not in LAYER_MODES:
        raise AnalysisError(f"unknown layer mode {layer_mode!r}; choose from {list(LAYER_MODES)}")
    return layer_mode


def select_layers(per_layer: pd.DataFrame, layer_types=None, exclude_patterns=None,
                  layer_mode: str = "weights") -> pd.DataFrame:
    """The rows of one layer mode (default the weights: the rows of --delta_from_base and
    --adapter_update are never mixed with them), of the chosen layer types, whose longname
    matches no exclude pattern."""
    check_layer_mode(layer_mode)
    selected = per_layer[layer_modes(per_layer) == layer_mode] if len(per_layer) else per_layer
    if layer_types:
        unknown = sorted(set(layer_types) - set(LAYER_TYPES))
        if unknown:
            raise AnalysisError(f"unknown layer type(s) {unknown}; choose from {list(LAYER_TYPES)}")
        selected = selected[selected["layer_type"].isin(list(layer_types))]
    for pattern in exclude_patterns or ():
        try:
            regex = re.compile(pattern)
        except re.error as error:
            raise AnalysisError(f"--exclude {pattern!r} is not a regular expression ({error}); "
                                f"e.g. use 'embed' or '.*embed.*', not '*embed*'") from None
        names = selected["longname"].astype(str)
        selected = selected[~names.map(lambda name: bool(regex.search(name)))]
    return selected



def require_results(per_layer: pd.DataFrame, results_dir) -> pd.DataFrame:
    if per_layer.empty:
        raise AnalysisError(f"no per-model result CSVs (with columns model_id, longname, alpha) "
                            f"in {results_dir}")
    return per_layer


def read_esd_settings(results_dir) -> dict | None:
    """The ESD settings the directory's results were computed with (`esd_settings.json`,
    written by the run), or None when there is none or it cannot be read."""
    import json
    path = Path(results_dir) / "esd_settings.json"
    try:
        data = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None
    except (OSError, ValueError, RecursionError):
        return None
    if not isinstance(data, dict):
        return None
    values = data.get("settings", data)
    return values if isinstance(values, dict) else None


def well_trained_range(results_dir) -> tuple[float, float] | None:
    """WeightWatcher's usual range of well-trained layer alphas, (2, 6), where the results'
    fit puts alphas on WeightWatcher's scale (every --fix_fingers but xmin_mid, as for the
    `warning` column); None for xmin_mid (2–3.5 even on random matrices) and for results
    whose settings are unknown (xmin_mid is the default)."""
    settings = read_esd_settings(results_dir) or {}
    fix_fingers = str(settings.get("fix_fingers", "xmin_mid"))
    if fix_fingers == "xmin_mid":
        return None
    return metrics_table.WELL_TRAINED_ALPHA


def write_csv_atomic(frame: pd.DataFrame, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        frame.to_csv(tmp, index=False)
    return path
