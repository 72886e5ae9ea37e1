"""Write dask arrays to files chunk by chunk, from any scheduler.

Targets are path-based: each task reopens the file and writes its own block at a
known offset, so writes land in the real file on threads, processes and
distributed workers alike (a pickled ``np.memmap`` would write into a copy), and
no mapping of the whole output is ever held (mapped pages count as resident
memory).  Blocks cover whole volumes, so in a Fortran-ordered file each block is
one contiguous byte range.
"""

from __future__ import annotations

import errno
import fcntl
import math
import os

import dask
import dask.array as da
import h5py
import numpy as np

from nidask.config import chunk_bytes
from nidask.errors import InputError
from nidask.io.files import pwrite_all
from nidask.io.npy import NpyFile
from nidask.io.sources import COPY_BLOCK, rechunk_volumes, source_of, volume_runs
from nidask.progress import compute

#: copy_file_range cannot serve these file pairs; fall back to pread/pwrite
_NO_KERNEL_COPY = {errno.EXDEV, errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP, errno.EBADF}


def check_whole_volumes(key: tuple, shape3d: tuple[int, ...]) -> slice:
    for axis, (index, size) in enumerate(zip(key[:3], shape3d, strict=True)):
        start, stop, step = index.indices(size)
        if (start, stop, step) != (0, size, 1):
            raise ValueError(f"blocks must cover whole volumes (axis {axis} is {index})")
    return key[3]


class VolumeFileTarget:
    """A ``da.store`` target: (X, Y, Z, N) data in Fortran order at ``offset`` of a file.

    Parameters
    ----------
    path : str
        An existing file, already sized (see :func:`presize`).
    offset : int
        Byte offset of the first voxel.
    shape : tuple of int
        Logical (X, Y, Z, N) shape.
    dtype : dtype
        On-disk dtype; blocks are cast to it (``byteorder`` included).
    """

    def __init__(self, path: str, offset: int, shape: tuple[int, ...], dtype):
        self.path = os.fspath(path)
        self.offset = int(offset)
        self.shape = tuple(shape)
        self.dtype = np.dtype(dtype)
        self.volume_bytes = math.prod(self.shape[:3]) * self.dtype.itemsize

    def __setitem__(self, key, value) -> None:
        volumes = check_whole_volumes(key, self.shape[:3])
        start = volumes.indices(self.shape[3])[0]
        block = np.asfortranarray(value, dtype=self.dtype)
        fd = os.open(self.path, os.O_WRONLY)
        try:
            pwrite_all(fd, block.T.data, self.offset + start * self.volume_bytes)
        finally:
            os.close(fd)

    def __repr__(self) -> str:
        return f"VolumeFileTarget({self.path!r}, offset={self.offset}, shape={self.shape})"


class HDF5Target:
    """A ``da.store`` target: one HDF5 dataset, reopened (under a file lock) per block.

    HDF5 files must not be written by two processes at once; an ``flock`` on the
    file itself serialises writers across threads, processes and workers of a host.
    """

    def __init__(self, path: str, key: str):
        self.path = os.fspath(path)
        self.key = key

    def __setitem__(self, key, value) -> None:
        value = np.asarray(value)
        with open(self.path, "rb") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            with h5py.File(self.path, "r+", locking=False) as f:
                dset = f[self.key]
                per_volume = (
                    isinstance(key, tuple)
                    and len(key) == dset.ndim == value.ndim
                    and isinstance(key[-1], slice)
                )
                if not per_volume:
                    dset[key] = value
                    return
                # one write per volume (last axis): HDF5 copies a volume into its chunk
                # in one piece, but gathers a block of volumes element by element
                positions = range(*key[-1].indices(dset.shape[-1]))
                for j, position in enumerate(positions):
                    dset[(*key[:-1], position)] = value[..., j]

    def __repr__(self) -> str:
        return f"HDF5Target({self.path!r}, {self.key!r})"


def write_blocks(array: da.Array) -> da.Array:
    """``array`` in blocks of at most a quarter of the chunk budget, for buffering writers.

    A chunk is the unit of reading, sized to the budget; every task that holds more
    than its input keeps its working set within half the budget.  HDF5 conversions
    and gzip output can be as large as the block they come from, so these writers
    take quarter-budget blocks (resampling sizes its own, see
    :func:`nidask.ops.resample.volumes_per_task`).  A file-backed array is read in the
    smaller blocks directly (see :func:`nidask.io.sources.rechunk_volumes`).
    """
    volume_bytes = math.prod(array.shape[:3]) * array.dtype.itemsize
    return rechunk_volumes(array, max(1, chunk_bytes() // 4 // max(volume_bytes, 1)))


def store(array: da.Array, target, *, label: str = "writing", progress=None, along=()) -> tuple:
    """Compute ``array`` block by block into ``target`` on the current scheduler.

    Collections in ``along`` are computed in the same pass; their results are returned.
    """
    stored = da.store(array, target, lock=False, compute=False)
    return compute(stored, *along, label=label, progress=progress)[1:]


def copy_range(src: int, dst: int, src_offset: int, dst_offset: int, count: int) -> None:
    """Copy ``count`` bytes between two files at given offsets, in the kernel if it can."""
    kernel = hasattr(os, "copy_file_range")
    while count:
        if kernel:
            try:
                done = os.copy_file_range(src, dst, count, src_offset, dst_offset)
            except OSError as exc:
                if exc.errno not in _NO_KERNEL_COPY:
                    raise
                kernel = False
                continue
        else:
            buffer = os.pread(src, min(count, COPY_BLOCK), src_offset)
            pwrite_all(dst, buffer, dst_offset)
            done = len(buffer)
        if done == 0:
            raise InputError("file ends before the data its header declares")
        src_offset, dst_offset, count = src_offset + done, dst_offset + done, count - done


def copy_volumes(source, positions, path: str, offset: int) -> None:
    """Task: copy file volumes ``positions`` of a copyable ``source`` to ``path`` at ``offset``.

    The bytes never enter this process where the kernel supports
    ``copy_file_range`` (the file pages are copied within the page cache).
    """
    volume_bytes = math.prod(source.shape[:3]) * source.dtype.itemsize
    data_path, data_offset = source.locate()
    with open(data_path, "rb") as src, open(path, "r+b") as dst:
        for run in volume_runs(positions):
            start, count = data_offset + int(run[0]) * volume_bytes, len(run) * volume_bytes
            try:
                copy_range(src.fileno(), dst.fileno(), start, offset, count)
            except InputError as exc:
                raise InputError(exc.problem, source.path) from None
            offset += count


def store_volumes(
    array: da.Array,
    path: str,
    offset: int,
    dtype,
    *,
    label: str = "writing",
    progress=None,
    along=(),
) -> tuple:
    """Write ``array`` (X, Y, Z, N) in Fortran order at ``offset`` of a pre-sized file.

    An array read as is from a file that holds its volumes byte for byte (an
    unscaled ``.nii``, a Fortran-ordered ``.npy``, selections of their volumes) is
    copied file to file without reading it into memory; anything else is computed
    chunk by chunk through a :class:`VolumeFileTarget`.  Collections in ``along``
    are computed in the same pass; their results are returned.
    """
    dtype = np.dtype(dtype)
    source = source_of(array)
    if source is not None and source.dtype == dtype == array.dtype and source.copyable():
        positions = source.file_volumes()
        volume_bytes = math.prod(array.shape[:3]) * dtype.itemsize
        bounds = np.cumsum((0, *array.chunks[3]))
        tasks = [
            dask.delayed(copy_volumes, pure=False)(
                source, positions[a:b], path, offset + int(a) * volume_bytes
            )
            for a, b in zip(bounds[:-1], bounds[1:], strict=True)
        ]
        return compute(*tasks, *along, label=label, progress=progress)[len(tasks) :]
    target = VolumeFileTarget(path, offset, array.shape, dtype)
    return store(array, target, label=label, progress=progress, along=along)


def write_npy(array: da.Array, path: str, *, dtype=None, progress=None, along=()) -> tuple:
    """Write ``array`` (X, Y, Z, N) as a Fortran-ordered ``.npy`` file at ``path``.

    Each volume is one contiguous block of the file, so a volume read from the
    result touches only its own pages.  Collections in ``along`` are computed in
    the same pass; their results are returned.
    """
    dtype = np.dtype(dtype or array.dtype)
    offset = NpyFile.create(path, array.shape, dtype, fortran_order=True).offset
    return store_volumes(array, path, offset, dtype, progress=progress, along=along)


__all__ = [
    "HDF5Target",
    "VolumeFileTarget",
    "copy_range",
    "copy_volumes",
    "store",
    "store_volumes",
    "write_blocks",
    "write_npy",
]
