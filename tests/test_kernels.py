"""The compiled resampling kernels give scipy.ndimage.affine_transform's values."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import dask
import numpy as np
import pytest
from scipy import ndimage as ndi
from scipy.spatial.transform import Rotation

from nidask.estimation.registration import RigidRegistration
from nidask.ops import kernels
from nidask.ops.resample import resample_volume

RNG = np.random.default_rng(11)


def _matrix(rotation_rad: float, shift_voxels: float) -> np.ndarray:
    matrix = np.eye(4)
    matrix[:3, :3] = Rotation.from_rotvec(RNG.normal(size=3) * rotation_rad).as_matrix()
    matrix[:3, 3] = RNG.normal(size=3) * shift_voxels
    return matrix


def _scipy(volume, matrix, order, cval):
    out = np.empty(volume.shape, np.float32, order="F")
    ndi.affine_transform(
        volume, matrix[:3, :3], offset=matrix[:3, 3], order=order, output=out,
        mode="constant", cval=cval, prefilter=order > 1,
    )  # fmt: skip
    return out


@pytest.mark.parametrize("order", kernels.INTERPOLATION_ORDERS)
@pytest.mark.parametrize("dtype", ["int16", "uint8", "float32", "float64"])
def test_kernels_match_scipy(order, dtype):
    """Rotations and shifts that take many samples out of the volume, odd shapes, a cval."""
    volume = np.asfortranarray((RNG.random((23, 30, 17)) * 200).astype(dtype))
    for rotation, shift in [(0.0, 0.0), (0.03, 0.4), (0.2, 6.0), (0.6, 12.0)]:
        matrix = _matrix(rotation, shift)
        out = np.empty(volume.shape, np.float32, order="F")
        kernels.affine_transform(volume, matrix, order, 3.5, out)
        np.testing.assert_allclose(out, _scipy(volume, matrix, order, 3.5), rtol=1e-6, atol=1e-4)


@pytest.mark.parametrize("order", kernels.INTERPOLATION_ORDERS)
def test_resample_uses_the_kernels_unless_told_not_to(order, monkeypatch):
    volume = np.asfortranarray(RNG.random((20, 21, 22)).astype(np.float32) * 100)
    matrix = _matrix(0.1, 2.0)
    calls = []
    original = kernels.affine_transform

    def spy(*args):
        calls.append(args[2])
        return original(*args)

    monkeypatch.setattr(kernels, "affine_transform", spy)
    compiled = resample_volume(volume, matrix, order=order)
    assert calls == [order]
    with dask.config.set({"nidask.kernels": "scipy"}):
        plain = resample_volume(volume, matrix, order=order)
    assert calls == [order]  # not called again
    np.testing.assert_allclose(compiled, plain, rtol=1e-6, atol=1e-4)
    # other orders and modes stay with scipy
    resample_volume(volume, matrix, order=2)
    resample_volume(volume, matrix, order=order, mode="nearest")
    assert calls == [order]
    assert not kernels.available(order, "nearest") and not kernels.available(2, "constant")


@pytest.mark.parametrize("order", kernels.INTERPOLATION_ORDERS)
def test_point_sampler_matches_scipy_and_its_own_slopes(order):
    image = ndi.gaussian_filter(RNG.random((14, 12, 10)), 1.5).astype(np.float32)
    volume = image if order == 1 else ndi.spline_filter(image, 3, output=np.float32, mode="mirror")
    points = RNG.uniform(1.0, 8.0, (300, 3))
    linear, offset = _matrix(0.1, 0.3)[:3, :3], np.array([0.4, -0.2, 0.3])
    values, slopes = kernels.sample_points(volume, points, linear, offset, True, order)
    coords = (points @ linear.T + offset).T
    if order == 1:
        expected = ndi.map_coordinates(image, coords, order=1, mode="nearest")
    else:
        expected = ndi.map_coordinates(volume, coords, order=3, mode="mirror", prefilter=False)
    np.testing.assert_allclose(values, expected, rtol=1e-5, atol=1e-6)
    step = 1e-4
    for axis in range(3):
        shifted = offset.copy()
        shifted[axis] += step
        moved, _ = kernels.sample_points(volume, points, linear, shifted, False, order)
        # trilinear slopes are exact inside a cell; points on a cell face are rare
        np.testing.assert_allclose(slopes[:, axis], (moved - values) / step, atol=2e-3)


def test_ncc_terms_equal_their_numpy_twin():
    from nidask.estimation.registration import _ncc_terms

    n = 500
    moving, fixed = RNG.normal(size=n), RNG.normal(size=n)
    slopes, points = RNG.normal(size=(n, 3)), RNG.normal(size=(n, 3)) * 30
    weights = RNG.random(n)
    weights /= weights.sum()
    fixed -= weights @ fixed
    compiled = kernels.ncc_terms(moving, slopes, weights, fixed, points)
    twin = _ncc_terms(moving, slopes, weights, fixed, points)
    for a, b in zip(compiled, twin, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-12)


def test_mattes_terms_equal_their_numpy_twin():
    from nidask.estimation.registration import mattes_terms_numpy

    n, bins = 4000, 16
    fixed_bins = RNG.integers(0, bins, n)
    # moving samples tied to the fixed bins (information to find), some below and
    # above the histogram's range (clipped, and out of the gradient)
    moving = fixed_bins * 0.6 + RNG.normal(0, 1.0, n)
    low, width = 0.5, 0.55
    slopes, points = RNG.normal(size=(n, 3)), RNG.normal(size=(n, 3)) * 30
    assert np.any(moving < low) and np.any(moving > low + width * (bins - 1))
    compiled = kernels.mattes_terms(moving, slopes, fixed_bins, low, width, bins, points)
    twin = mattes_terms_numpy(moving, slopes, fixed_bins, low, width, bins, points)
    assert compiled[0] > 0.1  # the samples share information
    assert compiled[0] == pytest.approx(twin[0], rel=1e-10)
    np.testing.assert_allclose(compiled[1], twin[1], rtol=1e-9, atol=1e-12)
    # the sums are the mutual information's slopes: check them by finite differences
    step = 1e-6
    for a in range(3):
        ahead = kernels.mattes_terms(
            moving + step * slopes[:, a], slopes, fixed_bins, low, width, bins, points
        )[0]
        behind = kernels.mattes_terms(
            moving - step * slopes[:, a], slopes, fixed_bins, low, width, bins, points
        )[0]
        assert compiled[1][a, 0] == pytest.approx((ahead - behind) / (2 * step), rel=1e-4)


@pytest.mark.parametrize("metric", ["ncc", "mi"])
def test_compiled_and_scipy_registration_costs_agree(metric):
    """The cost and gradient the optimiser sees, compiled and with scipy alone."""
    from nidask.estimation.registration import MattesCost, NCCCost

    fixed = ndi.gaussian_filter(RNG.random((24, 22, 20)), 2.0).astype(np.float32)
    moving = np.roll(fixed, 1, axis=0) + RNG.normal(0, 0.002, fixed.shape).astype(np.float32)
    affine = np.diag([2.0, 2.0, 2.0, 1.0])
    registration = RigidRegistration(min_samples=10)
    centre = np.array([23.0, 21.0, 19.0])
    scale = np.array([1.0, 1.0, 1.0, 0.02, 0.02, 0.02])
    z = np.array([0.3, -0.2, 0.1, 0.4, -0.3, 0.2])
    # the scipy twin's cubic slopes mirror the coefficients' differences, which is
    # exact only two voxels or more inside the grid: sample there
    mask = np.zeros(fixed.shape, bool)
    mask[3:-3, 3:-3, 3:-3] = True
    results = {}
    for mode in ("auto", "scipy"):
        with dask.config.set({"nidask.kernels": mode}):
            for factor, last in ((2, False), (1, True)):
                level = registration._level(fixed, moving, affine, mask, centre, factor, 1.0, last)
                cost_class = NCCCost if metric == "ncc" else MattesCost
                cost = cost_class(level, np.linalg.inv(level.affine), centre, scale, 32)
                assert cost.compiled == (mode == "auto")
                results[mode, factor] = cost(z)
    for factor in (2, 1):
        (a, grad_a), (b, grad_b) = results["auto", factor], results["scipy", factor]
        assert a == pytest.approx(b, rel=1e-6)
        np.testing.assert_allclose(grad_a, grad_b, rtol=0, atol=1e-4 * np.abs(grad_b).max())


def test_warm_up_compiles_every_kernel():
    kernels.warm_up()
    for build in (
        kernels._build,
        kernels._build_sampler,
        kernels._build_ncc,
        kernels._build_mattes,
    ):
        assert build.cache_info().currsize == 1


WITHOUT_NUMBA = textwrap.dedent(
    """
    import sys
    sys.modules["numba"] = None  # as if numba were not installed: importing it fails
    import numpy as np
    from nidask.estimation.registration import RigidRegistration
    from nidask.ops import kernels
    from nidask.ops.resample import resample_volume

    volume, matrix = np.load(sys.argv[1]), np.load(sys.argv[2])
    assert not kernels.enabled()
    np.save(sys.argv[3], resample_volume(volume, matrix, order=3))
    estimate, _ = RigidRegistration().register(volume, resample_volume(volume, matrix), np.eye(4))
    np.save(sys.argv[4], estimate)
    """
)


def test_without_numba_scipy_gives_the_same_results_and_says_so_once(tmp_path):
    volume = ndi.gaussian_filter(RNG.random((26, 24, 22)), 2.0).astype(np.float32)
    matrix = np.eye(4)
    matrix[:3, 3] = (0.6, -0.4, 0.3)
    np.save(tmp_path / "volume.npy", volume)
    np.save(tmp_path / "matrix.npy", matrix)
    script = tmp_path / "child.py"
    script.write_text(WITHOUT_NUMBA)
    outputs = [tmp_path / "resampled.npy", tmp_path / "estimate.npy"]
    child = subprocess.run(
        [sys.executable, str(script), tmp_path / "volume.npy", tmp_path / "matrix.npy", *outputs],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert child.returncode == 0, child.stderr
    assert child.stderr.count("numba is not installed") == 1, child.stderr
    assert kernels.enabled()  # here numba serves, and gives the same values
    np.testing.assert_allclose(
        np.load(outputs[0]), resample_volume(volume, matrix, order=3), rtol=1e-5, atol=1e-5
    )
    estimate, _ = RigidRegistration().register(volume, resample_volume(volume, matrix), np.eye(4))
    np.testing.assert_allclose(np.load(outputs[1]), estimate, atol=1e-3)
