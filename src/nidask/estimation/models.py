"""Leave-one-out prediction models.

The protocol is small and numpy-only, so existing model code works unchanged.
Data arrive **voxel-major**: an ndarray of shape (n_voxels, n_volumes) holding the
masked voxels of a block (the estimator feeds blocks of voxels that fit the chunk
budget).  Metadata arrive as keyword arguments:

``index``      positions of the volumes in the series,
``gradients``  (n, 4) direction + b-value rows (DWI),
``midframe``   (n,) mid-frame times (PET),
``bzero``      (n_voxels,) b=0 signal of the block (DWI with a reference).

A model implements::

    model.fit(train_data, **train_meta)      # train_data (n_voxels, n_train)
    model.predict(**test_meta) -> (n_voxels,) # metadata of the left-out volume

and may also implement ``predict_folds(data, meta, folds) -> (n_voxels, len(folds))``
computing every fold of a block at once (the built-ins do, which is what makes a
full sweep cheap: the average model costs one pass over the data instead of N).
A plain function ``f(train_data, train_meta, test_meta) -> (n_voxels,)`` is a model
too (see :class:`CallableModel`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol, runtime_checkable

import numpy as np

from nidask.config import b0_threshold
from nidask.errors import InputError
from nidask.estimation import gaussian_process as gp

VOLUME_META = ("gradients", "midframe")
VOXEL_META = ("bzero",)


@runtime_checkable
class Model(Protocol):
    """What the estimator needs from a model."""

    def fit(self, data: np.ndarray, **meta) -> None: ...

    def predict(self, **meta) -> np.ndarray: ...


def split_meta(meta: dict, positions) -> dict:
    """Per-volume metadata at ``positions``; voxel metadata passed through."""
    out = {"index": positions}
    for key, value in meta.items():
        out[key] = value[positions] if key in VOLUME_META else value
    return out


def predict_folds_by_fitting(model, data: np.ndarray, meta: dict, folds) -> np.ndarray:
    """Generic sweep: for each fold, fit on the other volumes and predict it."""
    n = data.shape[1]
    out = np.empty((data.shape[0], len(folds)), dtype=np.float32)
    for j, fold in enumerate(folds):
        train = np.delete(np.arange(n), fold)
        model.fit(data[:, train], **split_meta(meta, train))
        out[:, j] = model.predict(**split_meta(meta, fold))
    return out


class FoldModel:
    """Base class of the built-in models: ``predict_folds`` by fitting each fold."""

    #: Metadata the model reads (keys of a dataset's ``volume_meta`` or ``voxel_meta``).
    needs: tuple[str, ...] = ()

    def predict_folds(self, data: np.ndarray, meta: dict, folds) -> np.ndarray:
        return predict_folds_by_fitting(self, data, meta, folds)

    def frame_groups(self, meta: dict, n: int) -> tuple[np.ndarray, int | None]:
        """See :func:`frame_groups`."""
        return frame_groups(meta, n)

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


def frame_groups(meta: dict, n: int) -> tuple[np.ndarray, int | None]:
    """Groups of volumes whose predictions share a frame, and the reference group.

    A leave-one-out prediction sits in the mean position of the volumes it is made
    from, so volumes predicted from different pools end up in different frames
    until the estimator ties the frames together.  With gradients, the pools are
    the b-value shells and the b=0 volumes (label 0) are the reference; otherwise
    all volumes share one frame and there is no reference group.
    """
    if "gradients" not in meta:
        return np.zeros(n, dtype=int), None
    bvals = np.asarray(meta["gradients"])[:, 3]
    labels = gp.shell_labels(bvals)
    b0 = bvals <= b0_threshold()
    return labels, (int(labels[b0][0]) if b0.any() else None)


def shell_members(meta: dict, n: int, per_shell: bool, tolerance: float) -> np.ndarray:
    """(n, n) bool: volume j is in volume i's pool (same shell within ``tolerance``)."""
    if not (per_shell and "gradients" in meta):
        return np.ones((n, n), dtype=bool)
    bvals = np.asarray(meta["gradients"])[:, 3]
    return np.abs(bvals[:, None] - bvals[None, :]) <= tolerance


def leave_one_out_medians(values: np.ndarray) -> np.ndarray:
    """Column j: the median of each row of ``values`` without its column j.

    One sort per row serves every column: once column j (rank r in its row) is
    left out, the middle of the remaining m - 1 sorted values sits at the same
    ranks, shifted by one where they lie at or past r.  Equals ``np.median`` of
    ``np.delete(values, j, axis=1)`` along rows.

    >>> leave_one_out_medians(np.array([[1.0, 5.0, 2.0, 8.0]]))
    array([[5., 2., 5., 2.]])
    """
    rows, m = values.shape
    if m < 2:
        raise InputError("a leave-one-out median needs at least two values")
    order = np.argsort(values, axis=1, kind="stable")
    ordered = np.take_along_axis(values, order, axis=1)
    rank = np.empty_like(order)
    np.put_along_axis(rank, order, np.broadcast_to(np.arange(m), (rows, m)), axis=1)

    def remaining(k: int) -> np.ndarray:
        """Value at rank k of each row once the column itself is left out."""
        below = ordered[:, k : k + 1]
        above = ordered[:, k + 1 : k + 2]
        return np.where(rank > k, below, above)

    half = (m - 1) // 2
    if (m - 1) % 2:
        return remaining(half)
    return ((remaining(half - 1) + remaining(half)) / 2).astype(values.dtype, copy=False)


class AverageModel(FoldModel):
    """Mean (or median) of the training volumes, per b-shell for a DWI.

    Parameters
    ----------
    stat : {"mean", "median"}
        Statistic over the training volumes.
    per_shell : bool
        For a DWI, pool only training volumes whose b-value lies within
        ``tolerance`` of the left-out volume's (all volumes when none does), as
        nifreeze's ``AverageDWIModel`` does.
    tolerance : float
        Shell width in s/mm².
    """

    def __init__(self, stat: str = "mean", per_shell: bool = True, tolerance: float = 100.0):
        if stat not in ("mean", "median"):
            raise InputError(f"unknown statistic {stat!r} (use 'mean' or 'median')")
        self.stat = stat
        self.per_shell = per_shell
        self.tolerance = tolerance

    def fit(self, data, **meta):
        self._data, self._meta = data, meta

    def predict(self, **meta):
        train = self._meta
        members = np.ones(self._data.shape[1], dtype=bool)
        if self.per_shell and "gradients" in meta and "gradients" in train:
            members = np.abs(train["gradients"][:, 3] - meta["gradients"][3]) <= self.tolerance
            members = members if members.any() else np.ones_like(members)
        reduce = np.mean if self.stat == "mean" else np.median
        return reduce(self._data[:, members], axis=1).astype(np.float32)

    def predict_folds(self, data, meta, folds):
        n = data.shape[1]
        pools = shell_members(meta, n, self.per_shell, self.tolerance)
        np.fill_diagonal(pools, False)
        empty = ~pools.any(axis=1)
        pools[empty] = ~np.eye(n, dtype=bool)[empty]
        # Folds whose pool plus themselves is the same set S (a shell) are computed
        # together from S alone: the mean as (sum of S - fold) / (|S| - 1), the median
        # from one sort of S (see leave_one_out_medians).
        groups: dict[bytes, list[int]] = {}
        for j, fold in enumerate(folds):
            with_fold = pools[fold].copy()
            with_fold[fold] = True
            groups.setdefault(with_fold.tobytes(), []).append(j)
        out = np.empty((data.shape[0], len(folds)), dtype=np.float32, order="F")
        folds = np.asarray(folds, dtype=int)
        for key, js in groups.items():
            members = np.flatnonzero(np.frombuffer(key, dtype=bool))
            columns = np.searchsorted(members, folds[js])
            values = data if len(members) == n else data[:, members]
            if self.stat == "median":
                out[:, js] = leave_one_out_medians(values)[:, columns]
                continue
            # summed in float64, then float32 temporaries: half the bytes to move
            total = values.sum(axis=1, dtype=np.float64).astype(np.float32)[:, None]
            every = np.array_equal(columns, np.arange(values.shape[1]))
            prediction = np.subtract(total, values if every else values[:, columns])
            prediction /= len(members) - 1
            out[:, js] = prediction
        return out

    def __repr__(self):
        return f"AverageModel(stat={self.stat!r}, per_shell={self.per_shell})"


class B0Model(FoldModel):
    """Predicts the b=0 reference for every volume (register with ``metric="mi"``)."""

    needs = ("bzero",)

    def fit(self, data, **meta):
        if meta.get("bzero") is None:
            raise InputError("the b0 model needs a DWI with a bzero volume")
        self._bzero = meta["bzero"]

    def predict(self, **meta):
        return np.asarray(self._bzero, dtype=np.float32)

    def predict_folds(self, data, meta, folds):
        if meta.get("bzero") is None:
            raise InputError("the b0 model needs a DWI with a bzero volume")
        return np.repeat(np.asarray(meta["bzero"], np.float32)[:, None], len(folds), axis=1)


def tensor_design(gradients: np.ndarray) -> np.ndarray:
    """Rows ``-b * [gx², gy², gz², 2gxgy, 2gxgz, 2gygz]`` of the log-linear DTI model."""
    g, b = gradients[:, :3], gradients[:, 3]
    gx, gy, gz = g.T
    return -b[:, None] * np.stack(
        [gx * gx, gy * gy, gz * gz, 2 * gx * gy, 2 * gx * gz, 2 * gy * gz], 1
    )


class DTIModel(FoldModel):
    """Diffusion tensor, log-linear weighted least squares, S0 fitted with the b=0 volumes.

    ``log S = log S0 - b gᵀ D g`` is fitted per voxel on every volume, b=0 volumes
    included (they pin S0), with weights ``S²`` from an ordinary least-squares
    first pass (the usual WLS for log signals).  Leave-one-out predictions come
    from the leverages of that single fit: with fixed weights, fitting without
    volume i changes the fitted log signal at i by ``h_ii e_i / (1 - h_ii)``
    exactly.  Without any b=0 column, a ``bzero`` covariate (given as voxel
    metadata) stands in for the b=0 volumes.
    """

    needs = ("gradients",)

    def __init__(self, min_signal: float = 1e-3):
        self.min_signal = min_signal

    def _columns(self, data, meta):
        if "gradients" not in meta:
            raise InputError("the dti model needs a DWI (gradients)")
        gradients = np.asarray(meta["gradients"], dtype=float)
        bzero = meta.get("bzero")
        if bzero is not None and not np.any(gradients[:, 3] <= b0_threshold()):
            data = np.column_stack([data, np.asarray(bzero, dtype=data.dtype)])
            gradients = np.vstack([gradients, np.zeros((1, 4))])
        design = np.hstack([np.ones((len(gradients), 1)), tensor_design(gradients)])
        return np.log(np.maximum(np.asarray(data, dtype=np.float64), self.min_signal)), design

    def fit(self, data, **meta):
        self._log, self._design = self._columns(data, meta)
        self._coef = _weighted_fit(self._log, self._design)[0]

    def predict(self, **meta):
        gradients = np.atleast_2d(meta["gradients"])
        row = np.hstack([np.ones((len(gradients), 1)), tensor_design(gradients)])[0]
        return np.exp(np.clip(self._coef @ row, -30, 30)).astype(np.float32)

    def predict_folds(self, data, meta, folds):
        log_signal, design = self._columns(data, meta)
        coef, leverage = _weighted_fit(log_signal, design)
        fitted = coef @ design.T
        n = data.shape[1]
        residual = log_signal[:, :n] - fitted[:, :n]
        loo = fitted[:, :n] - leverage[:, :n] * residual / np.maximum(1 - leverage[:, :n], 1e-6)
        return np.exp(np.clip(loo[:, list(folds)], -30, 30)).astype(np.float32)


def _weighted_fit(log_signal: np.ndarray, design: np.ndarray):
    """Per-row WLS coefficients (V, p) and leverages (V, N) of ``log_signal ~ design``."""
    ols = log_signal @ np.linalg.pinv(design).T
    weights = np.exp(2.0 * np.clip(ols @ design.T, -30, 30))
    weights /= np.maximum(weights.max(axis=1, keepdims=True), 1e-300)
    gram = np.einsum("vn,nj,nk->vjk", weights, design, design)
    gram += np.eye(design.shape[1]) * 1e-10
    inverse = np.linalg.inv(gram)
    coef = np.einsum("vjk,vk->vj", inverse, (weights * log_signal) @ design)
    leverage = weights * np.einsum("nj,vjk,nk->vn", design, inverse, design)
    return coef, leverage


#: Rows of a voxel sample that :meth:`GPModel.prepare` holds in float64 at once.
SPREAD_BLOCK = 2000


class GPModel(FoldModel):
    """Gaussian-process prediction across directions and shells (FSL eddy's predictor).

    See :mod:`nidask.estimation.gaussian_process`.  Diffusion-weighted volumes are predicted by
    the process, with hyperparameters fitted by :meth:`prepare` (the estimator calls
    it once per pass on a voxel sample; a block is used when it was not called);
    b=0 volumes by the mean of the other b=0 volumes.

    Parameters
    ----------
    sample_voxels : int
        Voxels with the largest within-shell variance used to fit the
        hyperparameters.
    hyperparameters : tuple, optional
        ``(ratio, angular_length, bvalue_length, sigma2)`` already fitted.
    """

    needs = ("gradients",)

    def __init__(self, sample_voxels: int = 3000, hyperparameters=None):
        self.sample_voxels = int(sample_voxels)
        self.hyperparameters = None if hyperparameters is None else tuple(hyperparameters)

    @staticmethod
    def _split(meta):
        if "gradients" not in meta:
            raise InputError("the gp model needs a DWI (gradients)")
        gradients = np.asarray(meta["gradients"], dtype=float)
        b0 = gradients[:, 3] <= b0_threshold()
        return gradients, np.flatnonzero(b0), np.flatnonzero(~b0)

    def prepare(self, sample: np.ndarray, meta: dict) -> GPModel:
        """A copy with hyperparameters fitted on ``sample`` (n_voxels, N).

        The noise variance comes from the b=0 volumes when there are three or more
        (:func:`~nidask.estimation.gaussian_process.noise_variance`); the other hyperparameters
        from the voxels with the largest within-shell variance.
        """
        gradients, b0, dw = self._split(meta)
        if len(dw) < 3:
            raise InputError(f"the gp model needs diffusion-weighted volumes, found {len(dw)}")
        basis = gp.mean_basis(gradients[dw])
        spread = np.empty(len(sample))
        for start in range(0, len(sample), SPREAD_BLOCK):  # float64 a block at a time
            values = np.asarray(sample[start : start + SPREAD_BLOCK, dw], dtype=np.float64)
            means = (values @ basis) / basis.sum(axis=0)
            spread[start : start + len(values)] = ((values - means @ basis.T) ** 2).mean(axis=1)
        rows = np.sort(np.argsort(spread)[-self.sample_voxels :])
        sigma2 = gp.noise_variance(sample[:, b0]) if len(b0) else None
        values = np.asarray(sample[rows][:, dw], dtype=np.float64)
        fitted = gp.fit_hyperparameters(values, gradients[dw], sigma2)
        return GPModel(self.sample_voxels, fitted)

    def fit(self, data, **meta):
        self._data, self._meta = data, meta

    def predict(self, **meta):
        raise InputError("the gp model predicts left-out volumes only (use predict_folds)")

    def predict_folds(self, data, meta, folds):
        model = self if self.hyperparameters is not None else self.prepare(data, meta)
        _, angular, across, sigma2 = model.hyperparameters
        gradients, b0, dw = self._split(meta)
        out = np.empty(data.shape, dtype=np.float32)
        out[:, dw] = gp.predict_all_folds(data[:, dw], gradients[dw], angular, across, sigma2)
        if len(b0) > 1:
            total = data[:, b0].sum(axis=1, dtype=np.float64)[:, None]
            out[:, b0] = (total - data[:, b0]) / (len(b0) - 1)
        elif len(b0) == 1:
            out[:, b0] = data[:, b0]  # a lone b=0 is the reference: nothing to predict it from
        folds = list(folds)
        return out if folds == list(range(data.shape[1])) else out[:, folds]

    def __repr__(self):
        return (
            f"GPModel(sample_voxels={self.sample_voxels}, hyperparameters={self.hyperparameters})"
        )


class TemporalModel(FoldModel):
    """PET: a per-voxel polynomial in time, fitted by least squares.

    Each voxel's time-activity curve is fitted with a polynomial of ``degree`` in
    normalised mid-frame time over the training frames and evaluated at the
    left-out frame's mid-frame time.  Pooling every frame (rather than the two
    neighbours) keeps one frame's error from passing straight to the next.
    ``degree=None`` interpolates linearly between the neighbouring frames instead.
    """

    needs = ("midframe",)

    def __init__(self, degree: int | None = 3):
        self.degree = degree

    def _basis(self, times: np.ndarray, span: tuple[float, float]) -> np.ndarray:
        scaled = (np.asarray(times, dtype=float) - span[0]) / max(span[1] - span[0], 1e-9)
        return np.vander(2 * scaled - 1, self.degree + 1, increasing=True)

    def fit(self, data, **meta):
        if "midframe" not in meta:
            raise InputError("the pet model needs frame timing (midframe)")
        self._data, self._times = data, np.asarray(meta["midframe"], dtype=float)

    def predict(self, **meta):
        at = float(meta["midframe"])
        if self.degree is None:
            return _interpolate(self._data, self._times, at)
        span = (min(self._times.min(), at), max(self._times.max(), at))
        weights = np.linalg.pinv(self._basis(self._times, span)).T @ self._basis([at], span)[0]
        return (self._data @ weights).astype(np.float32)

    def predict_folds(self, data, meta, folds):
        if "midframe" not in meta:
            raise InputError("the pet model needs frame timing (midframe)")
        times = np.asarray(meta["midframe"], dtype=float)
        span = (times.min(), times.max())
        out = np.empty((data.shape[0], len(folds)), dtype=np.float32)
        for j, fold in enumerate(folds):
            train = np.delete(np.arange(data.shape[1]), fold)
            if self.degree is None:
                out[:, j] = _interpolate(data[:, train], times[train], times[fold])
                continue
            basis = self._basis(times, span)
            weights = np.linalg.pinv(basis[train]).T @ basis[fold]
            out[:, j] = data[:, train] @ weights
        return out

    def __repr__(self):
        return f"TemporalModel(degree={self.degree})"


def _interpolate(data: np.ndarray, times: np.ndarray, at: float) -> np.ndarray:
    order = np.argsort(times)
    times, data = times[order], data[:, order]
    right = int(np.searchsorted(times, at))
    if right == 0:
        return data[:, 0].astype(np.float32)
    if right == len(times):
        return data[:, -1].astype(np.float32)
    left = right - 1
    w = (at - times[left]) / (times[right] - times[left])
    return ((1 - w) * data[:, left] + w * data[:, right]).astype(np.float32)


class NeighbourModel(FoldModel):
    """Mean of the ``size`` training volumes nearest in time (BOLD).

    Same-contrast series drift slowly (scanner drift, physiology): the volumes
    acquired just before and after predict a volume better than the whole series.
    Ties in time distance take the earlier volume first.
    """

    needs = ("time",)

    def __init__(self, size: int = 6):
        if size < 1:
            raise InputError(f"neighbours: size must be at least 1, got {size}")
        self.size = size

    def predict_folds(self, data, meta, folds):
        times = np.asarray(meta.get("time"), dtype=float)
        if times.shape != (data.shape[1],):
            raise InputError("the neighbours model needs acquisition times (time)")
        out = np.empty((data.shape[0], len(folds)), dtype=np.float32)
        for j, fold in enumerate(folds):
            distance = np.abs(times - times[fold])
            distance[fold] = np.inf
            nearest = np.argsort(distance, kind="stable")[: min(self.size, len(times) - 1)]
            out[:, j] = data[:, np.sort(nearest)].mean(axis=1)
        return out

    def __repr__(self):
        return f"NeighbourModel(size={self.size})"


class CallableModel(FoldModel):
    """Wrap ``f(train_data, train_meta, test_meta) -> (n_voxels,)`` as a model."""

    def __init__(self, function: Callable):
        self.function = function

    def fit(self, data, **meta):
        self._data, self._meta = data, meta

    def predict(self, **meta):
        return np.asarray(self.function(self._data, self._meta, meta), dtype=np.float32)

    def __repr__(self):
        return f"CallableModel({getattr(self.function, '__name__', self.function)!r})"


MODELS: dict[str, Callable[[], Model]] = {
    "average": AverageModel,
    "mean": AverageModel,
    "median": lambda: AverageModel(stat="median"),
    "b0": B0Model,
    "dti": DTIModel,
    "gp": GPModel,
    "pet": TemporalModel,
    "temporal": TemporalModel,
    "neighbours": NeighbourModel,
}


def get_model(spec) -> Model:
    """A model from a name in :data:`MODELS`, an instance, or a plain function."""
    if isinstance(spec, str):
        try:
            return MODELS[spec.lower()]()
        except KeyError:
            known = ", ".join(sorted(MODELS))
            raise InputError(f"unknown model {spec!r} (known: {known})") from None
    if hasattr(spec, "fit") and hasattr(spec, "predict"):
        return spec
    if callable(spec):
        return CallableModel(spec)
    raise InputError(f"a model must be a name, a fit/predict object or a function, got {spec!r}")


def predict_folds(model, data: np.ndarray, meta: dict, folds) -> np.ndarray:
    """Every fold's prediction for a voxel block, by the model's fastest route."""
    if hasattr(model, "predict_folds"):
        return np.asarray(model.predict_folds(data, meta, folds), dtype=np.float32)
    return predict_folds_by_fitting(model, data, meta, folds)


__all__ = [
    "AverageModel",
    "B0Model",
    "CallableModel",
    "DTIModel",
    "GPModel",
    "MODELS",
    "Model",
    "TemporalModel",
    "get_model",
    "predict_folds",
]
