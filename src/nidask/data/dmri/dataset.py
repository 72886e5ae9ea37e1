"""The :class:`DWI` dataset: diffusion-weighted volumes, their b=0 volumes set aside.

A volume is a *b=0* when its b-value is at most ``nidask.b0-threshold``
(:data:`nidask.config.B0_THRESHOLD`).  The b=0 volumes leave ``dataobj`` (a deferred
selection) and are summarised in ``bzero``.
"""

from __future__ import annotations

import attrs
import dask
import dask.array as da
import numpy as np

from nidask.config import b0_threshold, chunk_bytes
from nidask.data.base import BaseDataset, interleave_volumes, take_volumes
from nidask.data.dmri.gradients import (
    find_shells,
    normalize_gradients,
)
from nidask.errors import InputError
from nidask.geometry import (
    check_phase_encoding,
    eddy_frame,
    fsl_to_ras,
    ras_to_fsl,
    split_eddy,
)
from nidask.io.sources import source_of


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
    phase_encoding : str, optional
        Phase-encoding direction as BIDS writes it (``"j"``, ``"j-"``, ``"i"``, ...;
        voxel axes of the grid): where eddy currents displace the voxels
        (:mod:`nidask.estimation.eddy`).
    """

    gradients: np.ndarray = attrs.field(default=None, validator=_check_gradients, kw_only=True)
    bzero: np.ndarray | da.Array | None = attrs.field(default=None, kw_only=True)
    b0s: da.Array | None = attrs.field(default=None, kw_only=True)
    b0_index: np.ndarray | None = attrs.field(default=None, kw_only=True)
    b0_motion_affines: np.ndarray | None = attrs.field(default=None, kw_only=True)
    phase_encoding: str | None = attrs.field(default=None, kw_only=True)

    volume_fields = (*BaseDataset.volume_fields, "gradients")
    nfdh5_type = "dmri"
    nfdh5_file_type = "dmri"
    private_fields = (
        *BaseDataset.private_fields,
        "b0s",
        "b0_index",
        "b0_motion_affines",
        "phase_encoding",
    )
    export_sidecars = (".bval", ".bvec")

    def __attrs_post_init__(self) -> None:
        super().__attrs_post_init__()
        self.phase_encoding = check_phase_encoding(self.phase_encoding)
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
            gradients[:, :3] = rotate_bvecs(self.bvecs, self._motion_parts())
            fields["gradients"] = gradients
        if self.b0s is not None and self.b0_motion_affines is not None:
            fields["b0s"] = resample_series(
                self.b0s, self.affine, self.b0_motion_affines, order=order, mode=mode, cval=cval
            )
            fields["b0_motion_affines"] = None
        return fields

    def _motion_parts(self) -> np.ndarray:
        """The motion matrices without their eddy-current part, where they have one.

        With a phase-encoding direction, a non-rigid matrix is split into its
        eddy-current part and the head's motion (:func:`nidask.geometry.split_eddy`):
        only the head's rotation turns the gradient it saw.
        """
        matrices = self.motion_affines
        if self.phase_encoding is None:
            return matrices
        frame = eddy_frame(self.affine, self.shape3d, self.phase_encoding)
        out = matrices.copy()
        for i, m in enumerate(matrices):
            if not np.allclose(m[:3, :3].T @ m[:3, :3], np.eye(3), atol=1e-9):
                out[i] = split_eddy(m, frame)[0]
        return out

    def volume_meta(self) -> dict:
        return {"gradients": self.gradients}

    def voxel_meta(self) -> dict:
        return {} if self.bzero is None else {"bzero": self.bzero}

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

    def stored_fields(self) -> dict:
        """NFDH5 fields; ``gradients`` in nifreeze's frame, FSL's numbers (voxel axes)."""
        fields = super().stored_fields()
        gradients = fields["gradients"].copy()
        gradients[:, :3] = ras_to_fsl(gradients[:, :3], self.affine)
        fields["gradients"] = gradients
        if "_phase_encoding" in fields:  # HDF5 fields are numbers: its ASCII codes
            fields["_phase_encoding"] = np.frombuffer(self.phase_encoding.encode(), np.uint8)
        return fields

    @classmethod
    def from_stored(cls, data, fields, *, path, cache) -> DWI:
        """A DWI from its NFDH5 fields; b=0 volumes still in ``dataobj`` are set aside."""
        if "phase_encoding" in fields:
            codes = np.asarray(fields["phase_encoding"]).astype(np.uint8).reshape(-1)
            fields["phase_encoding"] = check_phase_encoding(codes.tobytes().decode(), path)
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
            aside = b0_set_aside(
                data,
                fields["gradients"],
                positions=fields.get("original_index"),
                motion=fields.get("motion_affines"),
            )
            if "b0s" in fields:  # stored apart: the b=0 volumes kept in the file are copies
                aside = {k: v for k, v in aside.items() if not k.startswith("b0")}
            data = aside.pop("dataobj")
            fields.update({k: v for k, v in aside.items() if k != "bzero"})
            fields.setdefault("bzero", aside["bzero"])
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
        if series.motion_affines is not None:
            # an eddy-current stretch spreads a volume's signal over more voxels (its
            # Jacobian, the whole matrix's determinant, as motion's is 1): scale it back
            jacobian = np.abs(np.linalg.det(series.motion_affines[:, :3, :3]))
            if not np.allclose(jacobian, 1.0, rtol=0, atol=1e-9):
                data = data * jacobian.astype(np.float32)
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


def b0_set_aside(data: da.Array, gradients: np.ndarray, positions=None, motion=None) -> dict:
    """The :class:`DWI` fields of a series whose b=0 volumes are still among its volumes.

    ``dataobj``, ``gradients``, ``original_index`` (and ``motion_affines``) of the
    diffusion-weighted volumes, ``bzero`` (:func:`split_b0`), and ``b0s``,
    ``b0_index`` (and ``b0_motion_affines``) of the b=0 volumes.  ``positions``
    are the volumes' indices in the file (default: their order) and ``motion`` their
    matrices.
    """
    n = data.shape[3]
    keep, bzero = split_b0(data, gradients)
    if keep.size == 0:
        # a DWI with fewer volumes than a model needs still loads (to convert, export or
        # inspect it); :func:`check_diffusion_volumes` is the estimation-time check
        raise InputError(
            f"no diffusion-weighted volumes: all {n} b-values are at most "
            f"{b0_threshold():g} (nidask.b0-threshold)"
        )
    positions = np.arange(n) if positions is None else np.asarray(positions)
    b0 = np.setdiff1d(np.arange(n), keep)
    fields = {
        "dataobj": take_volumes(data, keep) if b0.size else data,
        "gradients": gradients[keep],
        "original_index": positions[keep],
        "bzero": bzero,
    }
    if motion is not None:
        fields["motion_affines"] = np.asarray(motion)[keep]
    if b0.size:
        fields.update(b0s=take_volumes(data, b0), b0_index=positions[b0])
        if motion is not None:
            fields["b0_motion_affines"] = np.asarray(motion)[b0]
    return fields


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
