"""Hub runs against the bound of the link: N models through the real orchestrator, the
stand-in Hub's CDN capped as one shared link at the rate where one model's download takes as
long as one model's analysis on this machine (T, measured in the same run).

    python bench/bench_stages.py [--work_dir bench/_work/stages] [--models 4]
                                 [--layers 8] [--hidden 1024]

First T: the whole `esd_worker.py` process on the model read from a local directory (start,
imports, reading, computing, writing: what holds a slot), the smaller of two runs. The CDN is
then capped at size / T. No schedule beats LB = N·T + T (N downloads back to back on the one
link, the last analysis after them). Each mode runs from an empty hub cache:

- cache, 1 slot (`--cpu_workers 1`, as one GPU): the download stage ahead of the slot;
- cache, 2 slots (`--cpu_workers 2`);
- bounded, 1 slot, `--disk_budget` at twice the model;
- `--stream`, 1 slot: the worker reads by HTTP ranges while it computes;
- in the slot (`--downloads 0`), 1 slot: each worker downloads, then analyses (the contrast).

For each: wall time, its ratio to LB, the share of slot time spent waiting for bytes (the
run's own `slots:` line) and the peak bytes in the hub cache (polled every 20 ms).
Prints figures; asserts nothing.
"""
from __future__ import annotations

import argparse
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
from bench_hub import HubProcess, build, run_experiment, weights_bytes  # noqa: E402

SLOTS_LINE = re.compile(r"slots: +(\S+) of slot time: (\d+)% computing, (\d+)% waiting for bytes")


def analysis_seconds(model: Path) -> float:
    """One worker process on the local model: what one model holds a slot for."""
    times = []
    for _ in range(2):
        with tempfile.TemporaryDirectory() as out:
            started = time.monotonic()
            subprocess.run([sys.executable, str(ROOT / "esd_worker.py"), "--model_id", str(model),
                            "--output_dir", out, "--device", "cpu"], check=True, capture_output=True,
                           env=env_for_local())
            times.append(time.monotonic() - started)
    return min(times)


def env_for_local() -> dict:
    import os
    return dict(os.environ, PYTHONPATH=str(ROOT), TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1")


def run_mode(hub, work: Path, name: str, ids: list[str], slots: int, *flags) -> tuple[float, int, str]:
    """(wall seconds, peak bytes in the hub cache, the run's `slots:` figures)."""
    wall, peak, out = run_experiment(hub, work, name, ids, *flags, workers=slots)
    found = SLOTS_LINE.search((out / "logs" / "esd_experiment.log").read_text())
    waited = f"{found.group(3)}% of {found.group(1)} slot time waiting for bytes" if found else "no slots line"
    return wall, peak, waited


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work_dir", type=Path, default=ROOT / "bench" / "_work" / "stages")
    parser.add_argument("--models", type=int, default=4)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--hidden", type=int, default=1024)
    args = parser.parse_args()
    args.work_dir.mkdir(parents=True, exist_ok=True)
    from _report import figures_to_docs   # bench/ is sys.path[0] when run as a script
    with figures_to_docs(__file__, __doc__):
        measure(args)


def measure(args) -> None:
    work, n = args.work_dir, args.models
    model = build(work / f"llama{args.hidden}x{args.layers}", args.layers, args.hidden,
                  args.hidden * 11 // 4, 8000, seed=1)
    size = weights_bytes(model)
    t = analysis_seconds(model)
    bandwidth = size / t
    bound = n * t + t
    print(f"{n} models of {size / 1e6:.1f} MB (Llama-shaped, hidden {args.hidden}, {args.layers} layers, "
          f"bf16); T = {t:.1f}s (one worker process on the model, from disk); CDN capped at "
          f"{bandwidth / 1e6:.1f} MB/s, so one download also takes T; LB = N·T + T = {bound:.1f}s")
    ids = [f"bench/copy{i}" for i in range(n)]
    budget_gb = 2 * size / 1e9 * 1.05     # twice the model, and its small files
    modes = (("cache, 1 slot", 1, ()),
             ("cache, 2 slots", 2, ()),
             (f"bounded ({budget_gb:.3f} GB), 1 slot", 1, ("--disk_budget", f"{budget_gb:.4f}")),
             ("--stream, 1 slot", 1, ("--stream",)),
             ("in the slot (--downloads 0), 1 slot", 1, ("--downloads", "0")))
    print(f"   {'mode':38s} {'wall':>7s} {'/ LB':>6s}  {'peak cache':>10s}  slot time")
    with HubProcess({i: model for i in ids}, bandwidth_bps=bandwidth) as hub:
        for index, (name, slots, flags) in enumerate(modes):
            wall, peak, waited = run_mode(hub, work, f"mode{index}", ids, slots, *flags)
            print(f"   {name:38s} {wall:6.1f}s {wall / bound:5.2f}x  {peak / 1e6:7.1f} MB  {waited}")


if __name__ == "__main__":
    main()
