"""The hostile-world figures: real orchestrators and workers over tiny local models, in CPU mode.

    python bench/bench_hostile.py [--trials 20] [--only kill,disk,settings,ids,journal]

kill     kill -9 fuzzing: each trial runs one model and SIGKILLs its worker, either the moment
         its result CSV appears (between the rename and the exit: the window that left a done
         model listed as failed) or at a random moment; then the same command again. Reported:
         stale failure records (a model with a result that is listed as failed), models not
         done after the rerun, leftover temporary files.
disk     ENOSPC at several fill levels (a tmpfs; root only): a run of two models with a few KB
         free, then the space freed and the same command again. Reported per level: tracebacks,
         healthy workers killed, half-written files, whether the last line says "disk full",
         whether the rerun completed.
settings two orchestrators with different ESD settings started together on an empty directory
         (every other trial one of them with --overwrite). Reported: directories where both ran
         (mixed), trials where exactly one was refused.
ids      hostile ids and files: shell syntax, path escapes, option-like ids, control characters,
         a 300-byte component, /proc, a pickle that would create a file, damaged records.
         Reported: payloads executed, files written outside the output directory, tracebacks.
journal  the cost of recording one failure and of the orchestrator's read per ended job, with
         1,000 and 20,000 failures already recorded (ratio: linear would be ~1).
"""
from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))
sys.path.insert(0, str(REPO_ROOT / "tests"))

from hostile_kit import can_mount, fill_leaving, half_files, small_disk, tracebacks  # noqa: E402

RUN = [sys.executable, str(REPO_ROOT / "run_esd_experiment.py")]
FAST = ["--gpus", "none", "--poll_interval", "0.05", "--max_check", "1", "--retry_backoff", "0.1"]


def environment(root: Path) -> dict:
    env = dict(os.environ, HF_HOME=str(root / "hf_home"), HF_HUB_OFFLINE="1", PYTHONPATH=str(REPO_ROOT),
               TOKENIZERS_PARALLELISM="false")
    env.pop("HF_HUB_CACHE", None)
    return env


def result_csvs(out: Path) -> list[Path]:
    return [p for p in out.glob("*.csv") if p.name not in ("summary.csv", "runs.csv")]


def listed_failed(out: Path) -> set[str]:
    path = out / "failed_models.txt"
    return {line.split("\t")[0] for line in path.read_text().splitlines()} if path.exists() else set()


def worker_pids(out: Path) -> list[int]:
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            cmdline = Path(f"/proc/{entry}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if any(b"esd_worker.py" in part for part in cmdline) and str(out).encode() in cmdline:
            pids.append(int(entry))
    return pids


# ---------------------------------------------------------------- kill -9 fuzzing

def bench_kill(root: Path, trials: int, model: Path, models_csv: Path) -> None:
    env = environment(root)
    stale = not_done = leftovers = killed_in_window = 0
    for trial in range(trials):
        out = root / f"kill-{trial}"
        args = RUN + ["--model_list", str(models_csv), "--output_dir", str(out)] + FAST
        proc = subprocess.Popen(args, env=env, cwd=root, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        at_rename = trial % 2 == 0
        deadline = time.monotonic() + (300 if at_rename else random.uniform(2.0, 25.0))
        killed = False
        while time.monotonic() < deadline and proc.poll() is None:
            if at_rename and result_csvs(out):
                break
            time.sleep(0.005)
        for pid in worker_pids(out):
            try:
                os.kill(pid, signal.SIGKILL)
                killed = True
            except ProcessLookupError:
                pass
        killed_in_window += killed and at_rename
        proc.wait(timeout=600)
        subprocess.run(args, env=env, cwd=root, capture_output=True, timeout=600)  # the same command again
        has_result = bool(result_csvs(out))
        stale += has_result and str(model) in listed_failed(out)
        not_done += not has_result
        leftovers += len(list(out.rglob(".*.tmp*")))
    print(f"kill -9 fuzzing: {trials} trials ({killed_in_window} killed right after the rename): "
          f"{stale} stale failure records, {not_done} models not done after the rerun, "
          f"{leftovers} temporary files left")


# ---------------------------------------------------------------- ENOSPC at fill levels

def bench_disk(root: Path, models_csv: Path, levels_kb=(0, 4, 8, 12, 16, 24, 32)) -> None:
    if not can_mount():
        print("ENOSPC: skipped (mounting a tmpfs needs root)")
        return
    env = environment(root)
    totals = {"tracebacks": 0, "killed": 0, "half": 0, "no_last_line": 0, "rerun_incomplete": 0}
    for free_kb in levels_kb:
        with small_disk(root / f"disk-{free_kb}", 256) as disk:
            out = disk / "out"
            args = RUN + ["--model_list", str(models_csv), "--output_dir", str(out), "--cpu_workers", "2",
                          "--max_retries", "1"] + FAST
            filler = fill_leaving(disk, free_kb)
            full = subprocess.run(args, env=env, cwd=root, capture_output=True, text=True, timeout=900)
            said = full.stdout + full.stderr
            logs = "".join(p.read_text(errors="replace") for p in out.rglob("*.log")) if out.exists() else ""
            lines = said.strip().splitlines()
            says_full = full.returncode == 0 or bool(lines and "disk full" in lines[-1])
            killed = said.count("worker_killed")
            half = half_files(out, 10) if out.exists() else []
            filler.unlink()
            again = subprocess.run(args, env=env, cwd=root, capture_output=True, text=True, timeout=900)
            complete = again.returncode == 0 and len(result_csvs(out)) == 2 and not listed_failed(out)
            half += half_files(out, 10)
            row = {"tracebacks": tracebacks(said, logs, again.stdout, again.stderr), "killed": killed,
                   "half": len(half), "no_last_line": int(not says_full), "rerun_incomplete": int(not complete)}
            for key, value in row.items():
                totals[key] += value
            print(f"  ENOSPC with {free_kb:3d} KB free: rc {full.returncode}, {row['tracebacks']} tracebacks, "
                  f"{killed} killed workers, {len(half)} half files{' ' + str(half) if half else ''}, "
                  f"last line says disk full: {says_full}, rerun complete: {complete}")
    print(f"ENOSPC at {len(levels_kb)} fill levels: {totals['tracebacks']} tracebacks, {totals['killed']} killed "
          f"healthy workers, {totals['half']} half files, {totals['no_last_line']} runs without the disk-full "
          f"line, {totals['rerun_incomplete']} reruns incomplete")


# ---------------------------------------------------------------- two orchestrators, two settings

def bench_settings(root: Path, trials: int, models_csv: Path) -> None:
    env = environment(root)
    mixed = one_refused = 0
    for trial in range(trials):
        out = root / f"settings-{trial}"
        a = RUN + ["--model_list", str(models_csv), "--output_dir", str(out), "--max_retries", "0"] + FAST
        b = a + ["--fix_fingers", "DKS"] + (["--overwrite"] if trial % 2 else [])
        procs = [subprocess.Popen(cmd, env=env, cwd=root, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                 for cmd in (a, b)]
        results = [(p.wait(timeout=600), p.communicate()) for p in procs]
        refused = [rc == 2 and "ESD settings" in (err + outp) for rc, (outp, err) in results]
        ran = [not r for r in refused]
        mixed += all(ran)
        one_refused += sum(refused) == 1
    print(f"2 orchestrators with different settings x {trials}: {mixed} mixed directories, "
          f"{one_refused} trials with exactly one refused")


# ---------------------------------------------------------------- hostile ids and files

MALICIOUS_PICKLE = '''
import os, pickle, sys
class Payload:
    def __reduce__(self):
        return (os.system, ("touch " + sys.argv[2],))
with open(sys.argv[1], "wb") as handle:
    pickle.dump({"transformer.wte.weight": Payload()}, handle)
'''


def bench_ids(root: Path, model: Path) -> None:
    env = environment(root)
    sandbox = root / "ids"
    sandbox.mkdir()
    out = sandbox / "out"
    marker = sandbox / "PWNED"
    evil = sandbox / "evil-model"
    evil.mkdir()
    (evil / "config.json").write_text((model / "config.json").read_text())
    subprocess.run([sys.executable, "-c", MALICIOUS_PICKLE, str(evil / "pytorch_model.bin"), str(marker)], check=True)
    ids = [f"$(touch {marker})", f"`touch {marker}`", f"x; touch {marker}", f"x && touch {marker}",
           f"x | touch {marker}", "../../../../etc/passwd", "/proc/self", "/proc", "--help", "-rf",
           "org/..", "..", ".", "~", "org/" + "a" * 300, f"org/x@$(touch {marker})", "org/x\nphantom",
           "org/\x1b[2J\x1b[31mred", "org/\u202eevil", str(evil), f"{model}/../{model.name}",
           "org/name'\"", "org/%s%n", "C:\\Windows\\system32"]
    rows = [{"model_id": i} for i in ids]
    from tiny_models import write_model_list
    models_csv = write_model_list(sandbox / "models.csv", rows)
    out.mkdir()
    (out / "failures.jsonl").write_text("[" * 100_000 + "\n")
    before = set(p for p in root.rglob("*") if out not in p.parents and p != out)
    result = subprocess.run(RUN + ["--model_list", str(models_csv), "--output_dir", str(out), "--max_retries", "0",
                                   "--cpu_workers", "2"] + FAST, env=env, cwd=sandbox, capture_output=True,
                            text=True, timeout=1800)
    after = set(p for p in root.rglob("*") if out not in p.parents and p != out)
    outside = sorted(str(p) for p in after - before if "hf_home" not in str(p))
    executed = int(marker.exists()) + len(list(Path("/").glob("PWNED")))
    said = result.stdout + result.stderr
    logs = "".join(p.read_text(errors="replace") for p in (out / "logs").rglob("*.log"))
    for log_file in (out / "logs").rglob("*.log"):
        text = log_file.read_text(errors="replace")
        if tracebacks(text):
            last = [line for line in text.splitlines() if line.strip()][-3:]
            print(f"  traceback in {log_file.name}: {' | '.join(last)[:300]}")
    raw_escape = int("\x1b" in said)
    print(f"hostile ids and files ({len(ids)} ids, a malicious pickle, a 100,000-bracket failures.jsonl): "
          f"{executed} executed, {len(outside)} written outside{' ' + str(outside[:3]) if outside else ''}, "
          f"{tracebacks(said)} tracebacks on the console, {tracebacks(logs)} in worker logs, "
          f"{raw_escape} raw ANSI escapes on the console; rc {result.returncode}")


# ---------------------------------------------------------------- the journal stays linear

def bench_journal(root: Path) -> None:
    from esd import failures
    from esd.failures import ESDFailure, read_failures, record_failure
    figures, rewrite = {}, {}
    for count in (1_000, 20_000):
        out = root / f"journal-{count}"
        out.mkdir()
        lines = "".join(json.dumps({"model_id": f"org/m{i}", "stage": "resolve", "reason": "repo_not_found",
                                    "message": "gone", "retryable": False, "attempts": 1, "time": 1.0}) + "\n"
                        for i in range(count))
        (out / failures.FAILURES_JSONL).write_text(lines)
        failures.compact_failures(out)
        read_failures(out)  # the orchestrator's first read
        started = time.perf_counter()
        for i in range(200):
            record_failure(out, f"org/new{i}", ESDFailure("load", "corrupt_file", "x"))
            read_failures(out).get(f"org/new{i}")  # the orchestrator's look per ended job
        figures[count] = (time.perf_counter() - started) / 200
        # the anchor: the whole file parsed and rewritten, at the same size
        started = time.perf_counter()
        for _ in range(5):
            failures._views.clear()
            failures.compact_failures(out)
        rewrite[count] = (time.perf_counter() - started) / 5
    ratio = figures[20_000] / figures[1_000]
    print(f"failures journal: {figures[1_000] * 1e3:.2f} ms per failure (record + orchestrator read) with 1,000 "
          f"recorded, {figures[20_000] * 1e3:.2f} ms with 20,000: x{ratio:.1f} for 20x the records; a whole "
          f"parse+rewrite of the journal takes {rewrite[20_000] * 1e3:.0f} ms at 20,000 "
          f"(x{rewrite[20_000] / figures[20_000]:.0f} the append)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=20)
    parser.add_argument("--only", default="kill,disk,settings,ids,journal")
    args = parser.parse_args()
    chosen = set(args.only.split(","))
    from tiny_models import save_gpt2, write_model_list
    with tempfile.TemporaryDirectory(prefix="bench_hostile_") as tmp:
        root = Path(tmp)
        model = save_gpt2(root / "models" / "gpt2-a", seed=1)
        save_gpt2(root / "models" / "gpt2-b", seed=2)
        one = write_model_list(root / "one.csv", [{"model_id": str(model)}])
        two = write_model_list(root / "two.csv", [{"model_id": str(model)},
                                                  {"model_id": str(root / "models" / "gpt2-b")}])
        failing = write_model_list(root / "failing.csv", [{"model_id": "no-such-org/no-such-model"}])
        if "journal" in chosen:
            bench_journal(root)
        if "settings" in chosen:
            bench_settings(root, args.trials, failing)
        if "ids" in chosen:
            bench_ids(root, model)
        if "disk" in chosen:
            bench_disk(root, two)
        if "kill" in chosen:
            bench_kill(root, args.trials, model, one)


if __name__ == "__main__":
    from _report import figures_to_docs   # bench/ is sys.path[0] when run as a script
    with figures_to_docs(__file__, __doc__):
        main()
