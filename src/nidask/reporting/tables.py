"""What an estimation run leaves for people: the motion table, flags, corrected outputs.

Every row is a volume of the file (a DWI's b=0 volumes included), in file order.
``motion.tsv`` holds the rigid parameters of each volume's matrix (translations of
the centre of the field of view in mm, rotations in degrees), the framewise
displacement, the registration's final similarity and the flags the estimator
raised (``implausible``, ``poor_fit``, ``unconverged``, ``small_fov``,
``inconsistent``).
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
    table = motion_table(whole.motion_affines, whole.affine, whole.shape3d)
    lines = ["\t".join(COLUMNS)]
    quality = volume_quality(report, whole.original_index)
    for index, row, (similarity, flags) in zip(whole.original_index, table, quality, strict=True):
        fields = [str(int(index)), *(f"{v:.4f}" for v in row)]
        fields.append("n/a" if similarity is None else f"{similarity:.4f}")
        fields.append(",".join(flags) or "n/a")
        lines.append("\t".join(fields))
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
    warn=None,
) -> list[str]:
    """Corrected NIfTI (+ sidecars), ``motion.x5``, ``motion.tsv`` and PNG plots.

    The corrected series and the tables cover every volume of the file in file
    order (``insert_b0=True``: nifreeze's layout, the b=0 reference first and the
    diffusion-weighted volumes).  ``warn(message)`` receives notes (missing
    plotting library).  Returns the names written (relative to ``directory``).
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
    if not plots:
        return written
    from nidask.reporting.plots import MissingDependencyError, plot_mosaic, plot_motion

    try:
        plot_motion(
            whole.motion_affines,
            whole.affine,
            whole.shape3d,
            true=true,
            x=whole.original_index,
            xlabel="volume (index in the file)",
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
