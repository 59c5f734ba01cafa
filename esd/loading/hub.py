"""The hub side of loading: hub ids, revisions, the cache, listings, downloads, offline
snapshots.

Owns: where the hub cache is (argument, `HF_HUB_CACHE`, `HF_HOME`, the hub default — read at
call time) and its layout (`repo_folder`, `cached_files`, `install_into_hub_cache`); which
revisions and commits may name a path (`check_revision`, `check_commit`: checked before any
path is built from them); the listing of a revision pinned to its commit (`hub_listing`);
which files of a repo are downloaded (`needed_files`: configs and the weights `formats.py`
would read — never `.bin` beside safetensors, optimizer states, gguf/onnx/flax/tf duplicates
or subfolder copies); getting a snapshot directory for `repo_id@revision`
(`download_snapshot`: every request after the pin names the commit; the local cache only
when `HF_HUB_OFFLINE=1`, and at once — no retries — when the hub cannot be reached and the
cache has it). Requests, retries and the mapping of failures are `hub_http.py`'s.

The worker's hub session (`hub_session`): the worker passes in its download ledger (under
`--disk_budget` or `--stream`: `esd/disk_budget.py`), which records every download before it
starts, refuses one larger than the budget and deletes it after the model's CSV is written;
with `--stream` safetensors weights are not downloaded at all: the snapshot holds the small
files and its weight files are `formats.HubFile`s, read by HTTP ranges (`stream.py`).
`.bin`-only repos fall back to a bounded download, with a warning.

Must not: import the disk budget (it is passed in), read weights, plan layers or know about
adapters beyond their file names. The token (`HF_TOKEN`) is read by huggingface_hub and
never appears in a message.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import threading
import time
import urllib.parse
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from esd.hub_cache import hub_cache_dir, offline_in
from esd.atomic_files import atomic_path, write_text_atomic
from esd.failures import ESDFailure
from esd.loading.formats import HubFile, streamable, weight_names
from esd.loading.hub_http import (CLIENT_CLOSED, HubUnreachable, endpoint, hub_failure, hub_json,
                                  hub_json_pages, offline_hint)
from esd.loading.log import logger as log
from esd.loading.resolved import ADAPTER_CONFIG_FILE, ADAPTER_WEIGHT_FILES, CONFIG_FILE

__all__ = ["HubListing", "HubSession", "cached_files", "download_snapshot", "hub_cache_dir",
           "hub_failure", "hub_listing", "hub_session", "install_into_hub_cache",
           "looks_like_hub_id", "needed_files", "remote_weights", "streamable", "weight_names"]

HUB_ID = re.compile(r"^[A-Za-z0-9][\w.\-]*(/[\w.\-]+)?$")
_COMMIT = re.compile(r"^[0-9a-f]{40}$")


def looks_like_hub_id(model_id: str) -> bool:
    """`name` or `org/name` in the hub's character set (no `..`, no trailing `.`/`-`)."""
    return bool(HUB_ID.match(model_id)) and ".." not in model_id \
        and not model_id.endswith((".", "-"))


def hub_offline() -> bool:
    """HF_HUB_OFFLINE read now (huggingface_hub reads it once, at import)."""
    from huggingface_hub import constants
    return offline_in(os.environ) or bool(constants.HF_HUB_OFFLINE)


def repo_folder(cache: Path, repo_id: str) -> Path:
    return Path(cache) / ("models--" + repo_id.replace("/", "--"))


def cached_files(cache: Path, repo_id: str, commit: str) -> set[str]:
    """Files of `repo_id@commit` already in the cache snapshot."""
    snapshot = repo_folder(cache, repo_id) / "snapshots" / check_commit(commit, repo_id)
    if not snapshot.is_dir():
        return set()
    return {p.relative_to(snapshot).as_posix() for p in snapshot.rglob("*")
            if p.is_file() or p.is_symlink() and p.exists()}


def check_revision(repo_id: str, revision: str) -> str:
    """`revision` if it cannot name a path outside `refs/` (a branch, tag, `refs/pr/1` or a
    commit), else an `invalid_id` failure, before any path is built from it."""
    parts = revision.split("/") if isinstance(revision, str) else [""]
    if not revision or revision.startswith("/") or "\\" in revision \
            or any(p in ("", ".", "..") for p in parts) \
            or not all(c.isprintable() and not c.isspace() for c in revision):
        raise ESDFailure("resolve", "invalid_id", f"{repo_id}@{revision!r}: not a valid revision "
                         "(a branch, tag or commit; no '..', leading '/', backslash or empty "
                         "path component)", retryable=False)
    return revision


def check_commit(commit: str, repo_id: str) -> str:
    """`commit` if it is 40 hex digits (what the Hub answers), else a `bad_hub_response`."""
    if not isinstance(commit, str) or not _COMMIT.match(commit):
        raise ESDFailure("resolve", "bad_hub_response", f"{repo_id}: the hub answered the "
                         f"commit {str(commit)[:60]!r}, not 40 hex digits", retryable=False)
    return commit


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
    check_revision(repo_id, revision)
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
    check_revision(repo_id, revision)
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
        failure = hub_failure(exc, repo_id, revision, cache=cache)
        failure.retryable = False  # offline: retrying cannot fetch anything
        raise failure from None


# --------------------------------------------------------------------------- listing

@dataclass(frozen=True)
class HubListing:
    """One repo revision pinned to its commit, with every file's size (tree listing)."""
    repo_id: str
    commit: str
    sizes: dict[str, int]


def hub_listing(repo_id: str, revision: str) -> HubListing:
    """Pin `revision` to a commit (model info), then list the files at that commit (tree
    pages followed on the Hub only). Raises `HubUnreachable`, huggingface_hub's typed errors
    or an `ESDFailure` (a bad revision, a commit that is not 40 hex digits, a bad listing)."""
    check_revision(repo_id, revision)
    quoted = urllib.parse.quote(revision, safe="")
    info = hub_json(f"{endpoint()}/api/models/{repo_id}/revision/{quoted}")
    commit = check_commit(info.get("sha") if isinstance(info, dict) else None, repo_id)
    entries = hub_json_pages(f"{endpoint()}/api/models/{repo_id}/tree/{commit}",
                             {"recursive": "true", "expand": "false"})
    sizes = {}
    for e in entries:
        if isinstance(e, dict) and e.get("type") == "file" and isinstance(e.get("path"), str):
            lfs = e.get("lfs") if isinstance(e.get("lfs"), dict) else {}
            sizes[e["path"]] = int(lfs.get("size", e.get("size", 0)) or 0)
    return HubListing(repo_id, commit, sizes)


def needed_files(names, trust_remote_code: bool) -> list[str]:
    """What the loader reads of a repo: top-level configs (+ code if trusted), then the adapter
    files or the weights (`formats.weight_names`)."""
    names = list(names)
    wanted = {n for n in names if "/" not in n and (n.endswith("config.json")
                                                    or n == "modules.json")}
    if trust_remote_code:
        wanted |= {n for n in names if "/" not in n and n.endswith(".py")}
    if ADAPTER_CONFIG_FILE in names:
        adapter = [n for n in ADAPTER_WEIGHT_FILES if n in names][:1]
        return sorted(wanted | set(adapter))
    return sorted(wanted | set(weight_names(names)))


# --------------------------------------------------------------------------- the session

@dataclass
class HubSession:
    """How one worker uses the hub: who it is (the model key), the run's download ledger
    (None: downloads stay in the cache; it refuses a download larger than the budget), and
    whether weights are streamed; `report(verb, repo_id, bytes so far, total bytes)` is told
    how far a download or stream is. `remote`: snapshot dir → (repo, commit, streamed files);
    `waited_s`: seconds spent downloading files or blocked on streamed bytes (the model's
    slot waiting for bytes)."""
    user: str = ""
    ledger: object | None = None          # esd.disk_budget.DownloadLedger, given by the worker
    stream: bool = False
    report: Callable[[str, str, int, int | None], None] | None = None
    remote: dict[Path, tuple[str, str, tuple[str, ...]]] = field(default_factory=dict)
    waited_s: float = 0.0

    def add_wait(self, seconds: float) -> None:
        """A streamed file's reader blocked this long on bytes (told at its close)."""
        self.waited_s += seconds


_ACTIVE: list[HubSession] = []
_DEFAULT = HubSession()


def current_session() -> HubSession:
    return _ACTIVE[-1] if _ACTIVE else _DEFAULT


@contextlib.contextmanager
def hub_session(user: str, *, ledger=None, stream: bool = False, report=None, keep: bool = False):
    """The worker's hub session around resolving, analysing and saving one model. With a
    `ledger` (the worker's `DownloadLedger`, under `--disk_budget` or `--stream`), every
    download is recorded before it starts; on a normal exit (the CSV written) and on a final
    failure, what this model downloaded and no other model needs is deleted; a retryable
    failure keeps it for the retry. `keep`: a normal exit keeps the downloads for the model's
    worker (the download stage's fetch). `report` (see `HubSession`) hears of bytes moved."""
    session = HubSession(user, ledger, stream, report)
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
            if not keep:
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
                         f"{offline_hint(repo_id, cache)} ({why})", retryable=True) from None
    log.warning("%s@%s: the hub cannot be reached (%s); using the cached snapshot %s "
                "(set HF_HUB_OFFLINE=1 to skip the hub)", repo_id, revision, why, snapshot.name)
    return snapshot


def download_snapshot(repo_id: str, revision: str, cache: Path,
                      trust_remote_code: bool) -> Path:
    """The snapshot directory of `repo_id@revision`: from the cache when offline, else
    downloading only the needed files of the pinned commit (streamed weights excepted)."""
    check_revision(repo_id, revision)
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
        raise hub_failure(exc, repo_id, revision, cache=cache) from None
    files = needed_files(listing.sizes, trust_remote_code)
    streamed: list[str] = []
    if session.stream and ADAPTER_CONFIG_FILE not in listing.sizes:
        streamed = streamable(listing.sizes)
        if not streamed:
            log.warning("%s: no safetensors weights to stream (%s); downloading them instead, "
                        "deleted after the model is analysed", repo_id,
                        ", ".join(weight_names(listing.sizes)) or "no weights")
    have = cached_files(cache, repo_id, listing.commit)
    if streamed and all(n in have for n in streamed):
        streamed = []                      # all in the cache already: read the files
    fetch = [n for n in files if n not in streamed]
    new = {n: listing.sizes.get(n, 0) for n in fetch if n not in have}   # what goes over the wire
    if session.ledger is not None:
        session.ledger.before_download(repo_id, listing.commit, new, session.user)
        session.ledger.hold(repo_id, listing.commit)
    meter = None if session.report is None else _byte_meter(session.report, repo_id, sum(new.values()))
    started = time.monotonic()
    snapshot = _fetch(repo_id, revision, listing.commit, cache, fetch, meter)
    if new:
        session.waited_s += time.monotonic() - started
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
    ref = repo_folder(cache, repo_id) / "refs" / check_revision(repo_id, revision)
    try:
        if ref.is_file() and ref.read_text().strip() == commit:
            return
        ref.parent.mkdir(parents=True, exist_ok=True)
        write_text_atomic(ref, commit)
    except OSError as exc:
        log.warning("%s: could not record refs/%s in the cache: %s", repo_id, revision, exc)


def _fetch(repo_id: str, revision: str, commit: str, cache: Path, files: list[str],
           meter=None) -> Path:
    """snapshot_download of `files` at `commit`. One more pass (which resolves every file
    again) after huggingface_hub's client-closed thread bug or an expired CDN link."""
    from huggingface_hub import snapshot_download
    for attempt in (1, 2):
        try:
            return Path(snapshot_download(repo_id, revision=commit, cache_dir=cache,
                                          allow_patterns=[_literal(n) for n in files],
                                          etag_timeout=_etag_timeout(), tqdm_class=meter))
        except Exception as exc:  # noqa: BLE001 - every hub error becomes a typed failure
            failure = hub_failure(exc, repo_id, revision, cache=cache)
            again = failure.reason == "expired_url" or CLIENT_CLOSED in str(exc)
            if again and attempt == 1:
                log.warning("%s: %s; resuming the download", repo_id, failure.message)
                continue
            raise failure from None
    raise AssertionError("unreachable")


def _byte_meter(report, repo_id: str, total: int):
    """A tqdm class for `snapshot_download` that shows nothing and hands the bytes written
    to `report("downloaded", repo_id, bytes so far, total)`. huggingface_hub updates two byte
    bars with the same bytes (transfer, reconstruction): the larger count is what is done."""
    from tqdm.std import tqdm
    lock, counts = threading.Lock(), {}

    class ByteMeter(tqdm):
        def __init__(self, *args, **kwargs):
            self._counts_bytes = kwargs.get("unit") == "B"
            kwargs.pop("name", None)
            super().__init__(*args, **dict(kwargs, disable=True))

        def update(self, n=1):
            if self._counts_bytes and n:
                with lock:
                    counts[id(self)] = counts.get(id(self), 0) + int(n)
                    done = max(counts.values())
                report("downloaded", repo_id, done, total)
            return super().update(n)
    return ByteMeter


def _etag_timeout() -> float:
    from esd.loading.hub_http import hub_timeout_s
    return hub_timeout_s()


# --------------------------------------------------------------------------- weights

def remote_weights(local_dir: Path) -> tuple[Path, list[HubFile]] | None:
    """(weights dir, weight files) of a snapshot whose weights are streamed (`HubFile`s: not
    on disk, read by HTTP ranges), else None."""
    remote = current_session().remote.get(Path(local_dir))
    if remote is None:
        return None
    repo_id, commit, names = remote
    session = current_session()
    return Path(local_dir), [HubFile(Path(local_dir) / name, repo_id, commit, session.report,
                                     waited=session.add_wait) for name in names]
