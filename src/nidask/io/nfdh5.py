"""NFDH5, the nifreeze HDF5 container: lazy reading (v1 and v2), streamed writing.

Layout: file attributes ``Format="NFDH5"`` (PET: ``"EMC/PET"``) and
``Version=uint16(1)``; group ``/0`` with attribute ``Type`` (``"base dataset"``,
``"dmri"``, ``"pet"``) and one dataset per public field.  Version 1 stores
``dataobj`` as (X, Y, Z, N); version 2 as (N, X, Y, Z) with ``volume_axis=0``.
nidask writes version 1 with HDF5 chunks of whole volumes, so files stay readable
by nifreeze 0.1.0 while a volume read touches one chunk.  Fields nifreeze does not
know are stored with a leading underscore, which nifreeze skips.
"""

from __future__ import annotations

import attrs
import h5py
import numpy as np

from nidask.dataset import BaseDataset, take_volumes
from nidask.dmri import DWI, normalize_gradients, split_b0
from nidask.errors import InputError
from nidask.io.cache import Cache, atomic_output
from nidask.io.files import reserve
from nidask.io.sources import HDF5Source, check_readable
from nidask.io.store import HDF5Target, store, write_blocks
from nidask.pet import PET
from nidask.progress import compute

FORMATS = {"NFDH5", "EMC/PET"}
VERSIONS = {1, 2}
TYPES: dict[str, type[BaseDataset]] = {cls.nfdh5_type: cls for cls in (BaseDataset, DWI, PET)}
PRIVATE_FIELDS = {"original_index", "b0s", "b0_index", "b0_motion_affines"}
#: Fields holding volumes: stored like ``dataobj`` (whole-volume chunks), read lazily.
VOLUME_ARRAYS = {"b0s"}
#: Largest metadata field read eagerly (a few volumes' worth is plenty).
MAX_FIELD_BYTES = 2**30


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


def read_nfdh5(filename, *, cache: Cache | None = None) -> BaseDataset:
    """Open an NFDH5 file lazily, as the dataset type its ``Type`` names.

    Only metadata are read; ``dataobj`` stays on disk behind a dask array.
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
        if kind not in TYPES:
            raise InputError(f"unknown dataset Type {kind!r}", path)
        if "dataobj" not in root:
            raise InputError("HDF5 file has no /0/dataobj", path)
        cls = TYPES[kind]
        names = {a.name for a in attrs.fields(cls)} - set(cls.internal_fields)
        fields = {}
        for key in root:
            name = key[1:] if key.startswith("_") else key
            if name in VOLUME_ARRAYS and name in names:
                fields[name] = HDF5Source(path, f"/0/{key}").to_dask()
            elif key != "dataobj" and name in names:
                fields[name] = _read_field(path, root[key])
    source = HDF5Source(path, "/0/dataobj")
    data = source.to_dask()
    try:
        if cls is DWI and "gradients" in fields:
            # (N, 4), finite, non-negative b: b=0 volumes are found from it below
            fields["gradients"] = normalize_gradients(fields["gradients"], path)
            if len(fields["gradients"]) != data.shape[3]:
                raise InputError(
                    f"gradients has {len(fields['gradients'])} entries "
                    f"but dataobj has {data.shape[3]} volumes",
                    path,
                )
            # the file may still hold its b=0 volumes: per-volume fields must match
            # the file's volumes before b=0 removal selects from them
            for name in ("motion_affines", "original_index"):
                if name in fields and len(np.atleast_1d(fields[name])) != data.shape[3]:
                    raise InputError(
                        f"{name} has {len(np.atleast_1d(fields[name]))} entries "
                        f"but dataobj has {data.shape[3]} volumes",
                        path,
                    )
            keep, bzero = split_b0(data, fields["gradients"])
            if keep.size == 0:
                raise InputError("no diffusion-weighted volumes (all are b=0)", path)
            if keep.size < len(fields["gradients"]) and "b0s" not in fields:
                # the b=0 volumes kept in the file are the series' b=0 volumes
                b0 = np.setdiff1d(np.arange(data.shape[3]), keep)
                positions = fields.get("original_index", np.arange(data.shape[3]))
                fields["b0s"] = take_volumes(data, b0)
                fields["b0_index"] = np.asarray(positions)[b0]
                if "motion_affines" in fields:
                    fields["b0_motion_affines"] = fields["motion_affines"][b0]
            if keep.size < len(fields["gradients"]):
                # positions in the file, so original_index still points at the source
                fields.setdefault("original_index", np.arange(data.shape[3]))
                data = take_volumes(data, keep)
                fields["gradients"] = fields["gradients"][keep]
                fields.setdefault("bzero", bzero)
                for name in ("motion_affines", "original_index"):
                    if name in fields:
                        fields[name] = fields[name][keep]
        fields.setdefault("affine", np.eye(4))
        return cls(dataobj=data, cache=cache or Cache(), inputs=(path,), **fields)
    except InputError as exc:
        if exc.path is None:
            raise InputError(exc.problem, path) from exc
        raise


def write_nfdh5(
    dataset: BaseDataset,
    filename,
    *,
    compression: str | None = None,
    compression_opts=None,
    progress=None,
) -> None:
    """Write ``dataset`` as an NFDH5 (v1) file, streamed chunk by chunk, atomically.

    Parameters
    ----------
    dataset : BaseDataset
        Any nidask dataset; its lazy ``dataobj`` is computed block by block.
    filename : path-like
        Output file; written under a temporary name and renamed when complete.
    compression, compression_opts
        HDF5 filter (``"gzip"``, ``"lzf"``) and its options, for every field.
    """
    fields, volumes = {}, {"dataobj": dataset.dataobj}
    for name in dataset._public_fields():
        value = getattr(dataset, name)
        if name in VOLUME_ARRAYS and value is not None:
            volumes[f"_{name}"] = value
        elif name != "dataobj" and value is not None:
            fields[name] = value
    lazy = {k: v for k, v in fields.items() if hasattr(v, "dask")}
    fields.update(zip(lazy, compute(*lazy.values()), strict=True))
    filters = {"compression": compression, "compression_opts": compression_opts}
    with atomic_output(filename, dataset.inputs) as temp:
        if compression is None:
            # HDF5 cannot recover from a full disk mid-write (h5py crashes closing the
            # file): check that the data fit before HDF5 writes anything
            metadata = sum(np.asarray(v).nbytes for v in fields.values())
            reserve(temp, sum(v.nbytes for v in volumes.values()) + metadata)
        with h5py.File(temp, "w") as f:
            f.attrs["Format"] = "EMC/PET" if isinstance(dataset, PET) else "NFDH5"
            f.attrs["Version"] = np.uint16(1)
            if isinstance(dataset, DWI):
                f.attrs["Type"] = "dmri"
            root = f.create_group("0")
            root.attrs["Type"] = dataset.nfdh5_type
            for name, value in fields.items():
                key = f"_{name}" if name in PRIVATE_FIELDS else name
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
