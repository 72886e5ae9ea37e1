"""Leave-one-out without O(N²) copies: voxel-major layout, fold plans, fold sweeps.

A materialized series is volume-contiguous (``.npy``, Fortran order).  Models want
voxels in rows, so :func:`write_voxel_major` writes the masked voxels once as an
(n_voxels, N) C-ordered matrix.  :func:`sweep_predictions` then streams it in
blocks of rows that fit the chunk budget and lets the model predict **every fold of
a block at once**, writing an (n_voxels, N) Fortran-ordered prediction matrix whose
column ``i`` (contiguous) is the prediction of volume ``i``.  No training set is
ever copied per fold, and every task opens its files by path, so the same graph
runs on threads, processes and distributed workers.
"""

from __future__ import annotations

import math

import dask
import numpy as np
from scipy import ndimage
from threadpoolctl import threadpool_limits

from nidask.config import chunk_bytes
from nidask.errors import InputError
from nidask.estimation.models import predict_folds
from nidask.io.npy import NpyFile
from nidask.progress import compute

FOLD_ORDERS = ("sequential", "reverse", "random", "bvalue")
#: Voxels by which the brain mask is grown where models predict (:func:`grow_mask`).
GROWN_BY = 4


def grow_mask(mask: np.ndarray, voxels: int = GROWN_BY) -> np.ndarray:
    """The mask dilated by ``voxels``: where models predict.

    Registration smooths and interpolates the prediction near the brain's edge;
    predicting a margin around the mask keeps zeros out of those samples.
    """
    return ndimage.binary_dilation(mask, iterations=voxels)


def bounding_box(mask: np.ndarray) -> tuple[slice, slice, slice] | None:
    """The smallest box (three slices) holding every voxel of ``mask`` (``None``: empty).

    >>> mask = np.zeros((5, 6, 7), bool); mask[1:3, 2, 4:6] = True
    >>> bounding_box(mask)
    (slice(1, 3, None), slice(2, 3, None), slice(4, 6, None))
    """
    nonzero = np.nonzero(mask)
    if nonzero[0].size == 0:
        return None
    return tuple(slice(int(v.min()), int(v.max()) + 1) for v in nonzero)


def fold_order(n: int, order: str = "sequential", seed: int = 0, bvals=None) -> np.ndarray:
    """The order in which folds are scheduled (and reported).

    ``"sequential"``, ``"reverse"``, ``"random"`` (seeded) or ``"bvalue"``
    (ascending b-value, stable; DWI only) — as nifreeze's iterators.

    >>> fold_order(4, "reverse").tolist()
    [3, 2, 1, 0]
    """
    if order == "sequential":
        return np.arange(n)
    if order == "reverse":
        return np.arange(n)[::-1]
    if order == "random":
        return np.random.default_rng(seed).permutation(n)
    if order == "bvalue":
        if bvals is None:
            raise InputError("order='bvalue' needs a DWI")
        return np.argsort(np.asarray(bvals), kind="stable")
    raise InputError(f"unknown fold order {order!r} (use one of {', '.join(FOLD_ORDERS)})")


def mask_index(mask: np.ndarray) -> np.ndarray:
    """Flat (Fortran-order) indices of the mask's voxels, ascending."""
    return np.flatnonzero(np.asarray(mask, dtype=bool).ravel(order="F"))


def row_blocks(
    flat: np.ndarray, size3d: int, row_bytes: int, budget: int
) -> list[tuple[int, int]]:
    """Split mask rows into blocks whose slab of the volume grid fits ``budget``.

    A block of rows covers a contiguous span of each volume; the span (not just
    the masked voxels) is what a task reads, so blocks are cut by span length.
    """
    span = max(1, budget // max(row_bytes, 1))
    blocks, start = [], 0
    while start < len(flat):
        stop = int(np.searchsorted(flat, flat[start] + span, side="left"))
        stop = max(stop, start + 1)
        blocks.append((start, stop))
        start = stop
    return blocks


def _read_rows_from_volumes(path: str, flat_rows: np.ndarray) -> np.ndarray:
    """(len(flat_rows), N) float32 from a volume-contiguous (X, Y, Z, N) ``.npy``."""
    series = NpyFile.open(path)
    lo, hi = int(flat_rows[0]), int(flat_rows[-1]) + 1
    span = np.empty((series.shape[3], hi - lo), dtype=series.dtype)  # each volume's span
    for v in range(series.shape[3]):
        series.read_span(v, lo, hi, span[v])
    picked = span if len(flat_rows) == hi - lo else span[:, flat_rows - lo]
    return np.ascontiguousarray(picked.T, dtype=np.float32)


def _write_voxel_block(volumes: str, target: str, flat_rows: np.ndarray, start: int) -> None:
    NpyFile.open(target).write(_read_rows_from_volumes(volumes, flat_rows), start)


def read_rows(path: str, start: int, stop: int) -> np.ndarray:
    """Rows ``start:stop`` of a C-ordered ``.npy`` (one contiguous read)."""
    return NpyFile.open(path).read_rows(start, stop)


def read_column(path: str, column: int) -> np.ndarray:
    """Column ``column`` of a Fortran-ordered 2D ``.npy`` (one contiguous read)."""
    return NpyFile.open(path).read_column(column)


def write_voxel_major(volumes: str, mask: np.ndarray, target: str, *, progress=None) -> str:
    """Write the masked voxels of a volume-contiguous series as (n_voxels, N) rows.

    Parameters
    ----------
    volumes : str
        Materialized ``.npy`` (X, Y, Z, N), Fortran order.
    mask : ndarray of bool (X, Y, Z)
        Voxels to keep.
    target : str
        Output ``.npy`` (float32, C order); must not exist yet.
    """
    series = NpyFile.open(volumes)
    n = series.shape[3]
    flat = mask_index(mask)
    NpyFile.create(target, (len(flat), n), np.float32, fortran_order=False)
    # a task holds the span of the volumes as read, plus the float32 rows it writes
    row_bytes = n * max(series.dtype.itemsize, 4) * 2
    tasks = [
        dask.delayed(_write_voxel_block, pure=False)(volumes, target, flat[a:b], a)
        for a, b in row_blocks(flat, math.prod(series.shape[:3]), row_bytes, chunk_bytes())
    ]
    compute(*tasks, label="writing voxel-major matrix", progress=progress)
    return target


def _predict_block(
    voxels: str,
    target: str,
    start: int,
    stop: int,
    model,
    meta: dict,
    voxel_meta: dict,
    folds,
    residuals: tuple | None = None,
) -> None:
    data = read_rows(voxels, start, stop)
    block_meta = dict(meta)
    for key, path in voxel_meta.items():
        block_meta[key] = read_rows(path, start, stop).ravel()
    with single_threaded_blas():
        predictions = predict_folds(model, data, block_meta, folds)
    output = NpyFile.open(target)
    for j, fold in enumerate(folds):
        output.write(predictions[:, j], int(fold), start)
    if residuals is not None:
        path, groups = residuals
        folds = np.asarray(folds)
        chosen = np.asarray(groups)[folds]
        variances = NpyFile.open(path)
        for k, g in enumerate(np.unique(groups)):
            columns = np.flatnonzero(chosen == g)
            variances.write(_mean_squared(data, folds[columns], predictions, columns), k, start)


def _mean_squared(data, data_columns, predictions, prediction_columns, rows: int = 4096):
    """Per row, the mean of ``(data[:, data_columns] - predictions[:, prediction_columns])**2``.

    ``rows`` at a time: the differences of a whole block would be one more block.
    """
    out = np.empty(len(data), dtype=np.float32)
    for a in range(0, len(data), rows):
        block = slice(a, a + rows)
        difference = data[block, data_columns] - predictions[block, prediction_columns]
        out[block] = (difference * difference).mean(axis=1)
    return out


def sweep_predictions(
    voxels: str,
    model,
    meta: dict,
    target: str,
    *,
    voxel_meta: dict | None = None,
    folds=None,
    groups=None,
    residuals: str | None = None,
    progress=None,
) -> str:
    """Predict every fold for every voxel, block by block, into ``target``.

    Parameters
    ----------
    voxels : str
        Voxel-major matrix from :func:`write_voxel_major`.
    model : Model
        See :mod:`nidask.estimation.models`; must pickle for process schedulers.
    meta : dict
        Per-volume metadata (``gradients``, ``midframe``) for all N volumes.
    target : str
        Output ``.npy`` (n_voxels, N) float32, Fortran order: column i is fold i.
    voxel_meta : dict of str
        Voxel covariates (e.g. ``bzero``) as (n_voxels,) ``.npy`` paths.
    folds : sequence of int, optional
        Folds to compute (default all); others stay zero.
    groups : array of int (N,), optional
        Prediction group of every volume, for ``residuals``.
    residuals : str, optional
        Also write here an (n_voxels, n_groups) float32 ``.npy``: each voxel's mean
        squared leave-one-out residual over each group's folds (groups in sorted
        order), the model's own error where it predicts.
    """
    n_voxels, n = NpyFile.open(voxels).shape
    folds = list(range(n)) if folds is None else [int(f) for f in folds]
    NpyFile.create(target, (n_voxels, n), np.float32, fortran_order=True)
    extra = None
    if residuals is not None:
        if groups is None or len(groups) != n:
            raise InputError(f"residuals need the group of each of the {n} volumes")
        shape = (n_voxels, len(np.unique(groups)))
        NpyFile.create(residuals, shape, np.float32, fortran_order=True)
        extra = (residuals, np.asarray(groups))
    # a block's rows, its predictions and the models' float32/float64 temporaries
    rows = max(1, chunk_bytes() // (n * np.dtype(np.float32).itemsize * 4))
    tasks = [
        dask.delayed(_predict_block, pure=False)(
            voxels, target, a, min(a + rows, n_voxels), model, meta, voxel_meta or {}, folds, extra
        )
        for a in range(0, n_voxels, rows)
    ]
    with single_threaded_blas():  # the scheduler's threads are the parallelism
        compute(*tasks, label="predicting folds", progress=progress)
    return target


def single_threaded_blas():
    """A context in which BLAS (numpy's matrix products) runs on one thread.

    Blocks of voxels are predicted in parallel tasks; a multi-threaded BLAS in each
    would put several threads on every core, and OpenBLAS's threads spin while they
    wait: the Gaussian process's sweep of an HCP series took 3.3 times as long on two
    cores.  ``distributed``'s workers start with one BLAS thread already.
    """
    return threadpool_limits(limits=1, user_api="blas")


def scatter(values: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Put masked-voxel values back on the grid (zeros elsewhere), float32."""
    volume = np.zeros(mask.shape, dtype=np.float32, order="F")
    volume.ravel(order="K")[mask_index(mask)] = values
    return volume
