"""Benchmark: the loader's planning and reading costs that must not grow with model size.

    python bench/bench_loader.py [--layers 800] [--keys 100000]

1. Planning a config whose `n_layer` far exceeds its 2-layer GPT-2 checkpoint, against the
   anchor of planning the matching 2-layer config, in the same run. Linear planning keeps the
   ratio near the size ratio of the skeletons; the old per-module parameter walk made it
   quadratic (86 s at 800 layers).
2. Planning a real 70B-shaped Llama config (80 layers, 723 tensors; shapes only, no data).
3. Reading 200 tensors of a safetensors file with a `--keys`-entry header: our reader
   (header parsed once per file) against opening the file with the safetensors library per
   tensor (header parsed per tensor, what the loader did before), in the same run.
No asserts: read the figures and ratios.
"""

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))


class ShapesOnly:
    """A TensorSource with shapes only (a checkpoint's header without its data)."""

    def __init__(self, state_dict):
        self.shapes = {k: tuple(v.shape) for k, v in state_dict.items()}
        self.floating = {k: True for k in self.shapes}

    def keys(self):
        return self.shapes.keys()

    def close(self):
        pass


def plan_seconds(config_dir: Path, source) -> tuple[float, int]:
    from esd.loading.layers import plan_layers
    from esd.loading.log import warnings_to
    from esd.loading.resolved import ResolvedModel
    from esd.model_list import ModelEntry
    resolved = ResolvedModel(ModelEntry("bench"), config_dir, config_path=config_dir / "config.json")
    start = time.perf_counter()
    with warnings_to(lambda message: None):
        modules, _ = plan_layers(resolved, source)
    return time.perf_counter() - start, len(modules)


def bench_planning(work: Path, layers: int) -> None:
    from tiny_models import build
    from transformers import GPT2Config, LlamaConfig, LlamaForCausalLM
    source = ShapesOnly({k: v for k, v in build("gpt2").state_dict().items()
                         if k != "lm_head.weight"})    # tied: saved once, as transformers does
    for n_layer in (2, layers):
        folder = work / f"gpt2_{n_layer}"
        GPT2Config(n_layer=n_layer, n_embd=64, n_head=2, vocab_size=100, n_positions=32,
                   architectures=["GPT2LMHeadModel"]).save_pretrained(folder)
    anchor, _ = plan_seconds(work / "gpt2_2", source)
    wide, found = plan_seconds(work / f"gpt2_{layers}", source)
    print(f"planning, 2-layer checkpoint: config of 2 layers {anchor:.3f} s; of {layers} layers "
          f"{wide:.3f} s ({wide / anchor:.0f}x the anchor for a {layers // 2}x larger skeleton; "
          f"{found} layers found)")
    config = LlamaConfig(hidden_size=8192, intermediate_size=28672, num_hidden_layers=80,
                         num_attention_heads=64, num_key_value_heads=8, vocab_size=32000,
                         architectures=["LlamaForCausalLM"])
    config.save_pretrained(work / "llama70b")
    with torch.device("meta"):
        source = ShapesOnly(LlamaForCausalLM(config).state_dict())
    seconds, found = plan_seconds(work / "llama70b", source)
    print(f"planning, 70B-shaped Llama ({len(source.shapes)} tensors): {seconds:.2f} s, "
          f"{found} layers")


def bench_header(work: Path, keys: int) -> None:
    from safetensors import safe_open
    from safetensors.torch import save_file
    from esd.loading.checkpoint import FileCheckpoint
    path = work / "many.safetensors"
    save_file({f"t{i}.weight": torch.zeros(2, 2) for i in range(keys)}, str(path))
    wanted = [f"t{i}.weight" for i in range(0, keys, max(1, keys // 200))][:200]
    start = time.perf_counter()
    ckpt = FileCheckpoint((path,))
    indexed = time.perf_counter() - start
    start = time.perf_counter()
    for key in wanted:
        ckpt.tensor(key)
    ours = time.perf_counter() - start
    start = time.perf_counter()
    for key in wanted:
        with safe_open(str(path), framework="pt") as f:   # header parsed for every tensor
            f.get_slice(key)[:].to(torch.float32)
    per_tensor = time.perf_counter() - start
    print(f"safetensors, {keys} keys ({path.stat().st_size / 1e6:.0f} MB header): index once "
          f"{indexed:.2f} s; {len(wanted)} tensors {ours:.3f} s vs {per_tensor:.2f} s opening per "
          f"tensor ({per_tensor / ours:.0f}x)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=800)
    parser.add_argument("--keys", type=int, default=100_000)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        bench_planning(Path(tmp), args.layers)
        bench_header(Path(tmp), args.keys)


if __name__ == "__main__":
    from _report import figures_to_docs   # bench/ is sys.path[0] when run as a script
    with figures_to_docs(__file__, __doc__):
        main()
