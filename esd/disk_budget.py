"""Bounded disk for hub downloads (`--disk_budget GB`): what a run downloads it deletes
when it no longer needs it; what was in the cache before is never deleted.

Owns: the download ledger `<output_dir>/.hub_downloads.json` (under a file lock): every
repo revision the run downloads is recorded *before* its download, with the files the run
adds, their sizes (from the tree listing), whether the whole revision is ours (nothing of it
was in the cache before) or which of its files the user had, which models use it, and the
repo's `refs/` as they were before the run touched them (restored once no model of the run
uses the repo: the cache then resolves `main` to the user's commit again). A ledger that
cannot be read as one is `LedgerDamaged`: nothing is deleted from it. Shared read locks
per repo revision under
`<cache>/.esd_locks/` (held by a worker while it reads the files, so another worker,
even of another run on the same cache, never deletes them under it); deletion through
huggingface_hub's cache API (`scan_cache_dir().delete_revisions(...).execute()`, which keeps
blobs other revisions still use; `delete_files` for the files the run added to a revision
the user partly had); what the run's downloads take on disk now (`on_disk_bytes`: files as
they are, `.incomplete` ones being written); the orchestrator's admission rule
(`BudgetGate`) and the sizes it admits by (`download_parts`: the listing, checked against
the sizes the resolve answers give, which are what the client writes).

Must not: download anything itself, or delete anything the user had before the run (a
revision, a file of a revision, a ref), anything a model still needs (a planned adapter's
base included) or that a worker is reading.
"""
from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from filelock import FileLock

from esd.atomic_files import write_text_atomic
from esd.failures import ESDFailure
from esd.loading.hub import cached_files, repo_folder as _repo_folder
from esd.units import GB, gigabytes  # noqa: F401 - gigabytes: the flag type, here for callers

LEDGER = ".hub_downloads.json"

log = logging.getLogger("esd_experiment.disk")


def _lock_name(repo_id: str, commit: str) -> str:
    return f"{repo_id.replace('/', '--')}--{commit}.lock"


class LedgerDamaged(ESDFailure):
    """The ledger exists but is not what this module writes: which revisions the run
    downloaded is unknown, so nothing may be deleted from it."""

    def __init__(self, path: Path, what: str):
        super().__init__("resolve", "ledger_damaged",
                         f"{path} is damaged ({what}): which hub cache files the run downloaded "
                         f"is unknown, so nothing was deleted. Move it aside (mv {path} "
                         f"{path}.damaged) and run the same command again; what it listed stays "
                         "in the hub cache (`hf cache ls` shows it, `hf cache rm` deletes)",
                         retryable=False)


_STATES = ("downloading", "present", "deleted")


def _damage(data) -> str | None:
    """What is wrong with a parsed ledger, or None if it has the shape `DownloadLedger` writes."""
    def names(value) -> bool:
        return isinstance(value, list) and all(isinstance(v, str) for v in value)

    if not isinstance(data, dict):
        return f"a JSON {type(data).__name__}, not an object"
    for part in ("revisions", "planned", "refs"):
        if not isinstance(data.get(part, {}), dict):
            return f"'{part}' is not an object"
    for key, entry in data.get("revisions", {}).items():
        if not isinstance(entry, dict):
            return f"revision {key!r} is not an object"
        checks = {"repo_id": isinstance(entry.get("repo_id"), str),
                  "commit": isinstance(entry.get("commit"), str),
                  "ours": isinstance(entry.get("ours"), bool),
                  "users": names(entry.get("users")),
                  "had": names(entry.get("had", [])),
                  "beside_had": names(entry.get("beside_had", [])),
                  "files": isinstance(entry.get("files"), dict) and all(
                      isinstance(k, str) and type(v) is int and v >= 0
                      for k, v in entry["files"].items()),
                  "bytes": type(entry.get("bytes")) is int,
                  "state": entry.get("state") in _STATES}
        bad = [name for name, ok in checks.items() if not ok]
        if bad:
            return f"revision {key!r}: bad or missing {', '.join(bad)}"
        if key != f"{entry['repo_id']}@{entry['commit']}":
            return f"revision {key!r} names {entry['repo_id']}@{entry['commit']}"
    for base, users in data.get("planned", {}).items():
        if not names(users):
            return f"planned base {base!r}: not a list of model keys"
    for repo_id, refs in data.get("refs", {}).items():
        if not isinstance(refs, dict) or not all(
                isinstance(k, str) and isinstance(v, str) for k, v in refs.items()):
            return f"refs of {repo_id!r}: not an object of ref → commit"
    return None


def repo_refs(cache: Path, repo_id: str) -> dict[str, str]:
    """`refs/` of `repo_id` in the cache: ref name (`main`, `refs/pr/1`…) → commit."""
    refs = _repo_folder(cache, repo_id) / "refs"
    if not refs.is_dir():
        return {}
    out = {}
    for path in refs.rglob("*"):
        if path.is_file():
            try:
                out[path.relative_to(refs).as_posix()] = path.read_text(encoding="utf-8").strip()
            except OSError:
                continue
    return out


def _restore_refs(cache: Path, repo_id: str, before: dict[str, str]) -> None:
    """Put `refs/` of `repo_id` back as `before`: refs the run rewrote or deleted get their
    old commit, refs the run added are removed."""
    folder = _repo_folder(cache, repo_id) / "refs"
    now = repo_refs(cache, repo_id)
    for name, commit in before.items():
        if now.get(name) != commit:
            (folder / name).parent.mkdir(parents=True, exist_ok=True)
            write_text_atomic(folder / name, commit)
            log.info("restored refs/%s of %s to the cache's %s", name, repo_id, commit)
    for name in set(now) - set(before):
        (folder / name).unlink(missing_ok=True)


def _beside_snapshot(commit: str) -> tuple[str, ...]:
    """What huggingface_hub keeps of a revision outside its snapshot (relative to the repo
    folder): its cached tree listing and its missing-file markers. Deleting a revision with
    the cache API leaves them; the run removes those it created."""
    return (f"trees/{commit}.json", f".no_exist/{commit}")


def _remove_beside_snapshot(cache: Path, entry: dict) -> None:
    folder = _repo_folder(cache, entry["repo_id"])
    for name in _beside_snapshot(entry["commit"]):
        if name in entry["beside_had"] or not (folder / name).exists():
            continue
        if (folder / name).is_dir():
            shutil.rmtree(folder / name, ignore_errors=True)
        else:
            (folder / name).unlink(missing_ok=True)
        with contextlib.suppress(OSError):   # the folder only if the run made it
            (folder / name).parent.rmdir()


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return 0


@dataclass
class DownloadLedger:
    """The ledger of one output directory over one hub cache; with `budget_bytes`, a
    download larger than the whole budget is refused before it is recorded."""
    output_dir: Path
    cache: Path
    budget_bytes: int | None = None
    _held: dict[str, int] = field(default_factory=dict)   # read locks this process holds

    def __post_init__(self):
        self.output_dir, self.cache = Path(self.output_dir), Path(self.cache)

    # ------------------------------------------------------------ the file
    @property
    def path(self) -> Path:
        return self.output_dir / LEDGER

    def _lock(self) -> FileLock:
        self.output_dir.mkdir(parents=True, exist_ok=True)
        return FileLock(str(self.output_dir / ".hub_downloads.lock"))

    def _read(self) -> dict:
        """The ledger; `LedgerDamaged` if it exists and is not one (nothing is decided from
        a file this module did not write)."""
        if not self.path.exists():
            data = {}
        else:
            try:
                data = json.loads(self.path.read_text(encoding="utf-8"))
            except OSError as exc:
                raise LedgerDamaged(self.path, f"unreadable: {exc.strerror or exc}") from None
            except (ValueError, RecursionError) as exc:
                what = "nested too deeply" if isinstance(exc, RecursionError) else "not JSON"
                raise LedgerDamaged(self.path, what) from None
            damage = _damage(data)
            if damage:
                raise LedgerDamaged(self.path, damage)
        data.setdefault("revisions", {})
        data.setdefault("planned", {})     # base repo id -> model keys that will need it
        data.setdefault("refs", {})        # repo id -> its refs before the run touched them
        for entry in data["revisions"].values():
            if "had" not in entry:   # written before `had` existed: keep all a user might have
                entry["had"] = [] if entry["ours"] else sorted(entry["files"])
            entry.setdefault("beside_had", list(_beside_snapshot(entry["commit"])))
        return data

    def check(self) -> None:
        """Raise `LedgerDamaged` now if the ledger is damaged (before anything runs)."""
        with self._lock():
            self._read()

    def _write(self, data: dict) -> None:
        write_text_atomic(self.path, json.dumps(data, indent=1, sort_keys=True))

    def entries(self) -> dict:
        with self._lock():
            return self._read()["revisions"]

    # ------------------------------------------------------------ workers
    def before_download(self, repo_id: str, commit: str, files: dict[str, int],
                        user: str) -> bool:
        """Record that `user` (a model key) needs `repo_id@commit` with `files` (name →
        bytes), before anything is downloaded. Returns whether the revision is ours (nothing
        of it was in the cache before this run). Raises `disk_budget_exceeded` when `files`
        alone are larger than the budget."""
        key = f"{repo_id}@{commit}"
        if self.budget_bytes is not None and sum(files.values()) > self.budget_bytes:
            biggest = max(files, key=files.get)
            raise exceeded_failure(key, sum(files.values()), self.budget_bytes,
                                   f" ({len(files)} files, the largest {biggest} "
                                   f"{files[biggest] / GB:.3f} GB)")
        with self._lock():
            data = self._read()
            data["refs"].setdefault(repo_id, repo_refs(self.cache, repo_id))
            entry = data["revisions"].get(key)
            if entry is None or entry.get("state") == "deleted":
                if entry is None:
                    had = sorted(cached_files(self.cache, repo_id, commit))
                    folder = _repo_folder(self.cache, repo_id)
                    beside = [n for n in _beside_snapshot(commit) if (folder / n).exists()]
                else:
                    had, beside = entry["had"], entry["beside_had"]
                entry = {"repo_id": repo_id, "commit": commit, "ours": not had, "had": had,
                         "beside_had": beside, "users": [],
                         "files": {n: s for n, s in files.items() if n not in had},
                         "bytes": 0, "state": "downloading"}
                entry["bytes"] = int(sum(entry["files"].values()))
                data["revisions"][key] = entry
            else:
                for name, size in files.items():
                    if name not in entry["had"]:
                        entry["files"].setdefault(name, size)
                entry["bytes"] = int(sum(entry["files"].values()))
            if user not in entry["users"]:
                entry["users"].append(user)
            self._write(data)
            return entry["ours"]

    def downloaded(self, repo_id: str, commit: str) -> None:
        with self._lock():
            data = self._read()
            entry = data["revisions"].get(f"{repo_id}@{commit}")
            if entry is not None:
                entry["state"] = "present"
                self._write(data)

    @contextlib.contextmanager
    def reading(self, repo_id: str, commit: str):
        """Hold a shared lock on `repo_id@commit` (no deletion while held)."""
        fd = self.hold(repo_id, commit)
        try:
            yield
        finally:
            self.unhold(repo_id, commit, fd)

    def hold(self, repo_id: str, commit: str) -> int:
        lock_dir = self.cache / ".esd_locks"
        lock_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(lock_dir / _lock_name(repo_id, commit), os.O_RDWR | os.O_CREAT, 0o666)
        fcntl.flock(fd, fcntl.LOCK_SH)
        self._held[f"{repo_id}@{commit}"] = fd
        return fd

    def unhold(self, repo_id: str, commit: str, fd: int | None = None) -> None:
        fd = self._held.pop(f"{repo_id}@{commit}", fd)
        if fd is not None:
            os.close(fd)

    def release_all_holds(self) -> None:
        for key in list(self._held):
            repo_id, commit = key.rsplit("@", 1)
            self.unhold(repo_id, commit)

    def release(self, user: str) -> list[str]:
        """`user` no longer needs anything: delete every revision of ours nobody else needs
        (planned users included) and nobody reads. Returns the deleted `repo@commit`s."""
        with self._lock():
            data = self._read()
            for entry in data["revisions"].values():
                if user in entry["users"]:
                    entry["users"].remove(user)
            for base, users in list(data["planned"].items()):
                if user in users:
                    users.remove(user)
                if not users:
                    del data["planned"][base]
            deleted = self._delete_unneeded(data, force=False)
            self._restore_unused_refs(data)
            self._write(data)
        return deleted

    # ------------------------------------------------------------ the orchestrator
    def plan_bases(self, needs: dict[str, list[str]]) -> None:
        """Adapter bases by repo id → the model keys of this run that will need them: a base
        stays until the last of them is released."""
        with self._lock():
            data = self._read()
            for base, users in needs.items():
                have = data["planned"].setdefault(base, [])
                have.extend(u for u in users if u not in have)
            self._write(data)

    def sweep(self) -> list[str]:
        """End of the run: delete every revision of ours that nobody reads."""
        with self._lock():
            data = self._read()
            data["planned"] = {}
            for entry in data["revisions"].values():
                entry["users"] = []
            deleted = self._delete_unneeded(data, force=True)
            self._restore_unused_refs(data)
            self._write(data)
        return deleted

    def bytes_on_disk(self) -> int:
        """Bytes the run's downloads take in the cache now (`on_disk_bytes` of each)."""
        return sum(self.kept().values())

    def kept(self) -> dict[str, int]:
        """`repo@commit` → bytes on disk now, of every revision the run added files to and
        has not deleted yet."""
        return {key: self.on_disk_bytes(entry) for key, entry in self.entries().items()
                if entry["files"] and entry["state"] != "deleted"}

    def on_disk_bytes(self, entry: dict) -> int:
        """What the files the run added to `entry`'s revision take now: each file as it is on
        disk; while it downloads, a missing file as listed, or what is being written to the
        repo's `.incomplete` blobs if that is more (a listing may under-report)."""
        snapshot = _repo_folder(self.cache, entry["repo_id"]) / "snapshots" / entry["commit"]
        present = missing = 0
        for name, listed in entry["files"].items():
            try:
                present += (snapshot / name).stat().st_size
            except OSError:
                missing += listed
        if entry["state"] != "downloading":
            return present
        blobs = _repo_folder(self.cache, entry["repo_id"]) / "blobs"
        writing = sum(_size(p) for p in blobs.glob("*.incomplete")) if blobs.is_dir() else 0
        return present + max(missing, writing)

    # ------------------------------------------------------------ deleting
    def _delete_unneeded(self, data: dict, force: bool) -> list[str]:
        """Delete what the run added and nobody needs: a revision that is ours whole (its
        refs go with it), else only the files the run added to a revision the user had."""
        planned = data["planned"]
        doomed = []
        for key, entry in data["revisions"].items():
            if entry["state"] == "deleted" or not entry["files"]:
                continue
            if entry["users"] or (not force and planned.get(entry["repo_id"])):
                continue
            if self._being_read(entry["repo_id"], entry["commit"]):
                continue
            doomed.append(key)
        if not doomed:
            return []
        from huggingface_hub import scan_cache_dir
        try:
            info = scan_cache_dir(self.cache)
            whole = {data["revisions"][k]["commit"] for k in doomed if data["revisions"][k]["ours"]}
            added = {(e["repo_id"], e["commit"], name) for e in map(data["revisions"].get, doomed)
                     if not e["ours"] for name in e["files"] if name not in e["had"]}
            known = {r.commit_hash for repo in info.repos for r in repo.revisions}
            files = [f for repo in info.repos for r in repo.revisions for f in r.files
                     if (repo.repo_id, r.commit_hash,
                         f.file_path.relative_to(r.snapshot_path).as_posix()) in added]
            freed = 0
            for strategy in (info.delete_revisions(*(whole & known)) if whole & known else None,
                             info.delete_files(*files) if files else None):
                if strategy is not None:
                    strategy.execute()
                    freed += strategy.expected_freed_size
        except Exception as exc:  # noqa: BLE001 - a cache we cannot scan: keep, say why
            log.warning("could not delete downloaded revisions %s: %s", doomed, exc)
            return []
        for key in doomed:
            data["revisions"][key]["state"] = "deleted"
            with contextlib.suppress(OSError):
                _remove_beside_snapshot(self.cache, data["revisions"][key])
        log.info("deleted %d downloaded revision(s) (%.1f MB): %s", len(doomed), freed / 1e6,
                 ", ".join(doomed))
        return doomed

    def _restore_unused_refs(self, data: dict) -> None:
        """Refs of every repo no model of the run uses any more, back as they were before the
        run; the record is dropped once restored (a later download records them again)."""
        in_use = {e["repo_id"] for e in data["revisions"].values() if e["users"]}
        in_use |= {base for base, users in data["planned"].items() if users}
        for repo_id in [r for r in data["refs"] if r not in in_use]:
            try:
                _restore_refs(self.cache, repo_id, data["refs"][repo_id])
            except OSError as exc:
                log.warning("could not restore the refs of %s in the cache: %s", repo_id, exc)
                continue
            del data["refs"][repo_id]

    def _being_read(self, repo_id: str, commit: str) -> bool:
        path = self.cache / ".esd_locks" / _lock_name(repo_id, commit)
        if not path.exists():
            return False
        fd = os.open(path, os.O_RDWR)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        finally:
            os.close(fd)   # closing drops the lock we may have taken
        return False


# ---------------------------------------------------------------- admission

@dataclass
class BudgetGate:
    """The orchestrator's rule: start a model only if what it downloads fits in what the
    budget leaves beside what is on disk for the models running (and the bases kept for
    adapters still to come). Sizes are by `repo@commit`, so a base shared by two running
    adapters counts once. With nothing running, a model that fits the budget alone starts."""
    budget_bytes: int
    reserved: dict[str, dict[str, int]] = field(default_factory=dict)   # model key -> parts

    def used(self, kept: dict[str, int] | None = None) -> dict[str, int]:
        parts = dict(kept or {})   # what is on disk now may exceed what was reserved
        for model_parts in self.reserved.values():
            for key, size in model_parts.items():
                parts[key] = max(parts.get(key, 0), size)
        return parts

    def fits(self, parts: dict[str, int], kept: dict[str, int] | None = None) -> bool:
        if not self.reserved:
            return sum(parts.values()) <= self.budget_bytes
        used = self.used(kept)
        extra = sum(size for key, size in parts.items() if key not in used)
        return sum(used.values()) + extra <= self.budget_bytes

    def take(self, key: str, parts: dict[str, int]) -> None:
        self.reserved[key] = dict(parts)

    def give_back(self, key: str) -> None:
        self.reserved.pop(key, None)


def exceeded_failure(key: str, size: int, budget_bytes: int, parts: str = "") -> ESDFailure:
    return ESDFailure("resolve", "disk_budget_exceeded",
                      f"{key}: its download is {size / GB:.3f} GB{parts}, more than the whole "
                      f"--disk_budget {budget_bytes / GB:g} GB (raise the budget or use --stream)",
                      retryable=False)


class BaseUnsized(Exception):
    """The size of a model's base (an adapter's, or a fine-tune's with --delta_from_base)
    could not be known; the model itself was sized. `cause` is what the hub raised."""

    def __init__(self, base: str, cause: BaseException):
        super().__init__(f"base {base}: {type(cause).__name__}")
        self.base, self.cause = base, cause


def download_parts(entry, *, stream: bool, trust_remote_code: bool, cache: Path,
                   with_base: bool = False, as_base: bool = False) -> dict[str, int]:
    """Bytes a worker would download for one model (a `ModelEntry`; and an adapter's base, or
    with `with_base` — --delta_from_base — a full model's base, `entry.base`), by `repo@commit`; files
    already in the cache count 0. A local directory is {}. Sizes are the tree listing's,
    raised to what the resolve answers say (the size the client checks what it writes
    against): a listing that under-reports does not get a model admitted.

    A base is sized as loading resolves it (`esd.loading.resolve.resolve_adapter`: the base
    is resolved as a model, never as an adapter in turn), so with `as_base` an adapter's own
    base is not followed: adapters naming themselves or each other end there, and their
    worker fails `adapter_unsupported`. Raises what `hub_listing` raises for the model, and
    `BaseUnsized` for its base."""
    from esd.loading import hub
    model_id, revision = entry.model_id, entry.revision
    if Path(model_id).expanduser().is_dir() or not hub.looks_like_hub_id(model_id):
        return _base_parts(entry.base, stream, trust_remote_code, cache) if with_base else {}
    listing = hub.hub_listing(model_id, revision or "main")
    names = listing.sizes
    parts: dict[str, int] = {}
    files = hub.needed_files(names, trust_remote_code)
    if hub.ADAPTER_CONFIG_FILE in names:
        if not as_base:
            base = entry.base or _adapter_base(model_id, listing.commit)
            parts.update(_base_parts(base, stream, trust_remote_code, cache))
    else:
        if with_base:
            parts.update(_base_parts(entry.base, stream, trust_remote_code, cache))
        if stream:
            streamed = set(hub.streamable(names))
            files = [f for f in files if f not in streamed]
    have = cached_files(cache, model_id, listing.commit)
    fetch = [f for f in files if f not in have]
    sizes = resolved_sizes(model_id, listing.commit, {f: names.get(f, 0) for f in fetch})
    parts[f"{model_id}@{listing.commit}"] = sum(sizes.values())
    return parts


def resolved_sizes(repo_id: str, commit: str, listed: dict[str, int]) -> dict[str, int]:
    """`listed` (file → bytes from the tree listing), each raised to the size the file's
    resolve answer gives (`X-Linked-Size`, else `Content-Length`): one HEAD per file, as
    the client itself sends before it downloads. A gated file without access keeps its
    listed size."""
    from huggingface_hub import get_hf_file_metadata
    from huggingface_hub.errors import GatedRepoError
    sizes = {}
    for name, size in listed.items():
        try:
            meta = get_hf_file_metadata(_resolve_url(repo_id, commit, name), retry_on_errors=True)
        except GatedRepoError:   # no access: its worker fails `gated` before downloading
            sizes[name] = int(size)
            continue
        sizes[name] = max(int(size), int(meta.size or 0))
        if sizes[name] > size:
            log.warning("%s@%s: %s is %d bytes, the tree listing said %d; sizing by the "
                        "larger", repo_id, commit[:12], name, sizes[name], size)
    return sizes


def _base_parts(base, stream: bool, trust_remote_code: bool, cache: Path) -> dict[str, int]:
    """download_parts of a base entry (an adapter's; with --delta_from_base, a fine-tune's);
    {} for none; `BaseUnsized` if the hub cannot size it."""
    if base is None:
        return {}
    try:
        return download_parts(base, stream=stream, trust_remote_code=trust_remote_code,
                              cache=cache, as_base=True)
    except Exception as exc:  # noqa: BLE001 - the base's worker-side failure says what is wrong
        raise BaseUnsized(base.key, exc) from exc


def _resolve_url(repo_id: str, commit: str, name: str) -> str:
    """The resolve URL of `name` at `commit` on the endpoint `HfApi` uses now
    (`hf_hub_url` keeps the endpoint read at import when `constants.ENDPOINT` changes)."""
    from urllib.parse import quote
    from huggingface_hub import constants
    return f"{constants.ENDPOINT}/{repo_id}/resolve/{quote(commit, safe='')}/{quote(name)}"


def _adapter_base(repo_id: str, commit: str):
    """The base (an entry) that a hub adapter's `base_model_name_or_path` names, read over
    HTTP through `hub_json` (its timeouts and backoff; nothing written); None if unknown."""
    from esd.loading.hub_http import hub_json
    from esd.model_list import ModelEntry, parse_model_id
    try:
        text = hub_json(_resolve_url(repo_id, commit, "adapter_config.json")).get(
            "base_model_name_or_path")
    except Exception:  # noqa: BLE001 - unknown base: the worker will say what is wrong
        return None
    return ModelEntry(*parse_model_id(text)) if isinstance(text, str) and text.strip() else None
