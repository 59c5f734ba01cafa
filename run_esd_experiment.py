"""Entry point kept for a checkout: `python run_esd_experiment.py …` and `import run_esd_experiment`
are the command `esd.cli.run`, where the code lives. Importing this module gives that very
module, so its names, and anything a test patches on it, are one."""
import sys

from esd.cli.run import main

if __name__ == "__main__":
    sys.exit(main())
else:
    sys.modules[__name__] = sys.modules["esd.cli.run"]
