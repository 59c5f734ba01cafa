"""The settings of a run in their one form, as frozen dataclasses: the ESD parameters
(`ESDSettings`, shared by every layer of every model of a run) and the options each worker
gets from the orchestrator (`WorkerOptions`). Their flags, the worker's argv and the run's
records are derived from the fields (`esd/options.py`), so a new setting is one field here.

Owns: `ESDSettings`, `FIX_FINGERS_METHODS`, `normalize_fix_fingers`, `add_esd_arguments`,
`esd_settings_from_args`, `esd_argv`, `WorkerOptions`. Must not import torch (the
orchestrator, the analysis and the list tools read these without it) nor compute anything:
`net_esd.py` does the maths and re-exports `ESDSettings` for its users.
"""
from __future__ import annotations

import argparse
import math
from dataclasses import asdict, dataclass, fields

from esd.units import gigabytes
from esd.options import add_options, option, options_argv, options_from_args

FIX_FINGERS_METHODS = ("xmin_mid", "xmin_peak", "DKS", "clip_xmax")
_FIX_FINGERS_ALIASES = {"none": "DKS", "dks": "DKS"}


def normalize_fix_fingers(method) -> str:
    """Canonical fix_fingers name; None/'none'/'None' mean DKS. Unknown names raise ValueError."""
    if method is None:
        return "DKS"
    name = str(method)
    if name in FIX_FINGERS_METHODS:
        return name
    if name.lower() in _FIX_FINGERS_ALIASES:
        return _FIX_FINGERS_ALIASES[name.lower()]
    raise ValueError(
        f"unknown fix_fingers {method!r}; valid: {', '.join(FIX_FINGERS_METHODS)} (or none = DKS)")


@dataclass(frozen=True)
class ESDSettings:
    """The ESD parameters of one run, in their one form: every layer of every model of the run
    is computed with them, and results computed with other settings are not comparable.

    The command-line flags (`--<field>`, booleans also `--no_<field>`), the worker's argv and
    the run's `esd_settings.json` are all derived from these fields (`add_esd_arguments`,
    `esd_argv`, `esd_record`; the mechanism is `esd/options.py`), so a new parameter is one
    field here. Construction validates: a bad value raises ValueError naming the flag; `fix_fingers` is canonical
    (`none`/`None` become `DKS`)."""
    fix_fingers: str = option("xmin_mid", "how xmin is chosen: " + ", ".join(FIX_FINGERS_METHODS)
                              + " (none = DKS). Note: xmin_mid gives alpha 2-3.5 even on random Gaussian"
                              " matrices (DKS: 6-20), so its values cannot be read against the usual"
                              " 2-6 range; compare models with each other (docs/metrics.md)")
    evals_thresh: float = option(1e-5, "eigenvalues at or below this are left out of the fit")
    bins: int = option(100, "histogram bins for xmin_peak")
    xmin_pos: int = option(2, "xmin_mid takes the eigenvalue at index n / xmin_pos")
    conv_norm: float = option(0.5, "conv slices are scaled by sqrt(conv_norm)")
    filter_zeros: bool = option(True, "fit only eigenvalues above --evals_thresh (off: every eigenvalue > 0)")
    min_evals: int = option(10, "layers with fewer eigenvalues (after filtering) are not fitted")
    randomize: bool = option(False, "also the ESD of the element-shuffled W: max_rand_eval, ww_softrank,"
                             " rand_distance, rand_num_spikes (one more eigensolve per layer)")
    randomize_seed: int = option(0, "seed of --randomize's shuffles (each layer's shuffle is drawn from"
                                 " this seed and the layer's name)")
    mp_fit: bool = option(False, "also the Marchenko-Pastur fit of the bulk: num_spikes, sigma_mp,"
                          " mp_softrank, bulk_min, bulk_max")
    # Which matrices besides the weights (rows named `<layer>.delta_from_base` /
    # `<layer>.adapter_update`, esd.schema.LAYER_MODES); the maths here ignores them, the
    # worker chooses the layers. Settings, so results with and without them never mix.
    delta_from_base: bool = option(False, "also analyse W_ft - W_base of each fine-tune whose base is its "
                                   "source_model (rows <layer>.delta_from_base)")
    adapter_update: bool = option(False, "also analyse each LoRA adapter's scaled update (alpha/r)*B*A "
                                  "alone (rows <layer>.adapter_update)")

    def __post_init__(self):
        for item in fields(self):  # numbers may arrive as text (a config file) or ints for floats
            value = getattr(self, item.name)
            kind = type(item.default)
            if kind is bool:
                if not isinstance(value, bool):
                    raise ValueError(f"--{item.name} must be true or false, got {value!r}")
            elif kind in (int, float) and not isinstance(value, bool):
                try:
                    number = kind(value)
                except (TypeError, ValueError):
                    raise ValueError(f"--{item.name} must be a {'whole ' if kind is int else ''}number, "
                                     f"got {value!r}") from None
                if kind is int and number != float(value):
                    raise ValueError(f"--{item.name} must be a whole number, got {value!r}")
                object.__setattr__(self, item.name, number)
        try:
            object.__setattr__(self, "fix_fingers", normalize_fix_fingers(self.fix_fingers))
        except ValueError:
            raise ValueError(f"--fix_fingers {self.fix_fingers!r} is not one of "
                             f"{list(FIX_FINGERS_METHODS)} (none = DKS)") from None
        self.validate()

    def validate(self) -> None:
        """Raise ValueError naming the flag of the first bad value (construction calls it)."""
        if not 0 <= self.evals_thresh < math.inf:
            raise ValueError(f"--evals_thresh must be a finite number >= 0, got {self.evals_thresh}")
        if self.bins < 2:
            raise ValueError(f"--bins must be >= 2, got {self.bins}")
        if self.xmin_pos < 1:
            raise ValueError(f"--xmin_pos must be >= 1, got {self.xmin_pos}")
        if not 0 < self.conv_norm < math.inf:
            raise ValueError(f"--conv_norm must be a finite number > 0, got {self.conv_norm}")
        if self.min_evals < 2:
            raise ValueError(f"--min_evals must be >= 2 (a fit needs two eigenvalues), got {self.min_evals}")
        if self.randomize_seed < 0:
            raise ValueError(f"--randomize_seed must be >= 0, got {self.randomize_seed}")


def _describe_esd(name: str, help: str, default) -> str:
    """An ESD flag's --help line: its help, its default (and for a switch, how to turn it off)."""
    if isinstance(default, bool):
        return f"{help} (default {'on' if default else 'off'}; --no_{name})"
    return f"{help} (default %(default)s)"


def add_esd_arguments(parser: argparse.ArgumentParser, defaults: ESDSettings = ESDSettings()) -> None:
    """One flag per ESDSettings field (`--name`, booleans also `--no_name`), help from the field."""
    add_options(parser.add_argument_group("ESD parameters"), ESDSettings, defaults=defaults,
                describe=_describe_esd)


def esd_settings_from_args(args) -> ESDSettings:
    """The ESDSettings of parsed flags; ValueError names the bad flag."""
    return options_from_args(ESDSettings, args)


def esd_argv(esd: ESDSettings) -> list[str]:
    """The flags that give `esd` back through add_esd_arguments (exact: floats by repr)."""
    return options_argv(esd)


def esd_record(esd: ESDSettings) -> dict:
    """`esd_settings.json`'s form of the settings."""
    return asdict(esd)


@dataclass(frozen=True)
class WorkerOptions:
    """What every worker of a run does besides the maths, chosen once for the run: the
    orchestrator's flags of these names reach each worker through its argv
    (`esd_worker.worker_argv`) and are in the run's records."""
    overwrite: bool = option(False, "recompute models that already have results")
    save_eigs: bool = option(False, "also keep each layer's eigenvalues (eigs/<model>.npz)")
    trust_remote_code: bool = option(False, "allow models' own code (off unless asked)")
    disk_budget: float | None = option(
        None, "bounded disk: delete what the run downloads once analysed, start a model only "
                                       "when its download fits beside the running ones (off: the cache keeps everything)",
        type=gigabytes, metavar="GB")   # GB = 10^9 bytes (esd/units.py)
    stream: bool = option(False, "read hub safetensors weights by HTTP ranges while analysing; "
                          "nothing of them is written to disk")
