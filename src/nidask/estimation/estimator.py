"""Leave-one-volume-out head-motion estimation on any dask scheduler, resumable.

The estimator corrects every volume of the file (:meth:`BaseDataset.whole_series`:
a DWI's b=0 volumes too).  Each pass

1. materializes the training series once (pass 1: the data as they are; later
   passes: the data resampled with the previous estimates, b-vectors rotated with
   them) as a volume-contiguous ``.npy``,
2. writes its masked voxels once as a voxel-major matrix,
3. fits the model's shared parameters on a voxel sample (``model.prepare``, e.g.
   the Gaussian process's hyperparameters) and predicts **every** left-out volume,
   block of voxels by block,
4. registers each observed volume to its prediction — one dask task per fold,
   reading both by path — and records the matrix and its quality,
5. ties the frames of the prediction groups together (:mod:`nidask.estimation.frames`): a
   DWI's shells are brought into the frame of its b=0 template.

Passes repeat until the largest change of any volume's estimate is below
``tolerance`` (or ``passes`` is reached).  Everything lives in a run directory: a
run interrupted at any point and started again with the same directory skips
every step and fold already recorded and ends with the same matrices.

Reference frame
---------------
Matrices follow the motion-matrix convention (reference RAS -> moving RAS; see
docs/concepts.md, "Motion matrices").  With ``reference="template"`` (the default)
the reference is the mean position of the reference group's volumes (a DWI's b=0
volumes after they are aligned to each other, i.e. the frame of the b=0 template),
or of all volumes when the model has no reference group (PET, BOLD, a DWI without
b=0).  ``reference=k`` puts the frame of file volume ``k`` (of the whole series) at
the identity.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil

import attrs
import dask
import numpy as np
from dask.base import tokenize
from scipy import ndimage

from nidask.config import chunk_bytes, volumes_per_chunk
from nidask.errors import InputError
from nidask.estimation import outliers as outlier_slices
from nidask.estimation.anchor import TEMPLATE_ROUNDS, anchor_estimates, remove_earlier_templates
from nidask.estimation.defaults import check_estimable, default_model
from nidask.estimation.eddy import anchor_registration, joint_registrations, referenced
from nidask.estimation.frames import (
    METHODS,
    interleaved,
    interpolate_in_time,
    recentre,
    tie_frames,
)
from nidask.estimation.lofo import (
    bounding_box,
    fold_order,
    grow_mask,
    mask_index,
    read_column,
    scatter,
    sweep_predictions,
    write_voxel_major,
)
from nidask.estimation.models import frame_groups, get_model
from nidask.estimation.registration import RigidRegistration, get_registration
from nidask.geometry import EDGE_MARGIN_MM, HEAD_RADIUS_MM, fov_center, inner_grid, rigid_params
from nidask.io.cache import atomic_output, discard, remove_stale_temporaries, save_array
from nidask.io.npy import NpyFile, write_vector
from nidask.io.sources import NpySource
from nidask.io.store import write_npy
from nidask.progress import compute

RUN_FILE = "run.json"
REPORT_FILE = "report.json"
#: A finished run's estimates (in the frame of ``reference``), beside its report.
FINAL_ESTIMATES = "motion.npy"
#: A recorded pass: its estimates (written last) and its report entry.
PASS_ESTIMATES, PASS_ENTRY = "estimates.npy", "pass.json"
#: A pass's intermediate arrays, removed once the pass is recorded (unless keep_work).
PASS_ARRAYS = ("corrected.npy", "voxels.npy", "predictions.npy", "residuals.npy")

#: The smallest field of view the estimator accepts: voxels and millimetres along each
#: axis, voxels in the mask (dipy's 2 cm test crops fall below it).
MIN_AXIS, MIN_EXTENT_MM, MIN_MASK = 8, 25.0, 300
#: Volumes whose leave-one-out estimate moved further than this from their b=0 anchor
#: (mm, rotations at 50 mm) are flagged ``inconsistent``: one of the two is wrong.
DISAGREEMENT_MM = 0.5
#: Default leave-one-out passes without the b=0 anchor, and after it on dense shells.
UNANCHORED_PASSES, ANCHORED_PASSES = 4, 2
#: Directions in the smallest shell from which the anchor is refined by default.  On
#: real anatomy (docs/benchmarks.md) two passes after the anchor moved the median error
#: up to 2x further from the truth with 15-32 directions per shell, were mixed with 50
#: and level or better with 90; on a smooth phantom, whose mutual information holds
#: rotations loosely, they halved the rotation error.
DENSE_SHELL = 60
#: Fields of view below these are estimated but flagged ``small_fov``.
SMALL_AXIS, SMALL_EXTENT_MM, SMALL_MASK = 24, 60.0, 10000


def pass_entry(p: int, changes: np.ndarray, tie: dict) -> dict:
    """The report's record of pass ``p``: how far its estimates moved, its frame tie."""
    return {
        "pass": p,
        "largest_change_mm": float(changes.max()),
        "median_change_mm": float(np.median(changes)),
        "frame_tie": tie,
    }


def smallest_shell(groups: np.ndarray, reference_group) -> int:
    """Volumes in the smallest group other than the reference (a DWI's fewest
    directions in a shell)."""
    sizes = [int(np.sum(groups == g)) for g in np.unique(groups) if g != reference_group]
    return min(sizes, default=0)


def read_volume(path: str, index: int) -> np.ndarray:
    """Volume ``index`` of a volume-contiguous ``.npy`` as float32 (one read)."""
    return NpyFile.open(path).read_volume(index)


def _save_json(path: str, value) -> None:
    with atomic_output(path) as temp, open(temp, "w") as f:
        json.dump(value, f, indent=1)


def prediction_weights(
    residuals: str, group: int, mask: np.ndarray, grown: np.ndarray | None = None
) -> np.ndarray:
    """Registration weights from a group's leave-one-out residual variance.

    ``1 / (variance + its median in the mask)`` inside the mask, 0 outside: voxels
    the model predicts poorly (white matter whose contrast changes with direction,
    at high b-values) count less than those it predicts to the noise.  ``grown`` is
    ``grow_mask(mask)``, where the residuals are (computed when not given).
    """
    grown = grow_mask(mask) if grown is None else grown
    variance = scatter(read_column(residuals, group), grown)
    floor = max(float(np.median(variance[mask])), 1e-12)
    return np.where(mask, 1.0 / (variance + floor), 0.0).astype(np.float32)


def register_fold(
    volumes: str,
    predictions: str,
    masks: tuple[str, str],
    fold: int,
    affine: np.ndarray,
    registration,
    record: str,
    init: np.ndarray | None = None,
    weights: tuple | None = None,
) -> np.ndarray:
    """Register observed volume ``fold`` to its prediction and record the matrix.

    Runs inside a task: every input is read by path, ``masks`` being the brain
    mask's and :func:`grow_mask`'s (``.npy``).  ``weights`` is a
    ``(residuals.npy, group column)`` pair (see :func:`prediction_weights`).
    Beside the matrix (``record``) a ``.json`` holds the registration's quality,
    when it reports one.
    """
    mask, grown = (np.load(path) for path in masks)
    fixed = scatter(read_column(predictions, fold), grown)
    moving = read_volume(volumes, fold)
    inner = away_from_edges(mask, affine)
    if weights is not None:
        mask = prediction_weights(weights[0], weights[1], mask, grown) * inner
    else:
        mask = inner
    report = getattr(registration, "register", None)
    if report is not None:
        matrix, quality = report(fixed, moving, affine, mask=mask, init=init)
    else:
        matrix, quality = registration(fixed, moving, affine, mask=mask, init=init), {}
    matrix = np.asarray(matrix, dtype=float)
    _save_json(record[: -len(".npy")] + ".json", quality)
    save_array(record, matrix)
    return matrix


def away_from_edges(mask: np.ndarray, affine, margin_mm: float = EDGE_MARGIN_MM) -> np.ndarray:
    """``mask`` without the voxels within ``margin_mm`` of the grid's faces
    (:func:`nidask.geometry.inner_grid`); a mask that would lose most of its voxels
    is kept whole.

    >>> int(away_from_edges(np.ones((20, 20, 20), bool), np.eye(4) * 2, 4.0).sum())
    4096
    """
    kept = mask & inner_grid(affine, mask.shape, margin_mm)
    return kept if kept.sum() >= mask.sum() / 2 else mask


def _add_volume_sum(total: np.ndarray | None, source, start: int, stop: int) -> np.ndarray:
    """Task: ``total`` plus the voxel-wise sum of volumes ``start:stop`` (read here)."""
    part = source[..., start:stop].sum(axis=-1, dtype=np.float64)
    return part if total is None else np.add(part, total, out=part)


def mean_volume(volumes: str) -> np.ndarray:
    """Voxel-wise mean of a volume-contiguous ``.npy`` series (float64).

    The sum runs as a chain of tasks that each read one block and add it to the
    running total, so memory stays at one block whatever the number of volumes
    (a tree reduction holds one partial volume per block at once).
    """
    source = NpySource(volumes)
    n = source.shape[3]
    step = volumes_per_chunk(source.shape[:3], source.dtype)
    total = None
    for start in range(0, n, step):
        total = dask.delayed(_add_volume_sum)(total, source, start, min(start + step, n))
    return total.compute() / n


def default_mask(volumes: str, shape3d, fraction: float = 0.05) -> np.ndarray:
    """Voxels whose mean signal exceeds ``fraction`` of its 99th percentile."""
    mean = mean_volume(volumes)
    return mean > fraction * np.percentile(mean, 99)


def interior_rows(mean: np.ndarray, mask: np.ndarray, fraction: float = 0.4) -> np.ndarray:
    """Rows (of the grown-mask voxel-major matrix) of the mask's flattest voxels.

    The ``fraction`` of mask voxels where the mean image changes least across
    space: motion changes their signal least, so a model fitted there learns the
    signal, not what misalignment left in it.
    """
    slope = ndimage.gaussian_gradient_magnitude(np.asarray(mean, dtype=np.float32), 1.0)
    grown_index = mask_index(grow_mask(mask))
    inside = np.asarray(mask).ravel(order="F")[grown_index]
    values = slope.ravel(order="F")[grown_index]
    cut = np.quantile(values[inside], fraction)
    return np.flatnonzero(inside & (values <= cut))


def check_field_of_view(shape3d, affine, mask: np.ndarray, path: str | None = None) -> list[str]:
    """Refuse fields of view too small to register; return flags for small ones."""
    voxels = int(np.count_nonzero(mask))
    extent = np.asarray(shape3d) * np.linalg.norm(np.asarray(affine)[:3, :3], axis=0)
    grid = "x".join(str(s) for s in shape3d)
    mm = "x".join(f"{e:.0f}" for e in extent)
    if min(shape3d) < MIN_AXIS or extent.min() < MIN_EXTENT_MM or voxels < MIN_MASK:
        raise InputError(
            f"field of view too small to estimate head motion ({grid} voxels, {mm} mm, "
            f"{voxels} in the mask; needs at least {MIN_AXIS} voxels and {MIN_EXTENT_MM:g} mm "
            f"along each axis and {MIN_MASK} voxels in the mask)",
            path,
        )
    small = min(shape3d) < SMALL_AXIS or extent.min() < SMALL_EXTENT_MM or voxels < SMALL_MASK
    return ["small_fov"] if small else []


def sample_rows(voxels: str, count: int, rows: np.ndarray | None = None) -> np.ndarray:
    """``count`` rows of a voxel-major matrix spread evenly over ``rows`` (default all)."""
    matrix = NpyFile.open(voxels)
    rows = np.arange(matrix.shape[0]) if rows is None else np.asarray(rows)
    picks = rows[np.unique(np.linspace(0, len(rows) - 1, min(count, len(rows))).astype(int))]
    return matrix.read_blocks(picks)


def sample_count(n_volumes: int, most: int = 20000) -> int:
    """Voxels in the sample a model's ``prepare`` sees (held in memory, not streamed).

    ``most``, or fewer (at least 1000) where a float32 sample of every volume would
    exceed half the chunk budget.
    """
    return int(max(1000, min(most, chunk_bytes() // (2 * 4 * max(n_volumes, 1)))))


def changes_mm(before, after, affine, shape3d, radius: float = HEAD_RADIUS_MM) -> np.ndarray:
    """Per volume, how far its estimate moved (mm; rotations counted at ``radius``)."""
    centre = fov_center(affine, shape3d)
    out = []
    for a, b in zip(before, after, strict=True):
        p = rigid_params(np.linalg.inv(a) @ b, center=centre)
        out.append(float(np.linalg.norm(p[:3]) + radius * np.linalg.norm(p[3:])))
    return np.array(out)


@attrs.frozen
class _Run:
    """Files of one run directory shared by every pass."""

    workdir: str
    raw: str
    mask: np.ndarray
    mask_path: str
    grown_path: str  # grow_mask(mask): where the models predict
    voxel_meta: dict
    flags: tuple[str, ...]
    groups: np.ndarray
    interior: str


@contextlib.contextmanager
def _scheduler(client):
    """Compute on ``client`` inside the block.

    Not ``dask.config.set(scheduler=client)``: distributed hands the global config to
    every process it starts, and with a Client in it a nanny cannot restart a lost
    worker (the Client does not pickle), so a cluster in this process shrinks for good.
    """
    if client is None:
        yield
        return
    with client.as_current(), dask.config.set(scheduler=None):
        yield


@attrs.define
class Estimator:
    """Leave-one-volume-out motion estimation.

    Parameters
    ----------
    model : str, Model or callable
        ``"auto"`` (:func:`nidask.estimation.defaults.default_model`),
        ``"gp"`` (Gaussian process, DWI), ``"average"`` (per-shell mean),
        ``"median"``, ``"b0"``, ``"dti"``, ``"pet"`` (temporal interpolation), a
        :class:`nidask.estimation.models.Model` or a function ``f(train_data, train_meta,
        test_meta)``; a list gives one model per pass (the last one repeats).
    registration : str or callable
        ``"rigid"`` or any :class:`nidask.estimation.registration.Registration`.
    order : str
        Fold scheduling order: ``"sequential"``, ``"reverse"``, ``"random"``,
        ``"bvalue"``.
    seed : int
        Seed of ``order="random"``.
    passes : int, optional
        Most leave-one-out passes; later ones fit the model on data corrected by the
        previous estimates (sharper predictions).  Default: 2 after the b=0 anchor
        (see ``anchor``) when every shell has at least :data:`DENSE_SHELL` directions and
        0 below, 4 without the anchor; the report records the choice.
    tolerance : float
        Stop after a pass (the second at the earliest) whose largest change of any
        volume's estimate is below this (mm, rotations counted at 50 mm); 0 runs
        every pass.
    reference : "template" or int
        Frame of the returned matrices (see the module docstring).
    frame_tie : {"auto", "temporal", "image"}
        How the frames of the prediction groups are tied (:mod:`nidask.estimation.frames`).
    initialize : {"auto", "none"}
        ``"auto"``: when the reference group's volumes recur throughout the series
        (interleaved b=0 volumes), the first pass registers them only and starts
        every other volume from their motion interpolated in time.
    resample_order : int
        Interpolation order used to correct training data between passes.
    anchor : {"auto", "none"}
        ``"auto"``: a series with a reference group and other volumes (a DWI with
        b=0 volumes) starts from the b=0 anchor (:mod:`nidask.estimation.anchor`:
        a b=0 template, every volume registered to it with mutual information),
        and ``passes`` leave-one-out passes refine it on data in the template's
        frame (by default on dense shells only, see ``passes``); ``passes=0`` keeps
        the anchor.  The anchor stands for the first
        pass: the refining passes use the second model and registration of a list
        on (the Gaussian process of ``"auto"``).  ``"none"``: leave-one-out passes
        from the identity, frames tied afterwards.
    eddy_currents : bool
        Estimate each diffusion-weighted volume's eddy-current distortion (FSL eddy's
        linear model, :mod:`nidask.estimation.eddy`) jointly with its motion: in the
        b=0 anchor (mutual information to the b=0 template) and in any leave-one-out
        pass after it (needs b=0 volumes and the DWI's ``phase_encoding``).
        ``motion_affines`` then hold whole matrices,
        motion and eddy-current part composed, and :attr:`report` their coefficients
        (``eddy_currents``).
    max_motion : tuple of float
        ``(mm, degrees)``: estimates beyond these are flagged ``implausible``.
    keep_work : bool
        Keep every intermediate array of the run directory (for debugging).  By
        default a pass's training data, voxel-major copy and predictions are removed
        once its estimates are recorded, and the run's copy of the series when the run
        is done; what resuming needs (every fold's record, each pass's estimates)
        stays.
    progress : bool, optional
        Progress display (default: ``nidask.progress`` config).
    outliers : {"flag", "replace", "off"}
        Outlier slices of a DWI's diffusion-weighted volumes, signal lost to motion
        during the diffusion encoding (:mod:`nidask.estimation.outliers`, FSL eddy's
        ``--repol``): ``"flag"`` (default) scores every slice against its
        leave-one-out prediction and reports the outliers, leaving the estimates as
        ``"off"`` gives them; ``"replace"`` also replaces them by their prediction in
        the corrected series and in the next pass's training data, and leaves them
        out of that pass's registrations.  ``"flag"`` is the default: it changes no
        estimate, and eddy reports outliers whether or not it replaces them.  With
        passes it scores the last pass's predictions (the scoring itself: 0.06 s per
        volume at 89 x 118 x 65); with ``"replace"`` every pass is scored; a run
        without a pass after the b=0 anchor (the default on sparse shells) predicts
        once more to score: 0.15 s per volume there, 12 %
        more than the anchor alone (docs/benchmarks.md, "Outlier slices").
        PET and BOLD series are not scored.
    slice_axis : int
        The voxel axis along which slices were acquired (0, 1 or 2).

    Attributes
    ----------
    report : dict
        After :meth:`run`: per pass the largest change and the frame tie, per
        volume (file order) its quality and flags; for a scored DWI, ``outliers``
        (``{"volume", "slice", "score", "replaced"}`` per outlier slice, volumes by
        their index in the file) and ``quality["shells"]`` (``{"bval", "volumes",
        "cnr"}`` per diffusion-weighted shell).
    """

    model: object = "auto"
    registration: object = "auto"
    order: str = "sequential"
    seed: int = 0
    passes: int | None = None
    tolerance: float = 0.1
    reference: object = "template"
    frame_tie: str = "auto"
    initialize: str = "auto"
    resample_order: int = 3
    anchor: str = "auto"
    eddy_currents: bool = False
    max_motion: tuple = (10.0, 10.0)
    keep_work: bool = False
    progress: bool | None = None
    outliers: str = "flag"
    slice_axis: int = 2
    report: dict | None = attrs.field(default=None, init=False, eq=False, repr=False)

    def _models(self, dataset) -> list:
        """One model per pass (the last one repeats)."""
        specs = self.model if isinstance(self.model, list | tuple) else [self.model]
        if not specs:
            raise InputError("no model given")
        resolved = []
        for spec in specs:
            if isinstance(spec, str) and spec == "auto":
                resolved += default_model(dataset)
            else:
                resolved.append(spec)
        return [get_model(spec) for spec in resolved]

    def _registrations(self) -> list:
        """One registration per pass (the last one repeats)."""
        specs = self.registration
        if isinstance(specs, str) and specs == "auto":
            # eddy smooths the first pass heavily: predictions from data that are still
            # moving are blurred, and fine contrast (white matter at high b) misleads
            return [RigidRegistration(smoothing=(3.0, 2.0, 2.0)), RigidRegistration()]
        specs = specs if isinstance(specs, list | tuple) else [specs]
        if not specs:
            raise InputError("no registration given")
        return [get_registration(s) for s in specs]

    def _identity(self, dataset) -> str:
        config = [repr(m) for m in self._models(dataset)]
        config += [repr(r) for r in self._registrations()]
        config += [self.passes, self.tolerance, self.frame_tie, self.initialize, self.anchor]
        config += [self.resample_order, self.outliers, self.slice_axis]
        if self.eddy_currents:
            config += ["eddy currents", dataset.phase_encoding]
        return tokenize(
            dataset.dataobj.name,
            dataset.affine,
            dataset.volume_meta(),
            dataset.brainmask,
            config,
        )

    def _prepare(self, dataset, workdir):
        if workdir is None:
            workdir = dataset.cache.new_path("", stem="estimate")
        workdir = os.path.abspath(os.fspath(workdir))
        os.makedirs(workdir, exist_ok=True)
        run_file = os.path.join(workdir, RUN_FILE)
        identity = self._identity(dataset)
        if os.path.exists(run_file):
            with open(run_file) as f:
                recorded = json.load(f).get("identity")
            if recorded != identity:
                raise InputError(
                    "run directory holds a run of another dataset or configuration; "
                    "use a new directory",
                    workdir,
                )
        else:
            _save_json(run_file, {"identity": identity, "n_volumes": len(dataset)})
        return workdir

    def run(self, dataset, client=None, workdir=None):
        """Estimate the motion of every volume.

        Parameters
        ----------
        dataset : BaseDataset
            Any lazy dataset (DWI, PET, ...).  A DWI's b=0 volumes are estimated too.
        client : distributed.Client, optional
            Run the tasks on this cluster (default: dask's current scheduler).
        workdir : path-like, optional
            Run directory (kept; pass the same one to resume).  Default: a
            directory in the dataset's owned cache.

        Returns
        -------
        Dataset of the same type with ``motion_affines`` filled (a DWI also gets
        ``b0_motion_affines``).  :attr:`report` describes the run.
        """
        whole = dataset.whole_series()
        models = self._models(whole)
        check_estimable(dataset, models)
        registrations = self._registrations()
        self._check_options(whole)
        meta = whole.volume_meta()
        bvals = meta["gradients"][:, 3] if "gradients" in meta else None
        order = fold_order(len(whole), self.order, self.seed, bvals)
        grouping = getattr(models[0], "frame_groups", None)
        groups, reference_group = (grouping or frame_groups)(meta, len(whole))
        if self.eddy_currents:
            anchored = self._anchored(groups, reference_group)
            registrations = joint_registrations(registrations, whole, anchored)
        with _scheduler(client):
            workdir = self._prepare(whole, workdir)
            finished = self._finished(workdir)
            if finished is not None:  # resuming a finished run: nothing left to do
                record = outlier_slices.finished_record(self, workdir)
                return outlier_slices.apply(dataset.with_whole_motion(finished), record)
            run = self._setup(whole, workdir, groups)
            estimates = np.tile(np.eye(4), (len(whole), 1, 1))
            history = []
            # with the reference volumes spread through the acquisition (a DWI's
            # interleaved b=0), the first pass registers them alone and starts the others
            # from their motion interpolated in time: in the reference's frame, with
            # errors that do not depend on the gradient direction
            from_reference = (
                self.initialize == "auto"
                and self.pass_count(False) > 1
                and interleaved(groups, reference_group)
            )
            anchored = self._anchored(groups, reference_group)
            disagreement = None
            if anchored:
                estimates, history, disagreement = self._run_anchored(
                    whole, run, models, registrations, order, groups, reference_group
                )
            for p in range(1, 0 if anchored else self.pass_count(False) + 1):
                previous = estimates if p > 1 else None

                def leave_one_out_pass(p=p, previous=previous):
                    model = models[min(p, len(models)) - 1]
                    training = outlier_slices.training_series(self, whole, run, p)
                    predictions, _ = self._predict(training, run, p, model, previous)
                    left_out = outlier_slices.score_pass(
                        self, whole, run, p, predictions, previous, p == self.pass_count(False)
                    )
                    registration = registrations[min(p, len(registrations)) - 1]
                    folds = order
                    if p == 1 and from_reference:
                        folds = [i for i in order if groups[i] == reference_group]
                    raw = self._register(
                        whole, run, p, predictions, registration, folds, previous, left_out
                    )
                    if p == 1 and from_reference:
                        known = groups == reference_group
                        raw = interpolate_in_time(raw, known, whole.affine, whole.shape3d)
                        estimates = recentre(raw, known, whole.affine, whole.shape3d)
                        tie = {"method": "interpolated in time from the reference group"}
                    else:
                        fallback = "none" if from_reference else "image"
                        estimates, tie = self._tie(
                            whole, run, p, raw, groups, reference_group, fallback
                        )
                    before = np.tile(np.eye(4), (len(whole), 1, 1)) if p == 1 else previous
                    changes = changes_mm(before, estimates, whole.affine, whole.shape3d)
                    return estimates, pass_entry(p, changes, tie)

                estimates, entry = self._pass(run, p, leave_one_out_pass)
                history.append(entry)
                if p >= 2 and entry["largest_change_mm"] < self.tolerance:
                    break
            record = outlier_slices.final_record(
                self, whole, run, models, estimates, history[-1]["pass"], anchored
            )
            eddy_entry = None
            if self.eddy_currents:  # the frame changes the motion parts only
                estimates, eddy_entry = referenced(estimates, whole, self._to_reference)
            else:
                estimates = self._to_reference(whole, estimates)
            self.report = self._report(
                whole, run, history, estimates, history[-1]["pass"], disagreement
            )
            if eddy_entry is not None:
                self.report["eddy_currents"] = eddy_entry
            self.report.update(outlier_slices.report_entries(record))
            self._finish(run.workdir, estimates)
        return outlier_slices.apply(dataset.with_whole_motion(estimates), record)

    def _pass(self, run, p: int, compute_pass):
        """Pass ``p``'s estimates and history entry: as recorded, or from
        ``compute_pass()`` and then recorded.

        A recorded pass needs none of its intermediate arrays again (the next pass
        resamples the input with its estimates), so they are removed then, unless
        ``keep_work``.
        """
        folder = os.path.join(run.workdir, f"pass-{p}")
        matrices = os.path.join(folder, PASS_ESTIMATES)
        entry_file = os.path.join(folder, PASS_ENTRY)
        if os.path.exists(matrices) and os.path.exists(entry_file):
            with open(entry_file) as f:
                return np.load(matrices), json.load(f)
        estimates, entry = compute_pass()
        _save_json(entry_file, entry)
        save_array(matrices, np.asarray(estimates, dtype=float))  # written last: the mark
        if not self.keep_work:
            discard(os.path.join(folder, name) for name in PASS_ARRAYS)
        return estimates, entry

    def _finish(self, workdir: str, estimates: np.ndarray) -> None:
        """Record a finished run (its report, then its estimates) and, unless
        ``keep_work``, remove the run's copy of the series."""
        _save_json(os.path.join(workdir, REPORT_FILE), self.report)
        save_array(os.path.join(workdir, FINAL_ESTIMATES), estimates)
        if not self.keep_work:
            discard([os.path.join(workdir, "data.npy")])
            remove_earlier_templates(os.path.join(workdir, "anchor"))

    def _finished(self, workdir: str):
        """The estimates of a finished run in ``workdir`` (its report restored), or None."""
        final = os.path.join(workdir, FINAL_ESTIMATES)
        report = os.path.join(workdir, REPORT_FILE)
        if not (os.path.exists(final) and os.path.exists(report)):
            return None
        with open(report) as f:
            self.report = json.load(f)
        return np.load(final)

    def pass_count(self, anchored: bool, smallest: int = 0) -> int:
        """Leave-one-out passes of a run (``passes``, or its default).

        After the b=0 anchor the default depends on the ``smallest`` shell's size
        (see :data:`DENSE_SHELL`); without it, :data:`UNANCHORED_PASSES`.
        """
        if self.passes is not None:
            return int(self.passes)
        if not anchored:
            return UNANCHORED_PASSES
        return ANCHORED_PASSES if smallest >= DENSE_SHELL else 0

    def _anchored(self, groups, reference_group) -> bool:
        """Whether this run starts from the b=0 anchor (:mod:`nidask.estimation.anchor`)."""
        if self.anchor == "none" or reference_group is None:
            return False
        return bool(np.any(groups == reference_group) and np.any(groups != reference_group))

    def _run_anchored(self, whole, run, models, registrations, order, groups, reference_group):
        """The b=0 anchor, then leave-one-out passes on data in the template's frame.

        The b=0 volumes keep their template estimates; every other volume is
        registered to its prediction from the data corrected by the previous
        estimates, starting from them.  The training data sit in the template's
        frame, so the shells need no frame tie.
        """
        folder = os.path.join(run.workdir, "anchor")
        os.makedirs(folder, exist_ok=True)
        inner = os.path.join(folder, "mask.npy")
        if not os.path.exists(inner):
            save_array(inner, away_from_edges(run.mask, whole.affine))
        reference = groups == reference_group
        estimates, _ = anchor_estimates(
            run.raw,
            np.flatnonzero(reference),
            len(whole),
            whole.affine,
            whole.shape3d,
            inner,
            folder,
            progress=self.progress,
            registration=anchor_registration(whole) if self.eddy_currents else None,
        )
        identity = np.tile(np.eye(4), (len(whole), 1, 1))
        changes = changes_mm(identity, estimates, whole.affine, whole.shape3d)
        entry = pass_entry(0, changes, {"method": "b=0 template"})
        history = [{**entry, "stage": "b=0 anchor: template, then mutual information to it"}]
        anchor = estimates
        folds = [int(i) for i in order if not reference[i]]
        smallest = smallest_shell(groups, reference_group)
        passes = self.pass_count(True, smallest)
        history[0]["refining_passes"] = {
            "passes": passes,
            "smallest_shell": smallest,
            "chosen_by": "the passes option" if self.passes is not None else "shell density",
        }
        for p in range(1, passes + 1):

            def refining_pass(p=p, previous=estimates):
                # the anchor stands for the first pass: the data are aligned already, so
                # the model and the finer registration of later passes
                model = models[min(p + 1, len(models)) - 1]
                training = outlier_slices.training_series(self, whole, run, p)
                # the models read the grown mask only (no frame tie reads the rest)
                box = bounding_box(np.load(run.grown_path))
                predictions, _ = self._predict(training, run, p, model, previous, box)
                left_out = outlier_slices.score_pass(
                    self, whole, run, p, predictions, previous, p == passes
                )
                registration = registrations[min(p + 1, len(registrations)) - 1]
                raw = self._register(
                    whole, run, p, predictions, registration, folds, previous, left_out
                )
                changes = changes_mm(previous, raw, whole.affine, whole.shape3d)
                tie = {"method": "none (data in the b=0 template's frame)"}
                return raw, pass_entry(p, changes, tie)

            estimates, entry = self._pass(run, p, refining_pass)
            history.append(entry)
            if entry["largest_change_mm"] < self.tolerance:
                break
        return estimates, history, changes_mm(anchor, estimates, whole.affine, whole.shape3d)

    def sweep(self, dataset, client=None, workdir=None) -> np.memmap:
        """Every fold's prediction by the (first) model, without registration.

        A full leave-one-out sweep of :meth:`~nidask.BaseDataset.whole_series`: the
        series is materialized and laid out voxel-major once, then the model
        predicts each left-out volume.

        Returns
        -------
        np.memmap (n_voxels, N)
            Column ``i`` is the prediction of volume ``i`` over the voxels of the
            (grown) mask saved as ``mask.npy`` in the run directory.
        """
        whole = dataset.whole_series()
        self._check_options(whole)
        model = self._models(whole)[0]
        grouping = getattr(model, "frame_groups", None)
        groups, _ = (grouping or frame_groups)(whole.volume_meta(), len(whole))
        with _scheduler(client):
            run = self._setup(whole, self._prepare(whole, workdir), groups)
            path, _ = self._predict(whole, run, 1, model, None)
            return np.load(path, mmap_mode="r")

    def _check_options(self, dataset) -> None:
        if self.passes is not None and (
            self.passes < 0 or (self.passes == 0 and self.anchor == "none")
        ):
            raise InputError(
                f"passes must be at least 1 (0 keeps the b=0 anchor), got {self.passes}"
            )
        if self.anchor not in ("auto", "none"):
            raise InputError(f"unknown anchor {self.anchor!r} (use 'auto' or 'none')")
        if not (self.tolerance >= 0):
            raise InputError(f"tolerance must be a non-negative number, got {self.tolerance}")
        if self.initialize not in ("auto", "none"):
            raise InputError(f"unknown initialization {self.initialize!r} (use 'auto' or 'none')")
        if self.frame_tie not in METHODS:
            raise InputError(
                f"unknown frame tie {self.frame_tie!r} (use one of {', '.join(METHODS)})"
            )
        outlier_slices.check_mode(self.outliers)
        outlier_slices.check_axis(self.slice_axis)
        if len(dataset) < 3:
            raise InputError(f"leave-one-out needs at least 3 volumes, got {len(dataset)}")
        self._to_reference(dataset, np.tile(np.eye(4), (len(dataset), 1, 1)))

    def _setup(self, dataset, workdir, groups) -> _Run:
        """The run's shared files in ``workdir`` (from :meth:`_prepare`), unless recorded."""
        remove_stale_temporaries(workdir)  # of an earlier, killed attempt
        raw = self._write_data(dataset, os.path.join(workdir, "data.npy"))
        mask_path = os.path.join(workdir, "mask.npy")
        if not os.path.exists(mask_path):
            mask = dataset.brainmask
            if mask is None:
                mask = default_mask(raw, dataset.shape3d)
            save_array(mask_path, np.asarray(mask, dtype=bool))
        mask = np.load(mask_path)
        grown_path = os.path.join(workdir, "grown.npy")
        if not os.path.exists(grown_path):
            save_array(grown_path, grow_mask(mask))
        rows = mask_index(np.load(grown_path))  # the voxel-major data's rows
        interior = os.path.join(workdir, "interior.npy")
        if not os.path.exists(interior):
            save_array(interior, interior_rows(mean_volume(raw), mask))
        flags = check_field_of_view(
            dataset.shape3d, dataset.affine, mask, (dataset.inputs or (None,))[0]
        )
        voxel_meta = {}
        for name, image in dataset.voxel_meta().items():

            def write_image(path, image=image):  # computed only when not recorded yet
                volume = np.asarray(dask.compute(image)[0], dtype=np.float32)
                # the same (Fortran) voxel order as the voxel-major data and predictions
                values = volume.ravel(order="F")[rows]
                write_vector(path, values)

            voxel_meta[name] = self._step(os.path.join(workdir, f"{name}.npy"), write_image)
        return _Run(
            workdir, raw, mask, mask_path, grown_path, voxel_meta, tuple(flags), groups, interior
        )

    def _write_data(self, dataset, path: str) -> str:
        """The series' volumes at ``path`` (volume-contiguous ``.npy``), unless recorded.

        Not :meth:`~nidask.BaseDataset.materialize`: that computes the dataset's lazy
        fields along (a DWI's b=0 median), which holds every b=0 volume of the
        pass at once and which the run does not read.
        """
        return self._step(path, lambda t: write_npy(dataset.dataobj, t, progress=self.progress))

    def _step(self, path: str, produce) -> str:
        """Run ``produce(temp)`` unless ``path`` exists; rename on success."""
        if not os.path.exists(path):
            with atomic_output(path) as temp:
                produce(temp)
        return path

    def _predict(self, dataset, run: _Run, p: int, model, previous, box=None):
        """Pass ``p``'s fold predictions (training data corrected by ``previous``).

        ``box``: resample the training data only there (the rest is not read).
        """
        folder = os.path.join(run.workdir, f"pass-{p}")
        os.makedirs(folder, exist_ok=True)
        training, source = run.raw, dataset
        if previous is not None:
            moved = dataset.with_whole_motion(previous)
            source = moved.resampled(order=self.resample_order, box=box)
            training = self._write_data(source, os.path.join(folder, "corrected.npy"))
        meta = source.volume_meta()  # b-vectors rotated with the previous estimates
        voxels = self._step(
            os.path.join(folder, "voxels.npy"),
            lambda t: write_voxel_major(
                training, np.load(run.grown_path), t, progress=self.progress
            ),
        )
        prepare = getattr(model, "prepare", None)
        if prepare is not None:
            count = sample_count(len(dataset))
            model = prepare(sample_rows(voxels, count, np.load(run.interior)), meta)
        residuals = os.path.join(folder, "residuals.npy")

        def sweep(target):
            # the residuals are written beside the predictions, under the same guard
            sweep_predictions(
                voxels,
                model,
                meta,
                target,
                voxel_meta=run.voxel_meta,
                groups=run.groups,
                residuals=residuals,
                progress=self.progress,
            )

        path = self._step(os.path.join(folder, "predictions.npy"), sweep)
        return path, meta

    def _register(
        self, dataset, run, p, predictions, registration, order, previous, left_out=None
    ):
        """Register the folds of ``order`` not yet recorded in pass ``p``.

        Returns every volume's matrix (identity, or ``previous``, for folds not
        in ``order``).  ``left_out``: an outlier record whose replaced slices the
        registrations leave out (:mod:`nidask.estimation.outliers`).
        """
        folder = os.path.join(run.workdir, f"pass-{p}")
        records = [os.path.join(folder, f"fold-{i:05d}.npy") for i in range(len(dataset))]
        residuals = os.path.join(folder, "residuals.npy")
        labels = np.unique(run.groups)
        todo = [int(i) for i in order if not os.path.exists(records[i])]
        tasks = [
            dask.delayed(register_fold, pure=False)(
                run.raw,
                predictions,
                (run.mask_path, run.grown_path),
                i,
                dataset.affine,
                registration if left_out is None else left_out.registration(registration, i),
                records[i],
                None if previous is None else previous[i],
                (residuals, int(np.searchsorted(labels, run.groups[i]))),
            )
            for i in todo
        ]
        compute(*tasks, label=f"pass {p}: registering {len(todo)} folds", progress=self.progress)
        # a worker lost mid-write (or a killed earlier attempt) leaves its temporary record
        remove_stale_temporaries(folder)
        wanted = set(int(i) for i in order)
        fallback = np.tile(np.eye(4), (len(dataset), 1, 1)) if previous is None else previous
        return np.stack(
            [np.load(r) if i in wanted else fallback[i] for i, r in enumerate(records)]
        )

    def _tie(self, dataset, run, p, raw, groups, reference_group, fallback):
        """Frames of every group tied to the reference's, recentred on it; recorded."""
        path = os.path.join(run.workdir, f"pass-{p}", "motion.npy")
        info_path = os.path.join(run.workdir, f"pass-{p}", "frames.json")
        if os.path.exists(path) and os.path.exists(info_path):
            with open(info_path) as f:
                return np.load(path), json.load(f)
        training = run.raw if p == 1 else os.path.join(run.workdir, f"pass-{p}", "corrected.npy")

        def group_mean(group):  # the group's training volumes sit in its frame
            members = np.flatnonzero(groups == group)
            return sum(read_volume(training, int(i)) for i in members) / len(members)

        bvals = dataset.volume_meta().get("gradients")
        order = None
        if bvals is not None:  # image chain from the reference on, by b-value
            labels = np.unique(groups)
            order = sorted(labels, key=lambda g: float(np.median(bvals[groups == g, 3])))
        tied, info = tie_frames(
            raw,
            groups,
            reference_group,
            dataset.affine,
            dataset.shape3d,
            method=self.frame_tie,
            images=group_mean,
            group_order=order,
            fallback=fallback,
        )
        selection = groups == reference_group if reference_group is not None else slice(None)
        tied = recentre(tied, selection, dataset.affine, dataset.shape3d)
        _save_json(info_path, info)
        save_array(path, tied)
        return tied, info

    def _report(self, dataset, run, history, estimates, last_pass, disagreement=None) -> dict:
        # a volume's last registration: the last pass that registered it, else the anchor
        anchor = os.path.join(run.workdir, "anchor")
        folders = [os.path.join(run.workdir, f"pass-{p}") for p in range(last_pass, 0, -1)]
        folders += [anchor] + [
            os.path.join(anchor, "template", f"round-{r}") for r in range(TEMPLATE_ROUNDS, 0, -1)
        ]
        centre = fov_center(dataset.affine, dataset.shape3d)
        volumes = []
        for i, matrix in enumerate(estimates):
            quality = {}
            for folder in folders:
                quality_file = os.path.join(folder, f"fold-{i:05d}.json")
                if os.path.exists(quality_file):
                    with open(quality_file) as f:
                        quality = json.load(f)
                    break
            params = rigid_params(matrix, center=centre)
            flags = list(run.flags)
            if (
                np.linalg.norm(params[:3]) > self.max_motion[0]
                or math.degrees(np.linalg.norm(params[3:])) > self.max_motion[1]
            ):
                flags.append("implausible")
            if quality.get("converged") is False:
                flags.append("unconverged")
            entry = {}
            if disagreement is not None:
                # two references (the b=0 template, the prediction) that disagree
                entry["anchor_change_mm"] = float(disagreement[i])
                if disagreement[i] > DISAGREEMENT_MM:
                    flags.append("inconsistent")
            volumes.append(
                {
                    "index": int(dataset.original_index[i]),
                    "similarity": quality.get("similarity"),
                    **entry,
                    "flags": flags,
                }
            )
        similarities = np.array([v["similarity"] or np.nan for v in volumes], dtype=float)
        for group in np.unique(run.groups):  # groups may be registered by other metrics
            members = np.flatnonzero(run.groups == group)
            values = similarities[members]
            if np.isfinite(values).sum() < 5:
                continue
            median = np.nanmedian(values)
            spread = 1.4826 * np.nanmedian(np.abs(values - median))
            for i, s in zip(members, values, strict=True):
                if np.isfinite(s) and s < median - 5 * max(spread, 0.01):
                    volumes[i]["flags"].append("poor_fit")
        return {"passes": history, "volumes": volumes, "flags": list(run.flags)}

    def _to_reference(self, dataset, matrices):
        reference = self.reference
        if isinstance(reference, str) and reference in ("template", "model"):
            return matrices
        if isinstance(reference, int | np.integer) and not isinstance(reference, bool):
            if not -len(dataset) <= reference < len(dataset):
                raise InputError(f"reference volume {reference} out of range")
            return matrices @ np.linalg.inv(matrices[reference])
        raise InputError(f"unknown reference {reference!r} (use 'template' or a volume index)")


def clear_run(workdir) -> None:
    """Remove a run directory (user-named run directories are otherwise kept)."""
    shutil.rmtree(workdir, ignore_errors=True)
