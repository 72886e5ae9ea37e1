"""The README's Python quick start runs as written and does what its comments say."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from reliability.guards import child_env

README = Path(__file__).resolve().parents[1] / "README.md"


def quick_start() -> str:
    text = README.read_text(encoding="utf-8")
    section = text.split("## Python quick start", 1)[1]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


@pytest.mark.timeout(300)
def test_python_quick_start_runs(tmp_path):
    checks = """
assert not os.path.exists(cache_dir)  # close() removed what nidask made
assert os.path.isfile("dwi.h5") and os.path.isfile("dwi_hmc.nii.gz")
assert all(os.path.isfile("dwi_hmc" + s) for s in (".bval", ".bvec", ".x5"))
assert os.path.isfile("motion.png")
assert est.motion_affines.shape == (len(dwi), 4, 4)
assert errors["translation_mm_median"] < 1.0, errors
print("quick start ok")
"""
    script = quick_start().replace("dwi.close()", "cache_dir = dwi.cache.path\ndwi.close()")
    code = "import os\n" + script + checks
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path, env=child_env(), capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "quick start ok" in result.stdout
