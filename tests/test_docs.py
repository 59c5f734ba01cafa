"""README's commands are real: every flag a README command line names is a flag of that
command (read from the command's own --help), every flag README's prose names belongs to one
of the project's commands, every link into docs/ (and between docs/ pages) reaches an
existing file and heading, and the test command README gives is the one CI runs."""
from __future__ import annotations

import functools
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DOCS = ROOT / "docs"

# how README may name a command (from a checkout, or installed) -> the script that runs it
SCRIPTS = {
    "run_esd_experiment.py": "run_esd_experiment.py", "esd-run": "run_esd_experiment.py",
    "esd_worker.py": "esd_worker.py", "esd-worker": "esd_worker.py",
    "analyze_results.py": "analyze_results.py", "esd-analyze": "analyze_results.py",
    "create_model_list.py": "create_model_list.py", "esd-models": "create_model_list.py",
    "test_setup.py": "test_setup.py", "esd-doctor": "test_setup.py",
    "gputracker": "-m gputracker",
}
WITH_SUBCOMMANDS = {"create_model_list.py"}
# flags of other tools README's prose names: pip, pytest, sbatch options inside --slurm_extra
FOREIGN_FLAGS = {"--index-url", "--dist", "--mem", "--account", "--qos", "--array", "--output",
                 "--chdir", "--partition", "--time", "--gres", "--jobs"}
SHELL_BREAKS = {"&&", "||", "|", ";", "&", ">", ">>", "<", "2>&1"}


def readme() -> str:
    return README.read_text(encoding="utf-8")


def code_blocks(text: str) -> list[tuple[str, str]]:
    """(language, body) of every fenced block."""
    return re.findall(r"^```(\w*)\n(.*?)^```", text, flags=re.MULTILINE | re.DOTALL)


def prose(text: str) -> str:
    return re.sub(r"^```\w*\n.*?^```", "", text, flags=re.MULTILINE | re.DOTALL)


def shell_commands(body: str) -> list[list[str]]:
    """Each simple command of a shell block as words: continuation lines joined, comments
    dropped, split at `&&`, pipes, redirections and `&`."""
    commands = []
    for line in body.replace("\\\n", " ").splitlines():
        lexer = shlex.shlex(line, posix=True, punctuation_chars="&|;<>")
        lexer.whitespace_split, lexer.commenters = True, "#"
        words: list[str] = []
        for word in lexer:
            if word in SHELL_BREAKS or set(word) <= set("&|;<>"):
                commands.append(words)
                words = []
            else:
                words.append(word)
        commands.append(words)
    return [c for c in commands if c]


def project_command(words: list[str]) -> tuple[str, list[str]] | None:
    """(script, the words after it) when `words` runs one of the project's commands."""
    while words and (words[0] == "nohup" or re.match(r"^[A-Z_][A-Z0-9_]*=", words[0])):
        words = words[1:]
    if not words:
        return None
    if words[0] in ("python", "python3", sys.executable):
        if words[1:3] == ["-m", "gputracker"]:
            return "-m gputracker", words[3:]
        name = Path(words[1]).name if len(words) > 1 else ""
        return (SCRIPTS[name], words[2:]) if name in SCRIPTS else None
    return (SCRIPTS[words[0]], words[1:]) if words[0] in SCRIPTS else None


@functools.lru_cache(maxsize=None)
def help_flags(script: str, subcommand: str | None = None) -> frozenset[str]:
    argv = [sys.executable, *script.split()] + ([subcommand] if subcommand else []) + ["--help"]
    done = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, f"{' '.join(argv)} failed: {done.stderr[-2000:]}"
    return frozenset(re.findall(r"(?<![\w-])--[A-Za-z][\w-]*", done.stdout))


def readme_command_lines() -> list[tuple[str, list[str]]]:
    found = []
    for language, body in code_blocks(readme()):
        if language not in ("bash", "sh", "shell", ""):
            continue
        for words in shell_commands(body):
            command = project_command(words)
            if command:
                found.append(command)
    return found


def test_readme_runs_each_kind_of_command_it_describes():
    scripts = {script for script, _ in readme_command_lines()}
    assert {"run_esd_experiment.py", "analyze_results.py", "create_model_list.py"} <= scripts


@pytest.mark.parametrize("script, words", readme_command_lines(),
                         ids=lambda value: value if isinstance(value, str) else " ".join(value)[:60])
def test_readme_command_names_only_flags_the_command_has(script, words):
    subcommand = None
    if Path(script).name in WITH_SUBCOMMANDS:
        subcommand = next((w for w in words if not w.startswith("-")), None)
        assert subcommand, f"{script} without a subcommand: {words}"
    known = help_flags(script, subcommand)
    named = {w.partition("=")[0] for w in words if w.startswith("--")}
    unknown = sorted(named - known)
    assert not unknown, f"README runs {script} {' '.join(words)} with flags it does not have: {unknown}"


def all_project_flags() -> frozenset[str]:
    flags = set()
    for script in sorted(set(SCRIPTS.values())):
        flags |= help_flags(script)
    for subcommand in ("create", "from-text", "from-csv", "merge", "template", "from-checkpoints"):
        flags |= help_flags("create_model_list.py", subcommand)
    return frozenset(flags)


def test_readme_prose_names_only_flags_that_exist():
    named = set(re.findall(r"(?<![\w-])--[a-z][\w-]*", prose(readme())))
    unknown = sorted(named - all_project_flags() - FOREIGN_FLAGS)
    assert not unknown, f"README names flags no command has: {unknown}"


def heading_anchors(path: Path) -> set[str]:
    """GitHub's anchors of a Markdown file's headings (outside code blocks)."""
    anchors = set()
    for line in prose(path.read_text(encoding="utf-8")).splitlines():
        found = re.match(r"^#{1,6}\s+(.*?)\s*#*\s*$", line)
        if found:
            anchors.add(re.sub(r"[^\w\- ]", "", found.group(1).lower()).replace(" ", "-"))
    return anchors


def links(path: Path) -> list[tuple[Path, str | None]]:
    """(target file, anchor) of every relative Markdown link to a .md file, or to a heading
    of the same page (`(#anchor)`), in `path`."""
    found = []
    for target, anchor in re.findall(r"\]\(([^)\s#:]*\.md|)(?:#([^)\s]+))?\)", prose(path.read_text(encoding="utf-8"))):
        if target or anchor:
            found.append(((path.parent / target).resolve() if target else path, anchor or None))
    return found


def link_cases() -> list[tuple[Path, Path, str | None]]:
    return [(page, target, anchor) for page in [README, *sorted(DOCS.glob("*.md"))]
            for target, anchor in links(page)]


def test_readme_links_into_docs():
    targets = {target for target, _ in links(README)}
    assert {DOCS / "interface.md", DOCS / "metrics.md", DOCS / "loading.md",
            DOCS / "benchmarks.md"} <= targets


@pytest.mark.parametrize("page, target, anchor", link_cases(),
                         ids=lambda v: v.name if isinstance(v, Path) else str(v))
def test_every_docs_link_reaches_a_file_and_heading(page, target, anchor):
    assert target.is_file(), f"{page.name} links to {target.relative_to(ROOT)}, which does not exist"
    if anchor:
        assert anchor in heading_anchors(target), (
            f"{page.name} links to {target.name}#{anchor}; its headings give "
            f"{sorted(heading_anchors(target))}")


def test_readme_gives_the_setup_and_test_commands_ci_runs():
    text = readme()
    assert "pip install -r requirements.txt && python run_esd_experiment.py\n" in text
    test_command = "python -m pytest -q -n 2 --dist loadfile"
    assert f"pip install -r requirements-test.txt && {test_command}\n" in text
    ci = (ROOT / ".ci" / "run").read_text(encoding="utf-8")
    assert any(line.strip() == test_command for line in ci.splitlines())


def test_cpu_torch_note_comes_before_the_command_that_installs_torch():
    text = readme()
    assert text.index("download.pytorch.org/whl/cpu") < text.index("pip install -r requirements.txt")
