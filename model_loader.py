"""Where weights come from: resolve a model id to files, and stream its layers.

Owns: turning an id (local directory, `org/name`, `org/name@rev`, training checkpoint
directory) into files on disk through the huggingface_hub cache (`resolve_model`);
finding the analysable layers without instantiating weights (meta-device skeleton, or a
name/shape rule when transformers cannot build the architecture); streaming them one at a
time as float32 CPU tensors from memory-mapped files (`iter_layers`); merging LoRA
adapters layer by layer exactly as peft's `merge_and_unload` would; placing a local
directory into the hub cache in the hub's own layout (`install_into_hub_cache`).

Must not: compute any metric (that is `net_esd.py`), choose devices or GPUs, write result
files, or hold a whole model in memory (one exception, documented at `_merge_with_peft`:
adapter types that cannot be merged streaming are merged by peft on a float32 CPU copy).

Every failure is an `ESDFailure(stage, reason, message)` with stage `resolve`, `load` or
`merge`; no raw torch / safetensors / hub traceback escapes for bad input.

Decisions:
- Layers: the model skeleton is built from config.json on the meta device (class from
  `config.architectures`, else AutoModel); Linear / transformers Conv1D → `linear`,
  Conv1d → `conv1d`, Conv2d → `conv2d`, Embedding → `embedding`. A tensor shared by two
  modules is yielded once, under the first name. Checkpoint weights outside the skeleton,
  and whole checkpoints transformers cannot build (no config, unknown or remote-code
  architecture without `trust_remote_code`), follow the name/shape rule: `*.weight` 2-D →
  `linear` (`embedding` if the name says embed/wte/wpe/…), 3-D → `conv1d`, 4-D → `conv2d`.
- Adapters are recognised by their files, never by the relation hint. Plain LoRA (Linear,
  Conv1D, Embedding; rank/alpha patterns, rsLoRA, modules_to_save, saved embedding layers)
  is merged streaming, ΔW = B @ A · scaling in float32, after every name and shape has been
  checked against the base. Everything else (DoRA, lora_bias, conv LoRA, IA3, LoHa, LoKr,
  AdaLoRA, …) is merged by peft itself on a float32 CPU copy of the base (whole model in
  memory, with a warning), never approximated.
- Offline (`HF_HUB_OFFLINE=1`, read at call time): only the local cache is consulted; an
  id that is not there is `repo_not_found` (a missing revision of a cached repo is
  `revision_not_found`). Online, an unreachable hub falls back to a cached snapshot.
"""
from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import re
import shutil
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import torch
from torch import nn

from esd.atomic_files import atomic_path, write_text_atomic
from esd.failures import ESDFailure
from esd.model_list import (ModelEntry, RevisionConflict, parse_model_id,
                            relation_says_adapter, split_revision)

logger = logging.getLogger(__name__)
Warn = Callable[[str], None]

CONFIG_FILE = "config.json"
ADAPTER_CONFIG_FILE = "adapter_config.json"
ADAPTER_WEIGHT_FILES = ("adapter_model.safetensors", "adapter_model.bin")
SAFETENSORS_INDEX = "model.safetensors.index.json"
BIN_INDEX = "pytorch_model.bin.index.json"
# Files in training-checkpoint directories that are not model weights.
NOT_WEIGHTS = re.compile(r"(optimizer|scheduler|rng_state|training_args|scaler|trainer_state)",
                         re.IGNORECASE)
UNSUPPORTED_WEIGHT_SUFFIXES = (".gguf", ".ggml", ".onnx", ".h5", ".msgpack", ".ckpt", ".pb",
                               ".tflite", ".mlmodel", ".nemo")
# Names that make a 2-D weight an embedding under the name/shape rule.
EMBEDDING_NAME = re.compile(r"(embed|wte|wpe|word_embeddings|position_embeddings|"
                            r"token_type_embeddings|tok_embeddings|shared)", re.IGNORECASE)
LAYER_TYPES = ("linear", "conv1d", "conv2d", "embedding")
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.\-]*(/[\w.\-]+)?$")
_COMMIT = re.compile(r"^[0-9a-f]{40}$")


# --------------------------------------------------------------------------- the result

@dataclass
class ResolvedModel:
    """A model id resolved to files on disk (and, for an adapter, its resolved base)."""
    model_id: str
    revision: str | None          # the requested revision (`main` for hub ids without one)
    local_dir: Path               # the directory the id resolved to (hub snapshot or local)
    is_adapter: bool
    source_model: str | None      # base id actually used (adapters); the hint otherwise
    base: "ResolvedModel | None" = None
    commit: str | None = None     # hub commit of the snapshot, when resolved through the hub
    weights_dir: Path | None = None     # where the weight files are (may be a subfolder)
    weight_files: tuple[Path, ...] = ()
    config_path: Path | None = None
    adapter_config: dict | None = None
    trust_remote_code: bool = False
    warn: Warn = field(default=logger.warning, repr=False, compare=False)
    needs_remote_code: bool = field(default=False, repr=False)  # config needs custom code


# --------------------------------------------------------------------------- hub cache

def _env_true(name: str) -> bool:
    return os.environ.get(name, "").strip().upper() in {"1", "ON", "YES", "TRUE"}


def _hub_offline() -> bool:
    """HF_HUB_OFFLINE read now (huggingface_hub reads it once, at import)."""
    from huggingface_hub import constants
    return _env_true("HF_HUB_OFFLINE") or bool(constants.HF_HUB_OFFLINE)


def _hub_cache_dir(cache_dir: str | os.PathLike | None = None) -> Path:
    """The hub cache: argument, else HF_HUB_CACHE / HF_HOME read now, else the hub default."""
    if cache_dir:
        return Path(cache_dir)
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"])
    if os.environ.get("HF_HOME"):
        return Path(os.environ["HF_HOME"]) / "hub"
    from huggingface_hub import constants
    return Path(constants.HF_HUB_CACHE)


def _repo_folder(cache: Path, repo_id: str) -> Path:
    return cache / ("models--" + repo_id.replace("/", "--"))


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def install_into_hub_cache(repo_id: str, source_dir: Path, cache_dir: str | None = None,
                           revision: str = "main") -> Path:
    """Place a local model directory into the hub cache under `repo_id`, in the hub's layout
    `models--org--name/{blobs/<sha256>, snapshots/<commit>/<file> → blob, refs/<revision>}`.

    The commit is a hash of the directory's content, so installing the same files twice is a
    no-op and different content under another revision gets its own snapshot. A revision
    that is itself a 40-hex commit is used as the commit (no ref). Returns the snapshot dir.
    """
    source_dir = Path(source_dir)
    if not source_dir.is_dir():
        raise ESDFailure("resolve", "repo_not_found", f"{source_dir} is not a directory")
    files = sorted(p for p in source_dir.rglob("*") if p.is_file()
                   and ".cache" not in p.relative_to(source_dir).parts)
    blobs = {p.relative_to(source_dir).as_posix(): _sha256(p) for p in files}
    if _COMMIT.match(revision):
        commit = revision
    else:
        commit = hashlib.sha1(json.dumps(blobs, sort_keys=True).encode()).hexdigest()
    storage = _repo_folder(_hub_cache_dir(cache_dir), repo_id)
    snapshot = storage / "snapshots" / commit
    for rel, blob_hash in blobs.items():
        blob = storage / "blobs" / blob_hash
        if not blob.exists():
            blob.parent.mkdir(parents=True, exist_ok=True)
            with atomic_path(blob) as tmp:
                shutil.copyfile(source_dir / rel, tmp)
        link = snapshot / rel
        if link.exists():
            continue
        link.parent.mkdir(parents=True, exist_ok=True)
        try:  # the hub's own relative symlink; a copy where symlinks are not allowed
            link.symlink_to(os.path.relpath(blob, link.parent))
        except OSError:
            shutil.copyfile(blob, link)
    snapshot.mkdir(parents=True, exist_ok=True)
    if not _COMMIT.match(revision):
        ref = storage / "refs" / revision
        ref.parent.mkdir(parents=True, exist_ok=True)
        write_text_atomic(ref, commit)
    return snapshot


def _http_error_types() -> tuple[tuple[type, ...], tuple[type, ...]]:
    """(connection-level errors, any transport error) of the hub's HTTP client."""
    network: list[type] = [ConnectionError, TimeoutError]
    transport: list[type] = [OSError]
    for module_name in ("httpx2", "httpx", "requests"):  # hub >= 1.0 uses httpx(2)
        try:
            client = __import__(module_name)
        except ImportError:
            continue
        for attr in ("TimeoutException", "ConnectError", "ConnectionError", "Timeout"):
            if isinstance(getattr(client, attr, None), type):
                network.append(getattr(client, attr))
        for attr in ("HTTPError", "TransportError", "RequestException"):
            if isinstance(getattr(client, attr, None), type):
                transport.append(getattr(client, attr))
    return tuple(network), tuple(transport)


def _hub_failure(exc: BaseException, repo_id: str, revision: str | None) -> ESDFailure:
    """Map a huggingface_hub / network exception to a typed failure."""
    from huggingface_hub import errors
    network_errors, http_errors = _http_error_types()
    name = f"{repo_id}@{revision}" if revision else repo_id
    if isinstance(exc, errors.GatedRepoError):
        return ESDFailure("resolve", "gated", f"{name} is gated: request access on the hub and "
                          "set HF_TOKEN")
    if isinstance(exc, errors.RepositoryNotFoundError):
        status = getattr(getattr(exc, "response", None), "status_code", None)
        if status == 401 and os.environ.get("HF_TOKEN"):
            return ESDFailure("resolve", "unauthorized", f"{name}: not found or HF_TOKEN has no "
                              "access (401)")
        return ESDFailure("resolve", "repo_not_found", f"{name}: no such repository on the hub "
                          "(or it is private: set HF_TOKEN)")
    if isinstance(exc, errors.RevisionNotFoundError):
        return ESDFailure("resolve", "revision_not_found", f"{name}: no such revision")
    if isinstance(exc, errors.HFValidationError):
        return ESDFailure("resolve", "invalid_id", f"{name!r} is not a valid hub id: {exc}")
    if isinstance(exc, errors.IncompleteSnapshotError):
        return ESDFailure("resolve", "download_interrupted", f"{name}: cached snapshot is "
                          f"incomplete and the hub cannot be reached: {exc}")
    if isinstance(exc, errors.HfHubHTTPError):
        status = getattr(getattr(exc, "response", None), "status_code", None)
        if status in (401, 403):
            return ESDFailure("resolve", "unauthorized", f"{name}: access denied ({status})")
        if status == 429 or (status is not None and status >= 500):
            return ESDFailure("resolve", "hub_unavailable", f"{name}: hub answered {status}")
        return ESDFailure("resolve", "network_error", f"{name}: hub error {status}: {exc}")
    if isinstance(exc, errors.LocalEntryNotFoundError):
        return ESDFailure("resolve", "network_error", f"{name}: the hub cannot be reached and "
                          "the files are not in the local cache")
    if isinstance(exc, network_errors):
        return ESDFailure("resolve", "network_error", f"{name}: {type(exc).__name__}: {exc}")
    if isinstance(exc, http_errors):
        return ESDFailure("resolve", "download_interrupted",
                          f"{name}: download failed: {type(exc).__name__}: {exc}")
    return ESDFailure("resolve", "hub_unavailable", f"{name}: {type(exc).__name__}: {exc}")


def _download_patterns(repo_files: list[str], trust_remote_code: bool) -> list[str]:
    """Only the files needed: configs, then adapter weights, or safetensors, or .bin."""
    patterns = ["*config.json", "modules.json"]
    if trust_remote_code:
        patterns.append("*.py")
    if ADAPTER_CONFIG_FILE in repo_files:
        return patterns + list(ADAPTER_WEIGHT_FILES)
    if any(f.endswith(".safetensors") for f in repo_files):
        return patterns + ["*.safetensors", "*.safetensors.index.json"]
    return patterns + ["*.bin", "*.bin.index.json", "*.pt", "*.pth"]


def _offline_snapshot(repo_id: str, revision: str, cache: Path) -> Path:
    from huggingface_hub import snapshot_download, errors
    try:
        # Only files every download fetches, so a partial (pattern-filtered) snapshot counts.
        return Path(snapshot_download(repo_id, revision=revision, cache_dir=cache,
                                      local_files_only=True,
                                      allow_patterns=[CONFIG_FILE, ADAPTER_CONFIG_FILE]))
    except errors.LocalEntryNotFoundError:
        if _repo_folder(cache, repo_id).is_dir():
            raise ESDFailure("resolve", "revision_not_found",
                             f"{repo_id}: revision {revision!r} is not in the local cache "
                             f"{cache} (offline: HF_HUB_OFFLINE=1)") from None
        raise ESDFailure("resolve", "repo_not_found",
                         f"{repo_id}@{revision} was looked up in the local cache {cache} "
                         "only (offline: HF_HUB_OFFLINE=1) and is not there") from None
    except Exception as exc:  # noqa: BLE001 - every hub error becomes a typed failure
        failure = _hub_failure(exc, repo_id, revision)
        failure.retryable = False  # offline: retrying cannot fetch anything
        raise failure from None


def _download_snapshot(repo_id: str, revision: str, cache: Path,
                       trust_remote_code: bool) -> Path:
    """The snapshot directory of `repo_id@revision`: from the cache when offline, else
    downloading only the needed files (HF_TOKEN is read by huggingface_hub itself)."""
    if _hub_offline():
        return _offline_snapshot(repo_id, revision, cache)
    from huggingface_hub import HfApi, snapshot_download
    try:
        repo_files = HfApi().list_repo_files(repo_id, revision=revision)
        patterns = _download_patterns(repo_files, trust_remote_code)
        return Path(snapshot_download(repo_id, revision=revision, cache_dir=cache,
                                      allow_patterns=patterns))
    except Exception as exc:  # noqa: BLE001 - every hub error becomes a typed failure
        failure = _hub_failure(exc, repo_id, revision)
    if failure.reason in ("network_error", "hub_unavailable"):
        try:  # hub unreachable: a cached snapshot still serves, as huggingface_hub does
            return _offline_snapshot(repo_id, revision, cache)
        except ESDFailure:
            pass
    raise failure


# --------------------------------------------------------------------------- files

def _read_json(path: Path, stage: str = "load") -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ESDFailure(stage, "corrupt_file", f"{path}: not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise ESDFailure(stage, "corrupt_file", f"{path}: expected a JSON object")
    return data


def _is_adapter_dir(path: Path) -> bool:
    return (path / ADAPTER_CONFIG_FILE).is_file() and any(
        (path / name).is_file() for name in ADAPTER_WEIGHT_FILES)


def _weight_files_in(path: Path) -> list[Path]:
    """The model weight files directly in `path`, by the transformers preference order:
    safetensors index → model.safetensors → other *.safetensors → .bin index →
    pytorch_model.bin → other *.bin → *.pt/*.pth (raw state dicts). [] if none."""
    def from_index(index: Path) -> list[Path]:
        data = _read_json(index)
        names = sorted(set((data.get("weight_map") or {}).values()))
        if not names:
            raise ESDFailure("load", "corrupt_file", f"{index}: empty weight_map")
        missing = [n for n in names if not (path / n).is_file()]
        if missing:
            raise ESDFailure("load", "corrupt_file", f"{index} lists missing shards: "
                             f"{', '.join(missing[:3])}")
        return [path / n for n in names]

    if (path / SAFETENSORS_INDEX).is_file():
        return from_index(path / SAFETENSORS_INDEX)
    if (path / "model.safetensors").is_file():
        return [path / "model.safetensors"]
    found = sorted(p for p in path.glob("*.safetensors")
                   if not p.name.startswith("adapter_model") and not NOT_WEIGHTS.search(p.name))
    if found:
        return found
    if (path / BIN_INDEX).is_file():
        return from_index(path / BIN_INDEX)
    if (path / "pytorch_model.bin").is_file():
        return [path / "pytorch_model.bin"]
    for pattern in ("*.bin", "*.pt", "*.pth"):
        found = sorted(p for p in path.glob(pattern)
                       if not p.name.startswith("adapter_model") and not NOT_WEIGHTS.search(p.name))
        if found:
            return found
    return []


def _find_weights(root: Path) -> tuple[Path, list[Path]]:
    """(directory holding the weights, weight files): `root` itself, else the one subfolder
    (up to two levels down) that holds weights, e.g. `checkpoint_500/model/`."""
    files = _weight_files_in(root)
    if files:
        return root, files
    candidates = []
    for sub in sorted(p for p in root.glob("*/") if p.is_dir()) + \
            sorted(p for p in root.glob("*/*/") if p.is_dir()):
        if sub.name.startswith(".") or _is_adapter_dir(sub):
            continue
        sub_files = _weight_files_in(sub)
        if sub_files:
            candidates.append((sub, sub_files))
    if len(candidates) == 1:
        return candidates[0]
    if len(candidates) > 1:
        names = ", ".join(str(c[0].relative_to(root)) for c in candidates[:5])
        raise ESDFailure("load", "unsupported_format",
                         f"{root}: several subfolders hold weights ({names}); give one of them")
    other = sorted(p.name for p in root.rglob("*") if p.suffix in UNSUPPORTED_WEIGHT_SUFFIXES)
    if other:
        raise ESDFailure("load", "unsupported_format",
                         f"{root}: only unsupported weight formats ({', '.join(other[:3])}); "
                         "need safetensors or PyTorch .bin/.pt")
    raise ESDFailure("load", "no_weights", f"{root}: no weight files (looked for *.safetensors, "
                     "pytorch_model.bin, *.pt and their sharded indexes)")


def _check_not_quantized(config_path: Path | None) -> None:
    if config_path is None:
        return
    qc = _read_json(config_path).get("quantization_config")
    if qc:
        method = qc.get("quant_method", "unknown") if isinstance(qc, dict) else "unknown"
        raise ESDFailure("load", "quantized_unsupported",
                         f"{config_path}: quantized checkpoint ({method}); the spectra of "
                         "quantized weights are not comparable — analyse the unquantized model")


# --------------------------------------------------------------------------- resolve

def resolve_model(model_id: "str | ModelEntry", revision: str | None = None, source_model: str | None = None,
                  base_model_relation: str | None = None, *, trust_remote_code: bool = False,
                  cache_dir: str | None = None, warn: Warn = logger.warning) -> ResolvedModel:
    """Resolve an id (local dir, `org/name`, `org/name@rev`) to files; for an adapter, also
    resolve its base (`source_model` argument → `base_model_name_or_path` in
    adapter_config.json). Downloads only what is needed, or reads the cache when offline.
    `model_id` may be a `ModelEntry` (the worker's form): its real local directory is used."""
    if isinstance(model_id, ModelEntry):  # adapter: the entry form beside the keyword form
        entry = model_id
        model_id, revision = entry.local_dir or entry.model_id, entry.revision
        source_model, base_model_relation = entry.source_model, entry.base_model_relation
    if not isinstance(model_id, str) or not model_id.strip():
        raise ESDFailure("resolve", "invalid_id", f"empty model id: {model_id!r}")
    try:
        model_id, revision = split_revision(model_id, revision)
    except RevisionConflict as exc:
        raise ESDFailure("resolve", "invalid_id", str(exc)) from None
    local = Path(model_id).expanduser()
    if local.is_dir():
        if revision:
            warn(f"{model_id}: local directory, revision {revision!r} ignored")
        resolved = ResolvedModel(model_id, None, local, False, None)
    elif local.is_file() or model_id.startswith(("/", "./", "../", "~")) or \
            model_id.count("/") > 1:
        raise ESDFailure("resolve", "repo_not_found", f"{model_id}: no such local directory "
                         "(and not a hub id `org/name`)")
    elif not _HUB_ID.match(model_id) or ".." in model_id or model_id.endswith((".", "-")):
        raise ESDFailure("resolve", "invalid_id", f"{model_id!r} is neither a local directory "
                         "nor a hub id `org/name`")
    else:
        snapshot = _download_snapshot(model_id, revision or "main", _hub_cache_dir(cache_dir),
                                      trust_remote_code)
        resolved = ResolvedModel(model_id, revision or "main", snapshot, False, None,
                                 commit=snapshot.name)
    resolved.trust_remote_code = trust_remote_code
    resolved.warn = warn

    hint_adapter = relation_says_adapter(base_model_relation)
    if _is_adapter_dir(resolved.local_dir):
        if base_model_relation and not hint_adapter:
            warn(f"{model_id}: base_model_relation={base_model_relation!r} but the files are an "
                 "adapter (adapter_config.json); merging it into its base")
        return _resolve_adapter(resolved, source_model, trust_remote_code, cache_dir, warn)
    if hint_adapter:
        warn(f"{model_id}: base_model_relation={base_model_relation!r} but there is no "
             "adapter_config.json + adapter_model.*; analysing it as a full model")
    resolved.source_model = source_model or None
    resolved.weights_dir, files = _find_weights(resolved.local_dir)
    resolved.weight_files = tuple(files)
    for candidate in (resolved.weights_dir / CONFIG_FILE, resolved.local_dir / CONFIG_FILE):
        if candidate.is_file():
            resolved.config_path = candidate
            break
    _check_not_quantized(resolved.config_path)
    return resolved


def _resolve_adapter(resolved: ResolvedModel, source_model: str | None,
                     trust_remote_code: bool, cache_dir: str | None,
                     warn: Warn) -> ResolvedModel:
    adapter_config = _read_json(resolved.local_dir / ADAPTER_CONFIG_FILE, stage="resolve")
    resolved.is_adapter = True
    resolved.adapter_config = adapter_config
    resolved.weight_files = tuple(resolved.local_dir / n for n in ADAPTER_WEIGHT_FILES
                                  if (resolved.local_dir / n).is_file())[:1]
    resolved.weights_dir = resolved.local_dir
    config_base = adapter_config.get("base_model_name_or_path") or None
    if source_model:
        base_id, base_revision = source_model, None
        if config_base and parse_model_id(source_model)[0] != config_base:
            warn(f"{resolved.model_id}: source_model {source_model!r} differs from the adapter's "
                 f"base_model_name_or_path {config_base!r}; using {source_model!r}")
    elif config_base:
        base_id, base_revision = config_base, adapter_config.get("revision") or None
    else:
        raise ESDFailure("resolve", "adapter_base_unresolved",
                         f"{resolved.model_id}: adapter without a base: no source_model given and "
                         "no base_model_name_or_path in adapter_config.json")
    try:
        base = resolve_model(base_id, base_revision, trust_remote_code=trust_remote_code,
                             cache_dir=cache_dir, warn=warn)
    except ESDFailure as failure:
        if failure.retryable:
            failure.message = f"base {base_id} of adapter {resolved.model_id}: {failure.message}"
            raise
        raise ESDFailure("resolve", "adapter_base_unresolved",
                         f"{resolved.model_id}: base model {base_id!r} cannot be resolved: "
                         f"{failure.reason}: {failure.message}") from None
    if base.is_adapter:
        raise ESDFailure("resolve", "adapter_unsupported", f"{resolved.model_id}: its base "
                         f"{base_id!r} is itself an adapter (stacked adapters are not merged)")
    resolved.base = base
    resolved.source_model = base.model_id if base.revision in (None, "main") \
        else f"{base.model_id}@{base.revision}"
    return resolved


# --------------------------------------------------------------------------- checkpoints

class _Checkpoint:
    """The tensors of a set of weight files, read one at a time from memory maps.

    Keys are normalised (`module.` / `_orig_mod.` from DDP / torch.compile stripped, a raw
    `{"model": state_dict}` checkpoint unwrapped); `shapes` is known without reading data.
    A safetensors file is mapped afresh for each tensor and unmapped right after the copy:
    the pages a tensor touched count in the process's resident memory while mapped, so a
    map held across tensors would grow to the whole file (measured: 0.9 GB after 60 tensors
    of a 1.3 GB file, against 4 MB with a map per tensor). PyTorch `.bin` files are
    unpickled once (mapped); at most `OPEN_FILES` of them stay open.
    """
    OPEN_FILES = 2

    def __init__(self, files: tuple[Path, ...]):
        self._open: OrderedDict[Path, dict] = OrderedDict()  # unpickled .bin state dicts
        self.key_file: dict[str, Path] = {}
        self.raw_key: dict[str, str] = {}
        self.shapes: dict[str, tuple[int, ...]] = {}
        self.floating: dict[str, bool] = {}   # False for integer / bool tensors
        for path in files:
            self._index(path)
        self.close()

    def close(self) -> None:
        self._open.clear()

    def _file(self, path: Path):
        if path in self._open:
            self._open.move_to_end(path)
            return self._open[path]
        opened = self._torch_load(path)
        self._open[path] = opened
        while len(self._open) > self.OPEN_FILES:
            self._open.popitem(last=False)
        return opened

    @staticmethod
    def _safe_open(path: Path):
        from safetensors import safe_open
        try:
            return safe_open(str(path), framework="pt")
        except Exception as exc:  # noqa: BLE001 - SafetensorError, OSError, …
            raise ESDFailure("load", "corrupt_file", f"{path.name}: unreadable safetensors "
                             f"({type(exc).__name__}: {exc})") from None

    def _index(self, path: Path) -> None:
        if path.suffix == ".safetensors":
            with self._safe_open(path) as opened:
                try:
                    entries = []
                    for k in opened.keys():
                        view = opened.get_slice(k)
                        dtype = view.get_dtype()            # "F32", "BF16", "I8", "BOOL", …
                        entries.append((k, tuple(view.get_shape()),
                                        dtype.startswith("F") or dtype == "BF16"))
                except Exception as exc:  # noqa: BLE001
                    raise ESDFailure("load", "corrupt_file", f"{path.name}: unreadable safetensors "
                                     f"header ({type(exc).__name__}: {exc})") from None
        else:
            entries = [(k, tuple(v.shape), v.is_floating_point())
                       for k, v in self._file(path).items()]
        for key, shape, floating in entries:
            name = _normalise_key(key)
            self.key_file[name] = path
            self.raw_key[name] = key
            self.shapes[name] = shape
            self.floating[name] = floating

    @staticmethod
    def _torch_load(path: Path) -> dict:
        def load(mmap: bool):
            return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
        try:
            try:
                state = load(mmap=True)
            except RuntimeError as exc:
                if "mmap" not in str(exc).lower() and "zip" not in str(exc).lower():
                    raise
                state = load(mmap=False)  # legacy (pre-zip) format: read fully
        except Exception as exc:  # noqa: BLE001 - truncated zip, pickle errors, …
            raise ESDFailure("load", "corrupt_file", f"{path.name}: unreadable PyTorch file "
                             f"({type(exc).__name__}: {exc})") from None
        for wrapper in ("model", "state_dict", "model_state_dict", "module"):
            if isinstance(state, dict) and isinstance(state.get(wrapper), dict):
                state = state[wrapper]
                break
        if not isinstance(state, dict):
            raise ESDFailure("load", "unsupported_format", f"{path.name}: not a state dict")
        return {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}

    def tensor(self, key: str) -> torch.Tensor:
        """A float32 CPU copy of one tensor, owned by the caller."""
        path = self.key_file[key]
        raw = self.raw_key[key]
        try:
            if path.suffix == ".safetensors":
                with self._safe_open(path) as opened:  # mapped for this tensor only
                    return _float32_copy(opened.get_slice(raw))
            t = self._file(path)[raw]                  # a view of the memory map
            return t.to(torch.float32, copy=True).contiguous()
        except ESDFailure:
            raise
        except Exception as exc:  # noqa: BLE001
            raise ESDFailure("load", "corrupt_file", f"{path.name}: cannot read {raw!r} "
                             f"({type(exc).__name__}: {exc})") from None


_CONVERT_CHUNK_ELEMENTS = 8 * 1024 * 1024


def _float32_copy(view) -> torch.Tensor:
    """A float32 copy of a safetensors slice, converted in row chunks: a bf16/fp16 tensor
    never sits in memory twice (stored dtype + float32) in full."""
    shape = tuple(view.get_shape())
    if view.get_dtype() == "F32" or len(shape) < 2:
        return view[:].to(torch.float32)
    out = torch.empty(shape, dtype=torch.float32)
    rows = max(1, _CONVERT_CHUNK_ELEMENTS // max(1, math.prod(shape[1:])))
    for start in range(0, shape[0], rows):
        out[start:start + rows] = view[start:start + rows]  # (rows, …) stored dtype → float32
    return out


def _normalise_key(key: str) -> str:
    for prefix in ("module.", "_orig_mod."):
        while key.startswith(prefix):
            key = key[len(prefix):]
    return key.replace("._orig_mod.", ".")


# --------------------------------------------------------------------------- layers

def _rule_layer_type(key: str, ndim: int) -> str | None:
    """The name/shape rule: 2-D → linear (embedding if the name says so), 3-D → conv1d,
    4-D → conv2d, anything else → not analysed."""
    if ndim == 2:
        return "embedding" if EMBEDDING_NAME.search(key) else "linear"
    return {3: "conv1d", 4: "conv2d"}.get(ndim)


def _module_layer_type(module: nn.Module) -> tuple[str, bool] | None:
    """(layer_type, stored transposed) of an analysable module, else None."""
    from transformers.pytorch_utils import Conv1D
    if isinstance(module, Conv1D):
        return "linear", True
    if isinstance(module, nn.Linear):
        return "linear", False
    if isinstance(module, nn.Conv1d):
        return "conv1d", False
    if isinstance(module, nn.Conv2d):
        return "conv2d", False
    if isinstance(module, nn.Embedding):
        return "embedding", False
    return None


def _load_config(resolved: ResolvedModel, warn: Warn):
    """The transformers config, or None (with a warning) when it cannot be built."""
    if resolved.config_path is None:
        warn(f"{resolved.model_id}: no config.json; layers found by the name/shape rule")
        return None
    from transformers import AutoConfig
    try:
        return AutoConfig.from_pretrained(str(resolved.config_path.parent),
                                          trust_remote_code=resolved.trust_remote_code)
    except Exception as exc:  # noqa: BLE001 - unknown model_type, remote code, bad values
        if "trust_remote_code" in str(exc) and not resolved.trust_remote_code:
            warn(f"{resolved.model_id}: architecture needs trust_remote_code (not given); "
                 "layers found by the name/shape rule")
            resolved.needs_remote_code = True
        else:
            warn(f"{resolved.model_id}: transformers cannot read its config "
                 f"({type(exc).__name__}: {str(exc)[:200]}); layers found by the name/shape rule")
        return None


def _build_model(config, trust_remote_code: bool, meta: bool) -> nn.Module:
    """The model of `config.architectures[0]` (AutoModel as fallback), on the meta device
    (no memory) or on CPU in float32."""
    import transformers
    candidates = []
    for arch in (getattr(config, "architectures", None) or [])[:1]:
        cls = getattr(transformers, arch, None)
        if isinstance(cls, type) and issubclass(cls, transformers.PreTrainedModel):
            candidates.append(lambda cls=cls: cls._from_config(config, dtype=torch.float32))
    auto_kwargs = {"trust_remote_code": trust_remote_code, "dtype": torch.float32}
    if trust_remote_code and getattr(config, "auto_map", None):
        for auto_name in ("AutoModelForCausalLM", "AutoModel"):
            if auto_name in config.auto_map:
                auto = getattr(transformers, auto_name)
                candidates.append(lambda auto=auto: auto.from_config(config, **auto_kwargs))
    candidates.append(lambda: transformers.AutoModel.from_config(config, **auto_kwargs))
    last: Exception | None = None
    for build in candidates:
        try:
            if meta:
                with torch.device("meta"):
                    return build()
            return build()
        except Exception as exc:  # noqa: BLE001 - try the next class
            last = exc
    raise RuntimeError(f"{type(last).__name__}: {last}")


class _KeyMatcher:
    """Maps a module parameter name to a checkpoint key, across prefix differences
    (`bert.`/`model.`/`transformer.` present in one and not the other, sentence-transformers
    checkpoints saved without prefix, adapters trained on another head class)."""

    def __init__(self, keys, base_prefix: str = ""):
        self.keys = set(keys)
        self.prefix = base_prefix
        self._by_suffix: dict[str, str | None] = {}
        for key in self.keys:
            parts = key.split(".")
            for i in range(1, len(parts) - 1):
                suffix = ".".join(parts[i:])
                self._by_suffix[suffix] = None if suffix in self._by_suffix else key

    def __call__(self, name: str) -> str | None:
        if name in self.keys:
            return name
        p = self.prefix
        if p and name.startswith(p + ".") and name[len(p) + 1:] in self.keys:
            return name[len(p) + 1:]
        if p and f"{p}.{name}" in self.keys:
            return f"{p}.{name}"
        if self._by_suffix.get(name):       # the key has an extra leading prefix
            return self._by_suffix[name]
        parts = name.split(".")
        for i in (1, 2):                    # the name has one or two extra leading components
            suffix = ".".join(parts[i:])
            if len(parts) - i >= 2 and suffix in self.keys:
                return suffix
        return None


def _plan_layers(resolved: ResolvedModel, ckpt: _Checkpoint,
                 warn: Warn) -> tuple[list[tuple[str, str, bool]], dict[str, str]]:
    """The analysable modules in model order, as (longname, layer_type, transposed), and the
    checkpoint key of each. Tied modules map to the same key."""
    _check_index_complete(resolved, ckpt)
    config = _load_config(resolved, warn)
    model = None
    if config is not None:
        try:
            model = _build_model(config, resolved.trust_remote_code, meta=True)
        except Exception as exc:  # noqa: BLE001
            warn(f"{resolved.model_id}: transformers cannot build {getattr(config, 'architectures', None)} "
                 f"({str(exc)[:200]}); layers found by the name/shape rule")
    weight_keys = {k: s for k, s in ckpt.shapes.items()}
    modules: list[tuple[str, str, bool]] = []
    keys: dict[str, str] = {}
    claimed: set[str] = set()
    if model is not None:
        match = _KeyMatcher(weight_keys, getattr(model, "base_model_prefix", "") or "")
        missing = []
        for name, param in model.named_parameters(remove_duplicate=False):
            key = match(name)
            if key is not None:
                claimed.add(key)
        key_of_param: dict[int, str] = {}   # tied modules share one Parameter
        for name, module in model.named_modules(remove_duplicate=False):
            kind = _module_layer_type(module)
            if kind is None or getattr(module, "weight", None) is None:
                continue
            own_key = match(f"{name}.weight")
            key = key_of_param.get(id(module.weight)) or own_key
            if own_key is not None and key != own_key and not _same_values(ckpt, key, own_key):
                # Tied in the config, but the checkpoint holds two different copies:
                # transformers unties them on loading, so both are layers of the model.
                warn(f"{resolved.model_id}: {name} is tied to {key} in the config but the "
                     f"checkpoint holds a different {own_key}; both are analysed")
                key = own_key
            if key is None:
                key = _tied_source_key(model, name, match)
            if key is not None:
                key_of_param.setdefault(id(module.weight), key)
            if key is None:
                missing.append(name)
                continue
            modules.append((name, kind[0], kind[1]))
            keys[name] = key
            claimed.add(key)
        if missing:
            warn(f"{resolved.model_id}: {len(missing)} module(s) not in the checkpoint, skipped "
                 f"(transformers would initialise them randomly): {', '.join(missing[:5])}")
        del model
    leftovers = [k for k, s in weight_keys.items() if k not in claimed and k.endswith(".weight")
                 and _rule_layer_type(k, len(s))]
    if leftovers and modules:
        warn(f"{resolved.model_id}: {len(leftovers)} checkpoint weight(s) outside the model "
             f"skeleton, analysed by the name/shape rule: {', '.join(leftovers[:5])}")
    for key in sorted(leftovers, key=_natural_key):
        name = key[: -len(".weight")]
        modules.append((name, _rule_layer_type(key, len(weight_keys[key])), False))
        keys[name] = key
    not_float = [keys[name] for name, _, _ in modules if not ckpt.floating.get(keys[name], True)]
    if not_float:
        raise ESDFailure("load", "quantized_unsupported", f"{resolved.model_id}: integer/bool "
                         f"layer weights ({', '.join(not_float[:3])}): a quantized checkpoint "
                         "without quantization_config? Its spectra are not those of the model")
    if not modules:
        if resolved.needs_remote_code:
            raise ESDFailure("load", "trust_remote_code_required", f"{resolved.model_id}: custom "
                             "architecture and the name/shape rule finds no layer; rerun with "
                             "trust_remote_code")
        raise ESDFailure("load", "no_weights", f"{resolved.model_id}: no analysable weight "
                         "(2-D/3-D/4-D `*.weight`) in the checkpoint")
    return modules, keys


def _check_index_complete(resolved: ResolvedModel, ckpt: _Checkpoint) -> None:
    """A sharded checkpoint's shards must hold every tensor its index names: a stale or
    wrong shard would otherwise drop layers with only a warning."""
    files = resolved.weight_files
    if not files:
        return
    index = files[0].parent / (SAFETENSORS_INDEX if files[0].suffix == ".safetensors"
                               else BIN_INDEX)
    if not index.is_file():
        return
    absent = sorted(k for k in (_read_json(index).get("weight_map") or {})
                    if _normalise_key(k) not in ckpt.shapes)
    if absent:
        raise ESDFailure("load", "corrupt_file", f"{index}: {len(absent)} tensor(s) it names are "
                         f"in none of its shards: {', '.join(absent[:3])}")


def _same_values(ckpt: _Checkpoint, key: str, other: str) -> bool:
    """Whether two checkpoint tensors hold the same values (two copies of a tied weight)."""
    if ckpt.shapes[key] != ckpt.shapes[other]:
        return False
    return torch.equal(ckpt.tensor(key), ckpt.tensor(other))


def _tied_source_key(model: nn.Module, name: str, match: _KeyMatcher) -> str | None:
    """For a module whose weight is tied to another parameter (lm_head ↔ embeddings), the
    checkpoint key of the parameter it shares its tensor with."""
    weight = model.get_submodule(name).weight
    for other, param in model.named_parameters(remove_duplicate=False):
        if param is weight and other != f"{name}.weight":
            key = match(other)
            if key is not None:
                return key
    return None


def _natural_key(text: str):
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", text)]


# --------------------------------------------------------------------------- adapters

# Config fields that make an adapter something the streaming LoRA merge does not cover.
_PEFT_ONLY_FIELDS = ("use_dora", "lora_bias", "target_parameters", "layer_replication",
                     "trainable_token_indices", "alora_invocation_tokens", "use_bdlora",
                     "monteclora_config", "velora_config", "arrow_config", "use_qalora")
_LORA_KEY = re.compile(r"^(?P<module>.+)\.(?P<part>lora_A\.weight|lora_B\.weight|"
                       r"lora_embedding_A|lora_embedding_B)$")


@dataclass
class _LoraUpdate:
    """ΔW = B @ A · scaling, shaped like the base weight (transposed for Conv1D/Embedding)."""
    module: str          # adapter module name (as peft saw it)
    a_key: str
    b_key: str
    scaling: float
    transpose: bool      # delta = (B @ A)ᵀ


def _pattern_key(pattern_keys, key: str) -> str:
    try:  # peft's own rule for rank_pattern / alpha_pattern keys
        from peft.utils.other import get_pattern_key
        return get_pattern_key(list(pattern_keys), key)
    except ImportError:
        for pattern in pattern_keys:
            if re.match(rf"(.*\.)?({pattern})$", key):
                return pattern
        return key


def _lora_scaling(cfg: dict, module: str) -> tuple[int, float]:
    """(r, scaling) of one module, as peft's LoraModel._create_and_replace picks them (a
    missing `r` / `lora_alpha` is peft's default 8). A value peft could not use (null, text,
    r ≤ 0, a pattern that is not a mapping) is a broken adapter_config.json."""
    def broken(what: str) -> ESDFailure:
        return ESDFailure("merge", "corrupt_file", f"{ADAPTER_CONFIG_FILE}: {what} (module "
                          f"{module})")

    rank_pattern = cfg.get("rank_pattern") or {}
    alpha_pattern = cfg.get("alpha_pattern") or {}
    for field_name, pattern in (("rank_pattern", rank_pattern), ("alpha_pattern", alpha_pattern)):
        if not isinstance(pattern, dict):
            raise broken(f"{field_name} must be a mapping, got {pattern!r}")
    r = rank_pattern.get(_pattern_key(rank_pattern.keys(), module), cfg.get("r", 8))
    alpha = alpha_pattern.get(_pattern_key(alpha_pattern.keys(), module), cfg.get("lora_alpha", 8))
    if isinstance(r, bool) or not isinstance(r, int) or r <= 0:
        raise broken(f"r must be a positive integer, got {r!r}")
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not math.isfinite(alpha):
        raise broken(f"lora_alpha must be a number, got {alpha!r}")
    scaling = alpha / math.sqrt(r) if cfg.get("use_rslora") else alpha / r
    return int(r), float(scaling)


def _streaming_unsupported(cfg: dict, adapter: _Checkpoint) -> str | None:
    """Why this adapter cannot be merged by the streaming LoRA merge (None if it can)."""
    if str(cfg.get("peft_type", "")).upper() != "LORA":
        return f"peft_type {cfg.get('peft_type')}"
    for name in _PEFT_ONLY_FIELDS:
        if cfg.get(name):
            return f"{name}={cfg.get(name)!r}"
    for key, shape in adapter.shapes.items():
        m = _LORA_KEY.match(key)
        if m and len(shape) != 2:
            return f"LoRA on a convolution ({key}: {list(shape)})"
        if not m and ".lora_" in key:
            return f"adapter tensor {key}"
    return None


def _adapter_module(key: str) -> str:
    for prefix in ("base_model.model.", "base_model."):
        if key.startswith(prefix):
            return key[len(prefix):]
    return key


def _plan_adapter(resolved: ResolvedModel, adapter: _Checkpoint, modules, keys, base: _Checkpoint,
                  warn: Warn):
    """Check every adapter tensor against the base (names, shapes, ranks) before anything is
    merged. Returns the LoRA updates by base checkpoint key, the modules_to_save replacements
    by longname, and saved base weights (`…base_layer.weight`) by base checkpoint key (the
    last two as adapter keys of the full weight)."""
    cfg = resolved.adapter_config or {}
    kinds = {name: (kind, transposed) for name, kind, transposed in modules}
    # A LoRA/modules_to_save name may use another prefix than the base skeleton.
    by_name = _KeyMatcher([f"{n}.weight" for n in kinds])
    pairs: dict[str, dict[str, str]] = {}
    saved: dict[str, str] = {}
    for key in adapter.shapes:
        m = _LORA_KEY.match(_adapter_module(key))
        if m:
            pairs.setdefault(m["module"], {})[m["part"]] = key
        elif key.endswith(".weight"):
            saved[_adapter_module(key)[: -len(".weight")]] = key
        elif not key.endswith(".bias"):
            raise ESDFailure("merge", "adapter_unsupported", f"{resolved.model_id}: unknown "
                             f"adapter tensor {key!r}")
    if not pairs and not saved:
        raise ESDFailure("merge", "adapter_mismatch", f"{resolved.model_id}: the adapter file "
                         "holds no LoRA weights")
    updates: dict[str, list[_LoraUpdate]] = {}
    problems: list[str] = []
    for module, parts in sorted(pairs.items()):
        name = (by_name(f"{module}.weight") or "")[: -len(".weight")]
        if name not in kinds:
            problems.append(f"{module}: no such layer in the base")
            continue
        kind, transposed = kinds[name]
        embedding = "lora_embedding_A" in parts or "lora_embedding_B" in parts
        a_key = parts.get("lora_embedding_A" if embedding else "lora_A.weight")
        b_key = parts.get("lora_embedding_B" if embedding else "lora_B.weight")
        if a_key is None or b_key is None:
            problems.append(f"{module}: lora_A or lora_B missing")
            continue
        if (kind == "embedding") != embedding or kind not in ("linear", "embedding"):
            problems.append(f"{module}: {'embedding ' if embedding else ''}LoRA on a {kind} layer")
            continue
        a_shape, b_shape = adapter.shapes[a_key], adapter.shapes[b_key]   # A (r, in), B (out, r)
        base_shape = base.shapes[keys[name]]
        r, scaling = _lora_scaling(cfg, module)
        delta_shape = (b_shape[0], a_shape[1])
        transpose = embedding or transposed        # delta (out, in) vs stored (in, out)
        if (not transpose and cfg.get("fan_in_fan_out") and delta_shape != tuple(base_shape)
                and delta_shape == tuple(reversed(base_shape))):
            transpose = True    # base typed by the name/shape rule: a Conv1D stored (in, out)
        want = tuple(reversed(base_shape)) if transpose else tuple(base_shape)
        if a_shape[0] != b_shape[1] or a_shape[0] != r:
            problems.append(f"{module}: rank mismatch A {list(a_shape)}, B {list(b_shape)}, "
                            f"config r={r}" + ("" if "r" in cfg else
                                               " (peft's default: adapter_config.json has no r)"))
        elif delta_shape != want:
            problems.append(f"{module}: B@A is {list(delta_shape)} but the base weight "
                            f"{keys[name]} is {list(base_shape)}")
        else:
            updates.setdefault(keys[name], []).append(
                _LoraUpdate(module, a_key, b_key, scaling, transpose))
    replacements: dict[str, str] = {}
    overrides: dict[str, str] = {}
    for module, key in sorted(saved.items()):
        if module.endswith(".base_layer"):
            # peft's save_embedding_layers: the (possibly resized) base weight itself, which
            # peft loads into the base before merging the LoRA update on top.
            module = module[: -len(".base_layer")]
            name = (by_name(f"{module}.weight") or "")[: -len(".weight")]
            if name not in kinds or adapter.shapes[key] != base.shapes[keys[name]]:
                problems.append(f"{module}: saved base weight {list(adapter.shapes[key])} does "
                                "not fit the base" + (f" {list(base.shapes[keys[name]])}"
                                                      if name in kinds else ""))
            else:
                overrides[keys[name]] = key
            continue
        name = (by_name(f"{module}.weight") or "")[: -len(".weight")]
        if name not in kinds:
            # A head the base class lacks (e.g. a classifier): analysed as an extra layer.
            if _rule_layer_type(key, len(adapter.shapes[key])) is None:
                continue
            warn(f"{resolved.model_id}: modules_to_save {module!r} is not a layer of the base; "
                 "analysed as an additional layer")
            replacements[module] = key
            continue
        if adapter.shapes[key] != base.shapes[keys[name]]:
            problems.append(f"{module}: saved weight {list(adapter.shapes[key])} vs base "
                            f"{list(base.shapes[keys[name]])}")
            continue
        replacements[name] = key
    if problems:
        raise ESDFailure("merge", "adapter_mismatch", f"{resolved.model_id} does not fit base "
                         f"{resolved.source_model}: " + "; ".join(problems[:5]) +
                         (f"; … ({len(problems)} problems)" if len(problems) > 5 else ""))
    return updates, replacements, overrides


def _apply_updates(weight: torch.Tensor, updates: list[_LoraUpdate],
                   adapter: _Checkpoint) -> torch.Tensor:
    """W += (B @ A)·s in place, as peft's merge (transposed for Conv1D / Embedding)."""
    for up in updates:
        a, b = adapter.tensor(up.a_key), adapter.tensor(up.b_key)  # (r, in), (out, r)
        delta = (b @ a) * up.scaling
        weight += delta.T if up.transpose else delta
        del a, b, delta
    return weight


# --------------------------------------------------------------------------- streaming

def iter_layers(resolved: ResolvedModel, *,
                warn: Warn | None = None) -> Iterator[tuple[str, str, torch.Tensor]]:
    """Yield `(longname, layer_type, tensor)` one layer at a time; `tensor` is a float32 CPU
    tensor the caller owns. Adapters are merged into their base on the way."""
    warn = warn or resolved.warn
    if resolved.is_adapter:
        yield from _iter_adapter_layers(resolved, warn)
        return
    ckpt = _Checkpoint(resolved.weight_files)
    try:
        modules, keys = _plan_layers(resolved, ckpt, warn)
        done: set[str] = set()
        for name, kind, _ in modules:
            if keys[name] in done:
                continue            # tied to an earlier module: analysed once
            done.add(keys[name])
            tensor = ckpt.tensor(keys[name])
            yield name, kind, tensor
            del tensor
    finally:
        ckpt.close()


def _iter_adapter_layers(resolved: ResolvedModel, warn: Warn):
    adapter = _Checkpoint(resolved.weight_files)
    base_ckpt = None
    try:
        reason = _streaming_unsupported(resolved.adapter_config or {}, adapter)
        if reason is not None:
            adapter.close()
            warn(f"{resolved.model_id}: {reason}: merged by peft on a full float32 CPU copy of "
                 f"the base (memory: the whole model)")
            yield from _merge_with_peft(resolved, warn)
            return
        base = resolved.base
        base_ckpt = _Checkpoint(base.weight_files)
        modules, keys = _plan_layers(base, base_ckpt, warn)
        updates, replacements, overrides = _plan_adapter(resolved, adapter, modules, keys,
                                                         base_ckpt, warn)
        done: set[str] = set()
        for name, kind, _ in modules:
            if name in replacements:     # modules_to_save: the adapter's full weight
                tensor = adapter.tensor(replacements.pop(name))
            elif keys[name] in done:
                continue
            else:
                done.add(keys[name])
                key = keys[name]
                weight = adapter.tensor(overrides[key]) if key in overrides \
                    else base_ckpt.tensor(key)
                tensor = _apply_updates(weight, updates.get(key, []), adapter)
                del weight
            yield name, kind, tensor
            del tensor
        for name, key in replacements.items():   # saved heads the base class lacks
            tensor = adapter.tensor(key)
            kind = _rule_layer_type(key, tensor.ndim)
            if kind:
                yield name, kind, tensor
            del tensor
    finally:
        adapter.close()
        if base_ckpt is not None:
            base_ckpt.close()


def _merge_with_peft(resolved: ResolvedModel, warn: Warn):
    """Adapters the streaming merge does not cover (DoRA, lora_bias, conv LoRA, IA3, LoHa,
    LoKr, AdaLoRA, …): peft merges them itself. The base is built on CPU in float32 and
    filled from its checkpoint, `PeftModel.from_pretrained(...).merge_and_unload()`, then its
    layers are yielded. Memory: the whole model in float32."""
    base = resolved.base
    config = _load_config(base, warn)
    if config is None:
        raise ESDFailure("merge", "adapter_unsupported", f"{resolved.model_id}: needs peft's own "
                         f"merge, which needs a transformers config for base {base.model_id}")
    try:
        model = _build_model(config, base.trust_remote_code, meta=False)
    except Exception as exc:  # noqa: BLE001
        raise ESDFailure("merge", "adapter_unsupported", f"{resolved.model_id}: cannot build base "
                         f"{base.model_id} for peft's merge: {str(exc)[:300]}") from None
    ckpt = _Checkpoint(base.weight_files)
    try:
        match = _KeyMatcher(ckpt.shapes, getattr(model, "base_model_prefix", "") or "")
        with torch.no_grad():
            for name, param in model.state_dict(keep_vars=True).items():
                key = match(name)
                if key is not None and tuple(ckpt.shapes[key]) == tuple(param.shape):
                    param.copy_(ckpt.tensor(key))
    finally:
        ckpt.close()
    try:
        from peft import PeftModel
        merged = PeftModel.from_pretrained(model, str(resolved.local_dir)).merge_and_unload()
    except ESDFailure:
        raise
    except Exception as exc:  # noqa: BLE001 - size mismatches, unsupported configs
        reason = "adapter_mismatch" if "size mismatch" in str(exc) else "adapter_unsupported"
        raise ESDFailure("merge", reason, f"{resolved.model_id}: peft cannot merge it into "
                         f"{base.model_id}: {type(exc).__name__}: {str(exc)[:300]}") from None
    del model
    seen: set[int] = set()
    for name, module in list(merged.named_modules()):
        kind = _module_layer_type(module)
        weight = getattr(module, "weight", None)
        if kind is None or weight is None or id(weight) in seen:
            continue
        seen.add(id(weight))
        yield name, kind[0], weight.detach().to(torch.float32)
