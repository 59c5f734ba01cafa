"""A model id resolved to files on disk, and the file names the loader looks for.

Owns the `ResolvedModel` record shared by every loading module. Must not do any I/O.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from esd.loading.log import Warn

CONFIG_FILE = "config.json"
ADAPTER_CONFIG_FILE = "adapter_config.json"
ADAPTER_WEIGHT_FILES = ("adapter_model.safetensors", "adapter_model.bin")
SAFETENSORS_INDEX = "model.safetensors.index.json"
BIN_INDEX = "pytorch_model.bin.index.json"


@dataclass
class ResolvedModel:
    """A model id resolved to files on disk (and, for an adapter, its resolved base)."""
    model_id: str
    revision: str | None          # the requested revision (`main` for hub ids without one)
    local_dir: Path               # the directory the id resolved to (hub snapshot or local)
    is_adapter: bool
    source_model: str | None      # base id actually used (adapters); the hint otherwise
    base: "ResolvedModel | None" = None
    commit: str | None = None     # hub commit of the snapshot, when resolved through the hub
    weights_dir: Path | None = None     # where the weight files are (may be a subfolder)
    weight_files: tuple[Path, ...] = ()
    config_path: Path | None = None
    adapter_config: dict | None = None
    trust_remote_code: bool = False
    warn: Warn | None = field(default=None, repr=False, compare=False)  # where its warnings go
    needs_remote_code: bool = field(default=False, repr=False)  # config needs custom code
