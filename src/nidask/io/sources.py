"""Picklable, path-holding array sources that become dask arrays.

A source is a small recipe: a path (plus an HDF5 key, or a cache path) and the
array's shape and dtype, read from headers only.  Each task opens the file, reads
the volumes it needs and closes it again, so graphs pickle small, run on process
workers, and never hold a whole series in memory.  Sources tokenize from
(path, size, mtime, key): a file changed on disk gets new dask keys.

Every source presents the logical layout (X, Y, Z, N); 3D files appear as N = 1.
"""

from __future__ import annotations

import contextlib
import fcntl
import math
import operator
import os
import shutil
import weakref

import dask.array as da
import h5py
import nibabel as nb
import numpy as np
from dask.base import tokenize
from nibabel.filebasedimages import ImageFileError
from nibabel.spatialimages import HeaderDataError, HeaderTypeError, ImageDataError

from nidask.config import volume_chunks, volumes_per_chunk
from nidask.errors import InputError
from nidask.geometry import check_affine
from nidask.io import deflate
from nidask.io.files import check_readable  # noqa: F401  (re-exported)
from nidask.io.npy import read_npy_header

COPY_BLOCK = 16 * 2**20
#: Most volumes a series may declare (a header claiming more is damaged or hostile).
MAX_VOLUMES = 2**20
#: What nibabel and the file system raise on a damaged file (reported as InputError).
FILE_ERRORS = (
    OSError,
    EOFError,
    ValueError,
    OverflowError,
    *deflate.ERRORS,
    ImageFileError,
    HeaderDataError,
    HeaderTypeError,
    ImageDataError,
)
#: Source behind each dask array that :meth:`VolumeSource.to_dask` made, by array name.
_ARRAYS: weakref.WeakValueDictionary[str, VolumeSource] = weakref.WeakValueDictionary()


#: File name endings of the formats nidask reads and writes.
HDF5_SUFFIXES = (".h5", ".hdf5", ".hdf", ".nfdh5")
NIFTI_SUFFIXES = (".nii", ".nii.gz")


def is_hdf5(path) -> bool:
    """Whether ``path`` is an existing HDF5 file (by content, whatever its name)."""
    try:
        return os.path.isfile(path) and h5py.is_hdf5(path)
    except OSError:
        return False


def volume_runs(positions) -> list[np.ndarray]:
    """Split volume positions into runs of consecutive positions.

    >>> [run.tolist() for run in volume_runs([4, 5, 6, 1, 2, 9])]
    [[4, 5, 6], [1, 2], [9]]
    """
    positions = np.asarray(positions, dtype=np.intp).reshape(-1)
    return np.split(positions, np.flatnonzero(np.diff(positions) != 1) + 1)


def _normalize_index(index, ndim: int) -> tuple:
    if not isinstance(index, tuple):
        index = (index,)
    if any(i is Ellipsis for i in index):
        at = index.index(Ellipsis)
        fill = (slice(None),) * (ndim - len(index) + 1)
        index = index[:at] + fill + index[at + 1 :]
    return index + (slice(None),) * (ndim - len(index))


def _covering(index, size: int) -> tuple[slice, object]:
    """A unit-step slice covering ``index`` along one axis, and what to take from it.

    >>> _covering(slice(2, 9, 3), 10)
    (slice(2, 9, None), array([0, 3, 6]))
    >>> _covering(4, 10)
    (slice(4, 5, None), 0)
    """
    if isinstance(index, slice):
        start, stop, step = index.indices(size)
        if step == 1:
            return slice(start, max(start, stop)), slice(None)
    positions = np.arange(size)[index]
    if positions.ndim == 0:
        return slice(int(positions), int(positions) + 1), 0
    if positions.size == 0:
        return slice(0, 0), slice(None)
    low = int(positions.min())
    return slice(low, int(positions.max()) + 1), positions - low


class VolumeSource:
    """Base class of sources: a 4D (X, Y, Z, N) array stored in one file.

    Subclasses set ``shape`` and ``dtype`` from headers and implement
    :meth:`read`, which receives a tuple of four slices in logical order.
    """

    ndim = 4
    label = "volumes"

    def __init__(self, path: str | os.PathLike, key: str | None = None):
        self.path = check_readable(path)
        self.key = key
        stat = os.stat(self.path)
        self._stamp = (stat.st_size, stat.st_mtime_ns)
        self.shape: tuple[int, int, int, int] = (0, 0, 0, 0)
        self.dtype = np.dtype("float32")

    def __dask_tokenize__(self):
        return (type(self).__name__, self.path, self.key, *self._stamp)

    def __getitem__(self, index) -> np.ndarray:
        """Numpy-style basic and integer-array indexing (one axis at a time).

        dask fuses slices of a chunk into this call, so ``x[..., 3]`` reads one
        volume, not the whole chunk.  Each axis is read as the unit-step range that
        covers its index, then narrowed in memory.
        """
        index = _normalize_index(index, 4)
        if len(index) != 4:
            raise IndexError(f"too many indices for a 4D source: {index!r}")
        covering, narrowing = zip(
            *(_covering(i, size) for i, size in zip(index, self.shape, strict=True)), strict=True
        )
        if any(s.start == s.stop for s in covering):
            data = np.empty([s.stop - s.start for s in covering], dtype=self.dtype)
        else:
            try:
                data = np.asarray(self.read(covering), dtype=self.dtype)
            except InputError:
                raise
            except FILE_ERRORS as exc:
                raise InputError(f"cannot read data: {exc}", self.path) from exc
        for axis in reversed(range(4)):  # integers drop their axis: go from the last
            if not (isinstance(narrowing[axis], slice) and narrowing[axis] == slice(None)):
                data = data[(slice(None),) * axis + (narrowing[axis],)]
        return data

    def read(self, index: tuple[slice, slice, slice, slice]) -> np.ndarray:
        raise NotImplementedError

    def copyable(self) -> bool:
        """Whether the file holds the volumes byte for byte as this array does.

        That is: in this dtype (native byte order, unscaled), each volume one
        contiguous Fortran-ordered block, so a sink may copy the bytes in the kernel
        (see :func:`nidask.io.store.copy_volumes`) instead of reading them into memory.
        """
        return False

    def locate(self) -> tuple[str, int]:
        """(file, byte offset of volume 0) of a :meth:`copyable` source; call in tasks."""
        raise NotImplementedError

    def file_volumes(self) -> np.ndarray:
        """Volume of the file behind each volume of this array."""
        return np.arange(self.shape[3])

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize

    def _set_shape(self, shape, allow_3d: bool = True) -> None:
        shape = tuple(int(s) for s in shape)
        if len(shape) == 3 and allow_3d:
            shape = shape + (1,)
        if len(shape) == 5 and shape[3] == 1:
            raise InputError(f"5D image with shape {shape} is not supported", self.path)
        if len(shape) != 4:
            raise InputError(f"expected a 4D series, got shape {shape}", self.path)
        if min(shape) < 1:
            raise InputError(f"empty series, shape {shape}", self.path)
        if shape[3] > MAX_VOLUMES:
            # opening costs memory per volume (chunks, original_index): refuse absurd counts
            raise InputError(
                f"{shape[3]} volumes declared, more than the {MAX_VOLUMES} supported", self.path
            )
        self.shape = shape

    def to_dask(self, per_chunk: int | None = None) -> da.Array:
        """A dask array over the whole file with whole-volume chunks.

        Parameters
        ----------
        per_chunk : int, optional
            Volumes per chunk; default from ``nidask.chunk-size``.
        """
        if per_chunk is None:
            per_chunk = volumes_per_chunk(self.shape[:3], self.dtype)
        chunks = tuple((s,) for s in self.shape[:3]) + (volume_chunks(self.shape[3], per_chunk),)
        name = f"nidask-{self.label}-{tokenize(self, chunks)}"
        _ARRAYS[name] = self
        return da.from_array(
            self,
            chunks=chunks,
            name=name,
            asarray=False,
            fancy=True,  # with fancy=False dask 2026.8 fuses no slice into the read
            lock=False,
            inline_array=True,
            meta=np.empty((0, 0, 0, 0), dtype=self.dtype),
        )

    def __repr__(self) -> str:
        key = f", key={self.key!r}" if self.key else ""
        return f"{type(self).__name__}({self.path!r}{key}, shape={self.shape}, dtype={self.dtype})"


def source_of(array: da.Array) -> VolumeSource | None:
    """The source whose :meth:`~VolumeSource.to_dask` made ``array`` (else ``None``).

    The source travels inside the array's graph (its tasks hold it), so an array
    unpickled in another process is recognised too: the source found in a task is
    accepted when the array's name is the one :meth:`~VolumeSource.to_dask` gives
    that source and those chunks.
    """
    if not isinstance(array, da.Array) or not array.name.startswith("nidask-"):
        return None
    known = _ARRAYS.get(array.name)
    if known is not None:
        return known
    graph = array.__dask_graph__()
    key = (array.name,) + (0,) * array.ndim
    task = graph.get(key) if hasattr(graph, "get") else None
    for argument in getattr(task, "args", ()):
        source = getattr(argument, "value", argument)
        if isinstance(source, VolumeSource):
            if array.name == f"nidask-{source.label}-{tokenize(source, array.chunks)}":
                _ARRAYS[array.name] = source
                return source
    return None


def rechunk_volumes(data: da.Array, per_chunk: int) -> da.Array:
    """``data`` with at most ``per_chunk`` volumes per chunk.

    An array opened from a file is opened again with smaller chunks, so each new
    chunk reads only its own volumes; any other array is split with ``rechunk``.
    """
    if max(data.chunks[3], default=0) <= per_chunk:
        return data
    source = source_of(data)
    if source is not None:
        return source.to_dask(per_chunk=per_chunk)
    return data.rechunk({3: per_chunk})


class VolumeSelection(VolumeSource):
    """Some volumes of another source, in any order: a view that copies nothing.

    Each read fetches runs of consecutive file volumes from the underlying source,
    so a selection's chunk (or a single volume of it) reads exactly its volumes.
    A selection of a selection selects from the underlying source directly.

    Parameters
    ----------
    base : VolumeSource
        The source to select from.
    positions : array-like of int
        Volumes of ``base``, in the order they appear in the selection.
    """

    label = "selection"

    def __init__(self, base: VolumeSource, positions):
        positions = np.asarray(positions, dtype=np.intp).reshape(-1)
        if isinstance(base, VolumeSelection):
            base, positions = base.base, base.positions[positions]
        self.base, self.positions = base, positions
        self.path, self.key, self.dtype = base.path, base.key, base.dtype
        self.shape = (*base.shape[:3], len(positions))

    def __dask_tokenize__(self):
        return (type(self).__name__, self.base.__dask_tokenize__(), tokenize(self.positions))

    def read(self, index):
        wanted = self.positions[index[3]]
        parts = [
            self.base.read((*index[:3], slice(int(r[0]), int(r[-1]) + 1)))
            for r in volume_runs(wanted)
        ]
        return parts[0] if len(parts) == 1 else np.concatenate(parts, axis=3)

    def copyable(self) -> bool:
        return self.base.copyable()

    def locate(self) -> tuple[str, int]:
        return self.base.locate()

    def file_volumes(self) -> np.ndarray:
        return self.base.file_volumes()[self.positions]

    def __repr__(self) -> str:
        return f"VolumeSelection({self.base!r}, {len(self.positions)} volumes)"


def _load_nifti(path: str):
    try:
        img = nb.load(path, mmap=False, keep_file_open=False)
    except FILE_ERRORS as exc:
        raise InputError(f"not a readable NIfTI file ({exc})", path) from exc
    if not isinstance(img, nb.Nifti1Image | nb.Nifti2Image):
        raise InputError(f"not a NIfTI-1/2 image ({type(img).__name__})", path)
    return img


def nifti_scaling(img) -> tuple[float, float] | None:
    """(slope, inter) applied by the proxy, or ``None`` for unscaled data.

    nibabel moves the scaling onto the proxy when loading; the header then reads
    ``(None, None)``, so the proxy is the one to ask.
    """
    slope = getattr(img.dataobj, "slope", 1.0)
    inter = getattr(img.dataobj, "inter", 0.0)
    if slope is None or not np.isfinite(slope) or slope in (0.0, 1.0):
        slope = 1.0
    if inter is None or not np.isfinite(inter):
        inter = 0.0
    return None if (slope, inter) == (1.0, 0.0) else (float(slope), float(inter))


class NiftiSource(VolumeSource):
    """An uncompressed NIfTI file read through nibabel's array proxy.

    Scaled data are declared and returned as float32; unscaled data keep the
    on-disk dtype.
    """

    label = "nifti"

    def __init__(self, path: str | os.PathLike, data_path: str | None = None):
        super().__init__(path)
        img = _load_nifti(self.path)
        self._set_shape(img.shape)
        self.affine = check_affine(img.affine, self.path)
        self.header = img.header
        # like the scaling, nibabel moves vox_offset from the header to the proxy
        self.data_offset = int(img.dataobj.offset)
        if img.header["magic"] in (b"n+1", b"n+2"):
            minimum = type(img.header).single_vox_offset
            if self.data_offset < minimum:
                raise InputError(
                    f"vox_offset {self.data_offset} points into the header "
                    f"(at least {minimum} in a single-file NIfTI)",
                    self.path,
                )
        self.scaling = nifti_scaling(img)
        on_disk = img.get_data_dtype()
        if on_disk.kind == "c" or on_disk.fields is not None:
            # checked on the stored type: scaling would declare float32 and drop the rest
            raise InputError(f"unsupported NIfTI data type {on_disk}", self.path)
        self.dtype = np.dtype("float32") if self.scaling else on_disk.newbyteorder("=")
        self.data_path = data_path or self.path
        if data_path is None:
            self._check_size(self.path)

    def _check_size(self, data_path: str) -> None:
        expected = self.data_offset + math.prod(self.shape) * self.header.get_data_dtype().itemsize
        actual = os.path.getsize(data_path)
        if actual < expected:
            raise InputError(
                f"file is shorter than its header declares ({actual} < {expected} bytes)",
                self.path,
            )

    def __dask_tokenize__(self):
        return (*super().__dask_tokenize__(), self.data_path)

    def copyable(self) -> bool:
        single_file = self.header["magic"] in (b"n+1", b"n+2")  # not an .hdr/.img pair
        return single_file and self.scaling is None and self.header.get_data_dtype() == self.dtype

    def locate(self) -> tuple[str, int]:
        return self.data_path, self.data_offset

    def read(self, index):
        img = nb.load(self.data_path, mmap=False, keep_file_open=False)
        data = img.dataobj[index[:3] + (index[3],)] if img.ndim == 4 else img.dataobj[index[:3]]
        if img.ndim == 3:
            data = np.asarray(data)[..., np.newaxis][..., index[3]]
        return np.asarray(data).astype(self.dtype, copy=False)


class GzipNiftiSource(NiftiSource):
    """A ``.nii.gz`` file, decompressed once into an owned cache on first read.

    Reading volume k of a gzip stream decompresses every byte before it; doing it
    for each volume costs O(N^2).  The first task that needs data decompresses the
    file (under a file lock, so concurrent tasks and processes wait for it) into
    ``cache_path``; every later read is a plain NIfTI read.
    """

    label = "nifti-gz"

    def __init__(self, path: str | os.PathLike, cache_path: str):
        super().__init__(path, data_path=cache_path)

    def read(self, index):
        self.ensure_decompressed()
        return super().read(index)

    def locate(self) -> tuple[str, int]:
        self.ensure_decompressed()
        return super().locate()

    def _decompress(self) -> None:
        """Decompress the file into ``data_path`` through a ``.part`` file (under the lock)."""
        partial = self.data_path + ".part"
        try:
            with deflate.open_gzip(self.path) as src, open(partial, "wb") as dst:
                shutil.copyfileobj(src, dst, COPY_BLOCK)
            self._check_size(partial)
            os.replace(partial, self.data_path)
        except (*deflate.ERRORS, InputError) as exc:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(partial)
            if isinstance(exc, InputError):
                raise
            raise InputError(f"corrupt or truncated gzip data ({exc})", self.path) from exc

    def ensure_decompressed(self) -> str:
        """Decompress into the cache unless done already; return the cache path."""
        if os.path.exists(self.data_path):
            return self.data_path
        directory = os.path.dirname(self.data_path)
        if not os.path.isdir(directory):
            raise InputError("the dataset's cache was removed (dataset closed?)", self.path)
        lock_path = self.data_path + ".lock"
        with open(lock_path, "w") as lock:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX)
                if not os.path.exists(self.data_path):
                    self._decompress()
            finally:
                # every holder removes the lock's name before releasing it (not only the
                # one that decompressed), so none is left behind; a later arrival that
                # creates a new lock file finds the data already there
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(lock_path)
        return self.data_path


class HDF5Source(VolumeSource):
    """One HDF5 dataset, (X, Y, Z, N) or volume-major (N, X, Y, Z) with ``volume_axis=0``."""

    label = "hdf5"

    def __init__(self, path: str | os.PathLike, key: str, volume_axis: int | None = None):
        super().__init__(path, key=key)
        try:
            with h5py.File(self.path, "r", locking=False) as f:
                if key not in f:
                    raise InputError(f"HDF5 file has no dataset {key!r}", self.path)
                dset = f[key]
                if not isinstance(dset, h5py.Dataset):
                    raise InputError(f"{key!r} is not an HDF5 dataset", self.path)
                shape, dtype = dset.shape, dset.dtype
                if volume_axis is None:
                    volume_axis = dset.attrs.get("volume_axis", -1)
        except OSError as exc:
            raise InputError(f"not a readable HDF5 file ({exc})", self.path) from exc
        if dtype.kind not in "biuf":
            raise InputError(f"dataset {key!r} has unsupported dtype {dtype}", self.path)
        try:
            volume_axis = operator.index(np.asarray(volume_axis).item())
        except (TypeError, ValueError):
            problem = f"invalid volume_axis {volume_axis!r} for {key!r}"
            raise InputError(problem, self.path) from None
        self.dtype = np.dtype(dtype).newbyteorder("=")
        self.volume_major = volume_axis == 0 and len(shape) == 4
        if volume_axis not in (0, -1, len(shape) - 1):
            raise InputError(f"unsupported volume_axis={volume_axis} for {key!r}", self.path)
        if self.volume_major:
            shape = shape[1:] + shape[:1]
        self._set_shape(shape)
        self._ndim_on_disk = len(shape) if len(shape) == 4 and shape[3] != 1 else None

    def read(self, index):
        with h5py.File(self.path, "r", locking=False) as f:
            dset = f[self.key]
            if self.volume_major:
                data = dset[(index[3],) + index[:3]]
                return np.moveaxis(data, 0, -1)
            if dset.ndim == 3:
                return dset[index[:3]][..., np.newaxis][..., index[3]]
            return dset[index]


class NpySource(VolumeSource):
    """A ``.npy`` file, opened as a memmap inside each task and unmapped after."""

    label = "npy"

    def __init__(self, path: str | os.PathLike):
        super().__init__(path)
        shape, self.fortran_order, dtype, offset = read_npy_header(self.path)
        if dtype.hasobject or dtype.kind not in "biuf":
            raise InputError(f"unsupported .npy dtype {dtype}", self.path)
        self.dtype = np.dtype(dtype).newbyteorder("=") if dtype.byteorder != "|" else dtype
        self._set_shape(shape)
        self._contiguous_volumes = (self.fortran_order or len(shape) < 2) and dtype == self.dtype
        self.data_offset = offset
        expected = offset + math.prod(shape) * dtype.itemsize
        if os.path.getsize(self.path) < expected:
            raise InputError("file is shorter than its header declares", self.path)

    def copyable(self) -> bool:
        return self._contiguous_volumes

    def locate(self) -> tuple[str, int]:
        return self.path, self.data_offset

    def read(self, index):
        mm = np.load(self.path, mmap_mode="r")
        try:
            if mm.ndim == 3:
                return np.array(mm[index[:3]])[..., np.newaxis][..., index[3]]
            return np.array(mm[index])
        finally:
            mm._mmap.close()


def is_gzip(path: str) -> bool:
    """Whether ``path`` starts with the gzip magic bytes."""
    with open(path, "rb") as f:
        return f.read(2) == b"\x1f\x8b"


def open_source(path: str | os.PathLike, cache=None, key: str | None = None) -> VolumeSource:
    """The source for a NIfTI, ``.npy`` or HDF5 file, by extension.

    Parameters
    ----------
    path : path-like
        The file.
    cache : nidask.io.cache.Cache, optional
        Where a ``.nii.gz`` file gets decompressed (required for those).
    key : str, optional
        Dataset name inside an HDF5 file.
    """
    path = check_readable(path)
    lower = path.lower()
    if lower.endswith(HDF5_SUFFIXES) or key is not None:
        return HDF5Source(path, key or "/0/dataobj")
    if lower.endswith(".npy"):
        return NpySource(path)
    if lower.endswith((".nii", ".nii.gz", ".img", ".hdr")):
        if is_gzip(path):
            if cache is None:
                raise InputError("a cache is needed to read a gzip-compressed NIfTI", path)
            return GzipNiftiSource(path, cache.new_path(".nii", stem="decompressed"))
        return NiftiSource(path)
    raise InputError("unknown file type (expected .nii, .nii.gz, .h5 or .npy)", path)
