"""The huggingface_hub side of loading: hub ids, the cache, downloads, offline snapshots.

Owns: where the hub cache is (argument, `HF_HUB_CACHE`, `HF_HOME`, the hub default — read at
call time), which files of a repo are downloaded (`download_patterns`), getting a snapshot
directory for `repo_id@revision` (`download_snapshot`; the local cache only when
`HF_HUB_OFFLINE=1`, and as a fallback when the hub is unreachable), mapping every hub or
network exception to a typed `ESDFailure("resolve", …)` (`hub_failure`), and placing a local
directory into the cache in the hub's own layout (`install_into_hub_cache`).

Must not: read weights, plan layers or know about adapters beyond their file names. The token
(`HF_TOKEN`) is read by huggingface_hub itself and never appears in a message.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from pathlib import Path

from esd.atomic_files import atomic_path, write_text_atomic
from esd.failures import ESDFailure
from esd.loading.resolved import ADAPTER_CONFIG_FILE, ADAPTER_WEIGHT_FILES, CONFIG_FILE

HUB_ID = re.compile(r"^[A-Za-z0-9][\w.\-]*(/[\w.\-]+)?$")
_COMMIT = re.compile(r"^[0-9a-f]{40}$")


def looks_like_hub_id(model_id: str) -> bool:
    """`name` or `org/name` in the hub's character set (no `..`, no trailing `.`/`-`)."""
    return bool(HUB_ID.match(model_id)) and ".." not in model_id \
        and not model_id.endswith((".", "-"))


def _env_true(name: str) -> bool:
    return os.environ.get(name, "").strip().upper() in {"1", "ON", "YES", "TRUE"}


def hub_offline() -> bool:
    """HF_HUB_OFFLINE read now (huggingface_hub reads it once, at import)."""
    from huggingface_hub import constants
    return _env_true("HF_HUB_OFFLINE") or bool(constants.HF_HUB_OFFLINE)


def hub_cache_dir(cache_dir: str | os.PathLike | None = None) -> Path:
    """The hub cache: argument, else HF_HUB_CACHE / HF_HOME read now, else the hub default."""
    if cache_dir:
        return Path(cache_dir)
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"])
    if os.environ.get("HF_HOME"):
        return Path(os.environ["HF_HOME"]) / "hub"
    from huggingface_hub import constants
    return Path(constants.HF_HUB_CACHE)


def repo_folder(cache: Path, repo_id: str) -> Path:
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
    storage = repo_folder(hub_cache_dir(cache_dir), repo_id)
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


def hub_failure(exc: BaseException, repo_id: str, revision: str | None) -> ESDFailure:
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


def download_patterns(repo_files: list[str], trust_remote_code: bool) -> list[str]:
    """Only the files needed: configs, then adapter weights, or safetensors, or .bin."""
    patterns = ["*config.json", "modules.json"]
    if trust_remote_code:
        patterns.append("*.py")
    if ADAPTER_CONFIG_FILE in repo_files:
        return patterns + list(ADAPTER_WEIGHT_FILES)
    if any(f.endswith(".safetensors") for f in repo_files):
        return patterns + ["*.safetensors", "*.safetensors.index.json"]
    return patterns + ["*.bin", "*.bin.index.json", "*.pt", "*.pth"]


def offline_snapshot(repo_id: str, revision: str, cache: Path) -> Path:
    from huggingface_hub import snapshot_download, errors
    try:
        # Only files every download fetches, so a partial (pattern-filtered) snapshot counts.
        return Path(snapshot_download(repo_id, revision=revision, cache_dir=cache,
                                      local_files_only=True,
                                      allow_patterns=[CONFIG_FILE, ADAPTER_CONFIG_FILE]))
    except errors.LocalEntryNotFoundError:
        if repo_folder(cache, repo_id).is_dir():
            raise ESDFailure("resolve", "revision_not_found",
                             f"{repo_id}: revision {revision!r} is not in the local cache "
                             f"{cache} (offline: HF_HUB_OFFLINE=1)") from None
        raise ESDFailure("resolve", "repo_not_found",
                         f"{repo_id}@{revision} was looked up in the local cache {cache} "
                         "only (offline: HF_HUB_OFFLINE=1) and is not there") from None
    except Exception as exc:  # noqa: BLE001 - every hub error becomes a typed failure
        failure = hub_failure(exc, repo_id, revision)
        failure.retryable = False  # offline: retrying cannot fetch anything
        raise failure from None


def download_snapshot(repo_id: str, revision: str, cache: Path,
                       trust_remote_code: bool) -> Path:
    """The snapshot directory of `repo_id@revision`: from the cache when offline, else
    downloading only the needed files (HF_TOKEN is read by huggingface_hub itself)."""
    if hub_offline():
        return offline_snapshot(repo_id, revision, cache)
    from huggingface_hub import HfApi, snapshot_download
    try:
        repo_files = HfApi().list_repo_files(repo_id, revision=revision)
        patterns = download_patterns(repo_files, trust_remote_code)
        return Path(snapshot_download(repo_id, revision=revision, cache_dir=cache,
                                      allow_patterns=patterns))
    except Exception as exc:  # noqa: BLE001 - every hub error becomes a typed failure
        failure = hub_failure(exc, repo_id, revision)
    if failure.reason in ("network_error", "hub_unavailable"):
        try:  # hub unreachable: a cached snapshot still serves, as huggingface_hub does
            return offline_snapshot(repo_id, revision, cache)
        except ESDFailure:
            pass
    raise failure
