"""Entry point kept for a checkout: `python test_setup.py …` and `import test_setup`
are the command `esd.cli.doctor`, where the code lives. Importing this module gives that very
module, so its names, and anything a test patches on it, are one."""
import sys

from esd.cli.doctor import main

if __name__ == "__main__":
    sys.exit(main())
else:
    sys.modules[__name__] = sys.modules["esd.cli.doctor"]
