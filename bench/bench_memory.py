"""Peak memory of one model's analysis: ours (the real worker, streaming) vs WeightWatcher.

    python bench/bench_memory.py [--work_dir bench/_work] [--skip_ww]

Builds the Llama-style checkpoints of `bench/llama_fixture.py` (4 layers, hidden 2048,
intermediate 5632, vocab 32000, TinyLlama's shapes, 0.6 GB of bfloat16 safetensors) and a
12-layer twin (1.3 GB), then runs each measurement in its own process and reads that process's peak
resident set size (`wait4` rusage, which counts mapped file pages it touched):

- import floor: a process that only imports torch, transformers and peft;
- ours: `esd_worker.py --device cpu` on the 4- and 12-layer models (whole analysis, CSV written);
- WeightWatcher 0.7.7: `from_pretrained` + `analyze()` on the 4-layer model.

Read: ours on the 4-layer model, and the 12-layer model's peak over the 4-layer one's (memory
that does not grow with model size keeps it near 1). Prints figures; asserts nothing.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# This process stays small (stdlib only): a child's peak-RSS figure starts from its parent's
# at fork time, so the checkpoints are built in a child process too.
BUILD = ("import sys; sys.path.insert(0, sys.argv[1]); from llama_fixture import build_llama_checkpoint; "
         "build_llama_checkpoint(sys.argv[2], num_layers=int(sys.argv[3]))")


def build_llama_checkpoint(out_dir: Path, num_layers: int) -> Path:
    subprocess.run([sys.executable, "-c", BUILD, str(ROOT / "bench"), str(out_dir), str(num_layers)],
                   check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return out_dir

IMPORT_ONLY = "import torch, transformers, peft, safetensors, pandas"
WW_SCRIPT = """
import sys, weightwatcher as ww
from transformers import AutoModelForCausalLM
model = AutoModelForCausalLM.from_pretrained(sys.argv[1])
ww.WeightWatcher(model=model).analyze()
"""


def peak_rss_mb(argv: list[str], env: dict | None = None) -> tuple[float, float]:
    """(peak RSS in MB, wall seconds) of one child process, from its own rusage."""
    started = time.perf_counter()
    proc = subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    elapsed = time.perf_counter() - started
    if proc.returncode != 0:
        raise SystemExit(f"{argv[:3]} failed with {proc.returncode}: {proc.stderr.read().decode()[-2000:]}")
    return usage.ru_maxrss / 1024.0, elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work_dir", type=Path, default=ROOT / "bench" / "_work")
    parser.add_argument("--skip_ww", action="store_true", help="leave out WeightWatcher (slow)")
    args = parser.parse_args()

    small = build_llama_checkpoint(args.work_dir / "llama-4L", num_layers=4)
    large = build_llama_checkpoint(args.work_dir / "llama-12L", num_layers=12)
    size_gb = {p: sum(f.stat().st_size for f in p.glob("*.safetensors")) / 1e9 for p in (small, large)}
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=str(ROOT))

    rows = [("import floor (torch+transformers+peft)",) + peak_rss_mb([sys.executable, "-c", IMPORT_ONLY], env)]
    for name, model in (("ours, 4 layers", small), ("ours, 12 layers", large)):
        with tempfile.TemporaryDirectory() as out:
            argv = [sys.executable, str(ROOT / "esd_worker.py"), "--model_id", str(model),
                    "--output_dir", out, "--device", "cpu", "--fix_fingers", "DKS"]
            rows.append((f"{name} ({size_gb[model]:.2f} GB on disk)",) + peak_rss_mb(argv, env))
    if not args.skip_ww:
        rows.append((f"WeightWatcher 0.7.7, 4 layers",)
                    + peak_rss_mb([sys.executable, "-c", WW_SCRIPT, str(small)], env))

    print(f"{'measurement':<48} {'peak RSS MB':>12} {'seconds':>9}")
    for name, rss, seconds in rows:
        print(f"{name:<48} {rss:>12.0f} {seconds:>9.1f}")
    ours_small, ours_large = rows[1][1], rows[2][1]
    print(f"\nours 4 layers: {ours_small:.0f} MB")
    print(f"ours 12 layers / 4 layers: {ours_large / ours_small:.3f}")
    if not args.skip_ww:
        print(f"WeightWatcher / ours (4 layers): {rows[3][1] / ours_small:.2f}x")


if __name__ == "__main__":
    from _report import figures_to_docs   # bench/ is sys.path[0] when run as a script
    with figures_to_docs(__file__, __doc__):
        main()
