"""Graphs from every source compute the same values on threads, processes and distributed."""

from __future__ import annotations

import math
import os

import dask
import numpy as np
import pytest

import nidask
from conftest import N_B0, SHAPE3D, SOURCE_KINDS, graph_sources, open_kind, reference_data
from nidask.io.sources import GzipNiftiSource

SCHEDULERS = ("threads", "processes", "distributed")


@pytest.mark.parametrize("scheduler", SCHEDULERS)
@pytest.mark.parametrize("kind", SOURCE_KINDS)
def test_source_graph_same_values(kind, scheduler, source_files, cache, compute_on):
    expected = reference_data(source_files[kind], kind)
    source = open_kind(source_files[kind], kind, cache)
    volume_bytes = math.prod(SHAPE3D) * source.dtype.itemsize
    with dask.config.set({"nidask.chunk-size": 3 * volume_bytes}):
        array = source.to_dask()
    assert array.numblocks[3] == 4  # several tasks, spread over the workers
    whole, one, subset, mean = compute_on(
        scheduler,
        array,
        array[..., 5],
        array[..., [9, 0, 4]],
        array.mean(axis=-1, dtype="float64"),
    )
    assert whole.dtype == expected.dtype
    np.testing.assert_array_equal(whole, expected)
    np.testing.assert_array_equal(one, expected[..., 5])
    np.testing.assert_array_equal(subset, expected[..., [9, 0, 4]])
    np.testing.assert_allclose(mean, expected.mean(axis=-1, dtype="float64"), rtol=1e-12)


@pytest.mark.parametrize("scheduler", SCHEDULERS)
@pytest.mark.parametrize("image", ["dwi_phantom", "dwi_gz_phantom"])
def test_dwi_b0_removal_and_bzero(image, scheduler, request, compute_on):
    ph = request.getfixturevalue(image)
    full = reference_data(ph.image, "nii.gz" if ph.image.endswith(".gz") else "nii")
    bvals = np.loadtxt(ph.companions["bval_file"])
    is_b0 = bvals <= 50
    assert is_b0.sum() == N_B0
    volume_bytes = math.prod(SHAPE3D) * full.dtype.itemsize
    with dask.config.set({"nidask.chunk-size": 3 * volume_bytes}):
        dwi = nidask.load(ph.image, **ph.companions)
    train, (test_volume, _, _) = dwi.lofo(3)
    data, bzero, train_data, test_data = compute_on(
        scheduler, dwi.dataobj, dwi.bzero, train.dataobj, test_volume
    )
    np.testing.assert_array_equal(data, full[..., ~is_b0])
    expected_b0 = np.median(full[..., is_b0], axis=-1).astype(np.float32)
    assert bzero.dtype == np.float32
    np.testing.assert_array_equal(bzero, expected_b0)
    dw = np.flatnonzero(~is_b0)
    np.testing.assert_array_equal(train_data, full[..., np.delete(dw, 3)])
    np.testing.assert_array_equal(test_data, full[..., dw[3]])
    dwi.close()


@pytest.mark.parametrize("scheduler", ["processes", "distributed"])
def test_gzip_cache_decompressed_on_worker(scheduler, source_files, cache, compute_on):
    source = GzipNiftiSource(source_files["nii.gz"], cache.new_path(".nii"))
    volume_bytes = math.prod(SHAPE3D) * source.dtype.itemsize
    with dask.config.set({"nidask.chunk-size": 2 * volume_bytes}):
        array = source.to_dask()
    assert not os.path.exists(source.data_path)
    (result,) = compute_on(scheduler, array)
    # a worker process wrote the decompressed file into the parent's cache
    assert os.path.exists(source.data_path)
    assert not os.path.exists(source.data_path + ".part")
    assert not os.path.exists(source.data_path + ".lock")
    np.testing.assert_array_equal(result, reference_data(source_files["nii.gz"], "nii.gz"))
    # the same graph again reuses the cache file
    mtime = os.stat(source.data_path).st_mtime_ns
    (again,) = compute_on(scheduler, array[..., 6])
    np.testing.assert_array_equal(again, result[..., 6])
    assert os.stat(source.data_path).st_mtime_ns == mtime


@pytest.mark.parametrize("scheduler", SCHEDULERS)
def test_loaded_dataset_graph_ships_a_path_not_data(scheduler, dwi_gz_phantom, compute_on):
    ds = nidask.load(dwi_gz_phantom.image)
    (source,) = graph_sources(ds.dataobj)
    assert source.path == os.path.abspath(dwi_gz_phantom.image)
    (volumes,) = compute_on(scheduler, ds[2:5][0])
    np.testing.assert_array_equal(
        volumes, reference_data(dwi_gz_phantom.image, "nii.gz")[..., 2:5]
    )
    ds.close()
