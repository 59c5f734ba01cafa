"""Entry point kept for a checkout: `python esd_worker.py …` and `import esd_worker`
are the command `esd.cli.worker`, where the code lives. Importing this module gives that very
module, so its names, and anything a test patches on it, are one."""
import sys

from esd.cli.worker import main

if __name__ == "__main__":
    sys.exit(main())
else:
    sys.modules[__name__] = sys.modules["esd.cli.worker"]
