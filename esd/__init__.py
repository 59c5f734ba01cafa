"""The ESD Experiment Framework, as one package.

`esd.cli` holds the commands (`esd-run`: `esd/cli/run.py`, `esd-worker`: `esd/cli/worker.py`),
`esd.api` the notebook API, `esd.loader` where weights come from (its concerns in
`esd/loading/`), `esd.settings` the run's settings; the maths is the top-level `net_esd.py`.
A checkout keeps the top-level scripts a user runs (`run_esd_experiment.py`, `esd_worker.py`,
`analyze_results.py`, `create_model_list.py`, `test_setup.py`) as entry points; everything
they share lives here, importable as `esd.<module>`.
"""
