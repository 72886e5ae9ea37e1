"""Read-only inputs: every operation works, and nothing in the inputs changes.

Inputs are copied into a directory tree made read-only (directories 0o555, files
0o444).  Root ignores those bits, so the tests also compare a full snapshot of the
tree — every name (hidden ones included), size, mtime, mode and checksum — before
and after: nothing may be created, removed or touched there.
"""

from __future__ import annotations

import os
import shutil
import stat

import dask
import nibabel as nb
import numpy as np
import pytest

import nidask
from conftest import checksum_tree


def snapshot(root) -> dict:
    """Every entry below ``root``: type, size, mtime and mode, plus file checksums."""
    entries = {}
    for directory, dirs, files in os.walk(root):
        for name in dirs + files:
            path = os.path.join(directory, name)
            info = os.lstat(path)
            entries[os.path.relpath(path, root)] = (
                stat.S_IFMT(info.st_mode),
                info.st_size,
                info.st_mtime_ns,
                stat.S_IMODE(info.st_mode),
            )
    return {"entries": entries, "checksums": checksum_tree(root)}


def set_modes(root, directory_mode: int, file_mode: int) -> None:
    for directory, _, files in os.walk(root, topdown=False):
        for name in files:
            os.chmod(os.path.join(directory, name), file_mode)
        os.chmod(directory, directory_mode)


@pytest.fixture
def readonly(tmp_path, dwi_phantom, dwi_gz_phantom, pet_phantom):
    """Copies of the DWI (.nii, .nii.gz), PET and an NFDH5 file in a read-only tree."""
    root = tmp_path / "inputs"
    for name, phantom in (("dwi", dwi_phantom), ("dwi_gz", dwi_gz_phantom), ("pet", pet_phantom)):
        shutil.copytree(os.path.dirname(phantom.image), root / name)
    relocate = {}
    for name, phantom in (("dwi", dwi_phantom), ("dwi_gz", dwi_gz_phantom), ("pet", pet_phantom)):
        folder = root / name
        relocate[name] = (
            os.fspath(folder / os.path.basename(phantom.image)),
            {k: os.fspath(folder / os.path.basename(v)) for k, v in phantom.companions.items()},
        )
    with nidask.load(relocate["dwi"][0], **relocate["dwi"][1]) as dwi:
        os.mkdir(root / "h5")
        dwi.to_filename(root / "h5" / "dwi.h5")
    relocate["h5"] = (os.fspath(root / "h5" / "dwi.h5"), {})
    set_modes(root, 0o555, 0o444)
    before = snapshot(root)
    try:
        yield relocate
        assert snapshot(root) == before, "the read-only inputs changed"
    finally:
        set_modes(root, 0o755, 0o644)


@pytest.fixture
def outputs(tmp_path):
    """A writable output directory; nidask's caches go under ``tmp_path/cache``."""
    out = tmp_path / "out"
    out.mkdir()
    with dask.config.set({"nidask.cache-dir": os.fspath(tmp_path / "cache")}):
        yield out


@pytest.mark.timeout(120)
@pytest.mark.parametrize("kind", ["dwi", "dwi_gz", "pet", "h5"])
def test_read_only_inputs_load_materialize_export(readonly, outputs, kind):
    image, companions = readonly[kind]
    assert not os.access(image, os.W_OK) or os.geteuid() == 0
    with nidask.load(image, **companions) as dataset:
        expected = dataset.dataobj.compute()
        m = dataset.materialize()  # into the owned cache
        np.testing.assert_array_equal(m.memmap, expected)
        named = dataset.materialize(outputs / "series.npy")
        np.testing.assert_array_equal(np.load(named.memmap_path), expected)
        dataset.to_nifti(outputs / "series.nii.gz")  # the whole series, b=0 included
        written = np.asanyarray(nb.load(outputs / "series.nii.gz").dataobj)
        np.testing.assert_array_equal(written, dataset.whole_series().dataobj.compute())
        dataset.to_filename(outputs / "series.h5")
        with nidask.load(outputs / "series.h5") as back:
            np.testing.assert_array_equal(back.dataobj.compute(), expected)


@pytest.mark.timeout(120)
@pytest.mark.parametrize("kind", ["dwi", "h5"])
def test_read_only_inputs_estimate(readonly, outputs, kind):
    image, companions = readonly[kind]
    estimator = nidask.Estimator(model="average", registration="rigid", passes=1)
    with nidask.load(image, **companions) as dataset:
        result = estimator.run(dataset, workdir=outputs / "run")
        assert result.motion_affines.shape == (len(dataset), 4, 4)
        assert np.all(np.isfinite(result.motion_affines))
        result.to_nifti(outputs / "corrected.nii.gz", order=1)
    assert nb.load(outputs / "corrected.nii.gz").shape == dataset.whole_series().shape
