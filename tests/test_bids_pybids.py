"""nidask's BIDS rules agree with pybids, the field's reference library, on the same trees.

The tree of ``tests/test_bids.py`` (inheritance from the top level and the subject
level, overrides, ignored folders, PET timing) plus the messy cases tested there:
another acquisition's and another subject's files beside the series, and a BOLD run
whose metadata merge from two levels.

One known departure: pybids' nearest ``.bval``/``.bvec`` (0.22) may be another
acquisition's file in the same folder (``sub-02_acq-y_dwi.bval`` for ``sub-02_dwi.nii``),
which BIDS' inheritance principle excludes (a sidecar's entities must be a subset of
the data file's).  There nidask takes the nearest of pybids' candidates that applies.
"""

from __future__ import annotations

import os

import numpy as np
import pytest

from nidask import bids
from test_bids import N, _json, _series, dataset  # noqa: F401  (the tree, as a fixture)

pytest.importorskip("bids.layout", reason="pybids is in the test extra")


def _pybids(root):
    from bids import BIDSLayout

    # validate=False: pybids' own validator would drop the deliberately odd files
    return BIDSLayout(os.fspath(root), validate=False, derivatives=False)


def _messy(root):
    folder = root / "sub-02" / "dwi"
    np.savetxt(folder / "sub-02_acq-y_dwi.bval", np.full((1, N), 5.0))
    np.savetxt(root / "sub-01_dwi.bvec", np.ones((3, N)))  # another subject's, at the top
    np.savetxt(folder / "sub-02_acq-y_dwi.bvec", np.ones((3, N)))
    _series(folder / "sub-02_acq-y_dwi.nii")
    bold = _series(root / "sub-04" / "func" / "sub-04_task-rest_run-1_bold.nii.gz", n=5)
    _json(root / "task-rest_bold.json", {"RepetitionTime": 2.0, "TaskName": "rest"})
    _json(root / "sub-04" / "func" / "sub-04_task-rest_run-1_bold.json", {"EchoTime": 0.03})
    return bold


def _applies(sidecar, data) -> bool:
    """BIDS' inheritance principle: the sidecar's entities are among the data file's."""
    entities, _, _ = bids.parse_name(sidecar)
    return entities.items() <= bids.parse_name(data)[0].items()


@pytest.mark.parametrize("messy", [False, True])
def test_sidecars_and_metadata_agree_with_pybids(dataset, messy):  # noqa: F811
    root = dataset["root"]
    if messy:
        _messy(root)
    layout = _pybids(root)
    series = bids.find_series(root, modalities=("dwi", "pet", "bold"))
    assert len(series) == (6 if messy else 4)
    departures = set()
    for path in series:
        ours = bids.find_sidecars(path)
        assert bids.sidecar_metadata(path) == layout.get_metadata(path), path
        if not path.endswith(("_dwi.nii", "_dwi.nii.gz")):
            continue
        for extension in (".bval", ".bvec"):
            candidates = layout.get_nearest(path, extension=extension, suffix="dwi", all_=True)
            applicable = [c for c in candidates if _applies(c, path)]
            assert ours[f"{extension[1:]}_file"] == applicable[0], path
            if candidates[0] != applicable[0]:
                departures.add(os.path.basename(path))
    assert departures == ({"sub-02_dwi.nii"} if messy else set())
    # pybids indexes the same data files (nidask leaves out sourcedata and derivatives)
    indexed = {
        f.path
        for f in layout.get(extension=[".nii", ".nii.gz"])
        if f.entities.get("suffix") in ("dwi", "pet", "bold")
    }
    assert set(series) == indexed
