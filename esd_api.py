"""Entry point kept for a checkout: `from esd_api import analyze_model` is `esd.api` (the
code lives there; installed, import `esd.api`). Importing this module gives that very module."""
import sys

import esd.api

sys.modules[__name__] = esd.api
