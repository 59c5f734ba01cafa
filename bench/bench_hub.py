"""Hub models for real: disk, memory, wall time and resolve calls of the three modes (cache,
`--disk_budget`, `--stream`) against the test suite's stand-in Hub on 127.0.0.1 with the
CDN's bandwidth capped.

    python bench/bench_hub.py [--work_dir bench/_work/hub] [--bandwidth_mbps 40]

1. Peak bytes in the hub cache over a run of 6 models (`run_esd_experiment.py`, 2 CPU
   workers), polled every 20 ms: cache mode keeps everything; bounded mode (budget: the
   largest model + 10 %) stays at most at the largest model; streaming writes no weights.
2. Peak RSS (wait4) of a streaming worker on a Llama-shaped model with 4 and 12 layers.
3. Wall time over 2 models, one worker, streaming vs download-then-analyse, at a bandwidth
   where one model's download takes about as long as its analysis.
4. Resolve calls per model (per weight file), from the server's request log.

Prints figures; asserts nothing.
"""
from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
from hub_server import HubServer  # noqa: E402  (stdlib only: this process stays small)

BUILD = """
import sys, torch
sys.path.insert(0, sys.argv[1])
from tiny_models import save_model
out, layers, hidden, inter, vocab, seed = sys.argv[2], *map(int, sys.argv[3:8])
save_model("llama", out, seed=seed, dtype=torch.bfloat16, config=dict(
    hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers, vocab_size=vocab,
    num_attention_heads=max(1, hidden // 64), num_key_value_heads=max(1, hidden // 256),
    tie_word_embeddings=False))
"""


def build(path: Path, layers: int, hidden: int, inter: int, vocab: int, seed: int) -> Path:
    if not (path / "model.safetensors").is_file():
        subprocess.run([sys.executable, "-c", BUILD, str(ROOT / "tests"), str(path), str(layers),
                        str(hidden), str(inter), str(vocab), str(seed)], check=True,
                       capture_output=True)
    return path


def weights_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.glob("*.safetensors"))


def tree_bytes(path: Path) -> int:
    total = 0
    for root, _, files in os.walk(path):
        for name in files:
            try:
                full = os.path.join(root, name)
                if not os.path.islink(full):
                    total += os.stat(full).st_size
            except OSError:
                pass
    return total


class PeakDisk:
    """Polls a directory's size on a thread; `.peak` is the largest seen."""

    def __init__(self, path: Path, interval_s: float = 0.02):
        self.path, self.interval_s, self.peak = path, interval_s, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, tree_bytes(self.path))
            self._stop.wait(self.interval_s)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, tree_bytes(self.path))


def env_for(hub: HubServer, home: Path) -> dict:
    env = hub.subprocess_env(home)
    env.update(PYTHONPATH=str(ROOT), TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS="1")
    return env


def run_experiment(hub, work: Path, name: str, ids: list[str], *flags, workers: int = 2):
    home, out = work / f"home_{name}", work / f"out_{name}"
    shutil.rmtree(home, ignore_errors=True)
    shutil.rmtree(out, ignore_errors=True)
    (home / "hub").mkdir(parents=True)
    model_list = work / f"{name}.csv"
    model_list.write_text("model_id\n" + "".join(f"{i}\n" for i in ids))
    started = time.monotonic()
    with PeakDisk(home / "hub") as disk:
        done = subprocess.run([sys.executable, str(ROOT / "run_esd_experiment.py"),
                               "--model_list", str(model_list), "--output_dir", str(out),
                               "--gpus", "none", "--cpu_workers", str(workers),
                               "--poll_interval", "0.05", "--max_check", "1", *flags],
                              env=env_for(hub, home), capture_output=True, text=True)
    wall = time.monotonic() - started
    if done.returncode != 0:
        print(done.stdout[-2000:], done.stderr[-2000:])
    return wall, disk.peak, out


def peak_rss_mb(hub, work: Path, model_id: str, *flags) -> tuple[float, float]:
    home = work / "home_rss"
    shutil.rmtree(home, ignore_errors=True)
    started = time.monotonic()
    proc = subprocess.Popen([sys.executable, str(ROOT / "esd_worker.py"), f"--model_id={model_id}",
                             "--output_dir", str(work / "out_rss"), "--device", "cpu",
                             "--overwrite", *flags], env=env_for(hub, home),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    return usage.ru_maxrss / 1024, time.monotonic() - started


def resolves_per_file(hub: HubServer, repo_id: str) -> dict[str, int]:
    counts: dict[str, int] = {}
    for _, _, filename in hub.resolve_calls(repo_id):
        counts[filename] = counts.get(filename, 0) + 1
    return counts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--work_dir", type=Path, default=ROOT / "bench" / "_work" / "hub")
    parser.add_argument("--bandwidth_mbps", type=float, default=40.0,
                        help="CDN bandwidth for part 1, MB/s (%(default)s)")
    parser.add_argument("--parts", default="1234", help="which parts to run (%(default)s)")
    args = parser.parse_args()
    work = args.work_dir
    work.mkdir(parents=True, exist_ok=True)
    hub = HubServer().start()
    try:
        # ---------------------------------------------------------------- 1. disk
        if "1" in args.parts or "4" in args.parts:
            part_disk(hub, work, args)
        if "2" in args.parts or "3" in args.parts:
            part_memory_and_wall(hub, work, args)
    finally:
        hub.stop()


def part_disk(hub, work, args) -> None:
    sizes = [(1, 256), (2, 256), (3, 256), (2, 384), (3, 384), (4, 384)]
    ids = []
    for i, (layers, hidden) in enumerate(sizes):
        path = build(work / f"m{i}", layers, hidden, hidden * 3, 4000, seed=i)
        hub.add_repo(f"bench/m{i}", path)
        ids.append(f"bench/m{i}")
    largest = max(weights_bytes(work / f"m{i}") for i in range(len(sizes)))
    total = sum(weights_bytes(work / f"m{i}") for i in range(len(sizes)))
    hub.faults.bandwidth_bps = args.bandwidth_mbps * 1e6
    print(f"1. peak bytes in the hub cache, 6 models ({total / 1e6:.1f} MB of weights, the "
          f"largest {largest / 1e6:.1f} MB), CDN capped at {args.bandwidth_mbps:g} MB/s, 2 workers")
    budget_gb = largest * 1.1 / 1e9
    for name, flags in (("cache", ()), ("bounded", ("--disk_budget", f"{budget_gb:.6f}")),
                        ("stream", ("--stream",))):
        hub.log.clear()
        wall, peak, out = run_experiment(hub, work, name, ids, *flags)
        csvs = len(list(out.glob("bench--m*.csv")))
        print(f"   {name:8s} peak {peak / 1e6:8.2f} MB  ({peak / largest:5.2f}x the largest "
              f"model)  {csvs}/6 done  {wall:6.1f}s")
        if name == "stream":
            calls = resolves_per_file(hub, "bench/m5")
            weights = {f: n for f, n in calls.items() if f.endswith(".safetensors")}
    hub.faults.bandwidth_bps = None

    # ---------------------------------------------------------------- 4. resolves
    print("4. resolve calls of one streamed model (bench/m5): "
          + ", ".join(f"{f}: {n}" for f, n in sorted(calls.items()))
          + f"; weight files {len(weights)}, resolves for them {sum(weights.values())}")


def part_memory_and_wall(hub, work, args) -> None:
    # ---------------------------------------------------------------- 2. memory
    big = {}
    for layers in (4, 12):
        path = build(work / f"llama{layers}", layers, 512, 1408, 8000, seed=layers)
        hub.add_repo(f"bench/llama{layers}", path)
        big[layers] = path
    print("2. peak RSS of one streaming worker (Llama-shaped, hidden 512, bf16)")
    times = {}
    rss = {}
    for layers in (4, 12):
        rss[layers], times[layers] = peak_rss_mb(hub, work, f"bench/llama{layers}", "--stream")
        print(f"   {layers:2d} layers ({weights_bytes(big[layers]) / 1e6:6.1f} MB of weights): "
              f"peak RSS {rss[layers]:7.1f} MB, {times[layers]:5.1f}s")
    print(f"   12 vs 4 layers: {rss[12] / rss[4]:.2f}x the RSS for "
          f"{weights_bytes(big[12]) / weights_bytes(big[4]):.2f}x the weights")

    # ---------------------------------------------------------------- 3. wall time
    # A worker's start (imports, config) cannot overlap anything: measured on a 1-layer model
    # and taken out, so that one download takes as long as one model's analysis proper.
    tiny = build(work / "m0", 1, 256, 768, 4000, seed=0)
    hub.add_repo("bench/m0", tiny)
    _, startup = peak_rss_mb(hub, work, "bench/m0", "--stream")
    size = weights_bytes(big[12])
    analysis = max(1.0, times[12] - startup)
    bandwidth = size / analysis
    for copy in (1, 2):
        hub.add_repo(f"bench/copy{copy}", big[12])
    hub.faults.bandwidth_bps = bandwidth
    print(f"3. wall time over 2 models of {size / 1e6:.1f} MB, 1 worker, CDN capped at "
          f"{bandwidth / 1e6:.1f} MB/s (one download ≈ one analysis, {analysis:.1f}s; a worker's "
          f"start {startup:.1f}s)")
    walls = {}
    for name, flags in (("download", ()), ("stream", ("--stream",))):
        walls[name], _, _ = run_experiment(hub, work, f"wall_{name}",
                                           ["bench/copy1", "bench/copy2"], *flags, workers=1)
        print(f"   {name:8s} {walls[name]:6.1f}s")
    print(f"   streaming / download-then-analyse: {walls['stream'] / walls['download']:.2f}x")


if __name__ == "__main__":
    from _report import figures_to_docs   # bench/ is sys.path[0] when run as a script
    with figures_to_docs(__file__, __doc__):
        main()
