"""The commands of the project, one module each, each with a `main(argv=None) -> int`:
`run.py` (`esd-run`, the orchestrator), `worker.py` (`esd-worker`, one model in one
process), `analyze.py` (`esd-analyze`), `models.py` (`esd-models`, model lists) and
`doctor.py` (`esd-doctor`, the setup doctor). The top-level scripts of a checkout
(`run_esd_experiment.py`, `esd_worker.py`, `analyze_results.py`, `create_model_list.py`,
`test_setup.py`) are thin entry points onto these modules; the console commands of the
installed package call the same `main`. Nothing here computes a metric or loads a model at
import: only the worker imports torch, when it runs.
"""
