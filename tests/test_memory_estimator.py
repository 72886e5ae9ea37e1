"""The estimator's peak memory follows the chunk budget and the stated working set.

``docs/concepts.md`` ("What one estimator task holds") states the bound: peak RSS above
the baseline is at most ``2 x budget + threads x W``, where ``W``, one fold task's
working set, is 8 float32 volumes plus 24 MiB of samples and optimiser state.  A
child process runs a whole estimation on a mid-size series and reports its own
``VmHWM`` (a child's ``ru_maxrss`` starts at its parent's peak).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import nidask
from nidask.validation import phantom

PACKAGE_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(nidask.__file__)))
SHAPE = (72, 72, 48)
BUDGET = 8 * 2**20
THREADS = 2
MIB = 2**20

#: what every child starts with: its own resident and peak sizes, and a peak reset
PRELUDE = r"""
import json, sys
import dask
import nidask

def status(field):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024

def reset_peak():
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # VmHWM restarts from the current RSS
"""

CHILD = r"""
from nidask.ops import kernels

image, bvec, bval, mask, workdir, budget, threads = sys.argv[1:8]
kernels.warm_up()  # compiled code is a fixed cost per process, not data
dataset = nidask.load(image, bvec_file=bvec, bval_file=bval, brainmask_file=mask)
reset_peak()
baseline = status("VmRSS")
settings = {"nidask.chunk-size": int(budget), "scheduler": "threads", "num_workers": int(threads)}
with dask.config.set(settings):
    estimator = nidask.Estimator(passes=2, progress=False)
    result = estimator.run(dataset, workdir=workdir)
print(json.dumps({
    "baseline": baseline, "peak": status("VmHWM"), "n": len(result.whole_series()),
    "passes": [p["pass"] for p in estimator.report["passes"]],
}))
"""


def run_child(script: str, *args) -> dict:
    """Run ``PRELUDE + script`` in a fresh interpreter; its last line of output, as JSON."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(
        [PACKAGE_ROOT] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else [])
    )
    # glibc otherwise keeps freed blocks above its adaptive mmap threshold in the
    # heap; dask's own workers start with this setting for the same reason
    env["MALLOC_TRIM_THRESHOLD_"] = "65536"
    result = subprocess.run(
        [sys.executable, "-c", PRELUDE + script, *(str(a) for a in args)],
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def working_set(shape3d) -> int:
    """``W`` of docs/concepts.md: one fold task's bytes."""
    return 8 * 4 * int(shape3d[0] * shape3d[1] * shape3d[2]) + 24 * MIB


def test_estimator_peak_memory_follows_budget_and_working_set(tmp_path):
    ph = phantom.make_dwi(
        tmp_path,
        shape3d=SHAPE,
        zooms=(3.0, 3.0, 3.0),
        n_b0=4,
        n_directions=60,
        bvalues=(1000.0, 2000.0),
        b0_every=16,
        supersample=1,
        motion="realistic",
        seed=1,
    )
    c = ph.companions
    args = [c["bvec_file"], c["bval_file"], c["brainmask_file"], tmp_path / "run"]
    report = run_child(CHILD, ph.image, *args, BUDGET, THREADS)
    assert report["n"] == 64 and report["passes"] == [0, 1, 2]  # the b=0 anchor, two passes
    series_bytes = 4 * report["n"] * SHAPE[0] * SHAPE[1] * SHAPE[2]
    bound = 2 * BUDGET + THREADS * working_set(SHAPE)
    growth = report["peak"] - report["baseline"]
    # a generous margin, yet one float32 copy of the series more would break it
    assert growth <= 1.3 * bound, (growth / MIB, bound / MIB)
    assert 1.3 * bound < 0.8 * bound + series_bytes


MEDIAN_CHILD = r"""
image, bvec, bval, output, budget = sys.argv[1:6]
with dask.config.set({"nidask.chunk-size": int(budget), "num_workers": 2}):
    dataset = nidask.load(image, bvec_file=bvec, bval_file=bval)
    reset_peak()
    baseline = status("VmRSS")
    result = dataset.materialize(output)  # the b=0 median is computed along
    print(json.dumps({
        "baseline": baseline, "peak": status("VmHWM"), "n_b0": int(len(dataset.b0_index)),
        "bzero_mean": float(result.bzero.mean()),
    }))
"""


def _many_b0_series(tmp_path, shape=(96, 96, 60), n_b0=60, n_dw=6):
    """A float32 DWI of ``n_b0`` noisy b=0 volumes (N(100, 10)) and a few others, written
    volume by volume; its image, .bvec and .bval paths."""
    import nibabel as nb
    import numpy as np

    rng = np.random.default_rng(0)
    bvals = np.r_[np.zeros(n_b0), np.full(n_dw, 1000.0)]
    bvecs = np.c_[np.zeros((3, n_b0)), np.eye(3)[:, [0, 1, 2, 0, 1, 2]]]
    image = tmp_path / "dwi.nii"
    header = nb.Nifti1Header()
    header.set_data_shape((*shape, len(bvals)))
    header.set_data_dtype(np.float32)
    with open(image, "wb") as f:  # streamed: the series is never whole in this process
        header.write_to(f)
        f.write(b"\0" * (352 - f.tell()))
        for _ in bvals:
            f.write(rng.normal(100.0, 10.0, shape).astype("<f4").tobytes(order="F"))
    np.savetxt(tmp_path / "dwi.bval", bvals[None], fmt="%g")
    np.savetxt(tmp_path / "dwi.bvec", bvecs, fmt="%g")
    return [image, tmp_path / "dwi.bvec", tmp_path / "dwi.bval"]


def test_b0_median_memory_does_not_grow_with_the_b0_count(tmp_path):
    """A DWI's b=0 median is read slab by slab: 60 b=0 volumes stay within the budget.

    Taken in one task, as it was, the median held every b=0 volume and two copies of
    them (about 400 MB here); an HCP series' 18 b=0 volumes added 250 MB to a run.
    """
    shape, n_b0 = (96, 96, 60), 60
    paths = [*_many_b0_series(tmp_path, shape, n_b0), tmp_path / "out.npy"]
    report = run_child(MEDIAN_CHILD, *paths, BUDGET)
    assert report["n_b0"] == n_b0
    assert abs(report["bzero_mean"] - 100.0) < 1.0  # the median of N(100, 10) noise
    b0_bytes = 4 * n_b0 * shape[0] * shape[1] * shape[2]
    growth = report["peak"] - report["baseline"]
    # two threads each holding a chunk and its copy, with room to spare; the b=0
    # volumes alone (133 MB) would break it
    assert growth <= 4 * BUDGET + 16 * MIB < b0_bytes, (growth / MIB, b0_bytes / MIB)


SNR_CHILD = r"""
from nidask.reporting.html import b0_snr

image, bvec, bval, budget = sys.argv[1:5]
with dask.config.set({"nidask.chunk-size": int(budget)}):
    dataset = nidask.load(image, bvec_file=bvec, bval_file=bval)
    reset_peak()
    baseline = status("VmRSS")
    snr = b0_snr(dataset)
print(json.dumps({"baseline": baseline, "peak": status("VmHWM"), **snr}))
"""


def test_b0_snr_of_the_qc_page_reads_a_block_at_a_time(tmp_path):
    """The QC page's temporal SNR of 60 b=0 volumes holds a block of volumes and a few
    float64 volumes, not the series: 43 MB here, where a reduction over every b=0
    volume took 223 MB (and about 1 GB at HCP's grid)."""
    shape, n_b0 = (96, 96, 60), 60
    report = run_child(SNR_CHILD, *_many_b0_series(tmp_path, shape, n_b0), BUDGET)
    assert report["kind"] == "temporal" and report["volumes"] == n_b0
    assert 9.0 < report["value"] < 11.0  # 100 / 10
    volume = shape[0] * shape[1] * shape[2]
    growth = report["peak"] - report["baseline"]
    assert growth <= BUDGET + 8 * 8 * volume + 16 * MIB < 4 * n_b0 * volume, growth / MIB
