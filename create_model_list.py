"""Entry point kept for a checkout: `python create_model_list.py …` and `import create_model_list`
are the command `esd.cli.models`, where the code lives. Importing this module gives that very
module, so its names, and anything a test patches on it, are one."""
import sys

from esd.cli.models import main

if __name__ == "__main__":
    sys.exit(main())
else:
    sys.modules[__name__] = sys.modules["esd.cli.models"]
