"""One-shot GPU check: is the worker right and fast on CUDA? Runs offline, in minutes.

    python bench/gpu_check.py                 # on a CUDA machine (one GPU or several)
    python bench/gpu_check.py --small         # 2-layer model; runs on CPU too (CI)

1. Builds a 7B-shaped Llama checkpoint in --work_dir (32 layers, q/k/v/o 4096², gate/up/down
   4096×11008, embeddings and lm_head 32000×4096, bf16 safetensors; --small: 2 layers of a
   256-wide model). Weights are G₁·diag(p)·G₂ with Gaussian G and Pareto p: heavy-tailed
   spectra, so the power-law fits are not trivial.
2. Runs the real worker (`esd_worker.py --fix_fingers DKS`) on CUDA (CPU without a GPU) and
   compares a subset of its layers with a float64 SVD on the CPU: the largest relative
   difference of every reported metric (the contract: ≤ 1e-4).
3. Prints models/hour/GPU end to end (worker process, reading from disk included), the stage
   breakdown (read, host→device, Gram, eigensolver, fit) and peak GPU memory, and the same
   for WeightWatcher 0.7.7 (on the GPU when it finds one) on the first decoder layers.
4. With several GPUs: the speed-up of spreading one model's layers over all of them.
5. Exits 1 when any metric disagrees beyond 1e-4 (0 otherwise).
"""

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import net_esd  # noqa: E402

RTOL = 1e-4
METRICS = ["alpha", "D", "xmin", "xmax", "sigma", "num_pl_spikes", "spectral_norm", "log_spectral_norm",
           "norm", "log_norm", "stable_rank", "alpha_weighted", "log_alpha_norm", "entropy", "matrix_rank"]
FULL = dict(layers=32, hidden=4096, intermediate=11008, vocab=32000, heads=32)
SMALL = dict(layers=2, hidden=256, intermediate=688, vocab=1000, heads=4)
PROJECTIONS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
               "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")


def layer_shapes(cfg: dict) -> dict:
    """tensor name -> shape of a Llama checkpoint with these sizes (full attention heads)."""
    h, f = cfg["hidden"], cfg["intermediate"]
    shapes = {"model.embed_tokens.weight": (cfg["vocab"], h)}
    for i in range(cfg["layers"]):
        for proj in PROJECTIONS:
            shapes[f"model.layers.{i}.{proj}.weight"] = {"mlp.gate_proj": (f, h), "mlp.up_proj": (f, h),
                                                         "mlp.down_proj": (h, f)}.get(proj, (h, h))
        shapes[f"model.layers.{i}.input_layernorm.weight"] = (h,)
        shapes[f"model.layers.{i}.post_attention_layernorm.weight"] = (h,)
    shapes["model.norm.weight"] = (h,)
    shapes["lm_head.weight"] = (cfg["vocab"], h)
    return shapes


def heavy_tailed(shape: tuple, gen: torch.Generator, device) -> torch.Tensor:
    """G₁·diag(p)·G₂ / scale, p ~ Pareto(1.5): singular values with a power-law tail; bf16."""
    if len(shape) == 1:
        return torch.ones(shape, dtype=torch.bfloat16)
    rows, cols = shape
    r = min(rows, cols)
    p = (1 - torch.rand(r, generator=gen)) ** (-1 / 1.5)  # Pareto, heavy tail
    g1 = torch.randn(rows, r, generator=gen).to(device)
    g2 = torch.randn(r, cols, generator=gen).to(device)
    w = (g1 * p.to(device)) @ g2 / (r * math.sqrt(cols))
    return w.to(torch.bfloat16).cpu()


def build_checkpoint(out_dir: Path, cfg: dict, device) -> Path:
    """config.json + sharded bf16 safetensors; reused when complete (the index is written last)."""
    from safetensors.torch import save_file
    if (out_dir / "model.safetensors.index.json").exists():
        return out_dir
    out_dir.mkdir(parents=True, exist_ok=True)
    config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": cfg["hidden"],
              "intermediate_size": cfg["intermediate"], "num_hidden_layers": cfg["layers"],
              "num_attention_heads": cfg["heads"], "num_key_value_heads": cfg["heads"],
              "vocab_size": cfg["vocab"], "max_position_embeddings": 4096, "rms_norm_eps": 1e-5,
              "tie_word_embeddings": False, "torch_dtype": "bfloat16"}
    (out_dir / "config.json").write_text(json.dumps(config, indent=2))
    gen = torch.Generator().manual_seed(0)
    weight_map, shard, shard_bytes, index = {}, {}, 0, 0

    def flush():
        nonlocal shard, shard_bytes, index
        name = f"model-{index:05d}.safetensors"
        save_file(shard, str(out_dir / name), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(shard, name))
        shard, shard_bytes, index = {}, 0, index + 1

    for name, shape in layer_shapes(cfg).items():
        shard[name] = heavy_tailed(shape, gen, device)
        shard_bytes += shard[name].numel() * 2
        if shard_bytes > 2e9:
            flush()
    if shard:
        flush()
    (out_dir / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return out_dir


def run_worker(model_dir: Path, out_dir: Path, device: str, visible=None) -> float:
    """Wall seconds of the real worker process on this model."""
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    if visible is not None:
        env["CUDA_VISIBLE_DEVICES"] = visible
    argv = [sys.executable, str(ROOT / "esd_worker.py"), f"--model_id={model_dir}", "--output_dir",
            str(out_dir), "--device", device, "--fix_fingers", "DKS", "--overwrite"]
    start = time.perf_counter()
    done = subprocess.run(argv, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"worker failed ({done.returncode}):\n{done.stdout[-1500:]}\n{done.stderr[-3000:]}")
    return time.perf_counter() - start


def reference_subset(cfg: dict) -> list:
    """Layers compared with a float64 SVD: one of each shape, first and last decoder layer."""
    last = cfg["layers"] - 1
    return ["model.layers.0.self_attn.q_proj", "model.layers.0.mlp.down_proj",
            f"model.layers.{last}.mlp.gate_proj", f"model.layers.{last}.self_attn.v_proj"]


def read_tensor(model_dir: Path, longname: str) -> torch.Tensor:
    from safetensors import safe_open
    index = json.loads((model_dir / "model.safetensors.index.json").read_text())["weight_map"]
    key = f"{longname}.weight"
    with safe_open(str(model_dir / index[key]), framework="pt") as f:
        return f.get_tensor(key)


def reference_row(weight: torch.Tensor, settings) -> dict:
    """The metrics of a float64 SVD of the weight (numpy), through the same fit definitions."""
    w = weight.float().double().numpy()
    evals = np.sort(np.linalg.svd(w, compute_uv=False) ** 2)
    return net_esd.spectrum_metrics(evals, weight.shape, "linear", settings)


def largest_differences(frame, model_dir: Path, names: list) -> dict:
    """metric -> largest relative difference between the worker's rows and the reference."""
    settings = net_esd.ESDSettings(fix_fingers="DKS")
    worst = dict.fromkeys(METRICS, 0.0)
    rows = frame.set_index("longname")
    for name in names:
        ref = reference_row(read_tensor(model_dir, name), settings)
        for metric in METRICS:
            ours, theirs = float(rows.loc[name, metric]), float(ref[metric])
            if math.isnan(ours) and math.isnan(theirs):
                continue
            diff = abs(ours - theirs) / abs(theirs) if theirs else abs(ours)
            worst[metric] = max(worst[metric], diff if math.isfinite(diff) else math.inf)
    return worst


def stage_breakdown(model_dir: Path, names: list, device: torch.device) -> tuple[dict, float]:
    """(seconds per stage over `names`, peak GPU memory in GB or NaN) of the worker's maths."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    gram_dtype = "float32" if device.type == "cuda" else "float64"
    stages = dict.fromkeys(["read (bf16 -> float32)", "host -> device", f"Gram ({gram_dtype})",
                            "eigensolver", "fit + metrics"], 0.0)
    for name in names:
        t0 = time.perf_counter()
        weight = read_tensor(model_dir, name).float()
        t1 = time.perf_counter()
        on_device = weight.to(device)
        sync()
        t2 = time.perf_counter()
        dtype = torch.float32 if device.type == "cuda" else torch.float64
        gram = net_esd._gram_matrices(on_device.unsqueeze(0), dtype, device)
        sync()
        t3 = time.perf_counter()
        evals = torch.linalg.eigvalsh(gram, UPLO="L")[0]
        sync()
        t4 = time.perf_counter()
        spectrum = np.sort(evals.double().cpu().numpy())
        net_esd.spectrum_metrics(spectrum, weight.shape, "linear", net_esd.ESDSettings(fix_fingers="DKS"),
                                 device=device)
        sync()
        t5 = time.perf_counter()
        for stage, seconds in zip(stages, (t1 - t0, t2 - t1, t3 - t2, t4 - t3, t5 - t4)):
            stages[stage] += seconds
    peak = torch.cuda.max_memory_allocated(device) / 1e9 if device.type == "cuda" else math.nan
    return stages, peak


def time_weightwatcher(model_dir: Path, cfg: dict, decoder_layers: int) -> tuple[float, int]:
    """(seconds of WW analyze() on the embeddings and the first decoder layers, layers analysed);
    the model is built by transformers with only those decoder layers (same shapes)."""
    import weightwatcher
    from transformers import AutoConfig, AutoModelForCausalLM
    config = AutoConfig.from_pretrained(model_dir)
    config.num_hidden_layers = decoder_layers
    model = AutoModelForCausalLM.from_pretrained(model_dir, config=config, dtype=torch.float32)
    start = time.perf_counter()
    df = weightwatcher.WeightWatcher(model=model).analyze(
        fix_fingers=None, min_evals=1, max_evals=10**6, max_N=10**6, plot=False)
    return time.perf_counter() - start, len(df)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], allow_abbrev=False)
    parser.add_argument("--small", action="store_true", help="a 2-layer, 256-wide model (CPU friendly)")
    parser.add_argument("--work_dir", type=Path, default=Path(__file__).resolve().parent / "_work")
    parser.add_argument("--skip_ww", action="store_true", help="do not time WeightWatcher")
    args = parser.parse_args()

    cfg = SMALL if args.small else FULL
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    gpus = torch.cuda.device_count() if cuda else 0
    print(f"device {'cuda x%d (%s)' % (gpus, torch.cuda.get_device_name(0)) if cuda else 'cpu (no CUDA)'}, "
          f"model {'small' if args.small else '7B-shaped'}: {cfg}", flush=True)
    start = time.perf_counter()
    model_dir = build_checkpoint(args.work_dir / f"gpu_check_{'small' if args.small else '7b'}", cfg, device)
    print(f"checkpoint {model_dir} ready in {time.perf_counter() - start:.0f} s", flush=True)

    import pandas as pd
    out = Path(tempfile.mkdtemp(prefix="gpu_check_"))
    wall = run_worker(model_dir, out / "all", "cuda" if cuda else "cpu")
    frame = pd.read_csv(next((out / "all").glob("*.csv")))
    per_gpu = max(gpus, 1)
    print(f"\nworker, {len(frame)} layers: {wall:.1f} s end to end = "
          f"{3600 / wall / per_gpu:.1f} models/hour/GPU ({per_gpu} {'GPU' if cuda else 'CPU process'})")
    if gpus > 1:
        one = run_worker(model_dir, out / "one", "cuda", visible="0")
        print(f"one GPU: {one:.1f} s = {3600 / one:.1f} models/hour/GPU; {gpus} GPUs on one model: "
              f"speed-up {one / wall:.2f}x")

    names = reference_subset(cfg)
    stages, peak = stage_breakdown(model_dir, names, device)
    print(f"\nstage breakdown over {len(names)} layers ({', '.join(n.split('model.')[-1] for n in names)}):")
    for stage, seconds in stages.items():
        print(f"  {stage:24s} {seconds:8.3f} s")
    print(f"  peak GPU memory          {peak:8.2f} GB" if cuda else "  peak GPU memory               n/a (CPU)")

    if not args.skip_ww:
        decoder = min(cfg["layers"], 1 if not args.small else cfg["layers"])
        ww_s, ww_layers = time_weightwatcher(model_dir, cfg, decoder)
        model_layers = len(frame)
        estimate = ww_s / ww_layers * model_layers
        print(f"\nWeightWatcher 0.7.7 ({'GPU' if cuda else 'CPU'}): {ww_layers} layers in {ww_s:.1f} s; "
              f"whole model ≈ {estimate:.0f} s = {3600 / estimate:.2f} models/hour/GPU "
              f"(ours/WW speed: {estimate / wall * per_gpu:.1f}x)")

    worst = largest_differences(frame, model_dir, names)
    print(f"\nlargest relative difference vs CPU float64 SVD on {len(names)} layers (contract: <= {RTOL:.0e}):")
    for metric, value in worst.items():
        print(f"  {metric:18s} {value:.2e}{'   FAIL' if value > RTOL else ''}")
    failed = [m for m, v in worst.items() if not v <= RTOL]
    print("\nRESULT:", f"FAIL ({', '.join(failed)} beyond {RTOL:.0e})" if failed else "OK")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
