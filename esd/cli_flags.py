"""Command-line flags in both spellings: every `--a_b` also answers to `--a-b` (the interface
promises it), and a boolean `--x` has a `--no_x` so a config file's choice can be switched off.
Used by every command of the project (gputracker/ keeps its own, being self-contained)."""
from __future__ import annotations

import argparse


def _spellings(name: str) -> list[str]:
    return [f"--{name}"] + ([f"--{name.replace('_', '-')}"] if "_" in name else [])


def add_flag(parser, name: str, **kwargs) -> None:
    """Add `--a_b` with its hyphenated twin `--a-b`; `name` may be given with or without `--`."""
    name = name.lstrip("-")
    parser.add_argument(*_spellings(name), dest=kwargs.pop("dest", name), **kwargs)


def add_bool_flag(parser, name: str, default: bool, help: str) -> None:
    """`--name` / `--no_name` (and hyphenated twins)."""
    parser.add_argument(*_spellings(name), dest=name, action="store_true", default=default, help=help)
    parser.add_argument(*_spellings(f"no_{name}"), dest=name, action="store_false", help=argparse.SUPPRESS)
