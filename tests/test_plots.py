"""Figures: motion over volumes and before/after mosaics (nidask.reporting.plots)."""

from __future__ import annotations

import sys

import dask
import numpy as np
import pytest

import nidask
from nidask.geometry import fov_center, framewise_displacement, rigid_matrix
from nidask.io import sources
from nidask.reporting import plots

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _lines(ax) -> dict:
    return {line.get_label(): line for line in ax.get_lines()}


def _motion(affine, shape3d, n=7):
    rng = np.random.default_rng(3)
    params = np.column_stack([rng.uniform(-2, 2, (n, 3)), np.radians(rng.uniform(-2, 2, (n, 3)))])
    centre = fov_center(affine, shape3d)
    return params, np.stack([rigid_matrix(p, center=centre) for p in params])


def test_plot_motion_draws_the_parameters(dwi_phantom, tmp_path):
    shape3d = (16, 18, 12)
    params, affines = _motion(dwi_phantom.affine, shape3d)
    target = tmp_path / "motion.png"
    figure = plots.plot_motion(affines, dwi_phantom.affine, shape3d, filename=target)
    assert len(figure.axes) == 3
    translations, rotations, fd = (_lines(ax) for ax in figure.axes)
    for k, name in enumerate(plots.TRANSLATION_LABELS):
        np.testing.assert_allclose(translations[name].get_ydata(), params[:, k], atol=1e-9)
        np.testing.assert_allclose(translations[name].get_xdata(), np.arange(7))
    for k, name in enumerate(plots.ROTATION_LABELS):
        np.testing.assert_allclose(
            rotations[name].get_ydata(), np.degrees(params[:, 3 + k]), atol=1e-9
        )
    expected_fd = framewise_displacement(affines, center=fov_center(dwi_phantom.affine, shape3d))
    np.testing.assert_allclose(fd["estimated"].get_ydata(), expected_fd)
    assert "mm" in figure.axes[0].get_ylabel() and "deg" in figure.axes[1].get_ylabel()
    assert target.read_bytes()[:8] == PNG_MAGIC
    assert not list(tmp_path.glob(".*"))  # written atomically: no temporary left


def test_plot_motion_with_truth_and_given_axes(dwi_phantom):
    shape3d = (16, 18, 12)
    _, affines = _motion(dwi_phantom.affine, shape3d)
    figure = plots._new_figure()
    axes = figure.subplots(3, 1)
    x = np.arange(10, 17)
    returned = plots.plot_motion(
        affines, dwi_phantom.affine, shape3d, true=affines, x=x, axes=axes, title="t"
    )
    assert returned is figure
    # 3 estimated + 3 dashed true + the zero line
    assert len(axes[0].get_lines()) == 7 and len(axes[2].get_lines()) == 2
    np.testing.assert_array_equal(axes[0].get_lines()[0].get_xdata(), x)
    with pytest.raises(nidask.InputError, match="three"):
        plots.plot_motion(affines, dwi_phantom.affine, shape3d, axes=axes[:2])
    with pytest.raises(nidask.InputError, match="entries"):
        plots.plot_motion(affines, dwi_phantom.affine, shape3d, x=[1, 2])


def test_plot_mosaic_reads_only_the_shown_volumes(dwi_phantom, tmp_path, monkeypatch):
    reads = []
    original = sources.NiftiSource.read

    def counting_read(self, index):
        reads.append(index[3])
        return original(self, index)

    monkeypatch.setattr(sources.NiftiSource, "read", counting_read)
    volume_bytes = 16 * 18 * 12 * 2
    with dask.config.set({"nidask.chunk-size": volume_bytes}):  # one volume per chunk
        dwi = nidask.load(dwi_phantom.image, **dwi_phantom.companions)
    assert len(dwi.dataobj.chunks[3]) == len(dwi)
    reads.clear()  # loading read the brain mask
    corrected = dwi.select(np.arange(len(dwi)))
    corrected.motion_affines = dwi_phantom.motion[dwi.original_index]
    shown = [1, 5]
    target = tmp_path / "mosaic.png"
    figure = plots.plot_mosaic(dwi, corrected, shown, filename=target)
    # the file volumes behind positions 1 and 5 (b=0 volumes come first), once per row
    file_volumes = sorted(s.start for s in reads)
    expected = sorted(2 * [int(dwi.original_index[i]) for i in shown])
    assert file_volumes == expected and all(s.stop - s.start == 1 for s in reads)
    assert len(figure.axes) == 4
    z = 12 // 2
    top, bottom = figure.axes[0], figure.axes[2]  # row-major: before[0], before[1], after[0]
    np.testing.assert_allclose(
        top.get_images()[0].get_array(), dwi.dataobj[:, :, z, 1].compute().T
    )
    resampled = corrected.select([1]).resampled(order=1).dataobj[:, :, z, 0].compute()
    np.testing.assert_allclose(bottom.get_images()[0].get_array(), resampled.T, rtol=1e-6)
    assert not np.allclose(resampled, dwi.dataobj[:, :, z, 1].compute())
    assert "volume 1" in top.get_title() and "file 3" in top.get_title()
    # one grey scale per volume, shared by its two rows
    assert top.get_images()[0].get_clim() == bottom.get_images()[0].get_clim()
    assert target.read_bytes()[:8] == PNG_MAGIC
    dwi.close()


def test_plot_mosaic_defaults_and_errors(pet_phantom):
    pet = nidask.load(pet_phantom.image, **pet_phantom.companions)
    figure = plots.plot_mosaic(pet, pet.resampled(), contour=False)
    assert len(figure.axes) == 2 * 4
    with pytest.raises(nidask.InputError, match="out of range"):
        plots.plot_mosaic(pet, pet, [0, 99])
    with pytest.raises(nidask.InputError, match="do not match"):
        plots.plot_mosaic(pet, pet.select([0, 1, 2]))
    pet.close()


def test_missing_matplotlib_is_a_clear_error(monkeypatch):
    for name in [m for m in sys.modules if m == "matplotlib" or m.startswith("matplotlib.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    with pytest.raises(plots.MissingDependencyError, match=r"nidask\[plot\]"):
        plots.plot_motion(np.tile(np.eye(4), (3, 1, 1)), np.eye(4), (4, 4, 4))
    assert issubclass(plots.MissingDependencyError, nidask.NidaskError)
