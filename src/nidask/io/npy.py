"""The ``.npy`` files nidask keeps its arrays in: headers, offsets, partial reads and writes.

Three layouts are used: a volume-contiguous series (X, Y, Z, N) in Fortran order
(each volume one block), a voxel-major matrix (n_voxels, N) in C order (each voxel's
values one block) and a column-major matrix (n_voxels, k) in Fortran order (each
column, e.g. one fold's prediction, one block).  :class:`NpyFile` reads the
header once and turns indices into byte ranges, so tasks read and write exactly
the bytes they need by path.
"""

from __future__ import annotations

import math
import os

import attrs
import numpy as np

from nidask.errors import InputError
from nidask.io.files import presize, pwrite_all


def read_npy_header(path: str) -> tuple[tuple[int, ...], bool, np.dtype, int]:
    """(shape, fortran_order, dtype, data offset) of a ``.npy`` file, header only."""
    try:
        with open(path, "rb") as f:
            version = np.lib.format.read_magic(f)
            reader = (
                np.lib.format.read_array_header_1_0
                if version == (1, 0)
                else np.lib.format.read_array_header_2_0
            )
            shape, fortran, dtype = reader(f)
            offset = f.tell()
    except (ValueError, OSError, SyntaxError) as exc:
        raise InputError(f"not a valid .npy file ({exc})", path) from exc
    return shape, fortran, dtype, offset


@attrs.frozen
class NpyFile:
    """A ``.npy`` file's layout: ``shape``, ``fortran`` order, ``dtype``, data ``offset``."""

    path: str
    shape: tuple[int, ...]
    fortran: bool
    dtype: np.dtype
    offset: int

    @classmethod
    def open(cls, path) -> NpyFile:
        """Read the header of ``path``."""
        path = os.fspath(path)
        return cls(path, *read_npy_header(path))

    @classmethod
    def create(cls, path, shape, dtype, *, fortran_order: bool) -> NpyFile:
        """A pre-sized file (header written, data unwritten) at ``path``."""
        path, dtype = os.fspath(path), np.dtype(dtype)
        shape = tuple(int(s) for s in shape)
        header = {"descr": np.lib.format.dtype_to_descr(dtype), "fortran_order": fortran_order}
        header["shape"] = shape
        with open(path, "wb") as f:
            np.lib.format.write_array_header_2_0(f, header)
            offset = f.tell()
        presize(path, offset + math.prod(shape) * dtype.itemsize)
        return cls(path, shape, fortran_order, dtype, offset)

    @property
    def block(self) -> int:
        """Elements in one contiguous block: a row (C order) or a column/volume (Fortran)."""
        return math.prod(self.shape[:-1]) if self.fortran else math.prod(self.shape[1:])

    def byte(self, block: int, start: int = 0) -> int:
        """Byte offset of element ``start`` of contiguous block ``block``."""
        return self.offset + (block * self.block + start) * self.dtype.itemsize

    def read(self, first: int, count: int = 1) -> np.ndarray:
        """``count`` consecutive blocks from ``first``, flat (one ``pread``)."""
        nbytes = count * self.block * self.dtype.itemsize
        with open(self.path, "rb") as f:
            raw = os.pread(f.fileno(), nbytes, self.byte(first))
        if len(raw) != nbytes:
            raise InputError("file is shorter than its header declares", self.path)
        return np.frombuffer(raw, dtype=self.dtype)

    def read_blocks(self, blocks) -> np.ndarray:
        """The given blocks (e.g. scattered rows of a C-ordered array), under one open."""
        out = np.empty((len(blocks), self.block), dtype=self.dtype)
        with open(self.path, "rb") as f:
            for row, block in zip(out, blocks, strict=True):
                self._read_into(f, self.byte(int(block)), row)
        return out

    def read_rows(self, start: int, stop: int) -> np.ndarray:
        """Rows ``start:stop`` of a C-ordered array (blocks are rows)."""
        return self.read(start, stop - start).reshape((stop - start, *self.shape[1:]))

    def read_column(self, column: int) -> np.ndarray:
        """Column ``column`` of a Fortran-ordered 2D array."""
        return self.read(column)

    def read_volume(self, index: int) -> np.ndarray:
        """Volume ``index`` of a volume-contiguous (X, Y, Z, N) series, as float32."""
        if not self.fortran:
            raise InputError("expected a Fortran-ordered (volume-contiguous) array", self.path)
        return self.read(index).reshape(self.shape[:3], order="F").astype(np.float32)

    def read_span(self, block: int, start: int, stop: int, out: np.ndarray) -> None:
        """Elements ``start:stop`` of one block into ``out`` (one ``pread``)."""
        with open(self.path, "rb") as f:
            self._read_into(f, self.byte(block, start), out)

    def _read_into(self, f, offset: int, out: np.ndarray) -> None:
        """Fill ``out`` from byte ``offset`` of the open file ``f``."""
        f.seek(offset)
        if f.readinto(memoryview(out).cast("B")) != out.nbytes:
            raise InputError("file is shorter than its header declares", self.path)

    def write(self, values: np.ndarray, block: int, start: int = 0) -> None:
        """Write ``values`` (in this file's dtype) from element ``start`` of ``block`` on."""
        data = np.ascontiguousarray(values, dtype=self.dtype)
        fd = os.open(self.path, os.O_WRONLY)
        try:
            pwrite_all(fd, data.data, self.byte(block, start))
        finally:
            os.close(fd)


def open_memmap(path: str, mode: str = "r") -> np.memmap:
    """Open a ``.npy`` file as an ``np.memmap`` (a true ndarray)."""
    return np.load(path, mmap_mode=mode)


def write_vector(path: str, values: np.ndarray) -> str:
    """Save a (n,) float32 vector as a C-ordered (n, 1) ``.npy`` (rows readable by range)."""
    with open(path, "wb") as f:  # a file object: np.save would append ".npy" to a name
        np.save(f, np.asarray(values, dtype=np.float32).reshape(-1, 1))
    return path
