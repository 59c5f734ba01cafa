"""`--disk_budget GB` in the orchestrator: a model starts only when its download fits.

Owns: `BudgetedSupervisor`, the supervisor with an admission rule (`esd.disk_budget.BudgetGate`):
sizes come from each model's tree listing, raised to what its files' resolve answers say,
before anything is downloaded (`esd.disk_budget.download_parts`); a model whose
download is larger than the whole budget fails at once, typed `disk_budget_exceeded` (not
retried), with the sizes; adapter bases are planned in the run's ledger so a base stays
until the last adapter of the run needing it is done; at the end of the run, whatever the
run downloaded and no worker reads is deleted. Retries keep their model's reservation.
A model whose repo or revision the sizing finds missing fails at once, typed as its worker
would fail it, instead of waiting; a damaged ledger stops the run before anything starts
(`LedgerDamaged`). What the run's downloads take is measured on disk, not taken from the
listing. The log says what waiting models wait for.

Must not: download, analyse, or decide retries (the `Supervisor` it extends does that).
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Sequence

from esd.backends.base import Task, TaskResult
from esd.disk_budget import (GB, BaseUnsized, BudgetGate, DownloadLedger, download_parts,
                             exceeded_failure)
from esd.failures import ESDFailure, record_failure
from esd.model_list import ModelEntry
from esd.supervisor import Outcome, Supervisor

log = logging.getLogger("esd_experiment")


class BudgetedSupervisor(Supervisor):
    def __init__(self, backend, output_dir: Path, policy, progress=None, *, budget_gb: float,
                 entries: Sequence[ModelEntry], stream: bool = False,
                 trust_remote_code: bool = False, cache_dir: str | None = None,
                 delta_from_base: bool = False, **kwargs):
        super().__init__(backend, output_dir, policy, progress, **kwargs)
        from esd.loading.hub import hub_cache_dir
        self.cache = hub_cache_dir(cache_dir)
        self.gate = BudgetGate(int(budget_gb * GB))
        self.entries = {e.key: e for e in entries}
        self.stream, self.trust_remote_code = stream, trust_remote_code
        self.delta_from_base = delta_from_base   # a fine-tune's worker downloads its base too
        self.ledger = DownloadLedger(Path(output_dir), self.cache)
        self.ledger.check()       # LedgerDamaged: said before anything starts or is deleted
        self._waiting: list[Task] = []
        self._sizes: dict[str, dict[str, int]] = {}
        self._unsized: dict[str, str] = {}        # model key -> why its size is unknown

    def run(self, tasks: Sequence[Task]) -> Outcome:
        bases: dict[str, list[str]] = {}
        for task in tasks:
            entry = self.entries.get(task.key)
            if entry is not None and entry.base is not None:
                bases.setdefault(entry.base.model_id, []).append(task.key)
        self.ledger.plan_bases(bases)
        self._waiting = list(tasks)
        try:
            return super().run(self._admit())
        finally:
            deleted = self.ledger.sweep()
            if deleted:
                log.info("disk budget: deleted %d revision(s) the run downloaded", len(deleted))

    def on_end(self, result: TaskResult) -> list[Task]:
        follow = list(super().on_end(result))
        if not any(t.key == result.key for t in follow):
            self.gate.give_back(result.key)
        if not self.outcome.interrupted:
            follow += self._admit()
        return follow

    # ------------------------------------------------------------------ admission
    def _parts(self, key: str) -> dict[str, int] | ESDFailure:
        """The model's download by `repo@commit`; its typed failure if the hub says its repo
        or revision does not exist (known now: no need to wait for its turn); an unknown size
        is the whole budget (it runs alone)."""
        if key not in self._sizes:
            entry = self.entries.get(key)
            try:
                self._sizes[key] = {} if entry is None else download_parts(
                    entry, stream=self.stream,
                    trust_remote_code=self.trust_remote_code, cache=self.cache,
                    with_base=self.delta_from_base)
            except Exception as exc:  # noqa: BLE001 - unknown size: the worker says what is wrong
                missing = _missing(exc, entry)
                if missing is not None:
                    return missing
                why = (f"the size of its base {exc.base} is unknown ({type(exc.cause).__name__})"
                       if isinstance(exc, BaseUnsized)
                       else f"its size is unknown ({type(exc).__name__})")
                log.info("disk budget: %s: %s; it will run alone", key, why)
                self._unsized[key] = why
                self._sizes[key] = {f"?{key}": self.gate.budget_bytes}
        return self._sizes[key]

    def _kept(self) -> dict[str, int]:
        return self.ledger.kept()

    def _admit(self) -> list[Task]:
        started: list[Task] = []
        kept = self._kept() if self._waiting else {}
        for task in list(self._waiting):
            parts = self._parts(task.key)
            if isinstance(parts, ESDFailure):
                self._waiting.remove(task)
                self._fail(task, parts)
                continue
            size = sum(parts.values())
            if size > self.gate.budget_bytes and not any(k.startswith("?") for k in parts):
                self._waiting.remove(task)
                self._refuse(task, size, parts)
                continue
            if self.gate.fits(parts, kept):
                self._waiting.remove(task)
                self.gate.take(task.key, parts)
                started.append(task)
                kept = self._kept()
        if self._waiting and started:
            log.info("disk budget: %s", self._waiting_text(kept))
        return started

    def _waiting_text(self, kept: dict[str, int]) -> str:
        """What the waiting models wait for: space (how much each needs beside what the
        running ones take) or, size unknown, to run alone."""
        used = sum(self.gate.used(kept).values())
        free = max(0, self.gate.budget_bytes - used)
        alone = [t.key for t in self._waiting if t.key in self._unsized]
        space = [t.key for t in self._waiting if t.key not in self._unsized]
        said = []
        if space:
            needs = ", ".join(f"{k} {sum(self._sizes[k].values()) / GB:.3f} GB" for k in space[:3])
            more = f" and {len(space) - 3} more" if len(space) > 3 else ""
            said.append(f"{len(space)} model(s) wait for space ({free / GB:.3f} GB of the "
                        f"{self.gate.budget_bytes / GB:g} GB budget free; {needs}{more})")
        for key in alone[:3]:
            said.append(f"{key} waits to run alone: {self._unsized[key]}")
        if len(alone) > 3:
            said.append(f"{len(alone) - 3} more wait to run alone")
        return "; ".join(said)

    def _refuse(self, task: Task, size: int, parts: dict[str, int]) -> None:
        detail = "" if len(parts) < 2 else " (" + ", ".join(
            f"{k.split('@')[0]} {v / GB:.3f} GB" for k, v in parts.items()) + ")"
        self._fail(task, exceeded_failure(task.key, size, self.gate.budget_bytes, detail))

    def _fail(self, task: Task, failure: ESDFailure) -> None:
        """`task` fails before it starts: recorded as a worker's failure would be."""
        record_failure(self.output_dir, task.key, failure)
        self.outcome.failed[task.key] = f"{failure.stage}/{failure.reason}"
        log.warning("FAILED  %s: %s/%s: %s", task.key, failure.stage, failure.reason, failure.message)
        self._progress(False)


def _missing(exc: BaseException, entry: ModelEntry | None) -> ESDFailure | None:
    """The typed failure of a model whose own repo or revision the hub says does not exist
    (as `esd.loading.hub.hub_failure` types it for the worker); None for anything else."""
    from huggingface_hub import errors
    from esd.loading.hub import hub_failure
    if entry is None or not isinstance(exc, (errors.RepositoryNotFoundError,
                                             errors.RevisionNotFoundError)):
        return None
    if isinstance(exc, errors.GatedRepoError):
        return None
    return hub_failure(exc, entry.model_id, entry.revision)
