"""Compiled twins of ``scipy.ndimage.affine_transform`` for rigid/affine resampling.

With `numba <https://numba.pydata.org>`_ installed (``pip install "nidask[fast]"``),
:mod:`nidask.resample` interpolates ``mode="constant"`` volumes at orders 1 and 3 with
the kernels below instead of scipy's generic N-d loop: the same arithmetic (trilinear
weights; cubic B-spline weights on scipy's own ``spline_filter`` coefficients, whose
support is mirrored at the edges as scipy does for this mode; ``cval`` for samples
outside ``[0, n - 1]``), in double precision, walking the Fortran-ordered volume in
memory order.  They give scipy's values (the tests compare them) several times
faster.  Set ``nidask.kernels`` to ``"scipy"`` to use scipy everywhere.

Kernels compile on their first call in each process (about a second) and are not
cached on disk, so nothing is written outside the outputs and the owned cache.
"""

from __future__ import annotations

import functools
import importlib.util
import threading

import dask
import numpy as np
from scipy import ndimage as ndi

ORDERS = (1, 3)
"""Interpolation orders the kernels implement (``mode="constant"`` only)."""


def available(order: int, mode: str) -> bool:
    """Whether a compiled kernel serves ``order`` / ``mode`` here (and is not disabled).

    numba is looked up, not imported: it is imported (and the kernels compiled) by
    the first task that resamples, so nothing else pays for it.
    """
    if order not in ORDERS or mode != "constant":
        return False
    if dask.config.get("nidask.kernels", "auto") == "scipy":
        return False
    return _numba_installed()


@functools.cache
def _numba_installed() -> bool:
    return importlib.util.find_spec("numba") is not None


_BUILD_LOCK = threading.Lock()


@functools.cache
def _build():
    import numba

    @numba.njit(nogil=True, cache=False, inline="always")
    def _outside(cx, cy, cz, nx, ny, nz):  # pragma: no cover - compiled
        """scipy's mode="constant": no interpolation beyond the first and last voxel."""
        return cx < 0.0 or cy < 0.0 or cz < 0.0 or cx > nx - 1 or cy > ny - 1 or cz > nz - 1

    @numba.njit(nogil=True, cache=False)
    def _linear_at(volume, cx, cy, cz, scratch):  # pragma: no cover - compiled
        nx, ny, nz = volume.shape
        x0, y0, z0 = int(cx), int(cy), int(cz)
        x1, y1, z1 = min(x0 + 1, nx - 1), min(y0 + 1, ny - 1), min(z0 + 1, nz - 1)
        fx, fy, fz = cx - x0, cy - y0, cz - z0
        c00 = volume[x0, y0, z0] * (1 - fx) + volume[x1, y0, z0] * fx
        c10 = volume[x0, y1, z0] * (1 - fx) + volume[x1, y1, z0] * fx
        c01 = volume[x0, y0, z1] * (1 - fx) + volume[x1, y0, z1] * fx
        c11 = volume[x0, y1, z1] * (1 - fx) + volume[x1, y1, z1] * fx
        return (c00 * (1 - fy) + c10 * fy) * (1 - fz) + (c01 * (1 - fy) + c11 * fy) * fz

    @numba.njit(nogil=True, cache=False, inline="always")
    def _mirror(index, n):  # pragma: no cover - compiled
        if n == 1:
            return 0
        if index < 0:
            index = -index
        period = 2 * n - 2
        index = index % period
        return period - index if index >= n else index

    @numba.njit(nogil=True, cache=False, inline="always")
    def _support(c, n, weights, indices):  # pragma: no cover - compiled
        """Cubic B-spline weights and (mirrored) coefficient indices along one axis."""
        f = np.floor(c)
        t = c - f
        t2 = t * t
        t3 = t2 * t
        weights[0] = (1.0 - t) ** 3 / 6.0
        weights[1] = (3.0 * t3 - 6.0 * t2 + 4.0) / 6.0
        weights[2] = (-3.0 * t3 + 3.0 * t2 + 3.0 * t + 1.0) / 6.0
        weights[3] = t3 / 6.0
        for a in range(4):
            indices[a] = _mirror(int(f) - 1 + a, n)

    @numba.njit(nogil=True, cache=False)
    def _cubic_at(coef, cx, cy, cz, scratch):  # pragma: no cover - compiled
        weights, indices = scratch  # (3, 4) float64, (3, 4) int64: one row per axis
        nx, ny, nz = coef.shape
        _support(cx, nx, weights[0], indices[0])
        _support(cy, ny, weights[1], indices[1])
        _support(cz, nz, weights[2], indices[2])
        wx, wy, wz = weights[0], weights[1], weights[2]
        ix, iy, iz = indices[0], indices[1], indices[2]
        total = 0.0
        for c in range(4):
            plane = 0.0
            for b in range(4):
                line = 0.0
                for a in range(4):
                    line += coef[ix[a], iy[b], iz[c]] * wx[a]
                plane += line * wy[b]
            total += plane * wz[c]
        return total

    @numba.njit(nogil=True, cache=False)
    def _transform(data, matrix, offset, cval, out, sample, scratch):  # pragma: no cover
        """Output voxel (i, j, k) is ``sample(data, *(matrix @ (i, j, k) + offset))``.

        ``sample`` is itself a compiled function, so numba compiles one loop per
        interpolator, with no per-voxel dispatch.
        """
        nx, ny, nz = data.shape
        for k in range(out.shape[2]):  # Fortran order: i varies fastest in memory
            for j in range(out.shape[1]):
                bx = matrix[0, 1] * j + matrix[0, 2] * k + offset[0]
                by = matrix[1, 1] * j + matrix[1, 2] * k + offset[1]
                bz = matrix[2, 1] * j + matrix[2, 2] * k + offset[2]
                for i in range(out.shape[0]):
                    cx = bx + matrix[0, 0] * i
                    cy = by + matrix[1, 0] * i
                    cz = bz + matrix[2, 0] * i
                    if _outside(cx, cy, cz, nx, ny, nz):
                        out[i, j, k] = cval
                    else:
                        out[i, j, k] = sample(data, cx, cy, cz, scratch)

    return _transform, _linear_at, _cubic_at


def _compiled():
    """``(transform, linear, cubic)`` kernels; numba is imported on the first call."""
    with _BUILD_LOCK:  # one thread builds them, the others wait
        return _build()


def affine_transform(volume, matrix, order: int, cval: float, output) -> np.ndarray:
    """``scipy.ndimage.affine_transform(volume, matrix[:3, :3], matrix[:3, 3], order=order,
    mode="constant", cval=cval, output=output)``, compiled; see :func:`available`.

    ``volume`` is 3D in a dtype scipy reads natively, ``output`` a float32 array of its
    shape (filled and returned).
    """
    linear = np.ascontiguousarray(matrix[:3, :3], dtype=np.float64)
    offset = np.ascontiguousarray(matrix[:3, 3], dtype=np.float64)
    transform, linear_at, cubic_at = _compiled()
    scratch = (np.empty((3, 4)), np.empty((3, 4), np.int64))  # the cubic weights/indices
    if order == 1:
        transform(volume, linear, offset, float(cval), output, linear_at, scratch)
    else:
        # scipy's own prefilter (float64, mirror-extended as for mode="constant")
        coef = ndi.spline_filter(volume, order=3, output=np.float64, mode="constant")
        transform(np.asfortranarray(coef), linear, offset, float(cval), output, cubic_at, scratch)
    return output
