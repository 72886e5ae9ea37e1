"""The field's BIDS tools for the tests: the npm ``bids-validator`` and the BIDS schema.

``.ci/setup_test_tools.sh`` (the first part of the README's test command) installs the
validator; its tests fail without it.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path

CANDIDATES = [
    os.environ.get("NIDASK_BIDS_VALIDATOR"),
    os.path.expanduser("~/.cache/nidask/bids-validator/node_modules/.bin/bids-validator"),
    shutil.which("bids-validator"),
]


def validator() -> str:
    for candidate in filter(None, CANDIDATES):
        if os.access(candidate, os.X_OK):
            return candidate
    raise AssertionError("the npm bids-validator is not installed (.ci/setup_test_tools.sh)")


def validate(root: Path) -> dict[str, list[dict]]:
    """The validator's issues on ``root``: ``{"errors": [...], "warnings": [...]}``."""
    done = subprocess.run(
        [validator(), os.fspath(root), "--json"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.stdout.strip(), done.stderr[-2000:]
    issues = json.loads(done.stdout)["issues"]
    return {kind: issues[kind] for kind in ("errors", "warnings")}


def issue_files(issue: dict) -> list[str]:
    """Dataset-relative paths (no leading slash) an issue names."""
    return [f["file"]["relativePath"].lstrip("/") for f in issue["files"] if f.get("file")]


def describe(issues: list[dict]) -> str:
    return "\n".join(f"{i['key']}: {i['reason'][:120]} {issue_files(i)[:5]}" for i in issues)


def derivative_name_rules() -> list[re.Pattern]:
    """File-name rules of the BIDS schema for raw and derivative files."""
    from bidsschematools import rules, schema

    loaded = schema.load_schema()
    patterns = []
    for group in (loaded.rules.files.raw, loaded.rules.files.deriv):
        for name in group.keys():
            patterns += [
                re.compile(r["regex"])
                for r in rules.regexify_filename_rules(group[name], loaded, level=1)
            ]
    return patterns
