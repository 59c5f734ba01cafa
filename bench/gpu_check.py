"""One-shot GPU check: is the worker right and fast on CUDA? Runs offline, in minutes.

    python bench/gpu_check.py                 # on a CUDA machine (one GPU or several)
    python bench/gpu_check.py --small         # 2-layer model; runs on CPU too (CI)

1. End to end through the real orchestrator (`run_esd_experiment.py`, gputracker, NVML), first
   because it takes minutes: three small models it builds (two heavy-tailed Llamas, one GPT-2
   with Conv1D layers) run once with `--gpus 0` (gputracker grants GPU 0 and sets
   CUDA_VISIBLE_DEVICES) and once on CPU (`--gpus none --cpu_workers 1`); each model's result
   CSVs must agree: the eigenvalue-derived columns (COMPARED) to 1e-4 relative, the layer list
   and each layer's type, shape and fit_status exactly. Prints PASS/FAIL per model and the wall
   times of both runs. Without a visible GPU the GPU run is skipped (it says so) and the CPU
   path runs twice instead (`--cpu_workers 1` against `--cpu_workers 2`). Every subprocess has
   a timeout; the runs go to a temp dir, removed when every model passes, kept (its path
   printed) otherwise.
2. Builds a 7B-shaped Llama checkpoint in --work_dir (32 layers, q/k/v/o 4096², gate/up/down
   4096×11008, embeddings and lm_head 32000×4096, bf16 safetensors; --small: 2 layers of a
   256-wide model). Weights are G₁·diag(p)·G₂ with Gaussian G and Pareto p: heavy-tailed
   spectra, so the power-law fits are not trivial.
3. Runs the real worker (`esd_worker.py --fix_fingers DKS`) on CUDA (CPU without a GPU) and
   compares a subset of its layers with a float64 SVD on the CPU: the largest relative
   difference of every reported metric (the contract: ≤ 1e-4).
4. Prints models/hour/GPU end to end (worker process, reading from disk included), the stage
   breakdown (read, host→device, Gram, eigensolver, fit) and peak GPU memory, and the same
   for WeightWatcher 0.7.7 (on the GPU when it finds one) on the first decoder layers.
5. With several GPUs: the speed-up of spreading one model's layers over all of them.
6. Exits 1 when any metric disagrees beyond 1e-4 or any model fails step 1 (0 otherwise).
"""

import argparse
import csv
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
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
# the end-to-end step: the columns held to RTOL between two runs (every eigenvalue-derived one,
# counts included), and those that must be equal (which layers, and what each is)
COMPARED = METRICS + ["num_evals"]
IDENTICAL = ["layer_type", "M", "N", "fit_status"]
# columns of a log10 (alpha_weighted = alpha·log10 λ_max): 1e-4 relative on the quantity under the
# log moves its log10 by up to 4.3e-5 however close to 0 the log is, so these are held to
# RTOL × max(1, |value|) (plain relative once |value| >= 1)
LOG_SCALE = {"log_spectral_norm", "log_norm", "log_alpha_norm", "alpha_weighted"}
# the end-to-end step's three models: (name, kind, sizes, seed); the Llamas are heavy-tailed, built here
E2E_MODELS = (("llama-heavy-a", "llama", dict(layers=2, hidden=128, intermediate=344, vocab=500, heads=4), 1),
              ("llama-heavy-b", "llama", dict(layers=1, hidden=96, intermediate=256, vocab=300, heads=4), 2),
              ("gpt2-tiny", "gpt2", dict(layers=2, hidden=64, vocab=100), 3))
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


def build_checkpoint(out_dir: Path, cfg: dict, device, seed: int = 0) -> Path:
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
    gen = torch.Generator().manual_seed(seed)
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


def stop_group(proc: subprocess.Popen, grace_s: float = 30) -> tuple[str, str]:
    """Stops `proc`'s process group: SIGINT (the orchestrator then stops its workers, as on
    Ctrl-C), SIGKILL `grace_s` later; (stdout, stderr) as far as they were read."""
    for sig in (signal.SIGINT, signal.SIGKILL):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            pass
        try:
            out, err = proc.communicate(timeout=grace_s)
            return out or "", err or ""
        except subprocess.TimeoutExpired:
            continue
    return "", ""


def run_bounded(argv: list, timeout_s: float, grace_s: float = 30, **popen_kwargs) -> subprocess.CompletedProcess:
    """`argv` run to its end in its own process group, or stopped (`stop_group`) after `timeout_s`
    (returncode None then) or when this script is interrupted."""
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True, **popen_kwargs)
    try:
        out, err = proc.communicate(timeout=timeout_s)
        return subprocess.CompletedProcess(argv, proc.returncode, out, err)
    except subprocess.TimeoutExpired:
        out, err = stop_group(proc, grace_s)
        return subprocess.CompletedProcess(argv, None, out, err + f"\n(stopped after {timeout_s:.0f} s)")
    except BaseException:  # Ctrl-C: leave no orchestrator or worker behind
        stop_group(proc, grace_s)
        raise


def run_worker(model_dir: Path, out_dir: Path, device: str, visible=None, timeout_s: float = 7200) -> float:
    """Wall seconds of the real worker process on this model."""
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    if visible is not None:
        env["CUDA_VISIBLE_DEVICES"] = visible
    argv = [sys.executable, str(ROOT / "esd_worker.py"), f"--model_id={model_dir}", "--output_dir",
            str(out_dir), "--device", device, "--fix_fingers", "DKS", "--overwrite"]
    start = time.perf_counter()
    done = run_bounded(argv, timeout_s, env=env)
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


def relative_difference(ours: float, theirs: float, floor: float = 0.0) -> float:
    """|ours - theirs| / max(|theirs|, floor) (|ours| when that is 0); 0 when both are NaN, inf
    when one is."""
    if math.isnan(ours) and math.isnan(theirs):
        return 0.0
    scale = max(abs(theirs), floor)
    diff = abs(ours - theirs) / scale if scale else abs(ours)
    return diff if math.isfinite(diff) else math.inf


def largest_differences(frame, model_dir: Path, names: list) -> dict:
    """metric -> largest relative difference between the worker's rows and the reference."""
    settings = net_esd.ESDSettings(fix_fingers="DKS")
    worst = dict.fromkeys(METRICS, 0.0)
    rows = frame.set_index("longname")
    for name in names:
        ref = reference_row(read_tensor(model_dir, name), settings)
        for metric in METRICS:
            diff = relative_difference(float(rows.loc[name, metric]), float(ref[metric]))
            worst[metric] = max(worst[metric], diff)
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

# ---- step 1: end to end through the orchestrator -------------------------------------------------

def build_e2e_models(root: Path) -> list[Path]:
    """The three models of the end-to-end step as local checkpoints under `root` (safetensors, CPU-built)."""
    dirs = []
    for name, kind, sizes, seed in E2E_MODELS:
        if kind == "llama":
            dirs.append(build_checkpoint(root / name, sizes, "cpu", seed=seed))
            continue
        from transformers import GPT2Config, GPT2LMHeadModel
        from transformers.utils import logging as transformers_logging
        transformers_logging.disable_progress_bar()
        torch.manual_seed(seed)
        config = GPT2Config(n_layer=sizes["layers"], n_embd=sizes["hidden"], n_head=2,
                            vocab_size=sizes["vocab"], n_positions=32, bos_token_id=0, eos_token_id=0)
        GPT2LMHeadModel(config).save_pretrained(root / name)
        dirs.append(root / name)
    return dirs


def write_e2e_model_list(model_dirs: list, path: Path) -> Path:
    """A model list CSV of local base models (the format of examples/models.csv)."""
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["model_id", "source_model", "base_model_relation"])
        writer.writerows([str(d), "", "base"] for d in model_dirs)
    return path


@dataclass
class OrchestratorRun:
    """What one `run_esd_experiment.py` run left: its verdict, wall time and per-model facts."""
    label: str
    wall_s: float
    returncode: object                  # None: stopped at the timeout
    runtime_s: dict = field(default_factory=dict)   # model name -> worker seconds (gpu_metrics.json)
    gpus: dict = field(default_factory=dict)        # model name -> NVML indices granted ([] on CPU)
    mode: str = "?"                                  # gpu_metrics.json's "gpu" or "cpu"
    output_tail: str = ""


def run_orchestrator(label: str, model_list: Path, out_dir: Path, placement: list, timeout_s: float,
                     scratch: Path) -> OrchestratorRun:
    """One real run of the orchestrator on `model_list` into `out_dir` (offline, private hub cache),
    the whole run bounded by `timeout_s` and each model by the same through its --timeout."""
    python_path = os.pathsep.join(p for p in (os.environ.get("PYTHONPATH"), str(ROOT)) if p)
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_HOME=str(scratch / "hf_home"), PYTHONPATH=python_path,
               TOKENIZERS_PARALLELISM="false")
    env.pop("HF_HUB_CACHE", None)
    argv = [sys.executable, str(ROOT / "run_esd_experiment.py"), "--model_list", str(model_list),
            "--output_dir", str(out_dir), "--fix_fingers", "DKS", "--max_retries", "0",
            "--timeout", str(timeout_s), "--poll_interval", "0.5", "--max_check", "2", *placement]
    start = time.perf_counter()
    done = run_bounded(argv, timeout_s, env=env, cwd=scratch)
    run = OrchestratorRun(label, time.perf_counter() - start, done.returncode,
                          output_tail=(done.stdout[-1500:] + done.stderr[-2500:]).strip())
    metrics_path = out_dir / "gpu_metrics.json"
    if metrics_path.exists():
        metrics = json.loads(metrics_path.read_text())
        run.mode = metrics.get("mode", "?")
        for job in metrics.get("per_job", []):  # job ids are the model ids: the models' dirs
            run.runtime_s[Path(job["job_id"]).name] = job.get("runtime_s")
            run.gpus[Path(job["job_id"]).name] = job.get("gpus")
    return run


def compare_results(csv_a: Path, csv_b: Path, rtol: float = RTOL) -> tuple[dict, list]:
    """(column -> (largest relative difference, layer)) over COMPARED, and the disagreements of
    two runs' result CSVs of one model: a missing file, layer or column, an IDENTICAL column
    that differs, a COMPARED one beyond `rtol` (LOG_SCALE ones: beyond rtol × max(1, |value|)).
    No disagreement: the model passes."""
    import pandas as pd
    problems = [f"no result CSV {path}" for path in (csv_a, csv_b) if not path.exists()]
    if problems:
        return {}, problems
    a, b = (pd.read_csv(path).set_index("longname") for path in (csv_a, csv_b))
    for name, only in (("first", a.index.difference(b.index)), ("second", b.index.difference(a.index))):
        problems += [f"layer {layer} only in the {name} run" for layer in only]
    missing = [c for c in COMPARED + IDENTICAL if c not in a.columns or c not in b.columns]
    problems += [f"column {c} missing" for c in missing]
    layers = a.index.intersection(b.index)
    for column in IDENTICAL:
        if column not in missing:
            problems += [f"{layer}: {column} {a.at[layer, column]!r} != {b.at[layer, column]!r}"
                         for layer in layers if str(a.at[layer, column]) != str(b.at[layer, column])]
    worst = {}
    for column in COMPARED:
        if column in missing:
            continue
        floor = 1.0 if column in LOG_SCALE else 0.0
        diffs = [(relative_difference(float(a.at[layer, column]), float(b.at[layer, column]), floor), layer)
                 for layer in layers]
        worst[column] = max(diffs, default=(0.0, ""))
        problems += [f"{layer}: {column} differs by {d:.1e} (> {rtol:.0e})" for d, layer in diffs if not d <= rtol]
    return worst, problems


def model_verdict(name: str, worst: dict, problems: list) -> str:
    """The PASS/FAIL line of one model."""
    if problems:
        more = f" (+{len(problems) - 3} more)" if len(problems) > 3 else ""
        return f"FAIL  {name}: {'; '.join(problems[:3])}{more}"
    column, (diff, layer) = max(worst.items(), key=lambda item: item[1][0])
    return (f"PASS  {name}: {len(COMPARED)} columns agree on every layer, largest relative difference "
            f"{diff:.1e} ({column}, {layer or '-'})")


def run_failures(run: OrchestratorRun, model_dirs: list, want_gpu: bool) -> list:
    """Why a run cannot be trusted: a non-zero exit, a timeout, a model not run where asked."""
    why = []
    if run.returncode is None:
        busy = " (was GPU 0 busy above --gpu_memory_threshold, 500 MB?)" if want_gpu else ""
        why.append(f"{run.label}: stopped at the timeout{busy}")
    elif run.returncode != 0:
        why.append(f"{run.label}: exit status {run.returncode}")
    if want_gpu:
        if run.mode != "gpu":
            why.append(f"{run.label}: gputracker ran in {run.mode!r} mode, not on GPU 0 (does NVML see it?)")
        why += [f"{run.label}: {Path(d).name} ran on GPUs {run.gpus.get(Path(d).name)}, not [0]"
                for d in model_dirs if run.gpus.get(Path(d).name) != [0]]
    return why


def wall_time_figure(runs: list, model_dirs: list) -> str:
    """The wall times of the runs, per model (the worker process) and whole."""
    width = max(24, *(len(r.label) + 2 for r in runs))
    lines = ["wall times (s)".ljust(24) + "".join(r.label.rjust(width) for r in runs)]
    for d in model_dirs:
        cells = [run.runtime_s.get(Path(d).name) for run in runs]
        lines.append(f"  {Path(d).name:22s}" + "".join(
            (f"{c:.1f}" if c is not None else "n/a").rjust(width) for c in cells))
    lines.append(f"  {'whole run':22s}" + "".join(f"{r.wall_s:.1f}".rjust(width) for r in runs))
    first, *others = runs
    lines += [f"  {r.label} took {r.wall_s / first.wall_s:.2f}x the wall time of {first.label}" for r in others]
    return "\n".join(lines)


def end_to_end_step(cuda: bool, timeout_s: float) -> bool:
    """Step 1; True when every model agrees between the two runs and both ran as asked."""
    from esd.model_list import make_entry, result_csv_path
    scratch = Path(tempfile.mkdtemp(prefix="gpu_check_e2e_"))
    print(f"\nend to end through run_esd_experiment.py ({len(E2E_MODELS)} models, scratch {scratch}):", flush=True)
    model_dirs = build_e2e_models(scratch / "models")
    model_list = write_e2e_model_list(model_dirs, scratch / "models.csv")
    if cuda:
        plans = [("GPU 0 (--gpus 0)", ["--gpus", "0"], True),
                 ("CPU (--cpu_workers 1)", ["--gpus", "none", "--cpu_workers", "1"], False)]
    else:
        print("  GPU dispatch SKIPPED: no GPU is visible (torch.cuda.is_available() is False); "
              "the CPU path runs twice instead (--cpu_workers 1 against --cpu_workers 2)")
        plans = [("CPU (--cpu_workers 1)", ["--gpus", "none", "--cpu_workers", "1"], False),
                 ("CPU (--cpu_workers 2)", ["--gpus", "none", "--cpu_workers", "2"], False)]
    runs, failures = [], []
    for index, (label, placement, want_gpu) in enumerate(plans):
        print(f"  running {label} ...", flush=True)
        run = run_orchestrator(label, model_list, scratch / f"out{index}", placement, timeout_s, scratch)
        runs.append(run)
        why = run_failures(run, model_dirs, want_gpu)
        failures += why
        if why:
            print("  " + "\n  ".join(why) + "\n  its output ends:\n    " + run.output_tail.replace("\n", "\n    "))
    print(f"\n  compared ({runs[0].label} against {runs[1].label}): {', '.join(COMPARED)} to "
          f"{RTOL:.0e} relative ({', '.join(sorted(LOG_SCALE))}: {RTOL:.0e} x max(1, |value|)); "
          f"the layers and their {', '.join(IDENTICAL)} exactly")
    for d in model_dirs:
        csvs = [result_csv_path(scratch / f"out{i}", make_entry(str(d))) for i in range(2)]
        worst, problems = compare_results(*csvs)
        failures += problems
        print("  " + model_verdict(d.name, worst, problems))
    print("\n" + wall_time_figure(runs, model_dirs))
    if failures:
        print(f"END TO END: FAIL ({len(failures)} problems); the runs are kept in {scratch}")
        return False
    shutil.rmtree(scratch, ignore_errors=True)
    print("END TO END: PASS" + ("" if cuda else " (CPU path only: GPU dispatch skipped, no GPU visible)"))
    return True


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], allow_abbrev=False)
    parser.add_argument("--small", action="store_true", help="a 2-layer, 256-wide model (CPU friendly)")
    parser.add_argument("--work_dir", type=Path, default=Path(__file__).resolve().parent / "_work")
    parser.add_argument("--skip_ww", action="store_true", help="do not time WeightWatcher")
    parser.add_argument("--e2e_timeout", type=float, default=1800.0,
                        help="seconds allowed to each orchestrator run of the end-to-end step (1800)")
    args = parser.parse_args()

    cfg = SMALL if args.small else FULL
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    gpus = torch.cuda.device_count() if cuda else 0
    print(f"device {'cuda x%d (%s)' % (gpus, torch.cuda.get_device_name(0)) if cuda else 'cpu (no CUDA)'}, "
          f"model {'small' if args.small else '7B-shaped'}: {cfg}", flush=True)
    end_to_end_ok = end_to_end_step(cuda, args.e2e_timeout)

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
    reasons = [f"{', '.join(failed)} beyond {RTOL:.0e}"] if failed else []
    reasons += [] if end_to_end_ok else ["the end-to-end step (END TO END above)"]
    print("\nRESULT:", f"FAIL ({'; '.join(reasons)})" if reasons else "OK")
    shutil.rmtree(out, ignore_errors=True)
    return 1 if reasons else 0


if __name__ == "__main__":
    sys.exit(main())
