"""Hub models for real: disk, memory, wall time and resolve calls of the three modes (cache,
`--disk_budget`, `--stream`) against the test suite's stand-in Hub on 127.0.0.1 with the
CDN's bandwidth capped.

    python bench/bench_hub.py [--work_dir bench/_work/hub] [--bandwidth_mbps 40]
                              [--only disk,memory,rss,ignore_range]

1. Peak bytes in the hub cache over a run of 6 models (`run_esd_experiment.py`, 2 CPU
   workers), polled every 20 ms: cache mode keeps everything; bounded mode (budget: the
   largest model + 10 %) stays at most at the largest model; streaming writes no weights.
2. Peak RSS (wait4) of a streaming worker on a Llama-shaped model with 4 and 12 layers.
3. Wall time over 2 models, one worker, streaming vs download-then-analyse, at a bandwidth
   where one model's download takes about as long as its analysis (T, measured alone on a
   Llama of hidden 1024): the run's, the workers' (from the run's log), and the workers'
   without their starts (S, measured on a 1-layer model): a start overlaps nothing, so with
   it the best ratio is (S + T) / (S + 2T), without it 0.5. The streaming worker's time
   blocked on bytes, from its log, beside the time it read layers. Each mode runs
   `--wall_repeats` times, interleaved; the fastest run of each is compared (the machine may
   be shared).
4. Resolve calls per model (per weight file), from the server's request log.
5. Peak RSS (wait4) of one worker on a float32 Llama of TinyLlama's width (hidden 2048,
   intermediate 5632, 4 layers, 1.25 GB: `bench/llama_fixture.py`): downloading into the hub
   cache, reading it from the cache, and `--stream`; beside them the streaming bound, the
   cached peak plus the read-ahead window (`PREFETCH_BYTES` of esd/loading/stream.py).
6. The same streaming worker against a CDN that ignores `Range` (a 200 with the whole file):
   its peak RSS beside the file's size, its wall time and the failure it ends with.

Parts by name (`--only`): disk (1, 4), memory (2, 3), rss (5), ignore_range (6). The Hub of
parts 2, 3, 5 and 6 runs in a process of its own: a worker's peak RSS (wait4) starts from its
parent's RSS at fork, and the stand-in Hub holds every file it serves in memory.

Prints figures; asserts nothing.
"""
from __future__ import annotations

import argparse
import json
import os
import re
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


# TinyLlama's width in float32: the size at which issue figures were taken (a 1.25 GB file)
BUILD_F32 = ("import sys, torch; sys.path.insert(0, sys.argv[1]); "
             "from llama_fixture import build_llama_checkpoint; "
             "build_llama_checkpoint(sys.argv[2], num_layers=int(sys.argv[3]), dtype=torch.float32)")
PREFETCH = ("from esd.loading.stream import PREFETCH_BYTES; print(PREFETCH_BYTES)")
# The stand-in Hub in a process of its own, serving argv's repos (`repo_id=dir`) with argv's
# fault knobs (a JSON object of `Faults` fields) until its stdin closes.
SERVE = """
import json, sys
sys.path.insert(0, sys.argv[1])
from hub_server import HubServer
hub = HubServer().start()
for name, value in json.loads(sys.argv[2]).items():
    setattr(hub.faults, name, value)
for spec in sys.argv[3:]:
    repo_id, path = spec.split("=", 1)
    hub.add_repo(repo_id, path)
print(json.dumps([hub.hub_port, hub.cdn_port]), flush=True)
sys.stdin.read()
hub.stop()
"""


class HubProcess:
    """The stand-in Hub serving `repos` ({repo_id: directory}) from a child process, with
    `faults` set; entering gives a `HubServer` that is not started but points at the child's
    ports, for its endpoint and its clients' environment."""

    def __init__(self, repos: dict[str, Path], **faults):
        self.repos, self.faults, self.proc = repos, faults, None

    def __enter__(self) -> HubServer:
        specs = [f"{repo_id}={path}" for repo_id, path in self.repos.items()]
        self.proc = subprocess.Popen([sys.executable, "-c", SERVE, str(ROOT / "tests"),
                                      json.dumps(self.faults), *specs],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        line = self.proc.stdout.readline()
        if not line:
            self.proc.wait()
            raise SystemExit(f"the stand-in Hub did not start (exit status {self.proc.returncode})")
        client = HubServer()
        client.hub_port, client.cdn_port = json.loads(line)
        return client

    def __exit__(self, *exc) -> None:
        self.proc.stdin.close()
        try:
            self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def build(path: Path, layers: int, hidden: int, inter: int, vocab: int, seed: int) -> Path:
    if not (path / "model.safetensors").is_file():
        subprocess.run([sys.executable, "-c", BUILD, str(ROOT / "tests"), str(path), str(layers),
                        str(hidden), str(inter), str(vocab), str(seed)], check=True,
                       capture_output=True)
    return path


def build_f32_llama(path: Path, layers: int) -> Path:
    """TinyLlama-shaped float32 checkpoint, built in a child (this process stays small)."""
    subprocess.run([sys.executable, "-c", BUILD_F32, str(ROOT / "bench"), str(path), str(layers)],
                   check=True, capture_output=True)
    return path


def prefetch_bytes() -> int:
    """The streaming loader's read-ahead window, asked of the code itself (in a child)."""
    done = subprocess.run([sys.executable, "-c", PREFETCH], env=dict(os.environ, PYTHONPATH=str(ROOT)),
                          check=True, capture_output=True, text=True)
    return int(done.stdout.strip())


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


class WorkerRun:
    """How one `esd_worker.py` process ended: peak RSS (MiB, wait4), wall seconds, exit
    status, the reason of the failure it recorded (None when it recorded none)."""

    def __init__(self, rss_mib: float, seconds: float, returncode: int, reason: str | None):
        self.rss_mib, self.seconds = rss_mib, seconds
        self.returncode, self.reason = returncode, reason

    @property
    def outcome(self) -> str:
        if self.returncode == 0:
            return "CSV written"
        return f"failed: {self.reason or 'no failure recorded'} (exit {self.returncode})"


def run_worker(hub, home: Path, out: Path, model_id: str, *flags) -> WorkerRun:
    """One worker against `hub` with HF_HOME `home` (kept: a second run finds the cache)."""
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    started = time.monotonic()
    with open(out.parent / f"{out.name}.stderr", "w") as stderr:
        proc = subprocess.Popen([sys.executable, str(ROOT / "esd_worker.py"),
                                 f"--model_id={model_id}", "--output_dir", str(out), "--device",
                                 "cpu", "--overwrite", *flags], env=env_for(hub, home),
                                stdout=subprocess.DEVNULL, stderr=stderr)
        _, status, usage = os.wait4(proc.pid, 0)
    seconds = time.monotonic() - started
    return WorkerRun(usage.ru_maxrss / 1024, seconds, os.waitstatus_to_exitcode(status),
                     recorded_reason(out))


def recorded_reason(out: Path) -> str | None:
    """The reason of the last failure the worker recorded in `out`'s failures.jsonl."""
    journal = out / "failures.jsonl"
    reason = None
    if journal.is_file():
        for line in journal.read_text(errors="replace").splitlines():
            try:
                reason = json.loads(line).get("reason", reason)
            except (ValueError, AttributeError):
                pass
    return reason


def peak_rss_mb(hub, work: Path, model_id: str, *flags) -> tuple[float, float]:
    home = work / "home_rss"
    shutil.rmtree(home, ignore_errors=True)
    run = run_worker(hub, home, work / "out_rss", model_id, *flags)
    return run.rss_mib, run.seconds


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
    parser.add_argument("--only", type=parts_list, default=list(PARTS),
                        help=f"comma-separated parts to run, of {', '.join(PARTS)} (all)")
    parser.add_argument("--wall_layers", type=int, default=12,
                        help="decoder layers of the hidden-1024 bf16 Llama of part 3 (%(default)s)")
    parser.add_argument("--wall_repeats", type=int, default=2,
                        help="runs of each mode in part 3, interleaved; the fastest of each "
                             "is compared (%(default)s)")
    parser.add_argument("--rss_layers", type=int, default=4,
                        help="decoder layers of the hidden-2048 float32 Llama of parts 5 and 6 "
                             "(%(default)s: 1.25 GB)")
    args = parser.parse_args()
    work = args.work_dir
    work.mkdir(parents=True, exist_ok=True)
    for name in args.only:
        PARTS[name](work, args)


def parts_list(text: str) -> list[str]:
    names = [n.strip() for n in text.split(",") if n.strip()]
    unknown = [n for n in names if n not in PARTS]
    if unknown or not names:
        raise argparse.ArgumentTypeError(f"unknown part {', '.join(unknown) or '(none)'}: "
                                         f"choose from {', '.join(PARTS)}")
    return [n for n in PARTS if n in names]        # the page's order, each once


def part_disk(work, args) -> None:
    hub = HubServer().start()      # in this process: part 1 reads its request log
    try:
        part_disk_with(hub, work, args)
    finally:
        hub.stop()


def part_disk_with(hub, work, args) -> None:
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


def part_memory_and_wall(work, args) -> None:
    # ---------------------------------------------------------------- 2. memory
    big = {layers: build(work / f"llama{layers}", layers, 512, 1408, 8000, seed=layers)
           for layers in (4, 12)}
    tiny = build(work / "m0", 1, 256, 768, 4000, seed=0)
    repos = {f"bench/llama{layers}": path for layers, path in big.items()}
    print("2. peak RSS of one streaming worker (Llama-shaped, hidden 512, bf16)")
    times = {}
    rss = {}
    with HubProcess({**repos, "bench/m0": tiny}) as hub:
        for layers in (4, 12):
            rss[layers], times[layers] = peak_rss_mb(hub, work, f"bench/llama{layers}", "--stream")
            print(f"   {layers:2d} layers ({weights_bytes(big[layers]) / 1e6:6.1f} MB of weights): "
                  f"peak RSS {rss[layers]:7.1f} MiB, {times[layers]:5.1f}s")
        print(f"   12 vs 4 layers: {rss[12] / rss[4]:.2f}x the RSS for "
              f"{weights_bytes(big[12]) / weights_bytes(big[4]):.2f}x the weights")

    # ---------------------------------------------------------------- 3. wall time
    part_wall(work, args)


# The last line a streaming worker logs of a model (esd/loading/stream.py, at close)
STREAM_SUMMARY = re.compile(r"waited ([0-9.]+)s of ([0-9.]+)s for bytes")


def part_wall(work: Path, args) -> None:
    """Streaming against download-then-analyse, 2 models, 1 worker, on a link where one
    model's download takes about as long as its analysis (T). A worker's start (S: imports,
    config, measured alone) overlaps nothing in either mode, so the best streaming can do is
    (S + T) / (S + 2T) of download-then-analyse; the figures are also given with the starts
    taken out, which is what streaming itself changes (its best: 0.5x)."""
    layers = args.wall_layers
    path = build(work / f"llama1024_{layers}L", layers, 1024, 2816, 8000, seed=100 + layers)
    tiny = build(work / "m0", 1, 256, 768, 4000, seed=0)
    size = weights_bytes(path)
    # S on a 1-layer model, S + T on the model itself with no cap on the link (the fastest of
    # two runs each), so that one download takes as long as one model's analysis
    with HubProcess({"bench/alone": path, "bench/m0": tiny}) as hub:
        startup = min(peak_rss_mb(hub, work, "bench/m0", "--stream")[1] for _ in range(2))
        alone = min(peak_rss_mb(hub, work, "bench/alone", "--stream")[1] for _ in range(2))
    analysis = max(1.0, alone - startup)
    bandwidth = size / analysis
    print(f"3. wall time over 2 models of {size / 1e6:.1f} MB (Llama, hidden 1024, {layers} "
          f"layers, bf16), 1 worker, CDN capped at {bandwidth / 1e6:.1f} MB/s: one download ≈ "
          f"one analysis T = {analysis:.1f}s; a worker's start S = {startup:.1f}s")
    walls, jobs, waits = {}, {}, {}
    copies = {f"bench/copy{copy}": path for copy in (1, 2)}
    with HubProcess(copies, bandwidth_bps=bandwidth) as hub:
        for repeat in range(args.wall_repeats):       # interleaved: both modes see the same load
            # --downloads 0: each worker downloads, then analyses (no download stage ahead of it)
            for name, flags in (("download", ("--downloads", "0")), ("stream", ("--stream",))):
                wall, _, out = run_experiment(hub, work, f"wall_{name}", list(copies), *flags,
                                              workers=1)
                seconds = job_seconds(out)
                print(f"   {name:8s} {wall:6.1f}s, of which the workers "
                      f"{' + '.join(f'{j:.1f}s' for j in seconds)}")
                if name not in walls or wall < walls[name]:   # the least disturbed run
                    walls[name], jobs[name], waits[name] = wall, seconds, bytes_waits(out)
    starts = len(copies) * startup
    best = (startup + analysis) / (startup + 2 * analysis)
    worker = {name: sum(seconds) for name, seconds in jobs.items()}
    print(f"   streaming / download-then-analyse: {walls['stream'] / walls['download']:.2f}x the "
          f"run, {worker['stream'] / worker['download']:.2f}x the workers (best possible with "
          f"the starts in: {best:.2f}x)")
    print(f"   the workers without their starts ({len(copies)} x {startup:.1f}s): "
          f"{(worker['stream'] - starts) / max(1e-9, worker['download'] - starts):.2f}x "
          f"(best 0.50x)")
    if waits["stream"]:
        waited = sum(w for w, _ in waits["stream"])
        span = sum(s for _, s in waits["stream"])
        print(f"   streaming worker blocked on bytes: {waited:.1f}s of {span:.1f}s of reading "
              f"layers ({waited / max(1e-9, span):.0%}; per model "
              + ", ".join(f"{w / max(1e-9, s):.0%}" for w, s in waits["stream"]) + ")")


JOB_DONE = re.compile(r"job \S+ succeeded \(exit 0, ([0-9.]+) s\)")


def job_seconds(out: Path) -> list[float]:
    """How long each worker of a run took, from the run's log (the orchestrator's own start
    and end are not in them)."""
    log = out / "logs" / "esd_experiment.log"
    return [float(m.group(1)) for m in JOB_DONE.finditer(log.read_text(errors="replace"))] \
        if log.is_file() else []


def bytes_waits(out: Path) -> list[tuple[float, float]]:
    """(seconds blocked on bytes, seconds from plan to close) per streamed model, from the
    workers' logs."""
    found = []
    for log in sorted((out / "logs" / "workers").glob("*.log")):
        match = None
        for match in STREAM_SUMMARY.finditer(log.read_text(errors="replace")):
            pass
        if match is not None:
            found.append((float(match.group(1)), float(match.group(2))))
    return found


def f32_llama(work: Path, args) -> tuple[str, Path]:
    layers = args.rss_layers
    return f"bench/llama2048-{layers}L", build_f32_llama(work / f"llama2048_{layers}L_f32", layers)


def part_rss_at_2048(work, args) -> None:
    # ---------------------------------------------------------------- 5. RSS at hidden 2048
    repo_id, path = f32_llama(work, args)
    size = weights_bytes(path)
    window_mib = prefetch_bytes() / 2 ** 20
    print(f"5. peak RSS of one worker, Llama hidden 2048 / intermediate 5632, {args.rss_layers} "
          f"layers, float32 ({size / 1e9:.2f} GB of weights)")
    home = work / "home_rss2048"
    shutil.rmtree(home, ignore_errors=True)
    with HubProcess({repo_id: path}) as hub:
        runs = {"download": run_worker(hub, home, work / "out_rss2048_download", repo_id),
                "cached": run_worker(hub, home, work / "out_rss2048_cached", repo_id)}
        shutil.rmtree(home, ignore_errors=True)
        runs["stream"] = run_worker(hub, home, work / "out_rss2048_stream", repo_id, "--stream")
    labels = {"download": "download, then analyse", "cached": "read from the hub cache",
              "stream": "--stream"}
    for name, run in runs.items():
        print(f"   {labels[name]:24s} peak RSS {run.rss_mib:7.0f} MiB  {run.seconds:6.1f}s  "
              f"{run.outcome}")
    cached, stream = runs["cached"].rss_mib, runs["stream"].rss_mib
    bound = cached + window_mib
    print(f"   bound for --stream: cached {cached:.0f} MiB + read-ahead {window_mib:.0f} MiB "
          f"(PREFETCH_BYTES) = {bound:.0f} MiB; --stream {stream:.0f} MiB: "
          + (f"within it ({bound - stream:.0f} MiB to spare)" if stream <= bound
             else f"OVER it by {stream - bound:.0f} MiB"))
    shutil.rmtree(home, ignore_errors=True)


def part_ignore_range(work, args) -> None:
    # ---------------------------------------------------------------- 6. Range ignored
    repo_id, path = f32_llama(work, args)
    size = weights_bytes(path)
    home = work / "home_ignore_range"
    shutil.rmtree(home, ignore_errors=True)
    with HubProcess({repo_id: path}, ignore_range=True) as hub:
        run = run_worker(hub, home, work / "out_ignore_range", repo_id, "--stream")
    shutil.rmtree(home, ignore_errors=True)
    print(f"6. --stream against a CDN that ignores Range (200 with the whole file), the same "
          f"model: file {size / 2 ** 20:.0f} MiB, peak RSS {run.rss_mib:.0f} MiB "
          f"({run.rss_mib * 2 ** 20 / size:.2f}x the file), {run.seconds:.1f}s, {run.outcome}")


PARTS = {"disk": part_disk, "memory": part_memory_and_wall, "rss": part_rss_at_2048,
         "ignore_range": part_ignore_range}


if __name__ == "__main__":
    from _report import figures_to_docs   # bench/ is sys.path[0] when run as a script
    with figures_to_docs(__file__, __doc__):
        main()
