"""The huggingface_hub side of loading: hub ids, the cache, downloads, offline snapshots,
bounded disk and streaming.

Owns: where the hub cache is (argument, `HF_HUB_CACHE`, `HF_HOME`, the hub default — read at
call time), which files of a repo are downloaded (`needed_files`: configs and the weights
the loader will read — never `.bin` beside safetensors, optimizer states, gguf/onnx/flax/tf
duplicates or subfolder copies), getting a snapshot directory for `repo_id@revision`
(`download_snapshot`: the revision is pinned to one commit first and every later request
names that commit; the local cache only when `HF_HUB_OFFLINE=1`, and at once — no retries —
when the hub cannot be reached and the cache has it), mapping every hub or network
exception to a typed `ESDFailure("resolve", …)` (`hub_failure`), placing a local directory
into the cache in the hub's own layout (`install_into_hub_cache`).

The worker's hub session (`hub_session`): with `--disk_budget` every download is recorded
in the run's ledger before it starts and deleted after the model's CSV is written
(`esd/disk_budget.py`); with `--stream` safetensors weights are not downloaded at all: the
snapshot holds the small files and `open_weights` reads the weights by HTTP ranges
(`esd/loading/stream.py`). `.bin`-only repos fall back to a bounded download, with a warning.

Must not: read weights itself, plan layers or know about adapters beyond their file names.
The token (`HF_TOKEN`) is read by huggingface_hub and never appears in a message.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

from esd.atomic_files import atomic_path, write_text_atomic
from esd.failures import ESDFailure
from esd.loading.resolved import (ADAPTER_CONFIG_FILE, ADAPTER_WEIGHT_FILES, BIN_INDEX,
                                  CONFIG_FILE, SAFETENSORS_INDEX)
from esd.loading.log import logger as log

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


# --------------------------------------------------------------------------- online

_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")
_NOT_WEIGHTS = re.compile(r"(optimizer|scheduler|rng_state|training_args|scaler|trainer_state)",
                          re.IGNORECASE)
_CLIENT_CLOSED = "client has been closed"


def hub_retries() -> int:
    """Tries of one hub request (`ESD_HUB_RETRIES`, default 5), here and in streaming."""
    return max(1, int(os.environ.get("ESD_HUB_RETRIES", "5")))


def hub_backoff_s() -> float:
    """First wait between tries (`ESD_HUB_BACKOFF_S`, default 1 s), doubling."""
    return float(os.environ.get("ESD_HUB_BACKOFF_S", "1"))


def _status(exc: BaseException) -> int | None:
    return getattr(getattr(exc, "response", None), "status_code", None)


class HubUnreachable(Exception):
    """The hub did not answer at all (connection refused, DNS, timeout)."""


def _unreachable_errors() -> tuple[type, ...]:
    import httpx2
    return (httpx2.ConnectError, httpx2.TimeoutException, ConnectionRefusedError)


def _offline_hint(repo_id: str, cache: Path) -> str:
    from huggingface_hub import constants
    return (f"the hub ({constants.ENDPOINT}) cannot be reached and {repo_id} is not in the local "
            f"cache {cache}; on a machine without internet access set HF_HUB_OFFLINE=1 to use "
            "the local cache only")


def _api_call(call, name: str):
    """`call()` with backoff on 429 (honouring Retry-After), 5xx and dropped connections: the
    client retries those on downloads but not on /api calls. A hub that does not answer at
    all raises `HubUnreachable` at once (the cache may serve)."""
    from huggingface_hub import errors
    unreachable = _unreachable_errors()
    import httpx2
    delay, tries = hub_backoff_s(), hub_retries()
    for attempt in range(tries):
        wait = delay
        try:
            return call()
        except unreachable as exc:
            raise HubUnreachable(f"{type(exc).__name__}: {exc}") from exc
        except errors.HfHubHTTPError as exc:
            status = _status(exc)
            if status != 429 and (status is None or status < 500):
                raise
            last = exc
            retry_after = (getattr(exc.response, "headers", {}) or {}).get("retry-after", "")
            if status == 429 and str(retry_after).isdigit():
                wait = max(wait, float(retry_after))
        except (httpx2.TransportError, RuntimeError) as exc:
            if isinstance(exc, RuntimeError) and _CLIENT_CLOSED not in str(exc):
                raise
            last = exc
        if attempt + 1 < tries:
            log.warning("%s: hub answered %s; retrying in %.1fs (%d/%d)", name,
                        _status(last) or type(last).__name__, wait, attempt + 1, tries - 1)
            time.sleep(wait)
            delay *= 2
    raise last


def _rate_limited(name: str, tries: int) -> ESDFailure:
    return ESDFailure("resolve", "rate_limited", f"{name}: the hub answered 429 Too Many Requests "
                      f"{tries} times (its rate limits); retry later, or log in (HF_TOKEN) for "
                      "higher limits", retryable=True)


def _typed(exc: BaseException, repo_id: str, revision: str | None, cache: Path) -> ESDFailure:
    """`hub_failure` plus what only the online path knows: rate limits, a full disk, a
    gated repo with a token that has no access, the client-closed thread bug."""
    from huggingface_hub import errors
    from esd import diskfull
    name = f"{repo_id}@{revision}" if revision else repo_id
    if diskfull.is_disk_full(exc):
        return diskfull.disk_full_failure(getattr(exc, "filename", None) or cache, "resolve")
    if isinstance(exc, errors.HfHubHTTPError) and _status(exc) == 429:
        return _rate_limited(name, hub_retries())
    if isinstance(exc, errors.GatedRepoError) and _status(exc) == 403:
        return ESDFailure("resolve", "gated", f"{name} is gated and the token given (HF_TOKEN) "
                          "has no access: request access on the model's page", retryable=False)
    if isinstance(exc, errors.GatedRepoError):
        return ESDFailure("resolve", "gated", f"{name} is gated: request access on the hub and "
                          "set HF_TOKEN", retryable=False)
    if isinstance(exc, RuntimeError) and _CLIENT_CLOSED in str(exc):
        return ESDFailure("resolve", "network_error", f"{name}: the connection to the hub broke "
                          "during the download (huggingface_hub: client closed)", retryable=True)
    if isinstance(exc, errors.LocalEntryNotFoundError) and "429" in str(exc):
        return _rate_limited(name, 1)
    return hub_failure(exc, repo_id, revision)


@dataclass(frozen=True)
class HubListing:
    """One repo revision pinned to its commit, with every file's size (tree listing)."""
    repo_id: str
    commit: str
    sizes: dict[str, int]


def hub_listing(repo_id: str, revision: str) -> HubListing:
    """Pin `revision` to a commit (model info), then list the files at that commit."""
    from huggingface_hub import HfApi
    from huggingface_hub.hf_api import RepoFile
    api = HfApi()
    name = f"{repo_id}@{revision}"
    commit = _api_call(lambda: api.model_info(repo_id, revision=revision).sha, name)
    entries = _api_call(lambda: list(api.list_repo_tree(repo_id, revision=commit,
                                                        recursive=True)), name)
    sizes = {e.path: int(e.lfs.size if e.lfs is not None else e.size)
             for e in entries if isinstance(e, RepoFile)}
    return HubListing(repo_id, commit, sizes)


def _pick(names: list[str], found) -> list[str]:
    return sorted(n for n in names if found(n))


def weight_names(names) -> list[str]:
    """The weight files the loader would read, at the repo's top level, by the transformers
    preference order (as `checkpoint.weight_files_in`): safetensors shards, model.safetensors,
    other safetensors; else the same for .bin; else raw .pt/.pth state dicts."""
    top = [n for n in names if "/" not in n and not _NOT_WEIGHTS.search(n)
           and not n.startswith("adapter_model")]
    for index, single, suffix in ((SAFETENSORS_INDEX, "model.safetensors", ".safetensors"),
                                  (BIN_INDEX, "pytorch_model.bin", ".bin")):
        shards = _pick(top, lambda n: n.endswith(suffix))
        if index in top and shards:
            return [index] + shards
        if single in top:
            return [single]
        if shards:
            return shards
    return _pick(top, lambda n: n.endswith((".pt", ".pth")))


def needed_files(names, trust_remote_code: bool) -> list[str]:
    """What the loader reads of a repo: top-level configs (+ code if trusted), then the adapter
    files or the weights (`weight_names`)."""
    names = list(names)
    wanted = {n for n in names if "/" not in n and (n.endswith("config.json")
                                                    or n == "modules.json")}
    if trust_remote_code:
        wanted |= {n for n in names if "/" not in n and n.endswith(".py")}
    if ADAPTER_CONFIG_FILE in names:
        adapter = [n for n in ADAPTER_WEIGHT_FILES if n in names][:1]
        return sorted(wanted | set(adapter))
    return sorted(wanted | set(weight_names(names)))


def streamable(names) -> list[str]:
    """The weight files that would be streamed (safetensors, not index files)."""
    return [n for n in weight_names(names) if n.endswith(".safetensors")]


# --------------------------------------------------------------------------- the session

@dataclass
class HubSession:
    """How one worker uses the hub: who it is (the model key), the run's download ledger
    (None: downloads stay in the cache), the disk budget, whether weights are streamed."""
    user: str = ""
    ledger: object | None = None          # esd.disk_budget.DownloadLedger
    budget_bytes: int | None = None
    stream: bool = False
    remote: dict[Path, tuple[str, str, tuple[str, ...]]] = field(default_factory=dict)


# Process-wide, not a context variable: the estimator may read layers on another thread.
_ACTIVE: list[HubSession] = []
_DEFAULT = HubSession()


def current_session() -> HubSession:
    return _ACTIVE[-1] if _ACTIVE else _DEFAULT


@contextlib.contextmanager
def hub_session(output_dir: Path, user: str, disk_budget_gb: float | None = None,
                stream: bool = False, cache_dir: str | None = None):
    """The worker's hub session around resolving, analysing and saving one model. On a
    normal exit (the CSV written) and on a final failure, what this model downloaded and no
    other model needs is deleted; a retryable failure keeps it for the retry."""
    from esd.disk_budget import GB, DownloadLedger
    ledger = None
    if disk_budget_gb is not None or stream:
        ledger = DownloadLedger(Path(output_dir), hub_cache_dir(cache_dir))
    session = HubSession(user, ledger, int(disk_budget_gb * GB) if disk_budget_gb else None,
                         stream)
    _ACTIVE.append(session)
    try:
        yield session
    except ESDFailure as failure:
        if ledger is not None:
            ledger.release_all_holds()
            if not failure.retryable:
                ledger.release(user)
        raise
    except BaseException:
        if ledger is not None:
            ledger.release_all_holds()
        raise
    else:
        if ledger is not None:
            ledger.release_all_holds()
            ledger.release(user)
    finally:
        _ACTIVE.remove(session)


# --------------------------------------------------------------------------- snapshots

def _literal(name: str) -> str:
    """A file name as an fnmatch pattern matching only itself."""
    return re.sub(r"([*?\[])", r"[\1]", name)


def _use_cache_now(repo_id: str, revision: str, cache: Path, why: str) -> Path:
    """The hub does not answer: the cached snapshot, at once; else a retryable failure that
    suggests HF_HUB_OFFLINE=1."""
    try:
        snapshot = offline_snapshot(repo_id, revision, cache)
    except ESDFailure:
        raise ESDFailure("resolve", "network_error", f"{repo_id}@{revision}: "
                         f"{_offline_hint(repo_id, cache)} ({why})", retryable=True) from None
    log.warning("%s@%s: the hub cannot be reached (%s); using the cached snapshot %s "
                "(set HF_HUB_OFFLINE=1 to skip the hub)", repo_id, revision, why, snapshot.name)
    return snapshot


def download_snapshot(repo_id: str, revision: str, cache: Path,
                      trust_remote_code: bool) -> Path:
    """The snapshot directory of `repo_id@revision`: from the cache when offline, else
    downloading only the needed files of the pinned commit (streamed weights excepted)."""
    if hub_offline():
        return offline_snapshot(repo_id, revision, cache)
    session = current_session()
    try:
        listing = hub_listing(repo_id, revision)
    except HubUnreachable as exc:
        snapshot = _use_cache_now(repo_id, revision, cache, str(exc))
        if session.ledger is not None:
            session.ledger.hold(repo_id, snapshot.name)
        return snapshot
    except Exception as exc:  # noqa: BLE001 - every hub error becomes a typed failure
        raise _typed(exc, repo_id, revision, cache) from None
    files = needed_files(listing.sizes, trust_remote_code)
    streamed: list[str] = []
    if session.stream and ADAPTER_CONFIG_FILE not in listing.sizes:
        streamed = streamable(listing.sizes)
        if not streamed:
            log.warning("%s: no safetensors weights to stream (%s); downloading them instead, "
                        "deleted after the model is analysed", repo_id,
                        ", ".join(weight_names(listing.sizes)) or "no weights")
    from esd.disk_budget import cached_files, exceeded_failure
    have = cached_files(cache, repo_id, listing.commit)
    if streamed and all(n in have for n in streamed):
        streamed = []                      # all in the cache already: read the files
    fetch = [n for n in files if n not in streamed]
    new = {n: listing.sizes.get(n, 0) for n in fetch if n not in have}
    if session.budget_bytes is not None and sum(new.values()) > session.budget_bytes:
        biggest = max(new, key=new.get)
        raise exceeded_failure(f"{repo_id}@{revision}", sum(new.values()), session.budget_bytes,
                               f" ({len(new)} files, the largest {biggest} "
                               f"{new[biggest] / 1e9:.3f} GB)")
    if session.ledger is not None:
        session.ledger.before_download(repo_id, listing.commit, new, session.user)
        session.ledger.hold(repo_id, listing.commit)
    snapshot = _fetch(repo_id, revision, listing.commit, cache, fetch)
    _remember_ref(cache, repo_id, revision, listing.commit)
    if session.ledger is not None:
        session.ledger.downloaded(repo_id, listing.commit)
    if streamed:
        session.remote[snapshot] = (repo_id, listing.commit, tuple(streamed))
    return snapshot


def _remember_ref(cache: Path, repo_id: str, revision: str, commit: str) -> None:
    """`refs/<revision>` → commit, as huggingface_hub writes it when it resolves a branch
    itself (we download by commit, so it does not): the cache then serves `revision` when
    the hub cannot be reached."""
    if revision == commit:
        return
    ref = repo_folder(cache, repo_id) / "refs" / revision
    try:
        if ref.is_file() and ref.read_text().strip() == commit:
            return
        ref.parent.mkdir(parents=True, exist_ok=True)
        write_text_atomic(ref, commit)
    except OSError as exc:
        log.warning("%s: could not record refs/%s in the cache: %s", repo_id, revision, exc)


def _fetch(repo_id: str, revision: str, commit: str, cache: Path, files: list[str]) -> Path:
    from huggingface_hub import snapshot_download
    for attempt in (1, 2):
        try:
            return Path(snapshot_download(repo_id, revision=commit, cache_dir=cache,
                                          allow_patterns=[_literal(n) for n in files]))
        except RuntimeError as exc:
            # huggingface_hub bug: after a connection error in one download thread, the
            # others fail with "client has been closed". One more pass resumes the files.
            if _CLIENT_CLOSED in str(exc) and attempt == 1:
                log.warning("%s: download threads lost their connection; resuming", repo_id)
                continue
            raise _typed(exc, repo_id, revision, cache) from None
        except Exception as exc:  # noqa: BLE001 - every hub error becomes a typed failure
            failure = _typed(exc, repo_id, revision, cache)
            if failure.reason == "network_error" and "not in the local cache" in failure.message:
                failure.message += "; set HF_HUB_OFFLINE=1 if this machine has no internet access"
            raise failure from None
    raise AssertionError("unreachable")


# --------------------------------------------------------------------------- weights

def remote_weights(local_dir: Path) -> tuple[Path, list[Path]] | None:
    """(weights dir, weight file paths) of a snapshot whose weights are streamed (the paths
    do not exist on disk), else None."""
    remote = current_session().remote.get(Path(local_dir))
    if remote is None:
        return None
    return Path(local_dir), [Path(local_dir) / name for name in remote[2]]


def open_weights(files) -> "object":
    """The tensor source of `files`: streamed by HTTP ranges when they belong to a streamed
    snapshot, else read from disk (`FileCheckpoint`)."""
    from esd.loading.checkpoint import FileCheckpoint, normalise_key
    files = tuple(files)
    if files:
        remote = current_session().remote.get(files[0].parent)
        if remote is not None:
            from huggingface_hub import get_token
            from esd.loading.stream import RemoteFile, StreamedSafetensors
            repo_id, commit, _ = remote
            token = get_token()
            return StreamedSafetensors([RemoteFile(repo_id, commit, f.name, token=token)
                                        for f in files], normalise=normalise_key)
    return FileCheckpoint(files)


def plan_reads(source, keys) -> None:
    """Tell a streamed source the order tensors will be read (chunked, prefetched)."""
    plan = getattr(source, "plan", None)
    if plan is not None:
        plan(list(keys))
