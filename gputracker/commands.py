"""Command lines to argument lists, without a shell.

A line is split with ``shlex.split`` (POSIX quoting rules). Leading ``NAME=value`` words are
taken as environment assignments for that job (like ``env NAME=value cmd``). Nothing else of
shell syntax is interpreted: ``|``, ``&&``, ``;``, ``>`` or ``$VAR`` reach the program as
plain arguments, so a line using them gets a warning.
"""
from __future__ import annotations

import logging
import re
import shlex
from pathlib import Path

_ASSIGNMENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*=")
_SHELL_WORDS = {"|", "||", "&&", "&", ";", ">", ">>", "<", "2>", "2>&1", "&>", "|&"}


def parse_command(line: str, logger: logging.Logger | None = None) -> tuple[list[str], dict[str, str]]:
    """``(argv, env)`` of one command line; raises ValueError on an empty or unbalanced line."""
    try:
        words = shlex.split(line, comments=False)
    except ValueError as exc:
        raise ValueError(f"cannot split command {line!r}: {exc}") from None
    env: dict[str, str] = {}
    while words and _ASSIGNMENT.match(words[0]):
        name, _, value = words.pop(0).partition("=")
        env[name] = value
    if not words:
        raise ValueError(f"command {line!r} has no program to run")
    shell_words = [w for w in words if w in _SHELL_WORDS or w.startswith(("2>", ">", "$"))]
    if shell_words:
        (logger or logging.getLogger("gputracker")).warning(
            "gputracker: %r contains shell syntax %s that is NOT interpreted (no shell is used); "
            "wrap it in a script or `bash -c '...'` if you need it", line, shell_words)
    return words, env


def read_commands_file(path: str | Path) -> list[tuple[int, str]]:
    """``(line_number, line)`` of each command: blank lines and ``#`` comment lines skipped."""
    commands = []
    for number, raw in enumerate(Path(path).read_text().splitlines(), start=1):
        line = raw.strip()
        if line and not line.startswith("#"):
            commands.append((number, line))
    return commands
