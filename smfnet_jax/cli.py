"""What the command-line tools share that is not about images or models."""
from __future__ import annotations

import os
import sys


def program_name(module: str) -> str:
    """The name to show in a CLI's usage line: the console script when one was invoked
    (`smfnet-fuse`), else the `python -m MODULE` form that works from a checkout.

    `sys.argv[0]` is the script's path for a console script, but the module's file
    (`.../infer/main.py`) under `python -m`, whose basename would read wrong.
    """
    name = os.path.basename(sys.argv[0]) if sys.argv and sys.argv[0] else ""
    name = name[:-4] if name.lower().endswith(".exe") else name  # Windows launchers
    return name if name.startswith("smfnet-") else f"python -m {module}"
