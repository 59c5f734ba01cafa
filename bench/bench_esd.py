"""Benchmark: net_esd vs WeightWatcher 0.7.7 vs the float32 Gram floor, on a local Llama.

    python bench/bench_esd.py [--work_dir bench/_work] [--num_layers 4] [--skip_ww]

Times, in one run and on the same weights (bench/llama_fixture.py, TinyLlama shapes):
 1. WeightWatcher analyze(), including loading the model with transformers;
 2. ours: model_loader streaming the checkpoint into net_esd_estimator, reading included;
 3. the arithmetic floor: the smaller float32 Gram matrix (M×M, M = min dim) of every analysed
    matrix. The smaller Gram costs N·M² flops against N²·M for the larger one and is the one
    whose eigenvalues we need (the larger has the same nonzero eigenvalues plus zeros).
Prints seconds, ratios and the largest relative alpha difference (fix_fingers DKS) on the
layers both tools fit. No asserts: timings on a shared 2-core machine are noisy.
"""

import argparse
import logging
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
import net_esd  # noqa: E402
from llama_fixture import DEFAULT_WORK_DIR, build_llama_checkpoint  # noqa: E402


def model_layers(model_dir: Path):
    """(longname, layer_type, float32 tensor), one at a time, through the real loader."""
    from model_loader import iter_layers, resolve_model
    return iter_layers(resolve_model(str(model_dir)))


def time_ours(model_dir: Path):
    start = time.perf_counter()
    df = net_esd.net_esd_estimator(model_layers(model_dir), fix_fingers="DKS")
    return time.perf_counter() - start, df


def time_weightwatcher(model_dir: Path):
    import weightwatcher
    from transformers import AutoModelForCausalLM
    logging.getLogger("weightwatcher").setLevel(logging.ERROR)
    start = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    df = weightwatcher.WeightWatcher(model=model).analyze(
        fix_fingers=None, min_evals=1, max_evals=10**6, max_N=10**6, plot=False)
    return time.perf_counter() - start, df


def time_gram_floor(model_dir: Path):
    """(seconds of the bare float32 smaller-Gram products, seconds spent reading + converting)."""
    gram_seconds, read_seconds = 0.0, 0.0
    start = time.perf_counter()
    for _, _, weight in model_layers(model_dir):
        w = weight.float()
        if w.shape[0] < w.shape[1]:
            w = w.T
        read_seconds += time.perf_counter() - start
        start = time.perf_counter()
        w.T @ w  # (M, M)
        gram_seconds += time.perf_counter() - start
        start = time.perf_counter()
    return gram_seconds, read_seconds


def time_eigensolver_floor(model_dir: Path):
    """Seconds of float32 Gram + float32 eigvalsh (no accuracy guarantee): what a float32-only
    pipeline would cost."""
    total = 0.0
    for _, _, weight in model_layers(model_dir):
        w = weight.float()
        w = w.T if w.shape[0] < w.shape[1] else w
        start = time.perf_counter()
        torch.linalg.eigvalsh(w.T @ w)
        total += time.perf_counter() - start
    return total


def time_float64_stages(model_dir: Path):
    """(seconds of our float64 lower-triangle Gram, seconds of float64 eigvalsh): where the
    time of ours goes, apart from reading and the fit."""
    gram_s, eig_s = 0.0, 0.0
    cpu = torch.device("cpu")
    for _, _, weight in model_layers(model_dir):
        start = time.perf_counter()
        gram = net_esd._gram_matrices(weight.unsqueeze(0), torch.float64, cpu)
        gram_s += time.perf_counter() - start
        start = time.perf_counter()
        torch.linalg.eigvalsh(gram, UPLO="L")
        eig_s += time.perf_counter() - start
    return gram_s, eig_s


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work_dir", type=Path, default=DEFAULT_WORK_DIR)
    parser.add_argument("--num_layers", type=int, default=4)
    parser.add_argument("--skip_ww", action="store_true", help="skip the (slow) WeightWatcher run")
    args = parser.parse_args()

    model_dir = build_llama_checkpoint(args.work_dir / f"llama_{args.num_layers}l", num_layers=args.num_layers)
    print(f"checkpoint {model_dir}  torch threads {torch.get_num_threads()}")
    torch.linalg.eigvalsh(torch.eye(8, dtype=torch.float64))  # load LAPACK before timing

    gram_s, read_s = time_gram_floor(model_dir)
    eig32_s = time_eigensolver_floor(model_dir)
    gram64_s, eig64_s = time_float64_stages(model_dir)
    ours_s, ours = time_ours(model_dir)
    print(f"layers analysed: {len(ours)}  fit_status: {ours['fit_status'].value_counts().to_dict()}")
    print(f"floor  float32 smaller Gram W^T W : {gram_s:8.2f} s   (reading+bf16->f32 {read_s:.2f} s)")
    print(f"       float32 Gram + eigvalsh    : {eig32_s:8.2f} s   (no accuracy guarantee)")
    print(f"stages float64 Gram (lower half)  : {gram64_s:8.2f} s   float64 eigvalsh {eig64_s:.2f} s")
    print(f"ours   net_esd, reading included  : {ours_s:8.2f} s   ours/floor = {ours_s / gram_s:.2f}")
    if args.skip_ww:
        return
    ww_s, ww = time_weightwatcher(model_dir)
    print(f"WW     analyze, loading included  : {ww_s:8.2f} s   WW/ours = {ww_s / ours_s:.2f}")
    both = ours.set_index("longname").join(ww.set_index("longname")[["alpha"]], rsuffix="_ww", how="inner")
    both = both[both["num_evals"] >= 20]
    rel = np.abs(both["alpha"] - both["alpha_ww"]) / np.abs(both["alpha_ww"])
    print(f"alpha (DKS) on {len(both)} common layers: max relative difference {rel.max():.2e}")


if __name__ == "__main__":
    main()
