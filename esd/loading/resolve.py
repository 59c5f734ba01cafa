"""Resolution: a `ModelEntry` to the files that hold it, downloading what is missing; no
tensor is read and torch is not imported (the orchestrator's download stage and the worker's
`--fetch_only` use this alone).

Owns: `resolve_model` (a local directory, `org/name`, `org/name@rev` or a training checkpoint
directory to a frozen `ResolvedModel` holding the entry), an adapter's base
(`resolve_adapter`: the entry's base → `base_model_name_or_path` in adapter_config.json, never
an adapter in turn), a full model's weight files and config (refusing quantized checkpoints).

Must not: read weights, plan layers or import torch (`tests/test_startup.py`); hub requests,
the cache and downloads are `hub.py`'s.
"""
from __future__ import annotations

import errno
import os
from dataclasses import replace
from pathlib import Path
from typing import Callable

from esd.failures import ESDFailure
from esd.loading.formats import check_not_quantized, find_weights, is_adapter_dir, read_json
from esd.loading.hub import download_snapshot, hub_cache_dir, looks_like_hub_id, remote_weights
from esd.loading.log import Warn, logger, warnings_to
from esd.loading.resolved import (ADAPTER_CONFIG_FILE, ADAPTER_WEIGHT_FILES, CONFIG_FILE,
                                  ResolvedModel)
from esd.model_list import ModelEntry, RevisionConflict, relation_says_adapter, split_revision

__all__ = ["resolve_adapter", "resolve_model"]


def resolve_model(model_id: "str | ModelEntry", revision: str | None = None,
                  source_model: str | None = None,
                  base_model_relation: str | None = None, *, trust_remote_code: bool = False,
                  cache_dir: str | None = None, warn: Warn | None = None) -> ResolvedModel:
    """Resolve a model (a `ModelEntry`, the form the model list and the worker hold, or an id
    — local dir, `org/name`, `org/name@rev` — with the entry's fields as keywords) to files;
    for an adapter, also resolve its base (the entry's base → `base_model_name_or_path` in
    adapter_config.json). Downloads only what is needed, or reads the cache when offline.
    Warnings go to the `model_loader` logger, or to `warn` when given (also those of
    `iter_layers` on the result)."""
    entry = model_id if isinstance(model_id, ModelEntry) else \
        _entry_of(model_id, revision, source_model, base_model_relation)
    with warnings_to(warn):
        resolved = _resolve(entry, trust_remote_code, cache_dir, as_base=False)
    return replace(resolved, warn=warn)


def _entry_of(model_id: str, revision: str | None, source_model: str | None,
              base_model_relation: str | None) -> ModelEntry:
    """The entry of the keyword form (no local lookup: the id is read as written)."""
    if not isinstance(model_id, str) or not model_id.strip():
        raise ESDFailure("resolve", "invalid_id", f"empty model id: {model_id!r}")
    try:
        model_id, revision = split_revision(model_id, revision)
    except RevisionConflict as exc:
        raise ESDFailure("resolve", "invalid_id", str(exc)) from None
    return ModelEntry(model_id, revision, source_model or None, base_model_relation)


def _resolve(entry: ModelEntry, trust_remote_code: bool, cache_dir: str | None,
             as_base: bool) -> ResolvedModel:
    """resolve_model's work; as the base of an adapter (`as_base`), an adapter directory is
    returned unresolved (marked `is_adapter`) instead of resolving its own base."""
    relation = entry.base_model_relation
    try:
        resolved = _locate(entry, trust_remote_code, cache_dir)
        hint_adapter = relation_says_adapter(relation)
        if is_adapter_dir(resolved.local_dir):
            if as_base:
                return replace(resolved, is_adapter=True)
            if relation and not hint_adapter:
                logger.warning(f"{resolved.model_id}: base_model_relation="
                               f"{relation!r} but the files are an adapter "
                               "(adapter_config.json); merging it into its base")

            def resolve_base(base: ModelEntry) -> ResolvedModel:
                return _resolve(base, trust_remote_code, cache_dir, as_base=True)
            return resolve_adapter(resolved, resolve_base)
        if hint_adapter:
            logger.warning(f"{resolved.model_id}: base_model_relation={relation!r} "
                           "but there is no adapter_config.json + adapter_model.*; analysing it "
                           "as a full model")
        return _with_weights(resolved)
    except OSError as exc:      # unreadable folders (/proc, permissions), over-long names
        raise _os_failure(exc, entry.local_dir or entry.model_id) from None


def _os_failure(exc: OSError, model_id) -> ESDFailure:
    where = exc.filename or model_id
    if exc.errno == errno.ENAMETOOLONG:
        return ESDFailure("resolve", "invalid_id", f"{model_id!r}: a name in it is too long "
                          f"for the file system ({len(str(where))} characters)")
    if isinstance(exc, PermissionError):
        return ESDFailure("load", "permission_denied", f"{model_id}: cannot read {where}: "
                          "permission denied")
    return ESDFailure("load", "unreadable", f"{model_id}: cannot read {where}: "
                      f"{exc.strerror or exc}")


def _locate(entry: ModelEntry, trust_remote_code: bool, cache_dir: str | None) -> ResolvedModel:
    """The directory an entry names: a local directory, or the hub snapshot of `org/name@rev`."""
    model_id, revision = entry.local_dir or entry.model_id, entry.revision
    if not model_id.strip():
        raise ESDFailure("resolve", "invalid_id", f"empty model id: {model_id!r}")
    local = Path(model_id).expanduser()
    if local.is_dir():
        if revision:
            logger.warning(f"{model_id}: local directory, revision {revision!r} ignored")
        return ResolvedModel(entry, local, trust_remote_code=trust_remote_code)
    if local.is_file() or model_id.startswith(("/", "./", "../", "~")) or model_id.count("/") > 1:
        raise ESDFailure("resolve", "repo_not_found", f"{model_id}: no such local directory "
                         "(and not a hub id `org/name`)")
    if not looks_like_hub_id(model_id):
        raise ESDFailure("resolve", "invalid_id", f"{model_id!r} is neither a local directory "
                         "nor a hub id `org/name`")
    snapshot = download_snapshot(model_id, revision or "main", hub_cache_dir(cache_dir),
                                 trust_remote_code)
    return ResolvedModel(entry, snapshot, revision or "main", commit=snapshot.name,
                         trust_remote_code=trust_remote_code)


def _with_weights(resolved: ResolvedModel) -> ResolvedModel:
    """A full model: its weight files and config.json (refusing quantized checkpoints)."""
    weights_dir, files = remote_weights(resolved.local_dir) or \
        find_weights(resolved.local_dir)    # remote: weights streamed (--stream)
    config_path = next((candidate for candidate in (weights_dir / CONFIG_FILE,
                                                    resolved.local_dir / CONFIG_FILE)
                        if candidate.is_file()), None)
    check_not_quantized(config_path)
    return replace(resolved, weights_dir=weights_dir, weight_files=tuple(files),
                   config_path=config_path)


# --------------------------------------------------------------------------- adapters

def resolve_adapter(resolved: ResolvedModel,
                    resolve_base: Callable[[ModelEntry], ResolvedModel]) -> ResolvedModel:
    """`resolved` (a directory with adapter files) as an adapter with its base resolved by
    `resolve_base(entry)`, which must not resolve adapters in turn: a base that is an adapter
    (itself, a stack, a cycle A→B→A) is `adapter_unsupported`."""
    adapter_config = read_json(resolved.local_dir / ADAPTER_CONFIG_FILE, stage="resolve")
    adapter = replace(resolved, is_adapter=True, adapter_config=adapter_config,
                      weights_dir=resolved.local_dir,
                      weight_files=tuple(resolved.local_dir / n for n in ADAPTER_WEIGHT_FILES
                                         if (resolved.local_dir / n).is_file())[:1])
    base_id, base_entry = _base_entry(adapter)
    try:
        if isinstance(base_entry, ESDFailure):   # `b@v1` and another `revision` in the config
            raise base_entry
        base = resolve_base(base_entry)
    except ESDFailure as failure:
        if failure.retryable:
            failure.message = f"base {base_id} of adapter {resolved.model_id}: {failure.message}"
            raise
        raise ESDFailure("resolve", "adapter_base_unresolved",
                         f"{resolved.model_id}: base model {base_id!r} cannot be resolved: "
                         f"{failure.reason}: {failure.message}") from None
    if base.local_dir.resolve() == resolved.local_dir.resolve():
        raise ESDFailure("resolve", "adapter_unsupported", f"{resolved.model_id}: its base "
                         f"{base_id!r} is the adapter itself")
    if base.is_adapter:
        raise ESDFailure("resolve", "adapter_unsupported", f"{resolved.model_id}: its base "
                         f"{base_id!r} is an adapter too (stacked adapters are not merged)")
    return replace(adapter, base=base)


def _base_entry(resolved: ResolvedModel) -> tuple[str, ModelEntry | ESDFailure]:
    """(base as named, its entry): the entry's base (the model list's `source_model`), else
    adapter_config.json's `base_model_name_or_path` (a relative path taken against the
    adapter's directory) and `revision`; an `invalid_id` failure where those two disagree."""
    config = resolved.adapter_config or {}
    config_base = config.get("base_model_name_or_path") or None
    if config_base is not None and not isinstance(config_base, str):
        raise ESDFailure("resolve", "corrupt_file", f"{resolved.model_id}: "
                         f"{ADAPTER_CONFIG_FILE}: base_model_name_or_path is not text")
    named = resolved.entry.base
    if named is not None:
        source_model = resolved.entry.source_model
        if config_base and named.model_id != config_base:
            logger.warning(f"{resolved.model_id}: source_model {source_model!r} differs from the "
                           f"adapter's base_model_name_or_path {config_base!r}; using "
                           f"{source_model!r}")
        return source_model, named
    if not config_base:
        raise ESDFailure("resolve", "adapter_base_unresolved",
                         f"{resolved.model_id}: adapter without a base: no source_model given and "
                         "no base_model_name_or_path in adapter_config.json")
    beside = Path(config_base).expanduser()
    if not beside.is_absolute() and (resolved.local_dir / beside).is_dir():
        config_base = os.path.normpath(resolved.local_dir / beside)
    try:
        return config_base, ModelEntry(*split_revision(config_base, config.get("revision") or None))
    except RevisionConflict as exc:
        return config_base, ESDFailure("resolve", "invalid_id", str(exc))


# --------------------------------------------------------------------------- planning
