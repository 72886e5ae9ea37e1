"""The compiled resampling kernels give scipy.ndimage.affine_transform's values."""

from __future__ import annotations

import dask
import numpy as np
import pytest
from scipy import ndimage as ndi
from scipy.spatial.transform import Rotation

from nidask.ops import kernels
from nidask.ops.resample import resample_volume

pytest.importorskip("numba", reason="the compiled kernels need numba (pip install 'nidask[fast]')")

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


@pytest.mark.parametrize("order", kernels.ORDERS)
@pytest.mark.parametrize("dtype", ["int16", "uint8", "float32", "float64"])
def test_kernels_match_scipy(order, dtype):
    """Rotations and shifts that take many samples out of the volume, odd shapes, a cval."""
    volume = np.asfortranarray((RNG.random((23, 30, 17)) * 200).astype(dtype))
    for rotation, shift in [(0.0, 0.0), (0.03, 0.4), (0.2, 6.0), (0.6, 12.0)]:
        matrix = _matrix(rotation, shift)
        out = np.empty(volume.shape, np.float32, order="F")
        kernels.affine_transform(volume, matrix, order, 3.5, out)
        np.testing.assert_allclose(out, _scipy(volume, matrix, order, 3.5), rtol=1e-6, atol=1e-4)


@pytest.mark.parametrize("order", kernels.ORDERS)
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
