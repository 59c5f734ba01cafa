"""Options in one form: a frozen dataclass whose fields are the options, from which the
command-line flags, the argv handed to another process and the plain record written to
disk are all derived. A new option is one field.

    @dataclass(frozen=True)
    class Things:
        count: int = option(3, "how many (%(default)s)")
        verbose: bool = option(False, "say more")

    add_options(parser, Things)                 # --count N, --verbose / --no_verbose
    things = options_from_args(Things, args)    # the dataclass back from parsed flags
    options_argv(things)                        # ['--count', '3', '--no_verbose']
    options_record(things)                      # {'count': 3, 'verbose': False}

Owns the mechanism only (`option`, `add_options`, `options_from_args`, `options_argv`,
`options_record`, `options_part`); knows no option's meaning. Fields made with plain
`field()` (no help) are no flags: nested settings, a model entry, a log path. Imports no
torch and nothing of the project beyond the flag helpers.
"""
from __future__ import annotations

import dataclasses
from dataclasses import MISSING, fields, is_dataclass
from pathlib import Path
from typing import Any, Callable

from esd.cli_flags import add_bool_flag, add_flag

_KEY = "option"


@dataclasses.dataclass(frozen=True)
class OptionSpec:
    """How one field is a flag: its help text, how the flag's text becomes the value
    (`type`, then `parse` on the parsed value), and how the value is written back."""
    help: str | Callable[[], str]       # a callable: read when the parser is built (a table's rows)
    type: Callable | None = None        # argparse `type=` (default: the default's own type)
    parse: Callable | None = None       # parsed flag value -> field value (e.g. a list -> tuple)
    metavar: str | None = None
    choices: tuple | Callable[[], list] | None = None   # a callable: read when the parser is built
    nargs: str | None = None
    record: Callable | None = None      # field value -> JSON/YAML-able value


def option(default: Any = MISSING, help: str = "", *, default_factory: Any = MISSING,
           **spec) -> Any:
    """A dataclass field that is an option: its one default and its flag's help text.
    `help` is the text users see in --help (`%(default)s` shows the default); `spec` are
    OptionSpec's other fields."""
    metadata = {_KEY: OptionSpec(help=help, **spec)}
    if default_factory is not MISSING:
        return dataclasses.field(default_factory=default_factory, metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


def option_fields(cls, *, exclude: tuple = ()) -> list[dataclasses.Field]:
    """The fields of `cls` that are options, leaving out those of the classes in `exclude`."""
    skipped = {f.name for other in exclude for f in fields(other)}
    return [f for f in fields(cls) if _KEY in f.metadata and f.name not in skipped]


def spec_of(item: dataclasses.Field) -> OptionSpec:
    return item.metadata[_KEY]


def default_of(item: dataclasses.Field) -> Any:
    if item.default is not MISSING:
        return item.default
    if item.default_factory is not MISSING:
        return item.default_factory()
    raise TypeError(f"option {item.name} has no default")


Describe = Callable[[str, str, Any], str]   # (name, help, default) -> the text --help shows


def add_options(parser, cls, *, defaults: Any = None, exclude: tuple = (),
                describe: Describe | None = None) -> None:
    """One flag per option field of `cls` (`--name`; booleans also `--no_name`), in field
    order; `defaults`, an instance of `cls`, replaces the fields' defaults."""
    for item in option_fields(cls, exclude=exclude):
        spec = spec_of(item)
        default = getattr(defaults, item.name) if defaults is not None else default_of(item)
        help_text = spec.help() if callable(spec.help) else spec.help
        text = describe(item.name, help_text, default) if describe else help_text
        choices = spec.choices() if callable(spec.choices) else spec.choices
        if isinstance(default, bool) and spec.type is None:
            add_bool_flag(parser, item.name, default, text)
            continue
        kind = spec.type or (type(default) if isinstance(default, (int, float, str)) else None)
        extra = {key: value for key, value in (("type", kind), ("metavar", spec.metavar),
                                               ("choices", choices), ("nargs", spec.nargs))
                 if value is not None}
        add_flag(parser, item.name, default=default, help=text, **extra)


def options_from_args(cls, args, **others):
    """An instance of `cls` from parsed flags (options missing from `args` keep their
    default); `others` are its fields that are no flags. Construction validates."""
    values = {}
    for item in option_fields(cls):
        if hasattr(args, item.name):
            value = getattr(args, item.name)
            parse = spec_of(item).parse
            values[item.name] = parse(value) if parse is not None else value
    return cls(**values, **others)


def options_part(cls, source):
    """The `cls` part of a larger options object holding all of `cls`'s fields (the worker
    options of the run's configuration)."""
    return cls(**{item.name: getattr(source, item.name) for item in fields(cls)})


def options_argv(obj, *, exclude: tuple = ()) -> list[str]:
    """The flags that give `obj`'s options back through `add_options` (exact: floats by
    repr; booleans as `--x` / `--no_x`; a value starting with `-` attached as `--x=-v`; an
    option left at None is left out, which gives None back only where None is the default)."""
    argv: list[str] = []
    for item in option_fields(type(obj), exclude=exclude):
        value = getattr(obj, item.name)
        if isinstance(value, bool):
            argv.append(f"--{item.name}" if value else f"--no_{item.name}")
        elif value is None:
            if default_of(item) is not None:
                raise ValueError(f"--{item.name}: None cannot be written as a flag")
        elif isinstance(value, (list, tuple)):
            argv += [f"--{item.name}", *map(str, value)]
        else:
            text = repr(value) if isinstance(value, float) else str(value)
            # a value such as `-x` is attached, or argparse would read it as a flag
            argv += [f"--{item.name}={text}"] if text.startswith("-") else [f"--{item.name}", text]
    return argv


def options_record(obj) -> dict:
    """`obj`'s options as plain values for JSON / YAML (paths as text, tuples as lists);
    a nested options object's fields are merged in after the others."""
    record, nested = {}, {}
    for item in fields(obj):
        value = getattr(obj, item.name)
        if is_dataclass(value):
            nested.update(options_record(value))
            continue
        if _KEY not in item.metadata:
            continue
        convert = spec_of(item).record
        record[item.name] = convert(value) if convert is not None else _plain(value)
    return {**record, **nested}


def _plain(value):
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, tuple):
        return list(value)
    return value
