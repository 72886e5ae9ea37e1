"""Several processes using the same inputs and the same ``nidask.cache-dir`` at once.

Four child processes start together (a file barrier), each opens the same ``.nii``,
``.nii.gz`` and NFDH5 inputs, materializes them into its caches and exports them.
Every output must be correct, every cache directory distinct and named after its
owner, the ``.nii.gz`` decompressed into each dataset's own cache, and closing one
process's datasets must remove its caches only.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time

import h5py
import nibabel as nb
import numpy as np
import pytest
from guards import child_env

import nidask
from conftest import write_hdf5_series, write_nifti
from nidask.io.cache import CACHE_PREFIX, TEMP_MARK

N_PROCESSES = 4

CHILD = textwrap.dedent(
    """
    import json, os, sys, time
    import dask
    import nidask

    index, inputs, outdir, cache_root, sync = sys.argv[1:6]
    inputs = json.loads(inputs)

    def wait_for(name):
        while not os.path.exists(os.path.join(sync, name)):
            time.sleep(0.01)

    def touch(name):
        open(os.path.join(sync, name), "w").close()

    touch(f"imported-{index}")
    wait_for("go")  # all children start working at the same moment
    with dask.config.set({"nidask.cache-dir": cache_root, "nidask.chunk-size": "1MiB"}):
        datasets = {kind: nidask.load(path) for kind, path in inputs.items()}
        materialized = {kind: ds.materialize() for kind, ds in datasets.items()}
        out = lambda name: os.path.join(outdir, f"p{index}-{name}")
        datasets["nii.gz"].to_nifti(out("from-gz.nii.gz"))
        datasets["h5"].to_filename(out("from-h5.h5"))
        datasets["nii"].materialize(out("from-nii.npy"))
        materialized["nii.gz"].to_nifti(out("from-memmap.nii"))
        report = {
            "pid": os.getpid(),
            "caches": {kind: ds.cache.path for kind, ds in datasets.items()},
            "contents": {kind: sorted(os.listdir(ds.cache.path)) for kind, ds in datasets.items()},
            "memmaps": {kind: m.memmap_path for kind, m in materialized.items()},
        }
        with open(os.path.join(sync, f"report-{index}.json"), "w") as f:
            json.dump(report, f)
        touch(f"ready-{index}")
        wait_for(f"close-{index}")
        for ds in datasets.values():
            ds.close()
        gone = [not os.path.exists(path) for path in report["caches"].values()]
        print(json.dumps({"own_caches_removed": all(gone)}), flush=True)
    """
)


@pytest.fixture(scope="module")
def shared_inputs(tmp_path_factory):
    """A 3.5 MB series as .nii, .nii.gz and NFDH5 (v1), and its values."""
    directory = tmp_path_factory.mktemp("shared_inputs")
    rng = np.random.default_rng(7)
    data = rng.integers(0, 3000, size=(48, 48, 32, 24), dtype=np.int16)
    files = {
        "nii": write_nifti(directory / "series.nii", data),
        "nii.gz": write_nifti(directory / "series.nii.gz", data),
        "h5": write_hdf5_series(directory / "series.h5", data),
    }
    return directory, files, data


def _wait(predicate, what: str, children, timeout: float = 90.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        for child in children:
            if child.poll() not in (None, 0):
                raise AssertionError(f"a child failed: {child.communicate()}")
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


def _caches(root) -> list[str]:
    return sorted(n for n in os.listdir(root) if n.startswith(CACHE_PREFIX))


@pytest.mark.timeout(180)
def test_processes_share_inputs_and_cache_root(shared_inputs, tmp_path, inputs_unchanged):
    directory, files, data = shared_inputs
    inputs_unchanged(directory)
    outdir, cache_root, sync = tmp_path / "out", tmp_path / "cache", tmp_path / "sync"
    for d in (outdir, cache_root, sync):
        d.mkdir()
    children = [
        subprocess.Popen(
            [sys.executable, "-c", CHILD, str(i), json.dumps(files), outdir, cache_root, sync],
            env=child_env(),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in range(N_PROCESSES)
    ]
    try:
        ready = [sync / f"imported-{i}" for i in range(N_PROCESSES)]
        _wait(lambda: all(p.exists() for p in ready), "imports", children)
        (sync / "go").touch()
        ready = [sync / f"ready-{i}" for i in range(N_PROCESSES)]
        _wait(lambda: all(p.exists() for p in ready), "the children's work", children)
        reports = [json.loads((sync / f"report-{i}.json").read_text()) for i in range(4)]

        # every dataset of every process has its own cache, named after its owner
        owned = {}
        for report in reports:
            for path in report["caches"].values():
                name = os.path.basename(path)
                assert os.path.dirname(path) == os.fspath(cache_root)
                assert name.startswith(f"{CACHE_PREFIX}{report['pid']}-")
                owned[path] = report["pid"]
            # the .nii.gz was decompressed into its own dataset's cache, nowhere else
            assert any(n.startswith("decompressed") for n in report["contents"]["nii.gz"])
            for kind in ("nii", "h5"):
                assert not any(n.startswith("decompressed") for n in report["contents"][kind])
            assert not any(TEMP_MARK in n for c in report["contents"].values() for n in c)
        assert len(owned) == 3 * N_PROCESSES  # no two datasets share a directory
        assert _caches(cache_root) == sorted(os.path.basename(p) for p in owned)

        # every output is complete and correct
        for i, report in enumerate(reports):
            for kind, path in report["memmaps"].items():
                np.testing.assert_array_equal(np.load(path, mmap_mode="r"), data, err_msg=kind)
            for name in ("from-gz.nii.gz", "from-memmap.nii"):
                image = nb.load(outdir / f"p{i}-{name}")
                np.testing.assert_array_equal(np.asanyarray(image.dataobj), data, err_msg=name)
            with h5py.File(outdir / f"p{i}-from-h5.h5", "r") as f:
                np.testing.assert_array_equal(f["/0/dataobj"][()], data)
            np.testing.assert_array_equal(np.load(outdir / f"p{i}-from-nii.npy"), data)
        assert not [n for n in os.listdir(outdir) if TEMP_MARK in n]

        # closing one process's datasets removes its caches only
        (sync / "close-0").touch()
        out, err = children[0].communicate(timeout=60)
        assert children[0].returncode == 0, err
        assert json.loads(out.splitlines()[-1]) == {"own_caches_removed": True}
        for path, pid in owned.items():
            assert os.path.isdir(path) == (pid != reports[0]["pid"]), path
        for report in reports[1:]:  # the others still read their materialized copies
            for path in report["memmaps"].values():
                np.testing.assert_array_equal(np.load(path, mmap_mode="r")[..., -1], data[..., -1])
        for i in range(1, N_PROCESSES):
            (sync / f"close-{i}").touch()
        for child in children[1:]:
            out, err = child.communicate(timeout=60)
            assert child.returncode == 0, err
            assert json.loads(out.splitlines()[-1]) == {"own_caches_removed": True}
        assert _caches(cache_root) == []
    finally:
        for child in children:
            child.kill()
            child.wait()


@pytest.mark.timeout(60)
def test_gzip_decompression_cache_is_per_dataset(shared_inputs, tmp_path, inputs_unchanged):
    """Two datasets on one .nii.gz decompress into two caches; closing one spares the other."""
    directory, files, data = shared_inputs
    inputs_unchanged(directory)
    import dask

    with dask.config.set({"nidask.cache-dir": os.fspath(tmp_path)}):
        first, second = nidask.load(files["nii.gz"]), nidask.load(files["nii.gz"])
    assert first.cache.path != second.cache.path
    np.testing.assert_array_equal(first.dataobj[..., 3].compute(), data[..., 3])
    np.testing.assert_array_equal(second.dataobj[..., 4].compute(), data[..., 4])
    for ds in (first, second):
        assert [n for n in os.listdir(ds.cache.path) if n.endswith(".nii")]
    first.close()
    assert not os.path.exists(first.cache.path)
    np.testing.assert_array_equal(second.dataobj[..., 5].compute(), data[..., 5])
    second.close()
    assert _caches(tmp_path) == []
