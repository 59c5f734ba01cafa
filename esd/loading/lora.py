"""Adapters: merging an adapter into its base layer by layer (its base is chosen at
resolution, `esd.loading.resolve.resolve_adapter`).

Owns: LoRA scaling with rank/alpha patterns and
rsLoRA, checking every adapter tensor's name and shape against the base before anything is
merged (`_plan_adapter`), the streaming merge ΔW = B @ A · scaling in float32 for plain LoRA
on Linear / Conv1D / Embedding, modules_to_save and saved embedding layers
(`iter_adapter_layers`), and peft's own merge on a float32 CPU copy of the base for every
other adapter type (DoRA, lora_bias, conv LoRA, IA3, LoHa, LoKr, AdaLoRA, …;
`_merge_with_peft`, the one place a whole model is held in memory, with a warning).

Adapters are recognised by their files, never by the relation hint. A new adapter type that
can be merged streaming is one more branch of `_plan_adapter` / `_apply_updates`.

Must not: find weight files (`checkpoint.py`), decide layer types of the base (`layers.py`),
or approximate a merge peft would do differently.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass, field

import torch

from esd.failures import ESDFailure
from esd.loading.checkpoint import FileCheckpoint, TensorSource
from esd.loading.formats import open_weights, plan_reads
from esd.loading.layers import (KeyMatcher, build_model, distinct_layers, load_config,
                                module_layer_type, plan_layers, rule_layer_type)
from esd.loading.log import logger
from esd.loading.resolved import ADAPTER_CONFIG_FILE, ResolvedModel
from esd.schema import LAYER_MODES


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


def _streaming_unsupported(cfg: dict, adapter: TensorSource) -> str | None:
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


@dataclass
class _AdapterPlan:
    """What merging an adapter into its base will do, checked before anything is merged:
    the LoRA updates by base checkpoint key, modules_to_save replacements by longname, and
    saved base weights (`…base_layer.weight`) by base checkpoint key (the last two as adapter
    keys of the full weight). `problems` collects every mismatch found."""
    resolved: ResolvedModel
    adapter: TensorSource
    base: TensorSource
    kinds: dict[str, tuple[str, bool]]      # base longname → (layer_type, stored transposed)
    keys: dict[str, str]                    # base longname → base checkpoint key
    updates: dict[str, list[_LoraUpdate]] = field(default_factory=dict)
    replacements: dict[str, str] = field(default_factory=dict)
    overrides: dict[str, str] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)

    def __post_init__(self):
        # A LoRA/modules_to_save name may use another prefix than the base skeleton.
        self._by_name = KeyMatcher([f"{n}.weight" for n in self.kinds])

    def base_name(self, module: str) -> str:
        """The base longname an adapter module name refers to ("" if none)."""
        return (self._by_name(f"{module}.weight") or "")[: -len(".weight")]

    def add_lora(self, module: str, parts: dict[str, str]) -> None:
        name = self.base_name(module)
        if name not in self.kinds:
            return self.problems.append(f"{module}: no such layer in the base")
        kind, transposed = self.kinds[name]
        embedding = "lora_embedding_A" in parts or "lora_embedding_B" in parts
        a_key = parts.get("lora_embedding_A" if embedding else "lora_A.weight")
        b_key = parts.get("lora_embedding_B" if embedding else "lora_B.weight")
        if a_key is None or b_key is None:
            return self.problems.append(f"{module}: lora_A or lora_B missing")
        if (kind == "embedding") != embedding or kind not in ("linear", "embedding"):
            return self.problems.append(f"{module}: {'embedding ' if embedding else ''}LoRA on "
                                        f"a {kind} layer")
        cfg = self.resolved.adapter_config or {}
        # A (r, in), B (out, r)
        a_shape, b_shape = self.adapter.shapes[a_key], self.adapter.shapes[b_key]
        base_shape = tuple(self.base.shapes[self.keys[name]])
        r, scaling = _lora_scaling(cfg, module)
        delta_shape = (b_shape[0], a_shape[1])
        transpose = embedding or transposed        # delta (out, in) vs stored (in, out)
        if (not transpose and cfg.get("fan_in_fan_out") and delta_shape != base_shape
                and delta_shape == tuple(reversed(base_shape))):
            transpose = True    # base typed by the name/shape rule: a Conv1D stored (in, out)
        want = tuple(reversed(base_shape)) if transpose else base_shape
        if a_shape[0] != b_shape[1] or a_shape[0] != r:
            self.problems.append(f"{module}: rank mismatch A {list(a_shape)}, B {list(b_shape)}, "
                                 f"config r={r}" + ("" if "r" in cfg else " (peft's default: "
                                                    "adapter_config.json has no r)"))
        elif delta_shape != want:
            self.problems.append(f"{module}: B@A is {list(delta_shape)} but the base weight "
                                 f"{self.keys[name]} is {list(base_shape)}")
        else:
            self.updates.setdefault(self.keys[name], []).append(
                _LoraUpdate(module, a_key, b_key, scaling, transpose))

    def add_saved(self, module: str, key: str) -> None:
        """A full weight the adapter carries: a modules_to_save copy, or (`….base_layer`) the
        (possibly resized) base weight peft's save_embedding_layers stores, which peft loads
        into the base before merging the LoRA update on top."""
        saved_shape = self.adapter.shapes[key]
        is_base_layer = module.endswith(".base_layer")
        module = module[: -len(".base_layer")] if is_base_layer else module
        name = self.base_name(module)
        if name not in self.kinds:
            if is_base_layer:
                return self.problems.append(f"{module}: saved base weight {list(saved_shape)} "
                                            "does not fit the base")
            # A head the base class lacks (e.g. a classifier): analysed as an extra layer.
            if rule_layer_type(key, len(saved_shape)) is not None:
                logger.warning(f"{self.resolved.model_id}: modules_to_save {module!r} is not a "
                               "layer of the base; analysed as an additional layer")
                self.replacements[module] = key
            return
        base_shape = self.base.shapes[self.keys[name]]
        if saved_shape != base_shape:
            what = "saved base weight" if is_base_layer else "saved weight"
            return self.problems.append(f"{module}: {what} {list(saved_shape)} does not fit "
                                        f"the base {list(base_shape)}")
        if is_base_layer:
            self.overrides[self.keys[name]] = key
        else:
            self.replacements[name] = key

    def check(self) -> None:
        if self.problems:
            problems = self.problems
            raise ESDFailure("merge", "adapter_mismatch", f"{self.resolved.model_id} does not "
                             f"fit base {self.resolved.source_model}: " + "; ".join(problems[:5])
                             + (f"; … ({len(problems)} problems)" if len(problems) > 5 else ""))


def _plan_adapter(resolved: ResolvedModel, adapter: TensorSource, modules, keys,
                  base: TensorSource) -> _AdapterPlan:
    """Check every adapter tensor against the base (names, shapes, ranks) before anything is
    merged; a typed failure listing the mismatches, else the plan."""
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
    plan = _AdapterPlan(resolved, adapter, base,
                        {name: (kind, transposed) for name, kind, transposed in modules}, keys)
    for module, parts in sorted(pairs.items()):
        plan.add_lora(module, parts)
    for module, key in sorted(saved.items()):
        plan.add_saved(module, key)
    plan.check()
    return plan


def _apply_updates(weight: torch.Tensor, updates: list[_LoraUpdate],
                   adapter: TensorSource) -> torch.Tensor:
    """W += (B @ A)·s in place, as peft's merge (transposed for Conv1D / Embedding)."""
    for up in updates:
        a, b = adapter.tensor(up.a_key), adapter.tensor(up.b_key)  # (r, in), (out, r)
        delta = (b @ a) * up.scaling
        weight += delta.T if up.transpose else delta
        del a, b, delta
    return weight


# --------------------------------------------------------------------------- merging

def _merge_steps(modules, keys, plan: "_AdapterPlan", adapter: TensorSource) -> list[tuple[str, str, str, str]]:
    """The layers the streaming merge yields, in order, as (longname, layer_type, source,
    key), read no tensor: source "adapter" is a saved module's full weight (`modules_to_save`,
    also saved heads the base class lacks, after the model's layers), "merged" the base weight
    (or the adapter's override of it) with its LoRA updates; a tied module comes once."""
    replacements, done, steps = dict(plan.replacements), set(), []
    for name, kind, _ in modules:
        if name in replacements:
            steps.append((name, kind, "adapter", replacements.pop(name)))
        elif keys[name] not in done:
            done.add(keys[name])
            steps.append((name, kind, "merged", keys[name]))
    for name, key in replacements.items():
        kind = rule_layer_type(key, len(adapter.shapes[key]))
        if kind:
            steps.append((name, kind, "adapter", key))
    return steps


def iter_adapter_layers(resolved: ResolvedModel, on_plan=None):
    """The layers of an adapter merged into its base, one at a time: streaming for plain
    LoRA (every tensor checked first, `_plan_adapter`), else by peft (`_merge_with_peft`).
    on_plan: as `model_loader.iter_layers`' (streaming: also the adapter_update count)."""
    adapter = FileCheckpoint(resolved.weight_files)
    base_ckpt = None
    try:
        reason = _streaming_unsupported(resolved.adapter_config or {}, adapter)
        if reason is not None:
            adapter.close()
            logger.warning(f"{resolved.model_id}: {reason}: merged by peft on a full float32 CPU "
                           "copy of the base (memory: the whole model)")
            merged = list(_merge_with_peft(resolved))   # the model is in memory already
            if on_plan is not None:
                on_plan({"weights": len(merged)})
            yield from merged
            return
        base = resolved.base
        base_ckpt = open_weights(base.weight_files)     # streamed with --stream
        modules, keys = plan_layers(base, base_ckpt)
        plan_reads(base_ckpt, (keys[name] for name, _, _ in modules))
        plan = _plan_adapter(resolved, adapter, modules, keys, base_ckpt)
        steps = _merge_steps(modules, keys, plan, adapter)
        if on_plan is not None:
            on_plan({"weights": len(steps), "adapter_update": len(_updated_layers(modules, keys, plan))})
        for name, kind, source, key in steps:
            if source == "adapter":      # modules_to_save: the adapter's full weight
                tensor = adapter.tensor(key)
            else:
                weight = adapter.tensor(plan.overrides[key]) if key in plan.overrides \
                    else base_ckpt.tensor(key)
                tensor = _apply_updates(weight, plan.updates.get(key, []), adapter)
                del weight
            yield name, kind, tensor
            del tensor
    finally:
        adapter.close()
        if base_ckpt is not None:
            base_ckpt.close()


def _merge_with_peft(resolved: ResolvedModel):
    """Adapters the streaming merge does not cover (DoRA, lora_bias, conv LoRA, IA3, LoHa,
    LoKr, AdaLoRA, …): peft merges them itself. The base is built on CPU in float32 and
    filled from its checkpoint (every parameter's name and shape checked first),
    `PeftModel.from_pretrained(...).merge_and_unload()`, then its layers are yielded.
    Memory: the whole model in float32."""
    model = _filled_base_model(resolved)
    try:
        from peft import PeftModel
        merged = PeftModel.from_pretrained(model, str(resolved.local_dir)).merge_and_unload()
    except ESDFailure:
        raise
    except Exception as exc:  # noqa: BLE001 - size mismatches, unsupported configs
        reason = "adapter_mismatch" if "size mismatch" in str(exc) else "adapter_unsupported"
        raise ESDFailure("merge", reason, f"{resolved.model_id}: peft cannot merge it into "
                         f"{resolved.base.model_id}: {type(exc).__name__}: "
                         f"{str(exc)[:300]}") from None
    del model
    seen: set[int] = set()
    for name, module in list(merged.named_modules()):
        kind = module_layer_type(module)
        weight = getattr(module, "weight", None)
        if kind is None or weight is None or id(weight) in seen:
            continue
        seen.add(id(weight))
        yield name, kind[0], weight.detach().to(torch.float32)


def _filled_base_model(resolved: ResolvedModel) -> torch.nn.Module:
    """The base of `resolved` as a float32 CPU model holding its checkpoint's values."""
    base = resolved.base
    config = load_config(base)
    if config is None:
        raise ESDFailure("merge", "adapter_unsupported", f"{resolved.model_id}: needs peft's own "
                         f"merge, which needs a transformers config for base {base.model_id}")
    try:
        model = build_model(config, base.trust_remote_code, meta=False)
    except Exception as exc:  # noqa: BLE001
        raise ESDFailure("merge", "adapter_unsupported", f"{resolved.model_id}: cannot build base "
                         f"{base.model_id} for peft's merge: {str(exc)[:300]}") from None
    with open_weights(base.weight_files) as ckpt:
        sources = _base_sources(resolved, model, ckpt)
        with torch.no_grad():
            for target, key in sources:
                target.copy_(ckpt.tensor(key))
    return model


def _base_sources(resolved: ResolvedModel, model: torch.nn.Module,
                  ckpt: TensorSource) -> list[tuple[torch.Tensor, str]]:
    """(model tensor, checkpoint key) for every parameter and persistent buffer, after checking
    that every parameter is in the checkpoint with its shape (a tied parameter under any of
    its names); a buffer the checkpoint lacks keeps its computed value. Anything else would
    leave random initialisation in the merged model."""
    match = KeyMatcher(ckpt.shapes, getattr(model, "base_model_prefix", "") or "")
    params = {id(p) for p in model.parameters()}
    names_of: dict[int, list[str]] = {}
    tensor_of: dict[int, torch.Tensor] = {}
    for name, tensor in model.state_dict(keep_vars=True).items():   # tied: several names
        names_of.setdefault(id(tensor), []).append(name)
        tensor_of[id(tensor)] = tensor
    sources, problems = [], []
    for ident, names in names_of.items():
        tensor = tensor_of[ident]
        found = [(n, match(n)) for n in names if match(n) is not None]
        fitting = [key for _, key in found if tuple(ckpt.shapes[key]) == tuple(tensor.shape)]
        if fitting:
            sources.append((tensor, fitting[0]))
        elif found:
            problems.append(f"{found[0][0]}: checkpoint {found[0][1]} is "
                            f"{list(ckpt.shapes[found[0][1]])}, the config builds "
                            f"{list(tensor.shape)}")
        elif ident in params:
            problems.append(f"{names[0]}: not in the checkpoint")
    if problems:
        raise ESDFailure("merge", "adapter_mismatch", f"{resolved.model_id}: base "
                         f"{resolved.base.model_id} does not fit its own config, so peft would "
                         "merge into random weights: " + "; ".join(problems[:5]) +
                         (f"; … ({len(problems)} problems)" if len(problems) > 5 else ""))
    return sources


def adapter_update_unsupported(resolved: ResolvedModel) -> str | None:
    """Why the adapter has no plain LoRA update (α/r)·B·A for `iter_adapter_updates` (IA3,
    LoHa, DoRA, conv LoRA, …), or None; reads the adapter's tensor headers only."""
    with FileCheckpoint(resolved.weight_files) as adapter:
        return _streaming_unsupported(resolved.adapter_config or {}, adapter)


def _updated_layers(modules, keys, plan: "_AdapterPlan") -> list[tuple[str, str, str]]:
    """(longname, layer_type, base key) of the distinct layers a LoRA update changes."""
    return [layer for layer in distinct_layers(modules, keys) if layer[2] in plan.updates]


def iter_adapter_updates(resolved: ResolvedModel, on_plan=None):
    """The scaled LoRA update (α/r)·B·A of every layer the adapter changes, alone, shaped as
    the base weight is stored, as `(longname + ".adapter_update", layer_type, tensor)`. Only
    plain LoRA has such an update; the base is read for its shapes only. on_plan: as
    `model_loader.iter_layers`'."""
    suffix = LAYER_MODES["adapter_update"]
    adapter = FileCheckpoint(resolved.weight_files)
    base_ckpt = None
    try:
        reason = _streaming_unsupported(resolved.adapter_config or {}, adapter)
        if reason is not None:
            raise ESDFailure("merge", "adapter_unsupported", f"{resolved.model_id}: "
                             f"adapter_update analyses plain LoRA updates; this adapter has "
                             f"{reason}")
        base_ckpt = open_weights(resolved.base.weight_files)
        modules, keys = plan_layers(resolved.base, base_ckpt)
        plan = _plan_adapter(resolved, adapter, modules, keys, base_ckpt)
        if not plan.updates:
            raise ESDFailure("merge", "adapter_mismatch", f"{resolved.model_id}: the adapter "
                             "holds no LoRA update (only saved modules)")
        layers = _updated_layers(modules, keys, plan)
        if on_plan is not None:
            on_plan({"adapter_update": len(layers)})
        for name, kind, key in layers:
            update = torch.zeros(base_ckpt.shapes[key], dtype=torch.float32)
            yield name + suffix, kind, _apply_updates(update, plan.updates[key], adapter)
            del update
    finally:
        adapter.close()
        if base_ckpt is not None:
            base_ckpt.close()
