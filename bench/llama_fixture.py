"""A local, randomly initialised Llama checkpoint for benchmarks (no network).

`build_llama_checkpoint` writes a LlamaForCausalLM with TinyLlama-1.1B's layer shapes
(hidden 2048, intermediate 5632, 32 heads, 4 key/value heads, vocab 32000) but only
`num_layers` decoder layers, saved as safetensors in `dtype` (float32: the 1.2 GB anchor of
bench/bench_esd.py; bfloat16 as most hub checkpoints).
"""

import shutil
from pathlib import Path

import torch

DEFAULT_WORK_DIR = Path(__file__).resolve().parent / "_work"


def _checkpoint_is_complete(out_dir: Path) -> bool:
    return (out_dir / "config.json").is_file() and any(out_dir.glob("*.safetensors"))


def build_llama_checkpoint(out_dir=DEFAULT_WORK_DIR / "llama", num_layers=4, hidden=2048,
                           intermediate=5632, vocab=32000, dtype=torch.bfloat16) -> Path:
    """Directory with config.json + model*.safetensors of a seeded random Llama; reused when
    already there (delete the directory to rebuild with other sizes)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    out_dir = Path(out_dir)
    if _checkpoint_is_complete(out_dir):
        return out_dir
    config = LlamaConfig(
        hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=num_layers,
        num_attention_heads=max(1, hidden // 64), num_key_value_heads=max(1, hidden // 512),
        vocab_size=vocab, tie_word_embeddings=False, torch_dtype=str(dtype).removeprefix("torch."))
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)  # normal(0, initializer_range) init on CPU
    model.to(dtype)
    if out_dir.exists():
        raise FileExistsError(f"{out_dir} exists but holds no complete checkpoint; remove it")
    tmp_dir = out_dir.with_name(out_dir.name + ".tmp")
    shutil.rmtree(tmp_dir, ignore_errors=True)  # left over by an interrupted build
    model.save_pretrained(tmp_dir, safe_serialization=True)
    tmp_dir.rename(out_dir)  # a directory that exists is complete
    return out_dir
