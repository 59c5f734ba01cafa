"""The bench scripts write their own section of docs/benchmarks.md: what they printed, with
the command, date, commit and machine; a run replaces its section and leaves the others."""
from __future__ import annotations

import datetime
import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

import _report  # noqa: E402

WHEN = datetime.datetime(2026, 1, 2, 3, 4, tzinfo=datetime.timezone.utc)


def section(name: str, figures: str) -> str:
    return _report.section_text(name, "what it measures", f"python bench/{name}.py", figures,
                                WHEN, "abc1234", "a machine", "load")


def test_a_section_is_replaced_and_every_other_section_kept(tmp_path):
    page = tmp_path / "benchmarks.md"
    _report.write_section("bench_loader", section("bench_loader", "loader 1.0 s"), page)
    _report.write_section("bench_dispatch", section("bench_dispatch", "dispatch 2.0 ms"), page)
    page.write_text(page.read_text().replace("# Benchmarks\n", "# Benchmarks\n\nAn old intro.\n"))

    _report.write_section("bench_loader", section("bench_loader", "loader 9.0 s"), page)

    text = page.read_text()
    assert "loader 9.0 s" in text and "loader 1.0 s" not in text
    assert "dispatch 2.0 ms" in text
    assert text.startswith(_report.INTRO) and "An old intro." not in text   # the writer's intro
    # the page's order, whichever script ran last: bench_dispatch comes before bench_loader
    assert text.index(_report.start_marker("bench_dispatch")) < text.index(_report.start_marker("bench_loader"))
    assert text.count(_report.start_marker("bench_loader")) == 1


def test_a_section_says_what_where_and_when():
    text = section("bench_hub", "peak 21.5 MB")
    assert "2026-01-02 03:04 UTC" in text and "abc1234" in text and "a machine" in text
    assert "```text\npeak 21.5 MB\n```" in text


def test_machine_names_cores_and_memory():
    assert re.search(r", \d+ cores?, [\d.]+ GiB memory, ", _report.machine())


def test_load_says_when_other_work_shared_the_machine():
    cores = os.cpu_count() or 1
    assert "loaded machine" in _report.load_text(cores * 3.0, cores * 3.0)
    assert "loaded machine" not in _report.load_text(0.0, 0.5)


def test_a_bench_script_run_writes_its_printed_figures_with_commit_and_machine(tmp_path):
    page = tmp_path / "benchmarks.md"
    done = subprocess.run([sys.executable, str(ROOT / "bench" / "bench_dispatch.py"), "--jobs", "8",
                           "--gpus", "2"], cwd=ROOT, capture_output=True, text=True, timeout=600,
                          env=dict(os.environ, ESD_BENCH_PAGE=str(page)))
    assert done.returncode == 0, done.stderr[-2000:]
    text = page.read_text()
    body = text[text.index(_report.start_marker("bench_dispatch")):]
    printed = [line for line in done.stdout.splitlines() if line.startswith(("Phase", "  "))]
    assert printed and all(line in body for line in printed)
    assert "`python bench/bench_dispatch.py --jobs 8 --gpus 2`" in body
    assert _report.git_commit().split()[0] in body and _report.machine() in body


def test_a_bench_run_that_fails_leaves_the_page_as_it_was(tmp_path):
    page = tmp_path / "benchmarks.md"
    page.write_text("kept\n")
    done = subprocess.run([sys.executable, str(ROOT / "bench" / "bench_dispatch.py"), "--jobs", "x"],
                          cwd=ROOT, capture_output=True, text=True, timeout=600,
                          env=dict(os.environ, ESD_BENCH_PAGE=str(page)))
    assert done.returncode != 0
    assert page.read_text() == "kept\n"
