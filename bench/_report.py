"""Writes what a bench script printed into that script's own section of docs/benchmarks.md.

Owns: capturing a script's printed figures (a tee of stdout), the header of each section (the
command as run, date, git commit, machine, load average at its start and end) and replacing one
section of the page in place, under a file lock, through the atomic write every writer uses.

Must not: measure anything, judge a figure, or touch another script's section. A run that
ends in an exception (or Ctrl-C) writes nothing: the page keeps the figures it had.

    with figures_to_docs(__file__, __doc__):
        ...   # everything printed here becomes the section's figures

`ESD_BENCH_PAGE` names another page to write instead (a scratch copy).
"""
from __future__ import annotations

import datetime
import os
import platform
import shlex
import subprocess
import sys
import tempfile
from contextlib import contextmanager
from hashlib import sha1
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

from esd.atomic_files import write_text_atomic  # noqa: E402

PAGE = REPO_ROOT / "docs" / "benchmarks.md"
# the page's order of sections, whichever script ran last
SECTIONS = ("bench_esd", "bench_memory", "bench_hub", "bench_stages", "bench_dispatch",
            "bench_loader", "bench_hostile")
INTRO = """# Benchmarks

Figures printed by the scripts in `bench/`. Each section below is written by its script when
it runs (`bench/_report.py`): the command as run, the date, the git commit, the machine, its
load at the start and end of the run, then the script's output as printed. Timings depend
on the machine and on what else runs on it; compare figures within one section (one run),
not across sections. To add or refresh a section, run its script from the repository root:

| script | measures |
| --- | --- |
| `python bench/bench_esd.py` | the whole worker process against the float64 arithmetic floor (dsyrk Gram + float64 eigvalsh of the same matrices) and WeightWatcher 0.7.7 on a 1.2 GB TinyLlama-shaped checkpoint, with a stage breakdown and the largest difference of every metric |
| `python bench/bench_memory.py` | peak RSS of the worker on 4- and 12-layer TinyLlama-shaped checkpoints, against the import floor and WeightWatcher |
| `python bench/bench_hub.py` | the three hub modes against the stand-in Hub on 127.0.0.1: peak bytes in the cache, a streaming worker's peak RSS, wall time with the CDN's bandwidth capped, resolve calls per file |
| `python bench/bench_stages.py` | N hub models through the orchestrator on a capped link against the bound N·T + T: the download stage with one and two slots, a disk budget, `--stream`, and downloads in the slot; the share of slot time waiting for bytes, peak bytes in the cache |
| `python bench/bench_dispatch.py` | the gputracker dispatcher on fake GPUs: overhead per job, re-grant and release-to-launch latency |
| `python bench/bench_loader.py` | planning a deep config and a 70B-shaped Llama (shapes only), reading tensors from a safetensors file with a huge header |
| `python bench/bench_hostile.py` | kill -9, a full disk, racing orchestrators, hostile ids, the failure journal's cost |

`python bench/gpu_check.py` is the one-shot check for a CUDA machine: first three small
models through the real orchestrator with `--gpus 0` (gputracker, NVML, `CUDA_VISIBLE_DEVICES`)
and again on the CPU, their CSVs compared to 1e-4; then, on a 7B-shaped bf16 checkpoint, it compares four layers with a float64 SVD (exit status 1 beyond 1e-4) and prints
models per hour per GPU, the stage breakdown, peak GPU memory, WeightWatcher on the GPU and,
with several GPUs, the speed-up of spreading one model over them. It prints its figures only;
its CPU run (`--small`) is part of the test suite.
"""


def start_marker(name: str) -> str:
    return f"<!-- {name}: written by bench/{name}.py -->"


def end_marker(name: str) -> str:
    return f"<!-- end of {name} -->"


def page_path() -> Path:
    return Path(os.environ.get("ESD_BENCH_PAGE") or PAGE)


def git_commit(root: Path = REPO_ROOT) -> str:
    """Short commit of the checkout, `+ uncommitted changes` when a tracked file other than
    the benchmarks page differs from it."""
    def git(*args: str) -> str:
        try:
            done = subprocess.run(["git", "-C", str(root), *args], capture_output=True,
                                  text=True, timeout=30)
        except (OSError, subprocess.TimeoutExpired):   # no git on this machine
            return ""
        return done.stdout.strip() if done.returncode == 0 else ""
    commit = git("rev-parse", "--short=10", "HEAD")
    if not commit:
        return "unknown (not a git checkout)"
    changed = git("diff", "--name-only", "HEAD").splitlines()   # tracked files, staged or not
    dirty = [path for path in changed if path != PAGE.relative_to(REPO_ROOT).as_posix()]
    return f"{commit} + uncommitted changes" if dirty else commit


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


def memory_gib() -> float | None:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 1024 ** 3
    except (ValueError, OSError, AttributeError):
        return None


def machine() -> str:
    """`AMD EPYC, 2 cores, 23.5 GiB memory, Linux 6.1, Python 3.11.9`."""
    cores = os.cpu_count() or 0
    memory = memory_gib()
    parts = [cpu_model(), f"{cores} core{'s' if cores != 1 else ''}"]
    if memory is not None:
        parts.append(f"{memory:.1f} GiB memory")
    parts += [f"{platform.system()} {platform.release()}", f"Python {platform.python_version()}"]
    return ", ".join(parts)


def load_average() -> float | None:
    try:
        return os.getloadavg()[0]
    except OSError:
        return None


def load_text(start: float | None, end: float | None) -> str:
    """The 1-minute load average when the run started and when it ended, and whether other
    work shared the machine (more load than the cores, or than the run itself can add)."""
    if start is None or end is None:
        return "load average unknown"
    cores = os.cpu_count() or 1
    loaded = start >= cores / 2 or end >= cores * 1.5
    return (f"1-minute load average {start:.2f} at the start and {end:.2f} at the end, on "
            f"{cores} cores" + (" (a loaded machine: other work was running)" if loaded else ""))


def section_text(name: str, title: str, command: str, figures: str, when: datetime.datetime,
                 commit: str, where: str, load: str) -> str:
    body = figures.rstrip("\n")
    return "\n".join([
        start_marker(name),
        f"## `{name}`: {title}",
        "",
        f"`{command}`, measured {when:%Y-%m-%d %H:%M} UTC at commit {commit}, on {where}; "
        f"{load}.",
        "",
        "```text",
        body,
        "```",
        end_marker(name),
    ])


def split_page(text: str) -> tuple[str, dict[str, str]]:
    """The page's text before its first section, and each section's text by name."""
    sections: dict[str, str] = {}
    intro_lines: list[str] = []
    current: str | None = None
    lines: list[str] = []
    starts = {start_marker(n): n for n in _names(text)}
    for line in text.splitlines():
        if current is None:
            name = starts.get(line)
            if name is not None:
                current, lines = name, [line]
            elif not sections:
                intro_lines.append(line)
            continue
        lines.append(line)
        if line == end_marker(current):
            sections[current] = "\n".join(lines)
            current = None
    return "\n".join(intro_lines).strip("\n"), sections


def _names(text: str) -> list[str]:
    """Section names present in the page (known ones first), read from their start markers."""
    found = [line.split(":", 1)[0][len("<!-- "):] for line in text.splitlines()
             if line.startswith("<!-- ") and ": written by bench/" in line]
    return list(SECTIONS) + [n for n in found if n not in SECTIONS]


def replace_section(text: str, name: str, section: str) -> str:
    """The page with section `name` replaced (or added), every other section kept as is, under
    the intro of `INTRO` (the page's text before its sections is this module's, not edited
    by hand)."""
    _, sections = split_page(text)
    sections[name] = section
    order = [n for n in SECTIONS if n in sections] + [n for n in sections if n not in SECTIONS]
    return "\n\n".join([INTRO.strip("\n")] + [sections[n] for n in order]) + "\n"


def write_section(name: str, section: str, page: Path | None = None) -> Path:
    from filelock import FileLock
    page = Path(page or page_path())
    lock = Path(tempfile.gettempdir()) / f"esd-bench-page-{sha1(str(page.resolve()).encode()).hexdigest()[:12]}.lock"
    with FileLock(str(lock)):
        old = page.read_text(encoding="utf-8") if page.exists() else ""
        write_text_atomic(page, replace_section(old, name, section))
    return page


class _Tee:
    """stdout as it was, plus a copy of everything written."""

    def __init__(self, stream):
        self.stream, self.parts = stream, []

    def write(self, text: str) -> int:
        self.parts.append(text)
        return self.stream.write(text)

    def flush(self) -> None:
        self.stream.flush()

    def __getattr__(self, attr):
        return getattr(self.stream, attr)


@contextmanager
def figures_to_docs(script: str, doc: str | None):
    """Print as usual; when the block ends normally, its printed text becomes the section of
    `script` (its file name without `.py`) in the benchmarks page, titled by the first line
    of `doc` (the script's docstring)."""
    name = Path(script).stem
    title = " ".join((doc or name).strip().split("\n\n")[0].split()).rstrip(".")
    command = shlex.join(["python", f"bench/{Path(script).name}", *sys.argv[1:]])
    when = datetime.datetime.now(datetime.timezone.utc)
    load_start = load_average()
    commit = git_commit()          # the code that is measured: as it is when the run starts
    tee = _Tee(sys.stdout)
    sys.stdout = tee
    try:
        yield
    finally:
        sys.stdout = tee.stream
    section = section_text(name, title, command, "".join(tee.parts), when, commit,
                           machine(), load_text(load_start, load_average()))
    page = write_section(name, section)
    print(f"figures written to {page} (section {name})")
