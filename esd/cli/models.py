"""Build the model list CSV the experiment reads, from ids, text files, other CSVs,
other model lists, a training run's checkpoints, or a base model's tree on the Hub.

    python create_model_list.py create --models gpt2 org/name@rev --output models.csv
    python create_model_list.py from-text ids.txt --output models.csv
    python create_model_list.py from-csv hub_export.csv --output models.csv
    python create_model_list.py merge a.csv b.csv --deduplicate --output models.csv
    python create_model_list.py template --output models.csv
    python create_model_list.py from-checkpoints saved_models/run1/ --output steps.csv
    python create_model_list.py from-hub --base meta-llama/Llama-2-7b-hf --output tree.csv

Owns: turning those inputs into `ModelEntry` rows and writing them with
`model_list.write_model_list` (atomic; `read_model_list` reads every file written here).
Without `--output` the list is printed to stdout. Knows nothing about weights or metrics.
Bad input gives one clear message naming the file and row, and exit status 2.

`from-hub` asks the Hub for a base model's tree (`esd/model_tree.py`): the base, then its
adapters and fine-tunes with `source_model`, `base_model_relation` and the Hub's metadata
columns (`downloads`, `likes`, `created_at`, `library_name`, `pipeline_tag`, `gated`,
`private`). The notes a user must read before the run (children left out, gated models
without a token) are printed first. A tree with no children, an unknown base, or a Hub that
keeps refusing (429) is one `error:` line, nothing written, exit status 2.
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import re
import sys
import tempfile
from dataclasses import replace
from pathlib import Path

from esd.cli_flags import FlagParser, add_flag
from esd.model_list import ModelEntry, RevisionConflict, make_entry, write_model_list
from esd.model_tree import (DEFAULT_RELATIONS, METADATA_COLUMNS, RELATIONS, SORTS, TreeError,
                            TreeQuery)

# Id columns recognised by from-csv, in order of preference (case-insensitive).
CSV_ID_COLUMNS = ("model_id", "full_name", "model_name", "model", "name")
KEPT_COLUMNS = ("source_model", "base_model_relation", "revision")

CHECKPOINT_DIR = re.compile(r"^checkpoint[_-](\d+)$")
FINAL_CHECKPOINT_DIR = "final_checkpoint"
# Files that show a directory holds a saved model (or adapter) rather than a half-written one.
MODEL_FILES = ("config.json", "adapter_config.json")
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")

TEMPLATE_ROWS = (
    # (model_id, source_model, base_model_relation, revision)
    ("gpt2", "", "base", ""),
    ("meta-llama/Llama-2-7b-hf", "", "base", ""),
    ("EleutherAI/pythia-70m", "", "base", "step3000"),
    ("some-org/llama-2-7b-lora", "meta-llama/Llama-2-7b-hf", "adapter", ""),
    ("saved_models/run1/checkpoint_1000", "", "", ""),
)


class InputError(ValueError):
    """Unusable input; the message names the file and the row."""


# ---------------------------------------------------------------- readers

def entries_from_ids(ids, source_model=None, relation=None, origin="--models") -> list[ModelEntry]:
    entries = []
    for position, text in enumerate(ids, start=1):
        if not text or not text.strip():
            raise InputError(f"{origin}: id number {position} is empty")
        try:
            entries.append(make_entry(text, None, source_model or None, relation or None, row=position))
        except RevisionConflict as exc:
            raise InputError(f"{origin}: id number {position}: {exc}") from None
    return entries


def read_text_ids(path) -> list[ModelEntry]:
    """One id per line; blank lines and `#` comments (whole-line or after the id) skipped."""
    path = _existing_file(path)
    entries = []
    for line_number, line in enumerate(_read_text(path).splitlines(), start=1):
        text = re.sub(r"(^|\s)#.*$", "", line).strip()
        if not text:
            continue
        if "," in text or "\t" in text:
            raise InputError(f"{path}, line {line_number}: {line.strip()!r} is not a single id "
                             f"(use from-csv for files with columns)")
        entries.append(make_entry(text, row=line_number, base_dir=path.parent))
    return entries


def read_csv_entries(path, id_column: str | None = None) -> tuple[list[ModelEntry], dict]:
    """Rows of any CSV with an id column; returns (entries, {"step": [...]} if present)."""
    path = _existing_file(path)
    with path.open(newline="", encoding="utf-8-sig") as handle:
        reader = csv.DictReader(handle)
        columns = [(c or "").strip() for c in (reader.fieldnames or [])]
        if not columns:
            raise InputError(f"{path}: empty file, expected a header row with one of "
                             f"{list(CSV_ID_COLUMNS)}")
        by_lower = {c.lower(): c for c in columns}
        if id_column is not None:
            if id_column not in columns:
                raise InputError(f"{path}: no column {id_column!r}; columns are {columns}")
            found = id_column
        else:
            found = next((by_lower[c] for c in CSV_ID_COLUMNS if c in by_lower), None)
            if found is None:
                raise InputError(f"{path}: no id column; found {columns}, expected one of "
                                 f"{list(CSV_ID_COLUMNS)} (or pass --id_column)")
        kept = {name: by_lower.get(name) for name in (*KEPT_COLUMNS, "step")}
        entries, steps = [], []
        for line_number, raw in enumerate(reader, start=2):
            row = {(k or "").strip(): (v or "").strip() for k, v in raw.items() if k is not None}
            text = row.get(found, "")
            if not text:
                _warn(f"{path}, row {line_number}: empty {found}; row skipped")
                continue
            try:
                entry = make_entry(text, row.get(kept["revision"] or "", "") or None, base_dir=path.parent)
            except RevisionConflict as exc:
                raise InputError(f"{path}, row {line_number}: {exc}") from None
            entries.append(ModelEntry(
                model_id=entry.model_id,
                revision=entry.revision,
                source_model=row.get(kept["source_model"] or "", "") or None,
                base_model_relation=row.get(kept["base_model_relation"] or "", "") or None,
                row=line_number,
            ))
            steps.append(row.get(kept["step"] or "", "") or None)
    extra = {"step": steps} if kept["step"] and any(s is not None for s in steps) else {}
    return entries, extra


def read_any_list(path, id_column=None) -> tuple[list[ModelEntry], dict]:
    """A model list for merge: `.txt` files are id-per-line, everything else is CSV."""
    if str(path).lower().endswith(".txt"):
        return read_text_ids(path), {}
    return read_csv_entries(path, id_column)


def find_checkpoints(run_dir, absolute: bool = False) -> tuple[list[ModelEntry], list]:
    """`checkpoint_<step>/` (or `checkpoint-<step>/`) and `final_checkpoint/` under a run
    directory, ordered by step (final last). A directory holding runs is searched one
    level deeper, run by run. Returns (entries, steps); the final checkpoint's step comes
    from its `trainer_state.json` (`global_step`) when there is one, else it is empty.
    """
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise InputError(f"{run_dir}: not a directory")
    found = _checkpoints_of_run(run_dir)
    if not found:
        for child in sorted(p for p in run_dir.iterdir() if p.is_dir()):
            found.extend(_checkpoints_of_run(child))
    if not found:
        raise InputError(f"{run_dir}: no checkpoint_<step>/, checkpoint-<step>/ or "
                         f"{FINAL_CHECKPOINT_DIR}/ directory in it or in its subdirectories")
    entries, steps = [], []
    for path, step in found:
        text = str(path.resolve()) if absolute else os.path.normpath(str(path))
        entries.append(ModelEntry(text, base_model_relation=None, row=None))
        steps.append(step)
    return entries, steps


def _checkpoints_of_run(run_dir: Path) -> list[tuple[Path, int | None]]:
    numbered, final = [], None
    for child in run_dir.iterdir():
        if not child.is_dir():
            continue
        match = CHECKPOINT_DIR.match(child.name)
        if not match and child.name != FINAL_CHECKPOINT_DIR:
            continue
        if not _holds_model(child):
            _warn(f"{child}: no config.json or weight file in it; skipped "
                  f"(still being written?)")
            continue
        if match:
            numbered.append((child, int(match.group(1))))
        else:
            final = (child, _trainer_state_step(child))
    numbered.sort(key=lambda item: item[1])
    return numbered + ([final] if final else [])


def _holds_model(directory: Path) -> bool:
    names = [p.name for p in directory.iterdir()]
    return any(n in MODEL_FILES for n in names) or any(n.endswith(WEIGHT_SUFFIXES) for n in names)


def _trainer_state_step(directory: Path) -> int | None:
    state = directory / "trainer_state.json"
    try:
        return int(json.loads(state.read_text())["global_step"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


# ---------------------------------------------------------------- list operations

def deduplicate(entries, extra, keep_duplicates: bool, origin: str):
    """Keep the first row of each (model_id, revision); empty fields are filled from later
    duplicates, and one line says how many rows were dropped. With keep_duplicates the rows
    are left as they are, with one warning line for all of them."""
    first: dict[tuple, int] = {}
    kept, kept_extra = [], {name: [] for name in extra}
    repeats = []
    for i, entry in enumerate(entries):
        identity = (entry.model_id, entry.revision)
        if identity in first:
            repeats.append(entry.key)
        if identity in first and not keep_duplicates:
            j = first[identity]
            kept[j] = replace(kept[j],
                              source_model=kept[j].source_model or entry.source_model,
                              base_model_relation=kept[j].base_model_relation
                              or entry.base_model_relation)
            continue
        if identity not in first:
            first[identity] = len(kept)
        kept.append(entry)
        for name, values in extra.items():
            kept_extra[name].append(values[i])
    if repeats and keep_duplicates:
        _warn(f"{origin}: {len(repeats)} repeated row(s), first: {repeats[0]} (kept; the "
              f"experiment analyses each id once; pass --deduplicate to drop repeats)")
    elif repeats:
        print(f"{origin}: dropped {len(repeats)} duplicate row(s) (first: {repeats[0]}); "
              f"{len(kept)} models left", file=sys.stderr)
    return kept, kept_extra


def write_or_print(entries, extra, output) -> None:
    if not entries:
        raise InputError("no model ids found; nothing written")
    if output:
        path = write_model_list(entries, output, extra_columns=extra)
        print(f"wrote {len(entries)} models to {path}", file=sys.stderr)
        return
    with tempfile.TemporaryDirectory() as tmp:
        path = write_model_list(entries, Path(tmp) / "models.csv", extra_columns=extra)
        sys.stdout.write(path.read_text(encoding="utf-8"))


# ---------------------------------------------------------------- command line

def _cmd_create(args):
    entries = entries_from_ids(args.models, args.source_model, args.base_model_relation)
    return entries, {}


def _cmd_from_text(args):
    return read_text_ids(args.file), {}


def _cmd_from_csv(args):
    return read_csv_entries(args.file, args.id_column)


def _cmd_merge(args):
    entries, steps = [], []
    has_step = False
    for path in args.files:
        more, extra = read_any_list(path, args.id_column)
        entries.extend(more)
        steps.extend(extra.get("step", [None] * len(more)))
        has_step = has_step or "step" in extra
    return entries, ({"step": steps} if has_step else {})


def _cmd_template(args):
    return [ModelEntry(m, r or None, s or None, b or None) for m, s, b, r in TEMPLATE_ROWS], {}


def _cmd_from_checkpoints(args):
    entries, steps = [], []
    for directory in args.dirs:
        more, more_steps = find_checkpoints(directory, args.absolute)
        entries.extend(more)
        steps.extend(more_steps)
    return entries, {"step": steps}


def _cmd_from_hub(args):
    from huggingface_hub import constants, get_token
    from esd.model_tree import HubListing, walk_tree
    query = tree_query(args)
    if constants.HF_HUB_OFFLINE:
        raise InputError("from-hub lists models from the Hub, but HF_HUB_OFFLINE is set")
    try:
        tree = walk_tree(query, HubListing(), get_token() is not None)
    except TreeError as error:
        raise InputError(str(error)) from None
    for note in tree.notes:
        print(f"note: {note}", file=sys.stderr)
    entries = [ModelEntry(r.model_id, r.revision, r.source_model, r.relation) for r in tree.rows]
    metadata = [r.metadata() for r in tree.rows]
    return entries, {name: [m[name] for m in metadata] for name in METADATA_COLUMNS}


def tree_query(args) -> TreeQuery:
    """The from-hub flags, checked, as one TreeQuery."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id
    if not (args.base or args.author or args.search):
        raise InputError("from-hub needs --base ORG/NAME, or --author / --search to list "
                         "matching models as bases")
    if args.base:
        try:
            validate_repo_id(args.base)
        except HFValidationError as error:
            raise InputError(f"--base {args.base}: not a hub id ({error})") from None
    depth = args.depth if args.depth is not None else (1 if args.base else 0)
    if args.limit < 1 or depth < 0:
        raise InputError(f"--limit must be 1 or more and --depth 0 or more "
                         f"(got --limit {args.limit}, --depth {depth})")
    if args.no_base and depth == 0:
        raise InputError("--no_base with --depth 0 lists nothing: the bases are all there is")
    return TreeQuery(base=args.base, relations=tuple(dict.fromkeys(args.relation)),
                     sort=args.sort, limit=args.limit, author=args.author, search=args.search,
                     depth=depth, include_base=not args.no_base, pin=args.pin)


def build_parser() -> argparse.ArgumentParser:
    parser = FlagParser(
        description="Create the model list CSV for run_esd_experiment.py.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name, func, help_text, aliases=()):
        p = sub.add_parser(name, help=help_text, description=help_text, aliases=list(aliases))
        p.set_defaults(func=func)
        add_flag(p, "--output", metavar="CSV", help="where to write the list (default: stdout)")
        return p

    p = command("create", _cmd_create, "a list from ids given on the command line")
    add_flag(p, "--models", nargs="+", required=True, metavar="ID",
         help="hub ids (org/name or org/name@rev) or local directories")
    add_flag(p, "--source_model", help="base model of the adapters in --models")
    add_flag(p, "--base_model_relation", help="relation of all --models (base, adapter, …)")

    p = command("from-text", _cmd_from_text, "a list from a text file, one id per line "
                "(# comments)", aliases=["from_text"])
    p.add_argument("file", metavar="FILE")

    p = command("from-csv", _cmd_from_csv, "a list from any CSV with an id column "
                f"({', '.join(CSV_ID_COLUMNS)}), keeping {', '.join(KEPT_COLUMNS)}",
                aliases=["from_csv"])
    p.add_argument("file", metavar="FILE")
    add_flag(p, "--id_column", help="the id column, when auto-detection picks the wrong one")

    p = command("merge", _cmd_merge, "merge model lists (CSV, or .txt one id per line)")
    p.add_argument("files", nargs="+", metavar="LIST")
    add_flag(p, "--id_column", help="the id column of the inputs (default: auto-detect)")

    command("template", _cmd_template, "an example list to edit")

    p = command("from-checkpoints", _cmd_from_checkpoints,
                "a list of a training run's checkpoint_<step>/ and final_checkpoint/ "
                "directories, ordered by step, with a step column",
                aliases=["from_checkpoints"])
    p.add_argument("dirs", nargs="+", metavar="RUN_DIR")
    add_flag(p, "--absolute", action="store_true",
         help="write absolute paths (default: the paths as given)")

    p = command("from-hub", _cmd_from_hub,
                "a base model's tree from the Hub: the base, then its adapters and fine-tunes "
                "(the base_model:<relation>:<base> tags), with the Hub's metadata",
                aliases=["from_hub"])
    add_flag(p, "--base", metavar="ORG/NAME", help="the base model whose children are listed")
    add_flag(p, "--relation", nargs="+", choices=RELATIONS, default=list(DEFAULT_RELATIONS),
             metavar="RELATION", help=f"which children: {', '.join(RELATIONS)} (default: "
             f"{' '.join(DEFAULT_RELATIONS)}; the analysis refuses quantized checkpoints)")
    add_flag(p, "--sort", choices=list(SORTS), default="downloads",
             help="children best first by this (descending; default downloads)")
    add_flag(p, "--limit", type=int, default=100, metavar="N",
             help="at most N children per parent (default 100)")
    add_flag(p, "--author", metavar="A", help="only children of this user or organisation "
             "(without --base: the models of A are the bases)")
    add_flag(p, "--search", metavar="S", help="only children whose id contains S (without "
             "--base: the models matching S are the bases)")
    add_flag(p, "--depth", type=int, default=None, metavar="D",
             help="levels of children: 2 adds the adapters of fine-tunes (default 1; without "
             "--base 0: the models matching --author/--search are the list)")
    add_flag(p, "--no_base", action="store_true", help="leave the base's own row out")
    add_flag(p, "--pin", action="store_true",
             help="fill revision with each model's current commit, so a rerun reads the "
             "same weights")

    for name in ("create", "from-text", "from-csv", "merge", "from-checkpoints"):
        add_flag(sub.choices[name], "--deduplicate", action="store_true",
             help="drop repeated ids (first row wins)")
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        entries, extra = args.func(args)
        entries, extra = deduplicate(entries, extra, not getattr(args, "deduplicate", False),
                                     args.command)
        write_or_print(entries, extra, args.output)
    except InputError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except OSError as error:
        print(f"error: {error.filename or ''}: {error.strerror or error}", file=sys.stderr)
        return 2
    return 0


def _existing_file(path) -> Path:
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: no such file")
    return path


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as error:
        raise InputError(f"{path}: not a UTF-8 text file ({error.reason})") from None


def _warn(message: str) -> None:
    print(f"warning: {message}", file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
