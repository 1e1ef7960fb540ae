"""``python -m diffkit``: the ``diffkit`` command line (the same as the console script)."""

import sys

from diffkit.cli import main

if __name__ == "__main__":
    sys.exit(main())
