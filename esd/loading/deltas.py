"""A fine-tune analysed as its difference from its base: W_ft − W_base, layer by layer.

Owns `iter_delta_layers`: both checkpoints are planned (`layers.py`), every layer of the
fine-tune is checked to exist in the base with the same shape before anything is read, then
each difference is streamed as `(longname + ".delta_from_base", layer_type, tensor)` — two
tensors in memory at a time. The adapter counterpart (an adapter's update alone) is
`lora.iter_adapter_updates`.

Must not: resolve ids (the caller gives both resolved models) or compute a metric.
"""
from __future__ import annotations

from typing import Iterator

import torch

from esd.failures import ESDFailure
from esd.loading.formats import open_weights, plan_reads
from esd.loading.layers import distinct_layers, plan_layers
from esd.loading.resolved import ResolvedModel
from esd.schema import LAYER_MODES


def iter_delta_layers(resolved: ResolvedModel, base: ResolvedModel,
                      on_plan=None) -> Iterator[tuple[str, str, torch.Tensor]]:
    """on_plan: as `model_loader.iter_layers`' (the deltas are the fine-tune's layers)."""
    suffix = LAYER_MODES["delta_from_base"]
    tuned, original = open_weights(resolved.weight_files), open_weights(base.weight_files)
    try:
        modules, keys = plan_layers(resolved, tuned)
        base_modules, base_keys = plan_layers(base, original)
        _check_same_layers(resolved, base, modules, keys, base_keys, tuned, original)
        plan_reads(tuned, (keys[name] for name, _, _ in modules))
        plan_reads(original, (base_keys[name] for name, _, _ in modules))
        layers = list(distinct_layers(modules, keys))
        if on_plan is not None:
            on_plan({"delta_from_base": len(layers), "weights": len(layers)})   # one plan
        for name, kind, key in layers:
            delta = tuned.tensor(key)
            delta -= original.tensor(base_keys[name])      # W_ft − W_base, float32
            yield name + suffix, kind, delta
            del delta
    finally:
        tuned.close()
        original.close()


def _check_same_layers(resolved, base, modules, keys, base_keys, tuned, original) -> None:
    problems = []
    for name, _, _ in modules:
        if name not in base_keys:
            problems.append(f"{name}: not a layer of the base")
        elif tuple(tuned.shapes[keys[name]]) != tuple(original.shapes[base_keys[name]]):
            problems.append(f"{name}: {list(tuned.shapes[keys[name]])} vs base "
                            f"{list(original.shapes[base_keys[name]])}")
    if problems:
        raise ESDFailure("merge", "base_mismatch", f"{resolved.model_id} cannot be compared "
                         f"with its base {base.model_id}: " + "; ".join(problems[:5]) +
                         (f"; … ({len(problems)} problems)" if len(problems) > 5 else ""))
