"""Real files shipped by PyPI packages: real inputs.

The ``test`` extra installs every package used here, so a missing one is a failure,
not a skip:

- dipy's ``small_64D`` (NaN b-vector on its b=0), ``small_101D`` (b=15 as the b=0,
  55 b-values) and ``small_25`` (a 2-slice series);
- heudiconv's ``b0dwiForFmap`` Siemens DICOMs (b=5, b=5, b=1500), converted by the
  ``dcm2niix`` executable of the dcm2niix package;
- nibabel's ``example4d.nii.gz`` (a 4D series without gradients);
- nipype's real MCFLIRT trajectory ``fsl_mcflirt_movpar.txt``.
"""

from __future__ import annotations

import importlib
import os
import subprocess

import nibabel as nb
import numpy as np
import pytest

import nidask
from nidask.data import dmri
from nidask.errors import InputError
from nidask.validation import phantom


def package_file(package: str, *parts: str) -> str:
    """A file shipped inside an installed package; fails (never skips) when absent."""
    module = importlib.import_module(package)  # ImportError: the test extra is incomplete
    path = os.path.join(os.path.dirname(module.__file__), *parts)
    assert os.path.exists(path), f"{package} does not ship {'/'.join(parts)}"
    return path


def dipy_series(name: str, image: str) -> tuple[str, str, str]:
    files = ("data", "files")
    return (
        package_file("dipy", *files, image),
        package_file("dipy", *files, f"{name}.bvec"),
        package_file("dipy", *files, f"{name}.bval"),
    )


# -- dipy -----------------------------------------------------------------------------
def test_dipy_small_64d_nan_bvecs():
    image, bvec, bval = dipy_series("small_64D", "small_64D.nii")
    assert np.isnan(np.loadtxt(bvec)[0]).all()  # the file is as messy as we think
    with nidask.load(image, bvec_file=bvec, bval_file=bval) as dwi:
        assert isinstance(dwi, nidask.DWI)
        assert dwi.shape == (10, 10, 10, 64)
        assert dwi.b0_index.tolist() == [0]
        assert np.all(np.isfinite(dwi.gradients))
        np.testing.assert_allclose(np.linalg.norm(dwi.bvecs, axis=1), 1.0, atol=1e-6)
        assert dwi.bvals.min() > 980 and dwi.bvals.max() < 1010
        assert dwi.bzero is not None
        np.testing.assert_array_equal(
            np.asarray(dwi.dataobj[..., 5]), np.asarray(nb.load(image).dataobj[..., 6])
        )


@pytest.mark.parametrize(
    ("name", "image", "shape", "b0_index"),
    [
        ("small_101D", "small_101D.nii.gz", (6, 10, 10, 101), [0]),  # b=15 is a b=0
        ("small_25", "small_25.nii.gz", (10, 8, 2, 25), [0]),
    ],
)
def test_dipy_small_series(name, image, shape, b0_index):
    image, bvec, bval = dipy_series(name, image)
    with nidask.load(image, bvec_file=bvec, bval_file=bval) as dwi:
        assert dwi.shape == shape
        assert dwi.b0_index.tolist() == b0_index
        assert np.all(np.isfinite(dwi.gradients))
        assert float(np.asarray(dwi.bzero).mean()) > 0


def test_dipy_gradients_agree_with_dipy():
    from dipy.core.gradients import gradient_table
    from dipy.io import read_bvals_bvecs

    _, bvec, bval = dipy_series("small_64D", "small_64D.nii")
    bvals, bvecs = read_bvals_bvecs(bval, bvec)
    table = gradient_table(bvals, bvecs=bvecs, b0_threshold=50)
    ours = dmri.read_gradients(bvec, bval)
    np.testing.assert_array_equal(ours[:, 3] <= 50, table.b0s_mask)
    np.testing.assert_allclose(ours[~table.b0s_mask, :3], table.bvecs[~table.b0s_mask], atol=1e-6)


# -- heudiconv's DICOMs through dcm2niix ----------------------------------------------
@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """heudiconv's b0dwiForFmap series as dcm2niix writes it (dwi.nii/.bval/.bvec)."""
    dicoms = package_file("heudiconv", "tests", "data", "b0dwiForFmap")
    import dcm2niix

    out = tmp_path_factory.mktemp("dcm2niix")
    proc = subprocess.run(
        [dcm2niix.bin, "-o", str(out), "-f", "dwi", "-z", "n", dicoms],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    paths = {ext: os.fspath(out / f"dwi.{ext}") for ext in ("nii", "bval", "bvec")}
    assert all(os.path.exists(p) for p in paths.values()), sorted(os.listdir(out))
    return paths


def heudiconv_anatomy(directory, voxel_mm: float = 3.0):
    """Real anatomy (:func:`nidask.validation.phantom.real_anatomy`) from heudiconv's
    Siemens DWI: its two b=0 volumes and the b=1500 volume, on a ``voxel_mm`` grid."""
    import dcm2niix
    import nibabel as nb

    from nidask.validation import phantom

    dicoms = package_file("heudiconv", "tests", "data", "b0dwiForFmap")
    subprocess.run(
        [dcm2niix.bin, "-o", directory, "-f", "scan", dicoms],
        check=True,
        capture_output=True,
        timeout=120,
    )
    image = nb.load(os.path.join(directory, "scan.nii"))
    data = np.asarray(image.dataobj, dtype=np.float64)
    return phantom.real_anatomy(
        data[..., :2].mean(-1), data[..., 2], 1500.0, image.affine, voxel_mm
    )


def _dicom_gradient_direction(index: int) -> np.ndarray:
    """Siemens' DiffusionGradientDirection (0019,100e) of DICOM ``index``: LPS axes."""
    import pydicom

    dicoms = sorted(os.listdir(package_file("heudiconv", "tests", "data", "b0dwiForFmap")))
    folder = package_file("heudiconv", "tests", "data", "b0dwiForFmap")
    header = pydicom.dcmread(os.path.join(folder, dicoms[index]), stop_before_pixels=True)
    return np.array(header[0x0019, 0x100E].value, dtype=float)


def test_dicom_series_loads(converted):
    assert np.loadtxt(converted["bval"]).tolist() == [5, 5, 1500]
    assert np.loadtxt(converted["bvec"]).shape == (3, 3)  # N=3: the ambiguous case
    dwi = nidask.load(converted["nii"], bvec_file=converted["bvec"], bval_file=converted["bval"])
    with dwi:
        # b=5 volumes are b=0 volumes; a single diffusion-weighted volume still loads
        assert dwi.b0_index.tolist() == [0, 1]
        assert dwi.original_index.tolist() == [2]
        assert dwi.shape == (150, 152, 81, 1)
        # FSL's 3xN: the third column is the b=1500 direction, in the LAS image's voxel
        # frame; in RAS it is the scanner's own direction (DICOM's LPS, x and y negated)
        lps = _dicom_gradient_direction(2)
        np.testing.assert_allclose(dwi.bvecs[0], [-lps[0], -lps[1], lps[2]], atol=1e-5)
        assert np.linalg.det(dwi.affine) < 0 and abs(dwi.bvecs[0][0]) > 0.99
        assert dwi.bvals.tolist() == pytest.approx([1500.0], rel=1e-4)
        # it converts (b=0 volumes written back in file order)
        whole = dwi.whole_series()
        assert len(whole) == 3 and whole.gradients[:2].tolist() == [[0.0] * 4] * 2


def test_dicom_series_too_few_volumes_for_estimation(converted):
    dwi = nidask.load(converted["nii"], bvec_file=converted["bvec"], bval_file=converted["bval"])
    with dwi:
        with pytest.raises(
            InputError, match="needs at least 6 diffusion-weighted volumes, found 1"
        ):
            dmri.check_diffusion_volumes(dwi)
        # estimation refuses it before any work, naming the file, the model and the count
        for model, name in (("gp", "GPModel"), ("dti", "DTIModel"), ("average", "AverageModel")):
            with pytest.raises(InputError) as excinfo:
                nidask.Estimator(model=model, progress=False).run(dwi)
            message = str(excinfo.value)
            assert message.startswith(str(converted["nii"])), message
            assert f"{name} needs at least 6 diffusion-weighted volumes, found 1" in message


# -- nibabel and nipype ---------------------------------------------------------------
def test_nibabel_example4d_without_gradients():
    path = package_file("nibabel", "tests", "data", "example4d.nii.gz")
    image = nb.load(path)
    with nidask.load(path) as ds:
        assert type(ds) is nidask.BaseDataset
        assert ds.shape == (128, 96, 24, 2)
        np.testing.assert_allclose(ds.affine, image.affine)
        np.testing.assert_array_equal(np.asarray(ds.dataobj[..., 1]), image.dataobj[..., 1])


def test_nipype_mcflirt_trajectory():
    par = package_file("nipype", "testing", "data", "fsl_mcflirt_movpar.txt")
    motion = phantom.mcflirt_trajectory(par)
    assert motion.shape[1:] == (4, 4) and len(motion) == len(np.loadtxt(par))
    rotations = motion[:, :3, :3]
    identity = np.broadcast_to(np.eye(3), rotations.shape)
    np.testing.assert_allclose(rotations @ rotations.transpose(0, 2, 1), identity, atol=1e-9)
    assert 0 < np.abs(motion[:, :3, 3]).max() < 20  # mm: real head motion
