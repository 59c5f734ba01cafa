"""Where weights come from: resolve a model id to files, and stream its layers.

This is the loading room's entry point; its concerns live in `esd/loading/`, each in a
module named after it:

- `esd/loading/hub.py`        — hub ids and revisions, the huggingface_hub cache, listings,
                                downloads, offline snapshots, `install_into_hub_cache`.
- `esd/loading/hub_http.py`   — requests to the Hub (timeouts, backoff, guarded pagination)
                                and the one mapping of hub errors to typed failures.
- `esd/loading/formats.py`    — the weight-format registry: which files hold the weights (one
                                preference rule for directories and hub listings) and
                                `open_weights`, the factory of tensor sources.
- `esd/loading/checkpoint.py` — the `TensorSource` interface reading one float32 CPU tensor
                                at a time from files on disk (safetensors, .bin).
- `esd/loading/stream.py`     — a `TensorSource` reading hub safetensors by HTTP ranges.
- `esd/loading/layers.py`     — which tensors are layers: meta-device skeleton, key matching,
                                tied weights, the name/shape rule; walking an nn.Module.
- `esd/loading/lora.py`       — adapters: the base, LoRA scaling, the streaming merge,
                                peft's merge, an adapter's update alone.
- `esd/loading/deltas.py`     — a fine-tune as its difference from its base.
- `esd/loading/log.py`        — the `model_loader` logger and `warn=` callbacks.

Owns here: `resolve_model` (a `ModelEntry` — local directory, `org/name`, `org/name@rev`,
training checkpoint directory — to a frozen `ResolvedModel` holding that entry) and
`iter_layers` (its layers, one at a time, as `(longname, layer_type, float32 CPU tensor)`).

Must not: compute any metric (that is `net_esd.py`), choose devices or GPUs, write result
files, or hold a whole model in memory (one exception, documented at
`esd.loading.lora._merge_with_peft`).

Every failure is an `ESDFailure(stage, reason, message)` with stage `resolve`, `load` or
`merge`; no raw torch / safetensors / hub traceback escapes for bad input.

Decisions:
- Adapters are recognised by their files, never by the relation hint.
- Offline (`HF_HUB_OFFLINE=1`, read at call time): only the local cache is consulted; an
  id that is not there is `repo_not_found` (a missing revision of a cached repo is
  `revision_not_found`). Online, an unreachable hub falls back to a cached snapshot.
"""
from __future__ import annotations

import errno
from dataclasses import replace
from pathlib import Path
from typing import Callable, Iterator

import torch

from esd.failures import ESDFailure
from esd.loading.formats import (check_not_quantized, find_weights, is_adapter_dir, open_weights,
                                 plan_reads)
from esd.loading.hub import (download_snapshot, hub_cache_dir, install_into_hub_cache,
                             remote_weights, looks_like_hub_id)
from esd.loading.deltas import iter_delta_layers
from esd.loading.layers import distinct_layers, plan_layers
from esd.loading.lora import (adapter_update_unsupported, iter_adapter_layers,  # noqa: F401
                              iter_adapter_updates, resolve_adapter)
from esd.loading.log import Warn, iter_with_warnings_to, logger, warnings_to
from esd.loading.resolved import CONFIG_FILE, ResolvedModel
from esd.model_list import ModelEntry, RevisionConflict, relation_says_adapter, split_revision
from esd.schema import LAYER_MODES

__all__ = ["ResolvedModel", "install_into_hub_cache", "iter_layers", "resolve_model"]

PlanCounts = Callable[[dict], None]   # iter_layers' on_plan: {mode: layers it yields}


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


def iter_layers(resolved: ResolvedModel, *, warn: Warn | None = None, mode: str = "weights",
                on_plan: PlanCounts | None = None) -> Iterator[tuple[str, str, torch.Tensor]]:
    """Yield `(longname, layer_type, tensor)` one layer at a time; `tensor` is a float32 CPU
    tensor the caller owns. Adapters are merged into their base on the way. Warnings go to
    `warn`, else to the callback given to `resolve_model`, else to the `model_loader` logger.

    mode (`esd.schema.LAYER_MODES`): `weights` (the model's weights); `delta_from_base`
    (W_ft − W_base, base = the model's `source_model`; names end in `.delta_from_base`);
    `adapter_update` (a LoRA adapter's (α/r)·B·A alone; names end in `.adapter_update`).

    on_plan: called once the layers are planned, before the first tensor is read, with
    {mode: number of layers it yields} for this mode and any other mode the same plan
    answers (a full model's deltas are its layers and the other way round; a plain LoRA's
    updates are in its merge plan), so a caller can say `layer i/n` without planning twice."""
    if mode not in LAYER_MODES:
        raise ValueError(f"unknown mode {mode!r}; valid: {', '.join(LAYER_MODES)}")
    on_plan = on_plan or (lambda counts: None)
    if mode == "adapter_update":
        layers = _adapter_updates(resolved, on_plan)
    elif mode == "delta_from_base":
        layers = _deltas_from_base(resolved, on_plan)
    else:
        layers = iter_adapter_layers(resolved, on_plan) if resolved.is_adapter \
            else _full_model_layers(resolved, on_plan)
    return iter_with_warnings_to(layers, warn or resolved.warn)


def _adapter_updates(resolved: ResolvedModel, on_plan: PlanCounts):
    if not resolved.is_adapter:
        raise ESDFailure("load", "not_an_adapter", f"{resolved.model_id}: adapter_update needs "
                         "an adapter (adapter_config.json + adapter_model.*)")
    yield from iter_adapter_updates(resolved, on_plan)


def _deltas_from_base(resolved: ResolvedModel, on_plan: PlanCounts):
    if resolved.is_adapter:
        raise ESDFailure("load", "adapter_unsupported", f"{resolved.model_id}: an adapter's "
                         "difference from its base is its update: use adapter_update")
    if resolved.entry.base is None:
        raise ESDFailure("resolve", "base_unresolved", f"{resolved.model_id}: delta_from_base "
                         "needs the model's base (the model list's source_model column)")
    try:
        base = resolve_model(resolved.entry.base, trust_remote_code=resolved.trust_remote_code)
    except ESDFailure as failure:
        failure.message = f"base {resolved.source_model} of {resolved.model_id}: {failure.message}"
        raise
    if base.is_adapter:
        raise ESDFailure("resolve", "adapter_unsupported", f"{resolved.model_id}: its base "
                         f"{resolved.source_model} is an adapter")
    yield from iter_delta_layers(resolved, base, on_plan)


def _full_model_layers(resolved: ResolvedModel,
                       on_plan: PlanCounts) -> Iterator[tuple[str, str, torch.Tensor]]:
    ckpt = open_weights(resolved.weight_files)
    try:
        modules, keys = plan_layers(resolved, ckpt)
        plan_reads(ckpt, (keys[name] for name, _, _ in modules))
        layers = list(distinct_layers(modules, keys))
        on_plan({"weights": len(layers), "delta_from_base": len(layers)})
        for name, kind, key in layers:
            tensor = ckpt.tensor(key)
            yield name, kind, tensor
            del tensor
    finally:
        ckpt.close()
