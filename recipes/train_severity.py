"""The old name of ``recipes/train_detect.py`` (kept for one release): it says so, then runs it.

    python recipes/train_severity.py --config recipes/configs/tiny.yaml   # == recipes/train_detect.py
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

_spec = importlib.util.spec_from_file_location("train_detect", Path(__file__).with_name("train_detect.py"))
_detect = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_detect)
main = _detect.main

if __name__ == "__main__":
    print("recipes/train_severity.py is now recipes/train_detect.py (the detect stage's trainer); the old name "
          "goes in the next release", file=sys.stderr)
    code = _detect.run_recipe(main)
    _detect.PartialState().destroy_process_group()
    sys.exit(code)
