"""Benchmark: the whole worker process vs WeightWatcher 0.7.7 vs the float32 arithmetic floor.

    python bench/bench_esd.py [--work_dir bench/_work] [--num_layers 4] [--dtype float32]
                              [--repeats 3] [--skip_ww] [--baselines]

On one local Llama checkpoint (bench/llama_fixture.py: TinyLlama shapes, hidden 2048,
intermediate 5632, vocab 32000; 4 layers in float32, 1.2 GB), each
repeat measures, interleaved so that the load of a shared machine hits all of them alike:
 1. floor: float32 Gram WᵀW (M×M, M = min dim) + float32 eigvalsh of every analysed matrix,
    the matrices already in memory (no accuracy guarantee: the arithmetic floor);
 2. ours: `python esd_worker.py --fix_fingers DKS --device cpu` as a user runs it (process
    start, imports, reading, computing, writing the CSV);
 3. WW: a process running WeightWatcher's analyze() (loading with transformers included);
 4. start-up: `esd_worker.py` on a 2-layer GPT-2 against `python -c "import torch"`, in a fresh
    output directory (the first model of its architecture: transformers plans its layers) and
    in one whose plan cache knows GPT-2 (every later model of that architecture in a run);
 5. with --baselines: ours again with `--randomize` and with `--mp_fit`, for their extra cost.
Then once: where ours spends its time (stage breakdown, in-process) and the largest relative
difference of every metric both tools define alike, on the layers with ≥ 20 eigenvalues.
Prints ranges over the repeats (min–max) and the ratios. No asserts: timings on a shared
machine are noisy; read the ratios, which are measured side by side.
"""

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))
import net_esd  # noqa: E402
from llama_fixture import DEFAULT_WORK_DIR, build_llama_checkpoint  # noqa: E402

SAME_DEFINITION = ["alpha", "D", "xmin", "xmax", "sigma", "num_pl_spikes", "spectral_norm",
                   "log_spectral_norm", "norm", "log_norm", "stable_rank", "alpha_weighted",
                   "log_alpha_norm"]
WW_SCRIPT = """
import logging, sys, torch, weightwatcher
from transformers import AutoModelForCausalLM
logging.getLogger("weightwatcher").setLevel(logging.ERROR)
model = AutoModelForCausalLM.from_pretrained(sys.argv[1], dtype=torch.float32)
df = weightwatcher.WeightWatcher(model=model).analyze(
    fix_fingers=None, min_evals=1, max_evals=10**6, max_N=10**6, plot=False)
df.to_csv(sys.argv[2], index=False)
"""


def model_layers(model_dir: Path):
    """(longname, layer_type, float32 tensor), one at a time, through the real loader."""
    from model_loader import iter_layers, resolve_model
    return iter_layers(resolve_model(str(model_dir)))


def load_matrices(model_dir: Path) -> tuple[list, float]:
    """(every analysed matrix in memory as (r, c) float32 with r ≥ c, seconds to read them)."""
    start = time.perf_counter()
    mats = []
    for _, _, weight in model_layers(model_dir):
        w = weight.float()
        mats.append(w.T.contiguous() if w.shape[0] < w.shape[1] else w)
    return mats, time.perf_counter() - start


def time_floor(mats: list) -> tuple[float, float]:
    """(seconds of the float32 Gram products, seconds of float32 eigvalsh) over all matrices."""
    gram_s = eig_s = 0.0
    for w in mats:
        start = time.perf_counter()
        gram = w.T @ w  # (M, M)
        mid = time.perf_counter()
        torch.linalg.eigvalsh(gram)
        gram_s += mid - start
        eig_s += time.perf_counter() - mid
    return gram_s, eig_s


def run_process(argv: list, **kwargs) -> float:
    """Wall seconds of a subprocess that must succeed."""
    start = time.perf_counter()
    done = subprocess.run(argv, capture_output=True, text=True, **kwargs)
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(f"{argv[:3]} failed ({done.returncode}):\n{done.stderr[-2000:]}")
    return seconds


def worker_argv(model_dir: Path, out_dir: Path, *extra) -> list:
    return [sys.executable, str(ROOT / "esd_worker.py"), f"--model_id={model_dir}", "--output_dir",
            str(out_dir), "--device", "cpu", "--overwrite", *extra]


def stage_breakdown(mats: list, read_s: float) -> dict:
    """Seconds per stage of ours, in-process, on the matrices in memory."""
    cpu = torch.device("cpu")
    stages = {"read + convert (loader)": read_s, "float64 Gram (syrk)": 0.0,
              "float64 eigvalsh": 0.0, "fit + derived metrics": 0.0,
              "(float64 Gram, blocked baddbmm)": 0.0}
    for w in mats:
        net_esd.USE_SYRK = False
        start = time.perf_counter()
        net_esd._gram_matrices(w.unsqueeze(0), torch.float64, cpu)
        stages["(float64 Gram, blocked baddbmm)"] += time.perf_counter() - start
        net_esd.USE_SYRK = True
        start = time.perf_counter()
        gram = net_esd._gram_matrices(w.unsqueeze(0), torch.float64, cpu)
        mid = time.perf_counter()
        evals = torch.linalg.eigvalsh(gram, UPLO="L")[0].numpy()
        end = time.perf_counter()
        kept = evals[evals > 1e-5]
        net_esd.fit_power_law(kept, "DKS")
        net_esd._norm_columns(evals, kept, w.shape[0], 2.0)
        stages["float64 Gram (syrk)"] += mid - start
        stages["float64 eigvalsh"] += end - mid
        stages["fit + derived metrics"] += time.perf_counter() - end
    return stages


def metric_differences(ours_csv: Path, ww_csv: Path) -> dict:
    """column -> largest relative difference on the layers both analyse with ≥ 20 eigenvalues."""
    import pandas as pd
    ours = pd.read_csv(ours_csv).set_index("longname")
    ww = pd.read_csv(ww_csv).set_index("longname")
    layers = [n for n in ours.index.intersection(ww.index) if ours.loc[n, "num_evals"] >= 20]
    out = {"layers compared": len(layers)}
    for column in SAME_DEFINITION:
        a = ours.loc[layers, column].astype(float).to_numpy()
        b = ww.loc[layers, column].astype(float).to_numpy()
        out[column] = float(np.max(np.abs(a - b) / np.abs(b)))
    return out


def span(values: list) -> str:
    return f"{min(values):7.2f} – {max(values):7.2f}"


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], allow_abbrev=False)
    parser.add_argument("--work_dir", type=Path, default=DEFAULT_WORK_DIR)
    parser.add_argument("--num_layers", type=int, default=4)
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--skip_ww", action="store_true", help="skip the (slow) WeightWatcher runs")
    parser.add_argument("--baselines", action="store_true",
                        help="also time ours with --randomize and with --mp_fit (their extra cost)")
    args = parser.parse_args()

    model_dir = build_llama_checkpoint(args.work_dir / f"llama_{args.num_layers}l_{args.dtype}",
                                       num_layers=args.num_layers, dtype=getattr(torch, args.dtype))
    gpt2_dir = args.work_dir / "gpt2_2l"
    if not (gpt2_dir / "config.json").exists():
        sys.path.insert(0, str(ROOT / "tests"))
        from tiny_models import save_gpt2
        save_gpt2(gpt2_dir)
    size_gb = sum(f.stat().st_size for f in model_dir.glob("*.safetensors")) / 1e9
    print(f"checkpoint {model_dir} ({size_gb:.2f} GB {args.dtype})  torch threads {torch.get_num_threads()}")
    torch.linalg.eigvalsh(torch.eye(8))  # load LAPACK before timing
    mats, read_s = load_matrices(model_dir)

    tmp = Path(tempfile.mkdtemp(prefix="bench_esd_"))
    runs = {"floor": [], "floor Gram": [], "floor eigvalsh": [], "ours": [], "WW": [],
            "import torch": [], "worker GPT-2": [], "GPT-2 planned": [],
            "ours +randomize": [], "ours +mp_fit": []}
    run_process(worker_argv(gpt2_dir, tmp / "gpt2_planned"))  # its plan is cached from now on
    for repeat in range(args.repeats):
        gram_s, eig_s = time_floor(mats)
        runs["floor Gram"].append(gram_s)
        runs["floor eigvalsh"].append(eig_s)
        runs["floor"].append(gram_s + eig_s)
        # a fresh output directory each time: the first model of its architecture (no cached plan)
        runs["ours"].append(run_process(worker_argv(model_dir, tmp / f"ours{repeat}", "--fix_fingers", "DKS")))
        if not args.skip_ww:
            runs["WW"].append(run_process([sys.executable, "-c", WW_SCRIPT, str(model_dir), str(tmp / "ww.csv")]))
        runs["import torch"].append(run_process([sys.executable, "-c", "import torch"]))
        runs["worker GPT-2"].append(run_process(worker_argv(gpt2_dir, tmp / f"gpt2_{repeat}")))
        runs["GPT-2 planned"].append(run_process(worker_argv(gpt2_dir, tmp / "gpt2_planned")))
        if args.baselines:  # each in its own directory: other settings, other results
            for flag in ("randomize", "mp_fit"):
                runs[f"ours +{flag}"].append(run_process(
                    worker_argv(model_dir, tmp / flag, "--fix_fingers", "DKS", f"--{flag}")))
        print(f"repeat {repeat + 1}: " + ", ".join(f"{k} {v[-1]:.1f}s" for k, v in runs.items() if v), flush=True)

    print(f"\n{len(mats)} matrices, {args.repeats} repeats (min – max seconds)")
    for name, values in runs.items():
        if values:
            print(f"  {name:16s} {span(values)}")
    ratio = lambda a, b: [x / y for x, y in zip(runs[a], runs[b])]  # noqa: E731 - same repeat
    print("\nratios within each repeat (min – max)")
    print(f"  ours / floor          {span(ratio('ours', 'floor'))}")
    if runs["WW"]:
        print(f"  WW / ours             {span(ratio('WW', 'ours'))}")
    print(f"  start-up GPT-2/torch  {span(ratio('worker GPT-2', 'import torch'))}"
          "  (first model of its architecture: transformers builds the plan)")
    print(f"  start-up, plan cached {span(ratio('GPT-2 planned', 'import torch'))}"
          "  (every later model of that architecture in the run)")
    for flag in ("randomize", "mp_fit") if args.baselines else ():
        print(f"  ours +{flag:9s} / ours {span(ratio(f'ours +{flag}', 'ours'))}"
              + ("   expected ~2 (one more eigensolve)" if flag == "randomize" else "   expected ~1"))

    print("\nstage breakdown of ours (in-process, seconds)")
    for stage, seconds in stage_breakdown(mats, read_s).items():
        print(f"  {stage:28s} {seconds:7.2f}")
    if runs["WW"]:
        ours_csv = next((tmp / f"ours{args.repeats - 1}").glob("*.csv"))
        print("\nlargest relative difference, ours vs WeightWatcher (DKS)")
        for column, value in metric_differences(ours_csv, tmp / "ww.csv").items():
            print(f"  {column:18s} {value:.2e}" if isinstance(value, float) else f"  {column:18s} {value}")


if __name__ == "__main__":
    from _report import figures_to_docs   # bench/ is sys.path[0] when run as a script
    with figures_to_docs(__file__, __doc__):
        main()
