"""``nidask estimate BIDS_DIR OUT_DIR participant`` on a BIDS tree of real and phantom series."""

from __future__ import annotations

import fnmatch
import json
import re
import shutil
from pathlib import Path

import nibabel as nb
import numpy as np
import pytest

from bids_tools import derivative_name_rules, describe, issue_files, validate
from nidask.validation import phantom
from test_cli import nidask_cli

NIBABEL_DATA = Path(nb.__file__).parent / "tests" / "data"


def _mcflirt_file() -> Path:
    import nipype

    return Path(nipype.__file__).parent / "testing" / "data" / "fsl_mcflirt_movpar.txt"


def _dipy_file(name: str) -> Path:
    import dipy

    return Path(dipy.__file__).parent / "data" / "files" / name


def build_bids(root: Path, scratch: Path) -> Path:
    """sub-01: a multi-shell DWI phantom and a BOLD run of real anatomy (real trajectory);
    sub-02: dipy's real small_64D crop (too small a field of view to estimate)."""
    root.mkdir()
    (root / "dataset_description.json").write_text(
        json.dumps({"Name": "test", "BIDSVersion": "1.10.0"})
    )
    dwi = root / "sub-01" / "dwi"
    dwi.mkdir(parents=True)
    truth = phantom.make_hcp_like(
        scratch, shape3d=(28, 32, 24), zooms=(3.5,) * 3, n_per_shell=12, n_b0=4,
        bvalues=(1000.0, 2000.0),
    )  # fmt: skip
    image = nb.load(truth.image)
    nb.save(image, dwi / "sub-01_dwi.nii.gz")
    shutil.copy(truth.companions["bval_file"], dwi / "sub-01_dwi.bval")
    shutil.copy(truth.companions["bvec_file"], dwi / "sub-01_dwi.bvec")
    (dwi / "sub-01_dwi.json").write_text(json.dumps({"PhaseEncodingDirection": "j-"}))
    # the brain mask from a derivative dataset, found by name
    masks = root / "derivatives" / "masks" / "sub-01" / "dwi"
    masks.mkdir(parents=True)
    shutil.copy(truth.companions["brainmask_file"], masks / "sub-01_desc-brain_mask.nii")

    func = root / "sub-01" / "func"
    func.mkdir(parents=True)
    epi = nb.load(NIBABEL_DATA / "example4d.nii.gz")
    volume = np.asarray(epi.dataobj[..., 0], dtype=np.float64)
    centre = phantom.fov_center(epi.affine, volume.shape)
    motion = phantom.mcflirt_trajectory(_mcflirt_file(), n=6, scale=3.0, centre=centre)
    moved = phantom.make_moved_series(scratch, volume, epi.affine, motion, name="bold")
    bold = nb.load(moved.image)
    bold.header.set_zooms((*bold.header.get_zooms()[:3], 2.0))  # the header's TR agrees
    bold.header.set_xyzt_units("mm", "sec")
    nb.save(bold, func / "sub-01_task-rest_bold.nii")
    # RepetitionTime inherited from the top-level task sidecar
    (root / "task-rest_bold.json").write_text(
        json.dumps({"RepetitionTime": 2.0, "TaskName": "rest"})
    )

    dwi2 = root / "sub-02" / "dwi"
    dwi2.mkdir(parents=True)
    for ext in ("nii", "bval"):
        shutil.copy(_dipy_file(f"small_64D.{ext}"), dwi2 / f"sub-02_dwi.{ext}")
    # dipy's table is one row per volume with NaN for the b=0; BIDS wants three rows of
    # numbers (nidask reads both: tests/test_real_data.py)
    bvecs = np.nan_to_num(np.loadtxt(_dipy_file("small_64D.bvec")).T)
    np.savetxt(dwi2 / "sub-02_dwi.bvec", bvecs, fmt="%.6f")
    return root


@pytest.fixture(scope="module")
def participant_run(tmp_path_factory):
    """The raw dataset, its files' times, the derivatives and the run's result."""
    tmp_path = tmp_path_factory.mktemp("participants")
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    raw = build_bids(tmp_path / "raw", scratch)
    before = {p: p.stat().st_mtime_ns for p in raw.rglob("*") if p.is_file()}
    out = tmp_path / "derivatives"
    result = nidask_cli(
        "estimate", raw, out, "participant", "--passes", "2", "--quiet", timeout=600
    )
    return raw, before, out, result


def test_estimate_bids_dataset_participant_level(participant_run):
    raw, before, out, result = participant_run
    # sub-02 cannot be estimated; it is reported and the other series are finished
    assert result.returncode == 1, result.stderr
    text = result.stdout
    assert re.search(r"sub-02/dwi/sub-02_dwi.nii\s+failed", text), text
    assert "field of view too small" in text
    assert re.search(r"sub-01/dwi/sub-01_dwi.nii.gz\s+done\s+28", text), text
    assert re.search(r"sub-01/func/sub-01_task-rest_bold.nii\s+done\s+6", text), text

    description = json.loads((out / "dataset_description.json").read_text())
    assert description["DatasetType"] == "derivative"
    assert description["GeneratedBy"][0]["Name"] == "nidask"
    assert "BIDSVersion" in description
    dwi = out / "sub-01" / "dwi"
    names = sorted(p.name for p in dwi.iterdir())
    assert names == [
        "sub-01_desc-hmc_dwi.bval",
        "sub-01_desc-hmc_dwi.bvec",
        "sub-01_desc-hmc_dwi.json",
        "sub-01_desc-hmc_dwi.nii.gz",
        "sub-01_desc-hmc_report.html",
        "sub-01_desc-hmc_xfm.x5",
        "sub-01_desc-motion_timeseries.tsv",
    ]
    assert nb.load(dwi / "sub-01_desc-hmc_dwi.nii.gz").shape[3] == 28  # b=0 volumes included
    sidecar = json.loads((dwi / "sub-01_desc-hmc_dwi.json").read_text())
    assert sidecar["Sources"] == ["bids:raw:sub-01/dwi/sub-01_dwi.nii.gz"]
    assert sidecar["PhaseEncodingDirection"] == "j-"  # raw metadata carried over
    table = (dwi / "sub-01_desc-motion_timeseries.tsv").read_text().splitlines()
    assert len(table) == 1 + 28 and table[0].startswith("volume\ttx_mm")
    bold = out / "sub-01" / "func"
    assert (
        json.loads((bold / "sub-01_task-rest_desc-hmc_bold.json").read_text())["RepetitionTime"]
        == 2.0
    )
    assert not (out / "sub-02").exists() or not any((out / "sub-02").rglob("*.nii.gz"))
    # raw data untouched; no work directory of a finished series left behind
    assert before == {p: p.stat().st_mtime_ns for p in raw.rglob("*") if p.is_file()}
    assert not any((out / ".nidask-work").glob("sub-01*"))

    # a second run (sub-01 only) skips the finished series
    again = nidask_cli("estimate", raw, out, "participant", "--participant-label", "01", "--quiet")
    assert again.returncode == 0, again.stderr
    assert len(re.findall(r"^sub-01\S+\s+skipped", again.stdout, re.M)) == 2, again.stdout


def test_bids_mode_refuses_bad_calls(tmp_path):
    raw = tmp_path / "raw"
    raw.mkdir()
    result = nidask_cli("estimate", raw, tmp_path / "out", "participant")
    assert result.returncode != 0 and "dataset_description.json" in result.stderr
    (raw / "dataset_description.json").write_text(json.dumps({"Name": "x", "BIDSVersion": "1"}))
    result = nidask_cli("estimate", raw, tmp_path / "out", "participant", "--bvec", "x.bvec")
    assert result.returncode != 0 and "--bvec not accepted" in result.stderr
    result = nidask_cli("estimate", raw, tmp_path / "out")
    assert result.returncode != 0 and "BIDS_DIR OUT_DIR participant" in result.stderr
    assert not (tmp_path / "out").exists()


def test_the_bids_validator_accepts_the_raw_dataset(tmp_path):
    raw = build_bids(tmp_path / "raw", tmp_path)
    issues = validate(raw)
    assert issues["errors"] == [], describe(issues["errors"])


def test_the_bids_validator_accepts_the_derivatives(participant_run):
    _, _, out, _ = participant_run
    issues = validate(out)
    # the npm validator has no rules for derivative file names (desc-, ...): it calls
    # those "not included"; each must then be a name the BIDS schema's derivative rules
    # accept, and nothing else may be wrong (dataset_description.json, headers, ...)
    unknown = [i for i in issues["errors"] if i["key"] != "NOT_INCLUDED"]
    unknown = [i for i in unknown if i["key"] != "NO_VALID_DATA_FOUND_FOR_SUBJECT"]
    assert unknown == [], describe(unknown)
    rules = derivative_name_rules()
    not_included = [
        f for i in issues["errors"] for f in issue_files(i) if i["key"] == "NOT_INCLUDED"
    ]
    assert not_included, "the validator saw no derivative file: is .bidsignore hiding them?"
    assert [f for f in not_included if not any(r.fullmatch(f) for r in rules)] == []
    # what BIDS does not name yet is declared, not hidden by accident
    ignored = (out / ".bidsignore").read_text().split()
    written = [p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()]
    written = [f for f in written if not f.startswith(".")]
    outside_bids = {f for f in written if not any(r.fullmatch(f) for r in rules)}
    declared = {f for f in written if any(fnmatch.fnmatch(Path(f).name, p) for p in ignored)}
    assert outside_bids - {"dataset_description.json"} == declared
    assert set(not_included) == set(written) - declared - {"dataset_description.json"}


def _small_dataset(root: Path, scratch: Path, subjects=("01", "02", "03")) -> Path:
    root.mkdir()
    (root / "dataset_description.json").write_text(
        json.dumps({"Name": "small", "BIDSVersion": "1.10.0"})
    )
    for number, label in enumerate(subjects):
        (scratch / label).mkdir()
        truth = phantom.make_dwi(
            scratch / label, shape3d=(26, 26, 20), n_b0=1, n_directions=8, seed=number
        )
        folder = root / f"sub-{label}" / "dwi"
        folder.mkdir(parents=True)
        shutil.copy(truth.image, folder / f"sub-{label}_dwi.nii")
        for kind in ("bval", "bvec"):
            shutil.copy(truth.companions[f"{kind}_file"], folder / f"sub-{label}_dwi.{kind}")
    return root


def test_a_dataset_run_estimates_its_series_together(tmp_path, local_cluster):
    from nidask import Estimator
    from nidask.bids.participants import run_participants, series_at_once

    scratch = tmp_path / "scratch"
    scratch.mkdir()
    raw = _small_dataset(tmp_path / "raw", scratch)
    # a series that fails (no gradients) among them: the others finish
    broken = raw / "sub-03" / "dwi" / "sub-03_dwi.bvec"
    broken.write_text("not numbers\n")
    assert series_at_once(local_cluster) == 2  # one per worker of the 2-worker cluster
    results = run_participants(
        raw, tmp_path / "out", Estimator, client=local_cluster, say=lambda line: None
    )
    assert [r.status for r in results] == ["done", "done", "failed"]
    assert "sub-03_dwi.bvec" in results[2].message
    first, second = results[0], results[1]
    # both were in flight at once: each started before the other ended
    assert max(first.started, second.started) < min(first.ended, second.ended)
    for label in ("01", "02"):
        assert (
            tmp_path / "out" / f"sub-{label}" / "dwi" / f"sub-{label}_desc-hmc_dwi.json"
        ).exists()
    # one at a time when asked: the second starts after the first ends
    serial = run_participants(
        raw,
        tmp_path / "serial",
        Estimator,
        client=local_cluster,
        concurrent=1,
        say=lambda line: None,
    )
    assert serial[1].started >= serial[0].ended
