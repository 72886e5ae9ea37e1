"""BIDS rules of :mod:`nidask.bids`: series discovery, sidecar inheritance, derivative
masks and names, the derivative ``dataset_description.json``."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

import nidask
from conftest import write_bvec_bval, write_nifti
from nidask import bids
from nidask.errors import InputError, OutputError

SHAPE3D = (6, 7, 5)
N = 8  # 2 b=0 + 6 diffusion-weighted volumes


def _directions(n: int, seed: int) -> np.ndarray:
    vectors = np.random.default_rng(seed).normal(size=(n, 3))
    return vectors / np.linalg.norm(vectors, axis=1, keepdims=True)


def _series(path, n: int = N):
    path.parent.mkdir(parents=True, exist_ok=True)
    data = np.random.default_rng(0).integers(100, 1000, size=(*SHAPE3D, n), dtype=np.int16)
    return write_nifti(path, data)


def _gradients(stem, seed: int, bvalue: float = 1000.0):
    stem.parent.mkdir(parents=True, exist_ok=True)
    bvecs = _directions(N, seed)
    write_bvec_bval(stem, bvecs, np.r_[0, 0, np.full(N - 2, bvalue)])
    return bvecs


def _json(path, content):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(content))


def _mask(path):
    path.parent.mkdir(parents=True, exist_ok=True)
    return write_nifti(path, np.ones(SHAPE3D, dtype=np.uint8))


@pytest.fixture
def dataset(tmp_path):
    """A small BIDS tree with inherited and overriding sidecars and derivative masks."""
    root = tmp_path / "raw"
    _json(root / "dataset_description.json", {"Name": "test", "BIDSVersion": "1.10.0"})
    top = _gradients(root / "dwi", seed=1)  # top level: every dwi series inherits it
    _json(root / "dwi.json", {"EchoTime": 0.1, "PhaseEncodingDirection": "j-"})
    # sub-01: two series in a session; a subject-level .bval overrides the top one
    s1 = root / "sub-01" / "ses-1" / "dwi"
    _series(s1 / "sub-01_ses-1_acq-x_dwi.nii.gz")
    _series(s1 / "sub-01_ses-1_dwi.nii.gz")
    np.savetxt(root / "sub-01" / "sub-01_dwi.bval", np.r_[0, 0, np.full(N - 2, 2000.0)][None])
    _json(s1 / "sub-01_ses-1_acq-x_dwi.json", {"EchoTime": 0.08})
    # sub-02: its own gradients beside the series
    s2 = root / "sub-02" / "dwi"
    _series(s2 / "sub-02_dwi.nii")
    own = _gradients(s2 / "sub-02_dwi", seed=2, bvalue=3000.0)
    # sub-03: PET with its timing
    s3 = root / "sub-03" / "pet"
    _series(s3 / "sub-03_trc-FDG_pet.nii.gz", n=4)
    _json(s3 / "sub-03_trc-FDG_pet.json", {"FrameTimesStart": [0, 10, 20, 40]})
    _json(root / "pet.json", {"FrameDuration": [10, 10, 20, 20], "TracerName": "FDG"})
    # things to ignore
    _series(root / "sourcedata" / "sub-01" / "dwi" / "sub-01_dwi.nii.gz")
    _series(root / "derivatives" / "prep" / "sub-01" / "dwi" / "sub-01_dwi.nii.gz")
    (root / "sub-01" / "ses-1" / "anat").mkdir()
    _series(root / "sub-01" / "ses-1" / "anat" / "sub-01_ses-1_T1w.nii.gz", n=1)
    (root / "sub-01" / "ses-1" / "dwi" / "notes.txt").write_text("not a series")
    # derivative masks
    d1 = root / "derivatives" / "masks" / "sub-01" / "ses-1" / "dwi"
    _mask(d1 / "sub-01_ses-1_acq-x_desc-brain_mask.nii.gz")
    _mask(d1 / "sub-01_ses-1_space-T1w_desc-brain_mask.nii.gz")  # another grid: ignored
    generic = _mask(
        root
        / "derivatives"
        / "other"
        / "sub-01"
        / "ses-1"
        / "dwi"
        / "sub-01_ses-1_desc-brain_mask.nii"
    )
    return {"root": root, "top": top, "own": own, "generic": generic}


# -- find_series --------------------------------------------------------------------
def test_find_series(dataset):
    root = dataset["root"]
    found = bids.find_series(root)
    assert [os.path.relpath(p, root) for p in found] == [
        "sub-01/ses-1/dwi/sub-01_ses-1_acq-x_dwi.nii.gz",
        "sub-01/ses-1/dwi/sub-01_ses-1_dwi.nii.gz",
        "sub-02/dwi/sub-02_dwi.nii",
        "sub-03/pet/sub-03_trc-FDG_pet.nii.gz",
    ]
    assert bids.find_series(root, ["02", "sub-03"]) == found[2:]
    assert bids.find_series(root, modalities=("pet",)) == found[3:]


def test_find_series_errors(dataset, tmp_path):
    root = dataset["root"]
    with pytest.raises(InputError, match="no participant sub-04, sub-05") as excinfo:
        bids.find_series(root, ["04", "01", "sub-05"])
    assert excinfo.value.path == os.fspath(root)
    with pytest.raises(InputError, match="sub-03 has no dwi series"):
        bids.find_series(root, ["03"], modalities=("dwi",))
    with pytest.raises(InputError, match=r"not a BIDS dataset \(no dataset_description.json\)"):
        bids.find_series(root / "sub-01")
    with pytest.raises(InputError, match="does not exist"):
        bids.find_series(tmp_path / "nowhere")
    empty = tmp_path / "empty"
    _json(empty / "dataset_description.json", {"Name": "empty"})
    with pytest.raises(InputError, match="no dwi or pet series in this dataset"):
        bids.find_series(empty)


# -- sidecars -------------------------------------------------------------------------
def test_inheritance_top_level_and_subject_override(dataset):
    root = dataset["root"]
    path = root / "sub-01" / "ses-1" / "dwi" / "sub-01_ses-1_acq-x_dwi.nii.gz"
    found = bids.find_sidecars(path)
    assert found["bvec_file"] == os.fspath(root / "dwi.bvec")  # top level
    assert found["bval_file"] == os.fspath(root / "sub-01" / "sub-01_dwi.bval")  # subject
    with nidask.load(path, **found) as dwi:
        assert len(dwi) == N - 2
        np.testing.assert_allclose(dwi.bvecs, dataset["top"][2:], atol=1e-6)
        np.testing.assert_array_equal(dwi.bvals, 2000.0)
        assert dwi.brainmask is not None and dwi.brainmask.all()


def test_same_folder_files_win(dataset):
    root = dataset["root"]
    path = root / "sub-02" / "dwi" / "sub-02_dwi.nii"
    found = bids.find_sidecars(path)
    assert found == {
        "bval_file": os.fspath(root / "sub-02" / "dwi" / "sub-02_dwi.bval"),
        "bvec_file": os.fspath(root / "sub-02" / "dwi" / "sub-02_dwi.bvec"),
        "phase_encoding": "j-",  # the top-level dwi.json's PhaseEncodingDirection
    }
    with nidask.load(path, **found) as dwi:
        np.testing.assert_allclose(dwi.bvecs, dataset["own"][2:], atol=1e-6)
        np.testing.assert_array_equal(dwi.bvals, 3000.0)


def test_entities_must_be_a_subset(dataset):
    root = dataset["root"]
    folder = root / "sub-02" / "dwi"
    # another acquisition's and another subject's files never apply
    np.savetxt(folder / "sub-02_acq-y_dwi.bval", np.full((1, N), 5.0))
    np.savetxt(root / "sub-01_dwi.bvec", np.ones((3, N)))
    found = bids.find_sidecars(folder / "sub-02_dwi.nii")
    assert found["bval_file"] == os.fspath(folder / "sub-02_dwi.bval")
    assert found["bvec_file"] == os.fspath(folder / "sub-02_dwi.bvec")
    # a more specific file in the same folder wins over a less specific one
    np.savetxt(folder / "sub-02_acq-y_dwi.bvec", np.ones((3, N)))
    _series(folder / "sub-02_acq-y_dwi.nii")
    found = bids.find_sidecars(folder / "sub-02_acq-y_dwi.nii")
    assert found["bval_file"] == os.fspath(folder / "sub-02_acq-y_dwi.bval")
    assert found["bvec_file"] == os.fspath(folder / "sub-02_acq-y_dwi.bvec")


def test_json_metadata_merges_nearer_keys_win(dataset):
    root = dataset["root"]
    folder = root / "sub-01" / "ses-1" / "dwi"
    assert bids.sidecar_metadata(folder / "sub-01_ses-1_acq-x_dwi.nii.gz") == {
        "EchoTime": 0.08,
        "PhaseEncodingDirection": "j-",
    }
    assert bids.sidecar_metadata(folder / "sub-01_ses-1_dwi.nii.gz")["EchoTime"] == 0.1


def test_masks_from_derivatives(dataset):
    root = dataset["root"]
    folder = root / "sub-01" / "ses-1" / "dwi"
    specific = bids.find_sidecars(folder / "sub-01_ses-1_acq-x_dwi.nii.gz")["brainmask_file"]
    assert specific.endswith(
        os.path.join(
            "masks", "sub-01", "ses-1", "dwi", "sub-01_ses-1_acq-x_desc-brain_mask.nii.gz"
        )
    )
    # the acq-x mask does not apply to the other series; the space-T1w one never does
    plain = bids.find_sidecars(folder / "sub-01_ses-1_dwi.nii.gz")["brainmask_file"]
    assert plain == dataset["generic"]
    assert "brainmask_file" not in bids.find_sidecars(root / "sub-02" / "dwi" / "sub-02_dwi.nii")
    # explicit pipeline folders
    assert "brainmask_file" not in bids.find_sidecars(
        folder / "sub-01_ses-1_dwi.nii.gz", derivatives=[root / "derivatives" / "masks"]
    )


def test_pet_timing_sidecar(dataset):
    root = dataset["root"]
    path = root / "sub-03" / "pet" / "sub-03_trc-FDG_pet.nii.gz"
    found = bids.find_sidecars(path)
    assert found == {"temporal_file": os.fspath(path).replace(".nii.gz", ".json")}
    assert bids.sidecar_metadata(path)["TracerName"] == "FDG"
    with nidask.load(path, **found) as pet:
        assert isinstance(pet, nidask.PET)
        assert pet.midframe.tolist() == [5.0, 15.0, 30.0, 50.0]


def test_sidecar_errors(dataset, tmp_path):
    root = dataset["root"]
    folder = root / "sub-02" / "dwi"
    os.unlink(folder / "sub-02_dwi.bvec")
    os.unlink(root / "dwi.bvec")
    with pytest.raises(InputError, match=r"no \.bvec file applies") as excinfo:
        bids.find_sidecars(folder / "sub-02_dwi.nii")
    assert excinfo.value.path.endswith("sub-02_dwi.nii")
    # two equally specific files in one folder
    np.savetxt(folder / "sub-02_dwi.bvec", np.ones((3, N)))
    np.savetxt(folder / "run-1_dwi.bvec", np.ones((3, N)))
    _series(folder / "sub-02_run-1_dwi.nii")
    with pytest.raises(InputError, match="several .bvec files apply equally"):
        bids.find_sidecars(folder / "sub-02_run-1_dwi.nii")
    pet = root / "sub-03" / "pet"
    (pet / "sub-03_trc-FDG_pet.json").write_text("{broken")
    with pytest.raises(InputError, match="not a valid JSON file") as excinfo:
        bids.find_sidecars(pet / "sub-03_trc-FDG_pet.nii.gz")
    assert excinfo.value.path.endswith("sub-03_trc-FDG_pet.json")
    (pet / "sub-03_trc-FDG_pet.json").write_text("{}")
    with pytest.raises(InputError, match="no JSON sidecar with FrameTimesStart"):
        bids.find_sidecars(pet / "sub-03_trc-FDG_pet.nii.gz")
    with pytest.raises(InputError, match="not a dwi, pet or bold series"):
        bids.find_sidecars(root / "sub-01" / "ses-1" / "anat" / "sub-01_ses-1_T1w.nii.gz")
    with pytest.raises(InputError, match="not a NIfTI data file"):
        bids.find_sidecars(folder / "sub-02_dwi.bval")
    outside = _series(tmp_path / "loose" / "sub-01_dwi.nii")
    with pytest.raises(InputError, match="not inside a BIDS dataset"):
        bids.find_sidecars(outside)


def test_parse_name():
    assert bids.parse_name("sub-01_ses-2_run-3_dwi.nii.gz") == (
        {"sub": "01", "ses": "2", "run": "3"},
        "dwi",
        ".nii.gz",
    )
    assert bids.parse_name("notes.txt") == ({}, "notes", ".txt")
    assert bids.parse_name("bad_entity_dwi.bval") == ({}, None, ".bval")


# -- derivatives ----------------------------------------------------------------------
def test_derivative_paths(dataset, tmp_path):
    root = dataset["root"]
    out = tmp_path / "out"
    source = root / "sub-01" / "ses-1" / "dwi" / "sub-01_ses-1_acq-x_dwi.nii.gz"
    paths = bids.derivative_paths(source, out)
    folder = out / "sub-01" / "ses-1" / "dwi"
    stem = "sub-01_ses-1_acq-x"
    assert paths == {
        "dir": os.fspath(folder),
        "series": os.fspath(folder / f"{stem}_desc-hmc_dwi.nii.gz"),
        "bval": os.fspath(folder / f"{stem}_desc-hmc_dwi.bval"),
        "bvec": os.fspath(folder / f"{stem}_desc-hmc_dwi.bvec"),
        "json": os.fspath(folder / f"{stem}_desc-hmc_dwi.json"),
        "motion": os.fspath(folder / f"{stem}_desc-motion_timeseries.tsv"),
        "xfm": os.fspath(folder / f"{stem}_desc-hmc_xfm.x5"),
        "source_uri": f"bids:raw:sub-01/ses-1/dwi/{stem}_dwi.nii.gz",
    }
    assert not out.exists()
    # no session; PET has no .bval/.bvec; another desc
    pet = bids.derivative_paths(root / "sub-03" / "pet" / "sub-03_trc-FDG_pet.nii.gz", out, "mc")
    assert pet["series"] == os.fspath(out / "sub-03" / "pet" / "sub-03_trc-FDG_desc-mc_pet.nii.gz")
    assert "bval" not in pet and "bvec" not in pet
    # every name parses back to the source's entities
    for key in ("series", "json", "motion", "xfm"):
        entities, _, _ = bids.parse_name(paths[key])
        assert {k: v for k, v in entities.items() if k != "desc"} == {
            "sub": "01",
            "ses": "1",
            "acq": "x",
        }
    with pytest.raises(InputError, match="not a BIDS data file name"):
        bids.derivative_paths(tmp_path / "series.nii.gz", out)


def test_dataset_description(tmp_path, dataset):
    out = tmp_path / "deriv"
    path = bids.write_dataset_description(
        out, {"model": "average", "passes": 2}, source_dir=dataset["root"]
    )
    with open(path) as f:
        description = json.load(f)
    assert description["DatasetType"] == "derivative"
    assert description["BIDSVersion"] == bids.BIDS_VERSION
    assert description["Name"]
    (generated,) = description["GeneratedBy"]
    assert generated["Name"] == "nidask" and generated["Version"] == nidask.__version__
    assert "model=average" in generated["Description"]
    assert description["DatasetLinks"]["raw"] == dataset["root"].as_uri()
    assert description["SourceDatasets"] == [{"URL": dataset["root"].as_uri()}]
    # idempotent: the same settings leave the file untouched
    os.utime(path, ns=(1, 1))
    before = os.stat(path).st_mtime_ns
    assert (
        bids.write_dataset_description(
            out, {"passes": 2, "model": "average"}, source_dir=dataset["root"]
        )
        == path
    )
    assert os.stat(path).st_mtime_ns == before
    # other settings replace a nidask description; no temporary is left behind
    bids.write_dataset_description(out, {"model": "gp"})
    with open(path) as f:
        assert "model=gp" in json.load(f)["GeneratedBy"][0]["Description"]
    assert sorted(os.listdir(out)) == ["dataset_description.json"]


def test_dataset_description_refuses_another_dataset(dataset, tmp_path):
    with pytest.raises(OutputError, match="not nidask's") as excinfo:
        bids.write_dataset_description(dataset["root"], {})
    assert excinfo.value.path.endswith("dataset_description.json")
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "dataset_description.json").write_text("{")
    with pytest.raises(OutputError, match="cannot read the existing description"):
        bids.write_dataset_description(broken, {})


def test_bold_series(dataset):
    root = dataset["root"]
    path = _series(root / "sub-04" / "func" / "sub-04_task-rest_run-1_bold.nii.gz", n=5)
    _json(root / "task-rest_bold.json", {"RepetitionTime": 2.0, "TaskName": "rest"})
    _json(root / "sub-04" / "func" / "sub-04_task-rest_run-1_bold.json", {"EchoTime": 0.03})
    assert bids.find_series(root, ["04"], modalities=("bold",)) == [path]
    assert bids.find_series(root) == bids.find_series(root, modalities=("dwi", "pet"))
    found = bids.find_sidecars(path)
    assert found == {"json_file": os.fspath(root / "task-rest_bold.json")}
    assert bids.sidecar_metadata(path) == {
        "RepetitionTime": 2.0,
        "TaskName": "rest",
        "EchoTime": 0.03,
    }
    with nidask.load(path, **found) as ds:
        assert type(ds).__name__ == "BOLD" and len(ds) == 5
    out = bids.derivative_paths(path, "/out")
    assert out["series"] == os.path.join(
        "/out", "sub-04", "func", "sub-04_task-rest_run-1_desc-hmc_bold.nii.gz"
    )
