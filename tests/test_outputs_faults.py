"""Faults while writing outputs: a clear error, no partial output, inputs and cache intact."""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
import time

import dask
import dask.array as da
import numpy as np
import pytest

import nidask
from conftest import SHAPE3D, checksum_tree
from nidask import BaseDataset
from nidask.io.cache import TEMP_MARK
from nidask.validation.phantom import write_series

#: where the nidask under test was imported from (src/ or site-packages)
PACKAGE_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(nidask.__file__)))
SINKS = ("materialize", "to_filename", "nii", "nii.gz")
OUTPUT_NAMES = {"materialize": "out.npy", "to_filename": "out.h5", "nii": "out.nii"}
OUTPUT_NAMES["nii.gz"] = "out.nii.gz"


def write_to(dataset, sink: str, path) -> None:
    """Write ``dataset`` to the user-named ``path`` through ``sink``."""
    if sink == "materialize":
        dataset.materialize(path=path)
    elif sink == "to_filename":
        dataset.to_filename(path)
    else:
        dataset.to_nifti(path)


@pytest.fixture
def series(tmp_path, inputs_unchanged):
    """A small int16 NIfTI series in a directory of its own (checked unchanged)."""
    directory = tmp_path / "inputs"
    directory.mkdir()
    path = write_series(directory / "series.nii", (*SHAPE3D, 6), "int16")
    inputs_unchanged(directory)
    listing = sorted(os.listdir(directory))
    yield path
    assert sorted(os.listdir(directory)) == listing


# -- destination checks ------------------------------------------------------------------
@pytest.mark.parametrize("sink", SINKS)
def test_missing_output_directory(sink, series, tmp_path):
    ds = nidask.load(series)
    missing = tmp_path / "missing"
    with pytest.raises(nidask.OutputError, match="does not exist") as info:
        write_to(ds, sink, missing / OUTPUT_NAMES[sink])
    assert info.value.path == os.fspath(missing)
    assert not missing.exists()
    assert sorted(os.listdir(tmp_path)) == ["inputs"]


@pytest.mark.parametrize("sink", SINKS)
def test_output_directory_is_a_file(sink, series, tmp_path):
    blocker = tmp_path / "blocker"
    blocker.write_bytes(b"not a directory")
    ds = nidask.load(series)
    with pytest.raises(nidask.OutputError, match="not a directory") as info:
        write_to(ds, sink, blocker / OUTPUT_NAMES[sink])
    assert info.value.path == os.fspath(blocker)
    assert blocker.read_bytes() == b"not a directory"
    assert sorted(os.listdir(tmp_path)) == ["blocker", "inputs"]


@pytest.mark.parametrize("sink", SINKS)
def test_output_directory_not_writable(sink, series, tmp_path, monkeypatch):
    # tests run as root, where permission bits do not stop writes: make os.access say no
    out = tmp_path / "readonly"
    out.mkdir()
    real_access = os.access

    def access(path, mode, *args, **kwargs):
        if os.path.abspath(path) == os.fspath(out) and mode & os.W_OK:
            return False
        return real_access(path, mode, *args, **kwargs)

    monkeypatch.setattr(os, "access", access)
    ds = nidask.load(series)
    with pytest.raises(nidask.OutputError, match="not writable") as info:
        write_to(ds, sink, out / OUTPUT_NAMES[sink])
    assert info.value.path == os.fspath(out)
    assert isinstance(info.value, OSError)
    assert str(out) in str(info.value)
    assert os.listdir(out) == []


@pytest.mark.parametrize("link", ["same", "symlink", "hardlink"])
def test_output_is_the_input_nifti(link, series, tmp_path):
    target = series
    if link == "symlink":
        target = tmp_path / "link.nii"
        os.symlink(series, target)
    elif link == "hardlink":
        target = tmp_path / "hard.nii"
        os.link(series, target)
    ds = nidask.load(series)
    for sink in SINKS:
        with pytest.raises(nidask.OutputError, match="input") as info:
            write_to(ds, sink, target)
        assert info.value.path == os.path.abspath(target)
    ds.set_transform(1, np.eye(4))  # resampled (float32) output: refused all the same
    with pytest.raises(nidask.OutputError, match="input"):
        ds.to_nifti(target)
    assert not [n for n in os.listdir(tmp_path) if TEMP_MARK in n]


@pytest.mark.parametrize("link", ["same", "symlink", "hardlink"])
def test_output_is_the_input_h5_or_npy(link, series, tmp_path):
    data = np.asarray(nidask.load(series).dataobj)
    np.save(tmp_path / "series.npy", data)
    nidask.load(series).to_filename(tmp_path / "series.h5")
    sums = checksum_tree(tmp_path)
    for name in ("series.npy", "series.h5"):
        source = tmp_path / name
        target = source
        if link == "symlink":
            target = tmp_path / f"link-{name}"
            os.symlink(source, target)
        elif link == "hardlink":
            target = tmp_path / f"hard-{name}"
            os.link(source, target)
        ds = nidask.load(target)
        for sink in SINKS:
            with pytest.raises(nidask.OutputError, match="input"):
                write_to(ds, sink, source)
            with pytest.raises(nidask.OutputError, match="input"):
                write_to(ds, sink, target)
        np.testing.assert_array_equal(ds.dataobj.compute(), data)
    assert {k: v for k, v in checksum_tree(tmp_path).items() if k in sums} == sums


def test_output_is_the_datasets_own_memmap(series, tmp_path):
    ds = nidask.load(series)
    m = ds.materialize(path=tmp_path / "m.npy")
    before = (tmp_path / "m.npy").read_bytes()
    for sink in SINKS:
        with pytest.raises(nidask.OutputError, match="input"):
            write_to(m, sink, tmp_path / "m.npy")
    assert (tmp_path / "m.npy").read_bytes() == before


def test_dwi_sidecars_never_replace_input_gradients(dwi_phantom, tmp_path, inputs_unchanged):
    directory = tmp_path / "inputs"
    directory.mkdir()
    files = {}
    for key, path in {"image": dwi_phantom.image, **dwi_phantom.companions}.items():
        files[key] = os.fspath(directory / os.path.basename(path))
        shutil.copy(path, files[key])
    table = directory / "dwi.txt"
    bvecs, bvals = np.loadtxt(files["bvec_file"]), np.loadtxt(files["bval_file"])
    np.savetxt(table, np.column_stack([bvecs.T, bvals]), fmt="%.6f")
    listing = sorted(os.listdir(directory))
    inputs_unchanged(directory)
    dwi = nidask.load(files["image"], **{k: v for k, v in files.items() if k != "image"})
    dwi.set_transform(2, np.array([[1, 0, 0, 2.0], [0, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1]]))
    # dwi.nii.gz beside dwi.nii would write dwi.bval / dwi.bvec over the inputs
    with pytest.raises(nidask.OutputError, match="input") as info:
        dwi.to_nifti(directory / "dwi.nii.gz")
    assert info.value.path in (files["bval_file"], files["bvec_file"])
    assert sorted(os.listdir(directory)) == listing
    # a gradient table given as one file is an input too
    other = nidask.load(files["image"], gradients_file=table)
    with pytest.raises(nidask.OutputError, match="input"):
        other.to_filename(table)
    with pytest.raises(nidask.OutputError, match="input"):
        dwi.materialize(path=files["bval_file"])
    assert sorted(os.listdir(directory)) == listing
    dwi.close()


# -- disk full ---------------------------------------------------------------------------
DISK_FULL_CHILD = r"""
import json, os, resource, signal, sys
import dask, nidask

source, out, cache_root, limit, chunk = sys.argv[1:6]
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # writes past the limit raise EFBIG
resource.setrlimit(resource.RLIMIT_FSIZE, (int(limit), int(limit)))


def listing(root):
    return {d: sorted(os.listdir(os.path.join(root, d))) for d in sorted(os.listdir(root))}


report = {}
with dask.config.set({"nidask.cache-dir": cache_root, "nidask.chunk-size": int(chunk)}):
    ds = nidask.load(source)
    cases = {
        "materialize-cache": lambda: ds.materialize(),
        "materialize": lambda: ds.materialize(path=os.path.join(out, "out.npy")),
        "to_filename": lambda: ds.to_filename(os.path.join(out, "out.h5")),
        "nii": lambda: ds.to_nifti(os.path.join(out, "out.nii")),
        "nii.gz": lambda: ds.to_nifti(os.path.join(out, "out.nii.gz")),
    }
    for name, run in cases.items():
        try:
            run()
            entry = {"error": None}
        except Exception as exc:
            entry = {"error": type(exc).__name__, "message": str(exc)}
            entry["path"] = getattr(exc, "path", None)
            entry["cause_errno"] = getattr(exc.__cause__, "errno", None)
        entry["out"] = sorted(os.listdir(out))
        entry["cache"] = listing(cache_root)
        report[name] = entry
    ds.close()
    report["after_close"] = listing(cache_root)
print(json.dumps(report))
"""


@pytest.fixture(scope="module")
def disk_full(tmp_path_factory):
    """Run every sink once in a child whose file size limit is a quarter of the series."""
    root = tmp_path_factory.mktemp("disk_full")
    inputs, out, caches = root / "inputs", root / "out", root / "caches"
    for directory in (inputs, out, caches):
        directory.mkdir()
    shape = (32, 32, 16, 40)  # 1.3 MB of int16, 32 KiB per volume
    source = write_series(inputs / "series.nii", shape, "int16")
    data_bytes = math.prod(shape) * 2
    before = sorted(os.listdir(inputs)), checksum_tree(inputs)
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(
        [PACKAGE_ROOT] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else [])
    )
    # blocks of 4 volumes compress into members far below the limit: the .nii.gz
    # fails mid-write, while concatenating its members
    args = [source, out, caches, data_bytes // 4, 4 * math.prod(shape[:3]) * 2]
    result = subprocess.run(
        [sys.executable, "-c", DISK_FULL_CHILD, *map(str, args)],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    # a normal exit: no crash of the HDF5 library on the way out
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout.strip().splitlines()[-1])
    after = sorted(os.listdir(inputs)), checksum_tree(inputs)
    return {"report": report, "out": out, "caches": caches, "inputs_same": after == before}


DISK_FULL_CASES = ["materialize-cache", "materialize", "to_filename", "nii", "nii.gz"]


@pytest.mark.parametrize("case", DISK_FULL_CASES)
def test_disk_full(case, disk_full):
    entry = disk_full["report"][case]
    assert entry["error"] == "OutputError", entry
    assert "file size limit exceeded" in entry["message"], entry
    if case == "materialize-cache":
        (cache,) = entry["cache"]
        assert os.path.dirname(entry["path"]) == os.fspath(disk_full["caches"] / cache)
        assert entry["cache"][cache] == []  # no partial array left in the cache
    else:
        name = {"nii": "out.nii", "nii.gz": "out.nii.gz", "to_filename": "out.h5"}
        assert entry["path"] == os.fspath(disk_full["out"] / name.get(case, "out.npy"))
    assert entry["message"].startswith(entry["path"])
    assert entry["cause_errno"] == 27  # EFBIG, the OS error behind the message
    assert entry["out"] == []  # neither the output nor a temporary file
    assert disk_full["inputs_same"]


def test_disk_full_cache_cleaned_after_close(disk_full):
    assert disk_full["report"]["after_close"] == {}
    assert os.listdir(disk_full["caches"]) == []


# -- a task fails mid-write ----------------------------------------------------------------
def _failing_dataset(n: int = 4) -> BaseDataset:
    def second_block_fails(block, block_info=None):
        if block_info[0]["chunk-location"][3] == 1:
            time.sleep(0.2)  # let the first block reach the file
            raise RuntimeError("task failed mid-write")
        return block * np.float32(block_info[0]["chunk-location"][3] + 1)

    data = da.ones((*SHAPE3D, n), chunks=(*SHAPE3D, 1), dtype="float32")
    failing = data.map_blocks(second_block_fails, dtype="float32")
    return BaseDataset(dataobj=failing, affine=np.eye(4))


@pytest.mark.parametrize("sink", SINKS)
def test_task_failure_leaves_nothing(sink, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    caches = tmp_path / "caches"
    with dask.config.set({"nidask.cache-dir": os.fspath(caches), "scheduler": "threads"}):
        ds = _failing_dataset()
        with pytest.raises(RuntimeError, match="mid-write"):
            write_to(ds, sink, out / OUTPUT_NAMES[sink])
        assert os.listdir(out) == []
        if sink == "materialize":  # into the owned cache as well
            with pytest.raises(RuntimeError, match="mid-write"):
                ds.materialize()
            (cache,) = os.listdir(caches)
            assert os.listdir(caches / cache) == []
        ds.close()
    assert not caches.exists() or os.listdir(caches) == []
    time.sleep(0.3)  # tasks still running when the error surfaced create nothing either
    assert os.listdir(out) == []


@pytest.mark.parametrize("sink", SINKS)
def test_task_failure_keeps_existing_output(sink, tmp_path):
    target = tmp_path / OUTPUT_NAMES[sink]
    target.write_bytes(b"previous content")
    with pytest.raises(RuntimeError, match="mid-write"):
        write_to(_failing_dataset(), sink, target)
    assert target.read_bytes() == b"previous content"
    assert os.listdir(tmp_path) == [target.name]


@pytest.mark.parametrize("sink", ["materialize", "nii.gz"])
def test_task_failure_on_cluster_leaves_nothing(sink, tmp_path, local_cluster):
    with dask.config.set(scheduler=local_cluster):
        with pytest.raises(RuntimeError, match="mid-write"):
            write_to(_failing_dataset(6), sink, tmp_path / OUTPUT_NAMES[sink])
    assert os.listdir(tmp_path) == []
