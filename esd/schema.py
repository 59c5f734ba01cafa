"""Names shared by the loader, the maths and the analysis, defined once.

Importing this module is cheap (no torch, no pandas), so any room can use it.
"""

# The layer types the loader hands out and the maths accepts, in this order in plots/tables.
LAYER_TYPES = ("linear", "conv1d", "conv2d", "embedding")

# What `model_loader.iter_layers` hands out, and the suffix its layers carry in the CSV's
# `longname`: the weights themselves; a fine-tune's difference from its base (W_ft − W_base,
# base = source_model); an adapter's LoRA update alone ((α/r)·B·A).
LAYER_MODES = {"weights": "", "delta_from_base": ".delta_from_base",
               "adapter_update": ".adapter_update"}


def layer_mode_of(longname: str) -> str:
    """The LAYER_MODES mode of a CSV row, read from its longname's suffix ("weights" if none)."""
    name = str(longname)
    for mode, suffix in LAYER_MODES.items():
        if suffix and name.endswith(suffix):
            return mode
    return "weights"
