"""Command-line flags, the same way in every command of the project.

- Every `--a_b` also answers to `--a-b` (the interface promises it).
- No abbreviations: `--over` is an error, not `--overwrite` (argparse's prefix matching
  silently misread flags: `--base-model B` became `--base_model_relation B`).
- A boolean `--x` has a `--no_x`, so a config file's choice can be switched off.
- The flags of the tools this project grew from (`--gpu-list`, `--max-checks`, …) are
  accepted where the meaning is the same (`SEED_ALIASES`), and refused with what to type
  instead where it is not, or why none is needed (`SEED_REFUSED`); any other unknown flag
  gets "did you mean …". An error message comes last, after a one-line usage.

Owns the parser class and the flag helpers; knows no flag's meaning beyond those tables.
gputracker/ keeps its own parser (being self-contained) and lists its aliases itself.
"""
from __future__ import annotations

import argparse
import difflib
import sys

# a seed's spelling -> our flag's dest, where the meaning is the same
SEED_ALIASES = {
    "gpu-list": "gpus", "device-ids": "gpus",
    "gpu-mem-threshold": "gpu_memory_threshold",
    "max-checks": "max_check",
    "gpus-per-job": "num_gpus_per_job",
    "single-model": "model_id",        # esd_worker: one model
    "base-model": "source_model",      # esd_worker / create_model_list: the adapter's base
}

# a seed's spelling whose meaning differs here -> what to type instead (when the parser
# has no flag the alias could stand for)
SEED_REFUSED = {
    "max-gpus": "GPUs are chosen by index: --gpus 0 1 2 3 (default: all NVML sees)",
    "num-workers": "on CPU use --cpu_workers N; on GPUs one model runs per free GPU of --gpus",
    "single-model": "for one model use esd_worker.py --model_id ID --output_dir DIR, or make a "
                    "list with create_model_list.py create --models ID --output models.csv",
    "base-model": "an adapter's base goes in the model list's source_model column "
                  "(create_model_list.py create --models ADAPTER --source_model BASE)",
    "log-dir": "logs go to OUTPUT_DIR/logs/ (set --output_dir)",
    # the GPU-managed pipeline (kinexp): its modes are two commands here
    "mode": "there are no modes: `--mode esd` is what run_esd_experiment.py does; for "
            "`--mode custom` (a file of commands run on free GPUs) use python -m gputracker COMMANDS.txt",
    "commands": "a file of commands run on free GPUs: python -m gputracker COMMANDS.txt",
    # the batch pipeline: GPUs inside one model's analysis, and its periodic saves
    "max-gpu-workers": "each model's layers are computed on every GPU the model is given: "
                       "--num_gpus_per_job N gives each model N GPUs (--gpus chooses which)",
    "no-parallel-gpu": "no counterpart needed: a model computes on the GPUs it is given, one by "
                       "default (--num_gpus_per_job 1)",
    "checkpoint-freq": "no counterpart needed: each model's CSV is written the moment it is done, "
                       "and running the same command again resumes",
    "device-map": "weights are loaded on CPU and computed on the model's GPU; to run on CPU "
                  "only use --gpus none",
}


class FlagParser(argparse.ArgumentParser):
    """argparse without prefix matching, with the seed refusals and "did you mean"; an error is
    a short usage, then the one line that says what to do (not forty lines of flags)."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)

    def error(self, message):
        self.exit(2, f"{self.short_usage()}\n{self.prog}: error: {message}\n")

    def short_usage(self) -> str:
        """`usage: prog {create,merge} [flags]  (every flag: prog --help)`: the positionals and
        the required flags only."""
        needed = [a for a in self._actions
                  if not a.option_strings or (a.required and a.help is not argparse.SUPPRESS)]
        formatter = self._get_formatter()
        formatter.add_usage(None, needed, [], prefix="")
        shown = " ".join(formatter.format_help().split())
        return f"usage: {shown} [flags]  (every flag: {self.prog} --help)"

    def parse_args(self, args=None, namespace=None):
        args = sys.argv[1:] if args is None else list(args)
        for word in args[:args.index("--")] if "--" in args else args:
            refused = self._refusal(word)
            if refused:
                self.error(refused)
        unknown = self._unknown_flags(args)
        if unknown:   # said before "the following arguments are required", which would hide it
            self.error(unknown_flags_message(unknown, self._all_option_strings()))
        namespace, extras = self.parse_known_args(args, namespace)
        if extras:
            self.error(unknown_flags_message(extras, self._all_option_strings()))
        return namespace

    def _unknown_flags(self, args: list[str]) -> list[str]:
        known = set(self._all_option_strings())
        words = args[:args.index("--")] if "--" in args else args
        return [w for w in words if w.startswith("--") and w.partition("=")[0] not in known
                and not self._refusal(w)]

    def _refusal(self, word: str) -> str | None:
        if not word.startswith("--"):
            return None
        flag = word.partition("=")[0]
        key = flag[2:].replace("_", "-")
        if key in SEED_REFUSED and flag not in self._all_option_strings():
            return f"{flag} is not a flag of this command: {SEED_REFUSED[key]}"
        return None

    def _all_option_strings(self) -> list[str]:
        found, parsers = [], [self]
        while parsers:
            parser = parsers.pop()
            for action in parser._actions:
                found += action.option_strings
                if isinstance(action, argparse._SubParsersAction):
                    parsers += list(action.choices.values())
        return found


def unknown_flags_message(extras: list[str], known: list[str]) -> str:
    """`unrecognized argument: --over (did you mean --overwrite?)`, for each unknown flag."""
    canonical = list(dict.fromkeys("--" + k[2:].replace("-", "_") for k in known if k.startswith("--")))
    flags = [w for w in extras if w.startswith("--")]
    parts = []
    for word in flags or extras:
        flag = word.partition("=")[0]
        if not flag.startswith("--"):
            parts.append(word)
            continue
        typed = "--" + flag[2:].replace("-", "_")
        close = [k for k in canonical if k.startswith(typed)] or \
            difflib.get_close_matches(typed, canonical, n=3, cutoff=0.6)
        parts.append(f"{flag} (did you mean {' or '.join(close[:3])}?)" if close else flag)
    noun = "argument" if len(parts) == 1 else "arguments"
    return f"unrecognized {noun}: {', '.join(parts)}"


def _spellings(name: str) -> list[str]:
    return [f"--{name}"] + ([f"--{name.replace('_', '-')}"] if "_" in name else [])


def add_flag(parser, name: str, **kwargs) -> None:
    """Add `--a_b` with its hyphenated twin `--a-b`, and a seed's spelling of the same flag
    (SEED_ALIASES) kept out of --help; `name` may be given with or without `--`."""
    name = name.lstrip("-")
    dest = kwargs.pop("dest", name)
    parser.add_argument(*_spellings(name), dest=dest, **kwargs)
    seeds = [f"--{seed}" for seed, target in SEED_ALIASES.items() if target == name]
    if seeds:
        hidden = {k: v for k, v in kwargs.items() if k != "required"}
        parser.add_argument(*seeds, **{**hidden, "dest": dest, "help": argparse.SUPPRESS,
                                       "default": argparse.SUPPRESS})


def add_bool_flag(parser, name: str, default: bool, help: str) -> None:
    """`--name` / `--no_name` (and hyphenated twins), both in --help."""
    parser.add_argument(*_spellings(name), dest=name, action="store_true", default=default, help=help)
    parser.add_argument(*_spellings(f"no_{name}"), dest=name, action="store_false",
                        help=f"switch --{name} off (e.g. one set in a config file)")
