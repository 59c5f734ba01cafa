"""Tiny real models and adapters for tests, built in temp dirs (never downloaded)."""
from __future__ import annotations

import json
from pathlib import Path

import torch


def save_gpt2(path: Path, seed: int = 0, n_layer: int = 2, n_embd: int = 64) -> Path:
    from transformers import GPT2Config, GPT2LMHeadModel
    torch.manual_seed(seed)
    config = GPT2Config(n_layer=n_layer, n_embd=n_embd, n_head=2, vocab_size=100, n_positions=32)
    GPT2LMHeadModel(config).save_pretrained(path)
    return Path(path)


def save_llama(path: Path, seed: int = 0, hidden: int = 64, intermediate: int = 128,
               layers: int = 2, vocab: int = 120) -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(seed)
    config = LlamaConfig(hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
                         num_attention_heads=4, num_key_value_heads=4, vocab_size=vocab,
                         max_position_embeddings=64)
    LlamaForCausalLM(config).save_pretrained(path)
    return Path(path)


def save_bert(path: Path, seed: int = 0) -> Path:
    from transformers import BertConfig, BertModel
    torch.manual_seed(seed)
    config = BertConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=128, vocab_size=100, max_position_embeddings=64)
    BertModel(config).save_pretrained(path)
    return Path(path)


def save_lora_adapter(base_dir: Path, path: Path, base_id: str | None = None, seed: int = 0,
                      **lora_kwargs) -> Path:
    """A real peft LoRA adapter with non-zero weights; `base_id` is written as its base."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM
    torch.manual_seed(seed)
    base = AutoModelForCausalLM.from_pretrained(base_dir)
    options = {"r": 4, "lora_alpha": 8, "init_lora_weights": False}
    options.update(lora_kwargs)
    get_peft_model(base, LoraConfig(**options)).save_pretrained(path)
    config_path = Path(path) / "adapter_config.json"
    data = json.loads(config_path.read_text())
    data["base_model_name_or_path"] = base_id or str(base_dir)
    config_path.write_text(json.dumps(data))
    return Path(path)


def write_model_list(path: Path, rows: list[dict]) -> Path:
    import csv
    columns = ["model_id", "source_model", "base_model_relation", "revision"]
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns)
        writer.writeheader()
        for row in rows:
            writer.writerow({c: row.get(c, "") for c in columns})
    return Path(path)
