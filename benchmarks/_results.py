"""Saving a suite's results as JSON and printing its tables (shared by the suites)."""

from __future__ import annotations

import json
from pathlib import Path


def print_saved(path, table) -> int:
    """Print ``table(results)`` of the results saved at ``path``."""
    print(table(json.loads(Path(path).read_text())))
    return 0


def save_and_print(results, out, table) -> int:
    """Save ``results`` at ``out`` (JSON, folders made) and print ``table(results)``."""
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    Path(out).write_text(json.dumps(results, indent=1))
    print(table(results))
    return 0
