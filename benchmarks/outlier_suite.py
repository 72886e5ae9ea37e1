"""Outlier slices on real anatomy: how many dropped slices are found, how many are not.

    python benchmarks/outlier_suite.py [--series c] [--dropped 8]
        [--out benchmarks/results/outliers.json]
    python benchmarks/outlier_suite.py --table benchmarks/results/outliers.json

The series is a protocol of ``benchmarks/protocol_suite.py`` (default ``c``, clinical:
1 b=0 + 2 x 30 at b=1000/2000) on heudiconv's anatomy at 2 mm with random motion (up
to 2 mm / 2 degrees), SNR 25.  ``--dropped`` slices of distinct diffusion-weighted
volumes (slices with at least 1000 brain voxels, 4 mm or more from the grid's
faces) keep 30-60 % of their signal
(:func:`nidask.validation.phantom.drop_slices`).  nidask runs four times in this
process, on 2 threads: the clean series with ``outliers="off"`` and ``"flag"`` (the
cost of the scoring, the false positives of a clean series), the series with dropped
slices with ``"flag"`` (found, false positives) and ``"replace"`` (the replaced slices
against the clean series' correction).  The scoring's seconds per volume are those of
its own prediction round and of the scoring itself (a run without a pass after the
b=0 anchor, which sparse shells get by default, predicts once more to score).
"""

from __future__ import annotations

import argparse
import functools
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from _results import print_saved, save_and_print

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from protocol_suite import PROTOCOLS, load_anatomy, protocol_motion  # noqa: E402

SNR = 25.0


def _timed(owner, name, totals, key):
    original = getattr(owner, name)

    @functools.wraps(original)
    def wrapper(*args, **kwargs):
        start = time.perf_counter()
        try:
            return original(*args, **kwargs)
        finally:
            totals[key] = totals.get(key, 0.0) + time.perf_counter() - start

    setattr(owner, name, wrapper)
    return original


def run(dataset, workdir, mode):
    """One estimation; returns the estimator, the corrected whole series (in memory, the
    series is small) and the seconds of its parts."""
    import nidask
    from nidask.estimation import estimator as module
    from nidask.estimation import outliers

    totals = {}
    saved = [
        (outliers, "score_round", _timed(outliers, "score_round", totals, "scoring")),
        (outliers, "final_record", _timed(outliers, "final_record", totals, "final round")),
    ]
    try:
        start = time.perf_counter()
        estimator = module.Estimator(outliers=mode)
        corrected = estimator.run(dataset, workdir=workdir)
        totals["run"] = time.perf_counter() - start
    finally:
        for owner, name, original in saved:
            setattr(owner, name, original)
    data = corrected.whole_series()._exported().dataobj.compute()
    assert isinstance(corrected, nidask.DWI)
    return estimator, corrected.whole_series().motion_affines, data, totals


def pick_slices(anatomy, bvals, count, rng):
    """``count`` (volume, slice) pairs: distinct diffusion-weighted volumes, slices with
    at least 1000 brain voxels, away from the grid's faces (which are not scored)."""
    from nidask.geometry import EDGE_MARGIN_MM

    per_slice = anatomy.mask.sum(axis=(0, 1))
    margin = int(np.ceil(EDGE_MARGIN_MM / np.linalg.norm(anatomy.affine[:3, 2])))
    per_slice[:margin] = per_slice[len(per_slice) - margin :] = 0
    slices = np.flatnonzero(per_slice >= 1000)
    volumes = rng.choice(np.flatnonzero(bvals > 50), size=count, replace=False)
    return [(int(v), int(rng.choice(slices))) for v in sorted(volumes)]


def measure(key: str, n_dropped: int, seed: int = 7) -> dict:
    import dask

    import nidask
    from nidask.validation import phantom

    label, n_b0, n_dw, shells, every = PROTOCOLS[key]
    with tempfile.TemporaryDirectory() as temp, dask.config.set(num_workers=2):
        work = Path(temp)
        anatomy = load_anatomy(work)
        rng = np.random.default_rng(seed)
        bvals, bvecs = phantom.acquisition_scheme(n_b0, n_dw, shells, rng, every)
        motion = protocol_motion("random", len(bvals), anatomy, rng)
        clean = phantom.make_real_dwi(work, anatomy, bvals, bvecs, motion, snr=SNR, seed=1)
        dropped_pairs = pick_slices(anatomy, bvals, n_dropped, rng)
        factors = rng.uniform(0.3, 0.6, n_dropped)
        dropped = phantom.drop_slices(clean, dropped_pairs, factors)
        results = {}
        with nidask.load(clean.image, **clean.companions) as dwi:
            _, _, _, off = run(dwi, work / "off", "off")
            est, clean_motion, clean_data, flag = run(dwi, work / "clean-flag", "flag")
            clean_found = est.report["outliers"]
            results["shells"] = est.report["quality"]["shells"]
        with nidask.load(dropped.image, **dropped.companions) as dwi:
            est, _, kept, _ = run(dwi, work / "dropped-flag", "flag")
            found = {(o["volume"], o["slice"]) for o in est.report["outliers"]}
            est_r, _, replaced, _ = run(dwi, work / "dropped-replace", "replace")
            found_r = {(o["volume"], o["slice"]) for o in est_r.report["outliers"]}
            errors = []
            index = np.indices(dwi.shape3d).reshape(3, -1)
            for (volume, k), factor in zip(dropped_pairs, factors, strict=True):
                voxel = (np.linalg.inv(dwi.affine) @ clean_motion[volume] @ dwi.affine)[2]
                z = (voxel[:3] @ index + voxel[3]).reshape(dwi.shape3d)
                region = (np.abs(z - k) < 0.3) & anatomy.mask
                truth = clean_data[..., volume][region]
                errors.append(
                    {
                        "volume": volume,
                        "slice": k,
                        "kept": float(factor),
                        "flagged_mae": float(np.mean(np.abs(kept[..., volume][region] - truth))),
                        "replaced_mae": float(
                            np.mean(np.abs(replaced[..., volume][region] - truth))
                        ),
                        "signal": float(np.mean(truth)),
                    }
                )
        dw_slices = int((bvals > 50).sum()) * anatomy.shape3d[2]
        truth = set(dropped_pairs)
        n_scored = int((bvals > 50).sum())
        results.update(
            {
                "series": f"{key}: {label}",
                "grid": list(anatomy.shape3d),
                "dropped": [list(p) for p in dropped_pairs],
                "found": len(found & truth),
                "false_dropped": len(found - truth),
                "false_clean": len(clean_found),
                "found_replace": len(found_r & truth),
                "false_replace": len(found_r - truth),
                "dw_slices": dw_slices,
                "false_rate_pct": 100.0 * max(len(found - truth), len(clean_found)) / dw_slices,
                "run_off_s": off["run"],
                "run_flag_s": flag["run"],
                "final_round_s": flag.get("final round", 0.0),
                "scoring_s": flag.get("scoring", 0.0),
                "s_per_volume": flag.get("final round", 0.0) / n_scored,
                "scoring_only_s_per_volume": flag.get("scoring", 0.0) / n_scored,
                "replacement": errors,
            }
        )
    return results


def table(results: list[dict]) -> str:
    rows = [
        "| series | dropped found | false positives (dropped / clean series) | "
        "false-positive rate | run off / flag | scoring round | of which scoring | "
        "replaced vs kept error |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in results:
        ratio = np.mean([e["replaced_mae"] / e["flagged_mae"] for e in r["replacement"]])
        rows.append(
            f"| {r['series']} | {r['found']} of {len(r['dropped'])} "
            f"(replace: {r['found_replace']}) | {r['false_dropped']} / {r['false_clean']} "
            f"of {r['dw_slices']} DW slices | {r['false_rate_pct']:.2f} % | "
            f"{r['run_off_s']:.0f} s / {r['run_flag_s']:.0f} s | "
            f"{r['s_per_volume']:.2f} s per volume | "
            f"{r['scoring_only_s_per_volume']:.3f} s per volume | "
            f"{100 * ratio:.0f} % |"
        )
    return "\n".join(rows)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--series", default="c", help="protocols of protocol_suite.py, a,b,...")
    parser.add_argument("--dropped", type=int, default=8)
    parser.add_argument("--out", default=str(HERE / "results" / "outliers.json"))
    parser.add_argument("--table", help="print the table of a results file and stop")
    args = parser.parse_args()
    if args.table:
        return print_saved(args.table, table)
    results = [measure(key, args.dropped) for key in args.series.split(",")]
    return save_and_print(results, args.out, table)


if __name__ == "__main__":
    raise SystemExit(main())
