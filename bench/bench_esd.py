"""Benchmark: the whole worker process vs the float64 arithmetic it must do, vs WeightWatcher 0.7.7.

    python bench/bench_esd.py [--work_dir bench/_work] [--num_layers 4] [--dtype float32]
                              [--repeats 3] [--skip_ww] [--baselines]

On one local Llama checkpoint (bench/llama_fixture.py: TinyLlama shapes, hidden 2048,
intermediate 5632, vocab 32000; 4 layers in float32, 1.2 GB), each
repeat measures, interleaved so that the load of a shared machine hits all of them alike:
 1. the float64 floor: the arithmetic the accuracy contract needs and nothing else — the
    float64 Gram by BLAS dsyrk and torch's float64 eigvalsh of every analysed matrix, the
    matrices already in memory in float64 (their conversion is not timed), scheduled two
    ways: one matrix at a time with all of torch's threads ("one at a time"), and two
    matrices at once with half the threads each ("two at once", the worker's CPU schedule);
    the floor is the faster of the two in that repeat;
 2. ours: `python esd_worker.py --fix_fingers DKS --device cpu` as a user runs it (process
    start, imports, planning, reading, computing, writing the CSV), in a fresh output
    directory (the first model of its architecture: no cached plan), and again in one whose
    plan cache knows the model ("plan cached": every later model of that architecture);
 3. WW: a process running WeightWatcher's analyze() (loading with transformers included);
 4. start-up: `esd_worker.py` on a 2-layer GPT-2 against `python -c "import torch"`, in a fresh
    output directory (the first model of its architecture: transformers plans its layers) and
    in one whose plan cache knows GPT-2 (every later model of that architecture in a run);
 5. with --baselines: ours again with `--randomize` and with `--mp_fit`, for their extra cost.
Then once: where ours spends its time (stage breakdown of one worker process instrumented
from outside: process start and imports, planning, reading, float32→float64 conversion, Gram,
eigvalsh, fitting, writing, and the time the compute threads waited for a layer), and the
largest relative difference of every metric both tools define alike, on the layers with ≥ 20
eigenvalues. Prints ranges over the repeats (min–max) and the ratios. No asserts: timings on
a shared machine are noisy; read the ratios, which are measured side by side.
"""

import argparse
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


def float64_matrices(mats: list):
    """Each matrix as float64 numpy (r, c), r ≥ c, made one at a time (not timed)."""
    for w in mats:
        yield w.double().numpy()


def float64_arithmetic(x: np.ndarray) -> tuple[float, float]:
    """(seconds of the dsyrk Gram, seconds of eigvalsh) of one float64 matrix, with torch's
    current thread count for both (BLAS follows it)."""
    from scipy.linalg import blas
    net_esd._blas_threads_as_torch()
    start = time.perf_counter()
    gram = blas.dsyrk(1.0, x.T, trans=0, lower=1)  # (c, c) lower triangle of xᵀx
    mid = time.perf_counter()
    torch.linalg.eigvalsh(torch.from_numpy(gram), UPLO="L")
    return mid - start, time.perf_counter() - mid


def time_floor_one_at_a_time(mats: list) -> tuple[float, float, float]:
    """(wall, Gram seconds, eigvalsh seconds): every matrix in turn, all of torch's threads."""
    gram_s = eig_s = 0.0
    for x in float64_matrices(mats):
        g, e = float64_arithmetic(x)
        gram_s, eig_s = gram_s + g, eig_s + e
    return gram_s + eig_s, gram_s, eig_s


def time_floor_two_at_once(mats: list) -> float:
    """Wall seconds of the arithmetic of every matrix, two matrices at once with half of
    torch's threads each (the worker's schedule on CPU); conversions not timed."""
    import threading
    cores = torch.get_num_threads()
    todo, lock, busy = list(range(len(mats))), threading.Lock(), [0.0, 0.0]

    def work(slot):
        while True:
            with lock:
                if not todo:
                    return
                x = mats[todo.pop(0)].double().numpy()
            g, e = float64_arithmetic(x)
            busy[slot] += g + e

    torch.set_num_threads(max(1, cores // 2))
    try:
        threads = [threading.Thread(target=work, args=(slot,)) for slot in range(2)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    finally:
        torch.set_num_threads(cores)
    return max(busy)  # the longer thread's arithmetic (its conversions excluded)


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


STAGES_CHILD = """
import os, sys, threading, time
t_python = time.time()
sys.path.insert(0, sys.argv[1])
import esd.cli.worker as worker
import torch, numpy, pandas, scipy.linalg
import net_esd, esd.loader, esd.pipeline, esd.loading.checkpoint
t_imported = time.time()
seconds, lock = {}, threading.Lock()

def timed(owner, name, stage):
    inner = getattr(owner, name)
    def wrapper(*args, **kwargs):
        start = time.perf_counter()
        try:
            return inner(*args, **kwargs)
        finally:
            with lock:
                seconds[stage] = seconds.get(stage, 0.0) + time.perf_counter() - start
    setattr(owner, name, wrapper)

timed(esd.loader, "plan_layers", "planning")
timed(esd.loading.checkpoint.FileCheckpoint, "tensor", "reading")
timed(net_esd, "_float64_rows", "conversion")
timed(net_esd, "_gram_matrices", "Gram")
timed(torch.linalg, "eigvalsh", "eigvalsh")
timed(net_esd, "spectrum_metrics", "fitting")
timed(net_esd, "_layer_row", "layer")
timed(net_esd, "analyze_layers", "analysis")
timed(worker, "save_results", "writing")
timed(esd.pipeline.LayerPrefetcher, "get", "prefetcher.get")
inner_worker, thread_ends = esd.pipeline._device_worker, []
def device_worker(*args, **kwargs):
    try:
        return inner_worker(*args, **kwargs)
    finally:
        thread_ends.append(time.perf_counter())
esd.pipeline._device_worker = device_worker
threads = len(esd.pipeline.cpu_layer_threads([torch.device("cpu")]))
code = worker.main(sys.argv[3:])
t_end = time.time()
seconds.update(start=t_python - float(sys.argv[2]), imports=t_imported - t_python, threads=threads,
               total=t_end - float(sys.argv[2]), alone=max(thread_ends) - min(thread_ends))
print(repr(seconds))
sys.exit(code)
"""


def stage_breakdown(model_dir: Path, out_dir: Path) -> dict:
    """Seconds per stage of one worker process, timed from outside by wrapping the worker's
    own functions (the same process as `ours`, with a fresh output directory)."""
    launched = time.time()
    done = subprocess.run([sys.executable, "-c", STAGES_CHILD, str(ROOT), repr(launched),
                           *worker_argv(model_dir, out_dir, "--fix_fingers", "DKS")[2:]],
                          capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"instrumented worker failed ({done.returncode}):\n{done.stderr[-2000:]}")
    s = eval(done.stdout.strip().splitlines()[-1])  # noqa: S307 - our own child's repr of a dict
    gram = s.get("Gram", 0.0) - s.get("conversion", 0.0)
    planning = s.get("planning", 0.0)
    # the first layer is asked for before the plan exists: every compute thread waits for it
    reader_wait = max(0.0, s.get("prefetcher.get", 0.0) - planning)
    return {
        "whole process (wall)": (s["total"], ""),
        "process start (interpreter)": (s["start"], "critical path"),
        "imports (worker, torch, pandas, scipy)": (s["imports"], "critical path"),
        "planning (reader thread)": (s.get("planning", 0.0), "critical path: no layer before the plan"),
        "reading (reader thread)": (s.get("reading", 0.0), "beside the compute"),
        "float32→float64 conversion": (s.get("conversion", 0.0), f"compute threads ({s['threads']})"),
        "Gram (dsyrk)": (gram, "compute threads"),
        "eigvalsh": (s.get("eigvalsh", 0.0), "compute threads"),
        "fitting + derived metrics": (s.get("fitting", 0.0), "compute threads"),
        "compute waiting for the reader": (reader_wait, "after the plan (prefetcher.get)"),
        "last layer alone": (s["alone"], "one compute thread left, with all the cores"),
        "analysis span (wall)": (s.get("analysis", 0.0), "first layer asked → last row"),
        "writing the CSV": (s.get("writing", 0.0), "critical path"),
    }


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
    torch.linalg.eigvalsh(torch.eye(8, dtype=torch.float64))  # load LAPACK before timing
    mats, read_s = load_matrices(model_dir)

    tmp = Path(tempfile.mkdtemp(prefix="bench_esd_"))
    runs = {"floor": [], "floor one at a time": [], "  of which Gram": [], "  of which eigvalsh": [],
            "floor two at once": [], "ours": [], "ours, plan cached": [], "WW": [], "import torch": [], "worker GPT-2": [],
            "GPT-2 planned": [], "ours +randomize": [], "ours +mp_fit": []}
    run_process(worker_argv(gpt2_dir, tmp / "gpt2_planned"))  # its plan is cached from now on
    run_process(worker_argv(model_dir, tmp / "llama_planned", "--fix_fingers", "DKS"))  # and this one's
    for repeat in range(args.repeats):
        one, gram_s, eig_s = time_floor_one_at_a_time(mats)
        runs["floor one at a time"].append(one)
        runs["  of which Gram"].append(gram_s)
        runs["  of which eigvalsh"].append(eig_s)
        runs["floor two at once"].append(time_floor_two_at_once(mats))
        runs["floor"].append(min(one, runs["floor two at once"][-1]))
        # a fresh output directory each time: the first model of its architecture (no cached plan)
        runs["ours"].append(run_process(worker_argv(model_dir, tmp / f"ours{repeat}", "--fix_fingers", "DKS")))
        # every later model of the architecture in a run: its plan cached, transformers not imported
        runs["ours, plan cached"].append(run_process(
            worker_argv(model_dir, tmp / "llama_planned", "--fix_fingers", "DKS")))
        if not args.skip_ww:
            runs["WW"].append(run_process([sys.executable, "-c", WW_SCRIPT, str(model_dir), str(tmp / "ww.csv")]))
        runs["import torch"].append(run_process([sys.executable, "-c", "import torch"]))
        runs["worker GPT-2"].append(run_process(worker_argv(gpt2_dir, tmp / f"gpt2_{repeat}")))
        runs["GPT-2 planned"].append(run_process(worker_argv(gpt2_dir, tmp / "gpt2_planned")))
        if args.baselines:  # each in its own directory: other settings, other results
            for flag in ("randomize", "mp_fit"):
                runs[f"ours +{flag}"].append(run_process(
                    worker_argv(model_dir, tmp / flag, "--fix_fingers", "DKS", f"--{flag}")))
        print(f"repeat {repeat + 1} (load {os.getloadavg()[0]:.1f}): "
              + ", ".join(f"{k.strip()} {v[-1]:.1f}s" for k, v in runs.items() if v), flush=True)

    print(f"\n{len(mats)} matrices, {args.repeats} repeats (min – max seconds); reading them "
          f"in-process took {read_s:.1f}s")
    for name, values in runs.items():
        if values:
            print(f"  {name:20s} {span(values)}")
    ratio = lambda a, b: [x / y for x, y in zip(runs[a], runs[b])]  # noqa: E731 - same repeat
    print("\nratios within each repeat (min – max)")
    print(f"  ours / float64 floor  {span(ratio('ours', 'floor'))}   goal ≤ 1.15")
    print(f"  ours, plan cached / floor {span(ratio('ours, plan cached', 'floor'))}"
          "   (every later model of the architecture in a run)")
    print(f"  ours / one at a time  {span(ratio('ours', 'floor one at a time'))}")
    print(f"  ours / two at once    {span(ratio('ours', 'floor two at once'))}")
    if runs["WW"]:
        print(f"  WW / ours             {span(ratio('WW', 'ours'))}")
    print(f"  start-up GPT-2/torch  {span(ratio('worker GPT-2', 'import torch'))}"
          "  (first model of its architecture: transformers builds the plan)")
    print(f"  start-up, plan cached {span(ratio('GPT-2 planned', 'import torch'))}"
          "  (every later model of that architecture in the run)")
    for flag in ("randomize", "mp_fit") if args.baselines else ():
        print(f"  ours +{flag:9s} / ours {span(ratio(f'ours +{flag}', 'ours'))}"
              + ("   expected ~2 (one more eigensolve)" if flag == "randomize" else "   expected ~1"))

    print(f"\nstage breakdown of ours (one instrumented worker process, seconds; load "
          f"{os.getloadavg()[0]:.1f}); compute stages are summed over the compute threads")
    for stage, (seconds, where) in stage_breakdown(model_dir, tmp / "stages").items():
        print(f"  {stage:38s} {seconds:7.2f}  {where}")
    if runs["WW"]:
        ours_csv = next((tmp / f"ours{args.repeats - 1}").glob("*.csv"))
        print("\nlargest relative difference, ours vs WeightWatcher (DKS)")
        for column, value in metric_differences(ours_csv, tmp / "ww.csv").items():
            print(f"  {column:18s} {value:.2e}" if isinstance(value, float) else f"  {column:18s} {value}")


if __name__ == "__main__":
    from _report import figures_to_docs   # bench/ is sys.path[0] when run as a script
    with figures_to_docs(__file__, __doc__):
        main()
