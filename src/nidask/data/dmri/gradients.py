"""Diffusion gradient tables: reading FSL and RAS tables, checking them, finding shells.

``gradients`` is an (N, 4) table of unit direction + b-value rows (nifreeze 0.1.0's
convention); non-unit directions are normalised and their b-value multiplied by the
norm, and near-zero directions mark b=0 volumes.  Directions are RAS+: FSL's
``.bvec`` numbers are turned into RAS+ with the image's affine when read, and back
when written (:func:`nidask.geometry.fsl_to_ras`).
"""

from __future__ import annotations

import os

import numpy as np

from nidask.config import b0_threshold
from nidask.errors import InputError
from nidask.geometry import fsl_to_ras
from nidask.io.sources import check_readable

#: Diffusion-weighted volumes motion estimation needs (checked when estimating, not
#: when loading: see :func:`check_diffusion_volumes`).
MIN_DIFFUSION_VOLUMES = 6
#: Directions per shell from which the Gaussian-process model is the default.
GP_MIN_DIRECTIONS = 10
GRADIENT_ATOL = 1e-2


def normalize_gradients(table, path: str | None = None) -> np.ndarray:
    """Return an (N, 4) float table with unit directions and rescaled b-values.

    Non-finite directions on b=0 rows (b-value at most ``nidask.b0-threshold``)
    become zero vectors, as dipy and FSL read them; on a diffusion-weighted row, or
    in a b-value, they are an error naming the volume.

    Parameters
    ----------
    table : array-like (N, 4) or (4, N)
        Directions (3 columns) and b-values (last column).
    path : str, optional
        File the table came from, for error messages.

    Examples
    --------
    >>> normalize_gradients([[2.0, 0, 0, 1000], [0, 0, 0, 0]]).tolist()
    [[1.0, 0.0, 0.0, 2000.0], [0.0, 0.0, 0.0, 0.0]]
    >>> normalize_gradients([[np.nan, np.nan, np.nan, 0], [0, 1, 0, 1000]]).tolist()
    [[0.0, 0.0, 0.0, 0.0], [0.0, 1.0, 0.0, 1000.0]]
    """
    table = np.array(table, dtype=float)
    if table.ndim != 2 or 4 not in table.shape:
        raise InputError(f"gradient table must be (N, 4) or (4, N), got {table.shape}", path)
    if table.shape[1] != 4:
        table = table.T
    bad_b = np.flatnonzero(~np.isfinite(table[:, 3]))
    if bad_b.size:
        raise InputError(f"NaN or infinite b-value {_which(bad_b)}", path)
    negative = np.flatnonzero(table[:, 3] < 0)
    if negative.size:
        raise InputError(f"negative b-value {_which(negative)}", path)
    bad_direction = ~np.all(np.isfinite(table[:, :3]), axis=1)
    weighted = table[:, 3] > b0_threshold()
    bad = np.flatnonzero(bad_direction & weighted)
    if bad.size:
        raise InputError(
            f"NaN or infinite gradient direction {_which(bad)} (b={table[bad[0], 3]:g}); "
            "only b=0 volumes may have one",
            path,
        )
    table[bad_direction, :3] = 0.0
    norms = np.linalg.norm(table[:, :3], axis=1)
    null = norms < GRADIENT_ATOL
    table[null] = 0.0
    rescale = ~null & ~np.isclose(norms, 1.0, atol=GRADIENT_ATOL)
    table[rescale, :3] /= norms[rescale, None]
    table[rescale, 3] *= norms[rescale]
    # rows already unit to rounding are left alone, so normalising is idempotent (a
    # table survives select/lofo/NFDH5 round trips bit for bit)
    almost = ~null & ~rescale & (np.abs(norms - 1.0) > 1e-12)
    table[almost, :3] /= norms[almost, None]
    return table


def _which(index: np.ndarray) -> str:
    """Name the first of some volumes (0-based) for an error message.

    >>> _which(np.array([3, 7, 9]))
    'in volume 3 (counting from 0) and 2 more'
    """
    more = f" and {index.size - 1} more" if index.size > 1 else ""
    return f"in volume {int(index[0])} (counting from 0){more}"


def _loadtxt(path, what: str) -> np.ndarray:
    import warnings

    path = check_readable(path)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # "input contained no data"
            values = np.loadtxt(path, dtype=float, ndmin=2)
    except ValueError as exc:
        raise InputError(f"cannot parse {what} file ({exc})", path) from exc
    if values.size == 0:
        raise InputError(f"{what} file has no values", path)
    return values


def _orient_bvecs(bvecs: np.ndarray, bvals: np.ndarray, path, bval_path=None) -> np.ndarray:
    """Return FSL b-vectors given 3xN or Nx3 as (N, 3) rows matching ``bvals``.

    A 3x3 file (three volumes) is read as FSL's 3xN unless only its rows, and not
    its columns, are unit vectors on the diffusion-weighted volumes.

    >>> _orient_bvecs(np.array([[1.0, 0, 0], [0, 0.6, 0], [0, 0.8, 1]]), np.full(3, 1e3), "x")[1]
    array([0. , 0.6, 0.8])
    >>> _orient_bvecs(np.array([[1.0, 0, 0], [0, 0.6, 0.8], [0, 0, 1]]), np.full(3, 1e3), "x")[1]
    array([0. , 0.6, 0.8])
    """
    n = bvals.size
    if bvecs.shape == (3, 3) and n == 3:
        weighted = bvals > b0_threshold()

        def unit(rows):
            norms = np.linalg.norm(rows[weighted], axis=1)
            return bool(np.all(np.abs(norms - 1.0) < GRADIENT_ATOL))

        return bvecs if unit(bvecs) and not unit(bvecs.T) else bvecs.T
    if bvecs.shape == (3, n):
        return bvecs.T
    if bvecs.shape == (n, 3):
        return bvecs
    if 3 not in bvecs.shape:
        raise InputError(
            f"b-vectors must be 3xN or Nx3, got {bvecs.shape[0]}x{bvecs.shape[1]}", path
        )
    count = bvecs.shape[1] if bvecs.shape[0] == 3 else bvecs.shape[0]
    where = "" if bval_path is None else f" in {os.fspath(bval_path)}"
    raise InputError(f"{count} b-vectors but {n} b-values{where}", path)


def read_gradients(
    bvec_file=None,
    bval_file=None,
    gradients_file=None,
    n_volumes: int | None = None,
    affine=None,
) -> np.ndarray:
    """Read a gradient table from FSL ``.bvec``/``.bval`` files or an MRtrix-style table.

    Parameters
    ----------
    bvec_file, bval_file : path-like, optional
        FSL-style b-vectors (3xN or Nx3; a 3x3 file is oriented by which of its rows
        or columns are unit vectors, FSL's 3xN when undecided) and b-values (one row
        or one column).  FSL's numbers are along the image's voxel axes (x negated
        when the affine's determinant is positive): with ``affine`` they are turned
        into RAS+ directions (:func:`nidask.geometry.fsl_to_ras`), without it they
        are returned as written.
    gradients_file : path-like, optional
        Rows of ``x y z b`` with directions in RAS+ (scanner) coordinates, as MRtrix
        ``.b`` tables (``#`` comment lines allowed); a (4, N) table is read too.
        Takes precedence over ``bvec_file``/``bval_file``.
    n_volumes : int, optional
        The series' volume count, which the table must match.
    affine : array-like (4, 4), optional
        The image's voxel-to-RAS affine, which gives FSL's b-vectors their frame.

    Returns
    -------
    ndarray (N, 4)
        See :func:`normalize_gradients`: NaN directions of b=0 volumes become zero
        vectors (as dipy and FSL read them).

    Raises
    ------
    InputError
        Naming the file and the problem (unreadable or unparsable, wrong shape,
        counts that disagree, NaN on a diffusion-weighted volume, negative b-values).
    """
    if gradients_file is not None:
        source = os.fspath(gradients_file)
        table = _loadtxt(gradients_file, "gradients")
        if table.ndim != 2 or table.shape[1] != 4 and table.shape[0] != 4:
            raise InputError(
                f"gradient table must be (N, 4) rows of x y z b, got {table.shape[1]} columns",
                source,
            )
        table = normalize_gradients(table, source)
    elif bvec_file is not None and bval_file is not None:
        source = os.fspath(bvec_file)
        bvecs = _loadtxt(bvec_file, "b-vector")
        bvals = _loadtxt(bval_file, "b-value")
        if min(bvals.shape) != 1:
            raise InputError(
                f"b-values must be one row or one column, got {bvals.shape[0]}x{bvals.shape[1]}",
                bval_file,
            )
        bvals = bvals.ravel()
        bad_b = np.flatnonzero(~np.isfinite(bvals))
        if bad_b.size:
            raise InputError(f"NaN or infinite b-value {_which(bad_b)}", bval_file)
        negative = np.flatnonzero(bvals < 0)
        if negative.size:
            raise InputError(f"negative b-value {_which(negative)}", bval_file)
        bvecs = _orient_bvecs(bvecs, bvals, source, bval_file)
        table = normalize_gradients(np.column_stack((bvecs, bvals)), source)
        if affine is not None:
            table[:, :3] = fsl_to_ras(table[:, :3], affine)
    else:
        raise InputError("no gradient information: give bvec_file + bval_file or gradients_file")
    if n_volumes is not None and len(table) != n_volumes:
        raise InputError(
            f"gradient table has {len(table)} entries but the series has {n_volumes} volumes",
            source,
        )
    return table


def check_diffusion_volumes(
    dataset, minimum: int = MIN_DIFFUSION_VOLUMES, what: str = "motion estimation"
) -> None:
    """Refuse, at estimation time, a DWI with fewer diffusion-weighted volumes than needed.

    Loading never refuses a short series (it can still be converted or exported).

    Parameters
    ----------
    dataset : DWI
        The dataset to check (its ``dataobj`` holds the diffusion-weighted volumes).
    minimum : int
        Volumes ``what`` needs (default :data:`MIN_DIFFUSION_VOLUMES`).
    what : str
        The consumer, for the message.

    Raises
    ------
    InputError
        Naming the dataset's file, the count and the minimum.
    """
    found = len(dataset)
    if found < minimum:
        path = (getattr(dataset, "inputs", None) or (None,))[0]
        raise InputError(
            f"{what} needs at least {minimum} diffusion-weighted volumes, found {found}", path
        )


def find_shells(bvals: np.ndarray, num_bins: int = 15, bval_cap: float = 8000.0) -> list:
    """Group b-values into shells by histogram binning (as nifreeze does).

    Returns a list of ``(estimated_bvalue, indices)``, the estimate being the
    median b-value of the group.
    """
    bvals = np.asarray(bvals, dtype=float)
    upper = min(bvals.max(), bval_cap) if bvals.size else 1.0
    edges = np.histogram_bin_edges(bvals, bins=num_bins, range=(-1, max(upper, 0.0)))
    shells = []
    for lower, upper in zip(edges[:-1], edges[1:], strict=True):
        members = np.flatnonzero((bvals > lower) & (bvals <= upper))
        if members.size:
            shells.append((float(np.median(bvals[members])), members))
    return shells
