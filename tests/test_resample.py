"""Tests for nidask.ops.resample: convention, agreement with nitransforms, dask graph."""

from __future__ import annotations

import dask
import dask.array as da
import nibabel as nb
import nitransforms.linear
import nitransforms.resampling
import numpy as np
import pytest
from scipy.spatial.transform import Rotation

from conftest import record_reads
from nidask.errors import InputError
from nidask.geometry import check_matrix, fsl_to_ras, ras_to_fsl
from nidask.io.sources import NiftiSource
from nidask.ops import resample
from nidask.ops.resample import (
    check_order,
    resample_series,
    resample_volume,
    rotate_bvecs,
    volumes_per_task,
    voxel_matrices,
)

SHAPE = (24, 28, 20)
SCALE = 1000.0  # peak signal of the phantoms


def _rigid(angles_deg, translation):
    mat = np.eye(4)
    mat[:3, :3] = Rotation.from_euler("xyz", angles_deg, degrees=True).as_matrix()
    mat[:3, 3] = translation
    return mat


def _oblique_affine(zooms=(2.0, 2.0, 2.2)):
    """2 mm-ish voxels, a few degrees oblique, off-centre origin."""
    aff = np.eye(4)
    aff[:3, :3] = Rotation.from_euler("xyz", [4, -3, 6], degrees=True).as_matrix() @ np.diag(zooms)
    aff[:3, 3] = [-21.3, -30.1, -17.7]
    return aff


AFFINE = _oblique_affine()
# Motions of a few mm / degrees, one per volume.
MOTIONS = np.stack(
    [
        _rigid([2.0, -3.0, 4.0], [1.5, -2.0, 0.7]),
        _rigid([-4.0, 1.0, -2.5], [-2.3, 1.1, 2.9]),
        _rigid([0.5, 3.5, 1.0], [0.4, 2.6, -1.8]),
    ]
)


def _phantom_world(xyz, shift=0.0):
    """Smooth phantom defined on RAS+ coordinates (mm), shape (..., 3) -> (...)."""
    centre = AFFINE[:3, :3] @ (np.array(SHAPE) / 2.0) + AFFINE[:3, 3]
    d = xyz - centre
    blob = np.exp(-((d / np.array([12.0, 14.0, 11.0])) ** 2).sum(-1))
    ripple = np.sin((d[..., 0] + shift) / 6.0) * np.cos(d[..., 1] / 8.0)
    return SCALE * (0.8 * blob + 0.05 * ripple + 0.15)


def _world_grid(affine):
    ijk = np.indices(SHAPE, dtype=np.float64).reshape(3, -1)
    return (affine[:3, :3] @ ijk + affine[:3, 3:]).T.reshape(*SHAPE, 3)


def _series(n=3):
    xyz = _world_grid(AFFINE)
    vols = [_phantom_world(xyz, shift=3.0 * k) for k in range(n)]
    return np.stack(vols, axis=-1).astype(np.float32)


def _interior_mask(voxmat, margin=1.5):
    """Output voxels whose sampling position lies >= margin voxels inside the input."""
    ijk = np.indices(SHAPE, dtype=np.float64).reshape(3, -1)
    pos = voxmat[:3, :3] @ ijk + voxmat[:3, 3:]
    upper = np.array(SHAPE)[:, None] - 1 - margin
    return np.all((pos >= margin) & (pos <= upper), axis=0).reshape(SHAPE)


def _nitransforms(vol, affine, motion, order):
    img = nb.Nifti1Image(vol, affine)
    xfm = nitransforms.linear.Affine(motion)
    out = nitransforms.resampling.apply(xfm, img, reference=img, order=order)
    return np.asanyarray(out.dataobj)


# --------------------------------------------------------------------------- matrices


def test_voxel_matrices_convention():
    aff = np.diag([2.0, 2.0, 2.0, 1.0])
    aff[:3, 3] = [-10, -20, -30]
    motion = _rigid([0, 0, 0], [2.0, -4.0, 1.0])
    vm = voxel_matrices(aff, motion[None])
    assert vm.shape == (1, 4, 4)
    # A pure RAS translation of (2, -4, 1) mm samples one voxel along +i, two along -j.
    np.testing.assert_allclose(vm[0, :3, 3], [1.0, -2.0, 0.5])
    np.testing.assert_allclose(vm[0, :3, :3], np.eye(3))
    full = voxel_matrices(AFFINE, MOTIONS)
    for k in range(len(MOTIONS)):
        np.testing.assert_allclose(full[k], np.linalg.inv(AFFINE) @ MOTIONS[k] @ AFFINE)


def test_voxel_matrices_snaps_only_integer_matrices():
    shift = _rigid([0, 0, 0], AFFINE[:3, :3] @ [1.0, -2.0, 0.0])  # whole voxels
    tiny = _rigid([0, 0, 1e-4], [0, 0, 0])
    vm = voxel_matrices(AFFINE, np.stack([np.eye(4), shift, tiny]))
    np.testing.assert_array_equal(vm[0], np.eye(4))
    expected = np.eye(4)
    expected[:3, 3] = [1.0, -2.0, 0.0]
    np.testing.assert_array_equal(vm[1], expected)
    raw = np.linalg.inv(AFFINE) @ tiny @ AFFINE
    np.testing.assert_array_equal(vm[2], raw)
    assert not np.array_equal(vm[2], np.round(vm[2]))


@pytest.mark.parametrize(
    "bad",
    [
        np.eye(3),
        np.eye(4)[:3],
        np.eye(4)[..., None],
        np.array([[np.nan, 0, 0, 0], [0, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1]]),
        np.array([[np.inf, 0, 0, 0], [0, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1]]),
        np.diag([1.0, 1.0, 0.0, 1.0]),  # singular
        np.diag([1.0, 1.0, 1e-13, 1.0]),  # numerically singular
        np.array([[1, 2, 3, 0], [2, 4, 6, 0], [0, 0, 1, 0], [0, 0, 0, 1.0]]),  # rank 2
        np.array([[1, 0, 0, 0], [0, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0.1, 1.0]]),
        np.zeros((4, 4)),
        "identity",
    ],
)
def test_check_matrix_rejects(bad):
    with pytest.raises(InputError):
        check_matrix(bad)


def test_check_matrix_accepts_and_copies():
    # Scale-free: tiny voxels and large translations are fine.
    tiny = np.diag([1e-3, 1e-3, 1e-3, 1.0])
    tiny[:3, 3] = 1e4
    out = check_matrix(tiny)
    assert out.dtype == np.float64 and out.shape == (4, 4)
    np.testing.assert_array_equal(out, tiny)
    ints = np.eye(4, dtype=int)
    out = check_matrix(ints)
    assert out.dtype == np.float64
    out[0, 0] = 5
    assert ints[0, 0] == 1
    with pytest.raises(InputError, match="motion"):
        check_matrix(np.eye(3), name="motion")


@pytest.mark.parametrize("bad", [6, -1, 1.5, 3.0, True, "3", None])
def test_check_order_rejects(bad):
    with pytest.raises(InputError):
        check_order(bad)


@pytest.mark.parametrize("good", [0, 1, 3, 5, np.int64(2)])
def test_check_order_accepts(good):
    out = check_order(good)
    assert out == int(good) and type(out) is int


# ------------------------------------------------------------------ vs nitransforms


@pytest.mark.parametrize("order", [0, 1, 3])
def test_series_matches_nitransforms(order):
    data = _series()
    out = resample_series(da.from_array(data, chunks=(-1, -1, -1, 2)), AFFINE, MOTIONS, order)
    out = out.compute(scheduler="synchronous")
    voxmats = voxel_matrices(AFFINE, MOTIONS)
    for k in range(data.shape[-1]):
        expected = _nitransforms(data[..., k], AFFINE, MOTIONS[k], order)
        assert expected.dtype == np.float32
        mask = _interior_mask(voxmats[k])
        assert mask.mean() > 0.5
        got, ref = out[..., k][mask], expected[mask]
        if order == 0:
            # nitransforms rounds RAS coordinates to float32 (~1e-6 voxel), so a
            # sample sitting on a half-voxel tie may round the other way.  None seen
            # with these motions; allow 0.1 %.
            assert np.mean(got == ref) > 0.999
        else:
            # Same scipy kernel, float64 prefilter; observed max |diff| ~1.2e-4 on a
            # 1000 scale (float32 ulp) due to nitransforms' float32 coordinates.
            np.testing.assert_allclose(got, ref, rtol=0, atol=2e-6 * SCALE)
        # Something must actually move: differs from the unresampled volume.
        assert np.abs(got - data[..., k][mask]).max() > 0.05 * SCALE


def test_volume_matches_nitransforms_integer_input():
    vol = np.round(_series(1)[..., 0]).astype(np.int16)
    got = resample_volume(vol, voxel_matrices(AFFINE, MOTIONS[:1])[0], order=3)
    assert got.dtype == np.float32
    # nitransforms keeps int16; compare against it on float64 input instead.
    ref = _nitransforms(vol.astype(np.float64), AFFINE, MOTIONS[0], 3)
    mask = _interior_mask(voxel_matrices(AFFINE, MOTIONS[:1])[0])
    np.testing.assert_allclose(got[mask], ref[mask], rtol=0, atol=2e-6 * SCALE)
    # No rounding to integers happened.
    assert np.any(got[mask] != np.round(got[mask]))


@pytest.mark.parametrize("dtype", [np.int16, np.uint16, np.float64, ">f4"])
def test_dtype_independent(dtype):
    vol = np.round(_series(1)[..., 0])
    mat = voxel_matrices(AFFINE, MOTIONS[1:2])[0]
    ref = resample_volume(vol.astype(np.float32), mat, order=3)
    got = resample_volume(vol.astype(dtype), mat, order=3)
    assert got.dtype == np.float32
    np.testing.assert_array_equal(got, ref)


def test_recovers_known_motion():
    """A volume scanned after motion A is brought back onto the reference."""
    xyz = _world_grid(AFFINE)
    reference = _phantom_world(xyz)
    inv = np.linalg.inv(MOTIONS)
    # moving(q) = f(inv(A) @ affine @ q): the head seen after the motion A.
    moved = np.stack([_phantom_world(xyz @ m[:3, :3].T + m[:3, 3]) for m in inv], axis=-1).astype(
        np.float32
    )
    darr = da.from_array(moved, chunks=(-1, -1, -1, 1))
    back = resample_series(darr, AFFINE, MOTIONS, order=3).compute()
    wrong = resample_series(darr, AFFINE, inv, order=3).compute()
    voxmats = voxel_matrices(AFFINE, MOTIONS)
    for k in range(len(MOTIONS)):
        mask = _interior_mask(voxmats[k], margin=2.0)
        err = np.abs(back[..., k] - reference)[mask]
        assert err.max() < 0.01 * SCALE, err.max()
        assert np.abs(moved[..., k] - reference)[mask].max() > 0.1 * SCALE
        assert np.abs(wrong[..., k] - reference)[mask].max() > 0.1 * SCALE


# ----------------------------------------------------------------------- dask graph


def test_chunking_dtype_shape():
    data = np.concatenate([_series(3), _series(3)[..., ::-1]], axis=-1)
    motions = np.concatenate([MOTIONS, MOTIONS[::-1]])
    one = resample_series(da.from_array(data, chunks=(-1, -1, -1, 1)), AFFINE, motions, 1)
    three = resample_series(da.from_array(data, chunks=(-1, -1, -1, 3)), AFFINE, motions, 1)
    assert one.dtype == three.dtype == np.float32
    assert one.shape == three.shape == data.shape
    assert one.chunks == ((24,), (28,), (20,), (1,) * 6)
    assert three.chunks == ((24,), (28,), (20,), (3, 3))
    a, b = one.compute(), three.compute()
    assert a.dtype == np.float32 and a.shape == data.shape
    np.testing.assert_array_equal(a, b)
    vm = voxel_matrices(AFFINE, motions)
    for k in range(6):
        np.testing.assert_array_equal(a[..., k], resample_volume(data[..., k], vm[k], 1))


def test_blocks_fit_half_the_chunk_budget(tmp_path, monkeypatch):
    """Input + float32 output + scratch of a task stay within half ``nidask.chunk-size``;
    a file-backed series is re-read in the smaller blocks (each reads its own volumes)."""
    data = np.concatenate([_series(3), _series(3)[..., ::-1]], axis=-1)
    motions = np.concatenate([MOTIONS, MOTIONS[::-1]])
    path = tmp_path / "series.nii"
    nb.Nifti1Image(data, AFFINE).to_filename(path)
    voxels = data[..., 0].size
    per_task = 2  # volumes whose input, output and one volume of scratch fit
    budget = 2 * (per_task * voxels * (data.dtype.itemsize + 4) + voxels * 8)
    assert volumes_per_task(data.shape[:3], data.dtype, 3, budget=budget // 2) == per_task
    reads = record_reads(monkeypatch, NiftiSource)
    with dask.config.set({"nidask.chunk-size": budget}):
        series = NiftiSource(path).to_dask(per_chunk=6)
        out = resample_series(series, AFFINE, motions, order=3)
    assert out.chunks[3] == (2, 2, 2)
    result = out.compute()
    assert sorted(reads) == [(0, 2), (2, 4), (4, 6)]  # never the 6-volume chunk
    expected = resample_series(da.from_array(data, chunks=-1), AFFINE, motions, order=3)
    np.testing.assert_array_equal(result, expected.compute())


def test_spatial_chunks_are_merged():
    data = _series(2)
    out = resample_series(da.from_array(data, chunks=(12, 14, 20, 1)), AFFINE, MOTIONS[:2], 1)
    assert out.chunks == ((24,), (28,), (20,), (1, 1))
    ref = resample_series(da.from_array(data, chunks=(-1, -1, -1, 1)), AFFINE, MOTIONS[:2], 1)
    np.testing.assert_array_equal(out.compute(), ref.compute())


_CALLS: list[int] = []


def _load_volume(k):
    _CALLS.append(k)
    return _series(3)[..., k]


def test_graph_is_lazy():
    _CALLS.clear()
    vols = [
        da.from_delayed(dask.delayed(_load_volume)(k), SHAPE, dtype=np.float32) for k in range(3)
    ]
    data = da.stack(vols, axis=-1)
    out = resample_series(data, AFFINE, MOTIONS, order=3)
    assert _CALLS == []
    result = out.compute(scheduler="synchronous")
    assert sorted(_CALLS) == [0, 1, 2]
    np.testing.assert_array_equal(
        result, resample_series(da.from_array(_series(3)), AFFINE, MOTIONS, order=3).compute()
    )


def test_tasks_receive_only_their_matrices(monkeypatch):
    seen = []
    original = resample._resample_block

    def spy(block, matrices, **options):
        seen.append((block.shape[-1], matrices.copy()))
        return original(block, matrices, **options)

    monkeypatch.setattr(resample, "_resample_block", spy)
    motions = np.concatenate([MOTIONS, MOTIONS[:2]])  # 5 volumes
    data = np.concatenate([_series(3), _series(2)], axis=-1)
    out = resample_series(da.from_array(data, chunks=(-1, -1, -1, 2)), AFFINE, motions, 1)
    out.compute(scheduler="synchronous")
    vm = voxel_matrices(AFFINE, motions)
    assert sorted(n for n, _ in seen) == [1, 2, 2]
    assert all(m.shape == (n, 4, 4) for n, m in seen)
    got = sorted((m.tobytes() for _, m in seen))
    want = sorted(vm[s].tobytes() for s in (slice(0, 2), slice(2, 4), slice(4, 5)))
    assert got == want
    # The graph embeds every matrix once, not the whole stack per task.
    embedded = [v for v in dict(out.__dask_graph__()).values() if isinstance(v, np.ndarray)]
    assert sum(v.shape[0] for v in embedded if v.shape[1:] == (4, 4)) == 5


def test_schedulers_agree():
    data = _series(3)
    out = resample_series(da.from_array(data, chunks=(-1, -1, -1, 1)), AFFINE, MOTIONS, 3)
    results = {s: out.compute(scheduler=s) for s in ("synchronous", "threads", "processes")}
    np.testing.assert_array_equal(results["threads"], results["synchronous"])
    np.testing.assert_array_equal(results["processes"], results["synchronous"])


@pytest.mark.parametrize("kernel", ["compiled", "scipy"])
def test_a_box_interpolates_only_inside_it_as_the_whole_volume_does(kernel):
    """Inside the box the values of the whole resampled volume (the input read only
    around what the box samples), outside it ``cval``."""
    from scipy import ndimage

    rng = np.random.default_rng(5)
    shape = (60, 64, 56)
    volume = ndimage.gaussian_filter(rng.random(shape), 1.5).astype(np.float32) * SCALE
    series = da.from_array(np.stack([volume, volume[::-1]], axis=-1), chunks=(-1, -1, -1, 1))
    motions = np.stack([_rigid([2.0, -1.0, 3.0], [1.2, -0.8, 2.1]), np.eye(4)])
    box = (slice(18, 40), slice(20, 45), slice(15, 38))
    config = {"nidask.kernels": "scipy"} if kernel == "scipy" else {}
    with dask.config.set(config):
        whole = resample_series(series, AFFINE, motions, order=3).compute()
        boxed = resample_series(series, AFFINE, motions, order=3, cval=-1.0, box=box)
        boxed = boxed.compute()
    np.testing.assert_allclose(boxed[box], whole[box], rtol=0, atol=1e-5 * SCALE)
    outside = np.ones(shape, bool)
    outside[box] = False
    assert np.all(boxed[outside] == -1.0)
    single = resample_volume(volume, voxel_matrices(AFFINE, motions)[0], box=box)
    assert np.all(single[outside] == 0.0)
    np.testing.assert_allclose(single[box], boxed[..., 0][box], rtol=0, atol=1e-5 * SCALE)


@pytest.mark.parametrize(
    "bad",
    [(slice(0, 4),), (slice(3, 3), slice(None), slice(None)), (slice(0, 9, 2),) * 3, "box"],
)
def test_box_errors(bad):
    with pytest.raises(InputError, match="box"):
        resample_series(da.zeros((8, 8, 8, 2), chunks=(8, 8, 8, 1)), AFFINE, MOTIONS[:2], box=bad)


def test_no_motion_is_a_cast():
    data = np.round(_series(2)).astype(np.int16)
    out = resample_series(da.from_array(data, chunks=(-1, -1, -1, 1)), AFFINE, None)
    assert out.dtype == np.float32
    np.testing.assert_array_equal(out.compute(), data.astype(np.float32))


def test_identity_motion_interpolates_consistently():
    data = _series(2)
    eye = np.stack([np.eye(4)] * 2)
    out = resample_series(da.from_array(data), AFFINE, eye, order=3).compute()
    # Cubic B-spline interpolation at grid points is the identity up to rounding,
    # faces included (no sample may fall a hair outside the volume).
    np.testing.assert_allclose(out, data, rtol=0, atol=1e-6 * SCALE)
    assert np.all(out[0] != 0) and np.all(out[-1] != 0) and np.all(out[:, :, -1] != 0)


def test_series_input_errors():
    data = da.from_array(_series(3))
    with pytest.raises(InputError, match="3 volumes"):
        resample_series(data, AFFINE, MOTIONS[:2])
    with pytest.raises(InputError, match="4D"):
        resample_series(data[..., 0], AFFINE, MOTIONS)
    with pytest.raises(InputError, match="dask"):
        resample_series(_series(3), AFFINE, MOTIONS)
    with pytest.raises(InputError, match="mode"):
        resample_series(data, AFFINE, MOTIONS, mode="bogus")
    with pytest.raises(InputError, match="order"):
        resample_series(data, AFFINE, MOTIONS, order=7)
    with pytest.raises(InputError, match=r"motion_affines\[1\]"):
        bad = MOTIONS.copy()
        bad[1, 0, 0] = np.nan
        resample_series(data, AFFINE, bad)
    with pytest.raises(InputError, match="affine"):
        resample_series(data, np.zeros((4, 4)), MOTIONS)
    with pytest.raises(InputError, match="3D"):
        resample_volume(_series(1), np.eye(4))


# -------------------------------------------------------------------------- b-vectors


def _unit(v):
    v = np.asarray(v, dtype=float)
    return v / np.linalg.norm(v, axis=-1, keepdims=True)


BVECS = _unit(np.random.default_rng(0).normal(size=(3, 3)))


def _nifreeze_transform_fsl_bvec(b_ijk, xfm, imaffine, invert=False):
    """nifreeze 0.1.0 ``dmriutils.transform_fsl_bvec``, copied for comparison."""
    xfm = np.linalg.inv(xfm) if invert else xfm.copy()
    ijk2ijk_xfm = np.linalg.inv(imaffine) @ xfm @ imaffine
    return ijk2ijk_xfm[:3, :3] @ b_ijk[:3]


def test_rotate_bvecs_identity():
    bvecs = np.vstack([BVECS, np.zeros(3)])
    out = rotate_bvecs(bvecs, np.stack([np.eye(4)] * 4))
    np.testing.assert_allclose(out, bvecs, atol=1e-12)
    assert np.all(out[-1] == 0)


def test_rotate_bvecs_about_z_is_inverse_rotation():
    motion = _rigid([0, 0, 10], [3.0, -1.0, 2.0])  # translation must not matter
    out = rotate_bvecs(BVECS, np.stack([motion] * 3))
    expected = Rotation.from_euler("z", -10, degrees=True).apply(BVECS)
    np.testing.assert_allclose(out, expected, atol=1e-12)
    # x axis goes to (cos 10, -sin 10, 0)
    one = rotate_bvecs([[1.0, 0, 0]], motion[None])[0]
    np.testing.assert_allclose(one, [np.cos(np.radians(10)), -np.sin(np.radians(10)), 0])


def test_rotate_bvecs_in_ras_is_the_inverse_motion_rotation():
    out = rotate_bvecs(BVECS, MOTIONS)
    for k, b in enumerate(BVECS):
        np.testing.assert_allclose(out[k], MOTIONS[k][:3, :3].T @ b, atol=1e-12)


def test_rotate_bvecs_agrees_with_nifreeze_on_las_images():
    """dcm2niix's LAS frame (det < 0, no FSL flip): nifreeze's voxel-axis rotation of
    the FSL numbers equals nidask's RAS rotation, read and written through FSL's frame."""
    aff = _oblique_affine(zooms=(2.0, 2.0, 2.0)) @ np.diag([-1.0, 1.0, 1.0, 1.0])
    assert np.linalg.det(aff) < 0
    fsl = BVECS
    out = ras_to_fsl(rotate_bvecs(fsl_to_ras(fsl, aff), MOTIONS), aff)
    for k, b in enumerate(fsl):
        np.testing.assert_allclose(
            out[k], _nifreeze_transform_fsl_bvec(b, MOTIONS[k], aff, invert=True), atol=1e-12
        )


def test_rotate_bvecs_takes_the_rotation_of_a_non_rigid_matrix():
    motion = MOTIONS[0].copy()
    motion[:3, :3] = motion[:3, :3] @ np.array([[1.0, 0, 0], [0.05, 1.04, 0.02], [0, 0, 1.0]])
    out = rotate_bvecs(BVECS[:1], motion[None])[0]
    u, _, vt = np.linalg.svd(motion[:3, :3])
    np.testing.assert_allclose(out, (u @ vt).T @ BVECS[0], atol=1e-12)
    np.testing.assert_allclose(np.linalg.norm(out), 1.0, atol=1e-12)


def test_rotate_bvecs_errors():
    with pytest.raises(InputError):
        rotate_bvecs(BVECS[:, :2], MOTIONS)
    with pytest.raises(InputError):
        rotate_bvecs(BVECS[:2], MOTIONS)
    with pytest.raises(InputError):
        rotate_bvecs(BVECS, MOTIONS[0])
