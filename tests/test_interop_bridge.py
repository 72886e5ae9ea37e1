"""``nidask.interop.to_nifreeze``: nifreeze 0.1.0's own DWI over nidask's memmap.

Run in the nifreeze peer venv (which holds nifreeze, antspyx's antsRegistration and
this nidask; ``.ci/setup_test_tools.sh``): nifreeze's Estimator registers every volume
of the handed-over series, and what it reads equals what nifreeze's own ``from_nii``
gives on the same files.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import numpy as np
import pytest

import nidask
from nidask.interop.nifreeze import NifreezeMissingError, to_nifreeze
from nidask.validation.evaluation import motion_errors
from nidask.validation.phantom import make_dwi
from test_interop_nifreeze import PEER

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "peer_bridge.py"


def run_bridge(series, out: Path, via: str, *estimate) -> dict:
    assert PEER is not None, "the nifreeze peer venv is missing (.ci/setup_test_tools.sh)"
    companions = series.companions
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["PATH"] = f"{Path(PEER).parent}{os.pathsep}{env['PATH']}"  # antsRegistration
    done = subprocess.run(
        [PEER, str(SCRIPT), "--via", via, "--nii", series.image, "--out", out, *estimate]
        + ["--bvec", companions["bvec_file"], "--bval", companions["bval_file"]]
        + ["--mask", companions["brainmask_file"]],
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def series(tmp_path_factory):
    directory = tmp_path_factory.mktemp("bridge")
    return make_dwi(directory, shape3d=(32, 32, 24), n_b0=2, n_directions=12, seed=3)


def test_nifreeze_estimates_on_the_memmap_nidask_hands_over(series, tmp_path):
    bridged = run_bridge(series, tmp_path / "nidask", "nidask", "--estimate")
    own = run_bridge(series, tmp_path / "nifreeze", "nifreeze")
    # nifreeze's own class over nidask's file: no copy, read-only
    assert bridged["type"] == "nifreeze.data.dmri.base.DWI"
    assert bridged["memmap"] and not bridged["writeable"]
    assert bridged["filename"] == str(tmp_path / "nidask" / "series.npy")
    assert not own["memmap"]
    # what nifreeze reads is what its from_nii gives: volumes, table, b=0, mask, affine
    assert bridged["shape"] == own["shape"] == [32, 32, 24, 12]
    assert bridged["dataobj_sum"] == own["dataobj_sum"]
    assert bridged["bzero_sum"] == pytest.approx(own["bzero_sum"], rel=1e-6)
    assert bridged["mask_voxels"] == own["mask_voxels"]
    np.testing.assert_allclose(bridged["gradients"], own["gradients"], atol=1e-5)
    np.testing.assert_allclose(bridged["affine"], own["affine"])
    # and its Estimator ran unchanged: one matrix per volume, near the known motion
    # (nifreeze's ANTs samples at random, so runs differ: a generous bound)
    estimated = np.load(tmp_path / "nidask" / "motion.npy")
    with nidask.dmri.from_nii(series.image, **series.companions) as dwi:
        true = series.motion[dwi.original_index]
        errors = motion_errors(estimated, true, dwi.affine, dwi.shape3d)
    assert estimated.shape == (12, 4, 4) and np.isfinite(estimated).all()
    assert errors["translation_mm_median"] < 1.0, errors


def test_bridge_without_nifreeze_says_what_is_missing(series):
    try:
        import nifreeze  # noqa: F401
    except ImportError:
        pass
    else:
        pytest.skip("nifreeze is importable here; the peer test above covers the bridge")
    with nidask.dmri.from_nii(series.image, **series.companions) as dwi:
        with pytest.raises(NifreezeMissingError, match="needs nifreeze 0.1.0"):
            to_nifreeze(dwi)
