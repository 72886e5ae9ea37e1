"""Compare estimated head motion with a known truth (phantoms, simulations).

An estimator reports motion in *its* reference frame: with ``reference="model"``
the frame of the model's predictions (roughly the average head position), with
``reference=k`` the frame of volume ``k``.  A phantom's truth is relative to the
motion-free anatomy.  The two frames differ by one rigid offset ``C`` shared by
every volume: ``estimated[i] ~= true[i] @ C``.  :func:`motion_errors` estimates
``C`` robustly (the median of the per-volume offsets' parameters), removes it and
reports what is left, volume by volume, as a translation (mm, displacement of the
centre of the field of view) and a rotation angle (degrees).

>>> import numpy as np
>>> from nidask.estimation.registration import rigid_matrix
>>> true = np.stack([rigid_matrix([i, 0, 0, 0, 0, 0.01 * i]) for i in range(4)])
>>> offset = rigid_matrix([0.5, -1.0, 0.0, 0.02, 0.0, 0.0])
>>> errors = motion_errors(true @ offset, true, np.eye(4), (10, 10, 10))
>>> round(errors["translation_mm_max"], 9), round(errors["rotation_deg_max"], 6)
(0.0, 0.0)
"""

from __future__ import annotations

import numpy as np

from nidask.errors import InputError
from nidask.geometry import fov_center, motion_parameters, rigid_matrix

__all__ = [
    "bound_errors",
    "common_offset",
    "motion_errors",
    "registration_bound",
    "rotation_angle",
]


def _stack(matrices, name: str) -> np.ndarray:
    array = np.asarray(matrices, dtype=float)
    if array.ndim != 3 or array.shape[1:] != (4, 4):
        raise InputError(f"{name} must be an (N, 4, 4) stack of matrices, got {array.shape}")
    if not np.all(np.isfinite(array)):
        raise InputError(f"{name} has non-finite values")
    return array


def rotation_angle(matrix) -> float:
    """Angle (degrees) of the rotation part of a 4x4 (or 3x3) matrix.

    >>> round(rotation_angle(rigid_matrix([5, 0, 0, 0, 0, np.radians(2)])), 9)
    2.0
    """
    rotation = np.asarray(matrix, dtype=float)[:3, :3]
    cosine = (np.trace(rotation) - 1.0) / 2.0
    return float(np.degrees(np.arccos(np.clip(cosine, -1.0, 1.0))))


def common_offset(estimated, true, affine, shape3d) -> np.ndarray:
    """The rigid offset ``C`` with ``estimated[i] ~= true[i] @ C`` for most volumes.

    The median, parameter by parameter, of ``inv(true[i]) @ estimated[i]`` (about
    the centre of the field of view), so a few badly estimated volumes do not move
    it.
    """
    estimated, true = _stack(estimated, "estimated"), _stack(true, "true")
    centre = fov_center(affine, shape3d)
    params = np.array(
        [
            motion_parameters(np.linalg.inv(t) @ e, affine, shape3d)
            for e, t in zip(estimated, true, strict=True)
        ]
    )
    median = np.median(params, axis=0)
    return rigid_matrix(np.r_[median[:3], np.radians(median[3:])], center=centre)


def motion_errors(estimated, true, affine, shape3d, *, align: bool = True, mask=None) -> dict:
    """Per-volume error of estimated motion matrices against the truth.

    Parameters
    ----------
    estimated, true : array-like (N, 4, 4)
        Motion matrices (reference RAS -> moving RAS), one per volume, in the same
        volume order (for a DWI, ``true = phantom.motion[dataset.original_index]``).
    affine : array-like (4, 4)
        Voxel-to-RAS affine of the grid.
    shape3d : sequence of int
        Grid shape; errors are measured at the centre of the field of view.
    align : bool
        Remove the common rigid offset between the two frames first (see the
        module docstring).  Without it the raw difference is reported.
    mask : ndarray of bool (X, Y, Z), optional
        A brain mask: also report ``displacement_mm``, each volume's mean
        displacement over the brain mask: the distance (mm) by which the volume's
        residual motion (after the offset is removed) moves each voxel centre of the
        mask, averaged over those voxels.

    Returns
    -------
    dict
        ``translation_mm`` and ``rotation_deg`` (arrays, per volume), their
        ``*_median`` and ``*_max`` (floats), ``worst_volume`` (position of the
        largest translation error), ``offset`` (the 4x4 ``C`` removed) and
        ``offset_parameters`` (its tx, ty, tz in mm, rx, ry, rz in degrees).
    """
    estimated, true = _stack(estimated, "estimated"), _stack(true, "true")
    if estimated.shape != true.shape:
        raise InputError(
            f"{len(estimated)} estimated matrices but {len(true)} true ones "
            "(for a DWI, select the truth with dataset.original_index)"
        )
    if len(estimated) == 0:
        raise InputError("no matrices to compare")
    offset = common_offset(estimated, true, affine, shape3d) if align else np.eye(4)
    centre = np.append(fov_center(affine, shape3d), 1.0)
    inverse_offset = np.linalg.inv(offset)
    translation, rotation = [], []
    for e, t in zip(estimated, true, strict=True):
        residual = np.linalg.inv(t) @ e @ inverse_offset
        translation.append(float(np.linalg.norm((residual @ centre - centre)[:3])))
        rotation.append(rotation_angle(residual))
    translation, rotation = np.array(translation), np.array(rotation)
    extra = {}
    if mask is not None:
        mask = np.asarray(mask, dtype=bool)
        if mask.shape != tuple(shape3d):
            raise InputError(f"mask shape {mask.shape} differs from the grid {tuple(shape3d)}")
        points = np.asarray(affine, dtype=float) @ np.vstack(
            [np.argwhere(mask).T, np.ones(mask.sum())]
        )
        displacement = []
        for e, t in zip(estimated, true, strict=True):
            residual = np.linalg.inv(t) @ e @ inverse_offset
            displacement.append(
                float(np.linalg.norm((residual @ points - points)[:3], axis=0).mean())
            )
        displacement = np.array(displacement)
        extra = {
            "displacement_mm": displacement,
            "displacement_mm_median": float(np.median(displacement)),
            "displacement_mm_max": float(displacement.max()),
        }
    return {
        "n_volumes": len(estimated),
        "translation_mm": translation,
        "rotation_deg": rotation,
        "translation_mm_median": float(np.median(translation)),
        "translation_mm_max": float(translation.max()),
        "rotation_deg_median": float(np.median(rotation)),
        "rotation_deg_max": float(rotation.max()),
        "worst_volume": int(np.argmax(translation)),
        "offset": offset,
        "offset_parameters": motion_parameters(offset, affine, shape3d),
        **extra,
    }


def registration_bound(volume, affine, sigma: float, mask=None) -> np.ndarray:
    """Cramér–Rao bound of rigid registration: the best precision the data allow.

    Registering a volume observed with white Gaussian noise of standard deviation
    ``sigma`` to its own noise-free image (the best reference any estimator could
    have) leaves an error whose covariance no unbiased method can beat:
    ``inv(J.T @ J) * sigma**2``, where row ``x`` of ``J`` is the derivative of the
    image at voxel ``x`` with respect to the six rigid parameters about the centre
    of the field of view: ``grad I(x)`` for the translations, ``r(x) x grad I(x)``
    for the rotations (``r`` the position relative to the centre).  Estimators that
    register to a model prediction (itself noisy and imperfect) do worse.

    Parameters
    ----------
    volume : array-like (X, Y, Z)
        The noise-free volume.
    affine : array-like (4, 4)
        Voxel-to-RAS affine (mm).
    sigma : float
        Noise standard deviation, in the volume's units.
    mask : array-like of bool (X, Y, Z), optional
        The voxels that carry the estimate (default: all).

    Returns
    -------
    ndarray (6, 6)
        Covariance of ``(tx, ty, tz)`` in mm and ``(rx, ry, rz)`` in radians.

    Examples
    --------
    A bright cube of 10 mm voxels, noise of 1 % of its contrast:

    >>> cube = np.zeros((20, 20, 20)); cube[6:14, 5:15, 7:13] = 1.0
    >>> cube = __import__("scipy").ndimage.gaussian_filter(cube, 1.0)
    >>> cov = registration_bound(cube, np.diag([10.0, 10, 10, 1]), sigma=0.01)
    >>> bool(np.sqrt(cov[0, 0]) < 0.1)  # about a hundredth of a voxel
    True
    """
    volume = np.asarray(volume, dtype=np.float64)
    affine = np.asarray(affine, dtype=float)
    if volume.ndim != 3:
        raise InputError(f"registration_bound needs a 3D volume, got shape {volume.shape}")
    if not sigma > 0:
        raise InputError(f"the noise sigma must be positive, got {sigma}")
    mask = np.ones(volume.shape, bool) if mask is None else np.asarray(mask, dtype=bool)
    if mask.shape != volume.shape:
        raise InputError(f"mask shape {mask.shape} differs from the volume's {volume.shape}")
    voxel_gradient = np.stack([g[mask] for g in np.gradient(volume)], axis=1)
    # d/dx_world = inv(M).T d/dx_voxel, M the affine's linear part
    gradient = voxel_gradient @ np.linalg.inv(affine[:3, :3])
    position = (
        np.argwhere(mask) @ affine[:3, :3].T + affine[:3, 3] - fov_center(affine, volume.shape)
    )
    jacobian = np.concatenate([gradient, np.cross(position, gradient)], axis=1)
    information = jacobian.T @ jacobian / float(sigma) ** 2
    return np.linalg.pinv(information)


def bound_errors(covariances, draws: int = 200, seed: int = 0) -> dict:
    """Errors an estimator at the bound would report, in :func:`motion_errors`' terms.

    Draws ``draws`` error sets from the covariances (one per volume, from
    :func:`registration_bound`) and reports the median over volumes and draws of
    the translation (mm) and rotation (degrees) error, and the median over draws of
    the worst volume's.

    Parameters
    ----------
    covariances : array-like (N, 6, 6)
        One parameter covariance per volume.
    draws : int
        Monte-Carlo draws.
    seed : int
        Seed of the draws.

    Returns
    -------
    dict
        ``translation_mm_median``, ``translation_mm_max``, ``rotation_deg_median``
        and ``rotation_deg_max``.
    """
    covariances = np.asarray(covariances, dtype=float)
    if covariances.ndim != 3 or covariances.shape[1:] != (6, 6):
        raise InputError(f"covariances must be (N, 6, 6), got {covariances.shape}")
    rng = np.random.default_rng(seed)
    factors = np.linalg.cholesky(covariances + 1e-18 * np.eye(6))
    errors = np.einsum("nij,dnj->dni", factors, rng.standard_normal((draws, len(factors), 6)))
    translation = np.linalg.norm(errors[..., :3], axis=-1)
    rotation = np.degrees(np.linalg.norm(errors[..., 3:], axis=-1))
    return {
        "translation_mm_median": float(np.median(translation)),
        "translation_mm_max": float(np.median(translation.max(axis=1))),
        "rotation_deg_median": float(np.median(rotation)),
        "rotation_deg_max": float(np.median(rotation.max(axis=1))),
    }
