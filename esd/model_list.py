"""The model list: reading, validating and writing the CSV users hand to the experiment,
and the one rule that turns a model id into its result file name.

Owns: `ModelEntry`, `read_model_list`, `write_model_list`, `parse_model_id`, `safe_id`,
`result_csv_path`. Knows nothing about weights, GPUs or metrics; imports no torch, so the
orchestrator and `create_model_list.py` start fast.
"""
from __future__ import annotations

import csv
import hashlib
import io
import os
import re
import unicodedata
from dataclasses import dataclass, field
from pathlib import Path

from esd.atomic_files import atomic_path

ID_COLUMNS = ("model_id", "full_name")
OPTIONAL_COLUMNS = ("source_model", "base_model_relation", "revision")
MODEL_LIST_COLUMNS = ("model_id", "source_model", "base_model_relation", "revision")
ADAPTER_RELATIONS = frozenset({"adapter", "lora", "peft", "qlora"})

_SAFE_CHARS = re.compile(r"[^A-Za-z0-9._@+=-]")
_MAX_NAME_CHARS = 180


class ModelListError(ValueError):
    """The model list cannot be used; the message names the file and the row."""


@dataclass(frozen=True)
class ModelEntry:
    model_id: str                     # hub id `org/name` or a local directory, without `@rev`
    revision: str | None = None
    source_model: str | None = None   # base model of an adapter (a hint; files win)
    base_model_relation: str | None = None
    row: int | None = field(default=None, compare=False)  # line number in the CSV (header = 1)

    @property
    def key(self) -> str:
        """The id as users write it, `org/name@rev`; the key of failure records."""
        return f"{self.model_id}@{self.revision}" if self.revision else self.model_id

    @property
    def relation_says_adapter(self) -> bool:
        return (self.base_model_relation or "").strip().lower() in ADAPTER_RELATIONS


def parse_model_id(text: str) -> tuple[str, str | None]:
    """Split `org/name@rev` into (`org/name`, `rev`). A local path that exists is never split."""
    text = text.strip()
    if "@" in text and not os.path.exists(text):
        model_id, _, revision = text.rpartition("@")
        if model_id and revision:
            return model_id, revision
    return text, None


def safe_id(model_id: str, revision: str | None = None) -> str:
    """File-name-safe form of an id: `org/name` → `org--name`, a revision adds `@rev`.

    Characters outside `[A-Za-z0-9._@+=-]` (spaces, quotes, `;`, …) become `_` and an
    8-hex hash of the original id is appended, so two ids never share a file name.
    """
    original = f"{model_id}@{revision}" if revision else model_id
    path = os.path.normpath(model_id.strip()).lstrip("/")
    name = "--".join(part for part in path.split("/") if part not in ("", "."))
    if revision:
        name = f"{name}@{revision}"
    cleaned = _SAFE_CHARS.sub("_", name).lstrip(".") or "_"
    if cleaned != name or len(cleaned) > _MAX_NAME_CHARS:
        digest = hashlib.sha1(original.encode("utf-8")).hexdigest()[:8]
        cleaned = f"{cleaned[:_MAX_NAME_CHARS]}~{digest}"
    return cleaned


def result_csv_path(output_dir: str | os.PathLike, entry: ModelEntry) -> Path:
    """Where the per-model CSV of `entry` lives; its existence means the model is done."""
    return Path(output_dir) / f"{safe_id(entry.model_id, entry.revision)}.csv"


def unsafe_characters(text: str) -> str | None:
    """The control characters of `text` (newline, tab, ESC of an ANSI sequence, a
    direction override, …) escaped for a message, or None if it has none. Such an id would
    split a line of failed_models.txt or drive the terminal it is printed on."""
    bad = [c for c in text if unicodedata.category(c) in ("Cc", "Cf", "Zl", "Zp")]
    return "".join(dict.fromkeys(c.encode("unicode_escape").decode("ascii") for c in bad)) or None


def _clean(value: object) -> str | None:
    text = "" if value is None else str(value).strip()
    return text or None


def read_model_list(path: str | os.PathLike, warn=print) -> list[ModelEntry]:
    """Read and validate a model list; duplicates are kept once (with a warning naming rows).

    Raises ModelListError for a missing file, a directory, a spreadsheet, a file that is not
    UTF-8 or not CSV, a file with no id column, or a row whose `@rev` disagrees with its
    `revision` column. Ids that share a result file (`dir` and `dir/`) are duplicates. Rows with an empty id are skipped with a
    warning naming the row, so one bad row does not stop an experiment over hundreds.
    """
    path = Path(path)
    text = _model_list_text(path)
    reader = csv.DictReader(io.StringIO(text, newline=""))
    try:
        return _entries(reader, path, warn)
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


def _entries(reader: csv.DictReader, path: Path, warn) -> list[ModelEntry]:
    """The rows of an opened model list, checked and de-duplicated (see `read_model_list`)."""
    columns = [c.strip() for c in (reader.fieldnames or [])]
    id_column = next((c for c in ID_COLUMNS if c in columns), None)
    if id_column is None:
        raise ModelListError(
            f"model list {path} has no id column: found {columns or 'no header'}, "
            f"expected one of {list(ID_COLUMNS)} (optional: {list(OPTIONAL_COLUMNS)})"
        )
    entries: list[ModelEntry] = []
    first_row: dict[str, int] = {}
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
        model_id, revision = parse_model_id(text)
        column_revision = _clean(row.get("revision"))
        if revision and column_revision and revision != column_revision:
            raise ModelListError(
                f"model list {path}, row {line_number}: id {text!r} names revision "
                f"{revision!r} but the revision column says {column_revision!r}"
            )
        entry = ModelEntry(
            model_id=model_id,
            revision=revision or column_revision,
            source_model=_clean(row.get("source_model")),
            base_model_relation=_clean(row.get("base_model_relation")),
            row=line_number,
        )
        identity = safe_id(entry.model_id, entry.revision)  # same result file: same model
        if identity in first_row:
            warn(f"model list {path}, row {line_number}: duplicate of row "
                 f"{first_row[identity]} ({entry.key}); analysed once")
            continue
        first_row[identity] = line_number
        entries.append(entry)
    return entries


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
