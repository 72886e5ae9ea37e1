"""The notebooks in ``notebooks/`` run top to bottom on generated data.

Each notebook is executed with nbclient in a kernel that runs *this* interpreter
(a kernelspec written on the fly into a temporary ``JUPYTER_PATH``, so no kernel
has to be installed on the machine) and imports the same ``nidask`` as the tests,
with a temporary directory as its working directory.
"""

from __future__ import annotations

import json
import os
import site
import sys
from pathlib import Path

import pytest

import nidask

nbclient = pytest.importorskip("nbclient")
nbformat = pytest.importorskip("nbformat")
pytest.importorskip("ipykernel")

NOTEBOOKS = Path(__file__).resolve().parents[1] / "notebooks"
KERNEL = "nidask-tests"

#: Text every notebook must print (beside running without errors).
EXPECTED = {
    "01_quickstart.ipynb": [
        "volumes: 14 | shape3d: (32, 32, 24)",
        "masked voxels x volumes:",
        "same data and metadata: True",
        "cache removed: True",
    ],
    "02_leave_one_out.ipynb": [
        "training volumes: 13",
        "same prediction both ways: True",
        "motion_affines: (14, 4, 4)",
        "median error:",
        "dwi_corrected.nii.gz",
    ],
    "03_distributed.ipynb": [
        "workers: 2",
        "shape: (32, 32, 24, 14)",
        "identical to the source: True",
        "median error:",
        "cluster closed",
    ],
}


def _pythonpath(current: str | None) -> str:
    """``PYTHONPATH`` for a child interpreter that imports the nidask imported here."""
    root = str(Path(nidask.__file__).resolve().parents[1])
    installed = {str(Path(p).resolve()) for p in site.getsitepackages()}
    parts = [] if root in installed else [root]
    return os.pathsep.join([*parts, *([current] if current else [])])


@pytest.fixture(scope="module")
def kernel_env(tmp_path_factory):
    """A kernelspec for the running interpreter, found through ``JUPYTER_PATH``."""
    root = tmp_path_factory.mktemp("jupyter")
    spec_dir = root / "kernels" / KERNEL
    spec_dir.mkdir(parents=True)
    # the kernel imports the nidask these tests import (the source tree or the install)
    pythonpath = _pythonpath(os.environ.get("PYTHONPATH"))
    spec = {
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "nidask tests",
        "language": "python",
        "env": {"PYTHONPATH": pythonpath},
    }
    (spec_dir / "kernel.json").write_text(json.dumps(spec))
    mp = pytest.MonkeyPatch()
    mp.setenv("JUPYTER_PATH", str(root))
    # a fresh machine may have no writable runtime dir for connection files
    mp.setenv("JUPYTER_RUNTIME_DIR", str(root / "runtime"))
    yield
    mp.undo()


def _text_outputs(cell) -> str:
    parts = []
    for output in cell.get("outputs", []):
        if output.get("output_type") == "stream":
            parts.append(output.get("text", ""))
        elif "data" in output:
            parts.append(output["data"].get("text/plain", ""))
    return "".join(parts)


def test_notebooks_are_stored_without_outputs():
    for path in sorted(NOTEBOOKS.glob("*.ipynb")):
        notebook = nbformat.read(path, as_version=4)
        for cell in notebook.cells:
            if cell.cell_type == "code":
                assert not cell.outputs, f"{path.name} is stored with outputs"
                assert cell.execution_count is None, f"{path.name} has execution counts"


def test_every_notebook_is_tested():
    assert sorted(p.name for p in NOTEBOOKS.glob("*.ipynb")) == sorted(EXPECTED)


@pytest.mark.timeout(300)
@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_notebook_runs(name, kernel_env, tmp_path):
    notebook = nbformat.read(NOTEBOOKS / name, as_version=4)
    client = nbclient.NotebookClient(
        notebook,
        kernel_name=KERNEL,
        timeout=240,
        resources={"metadata": {"path": str(tmp_path)}},
    )
    client.execute()  # raises CellExecutionError on the first failing cell
    for cell in notebook.cells:
        for output in cell.get("outputs", []):
            assert output.get("output_type") != "error", output
    text = "".join(_text_outputs(c) for c in notebook.cells if c.cell_type == "code")
    for expected in EXPECTED[name]:
        assert expected in text, f"{name}: {expected!r} not in the output:\n{text}"
    # everything the notebook wrote stayed in its working directory
    assert any(tmp_path.iterdir())
