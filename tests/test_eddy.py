"""Eddy-current distortion (FSL eddy's linear model) estimated with the motion.

A diffusion series of real anatomy (heudiconv's DWI as
:func:`nidask.validation.phantom.real_anatomy` models it, 3 mm) gets known motion and a
known eddy-current field, linear in the diffusion gradient as real ones are, up to
1.5 mm at the brain's edge.  Bounds are generous: ``benchmarks/eddy_suite.py`` states
the figures at 2 mm.
"""

from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest

import nidask
from nidask import bids
from nidask.errors import InputError
from nidask.estimation import eddy
from nidask.estimation.estimator import FINAL_ESTIMATES, REPORT_FILE
from nidask.geometry import eddy_frame, eddy_matrix, fov_center, ras_to_fsl, rigid_matrix
from nidask.ops.resample import rotate_bvecs
from nidask.reporting.tables import write_outputs
from nidask.validation import phantom
from nidask.validation.evaluation import motion_errors
from test_real_data import heudiconv_anatomy

PE = "j-"


@pytest.fixture(scope="module")
def series(tmp_path_factory):
    out = tmp_path_factory.mktemp("eddy")
    anatomy = heudiconv_anatomy(out)
    rng = np.random.default_rng(3)
    bvals, bvecs = phantom.acquisition_scheme(1, 24, (1000, 2000), rng, None)
    centre = fov_center(anatomy.affine, anatomy.shape3d)
    motion = phantom.random_motion(len(bvals), rng, 2.0, 2.0, centre)
    frame = eddy_frame(anatomy.affine, anatomy.shape3d, PE)
    gamma = rng.uniform(-1, 1, (4, 3)) * np.array([[0.8], [0.008], [0.008], [0.008]])
    coefficients = eddy.gradient_vectors(np.column_stack([bvecs, bvals])) @ gamma.T
    points = anatomy.affine @ np.vstack([np.argwhere(anatomy.mask).T, np.ones(anatomy.mask.sum())])

    def largest(c):  # mm along PE over the brain
        return np.abs(frame.direction @ (eddy_matrix(c, frame) @ points - points)[:3]).max()

    coefficients *= 1.5 / max(largest(c) for c in coefficients)
    fields = np.stack([eddy_matrix(c, frame) for c in coefficients])
    ph = phantom.make_real_dwi(out, anatomy, bvals, bvecs, motion, seed=3, eddy=fields)
    return {
        "phantom": ph,
        "anatomy": anatomy,
        "bvals": bvals,
        "bvecs": bvecs,
        "motion": motion,
        "coefficients": coefficients,
        "dir": out,
    }


def _displacement(result, series) -> np.ndarray:
    whole = result.whole_series()
    order = np.argsort(whole.original_index)
    anatomy = series["anatomy"]
    errors = motion_errors(
        whole.motion_affines[order],
        series["phantom"].motion,
        anatomy.affine,
        anatomy.shape3d,
        mask=anatomy.mask,
    )
    return errors["displacement_mm"][series["bvals"] > 0]


def test_whole_affines_recovered_and_written(series, tmp_path):
    ph = series["phantom"]
    with nidask.load(ph.image, **ph.companions) as dwi:
        rigid = _displacement(nidask.Estimator().run(dwi), series)
    with nidask.load(ph.image, **ph.companions, phase_encoding=PE) as dwi:
        estimator = nidask.Estimator(eddy_currents=True)
        result = estimator.run(dwi, workdir=tmp_path / "work")
        joint = _displacement(result, series)
        assert np.median(joint) < 0.12 and joint.max() < 0.3
        assert np.median(joint) < 0.5 * np.median(rigid)
        entry = estimator.report["eddy_currents"]
        assert entry["phase_encoding"] == PE and entry["model"] == "linear"
        assert entry["columns"] == list(eddy.COLUMNS)
        coefficients = np.array(entry["coefficients"])
        assert coefficients.shape == (len(series["bvals"]), 4)
        b0 = series["bvals"] == 0
        np.testing.assert_array_equal(coefficients[b0], 0.0)
        # the slopes, mm per mm, within a fraction of their size
        error = np.abs(coefficients[~b0, 1:] - series["coefficients"][~b0, 1:])
        assert np.median(error) < 0.4 * np.median(np.abs(series["coefficients"][~b0, 1:]))

        out = tmp_path / "out"
        out.mkdir()
        written = write_outputs(dwi, result, str(out), report=estimator.report, plots=False)
        assert "eddy.tsv" in written
        rows = np.loadtxt(out / "eddy.tsv", skiprows=1)
        with open(out / "eddy.tsv") as f:
            assert f.readline().split() == ["volume", *eddy.COLUMNS]
        np.testing.assert_allclose(rows[:, 1:], coefficients, atol=1e-6)
        # motion.tsv holds the motion part: no shear or shift in its parameters
        whole = result.whole_series()
        motion = eddy.motion_part(whole.motion_affines, entry, whole.affine, whole.shape3d)
        for m in motion:
            np.testing.assert_allclose(m[:3, :3].T @ m[:3, :3], np.eye(3), atol=1e-9)
        table = np.loadtxt(out / "motion.tsv", skiprows=1, usecols=range(1, 7))
        expected = nidask.geometry.motion_table(motion, whole.affine, whole.shape3d)[:, :6]
        np.testing.assert_allclose(table, expected, atol=1e-4)
        # the b-vectors written turn with the head's rotation only
        fsl = np.loadtxt(out / "corrected.bvec").T
        rotated = rotate_bvecs(whole.bvecs, motion)
        np.testing.assert_allclose(fsl, ras_to_fsl(rotated, whole.affine), atol=2e-6)
        polar = ras_to_fsl(rotate_bvecs(whole.bvecs, whole.motion_affines), whole.affine)
        assert np.abs(polar - fsl).max() > 1e-4  # the whole matrix's nearest rotation differs

        # resuming a run interrupted before its end gives the same matrices
        work = tmp_path / "work"
        os.remove(work / FINAL_ESTIMATES)
        os.remove(work / REPORT_FILE)
        for record in sorted((work / "anchor").glob("fold-*.npy"))[::2]:
            os.remove(record)
        again = nidask.Estimator(eddy_currents=True)
        resumed = again.run(dwi, workdir=work)
        np.testing.assert_array_equal(resumed.motion_affines, result.motion_affines)
        assert again.report["eddy_currents"] == entry


def test_missing_phase_encoding_is_refused(series):
    ph = series["phantom"]
    with nidask.load(ph.image, **ph.companions) as dwi:
        with pytest.raises(InputError, match="phase-encoding direction") as excinfo:
            nidask.Estimator(eddy_currents=True).run(dwi)
        assert excinfo.value.path == os.fspath(ph.image)
    with pytest.raises(InputError, match="unknown phase-encoding direction 'y'"):
        nidask.load(ph.image, **ph.companions, phase_encoding="y")


def test_phase_encoding_from_a_bids_sidecar_and_nfdh5(series, tmp_path):
    ph = series["phantom"]
    root = tmp_path / "bids"
    folder = root / "sub-01" / "dwi"
    folder.mkdir(parents=True)
    (root / "dataset_description.json").write_text(json.dumps({"Name": "t"}))
    (root / "dwi.json").write_text(json.dumps({"PhaseEncodingDirection": "j-"}))
    shutil.copy(ph.image, folder / "sub-01_dwi.nii")
    shutil.copy(ph.companions["bvec_file"], folder / "sub-01_dwi.bvec")
    shutil.copy(ph.companions["bval_file"], folder / "sub-01_dwi.bval")
    path = folder / "sub-01_dwi.nii"
    found = bids.find_sidecars(path)
    assert found["phase_encoding"] == "j-"
    with nidask.load(path, **found) as dwi:
        assert dwi.phase_encoding == "j-"
        assert dwi.select([0, 1, 2]).phase_encoding == "j-"
        assert dwi.whole_series().phase_encoding == "j-"
        dwi.to_filename(tmp_path / "dwi.h5")
    with nidask.load(tmp_path / "dwi.h5") as stored:
        assert stored.phase_encoding == "j-"
        assert stored.whole_series().phase_encoding == "j-"


def test_shift_told_from_translation():
    # shifts linear in the gradient, head motion that is not: the second level parts them
    rng = np.random.default_rng(0)
    affine = np.diag([-2.0, 2.0, 2.0, 1.0])
    frame = eddy_frame(affine, (40, 40, 30), "i")
    n = 40
    gradients = np.column_stack([rng.normal(size=(n, 3)), np.full(n, 1000.0)])
    gradients[:, :3] /= np.linalg.norm(gradients[:, :3], axis=1, keepdims=True)
    coefficients = np.zeros((n, 4))
    coefficients[:, 0] = eddy.gradient_vectors(gradients) @ [0.6, -0.4, 0.2]
    coefficients[:, 1:] = rng.normal(scale=0.005, size=(n, 3))
    motion = np.stack([rigid_matrix([0.3, -0.2, 0.1, 0.01, 0.0, -0.01], center=frame.centre)] * n)
    whole = eddy.compose(motion, coefficients, frame)
    parts, found = eddy.decompose(whole, gradients, frame, np.ones(n, bool))
    np.testing.assert_allclose(found, coefficients, atol=1e-9)
    np.testing.assert_allclose(parts, motion, atol=1e-9)
    np.testing.assert_allclose(eddy.compose(parts, found, frame), whole, atol=1e-12)


def test_the_corrected_series_undoes_the_stretch_of_its_signal(tmp_path):
    # a volume stretched by an eddy-current field spreads its signal thinner (the
    # phantom divides by the Jacobian); the corrected series multiplies it back
    truth = phantom.make_dwi(tmp_path, shape3d=(20, 22, 16), n_b0=1, n_directions=6, seed=2)
    with nidask.load(truth.image, **truth.companions) as dwi:
        whole = dwi.whole_series()
        stretch = np.tile(np.eye(4), (len(whole), 1, 1))
        stretch[1:, 1, 1] = np.linspace(0.96, 1.04, len(whole) - 1)  # along j
        moved = dwi.with_whole_motion(stretch)
        _, data, _ = moved.export_plan()
        plain = moved.whole_series().resampled().dataobj
        ratio = np.asarray(data.compute()).sum(axis=(0, 1, 2)) / np.asarray(plain.compute()).sum(
            axis=(0, 1, 2)
        )
    np.testing.assert_allclose(
        ratio, np.r_[1.0, np.linspace(0.96, 1.04, len(whole) - 1)], rtol=1e-5
    )
