"""`--disk_budget GB` in the orchestrator: a model starts only when its download fits.

Owns: `BudgetedSupervisor`, the supervisor with an admission rule (`esd.disk_budget.BudgetGate`):
sizes come from each model's tree listing before anything is downloaded; a model whose
download is larger than the whole budget fails at once, typed `disk_budget_exceeded` (not
retried), with the sizes; adapter bases are planned in the run's ledger so a base stays
until the last adapter of the run needing it is done; at the end of the run, whatever the
run downloaded and no worker reads is deleted. Retries keep their model's reservation.

Must not: download, analyse, or decide retries (the `Supervisor` it extends does that).
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Sequence

from esd.backends.base import Task, TaskResult
from esd.disk_budget import GB, BudgetGate, DownloadLedger, download_parts, exceeded_failure
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
        self._waiting: list[Task] = []
        self._sizes: dict[str, dict[str, int]] = {}

    def run(self, tasks: Sequence[Task]) -> Outcome:
        bases: dict[str, list[str]] = {}
        for task in tasks:
            entry = self.entries.get(task.key)
            if entry is not None and entry.source_model:
                bases.setdefault(entry.source_model.split("@")[0], []).append(task.key)
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
    def _parts(self, key: str) -> dict[str, int]:
        if key not in self._sizes:
            entry = self.entries.get(key)
            try:
                self._sizes[key] = {} if entry is None else download_parts(
                    entry.model_id, entry.revision, entry.source_model, stream=self.stream,
                    trust_remote_code=self.trust_remote_code, cache=self.cache,
                    with_base=self.delta_from_base)
            except Exception as exc:  # noqa: BLE001 - unknown size: the worker says what is wrong
                log.info("disk budget: size of %s unknown (%s); starting it alone", key,
                         type(exc).__name__)
                self._sizes[key] = {f"?{key}": self.gate.budget_bytes}
        return self._sizes[key]

    def _kept(self) -> dict[str, int]:
        return {k: e["bytes"] for k, e in self.ledger.entries().items()
                if e["ours"] and e["state"] != "deleted"}

    def _admit(self) -> list[Task]:
        started: list[Task] = []
        kept = self._kept() if self._waiting else {}
        for task in list(self._waiting):
            parts = self._parts(task.key)
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
            log.info("disk budget: %d model(s) wait for space", len(self._waiting))
        return started

    def _refuse(self, task: Task, size: int, parts: dict[str, int]) -> None:
        detail = "" if len(parts) < 2 else " (" + ", ".join(
            f"{k.split('@')[0]} {v / GB:.3f} GB" for k, v in parts.items()) + ")"
        failure: ESDFailure = exceeded_failure(task.key, size, self.gate.budget_bytes, detail)
        record_failure(self.output_dir, task.key, failure)
        self.outcome.failed[task.key] = f"{failure.stage}/{failure.reason}"
        log.warning("FAILED  %s: %s/%s: %s", task.key, failure.stage, failure.reason, failure.message)
        self._progress(False)
