"""Messy gradient files read as dipy and FSL read them: real inputs.

NaN b-vectors of b=0 volumes, b-vector files in either orientation (including the
ambiguous 3x3 of a three-volume series), MRtrix ``.b`` tables, series with too few
diffusion-weighted volumes for a model, and an :class:`InputError` naming the file
and the problem for every bad case.
"""

from __future__ import annotations

import os

import dask
import numpy as np
import pytest

import nidask
from conftest import write_nifti
from nidask.data import dmri
from nidask.errors import InputError

SHAPE3D = (6, 7, 5)


def _directions(n: int, seed: int = 1) -> np.ndarray:
    vectors = np.random.default_rng(seed).normal(size=(n, 3))
    return vectors / np.linalg.norm(vectors, axis=1, keepdims=True)


def _series(tmp_path, n: int, name: str = "dwi.nii") -> str:
    data = np.random.default_rng(0).integers(100, 1000, size=(*SHAPE3D, n), dtype=np.int16)
    return write_nifti(tmp_path / name, data)


def _write(path, rows, fmt="%.8g") -> str:
    np.savetxt(path, np.atleast_2d(rows), fmt=fmt)
    return os.fspath(path)


def _fsl(tmp_path, bvecs_3xn, bvals, stem="dwi") -> tuple[str, str]:
    return (
        _write(tmp_path / f"{stem}.bvec", bvecs_3xn),
        _write(tmp_path / f"{stem}.bval", np.reshape(bvals, (1, -1))),
    )


def _raises(path, phrase, func, *args, **kwargs) -> InputError:
    with pytest.raises(InputError, match=phrase) as excinfo:
        func(*args, **kwargs)
    assert excinfo.value.path is not None
    assert os.path.basename(excinfo.value.path) == os.path.basename(os.fspath(path))
    assert str(excinfo.value).startswith(os.fspath(excinfo.value.path))
    return excinfo.value


# -- NaN b-vectors -------------------------------------------------------------------
def test_nan_bvecs_on_b0_rows_become_zero(tmp_path):
    bvals = np.r_[0, 1000, 1000, 5, 1000, 1000, 1000, 1000]
    bvecs = _directions(8)
    bvecs[[0, 3]] = np.nan  # b=0 and b=5 (<= the b=0 threshold)
    bvec, bval = _fsl(tmp_path, bvecs.T, bvals)
    table = dmri.read_gradients(bvec, bval)
    assert np.all(np.isfinite(table))
    assert table[[0, 3]].tolist() == [[0.0] * 4] * 2
    np.testing.assert_allclose(table[1:3, :3], bvecs[1:3], atol=1e-7)
    ds = nidask.load(_series(tmp_path, 8), bvec_file=bvec, bval_file=bval)
    with ds:
        assert ds.b0_index.tolist() == [0, 3]
        assert len(ds) == 6 and np.all(np.isfinite(ds.gradients))


def test_nan_bvec_follows_the_b0_threshold_setting(tmp_path):
    bvals = np.r_[0, 80, 1000, 1000]
    bvecs = _directions(4)
    bvecs[1] = np.nan
    bvec, bval = _fsl(tmp_path, bvecs.T, bvals)
    _raises(
        bvec,
        r"gradient direction in volume 1 \(counting from 0\) \(b=80\)",
        dmri.read_gradients,
        bvec,
        bval,
    )
    with dask.config.set({"nidask.b0-threshold": 100}):
        assert dmri.read_gradients(bvec, bval)[1].tolist() == [0.0] * 4


def test_nan_bvec_on_a_diffusion_weighted_row_names_file_and_volume(tmp_path):
    bvals = np.r_[0, 1000, 1000, 1000, 1000]
    bvecs = _directions(5)
    bvecs[[2, 4], 1] = np.nan
    bvec, bval = _fsl(tmp_path, bvecs.T, bvals)
    error = _raises(
        bvec,
        "NaN or infinite gradient direction in volume 2 .* and 1 more",
        dmri.read_gradients,
        bvec,
        bval,
    )
    assert "b=1000" in str(error)


def test_nan_bval_names_the_bval_file(tmp_path):
    bvec, _ = _fsl(tmp_path, _directions(3).T, [0, 1000, 1000])
    bval = tmp_path / "nan.bval"
    bval.write_text("0 nan 1000\n")
    _raises(bval, "NaN or infinite b-value in volume 1", dmri.read_gradients, bvec, bval)


def test_infinite_direction_is_an_error_too(tmp_path):
    bvecs = _directions(4)
    bvecs[3, 2] = np.inf
    bvec, bval = _fsl(tmp_path, bvecs.T, [0, 1000, 1000, 1000])
    _raises(
        bvec, "NaN or infinite gradient direction in volume 3", dmri.read_gradients, bvec, bval
    )


# -- orientation of .bvec files ------------------------------------------------------
@pytest.mark.parametrize("n", [1, 2, 4, 7])
def test_bvec_either_orientation(tmp_path, n):
    bvecs = _directions(n)
    bvals = np.full(n, 1000.0)
    rows_file = _write(tmp_path / "rows.bvec", bvecs.T)  # FSL: 3xN
    cols_file = _write(tmp_path / "cols.bvec", bvecs)  # Nx3
    bval = _write(tmp_path / "dwi.bval", bvals.reshape(1, -1))
    column_bval = _write(tmp_path / "column.bval", bvals.reshape(-1, 1))
    expected = dmri.read_gradients(rows_file, bval)
    np.testing.assert_allclose(expected[:, :3], bvecs, atol=1e-7)
    np.testing.assert_array_equal(dmri.read_gradients(cols_file, bval), expected)
    np.testing.assert_array_equal(dmri.read_gradients(cols_file, column_bval), expected)


def test_three_volumes_fsl_3xn(tmp_path):
    # the b-vectors of heudiconv's b0dwiForFmap DICOMs as dcm2niix writes them: the
    # columns are unit vectors, the rows are not
    bvecs_3xn = np.array(
        [
            [-0.501244, -0.501244, 0.999863],
            [-0.52711, -0.52711, -0.0149667],
            [0.686228, 0.686228, -0.00703256],
        ]
    )
    bvec, bval = _fsl(tmp_path, bvecs_3xn, [5, 5, 1500])
    table = dmri.read_gradients(bvec, bval)
    np.testing.assert_allclose(table[2, :3], bvecs_3xn[:, 2], atol=1e-4)
    assert table[2, 3] == pytest.approx(1500, rel=1e-3)


def test_three_volumes_nx3(tmp_path):
    bvecs = _directions(3)  # rows unit; columns of a random 3x3 are not
    bvec = _write(tmp_path / "dwi.bvec", bvecs)
    bval = _write(tmp_path / "dwi.bval", [[1000, 1000, 1000]])
    np.testing.assert_allclose(dmri.read_gradients(bvec, bval)[:, :3], bvecs, atol=1e-7)


def test_three_volumes_undecided_is_fsl(tmp_path):
    # a permutation matrix has unit rows and columns: FSL's 3xN wins
    bvecs_3xn = np.array([[0.0, 1, 0], [0, 0, 1], [1, 0, 0]])
    bvec, bval = _fsl(tmp_path, bvecs_3xn, [1000, 1000, 1000])
    np.testing.assert_array_equal(dmri.read_gradients(bvec, bval)[:, :3], bvecs_3xn.T)


@pytest.mark.parametrize(
    ("bvecs", "bvals", "bad", "phrase"),
    [
        (np.zeros((4, 5)), np.zeros(5), "bvec", "b-vectors must be 3xN or Nx3, got 4x5"),
        (np.zeros((3, 5)), np.zeros(4), "bvec", "5 b-vectors but 4 b-values"),
        (np.zeros((6, 3)), np.zeros(4), "bvec", "6 b-vectors but 4 b-values"),
        (np.zeros((3, 4)), np.zeros((2, 4)), "bval", "one row or one column, got 2x4"),
        (np.zeros((3, 2)), np.array([0.0, -1000]), "bval", "negative b-value in volume 1"),
    ],
)
def test_bad_fsl_files(tmp_path, bvecs, bvals, bad, phrase):
    bvec = _write(tmp_path / "x.bvec", bvecs)
    bval = _write(tmp_path / "x.bval", np.atleast_2d(bvals))
    _raises(bvec if bad == "bvec" else bval, phrase, dmri.read_gradients, bvec, bval)


@pytest.mark.parametrize("content", ["", "\n\n", "# only a comment\n"])
def test_empty_files(tmp_path, content):
    bvec, bval = _fsl(tmp_path, _directions(3).T, [0, 1000, 1000])
    empty = tmp_path / "empty.bval"
    empty.write_text(content)
    _raises(empty, "b-value file has no values", dmri.read_gradients, bvec, empty)
    _raises(empty, "gradients file has no values", dmri.read_gradients, gradients_file=empty)


def test_ragged_file(tmp_path):
    bval = _write(tmp_path / "dwi.bval", [[0, 1000, 1000]])
    bvec = tmp_path / "ragged.bvec"
    bvec.write_text("1 0 0\n0 1\n0 0 1\n")
    _raises(bvec, "cannot parse b-vector file", dmri.read_gradients, bvec, bval)


def test_count_must_match_the_series(tmp_path):
    bvec, bval = _fsl(tmp_path, _directions(4).T, [0, 1000, 1000, 1000])
    _raises(
        bvec,
        "4 entries but the series has 5 volumes",
        nidask.load,
        _series(tmp_path, 5),
        bvec_file=bvec,
        bval_file=bval,
    )


# -- MRtrix .b tables ----------------------------------------------------------------
def _mrtrix(path, bvecs, bvals, header=True) -> str:
    lines = ["# command_history: dwigradcheck dwi.mif -export_grad_mrtrix dwi.b"] if header else []
    lines += [f"{x:.8f} {y:.8f} {z:.8f} {b:g}" for (x, y, z), b in zip(bvecs, bvals, strict=True)]
    path.write_text("\n".join(lines) + "\n")
    return os.fspath(path)


@pytest.mark.parametrize("n", [4, 9])
def test_mrtrix_b_table(tmp_path, n):
    bvecs = _directions(n)
    bvecs[0] = 0.0
    bvals = np.r_[0, np.full(n - 1, 2000.0)]
    b_file = _mrtrix(tmp_path / "dwi.b", bvecs, bvals)
    table = dmri.read_gradients(gradients_file=b_file)
    np.testing.assert_allclose(table[:, :3], bvecs, atol=1e-7)
    np.testing.assert_array_equal(table[:, 3], bvals)
    ds = nidask.load(_series(tmp_path, n), gradients_file=b_file)
    with ds:
        assert len(ds) == n - 1 and ds.b0_index.tolist() == [0]
        np.testing.assert_allclose(ds.bvecs, bvecs[1:], atol=1e-7)


def test_mrtrix_b_table_takes_precedence(tmp_path):
    bvecs = _directions(4)
    b_file = _mrtrix(tmp_path / "dwi.b", bvecs, [0, 1000, 1000, 1000], header=False)
    bvec, bval = _fsl(tmp_path, -bvecs.T, [0, 3000, 3000, 3000])
    table = dmri.read_gradients(bvec, bval, gradients_file=b_file)
    assert table[1:, 3].tolist() == [1000.0] * 3


def test_mrtrix_b_table_nan_on_b0_rows(tmp_path):
    b_file = tmp_path / "dwi.b"
    b_file.write_text("nan nan nan 0\n1 0 0 1000\n0 1 0 1000\n0 0 1 1000\n")
    assert dmri.read_gradients(gradients_file=b_file)[0].tolist() == [0.0] * 4
    b_file.write_text("0 0 0 0\n1 0 0 1000\nnan 1 0 1000\n0 0 1 1000\n")
    _raises(
        b_file,
        r"NaN or infinite gradient direction in volume 2 \(counting from 0\) \(b=1000\)",
        dmri.read_gradients,
        gradients_file=b_file,
    )


@pytest.mark.parametrize(
    ("text", "phrase"),
    [
        ("1 0 0\n0 1 0\n", "must be \\(N, 4\\) rows of x y z b, got [35] columns"),
        ("1 0 0 1000 7\n0 1 0 1000 7\n", "must be \\(N, 4\\) rows of x y z b, got [35] columns"),
        ("1 0 0 1000\n0 1 0\n", "cannot parse gradients file"),
        ("1 0 0 -1000\n0 1 0 1000\n", "negative b-value in volume 0"),
        ("1 0 0 nan\n0 1 0 1000\n", "NaN or infinite b-value in volume 0"),
    ],
)
def test_bad_mrtrix_tables(tmp_path, text, phrase):
    b_file = tmp_path / "bad.b"
    b_file.write_text(text)
    _raises(b_file, phrase, dmri.read_gradients, gradients_file=b_file)


# -- few diffusion-weighted volumes --------------------------------------------------
@pytest.mark.parametrize("n_dw", [1, 2, 5])
def test_few_diffusion_volumes_still_load(tmp_path, n_dw):
    n = 2 + n_dw
    bvec, bval = _fsl(tmp_path, _directions(n).T, np.r_[0, 0, np.full(n_dw, 1000.0)])
    path = _series(tmp_path, n)
    ds = nidask.load(path, bvec_file=bvec, bval_file=bval)
    with ds:
        assert len(ds) == n_dw and ds.b0_index.tolist() == [0, 1]
        # conversion/export still works
        out = tmp_path / "out.nii"
        ds.to_nifti(out)
        assert np.loadtxt(tmp_path / "out.bval", ndmin=1).size == n
        if n_dw < dmri.MIN_DIFFUSION_VOLUMES:
            _raises(
                path,
                f"needs at least {dmri.MIN_DIFFUSION_VOLUMES} diffusion-weighted volumes, "
                f"found {n_dw}",
                dmri.check_diffusion_volumes,
                ds,
            )


def test_check_diffusion_volumes_passes_enough(tmp_path):
    n = 2 + dmri.MIN_DIFFUSION_VOLUMES
    bvec, bval = _fsl(tmp_path, _directions(n).T, np.r_[0, 0, np.full(n - 2, 1000.0)])
    with nidask.load(_series(tmp_path, n), bvec_file=bvec, bval_file=bval) as ds:
        dmri.check_diffusion_volumes(ds)
        with pytest.raises(InputError, match="dti fit needs at least 9"):
            dmri.check_diffusion_volumes(ds, minimum=9, what="dti fit")


def test_only_b0_volumes_is_an_error(tmp_path):
    bvec, bval = _fsl(tmp_path, np.zeros((3, 4)), [0, 0, 5, 50])
    path = _series(tmp_path, 4)
    _raises(
        path,
        "no diffusion-weighted volumes: all 4 b-values are at most 50",
        nidask.load,
        path,
        bvec_file=bvec,
        bval_file=bval,
    )
