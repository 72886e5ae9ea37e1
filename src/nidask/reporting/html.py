"""The QC page of an estimation run: one self-contained ``report.html`` to read.

:func:`report_html` builds the page of one series and :func:`write_report_html`
writes it; :func:`write_index_html` writes a page linking the pages of several
series (a BIDS run).  A page holds everything it shows: figures are inline PNG
(``data:`` URIs), the style sheet is inline and nothing is fetched from the
network, so the file can be mailed, archived or opened offline.  Every text taken
from the data (names, flags, settings) is HTML-escaped.

Sections: summary, head motion (parameters and framewise displacement), the
before/after mosaic of the volumes that moved most, eddy-current coefficients,
outlier slices, signal quality (per-shell CNR, b=0 SNR of a DWI), flags and the
settings.  Figures need matplotlib (``pip install "nidask[plot]"``); without it the
page is written with its tables and says what it left out.  Only the volumes
shown (and a DWI's b=0 volumes, for their SNR) are read.
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
import os
from collections.abc import Iterable

import numpy as np

from nidask.geometry import HEAD_RADIUS_MM, motion_table
from nidask.io.cache import atomic_output

__all__ = [
    "FLAG_MEANINGS",
    "SECTIONS",
    "b0_snr",
    "figures_available",
    "report_html",
    "write_index_html",
    "write_report_html",
]

#: What each flag of an estimator report means.
FLAG_MEANINGS = {
    "implausible": "motion beyond the plausible bound",
    "poor_fit": "registered poorly to its prediction",
    "unconverged": "registration did not converge",
    "small_fov": "field of view small for motion estimation",
    "inconsistent": "the leave-one-out estimate moved over 0.5 mm from the b=0 anchor",
}

#: ``id`` and title of every section of a series page, in page order.
SECTIONS = {
    "summary": "Summary",
    "motion": "Head motion",
    "mosaic": "Before and after correction",
    "eddy": "Eddy currents",
    "outliers": "Outlier slices",
    "quality": "Signal quality",
    "flags": "Flags",
    "settings": "Settings",
}

STYLE = """
body { font-family: sans-serif; margin: 0 auto; max-width: 70em; padding: 0 1em 2em;
  color: #222; line-height: 1.4; }
header { border-bottom: 2px solid #456; margin-bottom: 1em; }
nav a { margin-right: 1em; }
h1 { font-size: 1.6em; } h2 { border-bottom: 1px solid #ccc; margin-top: 1.6em; }
table { border-collapse: collapse; margin: 0.5em 0; }
th, td { border: 1px solid #ccc; padding: 0.15em 0.6em; text-align: left; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
th { background: #eef; }
img { max-width: 100%; height: auto; display: block; margin: 0.5em 0; }
.note { color: #555; font-style: italic; }
.warn { color: #a40; font-weight: bold; }
.status-failed { color: #a00; font-weight: bold; }
details { margin: 0.5em 0; } summary { cursor: pointer; }
"""


def _e(value) -> str:
    """``value`` as escaped HTML text (quotes included: safe in attributes too)."""
    return html.escape(str(value), quote=True)


def _num(value, digits: int = 3) -> str:
    if value is None:
        return "n/a"
    try:
        value = float(value)
    except (TypeError, ValueError):
        return _e(value)
    return "n/a" if not math.isfinite(value) else f"{value:.{digits}f}"


def _table(header: Iterable | None, rows: Iterable[Iterable], numeric=()) -> str:
    """An HTML table; cells are escaped, columns in ``numeric`` right-aligned."""
    head = "" if header is None else "".join(f"<th>{_e(h)}</th>" for h in header)
    head = f"<thead><tr>{head}</tr></thead>" if head else ""
    body = []
    for row in rows:
        cells = []
        for k, cell in enumerate(row):
            css = ' class="num"' if k in numeric else ""
            cells.append(f"<td{css}>{_e(cell)}</td>")
        body.append(f"<tr>{''.join(cells)}</tr>")
    return f"<table>{head}<tbody>{''.join(body)}</tbody></table>"


def _note(text: str, css: str = "note") -> str:
    return f'<p class="{css}">{_e(text)}</p>'


# -- figures ------------------------------------------------------------------------------
def figures_available() -> bool:
    """Whether matplotlib, which draws the page's figures, can be imported."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


def _figure(**kwargs):
    """A matplotlib Figure on the Agg canvas (no pyplot state)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(**kwargs)
    FigureCanvasAgg(figure)
    return figure


def _img(figure, alt: str, dpi: int = 80) -> str:
    """``figure`` as an ``<img>`` holding its PNG as a ``data:`` URI."""
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=dpi)
    data = base64.b64encode(buffer.getvalue()).decode("ascii")
    return f'<img src="data:image/png;base64,{data}" alt="{_e(alt)}">'


# -- measures -----------------------------------------------------------------------------
def _foreground(image: np.ndarray) -> np.ndarray:
    """Voxels above a fifth of the 99th percentile: a head mask when there is none."""
    finite = image[np.isfinite(image)]
    top = float(np.percentile(finite, 99)) if finite.size else 0.0
    return np.isfinite(image) & (image > 0.2 * top)


def _mean_and_std(series) -> tuple[np.ndarray, np.ndarray]:
    """Voxel-wise mean and standard deviation (``ddof=1``) over the volumes of a 4D
    dask array, one block of volumes at a time (a reduction tree would hold a partial
    volume per block at once)."""
    total = np.zeros(series.shape[:3])
    squares = np.zeros(series.shape[:3])
    for k in range(series.numblocks[3]):  # a block of whole volumes: the chunk budget
        block = series.blocks[:, :, :, k].compute()
        for i in range(block.shape[3]):
            volume = block[..., i].astype(np.float64)
            total += volume
            squares += volume * volume
    n = series.shape[3]
    mean = np.divide(total, n, out=total)
    variance = np.subtract(squares, n * mean * mean, out=squares)
    np.maximum(variance, 0.0, out=variance)
    return mean.astype(np.float32), np.sqrt(variance / (n - 1)).astype(np.float32)


def b0_snr(dwi) -> dict | None:
    """SNR of a DWI's b=0 volumes, as acquired (before correction).

    With two or more b=0 volumes, the temporal SNR: each voxel's mean over the b=0
    volumes divided by its standard deviation, the median over the brain mask.  With
    one, the mean signal in the brain mask divided by the standard deviation of the
    background (outside the mask).  Without a brain mask, voxels above a fifth of
    the 99th percentile of the signal stand for it.  Only the b=0 volumes are read.

    Parameters
    ----------
    dwi : nidask.DWI
        The series as opened (its ``b0s``, or its ``bzero`` reference without them).

    Returns
    -------
    dict or None
        ``kind`` (``temporal`` or ``background``), ``value`` (NaN when undefined,
        e.g. a noiseless background), ``volumes`` (b=0 volumes used) and ``mask``
        (``brain mask`` or ``intensity threshold``); ``None`` without any b=0 volume.
    """
    import dask.array as da

    b0s = getattr(dwi, "b0s", None)
    if b0s is not None and b0s.shape[3] == 0:
        b0s = None
    if b0s is None:
        bzero = getattr(dwi, "bzero", None)
        if bzero is None:
            return None
        b0s = da.asarray(bzero)[..., np.newaxis]
    n = b0s.shape[3]
    mask = dwi.brainmask
    if n >= 2:
        mean, std = _mean_and_std(b0s)
        inside = mask if mask is not None else _foreground(mean)
        with np.errstate(divide="ignore", invalid="ignore"):
            ratio = mean[inside] / std[inside]
        ratio = ratio[np.isfinite(ratio)]
        value = float(np.median(ratio)) if ratio.size else math.nan
        kind = "temporal"
    else:
        image = np.asarray(b0s[..., 0].compute(), dtype=np.float32)
        inside = mask if mask is not None else _foreground(image)
        background = image[~inside & np.isfinite(image)]
        spread = float(background.std()) if background.size else 0.0
        signal = float(image[inside].mean()) if inside.any() else math.nan
        value = signal / spread if spread > 0 else math.nan
        kind = "background"
    source = "brain mask" if mask is not None else "intensity threshold"
    return {"kind": kind, "value": value, "volumes": int(n), "mask": source}


def _worst_volumes(table: np.ndarray) -> list[int]:
    """Positions of the largest framewise displacement and the largest displacement."""
    size = np.linalg.norm(table[:, :3], axis=1)
    size = size + HEAD_RADIUS_MM * np.radians(np.linalg.norm(table[:, 3:6], axis=1))
    return sorted({int(np.argmax(table[:, 6])), int(np.argmax(size))})


# -- sections -----------------------------------------------------------------------------
def _section(key: str, body: str) -> str:
    return f'<section id="{key}"><h2>{_e(SECTIONS[key])}</h2>\n{body}\n</section>'


def _summary(raw, whole, table, report, title) -> str:
    zooms = np.linalg.norm(np.asarray(whole.affine)[:3, :3], axis=0)
    volumes = (report or {}).get("volumes", [])
    flagged = sum(1 for v in volumes if v.get("flags"))
    worst = int(np.argmax(table[:, 6]))
    rows = [
        ("series", title or "n/a"),
        ("modality", type(raw).__name__),
        ("grid", " x ".join(str(s) for s in whole.shape3d)),
        ("voxel size (mm)", " x ".join(f"{z:.2f}" for z in zooms)),
        ("volumes", len(whole)),
        ("passes run", len((report or {}).get("passes", [])) or "n/a"),
        ("mean framewise displacement (mm)", _num(np.mean(table[:, 6]))),
        (
            "largest framewise displacement (mm)",
            f"{_num(table[worst, 6])} (volume {int(whole.original_index[worst])})",
        ),
        ("largest translation (mm)", _num(np.abs(table[:, :3]).max())),
        ("largest rotation (deg)", _num(np.abs(table[:, 3:6]).max())),
        ("volumes flagged", flagged),
    ]
    return _section("summary", _table(None, rows))


def _motion(whole, table, report, figures: bool, true=None) -> str:
    from nidask.reporting.plots import plot_series_motion

    parts = [
        _note(
            "Translations of the centre of the field of view (mm), rotations (degrees) "
            "and the framewise displacement (rotations counted at "
            f"{HEAD_RADIUS_MM:g} mm), per volume in file order."
        )
    ]
    if figures:
        figure = plot_series_motion(
            whole, true=true, title="dashed: true motion" if true is not None else None
        )
        parts.append(_img(figure, "motion parameters and framewise displacement"))
    quality = {v["index"]: v for v in (report or {}).get("volumes", [])}
    rows = []
    for index, row in zip(whole.original_index, table, strict=True):
        entry = quality.get(int(index), {})
        rows.append(
            (
                int(index),
                *(f"{v:.3f}" for v in row),
                _num(entry.get("similarity"), 4),
                ", ".join(entry.get("flags", [])),
            )
        )
    header = ("volume", "tx mm", "ty mm", "tz mm", "rx deg", "ry deg", "rz deg", "FD mm")
    parts.append(
        "<details><summary>motion of every volume</summary>"
        + _table((*header, "similarity", "flags"), rows, numeric=range(9))
        + "</details>"
    )
    return _section("motion", "\n".join(parts))


def _mosaic(raw, whole, table, figures: bool) -> str:
    from nidask.reporting.plots import plot_mosaic

    worst = _worst_volumes(table)
    names = ", ".join(str(int(whole.original_index[p])) for p in worst)
    parts = [
        _note(
            f"Volume(s) {names}: the largest framewise displacement and the largest "
            "displacement; middle axial slice as acquired (top) and corrected (bottom), "
            "the brain mask outlined."
        )
    ]
    if figures:
        figure = plot_mosaic(raw.whole_series(), whole, worst, labels=("acquired", "corrected"))
        parts.append(_img(figure, "before and after mosaic of the volumes that moved most"))
    return _section("mosaic", "\n".join(parts))


def _eddy(whole, eddy, figures: bool) -> str:
    if not eddy:
        return _section("eddy", _note("eddy currents not estimated"))
    coefficients = np.atleast_2d(np.asarray(eddy.get("coefficients", []), dtype=float))
    if coefficients.size == 0:
        return _section("eddy", _note("no eddy-current coefficients recorded"))
    columns = list(eddy.get("columns") or [])
    columns += [f"c{k}" for k in range(len(columns), coefficients.shape[1])]
    parts = [_note(f"phase-encoding axis: {eddy.get('phase_encoding', 'n/a')}")]
    n = len(coefficients)
    x = whole.original_index if n == len(whole) else np.arange(n)
    if figures:
        panels = coefficients.shape[1] if coefficients.shape[1] <= 6 else 1
        figure = _figure(figsize=(8, 1.3 + 1.4 * panels), layout="constrained")
        axes = np.atleast_1d(figure.subplots(panels, 1, sharex=True, squeeze=False)[:, 0])
        for k, name in enumerate(columns[: coefficients.shape[1]]):
            ax = axes[k if panels > 1 else 0]
            ax.plot(x, coefficients[:, k], marker=".", label=name)
            ax.axhline(0, color="0.6", lw=0.5)
            if panels > 1:
                ax.set_ylabel(name, fontsize="small")
        if panels == 1:
            axes[0].legend(fontsize="small", ncols=3)
        axes[-1].set_xlabel("volume (index in the file)")
        parts.append(_img(figure, "eddy-current coefficients per volume"))
    rows = [
        (name, _num(np.min(c)), _num(np.max(c)), _num(np.mean(np.abs(c))))
        for name, c in zip(columns, coefficients.T, strict=False)
    ]
    parts.append(_table(("coefficient", "min", "max", "mean |value|"), rows, numeric=(1, 2, 3)))
    every = [(int(i), *(_num(v, 4) for v in row)) for i, row in zip(x, coefficients, strict=True)]
    parts.append(
        "<details><summary>coefficients of every volume</summary>"
        + _table(("volume", *columns), every, numeric=range(1, len(columns) + 1))
        + "</details>"
    )
    return _section("eddy", "\n".join(parts))


def _outliers(whole, outliers, figures: bool) -> str:
    if outliers is None:
        return _section("outliers", _note("outlier detection off"))
    if not outliers:
        return _section("outliers", _note("no outlier slices"))
    volumes = sorted({int(o["volume"]) for o in outliers})
    replaced = sum(1 for o in outliers if o.get("replaced"))
    parts = [
        _note(
            f"{len(outliers)} outlier slice(s) in {len(volumes)} volume(s), {replaced} "
            "replaced by the model's prediction."
        )
    ]
    if figures:
        n_volumes = max(len(whole), volumes[-1] + 1)
        n_slices = max(whole.shape3d[2], max(int(o["slice"]) for o in outliers) + 1)
        scores = np.full((n_slices, n_volumes), np.nan)
        for o in outliers:
            scores[int(o["slice"]), int(o["volume"])] = float(o.get("score", 1.0))
        figure = _figure(figsize=(8, 3.5), layout="constrained")
        ax = figure.subplots()
        ax.set_facecolor("0.92")
        image = ax.imshow(
            np.ma.masked_invalid(scores),
            origin="lower",
            aspect="auto",
            cmap="viridis",
            interpolation="nearest",
            extent=(-0.5, n_volumes - 0.5, -0.5, n_slices - 0.5),
        )
        done = [(int(o["volume"]), int(o["slice"])) for o in outliers if o.get("replaced")]
        if done:
            ax.scatter(*zip(*done, strict=True), marker="x", color="tab:cyan", s=16)
        figure.colorbar(image, ax=ax, label="outlier score")
        ax.set_xlabel("volume (index in the file)")
        ax.set_ylabel("slice")
        ax.set_title("outlier slices (x: replaced)", fontsize="medium")
        parts.append(_img(figure, "outlier map: volumes by slices"))
    ordered = sorted(outliers, key=lambda o: (int(o["volume"]), int(o["slice"])))
    rows = [
        (
            int(o["volume"]),
            int(o["slice"]),
            _num(o.get("score")),
            "yes" if o.get("replaced") else "no",
        )
        for o in ordered
    ]
    parts.append(
        "<details><summary>every outlier slice</summary>"
        + _table(("volume", "slice", "score", "replaced"), rows, numeric=(0, 1, 2))
        + "</details>"
    )
    return _section("outliers", "\n".join(parts))


def _quality(raw, quality) -> str:
    parts = []
    shells = (quality or {}).get("shells")
    if shells:
        rows = [
            (_num(s.get("bval"), 0), s.get("volumes", "n/a"), _num(s.get("cnr"), 2))
            for s in shells
        ]
        parts.append(_table(("b-value", "volumes", "CNR"), rows, numeric=(0, 1, 2)))
    snr = b0_snr(raw) if hasattr(raw, "gradients") else None
    if snr is not None:
        if snr["kind"] == "temporal":
            what = (
                f"temporal SNR of the {snr['volumes']} b=0 volumes as acquired (median over "
                f"the {snr['mask']} of mean / standard deviation)"
            )
        else:
            what = f"SNR of the b=0 volume (mean in the {snr['mask']} / std of the background)"
        parts.append(_table(("measure", "value"), [(what, _num(snr["value"], 1))], numeric=(1,)))
    if not parts:
        parts.append(_note("no quality measures for this series"))
    return _section("quality", "\n".join(parts))


def _flags(report) -> str:
    report = report or {}
    parts = []
    run_flags = report.get("flags", [])
    if run_flags:
        parts.append(
            _note(
                "raised for the whole run: "
                + ", ".join(f"{f} ({FLAG_MEANINGS.get(f, f)})" for f in run_flags),
                "warn",
            )
        )
    by_flag: dict[str, list[int]] = {}
    for volume in report.get("volumes", []):
        for flag in volume.get("flags", []):
            by_flag.setdefault(flag, []).append(int(volume["index"]))
    if by_flag:
        rows = [
            (flag, FLAG_MEANINGS.get(flag, ""), len(v), ", ".join(map(str, v)))
            for flag, v in sorted(by_flag.items())
        ]
        parts.append(_table(("flag", "meaning", "volumes", "file volumes"), rows, numeric=(2,)))
    else:
        parts.append(_note("no volume flagged"))
    return _section("flags", "\n".join(parts))


def _value(value) -> str:
    if value is None:
        return "not set"
    return value if isinstance(value, str) else json.dumps(value, default=str)


def _settings(settings) -> str:
    if not settings:
        return _section("settings", _note("settings not recorded"))
    rows = [(key, _value(value)) for key, value in settings.items()]
    return _section("settings", _table(("setting", "value"), rows))


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("nidask")
    except PackageNotFoundError:
        return "(version unknown)"


def _page(title: str, body: str) -> str:
    return (
        "<!DOCTYPE html>\n"
        '<html lang="en">\n<head>\n<meta charset="utf-8">\n'
        '<meta name="viewport" content="width=device-width, initial-scale=1">\n'
        # no favicon request: the page fetches nothing
        '<link rel="icon" href="data:,">\n'
        f"<title>{_e(title)}</title>\n<style>{STYLE}</style>\n</head>\n"
        f"<body>\n{body}\n</body>\n</html>\n"
    )


def report_html(raw, estimated, report=None, settings=None, *, title: str = "", true=None) -> str:
    """The QC page of one estimation run, as HTML text.

    Parameters
    ----------
    raw : BaseDataset
        The series as opened (given to the estimator): the mosaic's "acquired" row
        and a DWI's b=0 SNR.
    estimated : BaseDataset
        The estimator's result (``motion_affines`` set).
    report : dict, optional
        The estimator's report (:attr:`nidask.Estimator.report`): per-volume
        similarity and flags, run flags, and when present ``eddy_currents``,
        ``outliers`` and ``quality`` (per-shell CNR).
    settings : dict, optional
        Settings of the run, shown as a table.
    title : str
        Name of the series (e.g. its file name), in the page title.
    true : array-like (N, 4, 4), optional
        Known motion of every volume of the file (phantoms), drawn dashed.

    Returns
    -------
    str
        A self-contained HTML document (inline figures and style, no network).
    """
    from nidask.errors import InputError

    whole = estimated.whole_series()
    if whole.motion_affines is None:
        raise InputError("the dataset has no motion matrices")
    report = report or {}
    table = motion_table(whole.motion_affines, whole.affine, whole.shape3d)
    figures = figures_available()
    nav = " ".join(f'<a href="#{key}">{_e(name)}</a>' for key, name in SECTIONS.items())
    header = [
        f"<header><h1>nidask QC report{': ' + _e(title) if title else ''}</h1>",
        f"<nav>{nav}</nav>",
    ]
    if not figures:
        header.append(
            _note(
                'figures left out: matplotlib is not installed (pip install "nidask[plot]")',
                "warn",
            )
        )
    header.append("</header>")
    sections = [
        _summary(raw, whole, table, report, title),
        _motion(whole, table, report, figures, true),
        _mosaic(raw, whole, table, figures),
        _eddy(whole, report.get("eddy_currents"), figures),
        _outliers(whole, report.get("outliers"), figures),
        _quality(raw, report.get("quality")),
        _flags(report),
        _settings(settings),
    ]
    footer = f"<footer>{_note(f'written by nidask {_version()}')}</footer>"
    page_title = f"nidask QC: {title}" if title else "nidask QC report"
    return _page(page_title, "\n".join([*header, *sections, footer]))


def write_report_html(
    path, raw, estimated, report=None, settings=None, *, title: str = "", true=None
) -> str:
    """Write the QC page of one run (:func:`report_html`) to ``path`` atomically.

    Parameters
    ----------
    path : path-like
        The page, e.g. ``OUT/report.html``.
    raw, estimated, report, settings, title, true
        As for :func:`report_html`.

    Returns
    -------
    str
        ``path``.
    """
    text = report_html(raw, estimated, report, settings, title=title, true=true)
    path = os.fspath(path)
    with atomic_output(path) as temp, open(temp, "w", encoding="utf-8") as f:
        f.write(text)
    return path


def write_index_html(path, series: Iterable[dict], *, title: str = "nidask QC reports") -> str:
    """Write a page linking the QC pages of several series (relative links).

    Parameters
    ----------
    path : path-like
        The index page (e.g. the derivative dataset's ``report.html``).
    series : iterable of dict
        One per series: ``name``, ``report`` (path of its page, or ``None``),
        and optionally ``status``, ``volumes``, ``largest_motion_mm``, ``flagged``
        and ``message``.
    title : str
        Page title.

    Returns
    -------
    str
        ``path``.
    """
    path = os.fspath(path)
    root = os.path.dirname(os.path.abspath(path))
    rows = []
    for s in series:
        page = s.get("report")
        name = _e(s["name"])
        if page:
            link = os.path.relpath(os.path.abspath(page), root).replace(os.sep, "/")
            name = f'<a href="{_e(link)}">{name}</a>'
        status = s.get("status", "")
        motion = s.get("largest_motion_mm")
        cells = [
            f"<td>{name}</td>",
            f'<td class="status-{_e(status)}">{_e(status)}</td>',
            f'<td class="num">{_e(s.get("volumes") or "")}</td>',
            f'<td class="num">{"" if motion is None else _num(motion, 2)}</td>',
            f'<td class="num">{_e(s.get("flagged", ""))}</td>',
            f"<td>{_e(s.get('message', ''))}</td>",
        ]
        rows.append(f"<tr>{''.join(cells)}</tr>")
    header = "".join(
        f"<th>{h}</th>"
        for h in ("series", "status", "volumes", "largest motion (mm)", "flagged", "note")
    )
    body = (
        f"<header><h1>{_e(title)}</h1></header>\n"
        f'<section id="series"><table><thead><tr>{header}</tr></thead>'
        f"<tbody>{''.join(rows)}</tbody></table></section>"
    )
    with atomic_output(path) as temp, open(temp, "w", encoding="utf-8") as f:
        f.write(_page(title, body))
    return path
