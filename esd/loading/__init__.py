"""Where weights come from, by concern (the entry point is `esd/loader.py`, in a checkout
also importable as `model_loader`).

- `resolved.py`   — `ResolvedModel` (an id resolved to files) and the file names we look for.
- `hub_http.py`   — requests to the Hub (timeouts, huggingface_hub's backoff, pagination
                    followed on the Hub only) and the one mapping of hub / network errors
                    to typed failures.
- `hub.py`        — hub ids and revisions, the huggingface_hub cache, listings, downloads,
                    offline snapshots, the worker's hub session (the disk ledger passed in).
- `formats.py`    — the weight-format registry: which files hold the weights (one preference
                    rule for directories and hub listings) and `open_weights`, which picks
                    the tensor source of a format. A new format is one row there.
- `checkpoint.py` — weight files on disk: the tensor-source interface that reads them one
                    tensor at a time as float32 CPU copies, and the safetensors header check.
- `layers.py`     — which tensors are layers: the meta-device skeleton from config.json, key
                    matching, tied weights, the name/shape rule; walking an nn.Module.
- `stream.py`     — a `TensorSource` reading hub safetensors by HTTP range requests.
- `lora.py`       — adapters: resolving the base, LoRA scaling and patterns, the streaming
                    merge, peft's own merge for the adapter types streaming does not cover,
                    and an adapter's update alone (`iter_adapter_updates`).
- `deltas.py`     — a fine-tune as its difference from its base (`iter_delta_layers`).
- `log.py`        — the one `model_loader` logger, and routing it to a caller's `warn=`.

Nothing here computes a metric (that is `net_esd.py`) or writes result files. Importing the
package is cheap: no submodule is imported here.
"""
