"""Outlier slices: found against the leave-one-out prediction, reported, replaced.

The series is real anatomy (heudiconv's Siemens DWI through dcm2niix, as
:func:`nidask.validation.phantom.real_anatomy` models it) on a 3 mm grid, 1 b=0 and two
shells of 12 directions, with known motion; a few slices of a few diffusion-weighted
volumes lose 40-70 % of their signal (:func:`nidask.validation.phantom.drop_slices`).
"""

from __future__ import annotations

import json
import os

import nibabel as nb
import numpy as np
import pytest

import nidask
from nidask import cli
from nidask.estimation import outliers
from nidask.estimation.estimator import FINAL_ESTIMATES, REPORT_FILE
from nidask.geometry import fov_center
from nidask.validation import phantom
from test_real_data import heudiconv_anatomy

#: (file volume, slice) dropped and the signal they keep.
DROPPED = [(2, 14), (7, 22), (7, 30), (18, 9)]
FACTORS = [0.3, 0.45, 0.6, 0.5]


@pytest.fixture(scope="module")
def series(tmp_path_factory):
    out = tmp_path_factory.mktemp("outlier-scan")
    anatomy = heudiconv_anatomy(out)
    rng = np.random.default_rng(7)
    bvals, bvecs = phantom.acquisition_scheme(1, 24, (1000, 2000), rng)
    motion = phantom.random_motion(
        len(bvals), rng, 2.0, 2.0, fov_center(anatomy.affine, anatomy.shape3d)
    )
    clean = phantom.make_real_dwi(out, anatomy, bvals, bvecs, motion, seed=1)
    return clean, phantom.drop_slices(clean, DROPPED, FACTORS), anatomy


def _found(report):
    return sorted((o["volume"], o["slice"]) for o in report["outliers"])


@pytest.fixture(scope="module")
def clean_run(series, tmp_path_factory):
    clean, _, _ = series
    with nidask.load(clean.image, **clean.companions) as dwi:
        estimator = nidask.Estimator(outliers="flag")
        corrected = estimator.run(dwi, workdir=tmp_path_factory.mktemp("clean"))
        data = corrected.whole_series()._exported().dataobj.compute()
    return estimator.report, corrected.whole_series().motion_affines, data


def test_no_slice_is_flagged_on_the_clean_series(clean_run):
    report, _, _ = clean_run
    assert report["outliers"] == []
    shells = report["quality"]["shells"]
    assert [(s["bval"], s["volumes"]) for s in shells] == [(1000.0, 12), (2000.0, 12)]
    assert all(0.2 < s["cnr"] < 20 for s in shells), shells


@pytest.fixture(scope="module")
def cli_run(series, tmp_path_factory):
    """``nidask estimate`` (outliers flagged by default) on the series with dropped slices."""
    _, dropped, _ = series
    out = tmp_path_factory.mktemp("cli") / "out"
    args = ["--bvec", dropped.companions["bvec_file"], "--bval", dropped.companions["bval_file"]]
    args += ["--mask", dropped.companions["brainmask_file"]]
    code = cli.main(["estimate", dropped.image, *args, "--out", str(out), "--no-plots", "-q"])
    assert code == 0
    return out


def test_the_cli_flags_exactly_the_dropped_slices(cli_run):
    out = cli_run
    lines = (out / "outliers.tsv").read_text().splitlines()
    assert lines[0].split("\t") == ["volume", "slice", "score", "replaced"]
    rows = [line.split("\t") for line in lines[1:]]
    assert sorted((int(r[0]), int(r[1])) for r in rows) == sorted(DROPPED)
    assert all(float(r[2]) < -outliers.THRESHOLD and r[3] == "false" for r in rows)
    with open(out / "work" / REPORT_FILE) as f:
        assert _found(json.load(f)) == sorted(DROPPED)


def test_flagging_scores_the_last_pass_only(series, tmp_path):
    # flagged outliers change nothing before the end: earlier passes are not scored
    _, dropped, _ = series
    work = tmp_path / "two-passes"
    with nidask.load(dropped.image, **dropped.companions) as dwi:
        estimator = nidask.Estimator(outliers="flag", passes=2, tolerance=0.0)
        estimator.run(dwi, workdir=work)
    assert [entry["pass"] for entry in estimator.report["passes"]] == [0, 1, 2]
    assert not (work / "pass-1" / outliers.RECORD).exists()
    assert (work / "pass-2" / outliers.RECORD).exists()
    assert set(DROPPED) <= set(_found(estimator.report))  # the last pass's outliers


def _slice_region(matrix, affine, shape3d, k, brain):
    """Reference-frame brain voxels that the motion ``matrix`` puts in slice ``k``."""
    index = np.indices(shape3d).reshape(3, -1)
    voxel = (np.linalg.inv(affine) @ matrix @ affine)[2]
    z = (voxel[:3] @ index + voxel[3]).reshape(shape3d)
    return (np.abs(z - k) < 0.3) & brain


def test_replaced_slices_are_close_to_the_clean_series(series, clean_run, cli_run, tmp_path):
    _, dropped, anatomy = series
    _, clean_motion, clean_data = clean_run
    work = tmp_path / "replace"
    with nidask.load(dropped.image, **dropped.companions) as dwi:
        estimator = nidask.Estimator(outliers="replace", passes=1)
        corrected = estimator.run(dwi, workdir=work)
        replaced = corrected.whole_series()._exported().dataobj.compute()
        kept = np.asarray(nb.load(cli_run / "corrected.nii.gz").dataobj)  # flagged only
        found = estimator.report["outliers"]
        assert sorted((o["volume"], o["slice"]) for o in found) == sorted(DROPPED)
        assert all(o["replaced"] for o in found)
        brain = anatomy.mask
        for volume, k in DROPPED:
            region = _slice_region(clean_motion[volume], dwi.affine, dwi.shape3d, k, brain)
            assert region.sum() > 200
            truth = clean_data[..., volume][region]
            error_replaced = np.mean(np.abs(replaced[..., volume][region] - truth))
            error_kept = np.mean(np.abs(kept[..., volume][region] - truth))
            # the lost signal is 40-70 %: the prediction leaves a fraction of that
            assert error_replaced < 0.4 * error_kept, (volume, k, error_replaced, error_kept)
        # a run interrupted before its end resumes to the same outliers and output
        os.unlink(work / FINAL_ESTIMATES)
        os.unlink(work / REPORT_FILE)
        again = nidask.Estimator(outliers="replace", passes=1)
        resumed = again.run(dwi, workdir=work)
        assert again.report["outliers"] == found
        assert again.report["quality"] == estimator.report["quality"]
        np.testing.assert_array_equal(resumed.whole_series()._exported().dataobj, replaced)
        # and a finished run, started again, puts the same slices in
        finished = nidask.Estimator(outliers="replace", passes=1).run(dwi, workdir=work)
        np.testing.assert_array_equal(finished.whole_series()._exported().dataobj, replaced)


def test_an_unknown_mode_is_refused(series):
    clean, _, _ = series
    with nidask.load(clean.image, **clean.companions) as dwi:
        with pytest.raises(nidask.InputError, match="unknown outliers mode 'repol'"):
            nidask.Estimator(outliers="repol").run(dwi)
        with pytest.raises(nidask.InputError, match="slice axis must be 0, 1 or 2"):
            nidask.Estimator(slice_axis=3).run(dwi)


def test_left_out_slices_get_no_registration_weight():
    calls = {}

    def registration(fixed, moving, affine, mask=None, init=None):
        calls["mask"] = mask
        return np.eye(4)

    record = outliers.OutlierRecord(
        outliers=[{"volume": 5, "slice": 3, "score": -9.0, "replaced": True}],
        positions=(4,),
        shells=[],
        axis=2,
    )
    assert record.registration(registration, 0) is registration
    wrapped = record.registration(registration, 4)
    shift = np.eye(4)
    shift[2, 3] = 2.0  # the moving volume sits 2 mm (1 voxel) up
    wrapped(np.ones((6, 6, 8)), np.ones((6, 6, 8)), np.diag([2.0, 2, 2, 1]), init=shift)
    weights = calls["mask"]
    assert np.all(weights[:, :, 2] == 0) and np.all(np.delete(weights, 2, axis=2) == 1)


def test_standardised_scores_are_robust_per_slice():
    rng = np.random.default_rng(0)
    n_volumes, n_slices = 20, 10
    statistics = np.empty((n_volumes, n_slices, 3))
    statistics[..., 0] = 1000
    statistics[..., 2] = 1000 * 100.0
    relative = rng.normal(0, 0.01, (n_volumes, n_slices)) + np.linspace(-0.05, 0.05, n_slices)
    relative[3, 4] = -0.4
    statistics[..., 1] = relative * statistics[..., 2]
    statistics[7, 1, 0] = 100  # too few brain voxels: not scored
    scores = outliers.standardise(statistics, np.zeros(n_volumes))
    assert np.isnan(scores[7, 1])
    assert list(zip(*np.nonzero(scores < -outliers.THRESHOLD), strict=True)) == [(3, 4)]
