"""Dataset-level estimation in the BIDS-Apps form: every series of the selected participants.

``nidask estimate BIDS_DIR OUT_DIR participant`` runs :func:`run_participants`:
each series found by :func:`nidask.bids.find_series` is opened with its sidecars
(:func:`nidask.bids.find_sidecars`), estimated on the one scheduler given (its
folds are the tasks), and written as a BIDS derivative
(:func:`nidask.bids.derivative_paths`).  A series whose outputs are all present is
skipped; one whose run was interrupted resumes from its work directory
(``OUT_DIR/.nidask-work/<series>``, removed once its outputs are written); a
series that fails is reported and the others go on.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from nidask.bids import layout
from nidask.data.export import write_transforms
from nidask.data.loading import load
from nidask.errors import NidaskError
from nidask.geometry import motion_parameters
from nidask.io.cache import atomic_output
from nidask.reporting.tables import motion_tsv, write_text

#: Work directories of the series being estimated (hidden from BIDS validators).
WORK_FOLDER = ".nidask-work"


@dataclass
class SeriesResult:
    """What happened to one series: ``status`` is ``done``, ``skipped`` or ``failed``."""

    source: str
    status: str
    seconds: float = 0.0
    volumes: int = 0
    largest_motion_mm: float | None = None
    flagged: int = 0
    message: str = ""


def _outputs(paths: dict) -> list[str]:
    return [paths[k] for k in ("series", "bval", "bvec", "motion", "xfm", "json") if k in paths]


def _largest_motion_mm(whole) -> float:
    """Largest translation of the field of view's centre (mm)."""
    return max(
        float(np.linalg.norm(motion_parameters(m, whole.affine, whole.shape3d)[:3]))
        for m in whole.motion_affines
    )


def estimate_series(
    source: str, out_dir: str, make_estimator: Callable, client=None, paths=None
) -> dict:
    """Estimate one BIDS series and write its derivatives; returns facts for the summary.

    ``paths`` are the series' :func:`nidask.bids.derivative_paths` (found if not given).
    """
    paths = paths or layout.derivative_paths(source, out_dir)
    work = os.path.join(out_dir, WORK_FOLDER, os.path.basename(paths["series"]))
    os.makedirs(paths["dir"], exist_ok=True)
    with load(source, **layout.find_sidecars(source)) as dataset:
        estimator = make_estimator()
        estimated = estimator.run(dataset, client=client, workdir=work)
        estimated.to_nifti(paths["series"])
        whole = estimated.whole_series()
        with atomic_output(paths["xfm"]) as temp:
            write_transforms(temp, whole.motion_affines, whole.shape3d, whole.affine)
        write_text(paths["motion"], motion_tsv(estimated, estimator.report))
        sidecar = {
            **layout.sidecar_metadata(source),
            "Sources": [paths["source_uri"]],
            "HeadMotionCorrection": {
                "Software": "nidask",
                "Model": str(estimator.model),
                "Passes": len(estimator.report["passes"]),
                "Transforms": os.path.basename(paths["xfm"]),
            },
        }
        # written last: its presence marks the series as complete
        write_text(paths["json"], json.dumps(sidecar, indent=2, default=str) + "\n")
        flagged = sum(1 for v in estimator.report["volumes"] if v.get("flags"))
        facts = {"volumes": len(whole), "largest_motion_mm": _largest_motion_mm(whole)}
    shutil.rmtree(work, ignore_errors=True)
    return {**facts, "flagged": flagged}


def run_participants(
    bids_dir,
    out_dir,
    make_estimator: Callable,
    *,
    participant_labels=None,
    modalities=("dwi", "pet", "bold"),
    client=None,
    settings: dict | None = None,
    say: Callable[[str], None] = print,
) -> list[SeriesResult]:
    """Estimate every series of the selected participants of a BIDS dataset.

    Parameters
    ----------
    bids_dir, out_dir : path-like
        The raw BIDS dataset and the derivative dataset written (its
        ``dataset_description.json`` records ``settings``).
    make_estimator : callable
        Returns a fresh :class:`nidask.Estimator` per series.
    participant_labels : list of str, optional
        ``sub-`` labels (with or without the prefix); default every participant.
    modalities : tuple of str
        BIDS suffixes to estimate.
    client : distributed.Client, optional
        Scheduler for every series' folds (default: dask's current scheduler).
    say : callable
        Receives one progress line per series.

    Returns
    -------
    list of SeriesResult
        One per series, in the order estimated.
    """
    bids_dir, out_dir = os.path.abspath(bids_dir), os.path.abspath(out_dir)
    series = layout.find_series(bids_dir, participant_labels, modalities=tuple(modalities))
    layout.write_dataset_description(out_dir, settings, source_dir=bids_dir)
    results = []
    for number, source in enumerate(series, 1):
        name = os.path.relpath(source, bids_dir)
        paths = layout.derivative_paths(source, out_dir)
        if all(os.path.exists(p) for p in _outputs(paths)):
            results.append(SeriesResult(name, "skipped", message="outputs already present"))
            say(f"[{number}/{len(series)}] {name}: outputs present, skipped")
            continue
        say(f"[{number}/{len(series)}] {name}: estimating")
        start = time.perf_counter()
        try:
            facts = estimate_series(source, out_dir, make_estimator, client, paths)
        except Exception as exc:  # one series' failure must not stop the others
            message = str(exc) if isinstance(exc, NidaskError) else f"{type(exc).__name__}: {exc}"
            results.append(
                SeriesResult(name, "failed", time.perf_counter() - start, message=message)
            )
            say(f"[{number}/{len(series)}] {name}: FAILED: {message}")
            continue
        results.append(SeriesResult(name, "done", time.perf_counter() - start, **facts))
    return results


def summary_table(results: list[SeriesResult]) -> str:
    """A plain-text table of the results, one row per series."""
    rows = [("series", "status", "volumes", "largest motion", "flagged", "seconds")]
    for r in results:
        motion = "" if r.largest_motion_mm is None else f"{r.largest_motion_mm:.2f} mm"
        volumes = str(r.volumes) if r.volumes else ""
        seconds = f"{r.seconds:.1f}" if r.seconds else ""
        flagged = str(r.flagged) if r.status == "done" else ""
        rows.append((r.source, r.status, volumes, motion, flagged, seconds))
    widths = [max(len(row[k]) for row in rows) for k in range(len(rows[0]))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)) for row in rows]
    failures = [f"  {r.source}: {r.message}" for r in results if r.status == "failed"]
    return "\n".join(lines + (["failed:", *failures] if failures else []))
