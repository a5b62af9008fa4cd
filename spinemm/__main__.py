"""``python -m spinemm ...``: the same command line as ``spinemm ...``."""

import sys

from .cli import main

sys.exit(main())
