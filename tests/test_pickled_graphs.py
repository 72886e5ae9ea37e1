"""Fast paths survive pickling: a dataset built in one process reads the same in another."""

from __future__ import annotations

import json
import pickle
import subprocess
import sys
import textwrap

import nibabel as nb
import numpy as np

import nidask
from conftest import record_reads
from nidask.io.sources import NiftiSource

CHILD = textwrap.dedent(
    """
    import json, pickle, sys
    from nidask.io.sources import NiftiSource
    reads = []
    original = NiftiSource.read
    def read(self, index):
        reads.append(index[3].indices(self.shape[3])[:2])
        return original(self, index)
    NiftiSource.read = read
    with open(sys.argv[1], "rb") as f:
        dataset = pickle.load(f)
    dataset.select([1, 5, 9]).dataobj.compute()
    selection_reads = list(reads)
    reads.clear()
    dataset.select([2, 3, 4]).to_nifti(sys.argv[2])
    print(json.dumps({"select": selection_reads, "export": reads}))
    """
)


def _reads_here(dataset, out, monkeypatch) -> dict:
    reads = record_reads(monkeypatch, NiftiSource)
    dataset.select([1, 5, 9]).dataobj.compute()
    selection_reads = [list(r) for r in reads]
    reads.clear()
    dataset.select([2, 3, 4]).to_nifti(out)
    return {"select": selection_reads, "export": [list(r) for r in reads]}


def test_selection_and_export_read_the_same_in_another_process(tmp_path, monkeypatch):
    data = np.random.default_rng(0).normal(size=(6, 7, 5, 12)).astype(np.float32)
    path = tmp_path / "series.nii"
    nb.Nifti1Image(data, np.eye(4)).to_filename(path)
    dataset = nidask.load(path)
    assert len(dataset.dataobj.chunks[3]) == 1  # one chunk: only a view reads less
    pickled = tmp_path / "dataset.pkl"
    pickled.write_bytes(pickle.dumps(dataset))

    result = subprocess.run(
        [sys.executable, "-c", CHILD, str(pickled), str(tmp_path / "there.nii")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    there = json.loads(result.stdout)
    here = _reads_here(dataset, tmp_path / "here.nii", monkeypatch)
    # each selected volume read on its own, not the whole chunk, in both processes
    assert here["select"] == [[1, 2], [5, 6], [9, 10]]
    assert there == here
    assert np.array_equal(
        np.asarray(nb.load(tmp_path / "there.nii").dataobj), data[..., 2:5]
    ) and np.array_equal(np.asarray(nb.load(tmp_path / "here.nii").dataobj), data[..., 2:5])
