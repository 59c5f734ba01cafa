"""Names shared by the loader, the maths and the analysis, defined once.

Importing this module is cheap (no torch, no pandas), so any room can use it.
"""

# The layer types the loader hands out and the maths accepts, in this order in plots/tables.
LAYER_TYPES = ("linear", "conv1d", "conv2d", "embedding")
