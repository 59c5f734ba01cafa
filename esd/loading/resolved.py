"""A model id resolved to files on disk, and the file names the loader looks for.

Owns the `ResolvedModel` record shared by every loading module: frozen, built once by
resolution (`model_loader.resolve_model`), holding the `ModelEntry` that was asked for
instead of copies of its fields. Must not do any I/O.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from esd.loading.log import Warn
from esd.model_list import ModelEntry

CONFIG_FILE = "config.json"
ADAPTER_CONFIG_FILE = "adapter_config.json"
ADAPTER_WEIGHT_FILES = ("adapter_model.safetensors", "adapter_model.bin")
SAFETENSORS_INDEX = "model.safetensors.index.json"
BIN_INDEX = "pytorch_model.bin.index.json"


@dataclass
class Findings:
    """What loading learns about a resolved model after resolution: planning reads its
    config and may find the architecture needs the model's own code."""
    needs_remote_code: bool = False


@dataclass(frozen=True)
class ResolvedModel:
    """A model entry resolved to files on disk (and, for an adapter, its resolved base)."""
    entry: ModelEntry             # what was asked: id, revision, the base the model list names
    local_dir: Path               # the directory the id resolved to (hub snapshot or local)
    revision: str | None = None   # the requested revision (`main` for hub ids without one)
    commit: str | None = None     # hub commit of the snapshot, when resolved through the hub
    is_adapter: bool = False
    base: "ResolvedModel | None" = None    # an adapter's resolved base
    weights_dir: Path | None = None        # where the weight files are (may be a subfolder)
    weight_files: tuple[Path, ...] = ()
    config_path: Path | None = None
    adapter_config: dict | None = field(default=None, hash=False)
    trust_remote_code: bool = False
    warn: Warn | None = field(default=None, repr=False, compare=False)  # where its warnings go
    found: Findings = field(default_factory=Findings, repr=False, compare=False)

    @property
    def model_id(self) -> str:
        """The id in messages: the real directory of a local entry, else the id without `@rev`."""
        return self.entry.local_dir or self.entry.model_id

    @property
    def source_model(self) -> str | None:
        """An adapter's base as resolved (`id`, `id@rev` off `main`); else the entry's base as
        the model list wrote it."""
        if self.base is not None:
            name, revision = self.base.entry.model_id, self.base.revision
            return name if revision in (None, "main") else f"{name}@{revision}"
        return self.entry.source_model or None

    @property
    def needs_remote_code(self) -> bool:
        """The config needs the model's own code (found while planning its layers)."""
        return self.found.needs_remote_code
