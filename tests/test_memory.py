"""Opening a ~1 GB series and reading one volume stays far below the series size in RAM."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import nidask
from nidask.validation.phantom import write_series

SHAPE = (128, 128, 64, 500)  # 1.05 GB of int16
#: where the nidask under test was imported from (src/ or site-packages)
PACKAGE_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(nidask.__file__)))

CHILD = r"""
import json, sys
import dask, nibabel, numpy as np
import nidask

def peak_bytes():
    # VmHWM, not ru_maxrss: a child's ru_maxrss starts at its parent's peak
    with open("/proc/self/status") as f:
        fields = dict(line.split(":", 1) for line in f)
    return int(fields["VmHWM"].split()[0]) * 1024

baseline = peak_bytes()
ds = nidask.load(sys.argv[1])
opened = peak_bytes()
volume = ds[250][0].compute()
first = ds[0][0].compute()
print(json.dumps({
    "baseline": baseline, "opened": opened, "peak": peak_bytes(),
    "shape": list(volume.shape), "dtype": str(volume.dtype),
    "offset": np.unique(volume.astype(np.int64) - first).tolist(),
}))
"""


def test_one_volume_of_a_1gb_series_stays_small(tmp_path):
    path = write_series(tmp_path / "big.nii", SHAPE, "int16")
    series_bytes = math.prod(SHAPE) * 2
    assert os.path.getsize(path) >= series_bytes > 1e9
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(
        [PACKAGE_ROOT] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else [])
    )
    try:
        result = subprocess.run(
            [sys.executable, "-c", CHILD, str(path)],
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
            check=False,
        )
    finally:
        os.unlink(path)  # do not leave 1 GB in pytest's kept temp directories
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout.strip().splitlines()[-1])
    # the right volume: write_series makes volume k equal volume 0 plus k
    assert report["shape"] == list(SHAPE[:3]) and report["dtype"] == "int16"
    assert report["offset"] == [250]
    growth = report["peak"] - report["baseline"]
    assert report["opened"] - report["baseline"] < 0.02 * series_bytes, report
    assert growth < 0.25 * series_bytes, (growth, report)
