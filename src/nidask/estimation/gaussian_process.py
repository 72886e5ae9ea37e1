"""Gaussian-process prediction of diffusion-weighted volumes, every fold at once.

The predictor of FSL eddy (Andersson & Sotiropoulos, NeuroImage 125, 2016): the
signal of a voxel across volumes is a Gaussian process over gradient directions and
b-values.  Here:

``K = sigma2 * (ratio * C + I)``, with ``C_ij = A(theta_ij) * B(b_i, b_j)``:

* ``A`` eddy's spherical covariance ``S = 1 - 3 theta / (2 a) + theta^3 / (2 a^3)``
  (``theta < a``, else 0) of the angle between the directions, made antipodally
  symmetric as ``S(theta) + S(pi - theta)`` (:func:`angular_covariance`);
* ``B = exp(-(log b_i - log b_j)^2 / (2 l^2))`` across shells;
* one unknown mean per shell, with a vague prior (explicit basis ``H``, Rasmussen &
  Williams 2006, section 2.7), so each voxel's shell means are free;
* ``sigma2`` the noise variance (shared: noise is homogeneous), ``ratio`` the
  voxel's signal-to-noise variance ratio, the angular length ``a`` and the b-value
  length ``l``.

Hyperparameters ``a``, ``l`` and ``sigma2`` are shared by every voxel and fitted once
per pass by maximising the restricted marginal likelihood on a sample of the most
anisotropic voxels; each voxel then takes the ``ratio`` of a fixed grid that is most
likely for its own data (isotropic voxels get ratio 0: their prediction is the mean
of the other volumes of the shell; white matter follows the angular structure).

Leave-one-out in closed form (R&W eq. 5.12, with the basis integrated out)::

    Q = K^-1 - K^-1 H (H' K^-1 H)^-1 H' K^-1          (N x N, one per ratio)
    prediction of y_i without it = y_i - (Q y)_i / Q_ii

so every fold of every voxel is ``Y @ M.T`` with ``M = I - diag(Q)^-1 Q``: one N x N
factorisation per ratio and pass, one matrix product per block of voxels.  For a
single fold this equals fitting the process on the other N - 1 volumes and
predicting the left-out one (the tests check it against explicit refits).
"""

from __future__ import annotations

import numpy as np
from scipy import linalg, optimize, stats

from nidask.errors import InputError

#: Signal-to-noise variance ratios a voxel may take (0: no angular structure).
RATIOS = np.r_[0.0, np.geomspace(0.01, 100.0, 13)]

#: Rows :func:`predict_all_folds` holds in float64 at once.
ROW_BLOCK = 2048


def shell_labels(bvals, tolerance: float = 100.0) -> np.ndarray:
    """Integer shell label of each b-value: sorted values split where gaps exceed tolerance.

    >>> shell_labels([1000, 5, 2990, 1010, 0, 2000]).tolist()
    [1, 0, 3, 1, 0, 2]
    """
    bvals = np.asarray(bvals, dtype=float)
    order = np.argsort(bvals, kind="stable")
    labels = np.empty(len(bvals), dtype=int)
    label = 0
    for k, i in enumerate(order):
        if k and bvals[i] - bvals[order[k - 1]] > max(tolerance, 0.05 * bvals[i]):
            label += 1
        labels[i] = label
    return labels


def spherical(theta: np.ndarray, length: float) -> np.ndarray:
    """The spherical covariance function: ``1 - 3t/2 + t³/2`` for ``t = theta / length < 1``."""
    t = np.asarray(theta) / length
    return np.where(t < 1.0, 1.0 - 1.5 * t + 0.5 * t**3, 0.0)


def angular_covariance(directions: np.ndarray, length: float) -> np.ndarray:
    """Antipodally symmetric spherical covariance between gradient directions.

    ``A(g, h) = (S(theta) + S(pi - theta)) / (1 + S(pi))`` with ``theta`` the angle
    between ``g`` and ``h``: the covariance of ``g`` with ``h`` and with ``-h``.  As a sum
    of two covariances on the sphere it is positive definite (the spherical function is,
    for lengths up to pi), which ``S(arccos |g.h|)`` is not.
    """
    theta = np.arccos(np.clip(directions @ directions.T, -1.0, 1.0))
    return (spherical(theta, length) + spherical(np.pi - theta, length)) / (
        1.0 + spherical(np.pi, length)
    )


def covariance(gradients: np.ndarray, angular_length: float, bvalue_length: float) -> np.ndarray:
    """The unit-scale covariance ``C`` of diffusion-weighted volumes (N, 4) rows."""
    logb = np.log(gradients[:, 3])
    across = np.exp(-((logb[:, None] - logb[None, :]) ** 2) / (2.0 * bvalue_length**2))
    return angular_covariance(gradients[:, :3], angular_length) * across


def mean_basis(gradients: np.ndarray) -> np.ndarray:
    """(N, n_shells) indicator of each volume's shell: the free per-shell means."""
    labels = shell_labels(gradients[:, 3])
    return (labels[:, None] == np.unique(labels)[None, :]).astype(float)


def projected_precision(cov: np.ndarray, basis: np.ndarray) -> tuple[np.ndarray, float]:
    """``Q = K^-1 - K^-1 H (H' K^-1 H)^-1 H' K^-1`` and ``log|K| + log|H' K^-1 H|``."""
    factor = linalg.cho_factor(cov, lower=True)
    inverse = linalg.cho_solve(factor, np.eye(len(cov)))
    ki_h = inverse @ basis
    gram = basis.T @ ki_h
    q = inverse - ki_h @ linalg.solve(gram, ki_h.T, assume_a="pos")
    logdet = 2.0 * float(np.log(np.diag(factor[0])).sum()) + float(np.linalg.slogdet(gram)[1])
    return (q + q.T) / 2.0, logdet


def loo_weights(q: np.ndarray) -> np.ndarray:
    """``M`` with ``Y @ M.T`` the leave-one-out predictions (zero diagonal)."""
    diagonal = np.diag(q)
    if np.any(diagonal <= 0):
        raise InputError("every shell needs at least two volumes for leave-one-out")
    weights = np.eye(len(q)) - q / diagonal[:, None]
    np.fill_diagonal(weights, 0.0)
    return weights


def fit_hyperparameters(
    sample: np.ndarray, gradients: np.ndarray, sigma2: float | None = None, *, maxfev: int = 300
):
    """``(ratio, angular_length, bvalue_length, sigma2)`` maximising the REML of ``sample``.

    ``sample`` is (n_voxels, N) in the data's units.  With the noise variance
    ``sigma2`` known (the estimator measures it on the b=0 volumes) only the ratio
    and the lengths are fitted; otherwise the noise is profiled out too (its optimum
    is ``sum y'Qy / (n_voxels (N - n_shells))`` for given lengths), which leaves the
    ratio poorly determined: the spherical covariance is rough enough to mimic noise.
    """
    sample = np.asarray(sample, dtype=np.float64)
    basis = mean_basis(gradients)
    scatter_matrix = sample.T @ sample
    n_voxels, n = sample.shape
    dof = n - basis.shape[1]
    if dof < 1 or n_voxels < 1:
        raise InputError("too few volumes or voxels to fit the Gaussian process")
    multishell = basis.shape[1] > 1
    lower, upper = [-8.0, np.log(0.1), np.log(0.05)], [10.0, np.log(np.pi), 2.0]

    def unpack(p):
        p = np.clip(p, lower[: len(p)], upper[: len(p)])
        ratio, angular = np.exp(p[:2])
        return ratio, angular, (np.exp(p[2]) if multishell else 1.0)

    def precision(p):
        ratio, angular, across = unpack(p)
        return projected_precision(
            ratio * covariance(gradients, angular, across) + np.eye(n), basis
        )

    def cost(p):
        try:
            q, logdet = precision(p)
        except (linalg.LinAlgError, np.linalg.LinAlgError):
            return np.inf
        quadratic = float(np.sum(q * scatter_matrix))
        if sigma2 is not None:
            return (quadratic / (sigma2 * n_voxels) + logdet) / (2.0 * n)
        if quadratic <= 0:
            return np.inf
        return (dof * np.log(quadratic / (n_voxels * dof)) + logdet) / (2.0 * n)

    best = None
    for angular in (0.5, 1.0, 2.0):
        start = np.log([1.0, angular, 1.0])[: 3 if multishell else 2]
        result = optimize.minimize(
            cost, start, method="Nelder-Mead", options={"maxfev": maxfev, "xatol": 1e-3}
        )
        if best is None or result.fun < best.fun:
            best = result
    ratio, angular, across = unpack(best.x)
    if sigma2 is None:
        q, _ = precision(best.x)
        sigma2 = float(np.sum(q * scatter_matrix)) / (n_voxels * dof)
    return float(ratio), float(angular), float(across), float(sigma2)


def noise_variance(b0_values: np.ndarray) -> float | None:
    """Noise variance from repeated b=0 volumes (n_voxels, n_b0), or ``None`` (n_b0 < 3).

    Each voxel's variance across the b=0 volumes estimates the noise (plus what
    motion left); their median is robust to the edges where motion dominates and is
    scaled to the mean of a chi-square with ``n_b0 - 1`` degrees of freedom.
    """
    values = np.asarray(b0_values, dtype=np.float64)
    n = values.shape[1]
    if n < 3:
        return None
    variance = values.var(axis=1, ddof=1)
    return float(np.median(variance) * (n - 1) / stats.chi2.median(n - 1))


def predict_all_folds(
    data: np.ndarray,
    gradients: np.ndarray,
    angular_length: float,
    bvalue_length: float,
    sigma2: float,
    ratios=RATIOS,
) -> np.ndarray:
    """Leave-one-out predictions (n_voxels, N) of diffusion-weighted ``data``.

    Each voxel (row) uses the ratio of ``ratios`` with the highest restricted
    likelihood for its own values.  Rows are scored and predicted ``ROW_BLOCK`` at
    a time, so the float64 temporaries stay small whatever the block's size.
    """
    n = data.shape[1]
    basis = mean_basis(gradients)
    unit = covariance(gradients, angular_length, bvalue_length)
    precisions = [
        projected_precision(sigma2 * (ratio * unit + np.eye(n)), basis) for ratio in ratios
    ]
    # Every ratio's K shares the eigenvectors V of C: with z = V' y, each voxel's
    # y'Qy = sum d z^2 - u' G^-1 u, u = W' (d z), W = V'H, G = W' diag(d) W and
    # d = 1 / (sigma2 (ratio lambda + 1)): one N x N product per row for all ratios.
    eigenvalues, vectors = np.linalg.eigh(unit)
    eigenvalues = np.clip(eigenvalues, 0.0, None)  # C is positive semi-definite
    rotated = vectors.T @ basis
    scales, inverse_grams = [], []
    for ratio in ratios:
        d = 1.0 / (sigma2 * (ratio * eigenvalues + 1.0))
        scales.append(d)
        inverse_grams.append(np.linalg.inv(rotated.T @ (d[:, None] * rotated)))
    scales = np.array(scales)  # (n_ratios, N)
    logdets = np.array([logdet for _, logdet in precisions])
    out = np.empty(data.shape, dtype=np.float32)
    for start in range(0, len(data), ROW_BLOCK):
        block = np.asarray(data[start : start + ROW_BLOCK], dtype=np.float64)
        z = block @ vectors
        quadratic = (z * z) @ scales.T  # (rows, n_ratios): y' K^-1 y
        for k, (d, inverse_gram) in enumerate(zip(scales, inverse_grams, strict=True)):
            u = (z * d) @ rotated
            quadratic[:, k] -= np.einsum("vs,st,vt->v", u, inverse_gram, u)
        choice = np.argmax(-0.5 * quadratic - 0.5 * logdets, axis=1)
        for k, (q, _) in enumerate(precisions):
            rows = np.flatnonzero(choice == k)
            if len(rows):
                out[start + rows] = block[rows] @ loo_weights(q).T
    return out
