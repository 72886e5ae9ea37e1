"""Lazy datasets: a dask array of volumes plus small numpy metadata.

:class:`BaseDataset` holds a 4D series as a :class:`dask.array.Array` of shape
(X, Y, Z, N) with whole-volume chunks, its affine, an optional brain mask and
per-volume motion matrices.  Modalities (:mod:`nidask.data.dmri`, :mod:`nidask.data.pet`)
add per-volume metadata; anything listed in ``volume_fields`` follows the volumes
through indexing, subsetting and leave-one-out views.

Nothing here computes a whole series: selections, resampling and leave-one-out
training sets stay deferred graphs until a sink (:meth:`BaseDataset.materialize`,
:meth:`BaseDataset.to_filename`, :meth:`BaseDataset.to_nifti`) or an estimator asks.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any, ClassVar

import attrs
import dask.array as da
import numpy as np
from dask.base import tokenize

from nidask.errors import InputError
from nidask.geometry import check_affine
from nidask.io.cache import Cache, atomic_output
from nidask.io.nfdh5 import read_nfdh5, write_nfdh5
from nidask.io.npy import open_memmap
from nidask.io.sources import NpySource, VolumeSelection, source_of, volume_runs
from nidask.io.store import write_npy


def _as_float_array(value, shape: tuple | None = None, name: str = "value") -> np.ndarray | None:
    if value is None:
        return None
    array = np.array(value, dtype=float)
    if shape is not None and array.shape != shape:
        raise InputError(f"{name} must have shape {shape}, got {array.shape}")
    return array


def arrays_equal(a, b) -> bool:
    """Whether two numpy or dask arrays hold the same values (NaN equals NaN).

    Dask arrays are compared chunk by chunk; the same graph compares equal at once.
    """
    if a is None or b is None:
        return a is None and b is None
    if a.shape != b.shape:
        return False
    if isinstance(a, da.Array) or isinstance(b, da.Array):
        a, b = da.asarray(a), da.asarray(b)
        if a.name == b.name:
            return True
        same = a == b
        if np.issubdtype(a.dtype, np.floating) or np.issubdtype(b.dtype, np.floating):
            same = same | (da.isnan(a) & da.isnan(b))
        return bool(same.all().compute())
    return bool(np.array_equal(a, b, equal_nan=np.asarray(a).dtype.kind == "f"))


def normalize_index(index, n: int) -> tuple[np.ndarray, bool]:
    """Volume positions selected by ``index`` and whether it was a single integer.

    Accepts an int, a slice, a boolean mask of length ``n`` or an integer array.
    """
    if isinstance(index, int | np.integer):
        i = int(index)
        if not -n <= i < n:
            raise IndexError(f"volume index {i} out of range for {n} volumes")
        return np.array([i % n]), True
    if isinstance(index, slice):
        return np.arange(n)[index], False
    index = np.asarray(index)
    if index.dtype == bool:
        if index.shape != (n,):
            raise IndexError(f"boolean mask must have shape ({n},), got {index.shape}")
        return np.flatnonzero(index), False
    if index.dtype.kind not in "iu" or index.ndim != 1:
        raise IndexError(f"unsupported volume index {index!r}")
    if index.size and (index.min() < -n or index.max() >= n):
        raise IndexError(f"volume index out of range for {n} volumes")
    return index % n, False


def take_volumes(data: da.Array, positions) -> da.Array:
    """``data[..., positions]`` that reads only the selected volumes (no shuffle, no copy).

    On an array opened from a file (see :mod:`nidask.io.sources`) this is a new array
    over a :class:`~nidask.io.sources.VolumeSelection` of the same file, chunked like
    ``data``: every chunk, and every single volume sliced from it, reads just its
    own volumes.  On any other array, dask would turn an integer-array index into a
    shuffle (every output chunk cut and glued from up to two input chunks), so runs
    of consecutive positions become plain slices of the existing chunks joined by
    ``concatenate``.

    >>> take_volumes(da.zeros((2, 2, 2, 10), chunks=(2, 2, 2, 4)), [1, 2, 3, 7]).chunks[3]
    (3, 1)
    """
    positions = np.asarray(positions, dtype=int).reshape(-1)
    if positions.size == 0:
        return data[..., :0]
    source = source_of(data)
    if source is not None:
        return VolumeSelection(source, positions).to_dask(per_chunk=max(data.chunks[3]))
    parts = [data[..., int(run[0]) : int(run[-1]) + 1] for run in volume_runs(positions)]
    return parts[0] if len(parts) == 1 else da.concatenate(parts, axis=3)


def interleave_volumes(arrays, positions) -> da.Array:
    """The volumes of several arrays in the order of their ``positions`` (e.g. file order).

    Views of one file become a single view of it (each chunk reads its own volumes);
    anything else is concatenated and reordered without a shuffle.

    >>> a, b = da.zeros((1, 1, 1, 2)), da.ones((1, 1, 1, 1))
    >>> interleave_volumes([a, b], [[0, 2], [1]]).compute().ravel().tolist()
    [0.0, 1.0, 0.0]
    """
    positions = [np.asarray(p, dtype=int).reshape(-1) for p in positions]
    order = np.argsort(np.concatenate(positions), kind="stable")
    views = [_file_view(a) for a in arrays]
    if all(v is not None for v in views):
        tokens = {tokenize(base) for base, _ in views}
        if len(tokens) == 1:
            merged = np.concatenate([p for _, p in views])[order]
            per_chunk = max(max(a.chunks[3], default=1) for a in arrays)
            return VolumeSelection(views[0][0], merged).to_dask(per_chunk=per_chunk)
    return take_volumes(da.concatenate(arrays, axis=3), order)


def _file_view(array: da.Array):
    """``(source, positions)`` when ``array`` reads volumes of one file, else ``None``."""
    source = source_of(array)
    if source is None:
        return None
    if isinstance(source, VolumeSelection):
        return source.base, source.positions
    return source, np.arange(source.shape[3])


@attrs.define(eq=False, repr=False, slots=False)
class BaseDataset:
    """A lazy 4D series (X, Y, Z, N) with its geometry and motion matrices.

    Parameters
    ----------
    dataobj : dask.array.Array
        The volumes, shape (X, Y, Z, N), whole-volume chunks.
    affine : ndarray (4, 4)
        Voxel-to-RAS (mm) matrix.
    brainmask : ndarray of bool (X, Y, Z), optional
        Brain mask.
    motion_affines : ndarray (N, 4, 4), optional
        Per-volume motion matrices (reference RAS -> moving RAS), ``None`` if unset.
    datahdr : nibabel header, optional
        Header of the source NIfTI, reused (where meaningful) on export.
    original_index : ndarray of int (N,), optional
        Index of each volume in the source file (default ``arange(N)``).
    """

    dataobj: da.Array = attrs.field()
    affine: np.ndarray = attrs.field(converter=lambda a: check_affine(a))
    brainmask: np.ndarray | None = attrs.field(default=None)
    motion_affines: np.ndarray | None = attrs.field(default=None)
    datahdr: Any = attrs.field(default=None)
    original_index: np.ndarray | None = attrs.field(default=None)
    cache: Cache = attrs.field(factory=Cache, kw_only=True)
    inputs: tuple[str, ...] = attrs.field(default=(), kw_only=True)
    memmap_path: str | None = attrs.field(default=None, kw_only=True)

    #: Fields with one entry per volume, selected together with the volumes.
    volume_fields: ClassVar[tuple[str, ...]] = ("motion_affines", "original_index")
    #: Fields that are bookkeeping, not part of the data (not stored, not compared).
    internal_fields: ClassVar[tuple[str, ...]] = ("cache", "inputs", "memmap_path", "datahdr")
    #: ``Type`` attribute of ``/0`` in NFDH5 files; a subclass that sets it is
    #: registered in :data:`MODALITIES` (files of that type open as that class).
    nfdh5_type: ClassVar[str] = "base dataset"
    #: NFDH5 ``Format`` attribute and optional file-level ``Type`` (nifreeze's marks).
    nfdh5_format: ClassVar[str] = "NFDH5"
    nfdh5_file_type: ClassVar[str | None] = None
    #: Fields stored under a leading underscore (nifreeze skips them).
    private_fields: ClassVar[tuple[str, ...]] = ("original_index",)
    #: Files written beside an exported NIfTI (see :meth:`export_plan`).
    export_sidecars: ClassVar[tuple[str, ...]] = ()

    def __init_subclass__(cls, **kwargs) -> None:
        super().__init_subclass__(**kwargs)
        if "nfdh5_type" in cls.__dict__:
            MODALITIES[cls.nfdh5_type] = cls

    def __attrs_post_init__(self) -> None:
        if not isinstance(self.dataobj, da.Array):
            raise InputError(f"dataobj must be a dask array, got {type(self.dataobj).__name__}")
        if self.dataobj.ndim != 4:
            raise InputError(f"dataobj must be 4D (X, Y, Z, N), got shape {self.dataobj.shape}")
        if any(len(c) != 1 for c in self.dataobj.chunks[:3]):
            self.dataobj = self.dataobj.rechunk({0: -1, 1: -1, 2: -1})
        n = self.dataobj.shape[3]
        if self.brainmask is not None:
            mask = np.asarray(self.brainmask)
            if mask.shape != self.shape3d:
                raise InputError(
                    f"brain mask shape {mask.shape} differs from the series {self.shape3d}"
                )
            self.brainmask = mask.astype(bool)
        if self.motion_affines is not None:
            matrices = _as_float_array(self.motion_affines, (n, 4, 4), "motion_affines")
            if not np.all(np.isfinite(matrices)):
                raise InputError("motion_affines has non-finite values")
            self.motion_affines = matrices
        if self.original_index is None:
            self.original_index = np.arange(n)
        self.original_index = np.asarray(self.original_index, dtype=int)
        if self.original_index.shape != (n,):
            raise InputError(f"original_index must have {n} entries")

    # -- shape ------------------------------------------------------------------------
    def __len__(self) -> int:
        return self.dataobj.shape[-1]

    @property
    def shape(self) -> tuple[int, int, int, int]:
        """(X, Y, Z, N)."""
        return self.dataobj.shape

    @property
    def shape3d(self) -> tuple[int, int, int]:
        """Spatial shape (X, Y, Z)."""
        return self.dataobj.shape[:3]

    @property
    def size3d(self) -> int:
        """Number of voxels in one volume."""
        return int(np.prod(self.shape3d))

    @property
    def dtype(self) -> np.dtype:
        """Data type of the volumes."""
        return self.dataobj.dtype

    # -- indexing ---------------------------------------------------------------------
    def _extras(self, positions: np.ndarray, single: bool) -> tuple:
        return ()

    def __getitem__(self, index) -> tuple:
        """``(volumes, motion_affines_or_None, *extras)`` for an int, slice, mask or array.

        Volumes stay lazy (dask); an integer index gives one (X, Y, Z) volume.
        """
        positions, single = normalize_index(index, len(self))
        volumes = take_volumes(self.dataobj, positions)
        if single:
            volumes = volumes[..., 0]
        affines = None
        if self.motion_affines is not None:
            affines = self.motion_affines[positions[0] if single else positions]
        return (volumes, affines, *self._extras(positions, single))

    def select(self, index) -> BaseDataset:
        """A dataset of the same type holding the selected volumes (deferred)."""
        positions, _ = normalize_index(index, len(self))
        changes = {"dataobj": take_volumes(self.dataobj, positions)}
        for name in self.volume_fields:
            value = getattr(self, name)
            if value is not None:
                changes[name] = value[positions]
        return attrs.evolve(self, **changes)

    def lofo(self, index: int) -> tuple[BaseDataset, tuple]:
        """Leave-one-out view: (training dataset without volume ``index``, ``self[index]``).

        The training set is a deferred selection that references the existing
        chunks; nothing is copied until it is computed.
        """
        position = normalize_index(index, len(self))[0][0]
        keep = np.ones(len(self), dtype=bool)
        keep[position] = False
        return self.select(keep), self[int(position)]

    def lofo_folds(self) -> Iterator[tuple[BaseDataset, tuple]]:
        """Iterate :meth:`lofo` over every volume in order."""
        for i in range(len(self)):
            yield self.lofo(i)

    # -- motion -----------------------------------------------------------------------
    def set_transform(self, index: int, matrix) -> None:
        """Record the 4x4 motion matrix of volume ``index``; touches no data.

        Other volumes keep their matrix (identity if never set).

        Raises
        ------
        InputError
            If ``index`` is not an integer within range, or the matrix is not a
            finite, invertible 4x4 affine.  Nothing is recorded then.
        """
        from nidask.geometry import check_matrix

        if isinstance(index, bool | np.bool_) or not isinstance(index, int | np.integer):
            raise InputError(f"volume index must be an integer, got {index!r}")
        try:
            position = normalize_index(index, len(self))[0][0]
        except IndexError as exc:
            raise InputError(str(exc)) from None
        matrix = check_matrix(matrix, name=f"transform of volume {index}")
        if self.motion_affines is None:
            self.motion_affines = np.tile(np.eye(4), (len(self), 1, 1))
        self.motion_affines[position] = matrix

    def resampled(self, order: int = 3, mode: str = "constant", cval: float = 0.0, box=None):
        """A dataset of the same type with every volume resampled by its motion matrix.

        The result's ``dataobj`` is a deferred float32 graph (one task per block of
        volumes) and its ``motion_affines`` is ``None`` (motion already applied).
        Without motion matrices the data are only cast to float32.  ``box`` (three
        slices) interpolates only the voxels inside it, the others are ``cval``
        (:func:`nidask.ops.resample.resample_series`).
        """
        from nidask.ops.resample import check_order, resample_series

        order = check_order(order)
        data = resample_series(
            self.dataobj,
            self.affine,
            self.motion_affines,
            order=order,
            mode=mode,
            cval=cval,
            box=box,
        )
        fields = self._resampled_fields(order, mode, cval)
        return attrs.evolve(self, dataobj=data, motion_affines=None, **fields)

    def _resampled_fields(self, order: int, mode: str, cval: float) -> dict:
        """Fields that change when the volumes are resampled (modalities add theirs)."""
        return {}

    # -- what models receive ------------------------------------------------
    def volume_meta(self) -> dict:
        """Per-volume metadata that models receive (e.g. ``gradients``, ``midframe``)."""
        return {}

    def voxel_meta(self) -> dict:
        """Images (X, Y, Z) that models receive per voxel (e.g. a DWI's ``bzero``)."""
        return {}

    def whole_series(self) -> BaseDataset:
        """Every volume of the file this dataset knows, in file order.

        The estimator corrects all of them and exports write all of them; a
        modality that sets some volumes aside (a DWI's b=0 volumes) merges them back.
        """
        return self

    def with_whole_motion(self, matrices) -> BaseDataset:
        """This dataset with motion matrices given for every volume of :meth:`whole_series`."""
        return attrs.evolve(self, motion_affines=np.asarray(matrices, dtype=float))

    # -- storage and export hooks ---------------------------------------------------------
    def stored_fields(self) -> dict:
        """NFDH5 name -> value of every field stored beside ``dataobj``."""
        fields = {}
        for name in self._public_fields():
            value = getattr(self, name)
            if name != "dataobj" and value is not None:
                fields[f"_{name}" if name in self.private_fields else name] = value
        return fields

    @classmethod
    def stored_names(cls) -> set[str]:
        """The NFDH5 names :meth:`from_stored` understands."""
        names = {f.name for f in attrs.fields(cls)} - set(cls.internal_fields) - {"dataobj"}
        return {f"_{n}" if n in cls.private_fields else n for n in names} | names

    @classmethod
    def from_stored(cls, data: da.Array, fields: dict, *, path: str, cache: Cache):
        """The dataset an NFDH5 file holds (``fields`` keyed by field name)."""
        fields.setdefault("affine", np.eye(4))
        return cls(dataobj=data, cache=cache, inputs=(path,), **fields)

    def export_plan(
        self, *, order: int = 3, mode: str = "constant", cval: float = 0.0, b0_volumes=True
    ):
        """What a NIfTI export writes: ``(series, data, sidecars)``.

        ``series`` is the dataset exported (its motion goes to the X5 file): the
        :meth:`whole_series` (``b0_volumes=True``, the name a DWI gives the volumes
        it sets aside) or this dataset's own volumes.  ``data`` holds its volumes
        (resampled when moved) and ``sidecars`` maps each suffix of
        :attr:`export_sidecars` to a function writing that file.  Modalities add
        their own keyword options.
        """
        series = self.whole_series() if b0_volumes else self
        return series, series._exported(order, mode, cval).dataobj, {}

    def _exported(self, order: int = 3, mode: str = "constant", cval: float = 0.0):
        """This dataset resampled by its motion, or as it is without motion."""
        if self.motion_affines is None:
            return self
        return self.resampled(order=order, mode=mode, cval=cval)

    # -- sinks --------------------------------------------------------------------------
    def _with_data_file(self, path: str) -> BaseDataset:
        data = NpySource(path).to_dask()
        inputs = self.inputs if self.cache.owns(path) else (*self.inputs, path)
        return attrs.evolve(self, dataobj=data, memmap_path=path, inputs=inputs)

    def _lazy_fields(self) -> dict:
        """Small fields still held as dask graphs (computed along with the data)."""
        return {}

    def materialize(self, path: str | os.PathLike | None = None, *, progress=None):
        """Compute the series chunk by chunk into a volume-contiguous ``.npy`` file.

        Parameters
        ----------
        path : path-like, optional
            Where to write; default a file in the dataset's owned cache (removed
            with the cache).  A named file belongs to the user and is kept.
        progress : bool, optional
            Show a progress bar (default: ``nidask.progress`` config).

        Returns
        -------
        Dataset of the same type backed by the file; ``.memmap`` opens it.
        """
        target = self.cache.new_path(".npy", stem="materialized") if path is None else path
        lazy = self._lazy_fields()
        with atomic_output(target, self.inputs) as temp:
            values = write_npy(self.dataobj, temp, progress=progress, along=lazy.values())
        result = self._with_data_file(os.path.abspath(target))
        return attrs.evolve(result, **dict(zip(lazy, values, strict=True)))

    @property
    def memmap(self) -> np.memmap:
        """The materialized data as a read-only ``np.memmap`` (X, Y, Z, N), Fortran order."""
        if self.memmap_path is None:
            raise InputError("dataset is not materialized; call .materialize() first")
        return open_memmap(self.memmap_path)

    def to_filename(self, filename, *, compression: str | None = None, progress=None) -> None:
        """Write an NFDH5 file (streamed, atomic); see :mod:`nidask.io.nfdh5`."""
        write_nfdh5(
            filename,
            self.dataobj,
            self.stored_fields(),
            kind=self.nfdh5_type,
            file_format=self.nfdh5_format,
            file_type=self.nfdh5_file_type,
            inputs=self.inputs,
            compression=compression,
            progress=progress,
        )

    @classmethod
    def from_filename(cls, filename, **kwargs):
        """Open an NFDH5 file lazily; fails if it holds another dataset type."""
        dataset = open_nfdh5(filename, **kwargs)
        if not isinstance(dataset, cls):
            raise InputError(
                f"file holds a {type(dataset).__name__}, not a {cls.__name__}", filename
            )
        return dataset

    def to_nifti(
        self,
        filename,
        order: int = 3,
        write_hmxfms: bool = False,
        *,
        dtype=None,
        progress=None,
        **kwargs,
    ) -> None:
        """Write a NIfTI file (``.nii`` or ``.nii.gz``), streamed and atomic.

        With motion matrices set, volumes are resampled (``order``) block by block
        into the file as float32; otherwise the data are written as they are.

        Parameters
        ----------
        filename : path-like
            Output ``.nii`` or ``.nii.gz``.
        order : int
            Interpolation order (0-5) when resampling.
        write_hmxfms : bool
            Also write every volume's transform as an X5 file beside the image.
        dtype : dtype, optional
            On-disk dtype (default: float32 when resampled, else the data dtype).
        """
        from nidask.data.export import export_nifti

        export_nifti(
            self,
            filename,
            order=order,
            write_hmxfms=write_hmxfms,
            dtype=dtype,
            progress=progress,
            **kwargs,
        )

    # -- lifecycle ----------------------------------------------------------------------
    def close(self) -> None:
        """Remove what the dataset lineage owns on disk (its cache); user files stay."""
        self.cache.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- comparison and display ---------------------------------------------------------
    def _public_fields(self) -> list[str]:
        return [f.name for f in attrs.fields(type(self)) if f.name not in self.internal_fields]

    def __eq__(self, other) -> bool:
        if type(other) is not type(self):
            return NotImplemented
        names = self._public_fields()
        # metadata first: a mismatch there answers without computing any data
        names.sort(
            key=lambda n: (
                isinstance(getattr(self, n), da.Array) or isinstance(getattr(other, n), da.Array)
            )
        )
        for name in names:
            if not arrays_equal(
                _array_or_none(getattr(self, name)), _array_or_none(getattr(other, name))
            ):
                return False
        return True

    __hash__ = None

    def _describe(self) -> list[str]:
        return []

    def __repr__(self) -> str:
        chunks = self.dataobj.chunks[3]
        parts = [
            f"shape={self.shape}",
            f"dtype={self.dtype}",
            f"chunks={max(chunks)} volume(s) x {len(chunks)}",
            f"motion={'set' if self.motion_affines is not None else 'none'}",
            *self._describe(),
        ]
        if self.memmap_path:
            parts.append(f"memmap={self.memmap_path!r}")
        return f"{type(self).__name__}({', '.join(parts)})"


def by_modality(table: dict, dataset):
    """The entry of ``table`` (keyed by dataset class) for ``dataset``'s class.

    A class without an entry takes its nearest parent's, so tables on the side that
    uses them (estimation, CLI, bridges) keep the datasets about data.

    >>> class Sub(BaseDataset): ...
    >>> by_modality({BaseDataset: "base"}, Sub.__new__(Sub))
    'base'
    """
    for cls in type(dataset).__mro__:
        if cls in table:
            return table[cls]
    raise KeyError(f"no entry for {type(dataset).__name__}")


#: NFDH5 ``Type`` -> dataset class (modalities register by declaring ``nfdh5_type``).
MODALITIES: dict[str, type[BaseDataset]] = {BaseDataset.nfdh5_type: BaseDataset}


def _stored_names(kind: str) -> set[str]:
    if kind not in MODALITIES:
        raise InputError(f"unknown dataset Type {kind!r}")
    return MODALITIES[kind].stored_names()


def open_nfdh5(filename, *, cache: Cache | None = None) -> BaseDataset:
    """Open an NFDH5 file lazily, as the dataset class its ``Type`` names.

    Only metadata are read; ``dataobj`` stays on disk behind a dask array.
    """
    stored = read_nfdh5(filename, _stored_names)
    cls = MODALITIES[stored.kind]
    fields = {k[1:] if k.startswith("_") else k: v for k, v in stored.fields.items()}
    try:
        return cls.from_stored(stored.data, fields, path=stored.path, cache=cache or Cache())
    except InputError as exc:
        if exc.path is None:
            raise InputError(exc.problem, stored.path) from exc
        raise
    except (TypeError, ValueError) as exc:  # a field of the wrong kind in a hostile file
        raise InputError(f"malformed {cls.__name__} fields ({exc})", stored.path) from exc


def _array_or_none(value):
    if value is None or isinstance(value, da.Array | np.ndarray):
        return value
    return np.asarray(value)
