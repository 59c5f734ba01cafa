"""Entry point kept for a checkout: `from model_loader import resolve_model, iter_layers` is
`esd.loader` (the code lives there; installed, import `esd.loader`). Importing this module
gives that very module."""
import sys

import esd.loader

sys.modules[__name__] = esd.loader
