"""Sinks stream: peak memory of materialize/to_filename/to_nifti (resampled too) follows
the chunk budget.

Each sink runs in a child process on a ~600 MB int16 series with a 32 MiB chunk
budget; the child reports its peak RSS (``VmHWM``, which also counts mapped file
pages) above its resident size after the imports.
"""

from __future__ import annotations

import gzip
import json
import math
import os
import subprocess
import sys

import h5py
import nibabel as nb
import numpy as np
import pytest

import nidask
from nidask.validation.phantom import write_series

SHAPE = (128, 128, 64, 288)  # 2 MiB per volume, 604 MB of int16
VOLUME_BYTES = math.prod(SHAPE[:3]) * 2
SERIES_BYTES = math.prod(SHAPE) * 2
CHUNK = 32 * 2**20
#: generous: a block read, its copy on the way to disk and a block per thread
LIMIT = 8 * CHUNK
#: where the nidask under test was imported from (src/ or site-packages)
PACKAGE_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(nidask.__file__)))

CHILD = r"""
import json, os, sys
import dask, h5py, nibabel, numpy as np
import nidask

def peak_bytes():
    # VmHWM, not ru_maxrss: a child's ru_maxrss starts at its parent's peak (the
    # pytest process, whatever the earlier tests made it hold)
    with open("/proc/self/status") as f:
        fields = dict(line.split(":", 1) for line in f)
    return int(fields["VmHWM"].split()[0]) * 1024

def current_bytes():
    with open("/proc/self/status") as f:
        fields = dict(line.split(":", 1) for line in f)
    return int(fields["VmRSS"].split()[0]) * 1024

sink, source, output, caches = sys.argv[1:5]
# what the interpreter holds after the imports (their own transient peak is not
# subtracted: the growth measured is an upper bound)
baseline = current_bytes()
with dask.config.set({"nidask.chunk-size": "32MiB", "nidask.cache-dir": caches}):
    ds = nidask.load(source)
    blocks = ds.dataobj.numblocks[3]
    if sink == "materialize":
        ds.materialize(path=output)
        m = ds.materialize()  # into the owned cache (same peak measured for both)
        os.link(m.memmap_path, output + ".cached")  # keep the bytes for the parent
    elif sink == "to_filename":
        ds.to_filename(output)
    elif sink == "resampled":  # identity matrices: every volume interpolated, values kept
        for i in range(len(ds)):
            ds.set_transform(i, np.eye(4))
        ds.to_nifti(output, order=1)
    else:
        ds.to_nifti(output)
    peak = peak_bytes()
    ds.close()
print(json.dumps({"baseline": baseline, "peak": peak, "blocks": blocks}))
"""


@pytest.fixture(scope="module")
def big_series(tmp_path_factory):
    directory = tmp_path_factory.mktemp("memory_sinks")
    path = write_series(directory / "big.nii", SHAPE, "int16")
    yield path
    os.unlink(path)  # do not leave 600 MB in pytest's kept temp directories


def _volume(path, sink: str, k: int) -> np.ndarray:
    if sink == "materialize":
        return np.array(np.load(path, mmap_mode="r")[..., k])
    if sink == "to_filename":
        with h5py.File(path, "r") as f:
            return f["0/dataobj"][..., k]
    if sink in ("nii", "resampled"):
        return np.asanyarray(nb.load(path).dataobj[..., k])
    with gzip.open(path, "rb") as f:  # early volumes only: gzip seeks by decompressing
        f.seek(352 + k * VOLUME_BYTES)
        raw = f.read(VOLUME_BYTES)
    return np.frombuffer(raw, dtype=np.int16).reshape(SHAPE[:3], order="F")


@pytest.mark.parametrize(
    ("sink", "name"),
    [
        ("materialize", "out.npy"),
        ("to_filename", "out.h5"),
        ("nii", "out.nii"),
        ("nii.gz", "out.nii.gz"),
        ("resampled", "resampled.nii"),
    ],
)
def test_sink_peak_memory_follows_chunk_budget(sink, name, big_series, tmp_path):
    output = tmp_path / name
    caches = tmp_path / "caches"
    caches.mkdir()
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(
        [PACKAGE_ROOT] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else [])
    )
    try:
        result = subprocess.run(
            [sys.executable, "-c", CHILD, sink, big_series, os.fspath(output), caches],
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
            check=False,
        )
        assert result.returncode == 0, result.stderr
        report = json.loads(result.stdout.strip().splitlines()[-1])
        assert report["blocks"] == math.ceil(SHAPE[3] / (CHUNK // VOLUME_BYTES))
        # the output holds the series (write_series: volume k is volume 0 plus k)
        outputs = [output] + ([tmp_path / f"{name}.cached"] if sink == "materialize" else [])
        for path in outputs:
            first = _volume(path, sink, 0).astype(np.int64)
            for k in (1, 17, 40 if sink == "nii.gz" else SHAPE[3] - 1):
                assert np.array_equal(_volume(path, sink, k) - first, np.full(SHAPE[:3], k))
            if sink != "nii.gz":
                assert os.path.getsize(path) >= SERIES_BYTES
    finally:
        for path in tmp_path.glob(f"{name}*"):
            os.unlink(path)
    assert os.listdir(caches) == []
    growth = report["peak"] - report["baseline"]
    print(f"{sink}: peak {growth / 2**20:.0f} MiB above baseline", file=sys.stderr)
    assert growth < LIMIT, (growth, report)
    assert growth < 0.5 * SERIES_BYTES, (growth, report)
