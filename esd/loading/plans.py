"""A cache of layer plans, so a worker whose model's architecture was planned before does not
import transformers at all (its import, ≈ 3 s, is most of a small model's worker time).

A plan (`layers.plan_layers`: the analysable modules in model order and their checkpoint
keys) depends only on what the skeleton is built from and matched against: config.json
(without the fields that name or date the checkpoint: `_name_or_path`, `transformers_version`,
`torch_dtype`/`dtype`, `_commit_hash`), the transformers version, `trust_remote_code`, and
the checkpoint's tensor names, shapes and float-ness. The cache key is a hash of exactly that,
so fine-tunes of one base share one plan and a plan is never reused for anything else.
An entry also keeps the warnings planning gave (replayed on a hit, so a worker's log reads the
same either way) and whether the config needs remote code.

Not cached (planned afresh every time): architectures with remote code (`auto_map` with
`trust_remote_code`: the code can change under the same config), and plans that compared
tensor values (a tied weight stored twice: the answer depends on the values, not the shapes).

Where: `use_plan_cache(dir)` (the worker: `<output_dir>/.cache/plans/`, shared by the run's
workers, Slurm tasks included); off until then. An entry is one JSON file written atomically;
an unreadable or inconsistent entry is a miss; a failed write (full disk) is ignored: the
cache can only save time, never fail a model or change a result.

Must not: import transformers or torch, or decide what a layer is (that is `layers.py`).
"""
from __future__ import annotations

import hashlib
import json
from importlib import metadata
from pathlib import Path

from esd.atomic_files import write_text_atomic
from esd.loading.log import logger
from esd.loading.resolved import ResolvedModel

PLAN_FORMAT = 1
# config.json fields that name or date a checkpoint and cannot change its modules
_NOISE_FIELDS = ("_name_or_path", "transformers_version", "torch_dtype", "dtype", "_commit_hash")

_cache_dir: Path | None = None


def use_plan_cache(directory: str | Path | None) -> None:
    """Keep plans in `directory` (None: no cache)."""
    global _cache_dir
    _cache_dir = None if directory is None else Path(directory)


def plan_key(resolved: ResolvedModel, shapes: dict, floating: dict) -> str | None:
    """The cache key of a model's plan, or None when its plan must not be cached."""
    config = {}
    if resolved.config_path is not None:
        try:
            config = json.loads(resolved.config_path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None  # planning will say what is wrong with it
        if not isinstance(config, dict):
            return None
        if resolved.trust_remote_code and config.get("auto_map"):
            return None
        config = {k: v for k, v in config.items() if k not in _NOISE_FIELDS}
    try:
        transformers_version = metadata.version("transformers")
    except metadata.PackageNotFoundError:
        transformers_version = None
    tensors = sorted((key, list(shape), bool(floating.get(key, True))) for key, shape in shapes.items())
    text = json.dumps({"format": PLAN_FORMAT, "config": config, "has_config": resolved.config_path is not None,
                       "transformers": transformers_version, "trust_remote_code": resolved.trust_remote_code,
                       "tensors": tensors}, sort_keys=True, default=str)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def load_plan(key: str | None, shapes: dict):
    """(modules, keys, warnings, needs_remote_code) of a cached plan, or None."""
    if key is None or _cache_dir is None:
        return None
    path = _cache_dir / f"{key}.json"
    try:
        if not path.is_file():
            return None
        entry = json.loads(path.read_text(encoding="utf-8"))
        modules = [(str(name), str(kind), bool(transposed)) for name, kind, transposed in entry["modules"]]
        keys = {str(name): str(key_) for name, key_ in entry["keys"].items()}
        warnings = [str(message) for message in entry["warnings"]]
        needs_remote_code = bool(entry["needs_remote_code"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if any(name not in keys or keys[name] not in shapes for name, _, _ in modules):
        return None  # not a plan of this checkpoint
    return modules, keys, warnings, needs_remote_code


def save_plan(key: str | None, modules: list, keys: dict, warnings: list[str],
              needs_remote_code: bool) -> None:
    if key is None or _cache_dir is None:
        return
    entry = {"format": PLAN_FORMAT, "modules": [list(m) for m in modules], "keys": keys,
             "warnings": list(warnings), "needs_remote_code": needs_remote_code}
    try:
        _cache_dir.mkdir(parents=True, exist_ok=True)
        write_text_atomic(_cache_dir / f"{key}.json", json.dumps(entry))
    except OSError as exc:  # a full disk, a read-only folder: plan again next time
        logger.debug("plan cache: cannot write %s: %s", _cache_dir, exc)
