"""Entry point kept for a checkout: `python analyze_results.py …` and `import analyze_results`
are the command `esd.cli.analyze`, where the code lives. Importing this module gives that very
module, so its names, and anything a test patches on it, are one."""
import sys

from esd.cli.analyze import main

if __name__ == "__main__":
    sys.exit(main())
else:
    sys.modules[__name__] = sys.modules["esd.cli.analyze"]
