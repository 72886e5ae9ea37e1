"""Owned caches: one directory per lineage, removed when the lineage is done with it."""

from __future__ import annotations

import gc
import json
import os
import pickle
import shutil
import subprocess
import sys
import tempfile

import dask
import nibabel as nb
import numpy as np
import pytest

import nidask
from conftest import checksum_tree
from nidask.io.cache import CACHE_PREFIX, TEMP_MARK

#: where the nidask under test was imported from (src/ or site-packages)
PACKAGE_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(nidask.__file__)))
SHIFT = np.array([[1.0, 0, 0, 2.0], [0, 1, 0, -1.0], [0, 0, 1, 0.5], [0, 0, 0, 1]])


@pytest.fixture
def cache_root(tmp_path, monkeypatch):
    """``nidask.cache-dir`` set to a fresh directory; the system temp dir moved aside.

    Anything nidask would create in the system temp dir instead (``tempfile``
    without a ``dir``) lands in ``tmp_path / "systemp"``, which must stay empty.
    """
    root = tmp_path / "caches"
    root.mkdir()
    systemp = tmp_path / "systemp"
    systemp.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", os.fspath(systemp))
    with dask.config.set({"nidask.cache-dir": os.fspath(root)}):
        yield root
    assert os.listdir(systemp) == []


@pytest.fixture
def private_dwi(dwi_gz_phantom, tmp_path):
    """A private copy of the gzip DWI phantom (image, bvec/bval, mask) in its own directory."""
    directory = tmp_path / "inputs"
    directory.mkdir()
    files = {}
    for key, path in {"image": dwi_gz_phantom.image, **dwi_gz_phantom.companions}.items():
        files[key] = os.fspath(directory / os.path.basename(path))
        shutil.copy(path, files[key])
    return directory, files


def _load(files):
    companions = {k: v for k, v in files.items() if k != "image"}
    return nidask.load(files["image"], **companions)


def _caches(root) -> list[str]:
    return sorted(os.listdir(root))


def _data(path) -> np.ndarray:
    return np.asanyarray(nb.load(path).dataobj)


def test_everything_under_one_cache_dir(cache_root, private_dwi, tmp_path):
    _, files = private_dwi
    out = tmp_path / "out"
    out.mkdir()
    dwi = _load(files)
    (name,) = _caches(cache_root)  # the .nii.gz is decompressed into the cache
    assert name.startswith(CACHE_PREFIX)
    cache = cache_root / name
    assert dwi.cache.path == os.fspath(cache)
    m = dwi.materialize()
    train, _ = dwi.lofo(2)
    mt = train.materialize()
    dwi.set_transform(3, SHIFT)
    mr = dwi.resampled(order=1).materialize()
    dwi.to_nifti(out / "moved.nii.gz")
    m.to_filename(out / "series.h5")
    # every intermediate nidask made lives in the one cache of the lineage
    assert _caches(cache_root) == [name]
    for derived in (m, train, mt, mr):
        assert derived.cache is dwi.cache
    for materialized in (m, mt, mr):
        assert os.path.dirname(materialized.memmap_path) == os.fspath(cache)
    inside = os.listdir(cache)
    assert len(inside) == 4 and not any(TEMP_MARK in n for n in inside)
    assert sorted(os.listdir(out)) == ["moved.bval", "moved.bvec", "moved.nii.gz", "series.h5"]
    dwi.close()
    assert _caches(cache_root) == []
    # user-named outputs stay
    assert sorted(os.listdir(out)) == ["moved.bval", "moved.bvec", "moved.nii.gz", "series.h5"]


def test_removed_on_close(cache_root, private_dwi):
    _, files = private_dwi
    dwi = _load(files)
    m = dwi.materialize()
    assert os.path.exists(m.memmap_path)
    m.close()  # any dataset of the lineage closes the lineage's cache
    assert _caches(cache_root) == []
    with pytest.raises(nidask.InputError, match="cache"):
        dwi.dataobj.compute()
    dwi.close()  # closing twice is harmless


def test_removed_on_leaving_with(cache_root, private_dwi):
    _, files = private_dwi
    with _load(files) as dwi:
        m = dwi.materialize()
        assert len(_caches(cache_root)) == 1 and os.path.exists(m.memmap_path)
    assert _caches(cache_root) == []


def test_removed_with_error_in_with(cache_root, private_dwi):
    _, files = private_dwi
    with pytest.raises(ZeroDivisionError), _load(files) as dwi:
        dwi.materialize()
        assert len(_caches(cache_root)) == 1
        1 / 0  # noqa: B018
    assert _caches(cache_root) == []


def test_removed_when_last_dataset_is_collected(cache_root, private_dwi):
    _, files = private_dwi
    dwi = _load(files)
    m = dwi.materialize()
    train, _ = m.lofo(0)
    (name,) = _caches(cache_root)
    del dwi, m
    gc.collect()
    # the training set still belongs to the lineage and keeps the cache alive
    assert _caches(cache_root) == [name]
    assert train.dataobj.compute().shape[3] == len(train)
    del train
    gc.collect()
    assert _caches(cache_root) == []


def test_removed_at_interpreter_exit(cache_root, private_dwi, tmp_path):
    _, files = private_dwi
    script = r"""
import json, sys
import dask, nidask
with dask.config.set({"nidask.cache-dir": sys.argv[1]}):
    files = json.loads(sys.argv[2])
    image = files.pop("image")
    dwi = nidask.load(image, **files)
    m = dwi.materialize()
    keep = [dwi, m]          # still referenced when the interpreter exits
    print(json.dumps({"cache": dwi.cache.path, "memmap": m.memmap_path}))
"""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(
        [PACKAGE_ROOT] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else [])
    )
    result = subprocess.run(
        [sys.executable, "-c", script, os.fspath(cache_root), json.dumps(files)],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert os.path.dirname(report["cache"]) == os.fspath(cache_root)
    assert report["memmap"].startswith(report["cache"])
    assert not os.path.exists(report["cache"])
    assert _caches(cache_root) == []


def test_user_named_files_are_never_removed(cache_root, private_dwi, tmp_path):
    _, files = private_dwi
    out = tmp_path / "out"
    out.mkdir()
    dwi = _load(files)
    m = dwi.materialize(path=out / "series.npy")
    dwi.to_filename(out / "series.h5")
    m.to_nifti(out / "series.nii.gz")
    dwi.to_nifti(out / "plain.nii")
    assert not dwi.cache.owns(out / "series.npy")
    expected = sorted(
        ["series.npy", "series.h5", "series.nii.gz", "series.bval", "series.bvec"]
        + ["plain.nii", "plain.bval", "plain.bvec"]
    )
    assert sorted(os.listdir(out)) == expected
    sums = checksum_tree(out)
    m.close()
    dwi.close()
    del dwi, m
    gc.collect()
    assert _caches(cache_root) == []
    assert checksum_tree(out) == sums
    # a dataset opened from a user file does not own it either
    with nidask.load(out / "series.npy") as again:
        again.materialize()
        assert not again.cache.owns(out / "series.npy")
    with nidask.load(out / "series.h5") as again:
        again.materialize()
    assert checksum_tree(out) == sums
    assert _caches(cache_root) == []


def test_nothing_written_into_or_beside_inputs(cache_root, private_dwi, tmp_path):
    directory, files = private_dwi
    before = sorted(os.listdir(directory)), checksum_tree(directory)
    out = tmp_path / "out"
    out.mkdir()
    dwi = _load(files)
    dwi.materialize()
    dwi.lofo(1)[0].materialize()
    dwi.set_transform(2, SHIFT)
    dwi.to_nifti(out / "dwi.nii.gz", write_hmxfms=True)
    dwi.to_filename(out / "dwi.h5")
    back = nidask.load(out / "dwi.h5")
    back.materialize()
    assert (sorted(os.listdir(directory)), checksum_tree(directory)) == before
    dwi.close()
    back.close()
    assert (sorted(os.listdir(directory)), checksum_tree(directory)) == before
    assert _caches(cache_root) == []


def test_pickled_copy_never_removes_the_cache(cache_root, private_dwi):
    _, files = private_dwi
    dwi = _load(files)
    m = dwi.materialize()
    copy = pickle.loads(pickle.dumps(m))
    np.testing.assert_array_equal(copy.memmap, m.memmap)
    copy.close()
    del copy
    gc.collect()
    assert os.path.exists(m.memmap_path)
    np.testing.assert_array_equal(dwi.dataobj.compute(), m.memmap)
    dwi.close()
    assert _caches(cache_root) == []


def test_copy_on_a_worker_never_removes_the_cache(cache_root, private_dwi, local_cluster):
    _, files = private_dwi
    dwi = _load(files)
    m = dwi.materialize()
    expected = float(m.memmap.sum(dtype=np.float64))

    def on_worker(dataset):
        total = float(dataset.memmap.sum(dtype=np.float64))
        dataset.close()  # a borrowed cache: closing a copy removes nothing
        del dataset
        gc.collect()
        return total

    futures = [local_cluster.submit(on_worker, m, pure=False) for _ in range(4)]
    assert local_cluster.gather(futures) == [expected] * 4
    del futures
    local_cluster.run(gc.collect)
    assert os.path.exists(m.memmap_path)
    # the lineage still works, also for tasks that read the cache on workers
    with dask.config.set(scheduler=local_cluster):
        np.testing.assert_array_equal(dwi.dataobj.compute(), m.memmap)
    dwi.close()
    assert _caches(cache_root) == []


def test_two_datasets_from_one_file_have_distinct_caches(cache_root, private_dwi):
    _, files = private_dwi
    first, second = _load(files), _load(files)
    a, b = first.materialize(), second.materialize()
    assert first.cache.path != second.cache.path
    assert len(_caches(cache_root)) == 2
    first.close()
    assert len(_caches(cache_root)) == 1 and not os.path.exists(a.memmap_path)
    np.testing.assert_array_equal(b.memmap, second.dataobj.compute())
    np.testing.assert_array_equal(b.memmap[..., 0], _data(files["image"])[..., 2])
    second.close()
    assert _caches(cache_root) == []
