"""Support modules of the ESD Experiment Framework.

The top level of the repository holds the entry points a user runs (`run_esd_experiment.py`,
`esd_worker.py`, `analyze_results.py`, `create_model_list.py`, `test_setup.py`) and the two
rooms the design is built around (`model_loader.py`: where weights come from; `net_esd.py`:
the maths). Everything those entry points share lives here, importable as `esd.<module>`;
nothing in this package is run directly.
"""
