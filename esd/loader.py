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

- `esd/loading/resolve.py`   — `resolve_model`: a `ModelEntry` (local directory, `org/name`,
                                `org/name@rev`, training checkpoint directory) to a frozen
                                `ResolvedModel` holding that entry, an adapter's base; no
                                torch (the download stage fetches through it alone).

Owns here: `iter_layers` (its layers, one at a time, as `(longname, layer_type, float32 CPU tensor)`).

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

from typing import Callable, Iterator

import torch

from esd.failures import ESDFailure
from esd.loading.formats import open_weights, plan_reads
from esd.loading.hub import install_into_hub_cache
from esd.loading.deltas import iter_delta_layers
from esd.loading.layers import distinct_layers, plan_layers
from esd.loading.lora import (adapter_update_unsupported, iter_adapter_layers,  # noqa: F401
                              iter_adapter_updates)
from esd.loading.log import Warn, iter_with_warnings_to
from esd.loading.resolve import resolve_adapter, resolve_model  # noqa: F401 - torch-free, re-exported
from esd.loading.resolved import ResolvedModel
from esd.schema import LAYER_MODES

__all__ = ["ResolvedModel", "install_into_hub_cache", "iter_layers", "resolve_model"]

PlanCounts = Callable[[dict], None]   # iter_layers' on_plan: {mode: layers it yields}


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
