"""Tiny real models and adapters for tests, built in temp dirs (never downloaded).

The one place the test suite builds models: configs, `build`, `save_model`, `save_adapter`,
and the short helpers the experiment tests use (`save_gpt2`, `save_llama`, …)."""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch


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


def save_model(kind: str, path: Path, seed: int = 0, dtype=None, config: dict | None = None,
               **save_kwargs) -> Path:
    """`build(kind, seed, **config)` saved with `save_pretrained(path, **save_kwargs)`."""
    model = build(kind, seed, **(config or {}))
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


def save_gpt2(path: Path, seed: int = 0, n_embd: int = 64) -> Path:
    return save_model("gpt2", path, seed, config={"n_embd": n_embd})


def save_llama(path: Path, seed: int = 0, hidden: int = 64, intermediate: int = 128,
               layers: int = 2, vocab: int = 120) -> Path:
    return save_model("llama", path, seed, config={
        "hidden_size": hidden, "intermediate_size": intermediate, "num_hidden_layers": layers,
        "vocab_size": vocab})


def save_bert(path: Path, seed: int = 0) -> Path:
    return save_model("bert", path, seed)


def save_lora_adapter(base_dir: Path, path: Path, base_id: str | None = None, seed: int = 0,
                      **lora_kwargs) -> Path:
    """A real peft LoRA adapter (causal-LM base) with non-zero weights."""
    kind = json.loads((Path(base_dir) / "config.json").read_text())["model_type"]
    return save_adapter(kind, base_dir, path, seed=seed, base_id=base_id, **lora_kwargs)


def save_fine_tune(base: Path, path: Path, seed: int, scale: float = 0.05, changed=None) -> Path:
    """A copy of the checkpoint `base` with weights moved by `scale`·N(0, 1) noise drawn from
    `seed` (every tensor, or only the keys in `changed`): a fine-tune in the same layout."""
    from safetensors.torch import load_file, save_file
    path = Path(path)
    path.mkdir()
    state = load_file(str(Path(base) / "model.safetensors"))
    generator = torch.Generator().manual_seed(seed)
    for key in (state if changed is None else changed):
        state[key] = state[key] + scale * torch.randn(state[key].shape, generator=generator)
    save_file(state, str(path / "model.safetensors"), metadata={"format": "pt"})
    (path / "config.json").write_text((Path(base) / "config.json").read_text())
    return path


def write_model_list(path: Path, rows: list[dict]) -> Path:
    import csv
    columns = ["model_id", "source_model", "base_model_relation", "revision"]
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns)
        writer.writeheader()
        for row in rows:
            writer.writerow({c: row.get(c, "") for c in columns})
    return Path(path)


def offline_env(tmp_path: Path) -> dict:
    """The environment of a run or worker subprocess in a test: a private, offline hub cache
    and this checkout importable."""
    environment = dict(os.environ, HF_HOME=str(tmp_path / "hf_home"), HF_HUB_OFFLINE="1",
                       PYTHONPATH=str(Path(__file__).resolve().parents[1]))
    environment.pop("HF_HUB_CACHE", None)
    return environment
