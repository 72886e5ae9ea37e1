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
import os

import dask
import numpy as np

from nidask.config import chunk_bytes
from nidask.errors import InputError
from nidask.estimation.models import predict_folds
from nidask.io.sources import read_npy_header
from nidask.io.store import create_npy, pwrite_all
from nidask.progress import compute

ORDERS = ("sequential", "reverse", "random", "bvalue")


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
    raise InputError(f"unknown fold order {order!r} (use one of {', '.join(ORDERS)})")


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
    shape, fortran, dtype, offset = read_npy_header(path)
    size3d, n = math.prod(shape[:3]), shape[3]
    lo, hi = int(flat_rows[0]), int(flat_rows[-1]) + 1
    span = np.empty((n, hi - lo), dtype=dtype)  # the rows' span of every volume
    with open(path, "rb") as f:
        for v in range(n):
            f.seek(offset + (v * size3d + lo) * dtype.itemsize)
            if f.readinto(memoryview(span[v]).cast("B")) != span[v].nbytes:
                raise InputError("file is shorter than its header declares", path)
    picked = span if len(flat_rows) == hi - lo else span[:, flat_rows - lo]
    return np.ascontiguousarray(picked.T, dtype=np.float32)


def _write_voxel_block(volumes: str, target: str, flat_rows: np.ndarray, start: int) -> None:
    block = _read_rows_from_volumes(volumes, flat_rows)
    offset = read_npy_header(target)[3]
    fd = os.open(target, os.O_WRONLY)
    try:
        pwrite_all(fd, np.ascontiguousarray(block).data, offset + start * block.shape[1] * 4)
    finally:
        os.close(fd)


def read_rows(path: str, start: int, stop: int) -> np.ndarray:
    """Rows ``start:stop`` of a C-ordered 2D ``.npy`` (one contiguous read)."""
    shape, _, dtype, offset = read_npy_header(path)
    width = shape[1] if len(shape) > 1 else 1
    with open(path, "rb") as f:
        raw = os.pread(
            f.fileno(),
            (stop - start) * width * dtype.itemsize,
            offset + start * width * dtype.itemsize,
        )
    return np.frombuffer(raw, dtype=dtype).reshape((stop - start, *shape[1:]))


def read_column(path: str, column: int) -> np.ndarray:
    """Column ``column`` of a Fortran-ordered 2D ``.npy`` (one contiguous read)."""
    shape, fortran, dtype, offset = read_npy_header(path)
    with open(path, "rb") as f:
        raw = os.pread(
            f.fileno(), shape[0] * dtype.itemsize, offset + column * shape[0] * dtype.itemsize
        )
    return np.frombuffer(raw, dtype=dtype)


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
    shape, _, dtype, _ = read_npy_header(volumes)
    flat = mask_index(mask)
    create_npy(target, (len(flat), shape[3]), np.float32, fortran_order=False)
    budget = chunk_bytes()
    tasks = [
        dask.delayed(_write_voxel_block, pure=False)(volumes, target, flat[a:b], a)
        for a, b in row_blocks(
            flat, math.prod(shape[:3]), shape[3] * max(dtype.itemsize, 4) * 2, budget
        )
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
    predictions = predict_folds(model, data, block_meta, folds)
    n_rows = read_npy_header(target)[0][0]
    offset = read_npy_header(target)[3]
    fd = os.open(target, os.O_WRONLY)
    try:
        for j, fold in enumerate(folds):
            column = np.ascontiguousarray(predictions[:, j], dtype=np.float32)
            pwrite_all(fd, column.data, offset + (int(fold) * n_rows + start) * 4)
    finally:
        os.close(fd)
    if residuals is not None:
        path, groups = residuals
        squared = (data[:, list(folds)] - predictions) ** 2
        labels = np.unique(groups)
        chosen = np.asarray(groups)[list(folds)]
        variance = np.stack([squared[:, chosen == g].mean(axis=1) for g in labels], axis=1)
        offset = read_npy_header(path)[3]
        fd = os.open(path, os.O_WRONLY)
        try:
            for k in range(len(labels)):
                column = np.ascontiguousarray(variance[:, k], dtype=np.float32)
                pwrite_all(fd, column.data, offset + (k * n_rows + start) * 4)
        finally:
            os.close(fd)


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
    (n_voxels, n), *_ = read_npy_header(voxels)
    folds = list(range(n)) if folds is None else [int(f) for f in folds]
    create_npy(target, (n_voxels, n), np.float32, fortran_order=True)
    extra = None
    if residuals is not None:
        if groups is None or len(groups) != n:
            raise InputError(f"residuals need the group of each of the {n} volumes")
        create_npy(residuals, (n_voxels, len(np.unique(groups))), np.float32, fortran_order=True)
        extra = (residuals, np.asarray(groups))
    rows = max(1, chunk_bytes() // (n * 4 * 4))
    tasks = [
        dask.delayed(_predict_block, pure=False)(
            voxels, target, a, min(a + rows, n_voxels), model, meta, voxel_meta or {}, folds, extra
        )
        for a in range(0, n_voxels, rows)
    ]
    compute(*tasks, label="predicting folds", progress=progress)
    return target


def write_vector(path: str, values: np.ndarray) -> str:
    """Save a (n_voxels,) float32 covariate as a 2D (n, 1) ``.npy`` for :func:`read_rows`."""
    with open(path, "wb") as f:  # a file object: np.save would append ".npy" to a name
        np.save(f, np.asarray(values, dtype=np.float32).reshape(-1, 1))
    return path


def scatter(values: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Put masked-voxel values back on the grid (zeros elsewhere), float32."""
    volume = np.zeros(mask.shape, dtype=np.float32, order="F")
    volume.ravel(order="K")[mask_index(mask)] = values
    return volume
