"""Bounded disk for hub downloads (`--disk_budget GB`): what a run downloads it deletes
when it no longer needs it; what was in the cache before is never deleted.

Owns: the download ledger `<output_dir>/.hub_downloads.json` (under a file lock): every
repo revision the run downloads is recorded *before* its download, with the files, their
sizes (from the tree listing), whether it is ours (nothing of it was in the cache before)
and which models use it; shared read locks per repo revision under
`<cache>/.esd_locks/` (held by a worker while it reads the files, so another worker,
even of another run on the same cache, never deletes them under it); deletion through
huggingface_hub's cache API (`scan_cache_dir().delete_revisions(...).execute()`, which keeps
blobs other revisions still use); the orchestrator's admission rule (`BudgetGate`).

Must not: download anything itself, or delete a revision that is not ours, that a model
still needs (a planned adapter's base included) or that a worker is reading.
"""
from __future__ import annotations

import argparse
import contextlib
import fcntl
import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

from filelock import FileLock

from esd.atomic_files import write_text_atomic
from esd.failures import ESDFailure
from esd.loading.hub import cached_files
from esd.units import GB

LEDGER = ".hub_downloads.json"

log = logging.getLogger("esd_experiment.disk")


def _lock_name(repo_id: str, commit: str) -> str:
    return f"{repo_id.replace('/', '--')}--{commit}.lock"


def gigabytes(text) -> float:
    """`--disk_budget GB`: a number of gigabytes (10^9 bytes) > 0."""
    try:
        value = float(text)
    except (TypeError, ValueError):
        value = float("nan")
    if not 0 < value < float("inf"):
        raise argparse.ArgumentTypeError(f"expected a number of GB > 0, got {text!r}")
    return value


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
        try:
            data = json.loads(self.path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            data = {}
        data.setdefault("revisions", {})
        data.setdefault("planned", {})     # base repo id -> model keys that will need it
        return data

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
            entry = data["revisions"].get(key)
            if entry is None or entry.get("state") == "deleted":
                present = cached_files(self.cache, repo_id, commit)
                ours = not present if entry is None else entry["ours"]
                entry = {"repo_id": repo_id, "commit": commit, "ours": ours, "users": [],
                         "files": dict(files), "bytes": int(sum(files.values())),
                         "state": "downloading"}
                data["revisions"][key] = entry
            else:
                for name, size in files.items():
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
            self._write(data)
        return deleted

    def bytes_on_disk(self) -> int:
        """Bytes of our revisions now in the cache (downloading or present)."""
        return sum(e["bytes"] for e in self.entries().values()
                   if e["ours"] and e["state"] != "deleted")

    # ------------------------------------------------------------ deleting
    def _delete_unneeded(self, data: dict, force: bool) -> list[str]:
        planned = data["planned"]
        doomed = []
        for key, entry in data["revisions"].items():
            if not entry["ours"] or entry["state"] == "deleted":
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
            commits = {data["revisions"][k]["commit"] for k in doomed}
            known = {r.commit_hash for repo in info.repos for r in repo.revisions}
            strategy = info.delete_revisions(*(commits & known))
            strategy.execute()
            freed = strategy.expected_freed_size
        except Exception as exc:  # noqa: BLE001 - a cache we cannot scan: keep, say why
            log.warning("could not delete downloaded revisions %s: %s", doomed, exc)
            return []
        for key in doomed:
            data["revisions"][key]["state"] = "deleted"
        log.info("deleted %d downloaded revision(s) (%.1f MB): %s", len(doomed), freed / 1e6,
                 ", ".join(doomed))
        return doomed

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
        parts = dict(kept or {})
        for model_parts in self.reserved.values():
            parts.update(model_parts)
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


def download_parts(model_id: str, revision: str | None, source_model: str | None, *,
                   stream: bool, trust_remote_code: bool, cache: Path,
                   with_base: bool = False) -> dict[str, int]:
    """Bytes a worker would download for one model (and an adapter's base, or with
    `with_base` — --delta_from_base — a full model's `source_model`), by `repo@commit`, from
    the tree listing; files already in the cache count 0. A local directory is {}. Raises
    what `hub_listing` raises."""
    from esd.loading import hub
    if Path(model_id).expanduser().is_dir() or not hub.looks_like_hub_id(model_id):
        return _base_parts(source_model, stream, trust_remote_code, cache) if with_base else {}
    listing = hub.hub_listing(model_id, revision or "main")
    names = listing.sizes
    parts: dict[str, int] = {}
    files = hub.needed_files(names, trust_remote_code)
    if hub.ADAPTER_CONFIG_FILE in names:
        base = source_model or _adapter_base(model_id, listing.commit)
        parts.update(_base_parts(base, stream, trust_remote_code, cache))
    else:
        if with_base:
            parts.update(_base_parts(source_model, stream, trust_remote_code, cache))
        if stream:
            streamed = set(hub.streamable(names))
            files = [f for f in files if f not in streamed]
    have = cached_files(cache, model_id, listing.commit)
    parts[f"{model_id}@{listing.commit}"] = sum(names.get(f, 0) for f in files if f not in have)
    return parts


def _base_parts(base: str | None, stream: bool, trust_remote_code: bool,
                cache: Path) -> dict[str, int]:
    """download_parts of a base (an adapter's; with --delta_from_base, a fine-tune's); {}
    for none."""
    if not base:
        return {}
    from esd.model_list import parse_model_id
    base_id, base_rev = parse_model_id(base)
    return download_parts(base_id, base_rev, None, stream=stream,
                          trust_remote_code=trust_remote_code, cache=cache)


def _adapter_base(repo_id: str, commit: str) -> str | None:
    """`base_model_name_or_path` of a hub adapter, read over HTTP (nothing written)."""
    from huggingface_hub import hf_hub_url
    from huggingface_hub.utils import build_hf_headers, get_session
    try:
        response = get_session().get(hf_hub_url(repo_id, "adapter_config.json", revision=commit),
                                     headers=build_hf_headers(), follow_redirects=True,
                                     timeout=30)
        response.raise_for_status()
        return response.json().get("base_model_name_or_path") or None
    except Exception:  # noqa: BLE001 - unknown base: the worker will say what is wrong
        return None
