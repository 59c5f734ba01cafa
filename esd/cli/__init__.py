"""The commands of the project, one module each, each with a `main(argv=None) -> int`:
`run.py` (`esd-run`, the orchestrator), `worker.py` (`esd-worker`, one model in one
process). The top-level scripts of a checkout (`run_esd_experiment.py`, `esd_worker.py`)
are thin entry points onto these modules; the console commands of the installed package
call the same `main`. Nothing here computes a metric or loads a model at import.
"""
