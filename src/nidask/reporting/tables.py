"""What an estimation run leaves for people: the motion table, flags, corrected outputs.

Every row is a volume of the file (a DWI's b=0 volumes included), in file order.
``motion.tsv`` holds the rigid parameters of each volume's matrix (translations of
the centre of the field of view in mm, rotations in degrees), the framewise
displacement, the registration's final similarity and the flags the estimator
raised (``implausible``, ``poor_fit``, ``unconverged``, ``small_fov``,
``inconsistent``).  ``outliers.tsv`` lists a DWI's outlier slices, one row each.
With eddy currents estimated, ``motion.tsv`` holds the head's motion (each matrix
without its eddy-current part) and ``eddy.tsv`` the coefficients.
"""

from __future__ import annotations

import math
import os

import numpy as np

from nidask.errors import InputError
from nidask.geometry import HEAD_RADIUS_MM, fov_center, motion_table
from nidask.io.cache import atomic_output

COLUMNS = (
    "volume",
    "tx_mm",
    "ty_mm",
    "tz_mm",
    "rx_deg",
    "ry_deg",
    "rz_deg",
    "fd_mm",
    "similarity",
    "flags",
)


def volume_quality(report: dict | None, indices) -> list[tuple[float | None, list[str]]]:
    """``(similarity, flags)`` of each file volume in ``indices`` from an estimator report."""
    by_index = {}
    if report:
        by_index = {
            v["index"]: (v.get("similarity"), v.get("flags", [])) for v in report["volumes"]
        }
    return [by_index.get(int(i), (None, [])) for i in indices]


def motion_tsv(dataset, report: dict | None = None) -> str:
    """The motion table of every volume of the file, tab-separated (see the module)."""
    whole = dataset.whole_series()
    if whole.motion_affines is None:
        raise InputError("the dataset has no motion matrices")
    table = motion_table(motion_part_of(whole, report), whole.affine, whole.shape3d)
    lines = ["\t".join(COLUMNS)]
    quality = volume_quality(report, whole.original_index)
    for index, row, (similarity, flags) in zip(whole.original_index, table, quality, strict=True):
        fields = [str(int(index)), *(f"{v:.4f}" for v in row)]
        fields.append("n/a" if similarity is None else f"{similarity:.4f}")
        fields.append(",".join(flags) or "n/a")
        lines.append("\t".join(fields))
    return "\n".join(lines) + "\n"


def motion_part_of(whole, report: dict | None) -> np.ndarray:
    """The head's motion in ``whole.motion_affines``: without the eddy-current part
    when ``report`` has one (:func:`nidask.estimation.eddy.motion_part`)."""
    if not report or "eddy_currents" not in report:
        return whole.motion_affines
    from nidask.estimation.eddy import motion_part

    return motion_part(whole.motion_affines, report["eddy_currents"], whole.affine, whole.shape3d)


def eddy_tsv(dataset, report: dict) -> str:
    """The eddy-current coefficients of every volume of the file, tab-separated.

    One row per volume (file order): its index, then the report's coefficients
    (``shift_mm`` in mm, the slopes in mm per mm; see :mod:`nidask.estimation.eddy`).
    """
    entry = report["eddy_currents"]
    whole = dataset.whole_series()
    lines = ["\t".join(["volume", *entry["columns"]])]
    for index, row in zip(whole.original_index, entry["coefficients"], strict=True):
        lines.append("\t".join([str(int(index)), *(f"{v:.6f}" for v in row)]))
    return "\n".join(lines) + "\n"


#: Columns of ``outliers.tsv``.
OUTLIER_COLUMNS = ("volume", "slice", "score", "replaced")


def outliers_tsv(report: dict) -> str:
    """A report's outlier slices, tab-separated: one row per slice, by volume and slice.

    ``volume`` is the index in the file, ``slice`` the index along the slice axis,
    ``score`` the standardised residual (see :mod:`nidask.estimation.outliers`) and
    ``replaced`` whether the corrected series holds the prediction there.
    """
    lines = ["\t".join(OUTLIER_COLUMNS)]
    for o in sorted(report["outliers"], key=lambda o: (int(o["volume"]), int(o["slice"]))):
        replaced = "true" if o["replaced"] else "false"
        lines.append(f"{int(o['volume'])}\t{int(o['slice'])}\t{o['score']:.2f}\t{replaced}")
    return "\n".join(lines) + "\n"


def flagged(report: dict | None) -> dict[str, list[int]]:
    """File volumes of each flag raised in an estimator report."""
    out: dict[str, list[int]] = {}
    for volume in (report or {}).get("volumes", []):
        for flag in volume.get("flags", []):
            out.setdefault(flag, []).append(volume["index"])
    return out


def largest_motion(dataset, count: int = 4) -> list[int]:
    """Positions (in the dataset) of the ``count`` volumes that moved most."""
    from nidask.validation.evaluation import rotation_angle

    centre = np.append(fov_center(dataset.affine, dataset.shape3d), 1.0)
    size = [
        np.linalg.norm((m @ centre - centre)[:3])
        + HEAD_RADIUS_MM * math.radians(rotation_angle(m))
        for m in dataset.motion_affines
    ]
    return sorted(int(i) for i in np.argsort(size)[::-1][:count])


def write_text(path: str, text: str) -> None:
    """Write ``text`` to ``path`` atomically."""
    with atomic_output(path) as temp, open(temp, "w") as f:
        f.write(text)


def write_outputs(
    raw,
    estimated,
    directory: str,
    *,
    report: dict | None = None,
    order: int = 3,
    insert_b0: bool = False,
    plots: bool = True,
    true=None,
    title: str = "",
    name: str = "",
    settings: dict | None = None,
    warn=None,
) -> list[str]:
    """Corrected NIfTI (+ sidecars), ``motion.x5``, ``motion.tsv`` (and ``eddy.tsv``),
    ``report.html``, plots.

    The corrected series and the tables cover every volume of the file in file
    order (``insert_b0=True``: nifreeze's layout, the b=0 reference first and the
    diffusion-weighted volumes).  ``report.html`` is the QC page
    (:mod:`nidask.reporting.html`; ``name`` and ``settings`` go on it), written
    whatever ``plots`` says: ``plots`` switches the PNG files.  ``warn(message)``
    receives notes (missing plotting library).  Returns the names written
    (relative to ``directory``).
    """
    from nidask.data.export import write_transforms

    written = []
    corrected = os.path.join(directory, "corrected.nii.gz")
    # insert_b0 is a DWI option: other modalities take none
    estimated.to_nifti(corrected, order=order, **({"insert_b0": True} if insert_b0 else {}))
    written.append("corrected.nii.gz")
    written += [f"corrected{suffix}" for suffix in estimated.export_sidecars]
    whole = estimated.whole_series()
    with atomic_output(os.path.join(directory, "motion.x5")) as temp:
        write_transforms(temp, whole.motion_affines, whole.shape3d, whole.affine)
    written.append("motion.x5")
    write_text(os.path.join(directory, "motion.tsv"), motion_tsv(estimated, report))
    written.append("motion.tsv")
    if report and "outliers" in report:
        write_text(os.path.join(directory, "outliers.tsv"), outliers_tsv(report))
        written.append("outliers.tsv")
    if report and "eddy_currents" in report:
        write_text(os.path.join(directory, "eddy.tsv"), eddy_tsv(estimated, report))
        written.append("eddy.tsv")
    from nidask.reporting.html import figures_available, write_report_html

    write_report_html(
        os.path.join(directory, "report.html"),
        raw,
        estimated,
        report,
        settings,
        title=name or title.strip().rstrip(":"),
        true=true,
    )
    written.append("report.html")
    if not figures_available() and warn is not None:
        warn('report.html has no figures: matplotlib is missing (pip install "nidask[plot]")')
    if not plots:
        return written
    from nidask.reporting.plots import MissingDependencyError, plot_mosaic, plot_series_motion

    try:
        plot_series_motion(
            whole,
            true=true,
            title=f"{title}estimated head motion{' (dashed: true)' if true is not None else ''}",
            filename=os.path.join(directory, "motion.png"),
        )
        written.append("motion.png")
        plot_mosaic(
            raw.whole_series(),
            whole,
            largest_motion(whole),
            labels=("acquired", "corrected"),
            title=f"{title}largest motion: middle axial slice, brain mask outlined",
            filename=os.path.join(directory, "mosaic.png"),
        )
        written.append("mosaic.png")
    except MissingDependencyError as exc:
        if warn is not None:
            warn(f"plots skipped: {exc}")
    return written
