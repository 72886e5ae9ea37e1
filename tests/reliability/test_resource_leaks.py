"""200 open/materialize/close cycles leave descriptors, memory and the cache root as they were.

Each cycle opens a small series (``.nii``, ``.nii.gz`` or NFDH5 in turn), materializes
it into its owned cache, reads the memmap and a lazy volume, exports it, and closes
it.  After a warm-up (thread pools, imports), the open file descriptors
(``/proc/self/fd``), threads, mappings of cache files (``/proc/self/maps``) and the
cache root listing must be back where they started, and resident memory may grow by
no more than a generous bound.
"""

from __future__ import annotations

import gc
import os
import threading

import dask
import numpy as np
import pytest
from guards import status_bytes

import nidask
from conftest import write_hdf5_series, write_nifti

CYCLES = 200
WARM_UP = 10
#: Allowed growth of resident memory over the cycles (allocator noise, caches of
#: imported libraries); a leaked 60 KB series per cycle alone would be 12 MB.
RSS_GROWTH = 48 * 2**20


def open_descriptors() -> int:
    return len(os.listdir("/proc/self/fd"))


def resident_bytes() -> int:
    return status_bytes("VmRSS")


def mappings_under(root) -> list[str]:
    with open("/proc/self/maps") as f:
        return [line for line in f if os.fspath(root) in line]


@pytest.fixture
def small_inputs(tmp_path, inputs_unchanged):
    directory = tmp_path / "inputs"
    directory.mkdir()
    data = np.random.default_rng(3).integers(0, 500, size=(12, 14, 10, 6), dtype=np.int16)
    files = [
        write_nifti(directory / "series.nii", data),
        write_nifti(directory / "series.nii.gz", data),
        write_hdf5_series(directory / "series.h5", data),
    ]
    inputs_unchanged(directory)
    return files, data


def one_cycle(path, data, outdir) -> None:
    with nidask.load(path) as dataset:
        materialized = dataset.materialize()
        assert int(materialized.memmap[..., 0].sum()) == int(data[..., 0].sum())
        np.testing.assert_array_equal(materialized.dataobj[..., 2].compute(), data[..., 2])
        dataset.to_nifti(outdir / "out.nii")


@pytest.mark.timeout(120)
def test_open_materialize_close_cycles_leak_nothing(small_inputs, tmp_path):
    files, data = small_inputs
    cache_root, outdir = tmp_path / "cache", tmp_path / "out"
    cache_root.mkdir()
    outdir.mkdir()
    with dask.config.set({"nidask.cache-dir": os.fspath(cache_root)}):
        for i in range(WARM_UP):
            one_cycle(files[i % len(files)], data, outdir)
        gc.collect()
        descriptors, threads = open_descriptors(), threading.active_count()
        resident, listing = resident_bytes(), sorted(os.listdir(cache_root))
        for i in range(CYCLES):
            one_cycle(files[i % len(files)], data, outdir)
        gc.collect()
        assert open_descriptors() <= descriptors
        assert threading.active_count() <= threads
        assert sorted(os.listdir(cache_root)) == listing == []
        assert mappings_under(cache_root) == []
        growth = resident_bytes() - resident
        assert growth < RSS_GROWTH, f"resident memory grew by {growth / 2**20:.1f} MiB"
    assert sorted(os.listdir(outdir)) == ["out.nii"]  # no temporary left beside it
