"""Where the huggingface_hub cache is: the one rule, read at call time (a test or a user may
set `HF_HOME` after import).

Owns `hub_cache_dir`. A leaf: imports nothing of the project, so the records (`diskfull`
naming the disk that filled) and loading (`esd/loading/hub.py`) share it without importing
each other.
"""
from __future__ import annotations

import os
from pathlib import Path


def hub_cache_dir(cache_dir: str | os.PathLike | None = None) -> Path:
    """The hub cache: argument, else HF_HUB_CACHE / HF_HOME read now, else the hub default."""
    if cache_dir:
        return Path(cache_dir)
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"])
    if os.environ.get("HF_HOME"):
        return Path(os.environ["HF_HOME"]) / "hub"
    from huggingface_hub import constants
    return Path(constants.HF_HUB_CACHE)
