"""Compiled kernels: twins of ``scipy.ndimage.affine_transform`` for rigid/affine
resampling, and the registration's point sampler and similarity sums.

With `numba <https://numba.pydata.org>`_ (a dependency of nidask wherever it installs),
:mod:`nidask.ops.resample` interpolates ``mode="constant"`` volumes at orders 1 and 3 with
the kernels below instead of scipy's generic N-d loop: the same arithmetic (trilinear
weights; cubic B-spline weights on scipy's own ``spline_filter`` coefficients, whose
support is mirrored at the edges as scipy does for this mode; ``cval`` for samples
outside ``[0, n - 1]``), in double precision, walking the Fortran-ordered volume in
memory order.  They give scipy's values (the tests compare them) several times
faster.  Set ``nidask.kernels`` to ``"scipy"`` to use scipy everywhere; without numba
scipy serves every call, and the first says so once (:data:`SCIPY_FALLBACK_NOTE`).

Kernels compile on their first call in each process (about a second) and are not
cached on disk, so nothing is written outside the outputs and the owned cache.
"""

from __future__ import annotations

import functools
import importlib.util
import threading
import warnings

import dask
import numpy as np
from scipy import ndimage as ndi

INTERPOLATION_ORDERS = (1, 3)
"""Interpolation orders the kernels implement (``mode="constant"`` only)."""

SCIPY_FALLBACK_NOTE = (
    "nidask: numba is not installed, so resampling and registration run on scipy, "
    "several times slower (pip install numba)"
)


def available(order: int, mode: str) -> bool:
    """Whether a compiled kernel serves ``order`` / ``mode`` here (and is not disabled).

    numba is looked up, not imported: it is imported (and the kernels compiled) by
    the first task that resamples, so nothing else pays for it.
    """
    return order in INTERPOLATION_ORDERS and mode == "constant" and enabled()


def enabled() -> bool:
    """Whether compiled kernels serve here: numba is installed and ``nidask.kernels``
    is not ``"scipy"`` (without numba, the first call notes the fallback once)."""
    if dask.config.get("nidask.kernels", "auto") == "scipy":
        return False
    if not _numba_installed():
        _note_scipy_fallback()
        return False
    return True


@functools.cache
def _numba_installed() -> bool:
    return importlib.util.find_spec("numba") is not None


@functools.cache
def _note_scipy_fallback() -> None:
    warnings.warn(SCIPY_FALLBACK_NOTE, RuntimeWarning, stacklevel=3)


_BUILD_LOCK = threading.Lock()


@functools.cache
def _mirror_kernel():
    """Compiled mirror extension of a grid index (scipy's ``mode="mirror"``), and of
    the four indices of a cubic B-spline's support: ``(mirror, indices)``."""
    import numba

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
    def _indices(first, n, indices):  # pragma: no cover - compiled
        """The four coefficient indices ``first - 1 .. first + 2``, mirrored at the edges
        (the modulo only where the support leaves the grid)."""
        if first >= 1 and first + 2 < n:
            for a in range(4):
                indices[a] = first - 1 + a
        else:
            for a in range(4):
                indices[a] = _mirror(first - 1 + a, n)

    return _mirror, _indices


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

    _indices = _mirror_kernel()[1]

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
        _indices(int(f), n, indices)

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
        # (written straight into a Fortran-ordered array: the loop walks x fastest)
        coef = np.empty(volume.shape, dtype=np.float64, order="F")
        ndi.spline_filter(volume, order=3, output=coef, mode="constant")
        transform(coef, linear, offset, float(cval), output, cubic_at, scratch)
    return output


@functools.cache
def _build_sampler():
    import numba

    @numba.njit(nogil=True, cache=False, inline="always")
    def _axis(v, n):  # pragma: no cover - compiled
        """Base index and weight of ``v`` on an axis of ``n`` (scipy's mode="nearest")."""
        c = min(max(v, 0.0), n - 1.0)
        base = min(int(np.floor(c)), max(n - 2, 0))
        return base, c - base, 0.0 <= v < n - 1.0

    @numba.njit(nogil=True, cache=False)
    def _sample(volume, points, linear, offset, values, gradient):  # pragma: no cover
        nx, ny, nz = volume.shape
        sx, sy, sz = min(nx - 1, 1), min(ny - 1, 1), min(nz - 1, 1)
        for p in range(points.shape[0]):
            x, y, z = points[p, 0], points[p, 1], points[p, 2]
            vx = linear[0, 0] * x + linear[0, 1] * y + linear[0, 2] * z + offset[0]
            vy = linear[1, 0] * x + linear[1, 1] * y + linear[1, 2] * z + offset[1]
            vz = linear[2, 0] * x + linear[2, 1] * y + linear[2, 2] * z + offset[2]
            i, fx, gx = _axis(vx, nx)
            j, fy, gy = _axis(vy, ny)
            k, fz, gz = _axis(vz, nz)
            c000 = volume[i, j, k]
            c100 = volume[i + sx, j, k]
            c010 = volume[i, j + sy, k]
            c110 = volume[i + sx, j + sy, k]
            c001 = volume[i, j, k + sz]
            c101 = volume[i + sx, j, k + sz]
            c011 = volume[i, j + sy, k + sz]
            c111 = volume[i + sx, j + sy, k + sz]
            # bilinear in (y, z) at the two x planes, and so on for each axis
            x0 = (c000 * (1 - fy) + c010 * fy) * (1 - fz) + (c001 * (1 - fy) + c011 * fy) * fz
            x1 = (c100 * (1 - fy) + c110 * fy) * (1 - fz) + (c101 * (1 - fy) + c111 * fy) * fz
            values[p] = x0 * (1 - fx) + x1 * fx
            if gradient.shape[0] == 0:
                continue
            gradient[p, 0] = (x1 - x0) if gx else 0.0
            if gy:
                y0 = (c000 * (1 - fx) + c100 * fx) * (1 - fz) + (c001 * (1 - fx) + c101 * fx) * fz
                y1 = (c010 * (1 - fx) + c110 * fx) * (1 - fz) + (c011 * (1 - fx) + c111 * fx) * fz
                gradient[p, 1] = y1 - y0
            else:
                gradient[p, 1] = 0.0
            if gz:
                z0 = (c000 * (1 - fx) + c100 * fx) * (1 - fy) + (c010 * (1 - fx) + c110 * fx) * fy
                z1 = (c001 * (1 - fx) + c101 * fx) * (1 - fy) + (c011 * (1 - fx) + c111 * fx) * fy
                gradient[p, 2] = z1 - z0
            else:
                gradient[p, 2] = 0.0

    _indices = _mirror_kernel()[1]

    @numba.njit(nogil=True, cache=False, inline="always")
    def _cubic_axis(c, n, weights, slopes, indices):  # pragma: no cover - compiled
        """Cubic B-spline weights, their derivatives and (mirrored) indices on one axis."""
        c = min(max(c, 0.0), n - 1.0)
        f = np.floor(c)
        t = c - f
        u = 1.0 - t
        weights[0] = u * u * u / 6.0
        weights[1] = (3.0 * t * t * t - 6.0 * t * t + 4.0) / 6.0
        weights[2] = (-3.0 * t * t * t + 3.0 * t * t + 3.0 * t + 1.0) / 6.0
        weights[3] = t * t * t / 6.0
        slopes[0] = -0.5 * u * u
        slopes[1] = 1.5 * t * t - 2.0 * t
        slopes[2] = -1.5 * t * t + t + 0.5
        slopes[3] = 0.5 * t * t
        _indices(int(f), n, indices)

    @numba.njit(nogil=True, cache=False)
    def _sample_cubic(coef, points, linear, offset, values, gradient):  # pragma: no cover
        nx, ny, nz = coef.shape
        w = np.empty((3, 4))
        s = np.empty((3, 4))
        ix = np.empty((3, 4), np.int64)
        want = gradient.shape[0] > 0
        for p in range(points.shape[0]):
            x, y, z = points[p, 0], points[p, 1], points[p, 2]
            vx = linear[0, 0] * x + linear[0, 1] * y + linear[0, 2] * z + offset[0]
            vy = linear[1, 0] * x + linear[1, 1] * y + linear[1, 2] * z + offset[1]
            vz = linear[2, 0] * x + linear[2, 1] * y + linear[2, 2] * z + offset[2]
            _cubic_axis(vx, nx, w[0], s[0], ix[0])
            _cubic_axis(vy, ny, w[1], s[1], ix[1])
            _cubic_axis(vz, nz, w[2], s[2], ix[2])
            value = gx = gy = gz = 0.0
            for a in range(4):  # C order: the innermost loop walks z, contiguous
                for b in range(4):
                    line = dline = 0.0
                    for c in range(4):
                        coefficient = coef[ix[0, a], ix[1, b], ix[2, c]]
                        line += coefficient * w[2, c]
                        dline += coefficient * s[2, c]
                    value += line * w[0, a] * w[1, b]
                    gx += line * s[0, a] * w[1, b]
                    gy += line * w[0, a] * s[1, b]
                    gz += dline * w[0, a] * w[1, b]
            values[p] = value
            if want:
                # outside the grid the sample is clamped: no slope across the edge
                gradient[p, 0] = gx if 0.0 <= vx <= nx - 1.0 else 0.0
                gradient[p, 1] = gy if 0.0 <= vy <= ny - 1.0 else 0.0
                gradient[p, 2] = gz if 0.0 <= vz <= nz - 1.0 else 0.0

    return _sample, _sample_cubic


def sampler_available() -> bool:
    """Whether the compiled point sampler of :func:`sample_points` serves here."""
    return enabled()


def sample_points(volume, points, linear, offset, gradient: bool = True, order: int = 1):
    """Values (and exact gradients) of ``volume`` at ``linear @ p + offset``.

    ``points`` is an (n, 3) float64 array.  Order 1: ``volume`` is a 3D float32
    image, sampled as ``scipy.ndimage.map_coordinates(order=1, mode="nearest")``.
    Order 3: ``volume`` holds cubic B-spline coefficients
    (``scipy.ndimage.spline_filter(image, 3, mode="mirror")``, float32 or float64), sampled as
    ``map_coordinates(order=3, mode="mirror", prefilter=False)`` inside the grid and
    at the nearest edge outside it.  The gradient is the derivative of the
    interpolant along each voxel axis (zero where a coordinate lies outside the
    grid), shape (n, 3).  Returns ``(values, gradient)`` as float64 (``gradient`` is
    ``None`` unless asked for).
    """
    with _BUILD_LOCK:
        linear_kernel, cubic_kernel = _build_sampler()
    n = len(points)
    values = np.empty(n)
    grad = np.empty((n, 3)) if gradient else np.empty((0, 3))
    if order == 3:
        dtype = np.float32 if np.asarray(volume).dtype == np.float32 else np.float64
        kernel, volume = cubic_kernel, np.ascontiguousarray(volume, dtype=dtype)
    else:
        kernel, volume = linear_kernel, np.ascontiguousarray(volume, dtype=np.float32)
    kernel(
        volume,
        np.ascontiguousarray(points, dtype=np.float64),
        np.ascontiguousarray(linear, dtype=np.float64),
        np.ascontiguousarray(offset, dtype=np.float64),
        values,
        grad,
    )
    return values, (grad if gradient else None)


@functools.cache
def _build_ncc():
    import numba

    @numba.njit(nogil=True, cache=False)
    def _ncc(moving, slopes, weights, fixed, points, first, second):  # pragma: no cover
        n = moving.shape[0]
        mean = 0.0
        for p in range(n):
            mean += weights[p] * moving[p]
        norm2 = 0.0
        cross = 0.0
        for a in range(3):
            for j in range(4):
                first[a, j] = 0.0
                second[a, j] = 0.0
        for p in range(n):
            centred = moving[p] - mean
            wm = weights[p] * centred
            wf = weights[p] * fixed[p]
            norm2 += wm * centred
            cross += wf * centred
            for a in range(3):
                gf = wf * slopes[p, a]
                gm = wm * slopes[p, a]
                first[a, 0] += gf
                second[a, 0] += gm
                for j in range(3):
                    first[a, j + 1] += gf * points[p, j]
                    second[a, j + 1] += gm * points[p, j]
        return norm2, cross

    return _ncc


def ncc_terms(moving, slopes, weights, fixed, points):
    """The weighted sums that normalized cross-correlation and its gradient need.

    With ``mc = moving - sum(weights * moving)`` (``fixed`` already centred), returns
    ``(sum w mc^2, sum w fixed mc, F, M)`` where ``F[a] = sum_p w_p fixed_p
    slopes[p, a] * (1, points[p])`` and ``M`` the same with ``mc`` for ``fixed``:
    (3, 4) arrays.  One compiled pass over the points instead of a dozen numpy
    temporaries of their size.
    """
    with _BUILD_LOCK:
        kernel = _build_ncc()
    first, second = np.empty((3, 4)), np.empty((3, 4))
    norm2, cross = kernel(
        np.ascontiguousarray(moving, dtype=np.float64),
        np.ascontiguousarray(slopes, dtype=np.float64),
        np.ascontiguousarray(weights, dtype=np.float64),
        np.ascontiguousarray(fixed, dtype=np.float64),
        np.ascontiguousarray(points, dtype=np.float64),
        first,
        second,
    )
    return norm2, cross, first, second


@functools.cache
def _build_mattes():
    import numba

    @numba.njit(nogil=True, cache=False, inline="always")
    def _spline(t):  # pragma: no cover - compiled
        a = abs(t)
        if a < 1.0:
            return (4.0 - 6.0 * a * a + 3.0 * a * a * a) / 6.0
        if a < 2.0:
            return (2.0 - a) ** 3 / 6.0
        return 0.0

    @numba.njit(nogil=True, cache=False, inline="always")
    def _spline_slope(t):  # pragma: no cover - compiled
        a = abs(t)
        sign = 1.0 if t > 0 else (-1.0 if t < 0 else 0.0)
        if a < 1.0:
            return sign * (-2.0 * a + 1.5 * a * a)
        if a < 2.0:
            return sign * (-0.5 * (2.0 - a) ** 2)
        return 0.0

    @numba.njit(nogil=True, cache=False, inline="always")
    def _window(m, low, width, bins):  # pragma: no cover - compiled
        pos = (m - low) / width
        pos = min(max(pos, 0.0), bins - 1.0) + 2.0
        return pos, int(np.floor(pos)) - 1

    @numba.njit(nogil=True, cache=False)
    def _mattes(
        moving, slopes, fbin, low, width, points, joint, log_ratio, sums
    ):  # pragma: no cover
        n = moving.shape[0]
        bins, mbins = joint.shape
        joint[:, :] = 0.0
        for p in range(n):
            pos, first = _window(moving[p], low, width, bins)
            for k in range(4):
                joint[fbin[p], first + k] += _spline(first + k - pos)
        pf = np.zeros(bins)
        pm = np.zeros(mbins)
        for i in range(bins):
            for k in range(mbins):
                joint[i, k] /= n
                pf[i] += joint[i, k]
                pm[k] += joint[i, k]
        mi = 0.0
        for i in range(bins):
            for k in range(mbins):
                log_ratio[i, k] = 0.0
                if joint[i, k] > 0:
                    mi += joint[i, k] * np.log(joint[i, k] / (pf[i] * pm[k]))
                    log_ratio[i, k] = np.log(joint[i, k] / pm[k])
        for a in range(3):
            for j in range(4):
                sums[a, j] = 0.0
        top = low + width * (bins - 1)
        scale = -1.0 / (width * n)
        for p in range(n):
            m = moving[p]
            if not (low < m < top):
                continue
            pos, first = _window(m, low, width, bins)
            w = 0.0
            for k in range(4):
                w += _spline_slope(first + k - pos) * log_ratio[fbin[p], first + k]
            w *= scale
            for a in range(3):
                g = w * slopes[p, a]
                sums[a, 0] += g
                for j in range(3):
                    sums[a, j + 1] += g * points[p, j]
        return mi

    return _mattes


def mattes_terms(moving, slopes, fixed_bins, low, width, bins, points):
    """Mattes mutual information and the sums its gradient needs, in one compiled pass.

    ``moving`` (n,) samples and their voxel ``slopes`` (n, 3); ``fixed_bins`` (n,) the
    fixed samples' histogram bins (``0 .. bins - 1``); the moving intensity ``low``
    and bin ``width`` place each moving sample in ``bins + 4`` cubic B-spline bins.
    Returns ``(mi, S)`` with ``S[a] = sum_p dMI/dm_p slopes[p, a] (1, points[p])``,
    a (3, 4) array: the numpy twin is
    :func:`nidask.estimation.registration.mattes_terms_numpy`.
    """
    with _BUILD_LOCK:
        kernel = _build_mattes()
    joint, log_ratio = np.empty((bins, bins + 4)), np.empty((bins, bins + 4))
    sums = np.empty((3, 4))
    mi = kernel(
        np.ascontiguousarray(moving, dtype=np.float64),
        np.ascontiguousarray(slopes, dtype=np.float64),
        np.ascontiguousarray(fixed_bins, dtype=np.intp),
        float(low),
        float(width),
        np.ascontiguousarray(points, dtype=np.float64),
        joint,
        log_ratio,
        sums,
    )
    return float(mi), sums


@functools.cache
def _build_block_mean():
    import numba

    @numba.njit(nogil=True, cache=False)
    def _block_mean(image, factor, out):  # pragma: no cover - compiled
        nx, ny, nz = image.shape
        bx, by, bz = out.shape
        scale = 1.0 / factor**3
        for i in range(bx):
            for j in range(by):
                for k in range(bz):
                    total = 0.0
                    for a in range(factor):
                        x = min(i * factor + a, nx - 1)  # edge padding
                        for b in range(factor):
                            y = min(j * factor + b, ny - 1)
                            for c in range(factor):
                                total += image[x, y, min(k * factor + c, nz - 1)]
                    out[i, j, k] = total * scale

    return _block_mean


def block_mean(image, factor: int) -> np.ndarray:
    """Float32 means of cubic blocks of ``factor`` voxels a side, the image edge-padded
    to fit: :func:`nidask.ops.resample.block_mean`, compiled (sums in float64)."""
    with _BUILD_LOCK:
        kernel = _build_block_mean()
    image = np.asarray(image)
    if image.dtype not in (np.float32, np.float64):
        image = image.astype(np.float32)
    if image.flags.f_contiguous and not image.flags.c_contiguous:
        return block_mean(image.T, factor).T  # the kernel walks memory in C order
    out = np.empty(tuple(-(-s // factor) for s in image.shape), dtype=np.float32)
    kernel(image, int(factor), out)
    return out


def warm_up() -> None:
    """Compile every kernel now, for the dtypes the estimator uses (no-op without numba).

    Compiling costs about a second and some tens of MiB per process, once; calling
    this first (in a benchmark, or a worker's start-up) keeps that cost out of the
    measurements and the first tasks.
    """
    if not enabled():
        return
    rng = np.random.default_rng(0)
    volume = rng.random((8, 8, 8)).astype(np.float32)
    identity = np.eye(4)
    for data in (volume, (volume * 100).astype(np.int16)):
        for order in INTERPOLATION_ORDERS:
            affine_transform(data, identity, order, 0.0, np.empty(data.shape, np.float32))
            # into a box of a Fortran-ordered output (a resampled series' ``box``)
            boxed = np.empty((8, 8, 8, 1), np.float32, order="F")[1:7, 1:7, 1:7, 0]
            affine_transform(data, identity, order, 0.0, boxed)
    points = rng.random((16, 3)) * 6
    for order in INTERPOLATION_ORDERS:
        values, slopes = sample_points(volume, points, identity[:3, :3], np.zeros(3), True, order)
    ncc_terms(values, slopes, np.full(16, 1 / 16), values - values.mean(), points)
    block_mean(volume, 2)
    mattes_terms(values, slopes, np.zeros(16, np.intp), 0.0, 1.0, 4, points)
