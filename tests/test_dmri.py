"""DWI: gradient files, normalisation, b=0 handling, original_index, shells."""

from __future__ import annotations

import dask.array as da
import numpy as np
import pytest

import nidask
from conftest import SHAPE3D, write_bvec_bval, write_nifti
from nidask import DWI
from nidask.data import dmri
from nidask.data.dmri import read_gradients


def _directions(n: int, seed: int = 0) -> np.ndarray:
    vectors = np.random.default_rng(seed).normal(size=(n, 3))
    return vectors / np.linalg.norm(vectors, axis=1, keepdims=True)


def _series(tmp_path, n: int, seed: int = 0, name: str = "dwi") -> tuple[str, np.ndarray]:
    data = np.random.default_rng(seed).integers(0, 4000, size=(*SHAPE3D, n), dtype=np.int16)
    return write_nifti(tmp_path / f"{name}.nii", data), data


@pytest.fixture
def scheme():
    """b=0 volumes interleaved (positions 0, 4, 9) with 8 unit directions, b=1000."""
    bvals = np.full(11, 1000.0)
    bvals[[0, 4, 9]] = 0.0
    bvecs = _directions(11)
    bvecs[[0, 4, 9]] = 0.0
    return bvecs, bvals


def test_bvec_rows_and_columns_give_the_same_table(tmp_path, scheme):
    bvecs, bvals = scheme
    path, _ = _series(tmp_path, 11)
    rows = write_bvec_bval(tmp_path / "rows", bvecs, bvals, rows=True)
    cols = write_bvec_bval(tmp_path / "cols", bvecs, bvals, rows=False)
    assert np.loadtxt(rows[0]).shape == (3, 11) and np.loadtxt(cols[0]).shape == (11, 3)
    a = nidask.load(path, bvec_file=rows[0], bval_file=rows[1])
    b = nidask.load(path, bvec_file=cols[0], bval_file=cols[1])
    keep = bvals > 50
    np.testing.assert_allclose(a.gradients[:, :3], bvecs[keep], atol=1e-7)
    np.testing.assert_array_equal(a.gradients[:, 3], bvals[keep])
    np.testing.assert_array_equal(a.gradients, b.gradients)
    np.testing.assert_array_equal(a.bvals, bvals[keep])
    np.testing.assert_allclose(a.bvecs, bvecs[keep], atol=1e-7)


@pytest.mark.parametrize("transpose", [False, True])
def test_gradients_file_n4_and_4n(tmp_path, scheme, transpose):
    bvecs, bvals = scheme
    path, _ = _series(tmp_path, 11)
    table = np.column_stack([bvecs, bvals])
    np.savetxt(tmp_path / "grad.txt", table.T if transpose else table, fmt="%.8f")
    dwi = nidask.data.dmri.from_nii(path, gradients_file=tmp_path / "grad.txt")
    keep = bvals > 50
    np.testing.assert_allclose(dwi.gradients, table[keep], atol=1e-7)
    np.testing.assert_array_equal(dwi.original_index, np.flatnonzero(keep))
    # the gradients file takes precedence over bvec/bval
    wrong = write_bvec_bval(tmp_path / "wrong", _directions(11, 5), np.full(11, 3000.0))
    both = nidask.data.dmri.from_nii(
        path, bvec_file=wrong[0], bval_file=wrong[1], gradients_file=tmp_path / "grad.txt"
    )
    np.testing.assert_array_equal(both.gradients, dwi.gradients)


def test_non_unit_vectors_normalised_and_b_scaled(tmp_path):
    bvecs = np.vstack([[0, 0, 0], _directions(7, 3)])
    norms = np.array([0, 2.0, 0.5, 1.0, 1.0, 1.5, 0.8, 1.0])
    bvals = np.array([0, 1000, 1000, 1000, 2000, 1000, 3000, 1000.0])
    raw = bvecs * norms[:, None]
    path, _ = _series(tmp_path, 8)
    bvec, bval = write_bvec_bval(tmp_path / "scaled", raw, bvals)
    dwi = nidask.load(path, bvec_file=bvec, bval_file=bval)
    np.testing.assert_allclose(np.linalg.norm(dwi.bvecs, axis=1), 1.0, atol=1e-12)
    np.testing.assert_allclose(dwi.bvecs, bvecs[1:], atol=1e-7)
    np.testing.assert_allclose(dwi.bvals, bvals[1:] * norms[1:], rtol=1e-6)
    assert dwi.bvals[0] == pytest.approx(2000.0)
    assert dwi.bvals[1] == pytest.approx(500.0)
    # the same through the reader, from a 4-column table
    table = read_gradients(bvec_file=bvec, bval_file=bval, affine=dwi.affine)
    np.testing.assert_allclose(table[1:], dwi.gradients)


def test_b_up_to_50_is_b0(tmp_path):
    bvals = np.array([0, 50, 51, 5, 1000, 1000, 1000, 1000, 1000, 49.9])
    bvecs = _directions(10, 1)
    path, data = _series(tmp_path, 10)
    bvec, bval = write_bvec_bval(tmp_path / "t", bvecs, bvals)
    dwi = nidask.load(path, bvec_file=bvec, bval_file=bval)
    np.testing.assert_array_equal(dwi.original_index, [2, 4, 5, 6, 7, 8])
    np.testing.assert_array_equal(dwi.bvals, bvals[[2, 4, 5, 6, 7, 8]])
    expected = np.median(data[..., [0, 1, 3, 9]], axis=-1).astype(np.float32)
    np.testing.assert_array_equal(dwi.bzero.compute(), expected)


def test_bzero_is_lazy_median_of_b0s(tmp_path, scheme):
    bvecs, bvals = scheme
    path, data = _series(tmp_path, 11, seed=7)
    bvec, bval = write_bvec_bval(tmp_path / "s", bvecs, bvals)
    dwi = nidask.load(path, bvec_file=bvec, bval_file=bval)
    assert isinstance(dwi.bzero, da.Array)
    assert dwi.bzero.shape == SHAPE3D
    bzero = dwi.bzero.compute()
    assert bzero.dtype == np.float32
    expected = np.median(data[..., [0, 4, 9]], axis=-1).astype(np.float32)
    np.testing.assert_array_equal(bzero, expected)
    # a median, not a mean or the first b0
    assert not np.array_equal(bzero, data[..., [0, 4, 9]].mean(-1).astype(np.float32))
    assert not np.array_equal(bzero, data[..., 0].astype(np.float32))


def test_bzero_median_is_read_slab_by_slab_within_the_budget(tmp_path, scheme):
    """A file-backed median is one task per Z slab, each reading its slab of every b=0."""
    import dask

    bvecs, bvals = scheme
    path, data = _series(tmp_path, 11, seed=3)
    bvec, bval = write_bvec_bval(tmp_path / "s", bvecs, bvals)
    x, y, z = SHAPE3D
    # room for two slices of the three b=0 volumes (and their sorted copies)
    with dask.config.set({"nidask.chunk-size": 2 * 3 * 3 * 4 * x * y}):
        dwi = nidask.load(path, bvec_file=bvec, bval_file=bval)
        assert dwi.bzero.chunks[2] == (2,) * (z // 2) + ((z % 2,) if z % 2 else ())
        bzero = dwi.bzero.compute()
        expected = np.median(data[..., [0, 4, 9]], axis=-1).astype(np.float32)
        np.testing.assert_array_equal(bzero, expected)
        # an array that is not a file's (here, shifted) is one task, with the same values
        shifted = dmri.lazy_median(dwi.whole_series().dataobj[..., [0, 4, 9]] + 1)
        assert shifted.npartitions == 1
        np.testing.assert_array_equal(shifted.compute(), expected + 1)


def test_single_b0_is_the_bzero(tmp_path):
    bvals = np.full(8, 1000.0)
    bvals[3] = 0
    bvecs = _directions(8)
    path, data = _series(tmp_path, 8, seed=2)
    bvec, bval = write_bvec_bval(tmp_path / "s", bvecs, bvals)
    dwi = nidask.load(path, bvec_file=bvec, bval_file=bval)
    np.testing.assert_array_equal(dwi.bzero.compute(), data[..., 3].astype(np.float32))
    assert len(dwi) == 7


def test_no_b0_means_no_bzero(tmp_path):
    path, data = _series(tmp_path, 7)
    bvec, bval = write_bvec_bval(tmp_path / "s", _directions(7), np.full(7, 1000.0))
    dwi = nidask.load(path, bvec_file=bvec, bval_file=bval)
    assert dwi.bzero is None
    assert dwi.dataobj.shape == data.shape
    np.testing.assert_array_equal(dwi.original_index, np.arange(7))
    np.testing.assert_array_equal(dwi.dataobj.compute(), data)


def test_b0_file_overrides_median(tmp_path, scheme):
    bvecs, bvals = scheme
    path, _ = _series(tmp_path, 11)
    bvec, bval = write_bvec_bval(tmp_path / "s", bvecs, bvals)
    reference = np.random.default_rng(9).random(SHAPE3D).astype(np.float32) * 100
    b0_file = write_nifti(tmp_path / "b0.nii", reference)
    dwi = nidask.load(path, bvec_file=bvec, bval_file=bval, b0_file=b0_file)
    np.testing.assert_array_equal(np.asarray(dwi.bzero.compute()), reference)
    # the b=0 volumes still leave the data
    assert len(dwi) == 8
    assert b0_file in dwi.inputs


def test_original_index_maps_to_file_positions(tmp_path, scheme):
    bvecs, bvals = scheme
    path, data = _series(tmp_path, 11, seed=4)
    bvec, bval = write_bvec_bval(tmp_path / "s", bvecs, bvals)
    dwi = nidask.load(path, bvec_file=bvec, bval_file=bval)
    np.testing.assert_array_equal(dwi.original_index, [1, 2, 3, 5, 6, 7, 8, 10])
    for k in range(len(dwi)):
        volume, _, gradient = dwi[k]
        np.testing.assert_array_equal(volume.compute(), data[..., dwi.original_index[k]])
        np.testing.assert_allclose(gradient[:3], bvecs[dwi.original_index[k]], atol=1e-7)
    np.testing.assert_array_equal(dwi.dataobj.compute(), data[..., dwi.original_index])
    # subsets keep mapping to the file
    train, _ = dwi.lofo(2)
    np.testing.assert_array_equal(train.original_index, [1, 2, 5, 6, 7, 8, 10])


def test_bvals_bvecs_shells_two_shell_scheme(tmp_path):
    bvals = np.array([0] + [1000, 2000] * 6 + [0] + [995, 2010], dtype=float)
    bvecs = _directions(bvals.size, 11)
    bvecs[bvals == 0] = 0
    path, _ = _series(tmp_path, bvals.size)
    bvec, bval = write_bvec_bval(tmp_path / "s", bvecs, bvals)
    dwi = nidask.load(path, bvec_file=bvec, bval_file=bval)
    assert isinstance(dwi, DWI)
    dw = bvals > 50
    np.testing.assert_array_equal(dwi.bvals, bvals[dw])
    np.testing.assert_allclose(dwi.bvecs, bvecs[dw], atol=1e-7)
    assert dwi.bvecs.shape == (14, 3)
    shells = dwi.get_shells()
    assert len(shells) == 2
    (low, low_idx), (high, high_idx) = shells
    assert low == pytest.approx(1000.0) and high == pytest.approx(2000.0)
    np.testing.assert_array_equal(low_idx, np.flatnonzero(dwi.bvals < 1500))
    np.testing.assert_array_equal(high_idx, np.flatnonzero(dwi.bvals > 1500))
    assert set(dwi.bvals[low_idx]) == {1000.0, 995.0}
