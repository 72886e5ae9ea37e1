"""Figures people want to look at: motion over volumes, before/after mosaics.

matplotlib is an optional dependency (``pip install "nidask[plot]"``), imported
only when a function here is called.  Figures are built without pyplot (no global
state, safe in threads and on headless machines) on the Agg canvas; in a notebook
the returned :class:`~matplotlib.figure.Figure` displays itself.  With
``filename=...`` the figure is also written, atomically, as PNG (or any format
matplotlib knows from the extension).
"""

from __future__ import annotations

import os

import numpy as np

from nidask.errors import InputError, NidaskError
from nidask.geometry import HEAD_RADIUS_MM, motion_table

__all__ = ["MissingDependencyError", "plot_mosaic", "plot_motion", "save_figure"]

TRANSLATION_LABELS = ("x", "y", "z")
ROTATION_LABELS = ("pitch (x)", "roll (y)", "yaw (z)")


class MissingDependencyError(NidaskError, ImportError):
    """An optional dependency is not installed."""


def _matplotlib():
    try:
        import matplotlib
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as exc:
        raise MissingDependencyError(
            'plots need matplotlib: pip install "nidask[plot]" (or pip install matplotlib)'
        ) from exc
    return matplotlib, Figure, FigureCanvasAgg


def _new_figure(**kwargs):
    _, figure_class, canvas_class = _matplotlib()
    figure = figure_class(**kwargs)
    canvas_class(figure)
    return figure


def save_figure(figure, filename, dpi: int = 100) -> None:
    """Write ``figure`` to ``filename`` atomically (format from the extension)."""
    from nidask.io.cache import atomic_output

    _, _, canvas_class = _matplotlib()
    if not isinstance(figure.canvas, canvas_class):
        canvas_class(figure)
    filename = os.fspath(filename)
    fmt = os.path.splitext(filename)[1].lstrip(".").lower() or "png"
    with atomic_output(filename) as temp:
        figure.savefig(temp, format=fmt, dpi=dpi)


def plot_motion(
    affines,
    affine,
    shape3d,
    *,
    true=None,
    x=None,
    xlabel: str = "volume",
    title: str | None = None,
    axes=None,
    filename=None,
    radius: float = HEAD_RADIUS_MM,
):
    """Translations, rotations and framewise displacement over volumes (3 panels).

    Parameters
    ----------
    affines : array-like (N, 4, 4)
        Motion matrices (e.g. ``dataset.motion_affines``).
    affine : array-like (4, 4)
        Voxel-to-RAS affine of the grid (``dataset.affine``).
    shape3d : sequence of int
        Grid shape; parameters are about the centre of the field of view.
    true : array-like (N, 4, 4), optional
        Known motion in the same frame, drawn dashed (phantoms).
    x : array-like (N,), optional
        Positions on the horizontal axis (default ``0..N-1``; e.g.
        ``dataset.original_index`` or a PET ``midframe``).
    xlabel, title : str
        Axis label and figure title.
    axes : sequence of three matplotlib Axes, optional
        Draw into these (translations, rotations, FD) instead of a new figure.
    filename : path-like, optional
        Also write the figure there (PNG unless the extension says otherwise).
    radius : float
        Head radius (mm) turning rotations into framewise displacement.

    Returns
    -------
    matplotlib.figure.Figure
    """
    table = motion_table(affines, affine, shape3d, radius=radius)
    n = len(table)
    x = np.arange(n) if x is None else np.asarray(x)
    if x.shape != (n,):
        raise InputError(f"x must have {n} entries, got shape {x.shape}")
    true_table = None
    if true is not None:
        true_table = motion_table(true, affine, shape3d, radius=radius)
        if len(true_table) != n:
            raise InputError(f"true motion has {len(true_table)} matrices, expected {n}")
    if axes is None:
        figure = _new_figure(figsize=(8, 7), layout="constrained")
        axes = figure.subplots(3, 1, sharex=True)
    else:
        axes = list(axes)
        if len(axes) != 3:
            raise InputError(f"plot_motion draws three panels, got {len(axes)} axes")
        figure = axes[0].figure
    colors = ("tab:red", "tab:green", "tab:blue")
    panels = (
        (axes[0], slice(0, 3), TRANSLATION_LABELS, "translation (mm)"),
        (axes[1], slice(3, 6), ROTATION_LABELS, "rotation (deg)"),
    )
    for ax, columns, labels, ylabel in panels:
        values = table[:, columns]
        for k in range(3):
            ax.plot(x, values[:, k], color=colors[k], marker=".", label=labels[k])
            if true_table is not None:
                ax.plot(x, true_table[:, columns][:, k], color=colors[k], ls="--", lw=1)
        ax.axhline(0, color="0.6", lw=0.5)
        ax.set_ylabel(ylabel)
        ax.legend(loc="upper right", fontsize="small", ncols=3)
    axes[2].plot(x, table[:, 6], color="k", marker=".", label="estimated")
    if true_table is not None:
        axes[2].plot(x, true_table[:, 6], color="k", ls="--", lw=1, label="true")
        axes[2].legend(loc="upper right", fontsize="small")
    axes[2].set_ylabel("framewise\ndisplacement (mm)")
    axes[2].set_xlabel(xlabel)
    if title:
        figure.suptitle(title)
    if filename is not None:
        save_figure(figure, filename)
    return figure


def plot_series_motion(whole, *, true=None, title: str | None = None, filename=None):
    """:func:`plot_motion` of a whole series (every volume of the file, in file order).

    ``whole`` is a dataset's :meth:`~nidask.BaseDataset.whole_series` with motion;
    ``true`` its known motion (dashed).
    """
    return plot_motion(
        whole.motion_affines,
        whole.affine,
        whole.shape3d,
        true=true,
        x=whole.original_index,
        xlabel="volume (index in the file)",
        title=title,
        filename=filename,
    )


def _positions(volumes, n: int) -> np.ndarray:
    if volumes is None:
        count = min(4, n)
        return np.unique(np.linspace(0, n - 1, count).round().astype(int))
    positions = np.atleast_1d(np.asarray(volumes))
    if positions.dtype.kind not in "iu" or positions.ndim != 1 or positions.size == 0:
        raise InputError(f"volumes must be a non-empty list of indices, got {volumes!r}")
    if positions.min() < -n or positions.max() >= n:
        raise InputError(f"volume index out of range for {n} volumes: {positions.tolist()}")
    return positions % n


def _slices(dataset, positions: np.ndarray, z: int) -> np.ndarray:
    """Axial slice ``z`` of the volumes at ``positions`` as (X, Y, len(positions)).

    A dataset with motion matrices is resampled first, for the chosen volumes
    only.  The volumes are read chunk by chunk (one chunk of the source in
    memory at a time), never the whole series.
    """
    if dataset.motion_affines is not None:
        # only the shown volumes are resampled (and read)
        selected = dataset.select(positions).resampled(order=1)
        return np.asarray(selected.dataobj[:, :, z, :].compute(), dtype=np.float32)
    from nidask.data.base import take_volumes

    out = np.empty((*dataset.shape3d[:2], len(positions)), dtype=np.float32)
    bounds = np.cumsum((0, *dataset.dataobj.chunks[3]))
    block_of = np.searchsorted(bounds, positions, side="right") - 1
    for block in np.unique(block_of):
        members = np.flatnonzero(block_of == block)
        data = take_volumes(dataset.dataobj, positions[members])[:, :, z, :].compute()
        out[..., members] = np.asarray(data, dtype=np.float32)
    return out


def _upper(values: np.ndarray) -> float:
    finite = values[np.isfinite(values)]
    top = float(np.percentile(finite, 99.5)) if finite.size else 1.0
    return top if top > 0 else 1.0


def plot_mosaic(
    before,
    after,
    volumes=None,
    *,
    slice_index: int | None = None,
    labels=("before", "after"),
    contour: bool = True,
    title: str | None = None,
    filename=None,
):
    """Before/after mosaic: the middle axial slice of a few volumes, two rows.

    Parameters
    ----------
    before : BaseDataset
        The series as acquired (e.g. the dataset given to the estimator).
    after : BaseDataset
        The corrected series: either a dataset with ``motion_affines`` (the
        estimator's result; only the shown volumes are resampled) or an already
        resampled one (``dataset.resampled()``).
    volumes : sequence of int, optional
        Positions to show (default: four spread over the series).
    slice_index : int, optional
        Axial slice (default: the middle one).
    labels : pair of str
        Row titles.
    contour : bool
        Outline the brain mask (reference frame) on every panel when the dataset
        has one, so misalignment shows against a fixed edge.
    title : str, optional
        Figure title.
    filename : path-like, optional
        Also write the figure there.

    Returns
    -------
    matplotlib.figure.Figure
    """
    if len(before) != len(after) or tuple(before.shape3d) != tuple(after.shape3d):
        raise InputError(f"before {before.shape} and after {after.shape} datasets do not match")
    positions = _positions(volumes, len(before))
    depth = before.shape3d[2]
    z = depth // 2 if slice_index is None else int(slice_index)
    if not 0 <= z < depth:
        raise InputError(f"slice index {z} out of range for {depth} slices")
    rows = [_slices(before, positions, z), _slices(after, positions, z)]
    # one grey scale per volume (shared by its two rows): PET frames differ in level
    vmax = [_upper(np.stack([rows[0][..., c], rows[1][..., c]])) for c in range(len(positions))]
    mask = before.brainmask if contour else None
    figure = _new_figure(figsize=(2.2 * len(positions) + 0.8, 4.8), layout="constrained")
    axes = np.atleast_2d(figure.subplots(2, len(positions), squeeze=False))
    original = getattr(before, "original_index", None)
    for r, (row, label) in enumerate(zip(rows, labels, strict=True)):
        for c, position in enumerate(positions):
            ax = axes[r, c]
            # voxel x to the right, y up (anterior up for RAS-like affines)
            ax.imshow(row[..., c].T, cmap="gray", origin="lower", vmin=0, vmax=vmax[c])
            if mask is not None:
                ax.contour(mask[:, :, z].T, levels=[0.5], colors="tab:orange", linewidths=0.8)
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                name = f"volume {position}"
                if original is not None and original[position] != position:
                    name += f" (file {original[position]})"
                ax.set_title(name, fontsize="small")
            if c == 0:
                ax.set_ylabel(label)
    if title:
        figure.suptitle(title)
    if filename is not None:
        save_figure(figure, filename)
    return figure
