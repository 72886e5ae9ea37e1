"""Streaming NIfTI writer (``.nii`` and ``.nii.gz``).

The header goes first, then whole-volume blocks in order.  For ``.nii`` the file
is pre-sized and each task writes its block at its own offset (in parallel, on any
scheduler).  For ``.nii.gz`` each task compresses its block into a separate gzip
member beside the output; the members are then concatenated in order after the
header's member.  A multi-member gzip stream decompresses to exactly the bytes of
a single-member one (RFC 1952), which zlib, Python's :mod:`gzip`, nibabel and
``indexed_gzip`` all read.
"""

from __future__ import annotations

import io
import math
import os
import shutil

import dask.array as da
import nibabel as nb
import numpy as np

from nidask.io import deflate
from nidask.io.cache import atomic_output, final_name
from nidask.io.files import presize
from nidask.io.store import check_whole_volumes, store, store_volumes, write_blocks

HEADER_BYTES = 352
COMPRESS_STEP = 8 * 2**20


def is_gzip_name(filename) -> bool:
    """Whether ``filename`` asks for gzip compression (``.gz`` suffix)."""
    return os.fspath(filename).lower().endswith(".gz")


def make_header(shape, dtype, affine, template=None) -> nb.Nifti1Header:
    """A NIfTI-1 header for data of ``shape``/``dtype`` on ``affine``.

    Fields of ``template`` (a source header) that stay meaningful are kept:
    description, intent, slice timing, TR and time units, q/s-form codes.  Data
    scaling is reset (data are written as they are) and extensions are dropped.
    """
    header = nb.Nifti1Header()
    if template is not None:
        source = nb.Nifti1Header.from_header(template)
        for field in ("descrip", "intent_code", "intent_name", "slice_code", "slice_duration"):
            header[field] = source[field]
        header.set_dim_info(*source.get_dim_info())
        if len(shape) > 3 and len(source.get_zooms()) > 3:
            header["pixdim"][4] = source["pixdim"][4]
        time_units = source.get_xyzt_units()[1]
        qcode, scode = int(source["qform_code"]) or 1, int(source["sform_code"]) or 1
    else:
        time_units, qcode, scode = "sec", 1, 1
    header.set_data_shape(shape)
    header.set_data_dtype(dtype)
    header.set_qform(affine, code=qcode)
    header.set_sform(affine, code=scode)
    header.set_xyzt_units("mm", time_units if time_units != "unknown" else "sec")
    header["scl_slope"], header["scl_inter"] = 1.0, 0.0
    header.set_data_offset(HEADER_BYTES)
    header.extensions.clear()
    return header


def header_bytes(header: nb.Nifti1Header) -> bytes:
    """The header block as written in a single-file ``.nii`` (352 bytes)."""
    buffer = io.BytesIO()
    header.write_to(buffer)
    data = buffer.getvalue()
    return data + b"\0" * (HEADER_BYTES - len(data))


class GzipMemberTarget:
    """A ``da.store`` target writing each block as its own gzip member file.

    Members are named by their first volume so the order is known; a retried task
    replaces its member atomically.
    """

    def __init__(self, directory: str, shape, dtype):
        self.directory = directory
        self.shape = tuple(shape)
        self.dtype = np.dtype(dtype)

    def member_path(self, start: int) -> str:
        return os.path.join(self.directory, f"{start:09d}.gz")

    def __setitem__(self, key, value) -> None:
        start = check_whole_volumes(key, self.shape[:3]).indices(self.shape[3])[0]
        block = np.asfortranarray(value, dtype=self.dtype)
        raw = memoryview(block.T.data).cast("B") if block.size else memoryview(b"")
        final = self.member_path(start)
        partial = final + ".part"
        compressor = deflate.compressobj()
        with open(partial, "wb") as f:
            for offset in range(0, raw.nbytes, COMPRESS_STEP):
                f.write(compressor.compress(raw[offset : offset + COMPRESS_STEP]))
            f.write(compressor.flush())
        os.replace(partial, final)

    def members(self) -> list[str]:
        return sorted(
            os.path.join(self.directory, name)
            for name in os.listdir(self.directory)
            if name.endswith(".gz")
        )


def write_nifti_file(
    array: da.Array, path: str, header: nb.Nifti1Header, *, compressed: bool, progress=None
) -> None:
    """Stream ``array`` (X, Y, Z, N) under ``header`` into ``path`` (not atomic).

    Use :func:`write_nifti` for an atomic write to a user-named file.
    """
    dtype = header.get_data_dtype()
    head = header_bytes(header)
    if not compressed:
        with open(path, "wb") as f:
            f.write(head)
        presize(path, HEADER_BYTES + math.prod(array.shape) * dtype.itemsize)
        label = f"writing {final_name(path)}"
        store_volumes(array, path, HEADER_BYTES, dtype, label=label, progress=progress)
        return
    members = path + ".members"
    os.mkdir(members)
    try:
        target = GzipMemberTarget(members, array.shape, dtype)
        label = f"compressing {final_name(path)}"
        store(write_blocks(array), target, label=label, progress=progress)
        with open(path, "wb") as out:
            out.write(deflate.compress(head))
            for member in target.members():
                with open(member, "rb") as part:
                    shutil.copyfileobj(part, out, 16 * 2**20)
    finally:
        shutil.rmtree(members, ignore_errors=True)


def write_nifti(
    array: da.Array,
    filename,
    affine,
    *,
    header=None,
    dtype=None,
    inputs=(),
    progress=None,
) -> None:
    """Write ``array`` as a NIfTI-1 file, streamed and atomic.

    Parameters
    ----------
    array : dask.array.Array
        (X, Y, Z, N) data (3D arrays are written as 3D images).
    filename : path-like
        ``.nii`` or ``.nii.gz``.
    affine : ndarray (4, 4)
        Stored as both qform and sform.
    header : nibabel header, optional
        Template for the fields worth keeping (see :func:`make_header`).
    dtype : dtype, optional
        On-disk dtype (default: the array's).
    inputs : sequence of path-like
        Files the output must not replace.
    """
    dtype = np.dtype(dtype or array.dtype)
    shape = array.shape
    head = make_header(shape, dtype, affine, header)
    data = array if array.ndim == 4 else array[..., np.newaxis]
    with atomic_output(filename, inputs) as temp:
        write_nifti_file(
            data.astype(dtype), temp, head, compressed=is_gzip_name(filename), progress=progress
        )
