"""Tiny real models, adapters and references for the model_loader tests (built in temp dirs,
never downloaded)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

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


def gpt2_config(n_embd: int = 64):
    from transformers import GPT2Config
    return GPT2Config(n_layer=2, n_embd=n_embd, n_head=2, vocab_size=100, n_positions=32,
                      bos_token_id=0, eos_token_id=0)


def llama_config(**overrides):
    from transformers import LlamaConfig
    options = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                   num_attention_heads=4, num_key_value_heads=2, vocab_size=120,
                   max_position_embeddings=64, bos_token_id=0, eos_token_id=0, pad_token_id=0)
    options.update(overrides)
    return LlamaConfig(**options)


def bert_config():
    from transformers import BertConfig
    return BertConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=2,
                      intermediate_size=128, vocab_size=100, max_position_embeddings=64)


def build(kind: str, seed: int = 0, **overrides):
    from transformers import BertModel, GPT2LMHeadModel, LlamaForCausalLM
    torch.manual_seed(seed)
    if kind == "gpt2":
        return GPT2LMHeadModel(gpt2_config(**overrides))
    if kind == "llama":
        return LlamaForCausalLM(llama_config(**overrides))
    if kind == "bert":
        return BertModel(bert_config())
    raise ValueError(kind)


def save_model(kind: str, path: Path, seed: int = 0, dtype=None, **save_kwargs) -> Path:
    model = build(kind, seed)
    if dtype is not None:
        model = model.to(dtype)
    model.save_pretrained(path, **save_kwargs)
    return Path(path)


def load_model(kind: str, path: Path):
    from transformers import AutoModel, AutoModelForCausalLM
    auto = AutoModel if kind == "bert" else AutoModelForCausalLM
    return auto.from_pretrained(path, dtype=torch.float32)


def save_adapter(kind: str, base_dir: Path, path: Path, seed: int = 1, base_id: str | None = None,
                 peft_config=None, **lora_kwargs) -> Path:
    """A real peft adapter with non-zero weights, trained on nothing; base recorded as
    `base_id` (default: the base directory)."""
    from peft import LoraConfig, get_peft_model
    base = load_model(kind, base_dir)
    torch.manual_seed(seed)
    if peft_config is None:
        options = {"r": 4, "lora_alpha": 8, "init_lora_weights": False}
        options.update(lora_kwargs)
        peft_config = LoraConfig(**options)
    peft_model = get_peft_model(base, peft_config)
    with torch.no_grad():  # DoRA magnitudes / IA3 vectors start at identity: perturb them
        for name, param in peft_model.named_parameters():
            if "magnitude" in name or "ia3_l" in name:
                param.mul_(1 + 0.1 * torch.rand_like(param))
    peft_model.save_pretrained(path)
    config_path = Path(path) / "adapter_config.json"
    data = json.loads(config_path.read_text())
    data["base_model_name_or_path"] = base_id or str(base_dir)
    config_path.write_text(json.dumps(data))
    return Path(path)


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
        assert layer_type in ("linear", "conv1d", "conv2d", "embedding")
        out[name] = tensor
    return out


def assert_same_layers(got: dict, want: dict, atol: float = 1e-6) -> None:
    assert set(got) == set(want), f"extra {set(got) - set(want)}, missing {set(want) - set(got)}"
    for name in want:
        assert got[name].shape == want[name].shape, name
        diff = (got[name] - want[name]).abs().max().item()
        assert diff <= atol, f"{name}: max |diff| {diff}"
