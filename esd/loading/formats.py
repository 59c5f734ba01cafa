"""Weight formats: which files hold a model's weights, and the tensor source that reads them.

Owns: the format registry `FORMATS` (one row per format: the index of a sharded checkpoint,
the preferred single file, the suffixes, the local reader and — when the format can be
read by HTTP ranges — the streamed reader); the one weight-file preference rule
(`weight_names`, the transformers order: safetensors index → model.safetensors → other
*.safetensors → .bin index → pytorch_model.bin → other *.bin → *.pt/*.pth), applied to a
directory (`weight_files_in`, `find_weights`) and to a hub listing (`esd/loading/hub.py`)
alike; and the factory `open_weights`, which picks the reader of a set of weight files.

A new format is one row here and its `TensorSource` (checkpoint.py for files on disk).

Must not: talk to the hub itself (a streamed file is a `HubFile`, read by `stream.py`),
decide which tensors are layers, or compute anything.
"""
from __future__ import annotations

import json
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable

from esd.failures import ESDFailure
from esd.loading.log import logger
from esd.loading.resolved import (ADAPTER_CONFIG_FILE, ADAPTER_WEIGHT_FILES, BIN_INDEX,
                                  SAFETENSORS_INDEX)

if TYPE_CHECKING:
    from esd.loading.checkpoint import TensorSource

# Files in training-checkpoint directories that are not model weights.
NOT_WEIGHTS = re.compile(r"(optimizer|scheduler|rng_state|training_args|scaler|trainer_state)",
                         re.IGNORECASE)
UNSUPPORTED_WEIGHT_SUFFIXES = (".gguf", ".ggml", ".onnx", ".h5", ".msgpack", ".ckpt", ".pb",
                               ".tflite", ".mlmodel", ".nemo")


@dataclass(frozen=True)
class WeightFormat:
    name: str
    index: str                     # the index of a sharded checkpoint
    single: str                    # the preferred single file
    suffixes: tuple[str, ...]      # by preference: the first suffix found wins
    read: Callable[[tuple[Path, ...]], "TensorSource"]
    stream: Callable[[tuple["HubFile", ...]], "TensorSource"] | None = None


# The readers are imported when a model is opened: this module (and the hub side, which
# applies its file rule to listings) stays free of torch, and imports none of them at load.
def _files_on_disk(files: tuple[Path, ...]) -> "TensorSource":
    from esd.loading.checkpoint import FileCheckpoint
    return FileCheckpoint(files)


def _stream_safetensors(files: tuple["HubFile", ...]) -> "TensorSource":
    from huggingface_hub import get_token
    from esd.loading.checkpoint import normalise_key
    from esd.loading.stream import RemoteFile, StreamedSafetensors
    token = get_token()
    repo_id, report = files[0].repo_id, files[0].report
    return StreamedSafetensors(
        [RemoteFile(f.repo_id, f.commit, f.name, token=token) for f in files],
        normalise=normalise_key, report=None if report is None else
        (lambda done, planned: report("streamed", repo_id, done, planned)), waited=files[0].waited)


FORMATS: tuple[WeightFormat, ...] = (
    WeightFormat("safetensors", SAFETENSORS_INDEX, "model.safetensors", (".safetensors",),
                 read=_files_on_disk, stream=_stream_safetensors),
    WeightFormat("pytorch", BIN_INDEX, "pytorch_model.bin", (".bin", ".pt", ".pth"),
                 read=_files_on_disk),
)


def format_of(name: str) -> WeightFormat | None:
    return next((f for f in FORMATS if name.endswith(f.suffixes) or name == f.index), None)


def is_weight_candidate(name: str) -> bool:
    """A top-level file name that may hold model weights (not an adapter's, not a trainer's)."""
    return "/" not in name and not name.startswith("adapter_model") \
        and not NOT_WEIGHTS.search(name)


def weight_names(names) -> list[str]:
    """The weight files to read among `names` (file names in one folder), by the preference
    order of `FORMATS`: a sharded checkpoint is its index first, then the files of its suffix
    (a directory reads the shards from the index itself); else the single preferred file;
    else every file of the first suffix found. [] if none."""
    names = sorted(n for n in names if is_weight_candidate(n))
    for fmt in FORMATS:
        if fmt.index in names:
            return [fmt.index] + [n for n in names if n.endswith(fmt.suffixes[0])]
        if fmt.single in names:
            return [fmt.single]
        for suffix in fmt.suffixes:
            found = [n for n in names if n.endswith(suffix)]
            if found:
                return found
    return []


def streamable(names) -> list[str]:
    """The weight files among `names` that would be read by HTTP ranges (`--stream`)."""
    chosen = weight_names(names)
    fmt = format_of(chosen[0]) if chosen else None
    if fmt is None or fmt.stream is None:
        return []
    return [n for n in chosen if n != fmt.index]


# --------------------------------------------------------------------------- a directory

def read_json(path: Path, stage: str = "load") -> dict:
    """A JSON object file; anything else (unreadable, not JSON, nested too deep to parse,
    not an object) is a `corrupt_file` failure naming the file."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ESDFailure(stage, "corrupt_file", f"{path}: not valid JSON: {exc}") from None
    except RecursionError:
        raise ESDFailure(stage, "corrupt_file", f"{path}: JSON nested too deeply") from None
    if not isinstance(data, dict):
        raise ESDFailure(stage, "corrupt_file", f"{path}: expected a JSON object")
    return data


def is_adapter_dir(path: Path) -> bool:
    return (path / ADAPTER_CONFIG_FILE).is_file() and any(
        (path / name).is_file() for name in ADAPTER_WEIGHT_FILES)


def _regular_names(path: Path) -> list[str]:
    """Names of weight candidates directly in `path`: regular files only (a FIFO or device
    would block or stream forever)."""
    found = []
    for p in sorted(path.iterdir()):
        if not p.name.endswith(tuple(s for f in FORMATS for s in f.suffixes)) \
                or not is_weight_candidate(p.name):
            continue
        if not p.is_file():
            if not p.is_dir():
                logger.warning(f"{p}: not a regular file; ignored")
            continue
        found.append(p.name)
    return found


def _shards_of(index: Path) -> list[Path]:
    """The shard files a sharded checkpoint's index names, all inside its directory."""
    data = read_json(index)
    weight_map = data.get("weight_map") or {}
    if not isinstance(weight_map, dict):
        raise ESDFailure("load", "corrupt_file", f"{index}: weight_map is not a mapping")
    names = sorted(set(weight_map.values()))
    if not names:
        raise ESDFailure("load", "corrupt_file", f"{index}: empty weight_map")
    folder = index.parent
    outside = [n for n in names if not isinstance(n, str) or Path(n).is_absolute()
               or ".." in Path(n).parts or "/" in n or "\\" in n]
    if outside:
        raise ESDFailure("load", "corrupt_file", f"{index} names shards outside its folder "
                         f"(only file names are allowed): {', '.join(map(str, outside[:3]))}")
    missing = [n for n in names if not (folder / n).is_file()]
    if missing:
        raise ESDFailure("load", "corrupt_file", f"{index} lists missing shards: "
                         f"{', '.join(missing[:3])}")
    return [folder / n for n in names]


def weight_files_in(path: Path) -> list[Path]:
    """The model weight files directly in `path` (`weight_names`); a sharded checkpoint's
    shards are those its index names. [] if none."""
    names = _regular_names(path) + [f.index for f in FORMATS if (path / f.index).is_file()]
    chosen = weight_names(names)
    if chosen and format_of(chosen[0]) is not None and chosen[0] == format_of(chosen[0]).index:
        return _shards_of(path / chosen[0])
    return [path / n for n in chosen]


def _subfolders(root: Path) -> list[Path]:
    """Folders one and two levels below `root` (where training checkpoints keep weights)."""
    return sorted(p for p in root.glob("*/") if p.is_dir()) + \
        sorted(p for p in root.glob("*/*/") if p.is_dir())


def find_weights(root: Path) -> tuple[Path, list[Path]]:
    """(directory holding the weights, weight files): `root` itself, else the one subfolder
    (up to two levels down) that holds weights, e.g. `checkpoint_500/model/`. The filesystem
    root is never searched."""
    root = Path(root)
    if root.resolve() == Path(root.resolve().anchor):
        raise ESDFailure("resolve", "no_weights", f"{root} is the filesystem root, not a model "
                         "directory")
    files = weight_files_in(root)
    if files:
        return root, files
    candidates = []
    for sub in _subfolders(root):
        if sub.name.startswith(".") or is_adapter_dir(sub):
            continue
        sub_files = weight_files_in(sub)
        if sub_files:
            candidates.append((sub, sub_files))
    if len(candidates) == 1:
        return candidates[0]
    if len(candidates) > 1:
        names = ", ".join(str(c[0].relative_to(root)) for c in candidates[:5])
        raise ESDFailure("load", "unsupported_format",
                         f"{root}: several subfolders hold weights ({names}); give one of them")
    other = sorted(p.name for folder in [root] + _subfolders(root) for p in folder.iterdir()
                   if p.suffix in UNSUPPORTED_WEIGHT_SUFFIXES)
    if other:
        raise ESDFailure("load", "unsupported_format",
                         f"{root}: only unsupported weight formats ({', '.join(other[:3])}); "
                         "need safetensors or PyTorch .bin/.pt")
    raise ESDFailure("load", "no_weights", f"{root}: no weight files (looked for *.safetensors, "
                     "pytorch_model.bin, *.pt and their sharded indexes)")


def check_not_quantized(config_path: Path | None) -> None:
    if config_path is None:
        return
    qc = read_json(config_path).get("quantization_config")
    if qc:
        method = qc.get("quant_method", "unknown") if isinstance(qc, dict) else "unknown"
        raise ESDFailure("load", "quantized_unsupported",
                         f"{config_path}: quantized checkpoint ({method}); the spectra of "
                         "quantized weights are not comparable — analyse the unquantized model")

def check_index_complete(files: tuple[Path, ...], ckpt: "TensorSource") -> None:
    """A sharded checkpoint's shards must hold every tensor its index names: a stale or
    wrong shard would otherwise drop layers with only a warning."""
    if not files:
        return
    index = files[0].parent / (SAFETENSORS_INDEX if files[0].suffix == ".safetensors"
                               else BIN_INDEX)
    if not index.is_file():
        return
    from esd.loading.checkpoint import normalise_key
    absent = sorted(k for k in (read_json(index).get("weight_map") or {})
                    if normalise_key(k) not in ckpt.shapes)
    if absent:
        raise ESDFailure("load", "corrupt_file", f"{index}: {len(absent)} tensor(s) it names are "
                         f"in none of its shards: {', '.join(absent[:3])}")


# --------------------------------------------------------------------------- reading

class HubFile(type(Path())):
    """A weight file of a hub snapshot that is not on disk (`--stream`): read by HTTP ranges
    from `repo_id@commit`, telling `report(verb, repo_id, done, total)` how far it is and
    `waited(seconds)` how long its reader blocked on bytes. Its path is where the file would
    be in the snapshot; paths derived from it are plain paths."""

    def __new__(cls, path, repo_id: str = "", commit: str = "", report=None, waited=None):
        self = super().__new__(cls, path) if sys.version_info < (3, 12) else super().__new__(cls)
        self.repo_id, self.commit, self.report, self.waited = repo_id, commit, report, waited
        return self

    def __init__(self, path, repo_id: str = "", commit: str = "", report=None, waited=None):
        if sys.version_info >= (3, 12):
            super().__init__(path)

    def with_segments(self, *segments):          # Python >= 3.12
        return Path(*segments)

    @classmethod
    def _from_parsed_parts(cls, *args):          # Python < 3.12: derived paths are plain
        return Path()._from_parsed_parts(*args)


def open_weights(files) -> "TensorSource":
    """The tensor source of `files` (one model's weight files, all of one format): streamed
    when they are `HubFile`s, else read from disk by the format's reader."""
    files = tuple(files)
    fmt = format_of(files[0].name) if files else None
    if fmt is None:
        return _files_on_disk(files)
    if files and all(isinstance(f, HubFile) for f in files):
        if fmt.stream is None:
            raise ESDFailure("load", "unsupported_format", f"{files[0].name}: the {fmt.name} "
                             "format cannot be streamed")
        return fmt.stream(files)
    return fmt.read(files)


def plan_reads(source: "TensorSource", keys) -> None:
    """Tell a streamed source the order tensors will be read (chunked, prefetched)."""
    plan = getattr(source, "plan", None)
    if plan is not None:
        plan(list(keys))
