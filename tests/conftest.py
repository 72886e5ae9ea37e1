"""Shared fixtures: small phantoms on disk, array files of every source kind, schedulers.

Session-scoped files live in one read-only-by-convention directory; an autouse
fixture checksums it before and after every test that uses it, so a test (or the
code under test) that writes into its inputs fails.  Tests that need files of
their own write them under ``tmp_path`` and may guard them with ``inputs_unchanged``.

Helpers defined here are imported by test modules with ``from conftest import ...``.
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import io
import json
import multiprocessing
import os
import pickle

import dask
import h5py
import nibabel as nb
import numpy as np
import pytest

from nidask.geometry import ras_to_fsl
from nidask.io.cache import Cache
from nidask.io.sources import (
    GzipNiftiSource,
    HDF5Source,
    NiftiSource,
    NpySource,
    VolumeSelection,
    VolumeSource,
)
from nidask.validation import phantom

#: Spatial shape of every small test series.
SHAPE3D = (16, 18, 12)
#: b=0 and diffusion-weighted volumes of the DWI phantom (10 volumes in the file).
N_B0, N_DIRECTIONS = 2, 8
N_FRAMES = 6
#: Every kind of source, as named in parametrised tests.
SOURCE_KINDS = ("nii", "nii.gz", "h5v1", "h5v2", "npyC", "npyF")


# -- helpers ----------------------------------------------------------------------------
def checksum_tree(path) -> dict[str, str]:
    """sha256 of every file below ``path``, keyed by relative path."""
    sums = {}
    root = os.fspath(path)
    for directory, _, files in os.walk(root):
        for name in files:
            full = os.path.join(directory, name)
            digest = hashlib.sha256()
            with open(full, "rb") as f:
                for block in iter(lambda f=f: f.read(2**20), b""):
                    digest.update(block)
            sums[os.path.relpath(full, root)] = digest.hexdigest()
    return sums


def write_nifti(path, data, affine=None, *, slope=None, inter=None, dtype=None) -> str:
    """Write ``data`` as a NIfTI-1 file (``.nii`` or ``.nii.gz``), optionally scaled."""
    data = np.asarray(data)
    affine = phantom.phantom_affine(data.shape[:3]) if affine is None else affine
    image = nb.Nifti1Image(data, affine)
    if dtype is not None:
        image.set_data_dtype(dtype)
    if slope is not None or inter is not None:
        image.header.set_slope_inter(1.0 if slope is None else slope, inter or 0.0)
    image.to_filename(os.fspath(path))
    return os.fspath(path)


def write_bvec_bval(stem, bvecs, bvals, *, rows: bool = True, affine=None) -> tuple[str, str]:
    """Write FSL ``.bvec`` (3xN, or Nx3 with ``rows=False``) and ``.bval`` files.

    ``bvecs`` are RAS+ directions, written in FSL's voxel frame of an image of
    ``affine`` (default: the phantoms' axis-aligned RAS affine, where FSL negates x);
    their norms are kept.
    """
    stem = os.fspath(stem)
    bvecs = np.asarray(bvecs, dtype=float).reshape(-1, 3)
    affine = phantom.phantom_affine(SHAPE3D) if affine is None else affine
    with np.errstate(all="ignore"):  # non-finite rows are written as they are
        norms = np.linalg.norm(bvecs, axis=1, keepdims=True)
        fsl = ras_to_fsl(np.nan_to_num(bvecs), affine) * norms
    fsl = np.where(np.isfinite(norms), fsl, bvecs)
    np.savetxt(f"{stem}.bvec", fsl.T if rows else fsl, fmt="%.8f")
    np.savetxt(f"{stem}.bval", np.asarray(bvals, dtype=float)[np.newaxis], fmt="%g")
    return f"{stem}.bvec", f"{stem}.bval"


def write_sidecar(path, **fields) -> str:
    """Write a BIDS JSON sidecar."""
    with open(path, "w") as f:
        json.dump(fields, f)
    return os.fspath(path)


def write_hdf5_series(path, data, *, volume_major: bool = False, nfdh5: bool = True) -> str:
    """Write (X, Y, Z, N) ``data`` as ``/0/dataobj``; v2 layout (N, X, Y, Z) if asked."""
    with h5py.File(path, "w") as f:
        if nfdh5:
            f.attrs["Format"] = "NFDH5"
            f.attrs["Version"] = np.uint16(2 if volume_major else 1)
            f.create_group("0").attrs["Type"] = "base dataset"
            f["0"].create_dataset("affine", data=phantom.phantom_affine(data.shape[:3]))
        if volume_major:
            volumes = np.ascontiguousarray(np.moveaxis(data, -1, 0))
            dset = f.create_dataset("/0/dataobj", data=volumes)
            dset.attrs["volume_axis"] = 0
        else:
            f.create_dataset("/0/dataobj", data=data, chunks=(*data.shape[:3], 1))
    return os.fspath(path)


def reference_data(path, kind: str) -> np.ndarray:
    """The whole file read by its own library, in logical (X, Y, Z, N) layout."""
    path = os.fspath(path)
    if kind in ("nii", "nii.gz"):
        return np.asanyarray(nb.load(path).dataobj)
    if kind in ("h5v1", "h5v2"):
        with h5py.File(path, "r") as f:
            data = f["/0/dataobj"][()]
            return np.moveaxis(data, 0, -1) if kind == "h5v2" else data
    if kind in ("npyC", "npyF"):
        return np.load(path)
    raise ValueError(kind)


def open_kind(path, kind: str, cache: Cache) -> VolumeSource:
    """The nidask source class for ``kind`` on ``path``."""
    if kind == "nii":
        return NiftiSource(path)
    if kind == "nii.gz":
        return GzipNiftiSource(path, cache.new_path(".nii", stem="decompressed"))
    if kind in ("h5v1", "h5v2"):
        return HDF5Source(path, "/0/dataobj")
    return NpySource(path)


def record_reads(monkeypatch, cls) -> list[tuple[int, int]]:
    """Record the (start, stop) file volumes of every ``cls.read`` call from now on."""
    reads = []
    original = cls.read

    def read(self, index):
        reads.append(index[3].indices(self.shape[3])[:2])
        return original(self, index)

    monkeypatch.setattr(cls, "read", read)
    return reads


def graph_sources(collection) -> list[VolumeSource]:
    """Every file source referenced by a dask collection's graph (selections unwrapped)."""
    found: dict[int, VolumeSource] = {}

    class Finder(pickle.Pickler):
        def persistent_id(self, obj):
            if isinstance(obj, VolumeSource) and not isinstance(obj, VolumeSelection):
                found[id(obj)] = obj
            return None

    Finder(io.BytesIO()).dump(dict(collection.__dask_graph__()))
    return list(found.values())


# -- session data -----------------------------------------------------------------------
@pytest.fixture(scope="session")
def session_data(tmp_path_factory):
    """Directory holding every session-scoped input file (checked unchanged by tests)."""
    return tmp_path_factory.mktemp("inputs")


@pytest.fixture(autouse=True)
def _session_inputs_unchanged(request):
    """Fail any test after which the session inputs differ from before it."""
    if "session_data" not in request.fixturenames:
        yield
        return
    root = request.getfixturevalue("session_data")
    before = checksum_tree(root)
    yield
    assert checksum_tree(root) == before, "session input files were modified"


@pytest.fixture
def inputs_unchanged():
    """Call with a directory: its files must be byte-identical at the end of the test."""
    watched = []

    def watch(path):
        watched.append((os.fspath(path), checksum_tree(path)))
        return path

    yield watch
    for path, before in watched:
        assert checksum_tree(path) == before, f"input files under {path} were modified"


@pytest.fixture(scope="session")
def dwi_phantom(session_data):
    """Small DWI phantom (.nii, int16): 2 b=0 then 8 directions, bvec/bval and mask."""
    directory = session_data / "dwi"
    directory.mkdir()
    return phantom.make_dwi(directory, shape3d=SHAPE3D, n_b0=N_B0, n_directions=N_DIRECTIONS)


@pytest.fixture(scope="session")
def dwi_gz_phantom(session_data):
    """The same DWI phantom written as .nii.gz."""
    directory = session_data / "dwi_gz"
    directory.mkdir()
    return phantom.make_dwi(
        directory, shape3d=SHAPE3D, n_b0=N_B0, n_directions=N_DIRECTIONS, compressed=True
    )


@pytest.fixture(scope="session")
def pet_phantom(session_data):
    """Small PET phantom (.nii, float32) with a BIDS sidecar and mask."""
    directory = session_data / "pet"
    directory.mkdir()
    return phantom.make_pet(directory, shape3d=SHAPE3D, n_frames=N_FRAMES)


@pytest.fixture(scope="session")
def source_files(session_data, dwi_phantom, dwi_gz_phantom) -> dict[str, str]:
    """One file of every source kind; all hold the DWI phantom's 10 volumes."""
    data = np.asanyarray(nb.load(dwi_phantom.image).dataobj)
    directory = session_data / "sources"
    directory.mkdir()
    half = (data.astype(np.float32) * 0.5).astype(np.float32)
    files = {
        "nii": dwi_phantom.image,
        "nii.gz": dwi_gz_phantom.image,
        "h5v1": write_hdf5_series(directory / "v1.h5", half),
        "h5v2": write_hdf5_series(directory / "v2.h5", half, volume_major=True),
        "npyC": os.fspath(directory / "c.npy"),
        "npyF": os.fspath(directory / "f.npy"),
    }
    np.save(files["npyC"], np.ascontiguousarray(data))
    np.save(files["npyF"], np.asfortranarray(data))
    return files


# -- schedulers -------------------------------------------------------------------------
@pytest.fixture(scope="session")
def process_pool():
    """A spawn-based process pool for ``scheduler="processes"`` (started once)."""
    pool = concurrent.futures.ProcessPoolExecutor(
        2, mp_context=multiprocessing.get_context("spawn")
    )
    yield pool
    pool.shutdown(wait=True, cancel_futures=True)


@pytest.fixture(scope="session")
def local_cluster():
    """A ``distributed.Client`` on nidask's 2-worker process-based LocalCluster.

    The client is *not* the default scheduler (so other tests keep the threaded
    one): compute with ``client.compute(x).result()`` or ``scheduler=client``.
    """
    from distributed import Client

    from nidask.cluster import local_cluster as start_local_cluster

    cluster = start_local_cluster(2, dashboard_address=None)
    client = Client(cluster, set_as_default=False)
    yield client
    client.close()
    cluster.close()


@pytest.fixture
def compute_on(process_pool, request):
    """``compute_on(name, *collections)`` on "threads", "processes" or "distributed"."""

    def run(name, *collections):
        if name == "threads":
            return dask.compute(*collections, scheduler="threads")
        if name == "processes":
            return dask.compute(*collections, scheduler="processes", pool=process_pool)
        if name == "distributed":
            client = request.getfixturevalue("local_cluster")
            return tuple(client.compute(list(collections), sync=True))
        raise ValueError(name)

    return run


@pytest.fixture
def cache(tmp_path):
    """An owned cache under ``tmp_path``, closed after the test."""
    owned = Cache(tmp_path / "cache")
    yield owned
    owned.close()
