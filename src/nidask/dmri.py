"""Diffusion MRI: gradient tables, b=0 handling and the :class:`DWI` dataset.

Conventions follow nifreeze 0.1.0: ``gradients`` is an (N, 4) table of unit
direction + b-value rows; a volume is a *b=0* when its b-value is at most
``B0_THRESHOLD``; non-unit directions are normalised and their b-value multiplied
by the norm, and near-zero directions mark b=0 volumes.  The b=0 volumes leave
``dataobj`` (a deferred selection) and are summarised in ``bzero``.
"""

from __future__ import annotations

import contextlib
import os

import attrs
import dask
import dask.array as da
import numpy as np

from nidask.config import b0_threshold
from nidask.dataset import BaseDataset, interleave_volumes, take_volumes
from nidask.errors import InputError
from nidask.io.cache import Cache
from nidask.io.sources import check_readable, open_source

B0_THRESHOLD = 50.0  # the default of ``nidask.b0-threshold``
MIN_DIFFUSION_VOLUMES = 6
#: Directions per shell from which the Gaussian-process model is the default.
GP_MIN_DIRECTIONS = 10
GRADIENT_ATOL = 1e-2


def normalize_gradients(table, path: str | None = None) -> np.ndarray:
    """Return an (N, 4) float table with unit directions and rescaled b-values.

    Parameters
    ----------
    table : array-like (N, 4) or (4, N)
        Directions (3 columns) and b-values (last column).
    path : str, optional
        File the table came from, for error messages.

    Examples
    --------
    >>> normalize_gradients([[2.0, 0, 0, 1000], [0, 0, 0, 0]]).tolist()
    [[1.0, 0.0, 0.0, 2000.0], [0.0, 0.0, 0.0, 0.0]]
    """
    table = np.array(table, dtype=float)
    if table.ndim != 2 or 4 not in table.shape:
        raise InputError(f"gradient table must be (N, 4) or (4, N), got {table.shape}", path)
    if table.shape[1] != 4:
        table = table.T
    if not np.all(np.isfinite(table)):
        raise InputError("gradient table has NaN or infinite values", path)
    norms = np.linalg.norm(table[:, :3], axis=1)
    null = norms < GRADIENT_ATOL
    table[null] = 0.0
    rescale = ~null & ~np.isclose(norms, 1.0, atol=GRADIENT_ATOL)
    table[rescale, :3] /= norms[rescale, None]
    table[rescale, 3] *= norms[rescale]
    # rows already unit to rounding are left alone, so normalising is idempotent (a
    # table survives select/lofo/NFDH5 round trips bit for bit)
    almost = ~null & ~rescale & (np.abs(norms - 1.0) > 1e-12)
    table[almost, :3] /= norms[almost, None]
    if np.any(table[:, 3] < 0):
        raise InputError("gradient table has negative b-values", path)
    return table


def _loadtxt(path, what: str) -> np.ndarray:
    path = check_readable(path)
    try:
        return np.loadtxt(path, dtype=float, ndmin=2)
    except ValueError as exc:
        raise InputError(f"cannot parse {what} file ({exc})", path) from exc


def read_gradients(
    bvec_file=None, bval_file=None, gradients_file=None, n_volumes: int | None = None
) -> np.ndarray:
    """Read a gradient table from ``.bvec``/``.bval`` files or a 4-column RAS+B file.

    ``.bvec`` may be 3xN or Nx3; ``gradients_file`` takes precedence when given.
    The count must match ``n_volumes`` when that is given.
    """
    if gradients_file is not None:
        source = os.fspath(gradients_file)
        table = normalize_gradients(_loadtxt(gradients_file, "gradients"), source)
    elif bvec_file is not None and bval_file is not None:
        source = os.fspath(bvec_file)
        bvecs = _loadtxt(bvec_file, "b-vector")
        bvals = _loadtxt(bval_file, "b-value").ravel()
        if bvecs.shape[0] != 3 and bvecs.shape[1] == 3:
            bvecs = bvecs.T
        if bvecs.shape[0] != 3:
            raise InputError(f"b-vectors must be 3xN or Nx3, got {bvecs.shape}", bvec_file)
        if bvecs.shape[1] != bvals.size:
            raise InputError(
                f"{bvecs.shape[1]} b-vectors but {bvals.size} b-values in {bval_file}", bvec_file
            )
        table = normalize_gradients(np.vstack((bvecs, bvals)).T, source)
    else:
        raise InputError("no gradient information: give bvec_file + bval_file or gradients_file")
    if n_volumes is not None and len(table) != n_volumes:
        raise InputError(
            f"gradient table has {len(table)} entries but the series has {n_volumes} volumes",
            source,
        )
    return table


def load_mask(path, shape3d: tuple[int, ...], what: str = "brain mask") -> np.ndarray:
    """Read a 3D mask file (NIfTI, .npy) as bool; its shape must be ``shape3d``."""
    # the cache (where a .nii.gz mask is decompressed) must outlive the read
    with contextlib.closing(Cache()) as cache:
        source = open_source(path, cache=cache)
        if source.shape[:3] != tuple(shape3d) or source.shape[3] != 1:
            raise InputError(
                f"{what} shape {source.shape[:3]} differs from the series {shape3d}", path
            )
        return source[:, :, :, 0:1][..., 0] != 0


def find_shells(bvals: np.ndarray, num_bins: int = 15, bval_cap: float = 8000.0) -> list:
    """Group b-values into shells by histogram binning (as nifreeze does).

    Returns a list of ``(estimated_bvalue, indices)``, the estimate being the
    median b-value of the group.
    """
    bvals = np.asarray(bvals, dtype=float)
    upper = min(bvals.max(), bval_cap) if bvals.size else 1.0
    edges = np.histogram_bin_edges(bvals, bins=num_bins, range=(-1, max(upper, 0.0)))
    shells = []
    for lower, upper in zip(edges[:-1], edges[1:], strict=True):
        members = np.flatnonzero((bvals > lower) & (bvals <= upper))
        if members.size:
            shells.append((float(np.median(bvals[members])), members))
    return shells


def _check_gradients(inst, attribute, value) -> None:
    if value is None:
        raise InputError("a DWI needs a gradient table")


@attrs.define(eq=False, repr=False, slots=False)
class DWI(BaseDataset):
    """A diffusion-weighted series without its b=0 volumes.

    Parameters
    ----------
    gradients : ndarray (N, 4)
        Unit direction (RAS) and b-value per diffusion-weighted volume.
    bzero : ndarray or dask array (X, Y, Z), optional
        The b=0 reference (lazy median of the b=0 volumes when read from a series).
    b0s : dask array (X, Y, Z, n_b0), optional
        The series' b=0 volumes themselves (a lazy view of the file), so that the
        estimator can correct them and exports can write the whole series.
    b0_index : ndarray of int (n_b0,), optional
        Position of each b=0 volume in the file (as ``original_index`` for the
        diffusion-weighted ones).
    b0_motion_affines : ndarray (n_b0, 4, 4), optional
        Motion matrices of the b=0 volumes.
    """

    gradients: np.ndarray = attrs.field(default=None, validator=_check_gradients, kw_only=True)
    bzero: np.ndarray | da.Array | None = attrs.field(default=None, kw_only=True)
    b0s: da.Array | None = attrs.field(default=None, kw_only=True)
    b0_index: np.ndarray | None = attrs.field(default=None, kw_only=True)
    b0_motion_affines: np.ndarray | None = attrs.field(default=None, kw_only=True)

    volume_fields = (*BaseDataset.volume_fields, "gradients")
    nfdh5_type = "dmri"

    def __attrs_post_init__(self) -> None:
        super().__attrs_post_init__()
        self.gradients = normalize_gradients(self.gradients)
        if len(self.gradients) != len(self):
            raise InputError(
                f"gradient table has {len(self.gradients)} entries "
                f"but the series has {len(self)} volumes"
            )
        if self.bzero is not None and tuple(self.bzero.shape) != self.shape3d:
            raise InputError(
                f"b=0 volume shape {tuple(self.bzero.shape)} "
                f"differs from the series {self.shape3d}"
            )
        self._check_b0_volumes()

    def _check_b0_volumes(self) -> None:
        if self.b0s is None:
            if self.b0_index is not None or self.b0_motion_affines is not None:
                raise InputError("b0_index and b0_motion_affines need b0s")
            return
        if not isinstance(self.b0s, da.Array) or self.b0s.ndim != 4:
            raise InputError("b0s must be a 4D dask array (X, Y, Z, n_b0)")
        if tuple(self.b0s.shape[:3]) != self.shape3d:
            raise InputError(
                f"b=0 volumes shape {tuple(self.b0s.shape[:3])} differs from the series "
                f"{self.shape3d}"
            )
        n_b0 = self.b0s.shape[3]
        if self.b0_index is None:
            raise InputError("b0s need b0_index (their positions in the file)")
        self.b0_index = np.asarray(self.b0_index, dtype=int).reshape(-1)
        if self.b0_index.shape != (n_b0,):
            raise InputError(f"b0_index must have {n_b0} entries")
        if np.intersect1d(self.b0_index, self.original_index).size:
            raise InputError("b0_index and original_index share file positions")
        if self.b0_motion_affines is not None:
            matrices = np.array(self.b0_motion_affines, dtype=float)
            if matrices.shape != (n_b0, 4, 4) or not np.all(np.isfinite(matrices)):
                raise InputError(f"b0_motion_affines must be {n_b0} finite 4x4 matrices")
            self.b0_motion_affines = matrices

    @property
    def bvals(self) -> np.ndarray:
        """b-values (N,)."""
        return self.gradients[:, 3]

    @property
    def bvecs(self) -> np.ndarray:
        """Unit gradient directions (N, 3)."""
        return self.gradients[:, :3]

    def get_shells(self, num_bins: int = 15, bval_cap: float = 8000.0) -> list:
        """Shells as ``(estimated_bvalue, volume_indices)`` pairs; see :func:`find_shells`."""
        return find_shells(self.bvals, num_bins=num_bins, bval_cap=bval_cap)

    def _extras(self, positions, single):
        return (self.gradients[positions[0]] if single else self.gradients[positions],)

    def _resampled_fields(self, order: int, mode: str, cval: float) -> dict:
        from nidask.ops.resample import resample_series, rotate_bvecs

        fields = {}
        if self.motion_affines is not None:
            gradients = self.gradients.copy()
            gradients[:, :3] = rotate_bvecs(self.bvecs, self.affine, self.motion_affines)
            fields["gradients"] = gradients
        if self.b0s is not None and self.b0_motion_affines is not None:
            fields["b0s"] = resample_series(
                self.b0s, self.affine, self.b0_motion_affines, order=order, mode=mode, cval=cval
            )
            fields["b0_motion_affines"] = None
        return fields

    def volume_meta(self) -> dict:
        return {"gradients": self.gradients}

    def default_model(self) -> list[str]:
        """Per pass: the shell average, then the Gaussian process where shells allow it.

        The first pass sees the data as acquired: a prediction that weights a few
        neighbouring directions heavily (the process) would sit in their mean
        position, different for every volume; the shell average sits in the
        shell's mean position.  Later passes see corrected data.
        """
        shells = [len(idx) for b, idx in self.get_shells() if b > b0_threshold()]
        if shells and min(shells) >= GP_MIN_DIRECTIONS:
            return ["average", "gp"]
        return ["average"]

    def whole_series(self) -> DWI:
        """The file's whole series, b=0 volumes included, in file order.

        b=0 rows have a null gradient; each b=0 volume keeps its motion (identity
        where the diffusion-weighted volumes have motion and it has none).
        """
        if self.b0s is None:
            return self
        positions = [self.b0_index, self.original_index]
        order = np.argsort(np.concatenate(positions), kind="stable")
        gradients = np.vstack([np.zeros((len(self.b0_index), 4)), self.gradients])[order]
        motion = None
        if self.motion_affines is not None or self.b0_motion_affines is not None:
            identity = np.eye(4)
            b0_motion = self.b0_motion_affines
            dw_motion = self.motion_affines
            if b0_motion is None:
                b0_motion = np.tile(identity, (len(self.b0_index), 1, 1))
            if dw_motion is None:
                dw_motion = np.tile(identity, (len(self), 1, 1))
            motion = np.concatenate([b0_motion, dw_motion])[order]
        return attrs.evolve(
            self,
            dataobj=interleave_volumes([self.b0s, self.dataobj], positions),
            gradients=gradients,
            motion_affines=motion,
            original_index=np.concatenate(positions)[order],
            b0s=None,
            b0_index=None,
            b0_motion_affines=None,
        )

    def with_whole_motion(self, matrices) -> DWI:
        """This dataset with motion given for every volume of :meth:`whole_series`."""
        if self.b0s is None:
            return super().with_whole_motion(matrices)
        matrices = np.asarray(matrices, dtype=float)
        positions = np.concatenate([self.b0_index, self.original_index])
        if matrices.shape != (len(positions), 4, 4):
            raise InputError(f"expected {len(positions)} motion matrices, got {matrices.shape}")
        by_position = dict(zip(np.sort(positions).tolist(), matrices, strict=True))
        return attrs.evolve(
            self,
            motion_affines=np.stack([by_position[int(p)] for p in self.original_index]),
            b0_motion_affines=np.stack([by_position[int(p)] for p in self.b0_index]),
        )

    def _lazy_fields(self) -> dict:
        return {"bzero": self.bzero} if isinstance(self.bzero, da.Array) else {}

    def _describe(self) -> list[str]:
        shells = ", ".join(f"b={b:g}:{len(idx)}" for b, idx in self.get_shells())
        bzero = (
            "none"
            if self.bzero is None
            else ("lazy" if isinstance(self.bzero, da.Array) else "yes")
        )
        parts = [f"shells=[{shells}]", f"bzero={bzero}"]
        if self.b0s is not None:
            parts.append(f"b0 volumes={self.b0s.shape[3]}")
        return parts


def split_b0(
    data: da.Array, gradients: np.ndarray, threshold: float | None = None
) -> tuple[np.ndarray, da.Array | None]:
    """Indices of diffusion-weighted volumes and the lazy b=0 reference.

    The reference is the single b=0 volume, or the voxel-wise median of several
    (float32), or ``None`` without any.  ``threshold`` defaults to
    ``nidask.b0-threshold``.
    """
    threshold = b0_threshold() if threshold is None else threshold
    is_b0 = gradients[:, 3] <= threshold
    b0_index = np.flatnonzero(is_b0)
    if b0_index.size == 0:
        return np.flatnonzero(~is_b0), None
    b0s = take_volumes(data, b0_index)
    if b0_index.size == 1:
        bzero = b0s[..., 0].astype(np.float32)
    else:
        # one task on the block as read (map_blocks with drop_axis would copy it first)
        (block,) = b0s.rechunk({3: -1}).to_delayed().ravel()
        median = dask.delayed(median_volume, pure=True)(block)
        bzero = da.from_delayed(median, shape=b0s.shape[:3], dtype=np.float32)
    return np.flatnonzero(~is_b0), bzero


def median_volume(volumes: np.ndarray) -> np.ndarray:
    """Voxel-wise median of (X, Y, Z, n) volumes as float32 (``np.median``'s values).

    Sorting contiguous rows of n values is several times faster than ``np.median``
    along the last axis of volume-contiguous data.

    >>> median_volume(np.arange(8).reshape(1, 1, 2, 4, order="F")).tolist()
    [[[3.0, 4.0]]]
    """
    n = volumes.shape[-1]
    rows = np.sort(np.ascontiguousarray(volumes.reshape(-1, n, order="F")), axis=1)
    middle = rows[:, n // 2].astype(np.float64)
    if n % 2 == 0:
        middle = (rows[:, n // 2 - 1] + middle) / 2
    return middle.astype(np.float32).reshape(volumes.shape[:3], order="F")


def from_nii(
    filename,
    bvec_file=None,
    bval_file=None,
    gradients_file=None,
    brainmask_file=None,
    b0_file=None,
    *,
    cache: Cache | None = None,
) -> DWI:
    """Open a diffusion series (NIfTI, ``.npy`` or HDF5 array) lazily as a :class:`DWI`.

    Parameters
    ----------
    filename : path-like
        The 4D series.
    bvec_file, bval_file : path-like, optional
        FSL-style b-vectors (3xN or Nx3) and b-values.
    gradients_file : path-like, optional
        An (N, 4) or (4, N) table of RAS direction + b-value; supersedes bvec/bval.
    brainmask_file : path-like, optional
        A 3D mask of the same grid.
    b0_file : path-like, optional
        A 3D b=0 reference; otherwise the median of the b=0 volumes (if any).

    Returns
    -------
    DWI
        With the b=0 volumes removed from ``dataobj`` (deferred) and
        ``original_index`` mapping each remaining volume to the file.
    """
    cache = cache or Cache()
    source = open_source(filename, cache=cache)
    data = source.to_dask()
    table = read_gradients(bvec_file, bval_file, gradients_file, n_volumes=source.shape[3])
    keep, bzero = split_b0(data, table)
    if keep.size < MIN_DIFFUSION_VOLUMES:
        raise InputError(
            f"a DWI needs at least {MIN_DIFFUSION_VOLUMES} diffusion-weighted volumes, "
            f"found {keep.size}",
            source.path,
        )
    # the gradient files too: a .bval/.bvec written beside an output must not replace them
    gradient_files = (gradients_file,) if gradients_file is not None else (bvec_file, bval_file)
    inputs = [source.path, *(os.path.abspath(f) for f in gradient_files)]
    if b0_file is not None:
        b0_source = open_source(b0_file, cache=cache)
        if b0_source.shape[:3] != source.shape[:3] or b0_source.shape[3] != 1:
            raise InputError(
                f"b=0 file shape {b0_source.shape[:3]} differs from the series {source.shape[:3]}",
                b0_source.path,
            )
        bzero = b0_source.to_dask()[..., 0].astype(np.float32)
        inputs.append(b0_source.path)
    mask = None
    if brainmask_file is not None:
        mask = load_mask(brainmask_file, source.shape[:3])
        inputs.append(os.path.abspath(brainmask_file))
    b0_index = np.setdiff1d(np.arange(len(table)), keep)
    return DWI(
        dataobj=take_volumes(data, keep) if keep.size < len(table) else data,
        b0s=take_volumes(data, b0_index) if b0_index.size else None,
        b0_index=b0_index if b0_index.size else None,
        affine=source.affine if hasattr(source, "affine") else np.eye(4),
        brainmask=mask,
        datahdr=getattr(source, "header", None),
        original_index=keep,
        gradients=table[keep],
        bzero=bzero,
        cache=cache,
        inputs=tuple(inputs),
    )
