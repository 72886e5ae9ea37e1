"""BOLD: loading with its BIDS sidecar, NFDH5 round trip, export and estimation."""

from __future__ import annotations

import json
import os
from pathlib import Path

import h5py
import nibabel as nb
import numpy as np
import pytest

import nidask
from nidask.cli.info import modality_facts
from nidask.data.bold import BOLD
from nidask.errors import InputError
from nidask.validation import phantom
from nidask.validation.evaluation import motion_errors

NIBABEL_DATA = Path(nb.__file__).parent / "tests" / "data"


def _mcflirt_file() -> Path:
    import nipype

    return Path(nipype.__file__).parent / "testing" / "data" / "fsl_mcflirt_movpar.txt"


def _write_series(directory: Path, n=6, tr=2.0, slice_timing=None) -> tuple[Path, Path]:
    rng = np.random.default_rng(0)
    data = rng.normal(100, 5, (10, 12, 8, n)).astype(np.float32)
    path = directory / "sub-01_task-rest_bold.nii.gz"
    nb.Nifti1Image(data, np.diag([3.0, 3.0, 3.5, 1.0])).to_filename(path)
    sidecar = directory / "sub-01_task-rest_bold.json"
    meta = {"RepetitionTime": tr, "TaskName": "rest"}
    if slice_timing is not None:
        meta["SliceTiming"] = slice_timing
    sidecar.write_text(json.dumps(meta))
    return path, sidecar


def test_load_with_sidecar(tmp_path):
    path, sidecar = _write_series(
        tmp_path, slice_timing=[0.0, 1.0, 0.25, 1.25, 0.5, 1.5, 0.75, 1.75]
    )
    dataset = nidask.load(path, json_file=sidecar)
    assert isinstance(dataset, BOLD)
    assert dataset.repetition_time == 2.0
    assert dataset.slice_timing.tolist()[:3] == [0.0, 1.0, 0.25]
    assert dataset.acquisition_times.tolist() == [0.0, 2.0, 4.0, 6.0, 8.0, 10.0]
    assert "TR=2s" in repr(dataset) and "slice timing=8 slices" in repr(dataset)
    # times follow the volumes through selections (leave-one-out folds keep them)
    train, _ = dataset.lofo(2)
    assert train.volume_meta()["time"].tolist() == [0.0, 2.0, 6.0, 8.0, 10.0]
    assert modality_facts(dataset)["bold"]["duration_s"] == 12.0


def test_repetition_time_sources(tmp_path):
    path, sidecar = _write_series(tmp_path, tr=1.5)
    # an explicit value wins over the sidecar; without a sidecar the header's step is used
    assert nidask.data.bold.from_nii(path, sidecar, repetition_time=0.8).repetition_time == 0.8
    image = nb.load(path)
    image.header.set_zooms((3.0, 3.0, 3.5, 720.0))
    image.header.set_xyzt_units("mm", "msec")
    header_path = tmp_path / "timed.nii"
    nb.Nifti1Image(np.asarray(image.dataobj), image.affine, image.header).to_filename(header_path)
    assert nidask.data.bold.from_nii(header_path).repetition_time == pytest.approx(0.72)


@pytest.mark.parametrize(
    "meta, problem",
    [
        ({"TaskName": "rest"}, "no RepetitionTime"),
        ({"RepetitionTime": [2.0, 2.0]}, "RepetitionTime must be a number"),
        ({"RepetitionTime": -2.0}, "repetition_time must be positive"),
        ({"RepetitionTime": 2.0, "SliceTiming": [0.0, 2.5]}, "within one repetition time"),
        ({"RepetitionTime": "fast"}, "malformed RepetitionTime"),
    ],
)
def test_bad_sidecar_names_file(tmp_path, meta, problem):
    path, sidecar = _write_series(tmp_path)
    sidecar.write_text(json.dumps(meta))
    with pytest.raises(InputError) as excinfo:
        nidask.load(path, json_file=sidecar)
    assert str(sidecar) in str(excinfo.value) and problem in str(excinfo.value)


def test_no_repetition_time_anywhere(tmp_path):
    data = np.zeros((4, 4, 4, 3), dtype=np.float32)
    path = tmp_path / "bold.npy"
    np.save(path, data)
    with pytest.raises(InputError, match="no repetition time"):
        nidask.data.bold.from_nii(path)


def test_nfdh5_round_trip_and_export(tmp_path):
    path, sidecar = _write_series(tmp_path, slice_timing=[0.0, 1.0] * 4)
    dataset = nidask.load(path, json_file=sidecar)
    dataset.set_transform(1, np.diag([1.0, 1.0, 1.0, 1.0]) + np.eye(4) * 0)
    h5 = tmp_path / "bold.h5"
    dataset.to_filename(h5)
    with h5py.File(h5) as f:
        assert f["0"].attrs["Type"] == "bold" and f.attrs["Format"] == "NFDH5"
    back = nidask.load(h5)
    assert isinstance(back, BOLD) and back == dataset
    assert back.repetition_time == 2.0 and back.slice_timing.tolist() == [0.0, 1.0] * 4
    # export: the image alone (no modality sidecars), every volume
    out = tmp_path / "out.nii.gz"
    back.to_nifti(out)
    assert nb.load(out).shape == dataset.shape
    assert sorted(os.listdir(tmp_path)) == sorted(
        [path.name, sidecar.name, "bold.h5", "out.nii.gz"]
    )
    with pytest.raises(InputError, match="BOLD export has no option insert_b0"):
        back.to_nifti(tmp_path / "other.nii", insert_b0=True)
    assert not (tmp_path / "other.nii").exists()


def test_neighbours_model_predicts_from_nearest_volumes():
    from nidask.estimation.models import get_model

    model = get_model("neighbours")
    data = np.arange(10, dtype=np.float32)[None, :] * np.ones((3, 1), np.float32)
    times = np.arange(10) * 2.0
    predicted = model.predict_folds(data, {"time": times}, [0, 5, 9])
    # size 6: fold 5 -> volumes 2, 3, 4, 6, 7, 8; fold 0 -> 1..6; fold 9 -> 3..8
    assert predicted[0].tolist() == [3.5, 5.0, 5.5]


def test_estimate_real_anatomy_moved_by_real_trajectory(tmp_path):
    """nibabel's real EPI volume moved by nipype's real MCFLIRT trajectory (x3)."""
    image = nb.load(NIBABEL_DATA / "example4d.nii.gz")
    volume = np.asarray(image.dataobj[..., 0], dtype=np.float64)
    centre = phantom.fov_center(image.affine, volume.shape)
    n = 16
    motion = phantom.mcflirt_trajectory(_mcflirt_file(), n=n, scale=3.0, centre=centre)
    truth = phantom.make_moved_series(tmp_path, volume, image.affine, motion, name="bold")
    sidecar = tmp_path / "bold.json"
    sidecar.write_text(json.dumps({"RepetitionTime": 2.0}))
    dataset = nidask.load(truth.image, json_file=sidecar, **truth.companions)
    assert isinstance(dataset, BOLD)
    estimated = nidask.Estimator(progress=False).run(dataset)
    errors = motion_errors(estimated.motion_affines, truth.motion, dataset.affine, dataset.shape3d)
    moved = motion_errors(
        np.tile(np.eye(4), (n, 1, 1)), truth.motion, dataset.affine, dataset.shape3d
    )
    # the trajectory moves the head by up to 0.6 mm and 0.6 deg (measured: median
    # 0.004 mm / 0.01 deg, worst 0.02 mm / 0.16 deg)
    assert moved["translation_mm_max"] > 0.5 and moved["rotation_deg_max"] > 0.5
    assert errors["translation_mm_median"] < 0.05 and errors["rotation_deg_median"] < 0.05
    assert errors["translation_mm_max"] < 0.1 and errors["rotation_deg_max"] < 0.3
