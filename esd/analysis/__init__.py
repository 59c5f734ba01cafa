"""After the run: the per-model CSVs of a results directory turned into answers.

One module per job, so each is found by name (`analyze_results.py` is their command line):

    results.py   which files are results (only the run's own `<safe_id>.csv`; others are
                 listed as ignored; only regular files are opened), the per-layer table,
                 layer selection
    summary.py   summary.csv (always every weight layer), summary_filtered.csv (selected
                 layers), summary_<mode>.csv (rows of --delta_from_base / --adapter_update)
    queries.py   filter / sort / show / hide / limit, the extremes of --verbose
    plots.py     the PNG figures under plots/
    adapters.py  adapter (or fine-tune) minus its base, layer by layer
    steps.py     metrics over training steps (over_steps.csv)
    listed.py    the model list's rows kept by each run: extra columns, relations
    relations.py per base, its children beside it and their Δalpha per layer (--by_relation)
    report.py    report.html, which also says how the results were made

Nothing here loads a model or computes a spectral metric: it reads what the workers wrote.
"""
