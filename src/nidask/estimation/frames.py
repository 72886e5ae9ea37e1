"""One reference frame for a whole series: tying the frames of prediction groups.

A leave-one-out prediction sits in the mean position of the volumes it is made
from.  When volumes are predicted from different pools (the b-value shells of a
DWI, its b=0 volumes), the motion estimated for each pool is relative to that
pool's own mean position, and the pools drift apart.  :func:`tie_frames` finds one
rigid offset ``G_g`` per group and returns ``estimate @ G_g`` for every volume, so
that all estimates share the frame of the reference group (a DWI's b=0 template:
the mean of its b=0 volumes aligned to each other).

Two ways to measure the offsets:

``"temporal"``
    Head motion is continuous in time and the groups are interleaved in the
    acquisition (HCP interleaves shells and b=0 volumes), so in a common frame
    consecutive volumes of different groups sit almost at the same place.  The
    offsets are the least-absolute-deviation fit of ``p_i + g_a = p_j + g_b`` over
    time-adjacent pairs ``(i, j)`` (``p`` the rigid parameters), which ignores the
    rare sudden jumps.  This is the idea of FSL eddy's ``--use_b0s_for_peas``.
``"image"``
    Each group's mean prediction is registered to the next group's, in order of
    b-value from the reference's, with mutual information (eddy's default
    post-alignment of shells).  Contrast differences bias it by a few hundredths
    of a millimetre between neighbouring shells.

``"auto"`` takes the temporal fit when its own standard error is below
``temporal_precision`` (smooth motion, interleaved groups), else the image chain.
"""

from __future__ import annotations

import numpy as np
from scipy import optimize

from nidask.errors import InputError
from nidask.estimation.registration import RigidRegistration
from nidask.geometry import HEAD_RADIUS_MM, fov_center, rigid_matrix, rigid_params

METHODS = ("auto", "temporal", "image")

#: Mutual information as ANTs computes it, without smoothing at the finest level, on
#: up to 200,000 voxels (about 30 MB of samples; a whole HCP grid would take 500 MB).
IMAGE_REGISTRATION = RigidRegistration(
    metric="mi", smoothing=(2.0, 1.0, 0.0), max_samples=200_000, jitter=False
)


def _parameters(matrices, centre) -> np.ndarray:
    """(N, 6) rigid parameters (mm, radians) about ``centre``."""
    return np.array([rigid_params(m, center=centre) for m in matrices])


def temporal_offsets(
    matrices: np.ndarray, groups: np.ndarray, reference: int, centre, lags=(1, 2)
) -> tuple[dict, np.ndarray]:
    """Offsets ``{group: (6,) parameters}`` tying groups by temporal continuity.

    Returns the offsets and the standard error of each of the six parameters
    (from the spread of the pair residuals); groups without an adjacent volume of
    another group get no offset.
    """
    params = _parameters(matrices, centre)
    labels = [g for g in np.unique(groups) if g != reference]
    column = {g: k for k, g in enumerate(labels)}
    rows, differences = [], []
    for lag in lags:
        for i in range(len(groups) - lag):
            a, b = groups[i], groups[i + lag]
            if a == b:
                continue
            row = np.zeros(len(labels))
            if b != reference:
                row[column[b]] += 1.0
            if a != reference:
                row[column[a]] -= 1.0
            rows.append(row)
            differences.append(params[i] - params[i + lag])
    if not rows:
        return {}, np.full(6, np.inf)
    design, differences = np.array(rows), np.array(differences)
    connected = np.abs(design).sum(axis=0) > 0
    offsets = np.zeros((len(labels), 6))
    error = np.zeros(6)
    n_pairs, n_free = len(design), int(connected.sum())
    for k in range(6):
        offsets[connected, k] = _least_absolute(design[:, connected], differences[:, k])
        residual = differences[:, k] - design @ offsets[:, k]
        spread = 1.4826 * np.median(np.abs(residual))
        # the median's efficiency (pi / 2) and the pairs each offset rests on
        error[k] = spread * np.sqrt(np.pi / 2 * n_free / max(n_pairs - n_free, 1))
    return {g: offsets[column[g]] for g in labels if connected[column[g]]}, error


def _least_absolute(design: np.ndarray, target: np.ndarray) -> np.ndarray:
    """``argmin_x sum |design @ x - target|`` as a linear program."""
    n, m = design.shape
    eye = np.eye(n)
    result = optimize.linprog(
        np.r_[np.zeros(m), np.ones(n)],
        A_ub=np.block([[design, -eye], [-design, -eye]]),
        b_ub=np.r_[target, -target],
        bounds=[(None, None)] * m + [(0, None)] * n,
        method="highs",
    )
    if not result.success:  # pragma: no cover - the program is always feasible
        raise InputError(f"temporal frame tie failed: {result.message}")
    return result.x[:m]


def image_offsets(images: dict, order: list, affine, registration=IMAGE_REGISTRATION) -> dict:
    """Offsets ``{group: 4x4}`` from registering each group's image to the previous one.

    ``order`` lists the groups from the reference on (e.g. by b-value); ``images``
    maps each to a volume in its group's frame.  ``G`` satisfies
    ``reference(x) ~ image(G x)``.
    """
    offsets = {order[0]: np.eye(4)}
    full = np.ones(images[order[0]].shape, dtype=bool)
    for previous, group in zip(order[:-1], order[1:], strict=True):
        step = registration(images[previous], images[group], affine, mask=full)
        offsets[group] = offsets[previous] @ step
    return offsets


def tie_frames(
    matrices,
    groups,
    reference,
    affine,
    shape3d,
    *,
    method: str = "auto",
    images=None,
    group_order=None,
    temporal_precision: float = 0.1,
    radius: float = HEAD_RADIUS_MM,
    fallback: str = "image",
) -> tuple[np.ndarray, dict]:
    """Put every group's estimates in the reference group's frame.

    Parameters
    ----------
    matrices : ndarray (N, 4, 4)
        Estimates, each relative to its group's frame.
    groups : ndarray of int (N,)
        Prediction group of each volume, in acquisition order.
    reference : int or None
        The group whose frame is kept (without one, the first group in
        ``group_order``).
    affine, shape3d
        Grid of the volumes (rotations are about the centre of the field of view).
    method : {"auto", "temporal", "image"}
        See the module docstring.
    images : callable, optional
        ``images(group) -> volume`` in that group's frame (for ``"image"``).
    group_order : list, optional
        Groups from the reference on, for the image chain (default: sorted labels).
    temporal_precision : float
        Largest standard error (mm, rotations at ``radius``) of the temporal fit
        that ``"auto"`` accepts.
    fallback : {"image", "none"}
        What ``"auto"`` does when the temporal fit is not precise enough: the image
        chain, or nothing (when the frames are known to start tied, e.g. every
        estimate was started from the reference's motion, a biased tie is worse
        than none).

    Returns
    -------
    tied : ndarray (N, 4, 4)
    info : dict
        ``method`` used, ``offsets`` (group -> 6 parameters, mm and degrees) and the
        temporal fit's ``temporal_error`` (mm) when it was computed.
    """
    if method not in METHODS:
        raise InputError(f"unknown frame tie {method!r} (use one of {', '.join(METHODS)})")
    matrices = np.asarray(matrices, dtype=float)
    groups = np.asarray(groups)
    labels = list(group_order) if group_order is not None else sorted(np.unique(groups).tolist())
    if reference is None:
        reference = labels[0]
    if reference not in labels:
        raise InputError(f"reference group {reference} has no volumes")
    labels = [reference] + [g for g in labels if g != reference]
    info: dict = {"method": None, "offsets": {}}
    if len(labels) == 1:
        return matrices.copy(), info
    centre = fov_center(affine, shape3d)
    offsets = {}
    if method in ("auto", "temporal"):
        found, error = temporal_offsets(matrices, groups, reference, centre)
        scale = np.r_[1.0, 1.0, 1.0, radius, radius, radius]
        info["temporal_error"] = float(np.max(error * scale))
        complete = all(g in found for g in labels[1:])
        if method == "temporal" or (complete and info["temporal_error"] <= temporal_precision):
            offsets = {g: rigid_matrix(p, center=centre) for g, p in found.items()}
            info["method"] = "temporal"
    if info["method"] is None and method == "auto" and fallback == "none":
        info["method"] = "none"
    if info["method"] is None:
        if images is None:
            raise InputError("the image frame tie needs the groups' images")
        offsets = image_offsets({g: images(g) for g in labels}, labels, affine)
        info["method"] = "image"
    tied = matrices.copy()
    for g, offset in offsets.items():
        tied[groups == g] = matrices[groups == g] @ offset
    info["offsets"] = {
        int(g): np.r_[p[:3], np.degrees(p[3:])].tolist()
        for g, p in ((g, rigid_params(o, center=centre)) for g, o in offsets.items())
    }
    return tied, info


def interleaved(groups, reference, max_gap: int | None = None) -> bool:
    """Whether the reference group's volumes recur throughout the acquisition.

    True when it has at least three volumes and no run of other volumes (before
    the first, between two, after the last) is longer than ``max_gap`` (default: a
    quarter of the series).

    >>> interleaved([0, 1, 1, 0, 1, 1, 0, 1], 0), interleaved([0, 0, 0, 1, 1, 1, 1, 1], 0)
    (True, False)
    """
    if reference is None:
        return False
    positions = np.flatnonzero(np.asarray(groups) == reference)
    n = len(groups)
    if len(positions) < 3:
        return False
    max_gap = n // 4 if max_gap is None else max_gap
    gaps = np.diff(np.r_[-1, positions, n]) - 1
    return bool(gaps.max() <= max_gap)


def interpolate_in_time(matrices, known, affine, shape3d) -> np.ndarray:
    """Matrices of the unknown volumes from the known ones, linearly in time.

    Rigid parameters (about the centre of the field of view) are interpolated
    between the nearest known volumes before and after, and held constant beyond
    the first and last.
    """
    matrices = np.asarray(matrices, dtype=float)
    known = np.asarray(known, dtype=bool)
    centre = fov_center(affine, shape3d)
    times = np.flatnonzero(known)
    params = _parameters(matrices[known], centre)
    out = matrices.copy()
    for i in np.flatnonzero(~known):
        row = [np.interp(i, times, params[:, k]) for k in range(6)]
        out[i] = rigid_matrix(row, center=centre)
    return out


def recentre(matrices, selection, affine, shape3d) -> np.ndarray:
    """Matrices in the frame of the mean position of the ``selection`` volumes.

    The mean is taken over rigid parameters about the centre of the field of view;
    afterwards the selected volumes' parameters average to zero.
    """
    matrices = np.asarray(matrices, dtype=float)
    centre = fov_center(affine, shape3d)
    mean = _parameters(matrices[selection], centre).mean(axis=0)
    return matrices @ np.linalg.inv(rigid_matrix(mean, center=centre))
