"""NFDH5, the nifreeze HDF5 container: lazy reading (v1 and v2), streamed writing.

Layout: file attributes ``Format="NFDH5"`` (PET: ``"EMC/PET"``) and
``Version=uint16(1)``; group ``/0`` with attribute ``Type`` (``"base dataset"``,
``"dmri"``, ``"pet"``, ...) and one dataset per field.  Version 1 stores
``dataobj`` as (X, Y, Z, N); version 2 as (N, X, Y, Z) with ``volume_axis=0``.
nidask writes version 1 with HDF5 chunks of whole volumes, so files stay readable
by nifreeze 0.1.0 while a volume read touches one chunk.  Fields nifreeze does not
know are stored with a leading underscore, which nifreeze skips.

This module knows the container only: fields in, fields out.  Which fields a
dataset type stores and how it is rebuilt from them are that type's hooks
(:meth:`nidask.BaseDataset.stored_fields`, :meth:`nidask.BaseDataset.from_stored`).
"""

from __future__ import annotations

from collections.abc import Callable, Collection
from dataclasses import dataclass

import dask.array as da
import h5py
import numpy as np

from nidask.errors import InputError
from nidask.io.cache import atomic_output
from nidask.io.files import reserve
from nidask.io.sources import HDF5Source, check_readable
from nidask.io.store import HDF5Target, store, write_blocks
from nidask.progress import compute

FORMATS = {"NFDH5", "EMC/PET"}
VERSIONS = {1, 2}
#: Largest metadata field read eagerly (a few volumes' worth is plenty).
MAX_FIELD_BYTES = 2**30


@dataclass
class StoredSeries:
    """What an NFDH5 file holds: its dataset ``kind`` (``Type``), data and fields.

    ``fields`` maps stored names (a leading underscore for private fields) to numpy
    arrays; 4D fields (volumes) are lazy dask arrays over the file.
    """

    path: str
    kind: str
    data: da.Array
    fields: dict


def _text(value) -> str | None:
    if value is None:
        return None
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    if isinstance(value, np.ndarray) and value.size == 1:
        return _text(value.item())
    return str(value)


def _read_field(path: str, dset) -> np.ndarray:
    if not isinstance(dset, h5py.Dataset):
        raise InputError(f"{dset.name} is not a dataset", path)
    if dset.size * dset.dtype.itemsize > MAX_FIELD_BYTES:
        raise InputError(f"field {dset.name} is implausibly large ({dset.shape})", path)
    if dset.dtype.kind not in "biuf":
        raise InputError(f"field {dset.name} has unsupported dtype {dset.dtype}", path)
    return dset[()]


def read_nfdh5(filename, stored_names: Callable[[str], Collection[str]]) -> StoredSeries:
    """Open an NFDH5 file: metadata fields read, volumes left on disk behind dask arrays.

    ``stored_names(kind)`` gives the stored names to read for a dataset ``Type``
    (others are ignored); it raises :class:`~nidask.errors.InputError` for a type
    it does not know.
    """
    path = check_readable(filename)
    try:
        handle = h5py.File(path, "r", locking=False)
    except OSError as exc:
        raise InputError(f"not a readable HDF5 file ({exc})", path) from exc
    with handle as f:
        fmt = _text(f.attrs.get("Format"))
        if fmt not in FORMATS:
            raise InputError(f"unknown Format {fmt!r} (expected 'NFDH5')", path)
        try:
            version = int(np.asarray(f.attrs.get("Version")).item())
        except (TypeError, ValueError):
            version = None
        if version not in VERSIONS:
            raise InputError(f"unknown NFDH5 Version {f.attrs.get('Version')!r}", path)
        if "0" not in f or not isinstance(f["0"], h5py.Group):
            raise InputError("HDF5 file has no group /0", path)
        root = f["0"]
        default = "pet" if fmt == "EMC/PET" else "base dataset"
        # nifreeze 0.1.0 marks a DWI at file level and leaves "base dataset" on /0
        kind = _text(f.attrs.get("Type")) or _text(root.attrs.get("Type")) or default
        try:
            wanted = set(stored_names(kind))
        except InputError as exc:
            raise InputError(exc.problem, path) from None
        if "dataobj" not in root:
            raise InputError("HDF5 file has no /0/dataobj", path)
        fields = {}
        for key in root:
            if key == "dataobj" or key not in wanted:
                continue
            item = root[key]
            if isinstance(item, h5py.Dataset) and item.ndim == 4:
                fields[key] = HDF5Source(path, f"/0/{key}").to_dask()
            else:
                fields[key] = _read_field(path, item)
    return StoredSeries(path, kind, HDF5Source(path, "/0/dataobj").to_dask(), fields)


def write_nfdh5(
    filename,
    data: da.Array,
    fields: dict,
    *,
    kind: str,
    file_format: str = "NFDH5",
    file_type: str | None = None,
    inputs=(),
    compression: str | None = None,
    compression_opts=None,
    progress=None,
) -> None:
    """Write an NFDH5 (v1) file, streamed chunk by chunk, atomically.

    Parameters
    ----------
    filename : path-like
        Output file; written under a temporary name and renamed when complete.
    data : dask array (X, Y, Z, N)
        The volumes, computed block by block into ``/0/dataobj``.
    fields : dict
        Stored name -> value; 4D dask arrays are streamed like ``data``, anything
        else (dask graphs included) is computed and stored whole.
    kind, file_format, file_type
        ``/0`` ``Type``, the file's ``Format`` and its optional file-level ``Type``.
    inputs : sequence of str
        Files the output must not overwrite.
    compression, compression_opts
        HDF5 filter (``"gzip"``, ``"lzf"``) and its options, for every field.
    """
    volumes = {"dataobj": data}
    small = {}
    for key, value in fields.items():
        if isinstance(value, da.Array) and value.ndim == 4:
            volumes[key] = value
        else:
            small[key] = value
    lazy = {k: v for k, v in small.items() if hasattr(v, "dask")}
    small.update(zip(lazy, compute(*lazy.values()), strict=True))
    filters = {"compression": compression, "compression_opts": compression_opts}
    with atomic_output(filename, inputs) as temp:
        if compression is None:
            # HDF5 cannot recover from a full disk mid-write (h5py crashes closing the
            # file): check that the data fit before HDF5 writes anything
            metadata = sum(np.asarray(v).nbytes for v in small.values())
            reserve(temp, sum(v.nbytes for v in volumes.values()) + metadata)
        with h5py.File(temp, "w") as f:
            f.attrs["Format"] = file_format
            f.attrs["Version"] = np.uint16(1)
            if file_type is not None:
                f.attrs["Type"] = file_type
            root = f.create_group("0")
            root.attrs["Type"] = kind
            for key, value in small.items():
                value = np.asarray(value)
                root.create_dataset(key, data=value, **(filters if value.ndim else {}))
            for key, value in volumes.items():
                root.create_dataset(
                    key,
                    shape=value.shape,
                    dtype=value.dtype,
                    chunks=(*value.shape[:3], 1),
                    **filters,
                )
        for key, value in volumes.items():
            store(write_blocks(value), HDF5Target(temp, f"/0/{key}"), progress=progress)
