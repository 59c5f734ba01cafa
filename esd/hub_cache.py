"""Where the huggingface_hub cache is: the one rule, read at call time (a test or a user may
set `HF_HOME` after import).

Owns `hub_cache_dir` and `offline_in` (whether an environment says HF_HUB_OFFLINE). A leaf:
imports nothing of the project, so the records (`diskfull` naming the disk that filled),
loading (`esd/loading/hub.py`) and the download stage share it without importing each other.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Mapping


def offline_in(env: Mapping[str, str] = os.environ) -> bool:
    """HF_HUB_OFFLINE set in `env` (read now; huggingface_hub reads it once, at import)."""
    return env.get("HF_HUB_OFFLINE", "").strip().upper() in {"1", "ON", "YES", "TRUE"}


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
