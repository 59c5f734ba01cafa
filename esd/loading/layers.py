"""Which tensors of a model are layers, and of which type — without instantiating weights.

Owns: building the model skeleton from config.json on the meta device (class from
`config.architectures`, else AutoModel; `load_config`, `build_model`), matching its parameter
names to checkpoint keys across prefix differences (`KeyMatcher`), tied weights (a tensor
shared by two modules is one layer, under the first name; two different copies in the
checkpoint are two layers), and the name/shape rule for weights outside the skeleton or
checkpoints transformers cannot build (`rule_layer_type`): `*.weight` 2-D → `linear`
(`embedding` if the name says embed/wte/wpe/…), 3-D → `conv1d`, 4-D → `conv2d`.
A plan is cached by content (`plans.py`): a model whose architecture was planned before is
planned without importing transformers.
Also walking an instantiated nn.Module (`iter_model_layers`, used by `net_esd_estimator(net)`):
Linear / transformers Conv1D → `linear`, Conv1d → `conv1d`, Conv2d → `conv2d`,
Embedding → `embedding`.

Must not: read tensor data except to compare two copies of a tied weight, merge adapters,
or compute a metric.
"""
from __future__ import annotations

import re
from typing import Iterator

import torch
from torch import nn

from esd.failures import ESDFailure
from esd.loading.checkpoint import TensorSource
from esd.loading.formats import check_index_complete
from esd.loading.log import logger, recorded_warnings
from esd.loading.plans import load_plan, plan_key, save_plan
from esd.loading.resolved import ResolvedModel

# Names that make a 2-D weight an embedding under the name/shape rule.
EMBEDDING_NAME = re.compile(r"(embed|wte|wpe|word_embeddings|position_embeddings|"
                            r"token_type_embeddings|tok_embeddings|shared)", re.IGNORECASE)


def rule_layer_type(key: str, ndim: int) -> str | None:
    """The name/shape rule: 2-D → linear (embedding if the name says so), 3-D → conv1d,
    4-D → conv2d, anything else → not analysed."""
    if ndim == 2:
        return "embedding" if EMBEDDING_NAME.search(key) else "linear"
    return {3: "conv1d", 4: "conv2d"}.get(ndim)


def _conv1d_transformers_class():
    """transformers' GPT-2 style Conv1D class, or None when transformers is not installed."""
    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:
        return None
    return Conv1D


def module_layer_type(module: nn.Module) -> tuple[str, bool] | None:
    """(layer_type, stored transposed) of an analysable module, else None."""
    hf_conv1d = _conv1d_transformers_class()
    if hf_conv1d is not None and isinstance(module, hf_conv1d):
        return "linear", True       # a dense matrix stored (in, out)
    if isinstance(module, nn.Linear):
        return "linear", False
    if isinstance(module, nn.Conv1d):
        return "conv1d", False
    if isinstance(module, nn.Conv2d):
        return "conv2d", False
    if isinstance(module, nn.Embedding):
        return "embedding", False
    return None


def iter_model_layers(net: nn.Module) -> Iterator[tuple[str, str, torch.Tensor]]:
    """(longname, layer_type, weight) for every analysed module of net, in module order.
    A weight shared by several modules (tied embeddings / lm_head) is yielded once, under
    the first name."""
    seen: set[int] = set()
    for name, module in net.named_modules():
        kind = module_layer_type(module)
        weight = getattr(module, "weight", None)
        if kind is None or not isinstance(weight, torch.Tensor) or id(weight) in seen:
            continue
        seen.add(id(weight))
        yield name, kind[0], weight.detach()


def load_config(resolved: ResolvedModel):
    """The transformers config, or None (with a warning) when it cannot be built."""
    if resolved.config_path is None:
        logger.warning(f"{resolved.model_id}: no config.json; layers found by the name/shape rule")
        return None
    from transformers import AutoConfig
    try:
        return AutoConfig.from_pretrained(str(resolved.config_path.parent),
                                          trust_remote_code=resolved.trust_remote_code)
    except Exception as exc:  # noqa: BLE001 - unknown model_type, remote code, bad values
        if "trust_remote_code" in str(exc) and not resolved.trust_remote_code:
            logger.warning(f"{resolved.model_id}: architecture needs trust_remote_code (not "
                           "given); layers found by the name/shape rule")
            resolved.found.needs_remote_code = True
        else:
            logger.warning(f"{resolved.model_id}: transformers cannot read its config "
                           f"({type(exc).__name__}: {str(exc)[:200]}); layers found by the "
                           "name/shape rule")
        return None


def build_model(config, trust_remote_code: bool, meta: bool) -> nn.Module:
    """The model of `config.architectures[0]` (AutoModel as fallback), on the meta device
    (no memory) or on CPU in float32."""
    import transformers
    candidates = []
    for arch in (getattr(config, "architectures", None) or [])[:1]:
        cls = getattr(transformers, arch, None)
        if isinstance(cls, type) and issubclass(cls, transformers.PreTrainedModel):
            candidates.append(lambda cls=cls: cls._from_config(config, dtype=torch.float32))
    auto_kwargs = {"trust_remote_code": trust_remote_code, "dtype": torch.float32}
    if trust_remote_code and getattr(config, "auto_map", None):
        for auto_name in ("AutoModelForCausalLM", "AutoModel"):
            if auto_name in config.auto_map:
                auto = getattr(transformers, auto_name)
                candidates.append(lambda auto=auto: auto.from_config(config, **auto_kwargs))
    candidates.append(lambda: transformers.AutoModel.from_config(config, **auto_kwargs))
    last: Exception | None = None
    for build in candidates:
        try:
            if meta:
                with torch.device("meta"):
                    return build()
            return build()
        except Exception as exc:  # noqa: BLE001 - try the next class
            last = exc
    raise RuntimeError(f"{type(last).__name__}: {last}")


class KeyMatcher:
    """Maps a module parameter name to a checkpoint key, across prefix differences
    (`bert.`/`model.`/`transformer.` present in one and not the other, sentence-transformers
    checkpoints saved without prefix, adapters trained on another head class)."""

    def __init__(self, keys, base_prefix: str = ""):
        self.keys = set(keys)
        self.prefix = base_prefix
        self._by_suffix: dict[str, str | None] = {}
        for key in self.keys:
            parts = key.split(".")
            for i in range(1, len(parts) - 1):
                suffix = ".".join(parts[i:])
                self._by_suffix[suffix] = None if suffix in self._by_suffix else key

    def __call__(self, name: str) -> str | None:
        if name in self.keys:
            return name
        p = self.prefix
        if p and name.startswith(p + ".") and name[len(p) + 1:] in self.keys:
            return name[len(p) + 1:]
        if p and f"{p}.{name}" in self.keys:
            return f"{p}.{name}"
        if self._by_suffix.get(name):       # the key has an extra leading prefix
            return self._by_suffix[name]
        parts = name.split(".")
        for i in (1, 2):                    # the name has one or two extra leading components
            suffix = ".".join(parts[i:])
            if len(parts) - i >= 2 and suffix in self.keys:
                return suffix
        return None


def plan_layers(resolved: ResolvedModel,
                ckpt: TensorSource) -> tuple[list[tuple[str, str, bool]], dict[str, str]]:
    """The analysable modules in model order, as (longname, layer_type, transposed), and the
    checkpoint key of each. Tied modules map to the same key. Linear in the number of
    modules and tensors: each is looked at a fixed number of times."""
    check_index_complete(resolved.weight_files, ckpt)
    key = plan_key(resolved, ckpt.shapes, ckpt.floating)
    cached = load_plan(key, ckpt.shapes)
    if cached is not None:  # planned before: same config, transformers and tensors
        modules, keys, warnings, needs_remote_code = cached
        for message in warnings:
            logger.warning(message)
        resolved.found.needs_remote_code = resolved.needs_remote_code or needs_remote_code
    else:
        with recorded_warnings() as warnings:
            modules, keys, compared_values = _plan(resolved, ckpt)
        if not compared_values:
            save_plan(key, modules, keys, warnings, resolved.needs_remote_code)
    _check_plan(resolved, ckpt, modules, keys)
    return modules, keys


def _plan(resolved: ResolvedModel, ckpt: TensorSource):
    """(modules, keys, whether tensor values were compared) from the skeleton and the rule."""
    model = _skeleton(resolved)
    modules: list[tuple[str, str, bool]] = []
    keys: dict[str, str] = {}
    claimed: set[str] = set()
    compared: list[bool] = []
    if model is not None:
        claimed = _skeleton_layers(resolved, model, ckpt, modules, keys, compared)
        del model
    leftovers = [k for k, s in ckpt.shapes.items() if k not in claimed and k.endswith(".weight")
                 and rule_layer_type(k, len(s))]
    if leftovers and modules:
        logger.warning(f"{resolved.model_id}: {len(leftovers)} checkpoint weight(s) outside the "
                       f"model skeleton, analysed by the name/shape rule: "
                       f"{', '.join(leftovers[:5])}")
    for key in sorted(leftovers, key=natural_key):
        name = key[: -len(".weight")]
        modules.append((name, rule_layer_type(key, len(ckpt.shapes[key])), False))
        keys[name] = key
    return modules, keys, bool(compared)


def distinct_layers(modules: list[tuple[str, str, bool]],
                    keys: dict[str, str]) -> Iterator[tuple[str, str, str]]:
    """(longname, layer_type, checkpoint key) of a plan, in model order; a tensor tied to an
    earlier module (tied embeddings / lm_head) comes once, under the first name."""
    done: set[str] = set()
    for name, kind, _ in modules:
        if keys[name] not in done:
            done.add(keys[name])
            yield name, kind, keys[name]


def _skeleton(resolved: ResolvedModel) -> nn.Module | None:
    """The model built from config.json on the meta device, or None (with a warning)."""
    config = load_config(resolved)
    if config is None:
        return None
    try:
        return build_model(config, resolved.trust_remote_code, meta=True)
    except Exception as exc:  # noqa: BLE001
        logger.warning(f"{resolved.model_id}: transformers cannot build "
                       f"{getattr(config, 'architectures', None)} ({str(exc)[:200]}); "
                       "layers found by the name/shape rule")
        return None


def _skeleton_layers(resolved: ResolvedModel, model: nn.Module, ckpt: TensorSource,
                     modules: list, keys: dict, compared: list) -> set[str]:
    """Append the skeleton's analysable modules found in the checkpoint to `modules` / `keys`;
    returns every checkpoint key the skeleton accounts for (parameters included). Appends to
    `compared` when tensor values had to be compared (a tied weight stored twice)."""
    match = KeyMatcher(ckpt.shapes, getattr(model, "base_model_prefix", "") or "")
    key_of_param: dict[int, str] = {}   # tied modules share one Parameter: its first key
    claimed: set[str] = set()
    for name, param in model.named_parameters(remove_duplicate=False):
        key = match(name)
        if key is not None:
            key_of_param.setdefault(id(param), key)
            claimed.add(key)
    missing = []
    for name, module in model.named_modules(remove_duplicate=False):
        kind = module_layer_type(module)
        weight = getattr(module, "weight", None)
        if kind is None or weight is None:
            continue
        own_key = match(f"{name}.weight")
        key = key_of_param.get(id(weight)) or own_key
        if own_key is not None and key != own_key:
            compared.append(True)
        if own_key is not None and key != own_key and not _same_values(ckpt, key, own_key):
            # Tied in the config, but the checkpoint holds two different copies:
            # transformers unties them on loading, so both are layers of the model.
            logger.warning(f"{resolved.model_id}: {name} is tied to {key} in the config but "
                           f"the checkpoint holds a different {own_key}; both are analysed")
            key = own_key
        if key is None:
            missing.append(name)
            continue
        modules.append((name, kind[0], kind[1]))
        keys[name] = key
        claimed.add(key)
    if missing:
        logger.warning(f"{resolved.model_id}: {len(missing)} module(s) not in the "
                       "checkpoint, skipped (transformers would initialise them randomly): "
                       f"{', '.join(missing[:5])}")
    return claimed


def _check_plan(resolved: ResolvedModel, ckpt: TensorSource, modules: list, keys: dict) -> None:
    """No layer at all, or integer layers (quantized without saying so), is a typed failure."""
    not_float = [keys[name] for name, _, _ in modules if not ckpt.floating.get(keys[name], True)]
    if not_float:
        raise ESDFailure("load", "quantized_unsupported", f"{resolved.model_id}: integer/bool "
                         f"layer weights ({', '.join(not_float[:3])}): a quantized checkpoint "
                         "without quantization_config? Its spectra are not those of the model")
    if not modules:
        if resolved.needs_remote_code:
            raise ESDFailure("load", "trust_remote_code_required", f"{resolved.model_id}: custom "
                             "architecture and the name/shape rule finds no layer; rerun with "
                             "trust_remote_code")
        raise ESDFailure("load", "no_weights", f"{resolved.model_id}: no analysable weight "
                         "(2-D/3-D/4-D `*.weight`) in the checkpoint")


def _same_values(ckpt: TensorSource, key: str, other: str) -> bool:
    """Whether two checkpoint tensors hold the same values (two copies of a tied weight)."""
    if ckpt.shapes[key] != ckpt.shapes[other]:
        return False
    return torch.equal(ckpt.tensor(key), ckpt.tensor(other))


def natural_key(text: str):
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", text)]
