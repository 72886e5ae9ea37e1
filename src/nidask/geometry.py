"""Geometry of rigid motion, and the one validator of affines and matrix stacks.

Everything here is plain numpy and knows nothing of datasets or files; every layer
of nidask may use it.

Motion-matrix convention
------------------------
A matrix ``A`` (4x4) maps reference-space (fixed) RAS millimetre coordinates to
moving-space RAS coordinates (nitransforms/nifreeze; docs/concepts.md, "Motion
matrices"): resampling the moving volume at output voxel ``o`` samples it at
``inv(affine) @ A @ affine @ o``.

Rigid parameters
----------------
Six numbers ``(tx, ty, tz, rx, ry, rz)``: translations in mm and rotation angles in
radians.  With a centre ``c`` (world mm; the world origin if not given)::

    A @ x = R @ (x - c) + c + t,      R = Rz(rz) @ Ry(ry) @ Rx(rx)

so ``t = A(c) - c`` is the displacement of the centre and the rotation is applied
about ``x`` first, then ``y``, then ``z`` (right-handed, counter-clockwise when
looking down the positive axis).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from numpy.typing import ArrayLike

from nidask.errors import InputError

#: Radius (mm) at which rotations count as displacement: framewise displacement, the
#: registration's parameter scaling, the estimator's changes (a head's, as in Power
#: et al., 2012).
HEAD_RADIUS_MM = 50.0
#: Voxels closer than this (mm) to a grid's faces are left out of registration and
#: outlier scoring: anatomy there moves in and out of the field of view, and what is
#: sampled beyond the grid is made up (a BOLD slab's first and last slices).
EDGE_MARGIN_MM = 4.0

__all__ = [
    "PHASE_ENCODINGS",
    "EddyFrame",
    "check_affine",
    "check_matrix",
    "check_matrix_stack",
    "check_phase_encoding",
    "eddy_frame",
    "eddy_matrix",
    "eddy_stretch",
    "fov_center",
    "fsl_to_ras",
    "framewise_displacement",
    "inner_grid",
    "motion_parameters",
    "motion_table",
    "ras_to_fsl",
    "rigid_matrix",
    "rigid_params",
    "rotation_and_derivatives",
    "split_eddy",
]

_MAX_COND = 1e10


_LAST_ROW = np.array([0.0, 0.0, 0.0, 1.0])


def check_matrix(matrix, *, name: str = "matrix") -> np.ndarray:
    """Validate a homogeneous 4x4 affine matrix.

    Parameters
    ----------
    matrix : array-like
        The candidate matrix.
    name : str, optional
        How to call the matrix in error messages.

    Returns
    -------
    numpy.ndarray
        A float64 (4, 4) copy.  A last row within 1e-8 of ``[0, 0, 0, 1]`` is set to
        exactly ``[0, 0, 0, 1]``.

    Raises
    ------
    InputError
        If the matrix is not numeric, not 4x4, has non-finite entries, its last row is
        not ``[0, 0, 0, 1]``, or it is not invertible (the singular values of its 3x3
        linear part span more than 10 orders of magnitude, or are all zero).

    Examples
    --------
    >>> check_matrix(np.eye(4)).dtype
    dtype('float64')
    >>> check_matrix(np.zeros((4, 4)))
    Traceback (most recent call last):
    ...
    nidask.errors.InputError: matrix must be [0, 0, 0, 1] in its last row, got [0. 0. 0. 0.]
    """
    try:
        out = np.array(matrix, dtype=np.float64, copy=True)
    except (TypeError, ValueError) as exc:
        raise InputError(f"{name} must be a numeric 4x4 matrix ({exc})") from None
    if out.shape != (4, 4):
        raise InputError(f"{name} must be a 4x4 matrix, got shape {out.shape}")
    if not np.all(np.isfinite(out)):
        raise InputError(f"{name} has non-finite (NaN or infinite) entries")
    if not np.allclose(out[3], _LAST_ROW, rtol=0.0, atol=1e-8):
        raise InputError(f"{name} must be [0, 0, 0, 1] in its last row, got {out[3]}")
    out[3] = _LAST_ROW
    # With that last row, the 4x4 matrix is invertible iff its 3x3 linear part is.
    # A condition number (scale-free, unlike the determinant) decides "numerically".
    sv = np.linalg.svd(out[:3, :3], compute_uv=False)
    if not sv[0] > 0.0 or sv[-1] <= sv[0] / _MAX_COND:
        raise InputError(
            f"{name} is singular or nearly so (singular values of its 3x3 part: {sv})"
        )
    return out


def check_matrix_stack(motion_affines, name: str = "motion_affines") -> np.ndarray:
    try:
        stack = np.array(motion_affines, dtype=np.float64, copy=True)
    except (TypeError, ValueError) as exc:
        raise InputError(f"{name} must be a numeric (N, 4, 4) array ({exc})") from None
    if stack.ndim != 3 or stack.shape[1:] != (4, 4):
        raise InputError(f"{name} must have shape (N, 4, 4), got {stack.shape}")
    for i, mat in enumerate(stack):
        stack[i] = check_matrix(mat, name=f"{name}[{i}]")
    return stack


def check_affine(affine, path: str | None = None, what: str = "affine") -> np.ndarray:
    """:func:`check_matrix` for an image's voxel-to-world affine read from ``path``."""
    try:
        return check_matrix(affine, name=what)
    except InputError as exc:
        raise InputError(exc.problem, path) from None


def _axis_rotations(angles: ArrayLike) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rx, ry, rz = (float(a) for a in angles)
    cx, sx, cy, sy, cz, sz = (
        math.cos(rx),
        math.sin(rx),
        math.cos(ry),
        math.sin(ry),
        math.cos(rz),
        math.sin(rz),
    )
    rot_x = np.array([[1.0, 0.0, 0.0], [0.0, cx, -sx], [0.0, sx, cx]])
    rot_y = np.array([[cy, 0.0, sy], [0.0, 1.0, 0.0], [-sy, 0.0, cy]])
    rot_z = np.array([[cz, -sz, 0.0], [sz, cz, 0.0], [0.0, 0.0, 1.0]])
    return rot_x, rot_y, rot_z


def _rotation(angles: ArrayLike) -> np.ndarray:
    rot_x, rot_y, rot_z = _axis_rotations(angles)
    return rot_z @ rot_y @ rot_x


def rotation_and_derivatives(angles: ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    """``R = Rz @ Ry @ Rx`` and ``dR/d(rx, ry, rz)`` stacked as shape (3, 3, 3)."""
    rot_x, rot_y, rot_z = _axis_rotations(angles)
    # d/dθ of a rotation about axis k is G_k @ R_k with G_k the generator (cross matrix).
    gen_x = np.array([[0.0, 0.0, 0.0], [0.0, 0.0, -1.0], [0.0, 1.0, 0.0]])
    gen_y = np.array([[0.0, 0.0, 1.0], [0.0, 0.0, 0.0], [-1.0, 0.0, 0.0]])
    gen_z = np.array([[0.0, -1.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, 0.0]])
    rot = rot_z @ rot_y @ rot_x
    d_rot = np.stack(
        [
            rot_z @ rot_y @ gen_x @ rot_x,
            rot_z @ gen_y @ rot_y @ rot_x,
            gen_z @ rot,
        ]
    )
    return rot, d_rot


def _center(center: ArrayLike | None) -> np.ndarray:
    if center is None:
        return np.zeros(3)
    c = np.asarray(center, dtype=np.float64).reshape(-1)
    if c.shape != (3,):
        raise InputError(f"a rotation centre needs 3 coordinates, got shape {c.shape}")
    return c


def rigid_matrix(params: ArrayLike, center: ArrayLike | None = None) -> np.ndarray:
    """Build a rigid 4x4 matrix from six parameters.

    Parameters
    ----------
    params : array-like, shape (6,)
        ``(tx, ty, tz, rx, ry, rz)``: translations in mm, rotation angles in radians.
    center : array-like, shape (3,), optional
        Rotation centre in world (RAS mm) coordinates; the world origin by default.

    Returns
    -------
    ndarray, shape (4, 4), float64
        ``A`` with ``A @ x = R @ (x - c) + c + t`` and ``R = Rz(rz) @ Ry(ry) @ Rx(rx)``.

    Examples
    --------
    >>> A = rigid_matrix([1.0, 0.0, 0.0, 0.0, 0.0, np.pi / 2], center=[10.0, 0.0, 0.0])
    >>> np.round(A @ [10.0, 0.0, 0.0, 1.0], 6).tolist()  # the centre only translates
    [11.0, 0.0, 0.0, 1.0]
    >>> np.round(A @ [11.0, 0.0, 0.0, 1.0], 6).tolist()
    [11.0, 1.0, 0.0, 1.0]
    """
    p = np.asarray(params, dtype=np.float64).reshape(-1)
    if p.shape != (6,):
        raise InputError(f"rigid parameters must be 6 numbers, got shape {p.shape}")
    c = _center(center)
    rot = _rotation(p[3:])
    out = np.eye(4)
    out[:3, :3] = rot
    out[:3, 3] = p[:3] + c - rot @ c
    return out


def _nearest_rotation(matrix: np.ndarray) -> np.ndarray:
    u, _, vt = np.linalg.svd(matrix)
    d = np.sign(np.linalg.det(u @ vt)) or 1.0
    return u @ np.diag([1.0, 1.0, d]) @ vt


def rigid_params(A: ArrayLike, center: ArrayLike | None = None) -> np.ndarray:
    """Decompose a 4x4 matrix into six rigid parameters (inverse of :func:`rigid_matrix`).

    Parameters
    ----------
    A : array-like, shape (4, 4)
        Motion matrix. A non-rigid linear part is replaced by its nearest rotation
        (polar decomposition); translations stay exact: ``t = A(c) - c``.
    center : array-like, shape (3,), optional
        Rotation centre in world coordinates; the world origin by default.

    Returns
    -------
    ndarray, shape (6,)
        ``(tx, ty, tz, rx, ry, rz)`` in mm and radians, with ``ry`` in
        ``[-pi/2, pi/2]`` (the Euler decomposition is unique away from ``|ry| = pi/2``).
    """
    m = np.asarray(A, dtype=np.float64)
    if m.shape != (4, 4):
        raise InputError(f"a motion matrix must be 4x4, got shape {m.shape}")
    c = _center(center)
    rot = m[:3, :3]
    if not np.allclose(rot.T @ rot, np.eye(3), atol=1e-6):
        rot = _nearest_rotation(rot)
    ry = math.asin(float(np.clip(-rot[2, 0], -1.0, 1.0)))
    if abs(rot[2, 0]) < 1.0 - 1e-12:
        rx = math.atan2(rot[2, 1], rot[2, 2])
        rz = math.atan2(rot[1, 0], rot[0, 0])
    else:  # gimbal lock: only rx - rz (or rx + rz) is defined; put it all in rx
        rz = 0.0
        rx = math.atan2(-rot[1, 2], rot[1, 1])
    t = m[:3, :3] @ c + m[:3, 3] - c
    return np.array([t[0], t[1], t[2], rx, ry, rz])


def _voxel_axes_rotation(affine) -> tuple[np.ndarray, bool]:
    """The orthonormal part of an affine's linear part, and whether FSL flips x.

    Polar decomposition keeps the handedness: an LAS image (``det < 0``) gives a
    reflection, whose columns are the voxel axes' RAS directions.
    """
    linear = np.asarray(affine, dtype=np.float64)[:3, :3]
    u, _, vt = np.linalg.svd(linear)
    return u @ vt, bool(np.linalg.det(linear) > 0)


def fsl_to_ras(bvecs: ArrayLike, affine: ArrayLike) -> np.ndarray:
    """Directions of an FSL ``.bvec`` table (N, 3) as RAS+ unit vectors.

    FSL's b-vectors are along the image's voxel axes, with the x component negated
    when the affine's determinant is positive (FSL's radiological voxel frame; the
    convention nibabel, dipy and MRtrix document).  Zero vectors (b=0) stay zero.

    >>> las = np.diag([-2.0, 2.0, 2.0, 1.0])  # dcm2niix's usual frame: no flip
    >>> fsl_to_ras([[1.0, 0.0, 0.0]], las) + 0.0
    array([[-1.,  0.,  0.]])
    >>> fsl_to_ras([[1.0, 0.0, 0.0]], np.diag([2.0, 2.0, 2.0, 1.0])) + 0.0  # RAS: flipped
    array([[-1.,  0.,  0.]])
    """
    rotation, flip = _voxel_axes_rotation(affine)
    voxel = np.array(bvecs, dtype=np.float64, ndmin=2)
    if flip:
        voxel[:, 0] = -voxel[:, 0]
    return _unit_rows(voxel @ rotation.T)


def ras_to_fsl(bvecs: ArrayLike, affine: ArrayLike) -> np.ndarray:
    """RAS+ directions (N, 3) as FSL ``.bvec`` numbers for an image of ``affine``.

    The inverse of :func:`fsl_to_ras`.

    >>> oblique = rigid_matrix([0, 0, 0, 0.1, -0.2, 0.3]) @ np.diag([1.5, 2.0, 2.5, 1.0])
    >>> v = np.array([[0.0, 0.6, 0.8]])
    >>> bool(np.allclose(fsl_to_ras(ras_to_fsl(v, oblique), oblique), v))
    True
    """
    rotation, flip = _voxel_axes_rotation(affine)
    voxel = np.array(bvecs, dtype=np.float64, ndmin=2) @ rotation
    if flip:
        voxel[:, 0] = -voxel[:, 0]
    return _unit_rows(voxel)


def _unit_rows(vectors: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    return np.divide(vectors, norms, out=np.zeros_like(vectors), where=norms > 0)


def fov_center(affine: ArrayLike, shape: Sequence[int]) -> np.ndarray:
    """World (RAS mm) coordinates of the centre of a voxel grid.

    Parameters
    ----------
    affine : array-like, shape (4, 4)
        Voxel-to-world affine.
    shape : sequence of int
        Grid shape; only the first three entries are used.

    Returns
    -------
    ndarray, shape (3,)
        ``affine @ ((shape - 1) / 2)``, the centre of the field of view.
    """
    aff = np.asarray(affine, dtype=np.float64)
    ijk = (np.asarray(shape[:3], dtype=np.float64) - 1.0) / 2.0
    return aff[:3, :3] @ ijk + aff[:3, 3]


def inner_grid(affine: ArrayLike, shape: Sequence[int], margin_mm: float = EDGE_MARGIN_MM):
    """The voxels of a grid at least ``margin_mm`` from its faces (a boolean array).

    At most a quarter of an axis is cut from each of its ends, so a small grid keeps
    its middle.

    >>> inner = inner_grid(np.eye(4) * 2, (20, 20, 8), 4.0)
    >>> inner.shape, int(inner.sum()), bool(inner[1, 10, 4]), bool(inner[2, 10, 4])
    ((20, 20, 8), 1536, False, True)
    """
    zooms = np.linalg.norm(np.asarray(affine, dtype=np.float64)[:3, :3], axis=0)
    shape = tuple(int(v) for v in shape[:3])
    cut = [
        min(int(np.ceil(margin_mm / z)), (s - 1) // 4) for z, s in zip(zooms, shape, strict=True)
    ]
    inner = np.zeros(shape, dtype=bool)
    inner[tuple(slice(c, s - c) for c, s in zip(cut, shape, strict=True))] = True
    return inner


def motion_parameters(
    A: ArrayLike, affine: ArrayLike, shape: Sequence[int] | None = None
) -> np.ndarray:
    """Report a motion matrix as translations (mm) and rotations (degrees).

    Parameters
    ----------
    A : array-like, shape (4, 4)
        Motion matrix (reference RAS -> moving RAS).
    affine : array-like, shape (4, 4)
        Voxel-to-world affine of the reference grid.
    shape : sequence of int, optional
        Shape of the reference grid. When given, rotations are about the centre of
        the field of view (:func:`fov_center`) and the translations are the
        displacement of that centre, which is what a reader expects for head motion.
        Without it, the centre cannot be located and the world origin (scanner
        isocentre) is used instead.

    Returns
    -------
    ndarray, shape (6,)
        ``(tx, ty, tz, rx, ry, rz)``: mm, then degrees, in the parameter convention
        of :func:`rigid_matrix` (``R = Rz @ Ry @ Rx``).
    """
    center = None if shape is None else fov_center(affine, shape)
    p = rigid_params(A, center=center)
    p[3:] = np.degrees(p[3:])
    return p


def framewise_displacement(
    affines: ArrayLike, radius: float = HEAD_RADIUS_MM, center: ArrayLike | None = None
) -> np.ndarray:
    """Framewise displacement (Power et al., 2012) of a series of motion matrices.

    ``FD[i] = sum(|Δt|) + radius * sum(|Δr|)`` between consecutive volumes, with
    translations in mm and rotations in radians from :func:`rigid_params`;
    ``FD[0] = 0``.

    Parameters
    ----------
    affines : array-like, shape (N, 4, 4)
        One motion matrix per volume.
    radius : float
        Radius (mm) of the sphere that turns rotations into displacements.
    center : array-like, shape (3,), optional
        Rotation centre in world coordinates (e.g. :func:`fov_center`); the world
        origin by default, as with realignment parameters of SPM/FSL-style tools.

    Returns
    -------
    ndarray, shape (N,)
        Framewise displacement in mm.

    Examples
    --------
    >>> A = np.stack([np.eye(4), rigid_matrix([1, 0, 0, 0, 0, 0.01])])
    >>> framewise_displacement(A).round(6).tolist()
    [0.0, 1.5]
    """
    mats = np.asarray(affines, dtype=np.float64)
    if mats.ndim != 3 or mats.shape[1:] != (4, 4):
        raise InputError(f"expected an (N, 4, 4) stack of matrices, got shape {mats.shape}")
    if len(mats) == 0:
        return np.zeros(0)
    params = np.stack([rigid_params(m, center=center) for m in mats])
    diffs = np.abs(np.diff(params, axis=0))
    fd = diffs[:, :3].sum(axis=1) + radius * diffs[:, 3:].sum(axis=1)
    return np.concatenate([[0.0], fd])


def motion_table(affines, affine, shape3d, radius: float = HEAD_RADIUS_MM) -> np.ndarray:
    """(N, 7) array: tx, ty, tz (mm), rx, ry, rz (degrees), framewise displacement (mm).

    Parameters are about the centre of the field of view (see
    :func:`nidask.estimation.registration.motion_parameters`); so is the framewise
    displacement (``radius`` mm sphere).
    """
    affines = np.asarray(affines, dtype=float)
    if affines.ndim != 3 or affines.shape[1:] != (4, 4) or len(affines) == 0:
        raise InputError(f"motion matrices must be an (N, 4, 4) stack, got shape {affines.shape}")
    params = np.array([motion_parameters(a, affine, shape3d) for a in affines])
    fd = framewise_displacement(affines, radius=radius, center=fov_center(affine, shape3d))
    return np.column_stack([params, fd])


# --------------------------------------------------------------------------------------
# Eddy-current geometry: FSL eddy's linear model (see nidask.estimation.eddy)
#
# A field that displaces each voxel along the phase-encoding direction ``e`` by
# ``c0 + ci ui + cj uj + ck uk`` mm, ``u`` the position (mm) along the voxel axes from
# the centre of the field of view (the PE axis counted along ``e``), is the affine map
# ``E`` with linear part ``I + e (F a)^T``; a volume's whole matrix is ``E @ M``.


#: Phase-encoding directions as BIDS writes them (``PhaseEncodingDirection``).
PHASE_ENCODINGS = ("i", "i-", "j", "j-", "k", "k-")


def check_phase_encoding(value, path: str | None = None) -> str | None:
    """A phase-encoding direction as BIDS writes it (``"j"``, ``"j-"``, ...), or ``None``.

    >>> check_phase_encoding("J-"), check_phase_encoding(None)
    ('j-', None)
    """
    if value is None:
        return None
    text = str(value).strip().lower()
    if text not in PHASE_ENCODINGS:
        raise InputError(
            f"unknown phase-encoding direction {value!r} "
            f"(use one of {', '.join(PHASE_ENCODINGS)})",
            path,
        )
    return text


@dataclass(frozen=True)
class EddyFrame:
    """Where an eddy-current field lives: the centre and axes of the field of view.

    ``axes`` (3, 3) holds, as columns, the RAS directions of the voxel axes ``i, j, k``
    (the orthonormal part of the affine), the PE axis turned along the PE direction;
    ``axis`` is the PE axis.
    """

    centre: np.ndarray
    axes: np.ndarray
    axis: int

    @property
    def direction(self) -> np.ndarray:
        """The unit RAS vector along which voxels are displaced."""
        return self.axes[:, self.axis]


def eddy_frame(affine, shape3d, phase_encoding: str) -> EddyFrame:
    """The :class:`EddyFrame` of a grid for a phase-encoding direction (``"j-"``, ...).

    >>> frame = eddy_frame(np.diag([-2.0, 2.0, 2.0, 1.0]), (10, 10, 10), "j-")
    >>> frame.direction.tolist(), int(frame.axis)
    ([-0.0, -1.0, -0.0], 1)
    """
    pe = check_phase_encoding(phase_encoding)
    if pe is None:
        raise InputError("eddy-current estimation needs the phase-encoding direction")
    linear = np.asarray(affine, dtype=np.float64)[:3, :3]
    u, _, vt = np.linalg.svd(linear)
    axes = u @ vt
    axis = "ijk".index(pe[0])
    if pe.endswith("-"):
        axes = axes.copy()
        axes[:, axis] = -axes[:, axis]
    return EddyFrame(fov_center(affine, shape3d), axes, axis)


def eddy_stretch(slopes, frame: EddyFrame) -> np.ndarray:
    """The linear part ``I + e (F a)^T`` of the eddy-current map of ``slopes`` (3, 3)."""
    return np.eye(3) + np.outer(frame.direction, frame.axes @ np.asarray(slopes, dtype=float))


def eddy_matrix(coefficients, frame: EddyFrame) -> np.ndarray:
    """The eddy-current part ``E`` (4, 4; scanner RAS -> distorted RAS) of four coefficients.

    >>> frame = eddy_frame(np.eye(4), (11, 11, 11), "j")
    >>> E = eddy_matrix([0.5, 0.0, 0.01, 0.0], frame)
    >>> (E @ [5.0, 5.0, 5.0, 1.0]).tolist(), float(np.linalg.det(E))  # 1 + c_pe
    ([5.0, 5.5, 5.0, 1.0], 1.01)
    """
    c = np.asarray(coefficients, dtype=float)
    linear = eddy_stretch(c[1:], frame)
    out = np.eye(4)
    out[:3, :3] = linear
    out[:3, 3] = frame.centre - linear @ frame.centre + frame.direction * c[0]
    return out


def split_eddy(matrix, frame: EddyFrame) -> tuple[np.ndarray, np.ndarray]:
    """A whole matrix as ``(M, coefficients)`` with the shift ``c0 = 0``.

    ``W = E @ M`` with ``E``'s linear part ``L = I + e b^T`` and ``M`` rigid is unique
    up to the shift, which moves the image as a translation along PE does: it is left
    in ``M``'s translation here (see :func:`nidask.estimation.eddy.separate_offsets`).  From
    ``W W^T = L L^T``: ``b`` off ``e`` is ``(I - e e^T) S e`` and along it the small
    root of ``beta^2 + 2 beta + |b_off|^2 = e^T S e``, with ``S = A A^T - I``.  A
    matrix that is not of that form gets the nearest rotation.

    >>> frame = eddy_frame(np.eye(4), (11, 11, 11), "j")
    >>> M = rigid_matrix([1, 2, 3, 0.01, -0.02, 0.03], center=frame.centre)
    >>> W = eddy_matrix([0.0, 0.01, -0.02, 0.015], frame) @ M
    >>> motion, c = split_eddy(W, frame)
    >>> bool(np.allclose(motion, M)), np.round(c, 12).tolist()
    (True, [0.0, 0.01, -0.02, 0.015])
    """
    w = np.asarray(matrix, dtype=float)
    a = w[:3, :3]
    e = frame.direction
    s = a @ a.T - np.eye(3)
    across = s @ e - e * (e @ s @ e)
    beta = -1.0 + math.sqrt(max(1.0 + float(e @ s @ e) - float(across @ across), 1e-12))
    b = across + beta * e
    inverse = np.eye(3) - np.outer(e, b) / (1.0 + beta)
    rotation = inverse @ a
    if not np.allclose(rotation.T @ rotation, np.eye(3), atol=1e-9):
        u, _, vt = np.linalg.svd(rotation)
        rotation = u @ np.diag([1.0, 1.0, np.sign(np.linalg.det(u @ vt)) or 1.0]) @ vt
    c = frame.centre
    motion = np.eye(4)
    motion[:3, :3] = rotation
    # the centre moves by L t: t = inv(L) (W(c) - c)
    t = inverse @ (a @ c + w[:3, 3] - c)
    motion[:3, 3] = t + c - rotation @ c
    return motion, np.concatenate([[0.0], frame.axes.T @ b])
