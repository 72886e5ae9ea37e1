"""Outlier slices: signal lost to motion during the diffusion encoding (FSL eddy's ``--repol``).

A head that moves while the diffusion gradients are on loses the signal of the slices
acquired then.  Such a slice stands out against the volume's leave-one-out prediction:

1. **Scoring.**  The prediction of every diffusion-weighted volume (it lives in the
   reference frame) is resampled into the volume's acquired frame with the volume's
   motion estimate, so that slices are acquisition slices.  For each slice along the
   slice axis (the third voxel axis unless told otherwise) with at least
   :data:`MIN_SLICE_VOXELS` brain voxels, the mean residual (observed - prediction)
   over its brain voxels, relative to the mean prediction there, is the slice's
   measure.  Measures are standardised per shell, robustly (:func:`standardise`):
   minus the slice's median over the shell's volumes (a slice's own bias is no
   outlier), over ``1.4826 x`` the median absolute deviation, the slice's or, when
   larger, that of every slice of the shell's volumes.
   A slice below ``-threshold`` (:data:`THRESHOLD`, eddy's 4 standard deviations) is
   an outlier, its standardised measure its ``score``.  b=0 volumes have no
   prediction of their own kind worth scoring against and are not scored.
2. **Replacing** (``Estimator(outliers="replace")``).  An outlier slice is replaced,
   in the acquired frame and inside the (grown) brain mask the model predicts, by the
   prediction: in the corrected series (lazily, when it is exported, so no copy of the
   series is made) and in the training data of the next leave-one-out pass, and its
   voxels are left out of that volume's registration cost.
3. **Signal quality.**  From the same predictions, per shell, the contrast-to-noise
   ratio as eddy reports it: for each brain voxel the standard deviation of the
   predictions over the shell's volumes (the contrast) over that of the residuals
   (the noise), averaged over the brain.

Each scoring round is recorded in its pass folder of the run directory
(``outliers.json``, and ``outliers.npy`` with the replacement slices), atomically, so
that a resumed run reads it instead of scoring again.
"""

from __future__ import annotations

import json
import os

import attrs
import dask
import numpy as np
from scipy import ndimage

from nidask.config import b0_threshold, chunk_bytes
from nidask.errors import InputError
from nidask.estimation.lofo import bounding_box, grow_mask, mask_index, read_column, scatter
from nidask.geometry import inner_grid
from nidask.io.cache import atomic_output, discard, save_array
from nidask.io.npy import NpyFile
from nidask.ops.resample import resample_volume
from nidask.progress import compute

#: ``Estimator(outliers=...)`` values.
MODES = ("off", "flag", "replace")
#: Robust standard deviations below its shell's median that make a slice an outlier.
THRESHOLD = 4.0
#: Brain voxels a slice needs to be scored.
MIN_SLICE_VOXELS = 250
#: Smallest spread of the relative residuals assumed (noise-free series have none).
SCALE_FLOOR = 0.005
#: A scoring round's record and its replacement slices, in the pass folder.
RECORD, REPLACEMENTS = "outliers.json", "outliers.npy"
#: A pass's intermediate arrays (removed after a scoring-only round, unless keep_work).
ROUND_ARRAYS = ("corrected.npy", "voxels.npy", "predictions.npy", "residuals.npy")


def check_mode(mode) -> str:
    """Validate an ``outliers`` mode (see :data:`MODES`)."""
    if not isinstance(mode, str) or mode not in MODES:
        raise InputError(f"unknown outliers mode {mode!r} (use 'off', 'flag' or 'replace')")
    return mode


def check_axis(axis) -> int:
    """Validate a slice axis: a voxel axis, 0, 1 or 2."""
    if isinstance(axis, bool) or not isinstance(axis, int | np.integer) or not 0 <= axis <= 2:
        raise InputError(f"slice axis must be 0, 1 or 2 (a voxel axis), got {axis!r}")
    return int(axis)


def _acquired(volume: np.ndarray, affine, matrix, order: int, box=None) -> np.ndarray:
    """A reference-frame volume in the acquired frame of a volume with motion ``matrix``
    (only inside ``box``, if given)."""
    affine = np.asarray(affine, dtype=float)
    voxel = np.linalg.inv(affine) @ np.linalg.inv(matrix) @ affine
    return resample_volume(volume, voxel, order=order, box=box)


def scoring_masks(mask_path: str, affine) -> tuple[np.ndarray, np.ndarray]:
    """Task: the grown mask (where the model predicts) and the voxels scored (the brain
    away from the grid's faces), in the reference frame."""
    mask = np.load(mask_path)
    return grow_mask(mask), mask & inner_grid(affine, mask.shape)


def _predicted(volumes, predictions, masks, fold, affine, matrix, where):
    """Observed volume ``fold`` and its prediction, in the volume's acquired frame; the
    prediction only in the box around ``where`` (the voxels read)."""
    predicted = scatter(read_column(predictions, fold), masks[0])
    prediction = _acquired(predicted, affine, matrix, 3, bounding_box(where))
    return NpyFile.open(volumes).read_volume(fold), prediction


def slice_statistics(volumes, predictions, masks, fold, affine, matrix, axis) -> np.ndarray:
    """Task: per slice of volume ``fold``, brain voxels, residual sum and prediction sum.

    Returns an (n_slices, 3) float64 array; the series and predictions are read by
    path, ``masks`` come from :func:`scoring_masks`.
    """
    # the brain's edge is partial volume, which interpolation blurs differently
    brain = ndimage.binary_erosion(_acquired(masks[1], affine, matrix, 1) > 0.5)
    observed, prediction = _predicted(volumes, predictions, masks, fold, affine, matrix, brain)
    other = tuple(a for a in range(3) if a != axis)
    residual = np.where(brain, observed - prediction, 0.0)
    return np.stack(
        [
            brain.sum(axis=other, dtype=np.float64),
            residual.sum(axis=other, dtype=np.float64),
            np.where(brain, prediction, 0.0).sum(axis=other, dtype=np.float64),
        ],
        axis=1,
    )


def replacement_slices(volumes, predictions, masks, fold, affine, matrix, axis, slices):
    """Task: slices ``slices`` of volume ``fold`` with the prediction where it is known.

    Inside the grown brain mask (moved with the volume) the prediction, outside the
    observed values: an (len(slices), ...) float32 array of in-plane slices.
    """
    inside = _acquired(masks[0], affine, matrix, 1) >= 0.99  # predicted, moved with the volume
    observed, prediction = _predicted(volumes, predictions, masks, fold, affine, matrix, inside)
    replaced = np.where(inside, prediction, observed)
    return np.stack([np.take(replaced, int(k), axis=axis) for k in slices]).astype(np.float32)


def standardise(statistics: np.ndarray, shells: np.ndarray, min_voxels: int = MIN_SLICE_VOXELS):
    """Standardised slice measures (``nan`` where a slice is not scored).

    Parameters
    ----------
    statistics : ndarray (n_volumes, n_slices, 3)
        :func:`slice_statistics` of every scored volume.
    shells : ndarray (n_volumes,)
        The shell label of each volume.

    Returns
    -------
    ndarray (n_volumes, n_slices)
        ``(x - median) / spread`` of each slice's relative mean residual ``x``.  The
        median is the slice's over the shell's volumes (a slice's own bias, such as
        the partial volume of the brain's top and bottom, is no outlier); the spread
        is ``1.4826 x`` the median absolute deviation, the slice's or, when larger,
        that of every slice of the shell's volumes (at least :data:`SCALE_FLOOR`).
    """
    count, residual, predicted = np.moveaxis(np.asarray(statistics, dtype=float), -1, 0)
    scored = (count >= min_voxels) & (predicted > 0)
    with np.errstate(divide="ignore", invalid="ignore"):
        measure = np.where(scored, residual / predicted, np.nan)
    scores = np.full(measure.shape, np.nan)
    shells = np.asarray(shells)
    for shell in np.unique(shells):
        rows = shells == shell
        values = measure[rows]
        finite = values[np.isfinite(values)]
        if finite.size < 5:
            continue
        pooled = max(_spread(finite - _centres(values)[np.isfinite(values)]), SCALE_FLOOR)
        for k in range(values.shape[1]):
            column = values[:, k]
            known = column[np.isfinite(column)]
            if known.size == 0:
                continue
            centre = np.median(known) if known.size >= 5 else np.median(finite)
            spread = max(_spread(known - centre), pooled) if known.size >= 5 else pooled
            scores[rows, k] = (column - centre) / spread
    return scores


def _spread(values: np.ndarray) -> float:
    """``1.4826 x`` the median absolute deviation from 0."""
    return float(1.4826 * np.median(np.abs(values))) if values.size else 0.0


def _centres(values: np.ndarray) -> np.ndarray:
    """Each slice's median over volumes (columns with fewer than 5 values: the
    median of all), broadcast to ``values``."""
    finite = values[np.isfinite(values)]
    centres = np.full(values.shape[1], np.median(finite) if finite.size else 0.0)
    for k in range(values.shape[1]):
        known = values[np.isfinite(values[:, k]), k]
        if known.size >= 5:
            centres[k] = np.median(known)
    return np.broadcast_to(centres, values.shape)


def _cnr_block(voxels, predictions, start, stop, inside, columns) -> np.ndarray:
    """Task: per shell, the sum and count of voxel CNRs over rows ``start:stop``."""
    data = NpyFile.open(voxels).read_rows(start, stop)[inside]
    matrix = NpyFile.open(predictions)
    out = np.zeros((len(columns), 2))
    for k, shell in enumerate(columns):
        predicted = np.empty((len(shell), stop - start), dtype=np.float32)
        for row, column in zip(predicted, shell, strict=True):
            matrix.read_span(int(column), start, stop, row)
        predicted = predicted.T[inside]
        contrast = predicted.std(axis=1, ddof=1)
        noise = (data[:, shell] - predicted).std(axis=1, ddof=1)
        good = noise > 0
        out[k] = float(np.sum(contrast[good] / noise[good])), float(good.sum())
    return out


def shell_cnr(voxels: str, predictions: str, mask: np.ndarray, columns, progress=None):
    """Per shell, eddy's CNR: the brain's mean of std(predictions) / std(residuals).

    ``voxels`` and ``predictions`` are a pass's voxel-major training data and fold
    predictions (rows: the grown mask); ``columns`` the volumes of each shell.
    """
    inside_all = np.asarray(mask).ravel(order="F")[mask_index(grow_mask(mask))]
    n_rows, n = NpyFile.open(voxels).shape
    rows = max(1, chunk_bytes() // (8 * 4 * max(n, 1)))
    tasks = [
        dask.delayed(_cnr_block)(
            voxels, predictions, a, min(a + rows, n_rows), inside_all[a : a + rows], columns
        )
        for a in range(0, n_rows, rows)
    ]
    parts = compute(*tasks, label="outlier slices: per-shell CNR", progress=progress)
    total = np.sum(parts, axis=0) if parts else np.zeros((len(columns), 2))
    return [float(s / c) if c else None for s, c in total]


@attrs.frozen
class SliceExclusion:
    """A registration whose cost leaves out some slices of the moving volume.

    The slices (of the acquired, moving volume) are carried into the fixed frame by
    the initial matrix; fixed voxels that fall within a voxel of their centres get no
    weight.  Callable and with ``register`` like the registration it wraps.
    """

    registration: object
    slices: tuple
    axis: int

    def _weights(self, fixed, affine, mask, init):
        weights = np.ones(np.shape(fixed), np.float32) if mask is None else np.array(mask)
        index = np.nonzero(weights)
        affine = np.asarray(affine, dtype=float)
        matrix = np.eye(4) if init is None else np.asarray(init, dtype=float)
        voxel = (np.linalg.inv(affine) @ matrix @ affine)[self.axis]
        position = voxel[:3] @ np.array(index, dtype=float) + voxel[3]
        near = np.zeros(position.shape, dtype=bool)
        for k in self.slices:
            near |= np.abs(position - k) < 1.0
        weights[tuple(i[near] for i in index)] = 0
        return weights

    def register(self, fixed, moving, affine, mask=None, init=None):
        """The wrapped registration's ``(matrix, quality)`` without the slices."""
        weights = self._weights(fixed, affine, mask, init)
        report = getattr(self.registration, "register", None)
        if report is not None:
            return report(fixed, moving, affine, mask=weights, init=init)
        return self.registration(fixed, moving, affine, mask=weights, init=init), {}

    def __call__(self, fixed, moving, affine, mask=None, init=None):
        return self.register(fixed, moving, affine, mask=mask, init=init)[0]


def _replace_block(block, path, entries, axis, block_info=None):
    """Task: a block of volumes with the recorded slices put in (``entries``: (position,
    slice, row of ``path``))."""
    start, stop = block_info[0]["array-location"][3]
    mine = [(p, k, r) for p, k, r in entries if start <= p < stop]
    if not mine:
        return block.astype(np.float32)
    out = np.array(block, dtype=np.float32)
    values = np.load(path, mmap_mode="r")
    for position, k, row in mine:
        index = [slice(None)] * 4
        index[axis], index[3] = k, position - start
        out[tuple(index)] = values[row]
    return out


@attrs.frozen
class OutlierRecord:
    """One scoring round: its outlier slices, per-shell CNR and replacement slices.

    Attributes
    ----------
    outliers : list of dict
        ``{"volume": index in the file, "slice": index along the slice axis,
        "score": float, "replaced": bool}``, by volume and slice.
    positions : tuple of int
        Position of each outlier's volume in the whole series.
    shells : list of dict
        ``{"bval": float, "volumes": int, "cnr": float}`` per diffusion-weighted shell.
    axis : int
        The slice axis.
    replacements : str or None
        ``.npy`` (n_replaced, ...) of the replacement slices, in the order of the
        replaced outliers.
    """

    outliers: list
    positions: tuple
    shells: list
    axis: int
    replacements: str | None = None

    @classmethod
    def load(cls, folder: str) -> OutlierRecord | None:
        """The round recorded in ``folder``, or ``None``."""
        path = os.path.join(folder, RECORD)
        if not os.path.exists(path):
            return None
        with open(path) as f:
            fields = json.load(f)
        replacements = os.path.join(folder, REPLACEMENTS)
        fields["positions"] = tuple(fields["positions"])
        return cls(**fields, replacements=replacements if os.path.exists(replacements) else None)

    def save(self, folder: str, slices: np.ndarray | None) -> None:
        """Record the round in ``folder`` (replacement slices first, the record last)."""
        if slices is not None and len(slices):
            save_array(os.path.join(folder, REPLACEMENTS), slices)
        fields = attrs.asdict(self)
        del fields["replacements"]
        fields["positions"] = list(fields["positions"])
        with atomic_output(os.path.join(folder, RECORD)) as temp, open(temp, "w") as f:
            json.dump(fields, f, indent=1)

    def report(self) -> dict:
        """The estimator report's entries: ``outliers`` and ``quality``."""
        return {"outliers": list(self.outliers), "quality": {"shells": list(self.shells)}}

    def excluded(self, position: int) -> tuple:
        """Replaced slices of the volume at ``position`` of the whole series."""
        return tuple(
            int(o["slice"])
            for o, p in zip(self.outliers, self.positions, strict=True)
            if p == position and o["replaced"]
        )

    def registration(self, registration, position: int):
        """``registration``, leaving out the replaced slices of volume ``position``."""
        slices = self.excluded(position)
        return SliceExclusion(registration, slices, self.axis) if slices else registration

    def apply(self, dataset):
        """``dataset`` with its replaced slices put in (lazily, block by block).

        Volumes are matched by their index in the file (``original_index``); a
        dataset without replaced slices is returned as it is.
        """
        if self.replacements is None:
            return dataset
        where = {int(v): p for p, v in enumerate(dataset.original_index)}
        entries, row = [], 0
        for o in self.outliers:
            if o["replaced"]:
                if int(o["volume"]) in where:
                    entries.append((where[int(o["volume"])], int(o["slice"]), row))
                row += 1
        if not entries:
            return dataset
        data = dataset.dataobj.map_blocks(
            _replace_block, self.replacements, entries, self.axis, dtype=np.float32
        )
        return attrs.evolve(dataset, dataobj=data)


def score_round(
    volumes: str,
    predictions: str,
    mask_path: str,
    estimates: np.ndarray,
    bvals: np.ndarray,
    shells: np.ndarray,
    affine,
    file_index,
    folder: str,
    *,
    axis: int = 2,
    replace: bool = False,
    voxels: str | None = None,
    threshold: float = THRESHOLD,
    progress=None,
) -> OutlierRecord:
    """Score every diffusion-weighted volume's slices against its prediction; record it.

    Parameters
    ----------
    volumes : str
        The series as acquired (volume-contiguous ``.npy``).
    predictions : str
        Fold predictions (n_voxels, N) over the grown mask, in the reference frame.
    mask_path : str
        The brain mask (``.npy``).
    estimates : ndarray (N, 4, 4)
        The motion that carries the reference frame to each acquired volume.
    bvals, shells : ndarray (N,)
        b-values and shell labels.
    affine : ndarray (4, 4)
        The grid.
    file_index : ndarray (N,)
        Each volume's index in the file (reported).
    folder : str
        Where the round is recorded (read back when it is).
    axis : int
        The slice axis.
    replace : bool
        Record replacement slices too.
    voxels : str, optional
        The voxel-major training data, for the per-shell CNR.

    Returns
    -------
    OutlierRecord
    """
    recorded = OutlierRecord.load(folder)
    if recorded is not None:
        return recorded
    weighted = np.flatnonzero(np.asarray(bvals) > b0_threshold())
    masks = dask.delayed(scoring_masks)(mask_path, affine)  # one task, shared
    tasks = [
        dask.delayed(slice_statistics)(
            volumes, predictions, masks, int(i), affine, estimates[i], axis
        )
        for i in weighted
    ]
    statistics = compute(
        *tasks, label=f"outlier slices: scoring {len(tasks)} volumes", progress=progress
    )
    found = []
    if len(statistics):
        scores = standardise(np.stack(statistics), np.asarray(shells)[weighted])
        rows, columns = np.nonzero(np.nan_to_num(scores, nan=0.0) < -threshold)
        for row, column in zip(rows, columns, strict=True):
            found.append((int(weighted[row]), int(column), float(scores[row, column])))
    slices = None
    if replace and found:
        volumes_hit = sorted({v for v, _, _ in found})
        jobs = [
            dask.delayed(replacement_slices)(
                volumes,
                predictions,
                masks,
                v,
                affine,
                estimates[v],
                axis,
                [k for w, k, _ in found if w == v],
            )
            for v in volumes_hit
        ]
        slices = np.concatenate(compute(*jobs, label="outlier slices: replacements"))
    labels = sorted({int(s) for s in np.asarray(shells)[weighted]})
    members = [weighted[np.asarray(shells)[weighted] == s] for s in labels]
    if voxels is not None and os.path.exists(voxels) and labels:
        cnr = shell_cnr(voxels, predictions, np.load(mask_path), members, progress=progress)
    else:
        cnr = [None] * len(labels)
    record = OutlierRecord(
        outliers=[
            {"volume": int(file_index[v]), "slice": k, "score": s, "replaced": bool(replace)}
            for v, k, s in found
        ],
        positions=tuple(v for v, _, _ in found),
        shells=[
            {"bval": float(np.median(np.asarray(bvals)[m])), "volumes": len(m), "cnr": c}
            for m, c in zip(members, cnr, strict=True)
        ],
        axis=axis,
    )
    record.save(folder, slices)
    return OutlierRecord.load(folder)


# -- the estimator's side ------------------------------------------------------------------
def _folder(run, p: int) -> str:
    return os.path.join(run.workdir, f"pass-{p}")


def scorable(whole) -> bool:
    """Whether a series' slices can be scored: a DWI with diffusion-weighted volumes."""
    meta = whole.volume_meta()
    return "gradients" in meta and bool(np.any(meta["gradients"][:, 3] > b0_threshold()))


def training_series(estimator, whole, run, p: int):
    """Pass ``p``'s training series: with ``outliers="replace"``, the slices replaced
    by the pass before."""
    if estimator.outliers != "replace" or p < 2:
        return whole
    record = OutlierRecord.load(_folder(run, p - 1))
    return whole if record is None else record.apply(whole)


def score_pass(estimator, whole, run, p: int, predictions: str, previous, last: bool):
    """Score pass ``p``'s predictions (made from data corrected by ``previous``).

    Returns the record when its slices are to be left out of the pass's
    registrations (``outliers="replace"``), else ``None``.  A pass whose training
    data were not corrected (``previous`` is ``None``) is not scored, nor, with
    ``outliers="flag"``, a pass before the ``last`` one planned: only the last pass's
    outliers are reported (a run that stops earlier scores its own last pass in
    :func:`final_record`).
    """
    if estimator.outliers == "off" or previous is None or not scorable(whole):
        return None
    if estimator.outliers == "flag" and not last:
        return None
    meta = whole.volume_meta()
    record = score_round(
        run.raw,
        predictions,
        run.mask_path,
        previous,
        meta["gradients"][:, 3],
        run.groups,
        whole.affine,
        whole.original_index,
        _folder(run, p),
        axis=estimator.slice_axis,
        replace=estimator.outliers == "replace",
        voxels=os.path.join(_folder(run, p), "voxels.npy"),
        progress=estimator.progress,
    )
    return record if estimator.outliers == "replace" else None


def final_record(estimator, whole, run, models, estimates, last_pass: int, anchored: bool):
    """The run's outliers: the last pass's, or a scoring round of their own.

    A run whose last pass was not scored (no pass after the b=0 anchor, or one
    leave-one-out pass from uncorrected data) predicts once more from the data
    corrected by ``estimates`` (as a next pass would) and scores that.
    """
    if estimator.outliers == "off" or not scorable(whole):
        return None
    recorded = OutlierRecord.load(_folder(run, last_pass))
    if recorded is not None:
        return recorded
    p = last_pass + 1
    folder = _folder(run, p)
    if OutlierRecord.load(folder) is None:
        model = models[min(p + int(anchored), len(models)) - 1]
        training = training_series(estimator, whole, run, p)
        predictions, _ = estimator._predict(training, run, p, model, estimates)
        score_pass(estimator, whole, run, p, predictions, estimates, last=True)
        if not estimator.keep_work:
            discard(os.path.join(folder, name) for name in ROUND_ARRAYS)
    return OutlierRecord.load(folder)


def finished_record(estimator, workdir: str):
    """The outliers of a finished run in ``workdir`` (its last scoring round), or ``None``."""
    if estimator.outliers == "off":
        return None
    passes = [
        int(n.split("-")[1])
        for n in os.listdir(workdir)
        if n.startswith("pass-") and os.path.exists(os.path.join(workdir, n, RECORD))
    ]
    return OutlierRecord.load(os.path.join(workdir, f"pass-{max(passes)}")) if passes else None


def report_entries(record: OutlierRecord | None) -> dict:
    """The report's ``outliers`` and ``quality`` (nothing when outliers are off)."""
    return {} if record is None else record.report()


def apply(dataset, record: OutlierRecord | None):
    """``dataset`` with a record's replaced slices put in (see :meth:`OutlierRecord.apply`)."""
    return dataset if record is None else record.apply(dataset)
