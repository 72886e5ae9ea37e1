"""Eddy-current distortion: FSL eddy's first-level ``linear`` model, fitted with the motion.

The eddy currents a diffusion gradient leaves behind add a field whose first-order part
displaces every voxel along the phase-encoding (PE) direction ``e`` by an amount linear
in its position::

    d(u) = c0 + ci * ui + cj * uj + ck * uk       (mm)

where ``(ui, uj, uk)`` are the coordinates (mm) of the point along the image's voxel axes
``i, j, k`` from the centre of the field of view; the PE axis counts along the PE
direction (for ``"j-"``, towards ``-j``), so that the image is stretched along PE by
``1 + c_pe`` (the Jacobian that modulates its intensity).  ``c0`` is a shift, the
coefficient along PE a scaling and the two others shears.  The field is fixed in the
scanner while the head moves, so a volume acquired with head motion ``M`` (rigid,
reference RAS -> scanner RAS) and eddy-current part ``E`` (scanner RAS -> distorted RAS,
an affine map) has the *whole* matrix ``W = E @ M`` in the motion-matrix convention
(reference RAS mm -> acquired RAS mm): resampling the volume with ``W`` undoes both.

Estimation (:class:`EddyRegistration`): each diffusion-weighted volume is registered
with the six rigid parameters and the three slopes jointly, the cost's exact gradient
chained through the composed map: to the b=0 template with mutual information in the
estimator's anchor (:mod:`nidask.estimation.anchor`), then to its leave-one-out
prediction in any pass after it.  The template is the reference that holds no eddy
currents: on real anatomy with 2 x 16 directions, fitting against the first pass's
predictions alone (from data still distorted, whose distortion a model of the
gradient direction partly predicts) left twice the error (docs/benchmarks.md).  A
shift ``c0`` moves the image exactly as a translation along PE does, so the
registration keeps ``c0 = 0`` and lets the translation carry both; eddy's second level
then tells them apart (:func:`separate_offsets`): the shift of real eddy currents is a
linear function of the diffusion gradient, head motion is not.  The whole matrix does
not depend on that split; the motion table and the coefficients do.  b=0 volumes
have no eddy currents: their matrices stay rigid.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import stats

from nidask.config import b0_threshold
from nidask.errors import InputError
from nidask.estimation.anchor import MI_REGISTRATION
from nidask.estimation.registration import (
    MattesCost,
    NCCCost,
    RigidRegistration,
    rigid_gradient,
)
from nidask.geometry import (
    EddyFrame,
    check_phase_encoding,
    eddy_frame,
    eddy_matrix,
    eddy_stretch,
    fov_center,
    rigid_matrix,
    rigid_params,
    rotation_and_derivatives,
    split_eddy,
)

__all__ = [
    "COLUMNS",
    "MODELS",
    "EddyRegistration",
    "anchor_registration",
    "compose",
    "decompose",
    "gradient_vectors",
    "joint_registrations",
    "motion_part",
    "referenced",
    "report_entry",
    "separate_offsets",
]

#: Eddy-current models (FSL eddy's first level).
MODELS = ("linear",)
#: The linear model's coefficients: the shift (mm) and the displacement per mm of
#: position along each voxel axis (mm/mm), see the module docstring.
COLUMNS = ("shift_mm", "i_mm_per_mm", "j_mm_per_mm", "k_mm_per_mm")
#: Fewest diffusion-weighted volumes from which shifts are told from translations.
MIN_SEPARATION_VOLUMES = 8
#: Shifts are told from translations only when their fit is significant at this level.
SEPARATION_P = 0.01


def compose(motion, coefficients, frame: EddyFrame) -> np.ndarray:
    """Whole matrices ``E @ M``: motion (N, 4, 4) and coefficients (N, 4) composed."""
    motion = np.asarray(motion, dtype=float)
    coefficients = np.asarray(coefficients, dtype=float)
    return np.stack([eddy_matrix(c, frame) @ m for m, c in zip(motion, coefficients, strict=True)])


def gradient_vectors(gradients) -> np.ndarray:
    """Each volume's diffusion gradient (N, 3): its direction times ``sqrt(b / b_max)``.

    The eddy currents of a gradient scale with its amplitude, which goes with
    ``sqrt(b)`` for one diffusion time; b=0 rows are zero.
    """
    table = np.asarray(gradients, dtype=float)
    b = np.clip(table[:, 3], 0.0, None)
    top = float(b.max()) if len(b) else 0.0
    scale = np.sqrt(b / top) if top > 0 else np.zeros(len(b))
    return table[:, :3] * scale[:, None]


def separate_offsets(motion, coefficients, frame: EddyFrame, vectors, weighted) -> np.ndarray:
    """Eddy's second level for the shift: each volume's ``c0`` from its PE translation.

    ``motion`` and ``coefficients`` are :func:`~nidask.geometry.split_eddy`'s, where
    the translation ``t'`` carries the shift too: ``(1 + c_pe) e.t' = (1 + c_pe) e.t +
    c0``.  Across the diffusion-weighted volumes (``weighted``) that is fitted as a
    constant head position ``e.t`` plus a linear function of the gradient ``vectors``
    (:func:`gradient_vectors`), the shift.  Returns ``c0`` per volume (zero for the
    others, and for all when fewer than :data:`MIN_SEPARATION_VOLUMES` volumes are
    diffusion-weighted or the fit is not significant at :data:`SEPARATION_P`, an F
    test: large independent head motion hides the shifts, and fitting it would take
    the motion table further from the truth than leaving the shift in the
    translation does).
    """
    weighted = np.asarray(weighted, dtype=bool)
    out = np.zeros(len(weighted))
    if weighted.sum() < MIN_SEPARATION_VOLUMES:
        return out
    c = np.append(frame.centre, 1.0)
    e = frame.direction
    along = np.array([e @ ((m @ c)[:3] - frame.centre) for m in np.asarray(motion)[weighted]])
    stretch = 1.0 + np.asarray(coefficients, dtype=float)[weighted, 1 + frame.axis]
    q = np.asarray(vectors, dtype=float)[weighted]
    design = np.column_stack([stretch, q])
    target = stretch * along
    coef = np.linalg.lstsq(design, target, rcond=None)[0]
    # head motion that hides the shifts (large, independent jumps) leaves no
    # significant fit: the shift stays in the translation then
    alone = np.sum((target - stretch * (target @ stretch) / (stretch @ stretch)) ** 2)
    residual = np.sum((target - design @ coef) ** 2)
    dof = len(q) - 4
    f = ((alone - residual) / 3) / max(residual / dof, 1e-30)
    if stats.f.sf(f, 3, dof) > SEPARATION_P:
        return out
    out[weighted] = q @ coef[1:]
    return out


def decompose(estimates, gradients, frame: EddyFrame, weighted) -> tuple[np.ndarray, np.ndarray]:
    """Whole matrices (N, 4, 4) as motion parts and coefficients (N, 4).

    ``weighted`` marks the diffusion-weighted volumes; the others are rigid (their
    matrices are the motion, coefficients zero).  Shifts and translations are told
    apart by :func:`separate_offsets`; ``compose(*decompose(...))`` gives the
    matrices back.
    """
    estimates = np.asarray(estimates, dtype=float)
    weighted = np.asarray(weighted, dtype=bool)
    motion, coefficients = estimates.copy(), np.zeros((len(estimates), 4))
    for i in np.flatnonzero(weighted):
        motion[i], coefficients[i] = split_eddy(estimates[i], frame)
    offsets = separate_offsets(motion, coefficients, frame, gradient_vectors(gradients), weighted)
    for i in np.flatnonzero(weighted):
        # the shift leaves the translation: L t' = L t + e c0
        linear = eddy_stretch(coefficients[i, 1:], frame)
        motion[i, :3, 3] -= np.linalg.solve(linear, frame.direction) * offsets[i]
        coefficients[i, 0] = offsets[i]
    return motion, coefficients


def report_entry(phase_encoding: str, coefficients) -> dict:
    """The estimator report's ``eddy_currents`` entry (one row per file volume)."""
    return {
        "phase_encoding": check_phase_encoding(phase_encoding),
        "model": "linear",
        "columns": list(COLUMNS),
        "coefficients": [[float(v) for v in row] for row in np.asarray(coefficients)],
    }


def motion_part(matrices, entry: dict, affine, shape3d) -> np.ndarray:
    """The motion parts ``inv(E) @ W`` of whole matrices, given a report's entry."""
    frame = eddy_frame(affine, shape3d, entry["phase_encoding"])
    coefficients = np.asarray(entry["coefficients"], dtype=float)
    matrices = np.asarray(matrices, dtype=float)
    if coefficients.shape != (len(matrices), len(COLUMNS)):
        raise InputError(
            f"{len(coefficients)} rows of eddy-current coefficients for {len(matrices)} volumes"
        )
    return np.stack(
        [
            np.linalg.solve(eddy_matrix(c, frame), m)
            for m, c in zip(matrices, coefficients, strict=True)
        ]
    )


# --------------------------------------------------------------------------------------
# Joint registration


class _Joint:
    """A rigid cost evaluated through ``W = E @ M``: six rigid parameters, three slopes.

    The shift is left to the translation (:func:`nidask.geometry.split_eddy`).  The
    map of a fixed point ``x`` is ``y = c + L (R (x - c) + t)`` with ``L = I + e (F a)^T``, so the
    rigid sampler runs with ``L R`` and ``L t``; the slopes ``S`` of the cost with
    respect to ``y`` give ``dt = L^T S_0``, ``dr`` as for a rigid map of ``L^T S``
    and ``da = F^T (R h_p + t h_0)`` with ``h = e^T S``.
    """

    frame: EddyFrame

    def __call__(self, z: np.ndarray) -> tuple[float, np.ndarray]:
        params = np.asarray(z, dtype=np.float64) * self.scale
        rot, d_rot = rotation_and_derivatives(params[3:6])
        linear = eddy_stretch(params[6:], self.frame)
        moved = np.concatenate([linear @ params[:3], params[3:6]])
        cost, slopes = self.cost_and_slopes(moved, linear @ rot)
        grad = np.empty(9)
        grad[:6] = rigid_gradient(linear.T @ slopes, d_rot)
        h = self.frame.direction @ slopes
        grad[6:] = self.frame.axes.T @ (rot @ h[1:] + params[:3] * h[0])
        return cost, grad * self.scale


class _JointNCC(_Joint, NCCCost):
    def __init__(self, level, inv_aff, center, scale, bins, frame):
        super().__init__(level, inv_aff, center, scale, bins)
        self.frame = frame


class _JointMattes(_Joint, MattesCost):
    def __init__(self, level, inv_aff, center, scale, bins, frame):
        super().__init__(level, inv_aff, center, scale, bins)
        self.frame = frame


@dataclass(frozen=True)
class EddyRegistration(RigidRegistration):
    """Rigid motion and a linear eddy-current field, registered jointly.

    The :class:`~nidask.estimation.registration.RigidRegistration` of every option
    (levels, metric, sampling), with three more parameters: the slopes of the
    displacement along ``phase_encoding`` (see the module docstring), scaled for the
    optimiser like rotations (one unit moves a point ``radius`` mm from the centre by
    one mm).  The result is the whole matrix ``E @ M`` (shift left to the
    translation); ``init`` may be any such matrix (:func:`nidask.geometry.split_eddy`).
    """

    phase_encoding: str = "j"

    def __post_init__(self) -> None:
        super().__post_init__()
        object.__setattr__(self, "phase_encoding", check_phase_encoding(self.phase_encoding))
        if self.phase_encoding is None:
            raise InputError("EddyRegistration needs a phase-encoding direction")

    @classmethod
    def from_rigid(cls, registration: RigidRegistration, phase_encoding: str):
        """The joint twin of a rigid registration (same options)."""
        if not isinstance(registration, RigidRegistration):
            raise InputError(
                "eddy-current estimation needs nidask's rigid registration, got "
                f"{type(registration).__name__}"
            )
        if isinstance(registration, EddyRegistration):
            return registration
        fields = {name: getattr(registration, name) for name in registration.__dataclass_fields__}
        return cls(**fields, phase_encoding=phase_encoding)

    def register(self, fixed, moving, affine, mask=None, init=None) -> tuple[np.ndarray, dict]:
        """Register ``moving`` to ``fixed``; see :meth:`RigidRegistration.register`.

        The quality also holds ``eddy_slopes`` (mm/mm along ``i, j, k``).
        """
        fixed32, moving32, aff, mask = self._check(fixed, moving, affine, mask)
        center = fov_center(aff, fixed32.shape)
        frame = eddy_frame(aff, fixed32.shape, self.phase_encoding)
        params = np.zeros(9)
        if init is not None:
            motion, coefficients = split_eddy(init, frame)
            params = np.concatenate([rigid_params(motion, center=center), coefficients[1:]])
        scale = np.array([1.0] * 3 + [1.0 / self.radius] * 6)
        cost_class = _JointNCC if self.metric == "ncc" else _JointMattes
        params, quality = self._pyramid(
            fixed32, moving32, aff, mask, center, params, scale, cost_class, frame
        )
        quality["eddy_slopes"] = [float(v) for v in params[6:]]
        motion = rigid_matrix(params[:6], center=center)
        return eddy_matrix(np.concatenate([[0.0], params[6:]]), frame) @ motion, quality


# --------------------------------------------------------------------------------------
# What the estimator asks


def joint_registrations(registrations, dataset, anchored: bool) -> list:
    """The estimator's registrations turned joint, once ``dataset`` is known to allow it.

    Raises
    ------
    InputError
        When ``dataset`` is not a DWI with a phase-encoding direction and b=0 volumes
        (the anchor: the b=0 template is the reference of the first fit).
    """
    path = (getattr(dataset, "inputs", ()) or (None,))[0]
    if not hasattr(dataset, "gradients"):
        raise InputError("eddy-current estimation applies to diffusion series (a DWI)", path)
    if getattr(dataset, "phase_encoding", None) is None:
        raise InputError(
            "eddy-current estimation needs the phase-encoding direction: give "
            "phase_encoding='j-' (or 'j', 'i', ...; --phase-encoding) or a BIDS sidecar "
            "with PhaseEncodingDirection",
            path,
        )
    if not anchored:
        raise InputError(
            "eddy-current estimation needs b=0 volumes (the anchor: anchor='auto')", path
        )
    return [EddyRegistration.from_rigid(r, dataset.phase_encoding) for r in registrations]


def anchor_registration(dataset) -> EddyRegistration:
    """The joint twin of the anchor's mutual-information registration to the b=0 template."""
    return EddyRegistration.from_rigid(MI_REGISTRATION, dataset.phase_encoding)


def referenced(estimates, dataset, to_reference) -> tuple[np.ndarray, dict]:
    """Whole matrices in the estimator's reference frame, and the report's entry.

    ``to_reference(dataset, matrices)`` changes the frame of the motion parts; the
    eddy-current parts stay in the scanner's.
    """
    frame = eddy_frame(dataset.affine, dataset.shape3d, dataset.phase_encoding)
    weighted = dataset.gradients[:, 3] > b0_threshold()
    motion, coefficients = decompose(estimates, dataset.gradients, frame, weighted)
    whole = compose(to_reference(dataset, motion), coefficients, frame)
    return whole, report_entry(dataset.phase_encoding, coefficients)
