"""FSL b-vectors in FSL's frame: read and written along the image's voxel axes.

FSL's ``.bvec`` holds each gradient along the image's voxel axes, with the x number
negated when the affine's determinant is positive; nidask holds RAS+ directions.
Every case below knows its true RAS directions and writes the FSL numbers with a
formula of its own (direction cosines, not nidask's polar decomposition).
"""

from __future__ import annotations

import os
import subprocess
import sys

import nibabel as nb
import nitransforms.linear as ntl
import numpy as np
import pytest
from dipy.io.gradients import read_bvals_bvecs
from scipy.spatial.transform import Rotation

import nidask
from conftest import SHAPE3D, write_nifti
from nidask.geometry import fsl_to_ras, ras_to_fsl
from nidask.validation import phantom


def _affine(zooms, angles_deg, las: bool) -> np.ndarray:
    affine = np.eye(4)
    rotation = Rotation.from_euler("xyz", angles_deg, degrees=True).as_matrix()
    flip = np.diag([-1.0, 1.0, 1.0]) if las else np.eye(3)
    affine[:3, :3] = rotation @ flip @ np.diag(zooms)
    affine[:3, 3] = [40.0, -30.0, -20.0]
    return affine


AFFINES = {
    "RAS": _affine((2.0, 2.0, 2.0), (0, 0, 0), las=False),
    "LAS": _affine((2.0, 2.0, 2.0), (0, 0, 0), las=True),
    # dcm2niix's usual output: LAS, a few degrees oblique, anisotropic voxels
    "LAS oblique": _affine((1.5, 1.5, 2.4), (8.0, -3.0, 5.0), las=True),
    "RAS oblique": _affine((2.0, 2.2, 2.5), (-12.0, 6.0, 20.0), las=False),
}


def _fsl_numbers(ras: np.ndarray, affine: np.ndarray) -> np.ndarray:
    """FSL's numbers for RAS directions: components along the unit voxel axes."""
    cosines = affine[:3, :3] / np.linalg.norm(affine[:3, :3], axis=0)
    voxel = np.linalg.solve(cosines, ras.T).T
    if np.linalg.det(affine[:3, :3]) > 0:
        voxel[:, 0] *= -1
    return voxel / np.linalg.norm(voxel, axis=1, keepdims=True)


def _directions(n: int, seed: int = 0) -> np.ndarray:
    v = np.random.default_rng(seed).normal(size=(n, 3))
    return v / np.linalg.norm(v, axis=1, keepdims=True)


@pytest.mark.parametrize("name", sorted(AFFINES))
def test_conversions_match_the_direction_cosines(name):
    affine, ras = AFFINES[name], _directions(12)
    fsl = _fsl_numbers(ras, affine)
    np.testing.assert_allclose(ras_to_fsl(ras, affine), fsl, atol=1e-12)
    np.testing.assert_allclose(fsl_to_ras(fsl, affine), ras, atol=1e-12)
    # the frame matters: the numbers are not the RAS directions (|cos| well below 1)
    assert np.abs(np.sum(fsl * ras, axis=1)).min() < 0.9


def test_zero_vectors_stay_zero():
    out = fsl_to_ras(np.zeros((2, 3)), AFFINES["LAS oblique"])
    assert out.tolist() == [[0.0] * 3] * 2


def _series(tmp_path, affine, ras, bvals):
    n = len(bvals)
    data = np.random.default_rng(1).integers(100, 1000, size=(*SHAPE3D, n)).astype(np.int16)
    image = write_nifti(tmp_path / "dwi.nii", data, affine)
    np.savetxt(tmp_path / "dwi.bvec", _fsl_numbers_or_zero(ras, affine).T, fmt="%.8f")
    np.savetxt(tmp_path / "dwi.bval", bvals[None], fmt="%g")
    return image, os.fspath(tmp_path / "dwi.bvec"), os.fspath(tmp_path / "dwi.bval")


@pytest.mark.parametrize("name", sorted(AFFINES))
def _fsl_numbers_or_zero(ras, affine):
    out = np.zeros_like(ras)
    weighted = np.linalg.norm(ras, axis=1) > 0
    out[weighted] = _fsl_numbers(ras[weighted], affine)
    return out


@pytest.mark.parametrize("name", sorted(AFFINES))
def test_load_gives_the_true_directions_and_to_nifti_writes_them_back(tmp_path, name):
    affine, ras = AFFINES[name], _directions(9, seed=3)
    bvals = np.r_[0.0, np.full(8, 1000.0)]
    image, bvec, bval = _series(tmp_path, affine, ras, bvals)
    with nidask.load(image, bvec_file=bvec, bval_file=bval) as dwi:
        np.testing.assert_allclose(dwi.bvecs, ras[1:], atol=1e-7)
        dwi.to_nifti(tmp_path / "out.nii", order=1)
    with nidask.load(
        tmp_path / "out.nii", bvec_file=tmp_path / "out.bvec", bval_file=tmp_path / "out.bval"
    ) as back:
        np.testing.assert_allclose(back.bvecs, ras[1:], atol=1e-5)
    written = np.loadtxt(tmp_path / "out.bvec")
    np.testing.assert_allclose(written[:, 1:].T, _fsl_numbers(ras[1:], affine), atol=1e-5)


def test_estimate_writes_the_true_directions_turned_by_the_motion(tmp_path):
    """An oblique LAS series: the corrected ``.bvec``, read by dipy, holds each true
    direction turned by the inverse of its estimated rotation, in FSL's frame."""
    (tmp_path / "ph").mkdir()
    source = phantom.make_dwi(tmp_path / "ph", shape3d=(28, 30, 24), n_b0=2, n_directions=10)
    affine = AFFINES["LAS oblique"]
    data = np.asanyarray(nb.load(source.image).dataobj)
    bvals = np.loadtxt(source.companions["bval_file"])
    ras = _directions(len(bvals), seed=5) * (bvals > 0)[:, None]
    image, bvec, bval = _series(tmp_path, affine, ras, bvals)
    write_nifti(image, data, affine)
    mask = os.fspath(tmp_path / "mask.nii")
    nb.Nifti1Image(nb.load(source.companions["brainmask_file"]).dataobj, affine).to_filename(mask)
    out = tmp_path / "out"
    result = subprocess.run(
        [sys.executable, "-m", "nidask", "estimate", image, "--bvec", bvec, "--bval", bval]
        + ["--mask", mask, "--out", os.fspath(out), "--model", "average", "--passes", "1"]
        + ["--quiet", "--no-plots"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    motion = ntl.load(out / "motion.x5", fmt="X5").matrix
    expected = np.array([A[:3, :3].T @ g for A, g in zip(motion, ras, strict=True)])
    assert np.abs(expected - ras).max() > 0.01  # the phantom turned: the rotation matters
    read_bvals, read_bvecs = read_bvals_bvecs(
        os.fspath(out / "corrected.bval"), os.fspath(out / "corrected.bvec")
    )
    np.testing.assert_allclose(read_bvals, bvals, atol=0.01)
    np.testing.assert_allclose(read_bvecs, _fsl_numbers_or_zero(expected, affine), atol=2e-5)
