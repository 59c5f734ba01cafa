"""The model list and a model's identity: reading, validating and writing the CSV users
hand to the experiment, and the one place a model id becomes names and paths.

Owns: `ModelEntry` (id, revision, where a local directory really is, its base parsed into an
entry of its own, the safe id and every path derived from it: result CSV, eigenvalues, lock,
worker log), the record of which result file holds which model (`runs/models.json`:
`record_result_file`, `recorded_result_files`), the worker's model flags
(`add_entry_flags`, `entry_argv` / `entry_from_args`: the one round trip through argv),
`split_revision` (the one revision check), `safe_id` (injective: two models never share a
file, and no model is named like a file the run owns), `read_model_list`, `write_model_list`.
Knows nothing about weights, GPUs or metrics; imports no torch, so the orchestrator and
`create_model_list.py` start fast.
"""
from __future__ import annotations

import argparse
import csv
import hashlib
import io
import os
import re
import unicodedata
from dataclasses import dataclass, field
from pathlib import Path

from esd.atomic_files import atomic_path, write_text_atomic

ID_COLUMNS = ("model_id", "full_name")
OPTIONAL_COLUMNS = ("source_model", "base_model_relation", "revision")
MODEL_LIST_COLUMNS = ("model_id", "source_model", "base_model_relation", "revision")
ADAPTER_RELATIONS = frozenset({"adapter", "lora", "peft", "qlora"})

_SAFE_CHARS = re.compile(r"[^A-Za-z0-9._@+=-]")
_MAX_NAME_CHARS = 180
# Names of the files the run and the analysis write beside the result CSVs (`summary.csv`,
# `summary_filtered.csv`, `over_steps_layers.csv`, ...): a model whose readable name is one
# of these, or starts with a reserved prefix, gets a hash instead.
RESERVED_STEMS = frozenset({"runs", "failed_models", "failures", "gpu_metrics",
                            "esd_settings", "report", "models", "model_list"})
RESERVED_PREFIXES = ("summary", "over_steps", "by_relation")


class ModelListError(ValueError):
    """The model list cannot be used; the message names the file and the row."""


class RevisionConflict(ValueError):
    """An id's `@rev` and a separate revision disagree."""


@dataclass(frozen=True)
class ModelPaths:
    """Every file of one model under an output directory."""
    result_csv: Path    # `<safe_id>.csv`: exists <=> the model is done (written atomically)
    eigs: Path          # `eigs/<safe_id>.npz` (--save_eigs)
    lock: Path          # `.locks/<safe_id>.lock`: held by the worker analysing it
    worker_log: Path    # `logs/workers/<safe_id>.log`


@dataclass(frozen=True)
class ModelEntry:
    """One model as the model list names it, parsed once: the id, its revision, where a local
    directory really is, and its base (`source_model`) parsed the same way into an entry of
    its own (`base`). Every name and path of the model derives from here (`key`, `safe_id`,
    `paths`)."""
    model_id: str                     # hub id `org/name` or a local directory, without `@rev`
    revision: str | None = None
    source_model: str | None = None   # the base as written (a fine-tune's or adapter's; files win)
    base_model_relation: str | None = None
    row: int | None = field(default=None, compare=False)  # line number in the CSV (header = 1)
    local_dir: str | None = field(default=None, compare=False)  # the real directory, if local
    base: "ModelEntry | None" = field(default=None, compare=False, repr=False)  # source_model parsed

    def __post_init__(self):
        if self.base is None and self.source_model:  # one parse: split_revision, at the last `@`
            object.__setattr__(self, "base", ModelEntry(*parse_model_id(self.source_model)))

    @property
    def key(self) -> str:
        """The id as users write it, `org/name@rev`; the key of failure records."""
        return f"{self.model_id}@{self.revision}" if self.revision else self.model_id

    @property
    def relation_says_adapter(self) -> bool:
        return relation_says_adapter(self.base_model_relation)

    @property
    def is_local(self) -> bool:
        return self.local_dir is not None or _looks_like_path(self.model_id)

    @property
    def identity(self) -> tuple:
        """Same identity, same model: a local directory by its real path (relative or
        absolute spelling, symlinks), a hub id by id and revision."""
        if self.local_dir is not None:
            return ("local", self.local_dir)
        if _looks_like_path(self.model_id):  # not here (yet): by its normalised spelling
            return ("local", os.path.abspath(os.path.expanduser(self.model_id)))
        return ("hub", self.model_id, self.revision)

    @property
    def safe_id(self) -> str:
        return safe_id(self.model_id, self.revision, local=self.is_local)

    def paths(self, output_dir: str | os.PathLike) -> ModelPaths:
        out, name = Path(output_dir), self.safe_id
        return ModelPaths(out / f"{name}.csv", out / "eigs" / f"{name}.npz",
                          out / ".locks" / f"{name}.lock", out / "logs" / "workers" / f"{name}.log")


def relation_says_adapter(relation: str | None) -> bool:
    """The model list's `base_model_relation` hints an adapter (`adapter`, `lora`, `peft`)."""
    return (relation or "").strip().lower() in ADAPTER_RELATIONS


def _looks_like_path(text: str) -> bool:
    """Spelled as a path, not a hub id (`org/name`): absolute, `./`, `~`, or deeper."""
    return text.startswith(("/", "./", "../", "~")) or text.count("/") > 1 or os.path.isdir(text)


def parse_model_id(text: str) -> tuple[str, str | None]:
    """Split `org/name@rev` into (`org/name`, `rev`). A local path that exists is never split."""
    text = text.strip()
    if "@" in text and not os.path.exists(text):
        model_id, _, revision = text.rpartition("@")
        if model_id and revision:
            return model_id, revision
    return text, None


def split_revision(text: str, revision: str | None = None) -> tuple[str, str | None]:
    """(id, revision) from an id that may carry `@rev` and a separate revision; the one
    check that the two agree (RevisionConflict names both)."""
    model_id, id_revision = parse_model_id(text)
    revision = (revision or "").strip() or None
    if id_revision and revision and id_revision != revision:
        raise RevisionConflict(f"id {text!r} names revision {id_revision!r} but the revision "
                               f"column/argument says {revision!r}")
    return model_id, id_revision or revision


def make_entry(text: str, revision: str | None = None, source_model: str | None = None,
               base_model_relation: str | None = None, *, row: int | None = None,
               base_dir: str | os.PathLike | None = None) -> ModelEntry:
    """An entry from what a user wrote. A relative local path is looked up in `base_dir`
    (the model list's folder) first, then in the current directory."""
    model_id, revision = split_revision(text, revision)
    local_dir = None
    candidates = [Path(base_dir) / model_id] if base_dir is not None and not os.path.isabs(model_id) else []
    candidates.append(Path(model_id).expanduser())
    for candidate in candidates:
        try:
            if candidate.is_dir():
                local_dir = os.path.realpath(candidate)
                break
        except OSError:  # e.g. a name too long for the file system: not a local directory
            break
    base = make_entry(source_model, base_dir=base_dir) if source_model else None
    return ModelEntry(model_id, revision, source_model, base_model_relation, row, local_dir, base)


def safe_id(model_id: str, revision: str | None = None, *, local: bool | None = None) -> str:
    """File-name-safe, injective form of an id: `org/name` → `org--name`, a revision adds
    `@rev`; a local path's components are joined with `--` the same way.

    Where that readable form could stand for two ids, an 8-hex hash of the id is appended:
    characters outside `[A-Za-z0-9._@+=-]`, a component holding `--` or `@` or
    starting/ending with `-` (`/x/a--b` vs `/x/a/b`), a local directory named
    like a hub id's file (`org--name`, or absolute `/org/name`), a name over 180 characters,
    and names of the run's own files (`summary*`, `over_steps*`, `runs`, ...). Plain hub ids never collide
    (the hub forbids `--` in ids), so they keep the readable form.
    """
    original = f"{model_id}@{revision}" if revision else model_id
    local = _looks_like_path(model_id) if local is None else local
    path = os.path.normpath(model_id.strip()).lstrip("/")
    parts = [part for part in path.split("/") if part not in ("", ".")]
    name = "--".join(parts)
    if revision:
        name = f"{name}@{revision}"
    cleaned = _SAFE_CHARS.sub("_", name).lstrip(".") or "_"
    ambiguous = (cleaned != name or len(cleaned) > _MAX_NAME_CHARS
                 or any("--" in p or p.startswith("-") or p.endswith("-") for p in parts)
                 or cleaned.split("@")[0].lower() in RESERVED_STEMS
                 or cleaned.lower().startswith(RESERVED_PREFIXES)
                 or (local and ("@" in path or len(parts) == 1 and "--" in name
                                or model_id.strip().startswith("/") and len(parts) == 2)))
    if ambiguous:
        digest = hashlib.sha1(original.encode("utf-8")).hexdigest()[:8]
        cleaned = f"{cleaned[:_MAX_NAME_CHARS]}~{digest}"
    return cleaned


def result_csv_path(output_dir: str | os.PathLike, entry: ModelEntry) -> Path:
    """Where the per-model CSV of `entry` lives; its existence means the model is done."""
    return entry.paths(output_dir).result_csv


# ------------------------------------------------------------ which result file is which model

RESULT_INDEX = Path("runs") / "models.json"   # {"models": {"<safe_id>.csv": "org/name@rev", …}}


def record_result_file(output_dir: str | os.PathLike, entry: ModelEntry) -> Path:
    """Note in `<output_dir>/runs/models.json` that `entry`'s result file holds `entry.key`
    (the CSV's model_id), so the analysis looks the name up instead of re-deriving it."""
    import json

    from filelock import FileLock
    index = Path(output_dir) / RESULT_INDEX
    index.parent.mkdir(parents=True, exist_ok=True)
    name = entry.paths(output_dir).result_csv.name
    with FileLock(str(index.with_name(".models.json.lock"))):
        models = recorded_result_files(output_dir)
        if models.get(name) != entry.key:
            models[name] = entry.key
            write_text_atomic(index, json.dumps({"models": models}, indent=1, sort_keys=True) + "\n")
    return index


def recorded_result_files(output_dir: str | os.PathLike) -> dict[str, str]:
    """{result file name: model key} as the runs recorded them (`record_result_file`); empty
    for a directory written before runs recorded it, or an unreadable index."""
    import json
    try:
        data = json.loads((Path(output_dir) / RESULT_INDEX).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError):
        return {}
    models = data.get("models") if isinstance(data, dict) else None
    if not isinstance(models, dict):
        return {}
    return {str(name): str(key) for name, key in models.items() if isinstance(key, str)}


# ------------------------------------------------------------------ the worker's model flags

def add_entry_flags(parser) -> None:
    """The worker's flags naming a model (the inverse of `entry_argv`)."""
    from esd.cli_flags import add_flag
    add_flag(parser, "model_id", help="hub id (org/name[@rev]) or local directory")
    add_flag(parser, "source_model", help="base model of an adapter")
    add_flag(parser, "base_model_relation", help="hint from the model list (base, finetune, adapter, …)")
    add_flag(parser, "revision", help="hub revision (branch, tag or commit)")
    add_flag(parser, "local_dir", help=argparse.SUPPRESS)  # where the orchestrator found it
    add_flag(parser, "base_local_dir", help=argparse.SUPPRESS)  # where it found the base


ENTRY_FLAGS = ("model_id", "source_model", "base_model_relation", "revision", "local_dir",
               "base_local_dir")


def entry_argv(entry: ModelEntry) -> list[str]:
    """An entry as worker arguments. Values are attached (`--model_id=ID`), so an id such as
    `-x` or `--help` stays a value instead of being read as a flag."""
    values = {"model_id": entry.model_id, "revision": entry.revision, "source_model": entry.source_model,
              "base_model_relation": entry.base_model_relation, "local_dir": entry.local_dir,
              "base_local_dir": entry.base.local_dir if entry.base is not None else None}
    return [f"--{name}={value}" for name, value in values.items() if value]


def entry_from_args(args) -> ModelEntry:
    """The entry `entry_argv` wrote (RevisionConflict if `--model_id` and `--revision` disagree)."""
    model_id, revision = split_revision(args.model_id, args.revision)
    base = None
    if args.source_model:
        base = ModelEntry(*parse_model_id(args.source_model),
                          local_dir=getattr(args, "base_local_dir", None))
    return ModelEntry(model_id, revision, args.source_model, args.base_model_relation,
                      local_dir=getattr(args, "local_dir", None), base=base)


def unsafe_characters(text: str) -> str | None:
    """The control characters of `text` (newline, tab, ESC of an ANSI sequence, a
    direction override, …) escaped for a message, or None if it has none. Such an id would
    split a line of failed_models.txt or drive the terminal it is printed on."""
    bad = [c for c in text if unicodedata.category(c) in ("Cc", "Cf", "Zl", "Zp")]
    return "".join(dict.fromkeys(c.encode("unicode_escape").decode("ascii") for c in bad)) or None


def _clean(value: object) -> str | None:
    text = "" if value is None else str(value).strip()
    return text or None


def read_model_list(path: str | os.PathLike, warn=print, base_dir: str | os.PathLike | None = None
                    ) -> list[ModelEntry]:
    """Read and validate a model list; duplicates are kept once (with a warning naming rows).

    Raises ModelListError for a missing file, a directory, a spreadsheet, a file that is not
    UTF-8 or not CSV, a file with no id column, or a row whose `@rev` disagrees with its
    `revision` column. Ids that share a result file (`dir` and `dir/`) are duplicates. Rows with an empty id are skipped with a
    warning naming the row, so one bad row does not stop an experiment over hundreds.
    Relative local paths are read against `base_dir`, by default the list's own folder
    (then the current directory).
    """
    path = Path(path)
    text = _model_list_text(path)
    reader = csv.DictReader(io.StringIO(text, newline=""))
    try:
        return _entries(reader, path, warn, path.parent if base_dir is None else Path(base_dir))
    except csv.Error as exc:
        row = reader.line_num + 1  # the row being read when it failed
        raise ModelListError(f"model list {path}, row {row}: not readable as CSV: {exc}") from None


_SPREADSHEET_MAGIC = (b"PK\x03\x04", b"\xd0\xcf\x11\xe0")  # .xlsx (zip), .xls (OLE2)


def _model_list_text(path: Path) -> str:
    """The file's text (UTF-8, a BOM allowed), or a ModelListError saying what the file is instead."""
    if path.is_dir():
        raise ModelListError(f"model list {path} is a directory, not a CSV file")
    if not path.is_file():
        raise ModelListError(f"model list {path} does not exist")
    data = path.read_bytes()
    if data.startswith(_SPREADSHEET_MAGIC):
        raise ModelListError(f"model list {path} is a spreadsheet (Excel), not a CSV: "
                             f"save it as 'CSV UTF-8' and pass that file")
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = data[:exc.start].count(b"\n") + 1
        raise ModelListError(f"model list {path}, row {line}: not UTF-8 text (byte {data[exc.start]:#04x}); "
                             f"save the file as UTF-8") from None
    if "\x00" in text:  # no process argument can carry it; UTF-16 text looks like this
        line = text[:text.index("\x00")].count("\n") + 1
        raise ModelListError(f"model list {path}, row {line}: contains a NUL byte (a UTF-16 or binary file?); "
                             f"save the file as UTF-8 text")
    return text


def _entries(reader: csv.DictReader, path: Path, warn, base_dir: Path) -> list[ModelEntry]:
    """The rows of an opened model list, checked and de-duplicated (see `read_model_list`)."""
    columns = [c.strip() for c in (reader.fieldnames or [])]
    id_column = next((c for c in ID_COLUMNS if c in columns), None)
    if id_column is None:
        raise ModelListError(
            f"model list {path} has no id column: found {columns or 'no header'}, "
            f"expected one of {list(ID_COLUMNS)} (optional: {list(OPTIONAL_COLUMNS)})"
        )
    entries: list[ModelEntry] = []
    first_row: dict[tuple, int] = {}
    for line_number, raw in enumerate(reader, start=2):
        row = {(k or "").strip(): v for k, v in raw.items()}
        text = _clean(row.get(id_column))
        if text is None:
            warn(f"model list {path}, row {line_number}: empty {id_column}; row skipped")
            continue
        unsafe = next((u for u in map(unsafe_characters, filter(None, (
            text, _clean(row.get("source_model")), _clean(row.get("revision"))))) if u), None)
        if unsafe:
            warn(f"model list {path}, row {line_number}: control characters ({unsafe}) in "
                 f"'{text.encode('unicode_escape').decode('ascii')}'; row skipped")
            continue
        try:
            entry = make_entry(text, _clean(row.get("revision")), _clean(row.get("source_model")),
                               _clean(row.get("base_model_relation")), row=line_number,
                               base_dir=base_dir)
        except RevisionConflict as exc:
            raise ModelListError(f"model list {path}, row {line_number}: {exc}") from None
        hint = _local_path_hint(entry, base_dir)
        if hint:
            warn(f"model list {path}, row {line_number}: {hint}")
        identity = entry.identity  # same directory or same hub id and revision: same model
        if identity in first_row:
            warn(f"model list {path}, row {line_number}: duplicate of row "
                 f"{first_row[identity]} ({entry.key}); analysed once")
            continue
        first_row[identity] = line_number
        entries.append(entry)
    return entries


def _local_path_hint(entry: ModelEntry, base_dir: Path) -> str | None:
    """'a local path?' for an id read as a hub id whose first folder exists here."""
    if entry.local_dir is not None or entry.model_id.count("/") != 1:
        return None
    first = entry.model_id.split("/")[0]
    for folder in (base_dir, Path.cwd()):
        if (folder / first).is_dir():
            return (f"{entry.model_id!r} is no directory in {base_dir} (where relative paths are read) "
                    f"nor here, so it is taken as a hub id, yet {folder / first} exists: a local path?")
    return None


def write_model_list(entries, path: str | os.PathLike, extra_columns=None) -> Path:
    """Write entries in the format `read_model_list` reads (atomically).

    `extra_columns` ({name: one value per entry}, e.g. a checkpoint's `step`) are written
    after the standard columns; `read_model_list` ignores them, other tools may read them.
    """
    entries = list(entries)
    extra_columns = dict(extra_columns or {})
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp, tmp.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow([*MODEL_LIST_COLUMNS, *extra_columns])
        for i, e in enumerate(entries):
            extras = ["" if values[i] is None else values[i] for values in extra_columns.values()]
            writer.writerow([e.model_id, e.source_model or "", e.base_model_relation or "",
                             e.revision or "", *extras])
    return path
