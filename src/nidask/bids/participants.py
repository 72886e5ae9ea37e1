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
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import attrs
import numpy as np

from nidask.bids import layout
from nidask.config import chunk_bytes
from nidask.data.export import write_transforms
from nidask.data.loading import load
from nidask.errors import NidaskError
from nidask.geometry import motion_parameters
from nidask.io.cache import atomic_output
from nidask.reporting.html import write_index_html, write_report_html
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
    #: Wall-clock times (``time.time()``) the estimation started and ended.
    started: float | None = None
    ended: float | None = None


#: Memory a series' driver may hold at once while others run, in chunk budgets (its
#: registrations and predictions stream within a few chunks).
DRIVER_CHUNKS = 8


def series_at_once(client=None) -> int:
    """How many series a dataset run estimates at once on ``client``.

    One per worker of the scheduler (its threads are kept busy by the tasks of every
    series in flight), at least two when there is a scheduler at all, and no more than
    this machine's available memory holds at :data:`DRIVER_CHUNKS` chunk budgets per
    series.  Without a client (dask's threads), one.
    """
    if client is None:
        return 1
    workers = len(client.scheduler_info().get("workers", {}))
    try:
        available = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError):
        available = 0
    by_memory = max(1, available // (DRIVER_CHUNKS * chunk_bytes())) if available else 1
    return int(max(1, min(max(workers, 2), by_memory)))


def _outputs(paths: dict) -> list[str]:
    return [paths[k] for k in ("series", "bval", "bvec", "motion", "xfm", "json") if k in paths]


def _largest_motion_mm(whole) -> float:
    """Largest translation of the field of view's centre (mm)."""
    return max(
        float(np.linalg.norm(motion_parameters(m, whole.affine, whole.shape3d)[:3]))
        for m in whole.motion_affines
    )


def report_page(paths: dict) -> str:
    """The QC page of a series beside its outputs: ``..._desc-hmc_report.html``."""
    return paths["xfm"][: -len("_xfm.x5")] + "_report.html"


def estimate_series(
    source: str,
    out_dir: str,
    make_estimator: Callable,
    client=None,
    paths=None,
    settings: dict | None = None,
) -> dict:
    """Estimate one BIDS series and write its derivatives; returns facts for the summary.

    ``paths`` are the series' :func:`nidask.bids.derivative_paths` (found if not given);
    ``settings`` go on its QC page (:func:`report_page`).
    """
    paths = paths or layout.derivative_paths(source, out_dir)
    work = os.path.join(out_dir, WORK_FOLDER, os.path.basename(paths["series"]))
    os.makedirs(paths["dir"], exist_ok=True)
    with load(source, **layout.find_sidecars(source)) as dataset:
        estimator = make_estimator()
        if getattr(estimator, "eddy_currents", False) and "gradients" not in dataset.volume_meta():
            estimator = attrs.evolve(estimator, eddy_currents=False)  # diffusion series only
        estimated = estimator.run(dataset, client=client, workdir=work)
        estimated.to_nifti(paths["series"])
        whole = estimated.whole_series()
        with atomic_output(paths["xfm"]) as temp:
            write_transforms(temp, whole.motion_affines, whole.shape3d, whole.affine)
        write_text(paths["motion"], motion_tsv(estimated, estimator.report))
        write_report_html(
            report_page(paths),
            dataset,
            estimated,
            estimator.report,
            {"input": source, "model": str(estimator.model), **(settings or {})},
            title=os.path.basename(source),
        )
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
    concurrent: int | None = None,
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
    concurrent : int, optional
        Series estimated at once on that scheduler (default :func:`series_at_once`).
    say : callable
        Receives one progress line per series.

    Returns
    -------
    list of SeriesResult
        One per series, in the dataset's order.  ``out_dir/report.html`` links the
        QC page of each (:func:`write_index`).
    """
    bids_dir, out_dir = os.path.abspath(bids_dir), os.path.abspath(out_dir)
    series = layout.find_series(bids_dir, participant_labels, modalities=tuple(modalities))
    layout.write_dataset_description(out_dir, settings, source_dir=bids_dir)
    layout.write_bidsignore(out_dir)
    at_once = concurrent or series_at_once(client)

    def one(number: int, source: str) -> SeriesResult:
        name = os.path.relpath(source, bids_dir)
        paths = layout.derivative_paths(source, out_dir)
        if all(os.path.exists(p) for p in _outputs(paths)):
            say(f"[{number}/{len(series)}] {name}: outputs present, skipped")
            return SeriesResult(name, "skipped", message="outputs already present")
        say(f"[{number}/{len(series)}] {name}: estimating")
        start, started = time.perf_counter(), time.time()
        try:
            facts = estimate_series(source, out_dir, make_estimator, client, paths, settings)
        except Exception as exc:  # one series' failure must not stop the others
            message = str(exc) if isinstance(exc, NidaskError) else f"{type(exc).__name__}: {exc}"
            say(f"[{number}/{len(series)}] {name}: FAILED: {message}")
            return SeriesResult(
                name, "failed", time.perf_counter() - start, message=message, started=started
            )
        say(f"[{number}/{len(series)}] {name}: done")
        return SeriesResult(
            name, "done", time.perf_counter() - start, **facts, started=started, ended=time.time()
        )

    # several series on the one scheduler at once: the serial parts of one (its driver
    # work) overlap the tasks of the others
    with ThreadPoolExecutor(max_workers=max(1, min(at_once, len(series) or 1))) as pool:
        results = list(pool.map(one, range(1, len(series) + 1), series))
    write_index(out_dir, series, results)
    return results


def write_index(out_dir: str, series: list[str], results: list[SeriesResult]) -> str:
    """Write ``out_dir/report.html``: a row per series, linking its QC page.

    Series of this run come first (with their status), then the pages left by
    earlier runs on other participants.
    """
    rows, listed = [], set()
    for source, r in zip(series, results, strict=True):
        page = report_page(layout.derivative_paths(source, out_dir))
        listed.add(os.path.abspath(page))
        rows.append(
            {
                "name": r.source,
                "report": page if os.path.exists(page) else None,
                "status": r.status,
                "volumes": r.volumes,
                "largest_motion_mm": r.largest_motion_mm,
                "flagged": r.flagged if r.status == "done" else "",
                "message": r.message,
            }
        )
    for folder, _, files in sorted(os.walk(out_dir)):
        if WORK_FOLDER in folder.split(os.sep):
            continue
        for page in sorted(f for f in files if f.endswith("_report.html")):
            page = os.path.abspath(os.path.join(folder, page))
            if page not in listed:
                name = os.path.relpath(page, out_dir)
                rows.append({"name": name, "report": page, "status": "earlier run"})
    return write_index_html(os.path.join(out_dir, "report.html"), rows)


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
