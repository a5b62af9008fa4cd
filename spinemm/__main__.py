"""``python -m spinemm ...``: the same command line as ``spinemm ...``."""

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
