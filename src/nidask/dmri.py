"""Diffusion MRI: gradient tables, b=0 handling and the :class:`DWI` dataset.

Conventions follow nifreeze 0.1.0: ``gradients`` is an (N, 4) table of unit
direction + b-value rows; a volume is a *b=0* when its b-value is at most
``nidask.b0-threshold`` (:data:`nidask.config.B0_THRESHOLD`); non-unit directions are
normalised and their b-value multiplied by the norm, and near-zero directions mark
b=0 volumes.  Directions are RAS+
(FSL's ``.bvec`` numbers are turned into RAS+ with the image's affine when read, and
back when written; :func:`nidask.geometry.fsl_to_ras`).  The b=0 volumes leave
``dataobj`` (a deferred selection) and are summarised in ``bzero``.
"""

from __future__ import annotations

import os

import attrs
import dask
import dask.array as da
import numpy as np

from nidask.config import b0_threshold, chunk_bytes
from nidask.dataset import BaseDataset, interleave_volumes, open_series, take_volumes
from nidask.errors import InputError
from nidask.geometry import fsl_to_ras, ras_to_fsl
from nidask.io.cache import Cache
from nidask.io.sources import check_readable, open_source, source_of

#: Diffusion-weighted volumes motion estimation needs (checked when estimating, not
#: when loading: see :func:`check_diffusion_volumes`).
MIN_DIFFUSION_VOLUMES = 6
#: Directions per shell from which the Gaussian-process model is the default.
GP_MIN_DIRECTIONS = 10
GRADIENT_ATOL = 1e-2


def normalize_gradients(table, path: str | None = None) -> np.ndarray:
    """Return an (N, 4) float table with unit directions and rescaled b-values.

    Non-finite directions on b=0 rows (b-value at most ``nidask.b0-threshold``)
    become zero vectors, as dipy and FSL read them; on a diffusion-weighted row, or
    in a b-value, they are an error naming the volume.

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
    >>> normalize_gradients([[np.nan, np.nan, np.nan, 0], [0, 1, 0, 1000]]).tolist()
    [[0.0, 0.0, 0.0, 0.0], [0.0, 1.0, 0.0, 1000.0]]
    """
    table = np.array(table, dtype=float)
    if table.ndim != 2 or 4 not in table.shape:
        raise InputError(f"gradient table must be (N, 4) or (4, N), got {table.shape}", path)
    if table.shape[1] != 4:
        table = table.T
    bad_b = np.flatnonzero(~np.isfinite(table[:, 3]))
    if bad_b.size:
        raise InputError(f"NaN or infinite b-value {_which(bad_b)}", path)
    negative = np.flatnonzero(table[:, 3] < 0)
    if negative.size:
        raise InputError(f"negative b-value {_which(negative)}", path)
    bad_direction = ~np.all(np.isfinite(table[:, :3]), axis=1)
    weighted = table[:, 3] > b0_threshold()
    bad = np.flatnonzero(bad_direction & weighted)
    if bad.size:
        raise InputError(
            f"NaN or infinite gradient direction {_which(bad)} (b={table[bad[0], 3]:g}); "
            "only b=0 volumes may have one",
            path,
        )
    table[bad_direction, :3] = 0.0
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
    return table


def _which(index: np.ndarray) -> str:
    """Name the first of some volumes (0-based) for an error message.

    >>> _which(np.array([3, 7, 9]))
    'in volume 3 (counting from 0) and 2 more'
    """
    more = f" and {index.size - 1} more" if index.size > 1 else ""
    return f"in volume {int(index[0])} (counting from 0){more}"


def _loadtxt(path, what: str) -> np.ndarray:
    import warnings

    path = check_readable(path)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # "input contained no data"
            values = np.loadtxt(path, dtype=float, ndmin=2)
    except ValueError as exc:
        raise InputError(f"cannot parse {what} file ({exc})", path) from exc
    if values.size == 0:
        raise InputError(f"{what} file has no values", path)
    return values


def _orient_bvecs(bvecs: np.ndarray, bvals: np.ndarray, path, bval_path=None) -> np.ndarray:
    """Return FSL b-vectors given 3xN or Nx3 as (N, 3) rows matching ``bvals``.

    A 3x3 file (three volumes) is read as FSL's 3xN unless only its rows, and not
    its columns, are unit vectors on the diffusion-weighted volumes.

    >>> _orient_bvecs(np.array([[1.0, 0, 0], [0, 0.6, 0], [0, 0.8, 1]]), np.full(3, 1e3), "x")[1]
    array([0. , 0.6, 0.8])
    >>> _orient_bvecs(np.array([[1.0, 0, 0], [0, 0.6, 0.8], [0, 0, 1]]), np.full(3, 1e3), "x")[1]
    array([0. , 0.6, 0.8])
    """
    n = bvals.size
    if bvecs.shape == (3, 3) and n == 3:
        weighted = bvals > b0_threshold()

        def unit(rows):
            norms = np.linalg.norm(rows[weighted], axis=1)
            return bool(np.all(np.abs(norms - 1.0) < GRADIENT_ATOL))

        return bvecs if unit(bvecs) and not unit(bvecs.T) else bvecs.T
    if bvecs.shape == (3, n):
        return bvecs.T
    if bvecs.shape == (n, 3):
        return bvecs
    if 3 not in bvecs.shape:
        raise InputError(
            f"b-vectors must be 3xN or Nx3, got {bvecs.shape[0]}x{bvecs.shape[1]}", path
        )
    count = bvecs.shape[1] if bvecs.shape[0] == 3 else bvecs.shape[0]
    where = "" if bval_path is None else f" in {os.fspath(bval_path)}"
    raise InputError(f"{count} b-vectors but {n} b-values{where}", path)


def read_gradients(
    bvec_file=None,
    bval_file=None,
    gradients_file=None,
    n_volumes: int | None = None,
    affine=None,
) -> np.ndarray:
    """Read a gradient table from FSL ``.bvec``/``.bval`` files or an MRtrix-style table.

    Parameters
    ----------
    bvec_file, bval_file : path-like, optional
        FSL-style b-vectors (3xN or Nx3; a 3x3 file is oriented by which of its rows
        or columns are unit vectors, FSL's 3xN when undecided) and b-values (one row
        or one column).  FSL's numbers are along the image's voxel axes (x negated
        when the affine's determinant is positive): with ``affine`` they are turned
        into RAS+ directions (:func:`nidask.geometry.fsl_to_ras`), without it they
        are returned as written.
    gradients_file : path-like, optional
        Rows of ``x y z b`` with directions in RAS+ (scanner) coordinates, as MRtrix
        ``.b`` tables (``#`` comment lines allowed); a (4, N) table is read too.
        Takes precedence over ``bvec_file``/``bval_file``.
    n_volumes : int, optional
        The series' volume count, which the table must match.
    affine : array-like (4, 4), optional
        The image's voxel-to-RAS affine, which gives FSL's b-vectors their frame.

    Returns
    -------
    ndarray (N, 4)
        See :func:`normalize_gradients`: NaN directions of b=0 volumes become zero
        vectors (as dipy and FSL read them).

    Raises
    ------
    InputError
        Naming the file and the problem (unreadable or unparsable, wrong shape,
        counts that disagree, NaN on a diffusion-weighted volume, negative b-values).
    """
    if gradients_file is not None:
        source = os.fspath(gradients_file)
        table = _loadtxt(gradients_file, "gradients")
        if table.ndim != 2 or table.shape[1] != 4 and table.shape[0] != 4:
            raise InputError(
                f"gradient table must be (N, 4) rows of x y z b, got {table.shape[1]} columns",
                source,
            )
        table = normalize_gradients(table, source)
    elif bvec_file is not None and bval_file is not None:
        source = os.fspath(bvec_file)
        bvecs = _loadtxt(bvec_file, "b-vector")
        bvals = _loadtxt(bval_file, "b-value")
        if min(bvals.shape) != 1:
            raise InputError(
                f"b-values must be one row or one column, got {bvals.shape[0]}x{bvals.shape[1]}",
                bval_file,
            )
        bvals = bvals.ravel()
        bad_b = np.flatnonzero(~np.isfinite(bvals))
        if bad_b.size:
            raise InputError(f"NaN or infinite b-value {_which(bad_b)}", bval_file)
        negative = np.flatnonzero(bvals < 0)
        if negative.size:
            raise InputError(f"negative b-value {_which(negative)}", bval_file)
        bvecs = _orient_bvecs(bvecs, bvals, source, bval_file)
        table = normalize_gradients(np.column_stack((bvecs, bvals)), source)
        if affine is not None:
            table[:, :3] = fsl_to_ras(table[:, :3], affine)
    else:
        raise InputError("no gradient information: give bvec_file + bval_file or gradients_file")
    if n_volumes is not None and len(table) != n_volumes:
        raise InputError(
            f"gradient table has {len(table)} entries but the series has {n_volumes} volumes",
            source,
        )
    return table


def check_diffusion_volumes(
    dataset, minimum: int = MIN_DIFFUSION_VOLUMES, what: str = "motion estimation"
) -> None:
    """Refuse, at estimation time, a DWI with fewer diffusion-weighted volumes than needed.

    Loading never refuses a short series (it can still be converted or exported).

    Parameters
    ----------
    dataset : DWI
        The dataset to check (its ``dataobj`` holds the diffusion-weighted volumes).
    minimum : int
        Volumes ``what`` needs (default :data:`MIN_DIFFUSION_VOLUMES`).
    what : str
        The consumer, for the message.

    Raises
    ------
    InputError
        Naming the dataset's file, the count and the minimum.
    """
    found = len(dataset)
    if found < minimum:
        path = (getattr(dataset, "inputs", None) or (None,))[0]
        raise InputError(
            f"{what} needs at least {minimum} diffusion-weighted volumes, found {found}", path
        )


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
    load_keys = ("bvec_file", "bval_file", "gradients_file", "b0_file")
    nfdh5_type = "dmri"
    nfdh5_file_type = "dmri"
    private_fields = (*BaseDataset.private_fields, "b0s", "b0_index", "b0_motion_affines")
    export_sidecars = (".bval", ".bvec")

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
            gradients[:, :3] = rotate_bvecs(self.bvecs, self.motion_affines)
            fields["gradients"] = gradients
        if self.b0s is not None and self.b0_motion_affines is not None:
            fields["b0s"] = resample_series(
                self.b0s, self.affine, self.b0_motion_affines, order=order, mode=mode, cval=cval
            )
            fields["b0_motion_affines"] = None
        return fields

    @classmethod
    def from_files(cls, path, **companions) -> DWI:
        return from_nii(path, **companions)

    def volume_meta(self) -> dict:
        return {"gradients": self.gradients}

    def voxel_meta(self) -> dict:
        return {} if self.bzero is None else {"bzero": self.bzero}

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

    def check_estimable(self, models) -> None:
        names = ", ".join(sorted({type(m).__name__ for m in models}))
        check_diffusion_volumes(self, what=f"motion estimation with {names}")

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

    def facts(self, volumes_in_file: int | None = None) -> dict:
        in_file = volumes_in_file or int(self.original_index.max()) + 1
        return {
            "dwi": {
                "b0_volumes": int(in_file - len(self)),
                "bzero": _bzero_kind(self.bzero),
                "shells": [
                    {"bvalue": round(b, 1), "volumes": len(members)}
                    for b, members in self.get_shells()
                ],
            }
        }

    def stored_fields(self) -> dict:
        """NFDH5 fields; ``gradients`` in nifreeze's frame, FSL's numbers (voxel axes)."""
        fields = super().stored_fields()
        gradients = fields["gradients"].copy()
        gradients[:, :3] = ras_to_fsl(gradients[:, :3], self.affine)
        fields["gradients"] = gradients
        return fields

    @classmethod
    def from_stored(cls, data, fields, *, path, cache) -> DWI:
        """A DWI from its NFDH5 fields; b=0 volumes still in ``dataobj`` are set aside."""
        if "gradients" in fields:
            # (N, 4), finite, non-negative b: b=0 volumes are found from it below
            fields["gradients"] = normalize_gradients(fields["gradients"], path)
            # stored as nifreeze stores them: FSL's numbers, along the voxel axes
            affine = fields.get("affine", np.eye(4))
            fields["gradients"][:, :3] = fsl_to_ras(fields["gradients"][:, :3], affine)
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
            if keep.size < len(fields["gradients"]):
                positions = fields.setdefault("original_index", np.arange(data.shape[3]))
                if "b0s" not in fields:
                    # the b=0 volumes kept in the file are the series' b=0 volumes
                    b0 = np.setdiff1d(np.arange(data.shape[3]), keep)
                    fields["b0s"] = take_volumes(data, b0)
                    fields["b0_index"] = np.asarray(positions)[b0]
                    if "motion_affines" in fields:
                        fields["b0_motion_affines"] = fields["motion_affines"][b0]
                # positions in the file, so original_index still points at the source
                data = take_volumes(data, keep)
                fields["gradients"] = fields["gradients"][keep]
                fields.setdefault("bzero", bzero)
                for name in ("motion_affines", "original_index"):
                    if name in fields:
                        fields[name] = fields[name][keep]
        return super().from_stored(data, fields, path=path, cache=cache)

    def export_plan(
        self,
        *,
        order: int = 3,
        mode: str = "constant",
        cval: float = 0.0,
        insert_b0: bool = False,
        b0_volumes: bool = True,
        bvals_dec_places: int = 2,
        bvecs_dec_places: int = 6,
    ):
        """The whole series (``b0_volumes``) or nifreeze's layout (``insert_b0``).

        ``insert_b0`` writes the b=0 reference as volume 0 before the
        diffusion-weighted volumes (b=0 volumes left out); ``b0_volumes=False``
        writes the diffusion-weighted volumes only.  b-vectors are rotated by the
        motion; ``.bval`` and ``.bvec`` are written with the given decimals.
        """
        series = self.whole_series() if b0_volumes and not insert_b0 else self
        output = series._exported(order, mode, cval)
        data, gradients = output.dataobj, output.gradients
        if insert_b0:
            if self.bzero is None:
                raise InputError("insert_b0=True needs a DWI with a bzero volume")
            bzero = da.asarray(self.bzero).astype(np.float32)[..., np.newaxis]
            bzero = bzero.rechunk(tuple((s,) for s in bzero.shape))
            data = da.concatenate([bzero, data.astype(np.float32)], axis=3)
            gradients = np.vstack((np.zeros((1, 4)), gradients))

        def bval(path):
            np.savetxt(path, gradients[:, 3][np.newaxis], fmt=f"%.{bvals_dec_places}f")

        def bvec(path):  # FSL's voxel frame (the table is RAS)
            fsl = ras_to_fsl(gradients[:, :3], series.affine)
            np.savetxt(path, fsl.T, fmt=f"%.{bvecs_dec_places}f")

        return series, data, {".bval": bval, ".bvec": bvec}

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


def _bzero_kind(bzero) -> str | None:
    if bzero is None:
        return None
    return "lazy (computed when needed)" if hasattr(bzero, "dask") else "stored"


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
        bzero = lazy_median(b0s)
    return np.flatnonzero(~is_b0), bzero


def lazy_median(volumes: da.Array) -> da.Array:
    """Voxel-wise median of ``volumes``, as a dask array.

    A file-backed array is read slab by slab along Z, every volume's slab in one
    task, so each task holds ``n`` slabs within the chunk budget whatever ``n`` is
    (an HCP series' 18 b=0 volumes would be 260 MB in float32 at once).  Any other
    array is one task on the whole block, as computed.

    Parameters
    ----------
    volumes : dask array (X, Y, Z, n)
        E.g. the b=0 volumes of a series (see :func:`split_b0`).

    Returns
    -------
    dask array (X, Y, Z), float32
        ``np.median(volumes, axis=-1)``'s values; chunked in Z slabs when file-backed.
    """
    x, y, z, n = volumes.shape
    source = source_of(volumes)
    if source is None:
        # one task on the block as read (map_blocks with drop_axis would copy it first)
        (block,) = volumes.rechunk({3: -1}).to_delayed().ravel()
        median = dask.delayed(median_volume, pure=True)(block)
        return da.from_delayed(median, shape=(x, y, z), dtype=np.float32)
    # the slab as read, its rows copied contiguous and sorted, all in float32 at most
    thickness = max(1, chunk_bytes() // (3 * 4 * n * x * y))
    slabs = [
        da.from_delayed(
            dask.delayed(_median_slab, pure=True)(source, start, min(start + thickness, z)),
            shape=(x, y, min(start + thickness, z) - start),
            dtype=np.float32,
        )
        for start in range(0, z, thickness)
    ]
    return slabs[0] if len(slabs) == 1 else da.concatenate(slabs, axis=2)


def _median_slab(source, start: int, stop: int) -> np.ndarray:
    """Task: the voxel-wise median of every volume of ``source`` over slices ``start:stop``."""
    return median_volume(source[:, :, start:stop, :])


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
    # the gradient files too: a .bval/.bvec written beside an output must not replace them
    gradient_files = (gradients_file,) if gradients_file is not None else (bvec_file, bval_file)
    source, fields = open_series(filename, brainmask_file, gradient_files, cache=cache)
    data = fields.pop("dataobj")
    table = read_gradients(
        bvec_file, bval_file, gradients_file, n_volumes=source.shape[3], affine=fields["affine"]
    )
    keep, bzero = split_b0(data, table)
    if keep.size == 0:
        # a DWI with fewer volumes than a model needs still loads (to convert, export or
        # inspect it); :func:`check_diffusion_volumes` is the estimation-time check
        raise InputError(
            f"no diffusion-weighted volumes: all {len(table)} b-values are at most "
            f"{b0_threshold():g} (nidask.b0-threshold)",
            source.path,
        )
    if b0_file is not None:
        b0_source = open_source(b0_file, cache=fields["cache"])
        if b0_source.shape[:3] != source.shape[:3] or b0_source.shape[3] != 1:
            raise InputError(
                f"b=0 file shape {b0_source.shape[:3]} differs from the series {source.shape[:3]}",
                b0_source.path,
            )
        bzero = b0_source.to_dask()[..., 0].astype(np.float32)
        fields["inputs"] += (b0_source.path,)
    b0_index = np.setdiff1d(np.arange(len(table)), keep)
    return DWI(
        dataobj=take_volumes(data, keep) if keep.size < len(table) else data,
        b0s=take_volumes(data, b0_index) if b0_index.size else None,
        b0_index=b0_index if b0_index.size else None,
        original_index=keep,
        gradients=table[keep],
        bzero=bzero,
        **fields,
    )
