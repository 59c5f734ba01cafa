"""Tiny real models, adapters and references for the model_loader tests (built in temp dirs,
never downloaded)."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from esd.schema import LAYER_TYPES
from tiny_models import (bert_config, build, gpt2_config, llama_config, load_model,  # noqa: F401
                         save_adapter, save_model)

@pytest.fixture(autouse=True)
def offline_hub(tmp_path, monkeypatch):
    """No test may reach the network: offline hub, HF_HOME in a temp dir."""
    import huggingface_hub.constants as constants
    home = tmp_path / "hf_home"
    monkeypatch.setenv("HF_HOME", str(home))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(home / "hub"))
    return home / "hub"


def analysable_weights(model) -> dict[str, torch.Tensor]:
    """longname → weight of every analysable module, a tensor shared by two modules once
    (under its first name): the reference the loader must reproduce."""
    from torch import nn
    from transformers.pytorch_utils import Conv1D
    kinds = (nn.Linear, Conv1D, nn.Conv1d, nn.Conv2d, nn.Embedding)
    seen, out = set(), {}
    for name, module in model.named_modules():
        weight = getattr(module, "weight", None)
        if isinstance(module, kinds) and weight is not None and id(weight) not in seen:
            seen.add(id(weight))
            out[name] = weight.detach().float().clone()
    return out


def peft_merged(kind: str, base_dir: Path, adapter_dir: Path) -> dict[str, torch.Tensor]:
    """What peft's own merge_and_unload gives on a freshly loaded float32 base."""
    from peft import PeftModel
    base = load_model(kind, base_dir)
    merged = PeftModel.from_pretrained(base, str(adapter_dir)).merge_and_unload()
    return analysable_weights(merged)


def streamed(resolved, **kwargs) -> dict[str, torch.Tensor]:
    from model_loader import iter_layers
    out = {}
    for name, layer_type, tensor in iter_layers(resolved, **kwargs):
        assert name not in out, f"{name} yielded twice"
        assert tensor.dtype == torch.float32 and tensor.device.type == "cpu"
        assert layer_type in LAYER_TYPES
        out[name] = tensor
    return out


def assert_same_layers(got: dict, want: dict, atol: float = 1e-6) -> None:
    assert set(got) == set(want), f"extra {set(got) - set(want)}, missing {set(want) - set(got)}"
    for name in want:
        assert got[name].shape == want[name].shape, name
        diff = (got[name] - want[name]).abs().max().item()
        assert diff <= atol, f"{name}: max |diff| {diff}"
