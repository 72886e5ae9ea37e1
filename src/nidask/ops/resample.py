"""Per-volume rigid/affine resampling of 4D series as a deferred dask graph.

This module knows nothing about datasets or files: it turns an image affine, a stack
of motion matrices and a dask array into another dask array.

Convention
----------
A motion matrix ``A`` (4x4) maps *reference*-space RAS+ coordinates to *moving*-space
RAS+ coordinates (the nitransforms/nifreeze convention).  Output and input share the
same voxel grid (``affine``), so output voxel ``o`` (homogeneous index coordinates)
samples the input volume at::

    i = inv(affine) @ A @ affine @ o

Reading right to left: voxel index -> RAS+ in the reference, ``A`` -> RAS+ in the
moving (scanned) volume, ``inv(affine)`` -> voxel index of the moving volume.  The
product ``inv(affine) @ A @ affine`` is the *voxel matrix* of the volume and is what
:func:`scipy.ndimage.affine_transform` takes (linear part as ``matrix``, last column
as ``offset``).  For a single volume this reproduces::

    nitransforms.resampling.apply(nitransforms.linear.Affine(A), img, reference=img)

within float32 rounding: nitransforms builds the same coordinates explicitly and calls
:func:`scipy.ndimage.map_coordinates`, which shares scipy's interpolation kernel, its
float64 spline prefilter and its boundary handling with ``affine_transform``.

Differences from nitransforms, on purpose
-----------------------------------------
* The output is always float32.  nitransforms returns the input's dtype (an int16
  series comes back as int16); here integer volumes are interpolated in float64 by
  scipy and stored as float32, without rounding to integers.
* Voxel coordinates are computed from one precomputed 4x4 product instead of three
  successive matrix products; the coordinates differ by ~1e-13 voxel, which can only
  matter for ``order=0`` when a sample falls exactly half-way between voxels.
"""

from __future__ import annotations

import math
import operator

import dask.array as da
import numpy as np
from scipy import ndimage as ndi

from nidask.config import chunk_bytes
from nidask.errors import InputError
from nidask.geometry import check_matrix, check_matrix_stack
from nidask.io.sources import rechunk_volumes
from nidask.ops import kernels

__all__ = [
    "MODES",
    "block_affine",
    "block_mean",
    "check_order",
    "resample_series",
    "resample_volume",
    "rotate_bvecs",
    "volumes_per_task",
    "voxel_matrices",
]

MODES = (
    "constant",
    "nearest",
    "reflect",
    "mirror",
    "wrap",
    "grid-constant",
    "grid-mirror",
    "grid-wrap",
)
"""Boundary modes accepted by :func:`scipy.ndimage.affine_transform`."""

"""Largest accepted ratio between the largest and smallest singular values."""

_SNAP_ATOL = 1e-9
"""Voxel matrices within this of an integer matrix are taken as that matrix."""


# dtypes scipy.ndimage interpolates natively (integers are read as float64 inside
# scipy, so they need no conversion); anything else is converted to float32.
_NATIVE_KINDS = "iuf"


def check_order(order) -> int:
    """Validate a spline interpolation order.

    Parameters
    ----------
    order : int
        An integer from 0 (nearest neighbour) to 5.  Booleans and floats (even 3.0)
        are refused.

    Returns
    -------
    int
        The order as a Python int.

    Raises
    ------
    InputError
        If ``order`` is not an integer in 0..5.

    Examples
    --------
    >>> check_order(np.int64(3))
    3
    """
    if isinstance(order, (bool, np.bool_)):
        raise InputError(f"interpolation order must be an integer from 0 to 5, got {order!r}")
    try:
        value = operator.index(order)
    except TypeError:
        raise InputError(
            f"interpolation order must be an integer from 0 to 5, got {order!r}"
        ) from None
    if not 0 <= value <= 5:
        raise InputError(f"interpolation order must be an integer from 0 to 5, got {value}")
    return int(value)


def _check_mode(mode) -> str:
    if mode not in MODES:
        raise InputError(f"mode must be one of {', '.join(MODES)}; got {mode!r}")
    return mode


def voxel_matrices(affine, motion_affines) -> np.ndarray:
    """Turn per-volume motion matrices (RAS+ to RAS+) into voxel-to-voxel matrices.

    Parameters
    ----------
    affine : array-like, shape (4, 4)
        Voxel-to-RAS+ affine shared by the input and output grids.
    motion_affines : array-like, shape (N, 4, 4)
        Matrix ``A`` per volume, mapping reference RAS+ coordinates to moving RAS+
        coordinates.

    Returns
    -------
    numpy.ndarray, shape (N, 4, 4), float64
        ``inv(affine) @ A @ affine`` per volume: output voxel ``o`` samples the input
        volume at voxel ``matrix @ o``.

    Raises
    ------
    InputError
        If ``affine`` or any motion matrix fails :func:`check_matrix`, or the stack
        does not have shape (N, 4, 4).

    Examples
    --------
    A 2 mm translation along x moves the sampling position by one 2 mm voxel:

    >>> aff = np.diag([2.0, 2.0, 2.0, 1.0])
    >>> A = np.eye(4); A[0, 3] = 2.0
    >>> voxel_matrices(aff, A[None])[0, :3, 3]
    array([1., 0., 0.])

    Notes
    -----
    A matrix whose every entry is within 1e-9 of an integer (an identity, a shift
    by whole voxels, an axis flip) is rounded to that integer matrix, so that the
    floating-point noise of ``inv(affine) @ A @ affine`` cannot push grid-aligned
    samples a hair outside the volume (where ``mode="constant"`` returns ``cval``).
    Any other matrix is returned as computed.
    """
    aff = check_matrix(affine, name="affine")
    stack = check_matrix_stack(motion_affines)
    voxmats = np.linalg.inv(aff) @ stack @ aff
    # Snap matrices that are integer up to rounding noise (identity, whole-voxel
    # shifts): with mode="constant", scipy returns cval for any sample outside
    # [0, n - 1], even by 1e-15, so an identity computed through an oblique affine
    # would blank faces of the volume at random.
    snapped = np.round(voxmats)
    exact = np.all(np.abs(voxmats - snapped) <= _SNAP_ATOL, axis=(1, 2))
    voxmats[exact] = snapped[exact]
    return voxmats


def _as_interpolable(volume: np.ndarray) -> np.ndarray:
    """Return ``volume`` or a float32 copy if scipy.ndimage cannot read its dtype."""
    dtype = volume.dtype
    if dtype.kind not in _NATIVE_KINDS or dtype == np.float16:
        return volume.astype(np.float32)
    if not dtype.isnative:
        return volume.astype(dtype.newbyteorder("="))
    return volume


def _resample_into(volume, matrix, order, mode, cval, output, compiled, box=None) -> np.ndarray:
    """Resample one 3D volume into ``output`` (float32, same shape); no validation.

    ``compiled``: use :mod:`nidask.ops.kernels` (scipy's values, with numba), decided
    where the graph is built (:func:`nidask.ops.kernels.available`); else scipy.
    ``box`` (three slices): interpolate only the output voxels inside it, the others
    are ``cval``.
    """
    volume = _as_interpolable(volume)
    if box is not None:
        output[...] = cval
        start = np.array([b.start for b in box], dtype=float)
        shifted = np.array(matrix, dtype=float)  # output voxel o of the box is start + o
        shifted[:3, 3] += shifted[:3, :3] @ start
        source = _source_window(shifted, [b.stop - b.start for b in box], volume.shape)
        if source is not None:  # the input around what the box samples, and its corner
            volume = volume[source]
            shifted[:3, 3] -= [w.start for w in source]
        _resample_into(volume, shifted, order, mode, cval, output[box], compiled)
        return output
    if compiled:
        return kernels.affine_transform(volume, matrix, order, cval, output)
    return ndi.affine_transform(
        volume,
        matrix[:3, :3],
        offset=matrix[:3, 3],
        output=output,
        order=order,
        mode=mode,
        cval=cval,
        # scipy (like nitransforms, which calls map_coordinates with prefilter=True)
        # prefilters in float64; orders 0 and 1 have nothing to prefilter.
        prefilter=order > 1,
    )


#: Input voxels kept around what a box samples (:func:`_source_window`): a cubic
#: spline's prefilter reaches that far before its weight falls below 1e-5.
WINDOW_MARGIN = 10


def _source_window(matrix, box_shape, shape3d):
    """The window of the input (three slices) that output voxels ``0 .. box_shape``
    sample through ``matrix``, with :data:`WINDOW_MARGIN` voxels around it; ``None``
    when it is most of the input."""
    corners = np.array(
        [[(0, n - 1)[b >> k & 1] for k, n in enumerate(box_shape)] for b in range(8)], float
    )
    reached = corners @ matrix[:3, :3].T + matrix[:3, 3]
    low = np.maximum(np.floor(reached.min(axis=0)).astype(int) - WINDOW_MARGIN, 0)
    high = np.minimum(np.ceil(reached.max(axis=0)).astype(int) + 1 + WINDOW_MARGIN, shape3d)
    if np.any(high <= low) or np.prod(high - low) > 0.9 * np.prod(shape3d):
        return None
    return tuple(slice(int(a), int(b)) for a, b in zip(low, high, strict=True))


def resample_volume(
    volume, voxel_matrix, order: int = 3, mode: str = "constant", cval: float = 0.0, box=None
) -> np.ndarray:
    """Resample one 3D volume through a voxel-to-voxel matrix.

    Parameters
    ----------
    volume : numpy.ndarray, shape (X, Y, Z)
        Input volume, any real dtype (integers are interpolated in float64 by scipy,
        without a float32 copy; float16, booleans and non-native byte orders are
        converted to float32 / native order first).
    voxel_matrix : array-like, shape (4, 4)
        Output voxel ``o`` samples ``volume`` at ``voxel_matrix @ o``
        (see :func:`voxel_matrices`).
    order : int, optional
        Spline order, 0..5.
    mode : str, optional
        Boundary mode of :func:`scipy.ndimage.affine_transform` (see :data:`MODES`).
    cval : float, optional
        Value outside the input for ``mode="constant"`` / ``"grid-constant"``.
    box : tuple of three slices, optional
        Interpolate only the voxels inside it (see :func:`resample_series`).

    Returns
    -------
    numpy.ndarray, shape (X, Y, Z), float32

    Raises
    ------
    InputError
        On a non-3D volume, a bad matrix, order or mode.
    """
    volume = np.asarray(volume)
    if volume.ndim != 3:
        raise InputError(f"volume must be 3D, got shape {volume.shape}")
    if np.iscomplexobj(volume):
        raise InputError("volume must be real-valued, got a complex array")
    matrix = check_matrix(voxel_matrix, name="voxel_matrix")
    order = check_order(order)
    mode = _check_mode(mode)
    output = np.empty(volume.shape, dtype=np.float32)
    compiled = kernels.available(order, mode)
    box = check_box(box, volume.shape)
    return _resample_into(volume, matrix, order, mode, float(cval), output, compiled, box)


def _resample_block(block, matrices, order, mode, cval, compiled, box=None):
    """Dask task: resample the volumes of one (X, Y, Z, n) block.

    ``matrices`` is the (n, 4, 4) stack of voxel matrices of this block's volumes
    only.  The output is Fortran-ordered so that each volume is contiguous.
    """
    n = block.shape[-1]
    if matrices.shape[0] != n:  # pragma: no cover - guarded by resample_series
        raise InputError(f"block holds {n} volumes but {matrices.shape[0]} matrices")
    out = np.empty(block.shape, dtype=np.float32, order="F")
    for i in range(n):
        _resample_into(block[..., i], matrices[i], order, mode, cval, out[..., i], compiled, box)
    return out


def volumes_per_task(shape3d, dtype, order: int, budget: int | None = None) -> int:
    """Volumes per resampling task, so that a task's working set fits ``budget``.

    A task holds its input block, its float32 output block and one volume of
    scratch: scipy's float64 spline coefficients for ``order > 1``, or a float32
    copy of an input that scipy cannot read natively.  The default budget is half
    of ``nidask.chunk-size``: every task that holds more than its input keeps its
    working set within half the budget (see :func:`nidask.io.store.write_blocks`).

    >>> volumes_per_task((10, 10, 10), "int16", order=3, budget=60_000)
    8
    """
    voxels = math.prod(shape3d)
    dtype = np.dtype(dtype)
    native = dtype.kind in _NATIVE_KINDS and dtype != np.float16 and dtype.isnative
    scratch = voxels * (8 if order > 1 else 0 if native else 4)
    budget = chunk_bytes() // 2 if budget is None else budget
    return max(1, (budget - scratch) // (voxels * (dtype.itemsize + 4)))


def resample_series(
    data: da.Array,
    affine,
    motion_affines=None,
    order: int = 3,
    mode: str = "constant",
    cval: float = 0.0,
    box=None,
) -> da.Array:
    """Resample every volume of a 4D series with its own motion matrix, lazily.

    Parameters
    ----------
    data : dask.array.Array, shape (X, Y, Z, N)
        The series.  Chunks along the last axis may hold several whole volumes; the
        spatial axes should be single chunks (if not, they are merged into one chunk,
        and the output keeps the merged chunking).
    affine : array-like, shape (4, 4)
        Voxel-to-RAS+ affine of the series (input and output grid).
    motion_affines : array-like, shape (N, 4, 4), optional
        One matrix ``A`` per volume, mapping reference RAS+ to moving RAS+
        coordinates.  ``None`` means no motion: the result is
        ``data.astype(numpy.float32)`` and nothing is interpolated.
    order : int, optional
        Spline order, 0..5.
    mode : str, optional
        Boundary mode of :func:`scipy.ndimage.affine_transform` (see :data:`MODES`).
    cval : float, optional
        Value outside the field of view for ``mode="constant"``.
    box : tuple of three slices, optional
        Interpolate only the voxels inside this box of the grid (steps of 1), from
        the input within :data:`WINDOW_MARGIN` voxels of what they sample (the
        cubic spline's prefilter then differs from the whole volume's by less than
        1e-5 of the signal there); the others are ``cval``.  Where only part of the
        grid is read later (the brain a model learns from), this saves the
        interpolation of the rest.

    Returns
    -------
    dask.array.Array, shape (X, Y, Z, N), float32
        A deferred graph with one task per block of volumes.  Blocks are the input
        chunks, split where needed so that a task's input, output and scratch fit
        half of ``nidask.chunk-size`` (see :func:`volumes_per_task`).  Each task receives
        only the (n, 4, 4) voxel matrices of its own volumes.  When a matrix stack is given,
        every volume is interpolated, identity matrices included, so results do not
        depend on which matrices happen to be exact identities.

    Raises
    ------
    InputError
        On a non-4D array, unknown chunk sizes, a wrong number of matrices, or a bad
        affine, matrix, order or mode.  Nothing is computed to check these.
    """
    if not isinstance(data, da.Array):
        raise InputError(f"data must be a dask array, got {type(data).__name__}")
    if data.ndim != 4:
        raise InputError(f"data must be 4D (X, Y, Z, N), got shape {data.shape}")
    if any(np.isnan(c) for chunks in data.chunks for c in chunks):
        raise InputError("data has unknown chunk sizes; call compute_chunk_sizes() first")
    if np.iscomplexobj(np.empty(0, dtype=data.dtype)):
        raise InputError("data must be real-valued, got a complex array")
    order = check_order(order)
    mode = _check_mode(mode)
    cval = float(cval)
    check_matrix(affine, name="affine")
    if motion_affines is None:
        return data.astype(np.float32)

    box = check_box(box, data.shape[:3])
    voxmats = voxel_matrices(affine, motion_affines)
    if voxmats.shape[0] != data.shape[-1]:
        raise InputError(f"got {voxmats.shape[0]} motion matrices for {data.shape[-1]} volumes")
    if any(len(c) != 1 for c in data.chunks[:3]):
        data = data.rechunk({0: -1, 1: -1, 2: -1})
    data = rechunk_volumes(data, volumes_per_task(data.shape[:3], data.dtype, order))

    # from_array slices a numpy array into one small array per chunk at graph
    # construction, so each task embeds only the matrices of its own volumes.
    matrices = da.from_array(voxmats, chunks=(data.chunks[3], 4, 4))
    return da.blockwise(
        _resample_block,
        "ijkn",
        data,
        "ijkn",
        matrices,
        "nab",
        concatenate=True,
        dtype=np.float32,
        meta=np.empty((0, 0, 0, 0), dtype=np.float32),
        order=order,
        mode=mode,
        cval=cval,
        # read here, where the graph is built, like every nidask setting
        compiled=kernels.available(order, mode),
        box=box,
    )


def check_box(box, shape3d):
    """``box`` as three slices with steps of 1 inside ``shape3d`` (``None`` stays ``None``).

    >>> check_box((slice(1, 4), slice(None), slice(0, 99)), (5, 6, 7))
    (slice(1, 4, None), slice(0, 6, None), slice(0, 7, None))
    """
    if box is None:
        return None
    try:
        slices = tuple(box)
        if len(slices) != 3 or not all(isinstance(b, slice) for b in slices):
            raise TypeError
        ranges = [b.indices(int(n)) for b, n in zip(slices, shape3d, strict=True)]
    except (TypeError, ValueError):
        raise InputError(f"box must be three slices of the grid, got {box!r}") from None
    if any(step != 1 or stop <= start for start, stop, step in ranges):
        raise InputError(f"box must be three non-empty slices with step 1, got {box!r}")
    return tuple(slice(start, stop) for start, stop, _ in ranges)


def rotate_bvecs(bvecs, motion_affines) -> np.ndarray:
    """Rotate RAS+ b-vectors into the realigned reference space.

    A volume acquired with the head at ``A`` (reference RAS+ to moving RAS+) saw the
    scanner's gradient ``g`` along ``R^T g`` of the reference anatomy, ``R`` the
    rotation of ``A`` (its nearest rotation, for a matrix with an eddy-current or
    other non-rigid part: only the rotation turns a direction).  All-zero vectors
    stay zero.

    Parameters
    ----------
    bvecs : array-like, shape (N, 3)
        One RAS+ direction per volume (:func:`nidask.geometry.fsl_to_ras` turns an
        FSL table into these).
    motion_affines : array-like, shape (N, 4, 4)
        Motion matrices ``A`` (reference RAS+ to moving RAS+), as for
        :func:`resample_series`.

    Returns
    -------
    numpy.ndarray, shape (N, 3), float64

    Raises
    ------
    InputError
        On shape mismatches, non-finite b-vectors, or bad matrices.

    Examples
    --------
    >>> A = np.eye(4); A[:2, :2] = [[0.0, -1.0], [1.0, 0.0]]  # 90 degrees about z
    >>> rotate_bvecs([[1.0, 0.0, 0.0]], A[None]).round(12) + 0.0
    array([[ 0., -1.,  0.]])
    """
    try:
        b = np.array(bvecs, dtype=np.float64, copy=True)
    except (TypeError, ValueError) as exc:
        raise InputError(f"bvecs must be a numeric (N, 3) array ({exc})") from None
    if b.ndim != 2 or b.shape[1] != 3:
        raise InputError(f"bvecs must have shape (N, 3), got {b.shape}")
    if not np.all(np.isfinite(b)):
        raise InputError("bvecs has non-finite (NaN or infinite) entries")
    stack = check_matrix_stack(motion_affines)
    if stack.shape[0] != b.shape[0]:
        raise InputError(f"got {stack.shape[0]} motion matrices for {b.shape[0]} b-vectors")
    u, _, vt = np.linalg.svd(stack[:, :3, :3])
    rotations = u @ vt
    rotated = np.einsum("nji,nj->ni", rotations, b)  # R^T b
    norms = np.linalg.norm(rotated, axis=1)
    nonzero = np.any(b != 0.0, axis=1)
    rotated[nonzero] /= norms[nonzero, None]
    rotated[~nonzero] = 0.0
    return rotated


def block_mean(image: np.ndarray, factor: int) -> np.ndarray:
    """Float32 means of cubic blocks of ``factor`` voxels a side (edge-padded to fit).

    ``factor`` 1 returns ``image`` itself.  Block ``(i, j, k)`` is centred on voxel
    ``factor * (i, j, k) + (factor - 1) / 2`` of ``image`` (see :func:`block_affine`).
    """
    if factor == 1:
        return image
    if kernels.enabled():
        return kernels.block_mean(image, factor)
    pad = [(0, -s % factor) for s in image.shape]
    if any(after for _, after in pad):
        image = np.pad(image, pad, mode="edge")
    x, y, z = (s // factor for s in image.shape)
    blocks = image.reshape(x, factor, y, factor, z, factor)
    return blocks.mean(axis=(1, 3, 5), dtype=np.float32)


def block_affine(factor: int) -> np.ndarray:
    """Voxel-to-voxel affine from a :func:`block_mean` grid to the grid it averages."""
    scale = np.diag([float(factor)] * 3 + [1.0])
    scale[:3, 3] = (factor - 1) / 2.0  # a block's centre
    return scale
