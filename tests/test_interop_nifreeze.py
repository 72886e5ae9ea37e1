"""NFDH5 interoperability with nifreeze 0.1.0, run in its own virtual environment.

nifreeze 0.1.0 needs numpy<2.4, so it lives in a separate venv made by
``benchmarks/setup_peer_env.sh`` (``.ci/run`` creates it).  These tests drive it
through ``benchmarks/peer_nifreeze.py``, which never imports nidask.  Without that
venv they are skipped locally; in CI (``CI=true``) a missing venv is a failure.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import numpy as np
import pytest

import nidask
from nidask.geometry import fsl_to_ras, ras_to_fsl
from nidask.validation.phantom import make_dwi, make_pet

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "peer_nifreeze.py"
CANDIDATES = [
    os.environ.get("NIDASK_PEER_VENV"),
    os.path.expanduser("~/.cache/nidask/nifreeze-venv"),
    "/work/venvs/nifreeze",
]


def peer_python() -> str | None:
    for venv in filter(None, CANDIDATES):
        python = Path(venv) / "bin" / "python"
        if python.exists():
            return str(python)
    return None


PEER = peer_python()
if PEER is None and os.environ.get("CI") != "true":
    pytestmark = pytest.mark.skip(reason="nifreeze peer venv not set up (setup_peer_env.sh)")


def run_peer(*args) -> dict:
    assert PEER is not None, "CI must provide the nifreeze peer venv (.ci/run makes it)"
    done = subprocess.run(
        [PEER, str(SCRIPT), *map(str, args), "--quiet"],
        capture_output=True,
        text=True,
        timeout=300,
        env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"},
    )
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def dwi(tmp_path_factory):
    directory = tmp_path_factory.mktemp("interop-dwi")
    phantom = make_dwi(directory, shape3d=(20, 22, 16), n_b0=2, n_directions=10, seed=4)
    motion = phantom.motion[2:]
    np.save(directory / "motion.npy", motion)
    return phantom, directory


def test_nifreeze_file_loads_in_nidask(dwi, tmp_path):
    phantom, directory = dwi
    h5 = tmp_path / "peer.h5"
    c = phantom.companions
    written = run_peer(
        "write_h5",
        "--nii",
        phantom.image,
        "--bvec",
        c["bvec_file"],
        "--bval",
        c["bval_file"],
        "--mask",
        c["brainmask_file"],
        "--matrices",
        directory / "motion.npy",
        "--h5",
        h5,
    )
    ds = nidask.load(h5)
    assert isinstance(ds, nidask.DWI)
    assert list(ds.shape) == written["shape"]
    assert float(ds.dataobj.sum(dtype=np.float64).compute()) == written["dataobj_sum"]
    # nifreeze keeps the .bvec numbers (FSL's voxel frame); nidask reads them as RAS
    peer = np.asarray(written["gradients"])
    np.testing.assert_allclose(ds.gradients[:, 3], peer[:, 3], atol=1e-6)
    np.testing.assert_allclose(ds.gradients[:, :3], fsl_to_ras(peer[:, :3], ds.affine), atol=1e-6)
    np.testing.assert_allclose(np.asarray(ds.bzero).sum(), written["bzero_sum"], rtol=1e-9)
    np.testing.assert_allclose(ds.motion_affines, np.asarray(written["motion_affines"]))
    assert int(ds.brainmask.sum()) == written["brainmask_sum"]
    # the same data as nidask reading the NIfTI directly
    direct = nidask.load(phantom.image, **c)
    np.testing.assert_array_equal(ds.dataobj.compute(), direct.dataobj.compute())


def test_nidask_file_loads_in_nifreeze(dwi, tmp_path):
    phantom, directory = dwi
    ds = nidask.load(phantom.image, **phantom.companions)
    for i, matrix in enumerate(np.load(directory / "motion.npy")):
        ds.set_transform(i, matrix)
    h5 = tmp_path / "nidask.h5"
    ds.to_filename(h5)
    summary = run_peer("read_h5", "--h5", h5)
    assert summary["class"] == "DWI"
    assert summary["shape"] == list(ds.shape)
    assert summary["dtype"] == str(ds.dtype)
    assert summary["dataobj_sum"] == float(ds.dataobj.sum(dtype=np.float64).compute())
    peer = np.asarray(summary["gradients"])
    np.testing.assert_allclose(peer[:, 3], ds.gradients[:, 3], atol=1e-9)
    np.testing.assert_allclose(peer[:, :3], ras_to_fsl(ds.gradients[:, :3], ds.affine), atol=1e-9)
    np.testing.assert_allclose(summary["bzero_sum"], float(ds.bzero.sum().compute()), rtol=1e-6)
    np.testing.assert_allclose(np.asarray(summary["motion_affines"]), ds.motion_affines)
    assert summary["brainmask_sum"] == int(ds.brainmask.sum())


def test_pet_files_cross_both_ways(tmp_path):
    phantom = make_pet(tmp_path, shape3d=(16, 18, 12), n_frames=6, seed=1)
    pet = nidask.load(phantom.image, **phantom.companions)
    ours = tmp_path / "nidask-pet.h5"
    pet.to_filename(ours)
    summary = run_peer("read_h5", "--h5", ours)
    assert summary["class"] == "PET" and summary["shape"] == list(pet.shape)
    np.testing.assert_allclose(summary["midframe"], pet.midframe)
    assert summary["total_duration"] == pytest.approx(pet.total_duration)
    theirs = tmp_path / "peer-pet.h5"
    run_peer(
        "write_h5",
        "--nii",
        phantom.image,
        "--temporal",
        phantom.companions["temporal_file"],
        "--h5",
        theirs,
    )
    loaded = nidask.load(theirs)
    assert isinstance(loaded, nidask.PET)
    np.testing.assert_allclose(loaded.midframe, pet.midframe)
    np.testing.assert_array_equal(loaded.dataobj.compute(), pet.dataobj.compute())
