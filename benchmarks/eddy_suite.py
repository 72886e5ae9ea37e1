"""Eddy currents and motion on real anatomy: whole-affine errors against a known field.

    python benchmarks/eddy_suite.py [--skip-ants] [--ants-every K] [--dropouts N] [--out FILE.json]
    python benchmarks/eddy_suite.py --table benchmarks/results/eddy.json

The anatomy is heudiconv's whole-brain Siemens DWI at 2 mm, as
``benchmarks/protocol_suite.py`` builds it (:func:`nidask.validation.phantom.real_anatomy`).
The series is protocol c of that suite (1 b=0 + 2 x 30 at b=1000/2000, SNR 25) with
random motion up to 2 mm / 2 degrees and a first-order eddy-current field along
``j-``: each coefficient a linear function of the gradient vector (direction times
``sqrt(b / 2000)``, random gains), scaled so that the largest displacement over the brain
is 1.5 mm (at b=2000).  Each volume's true whole matrix is ``E @ M``.  With
``--dropouts N``, N slices of N diffusion-weighted volumes lose 40-70 % of their
signal (:func:`nidask.validation.phantom.drop_slices`, slices inside the brain's
extent), and the eddy-current run's outlier slices (flagged, the default) are scored
against them: found, and falsely flagged among all diffusion-weighted slices.

Tools: nidask ``Estimator(eddy_currents=True)`` and the rigid-only ``Estimator()``
(in this process, 2 threads), and ANTs affine registration to the b=0
(``benchmarks/peer_ants.py --transform Affine[0.1]``, the eddy_correct approach, in
the peer venv) on the b=0 and every K-th diffusion-weighted volume.  Error: per
diffusion-weighted volume, the mean displacement over the brain mask between the
estimated and the true whole matrix after one common rigid offset
(:func:`nidask.validation.evaluation.motion_errors`); median and worst.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from _results import print_saved, save_and_print

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
PE = "j-"
LARGEST_MM = 1.5
TARGETS = {"median_mm": 0.1, "worst_mm": 0.4}


def make_series(directory: Path, anatomy, seed: int = 7):
    from nidask.estimation.eddy import gradient_vectors
    from nidask.geometry import eddy_frame, eddy_matrix, fov_center
    from nidask.validation import phantom

    rng = np.random.default_rng(seed)
    bvals, bvecs = phantom.acquisition_scheme(1, 60, (1000, 2000), rng, None)
    centre = fov_center(anatomy.affine, anatomy.shape3d)
    motion = phantom.random_motion(len(bvals), rng, 2.0, 2.0, centre)
    frame = eddy_frame(anatomy.affine, anatomy.shape3d, PE)
    gains = rng.uniform(-1, 1, (4, 3)) * np.array([[0.8], [0.008], [0.008], [0.008]])
    coefficients = gradient_vectors(np.column_stack([bvecs, bvals])) @ gains.T
    mask = anatomy.mask
    points = anatomy.affine @ np.vstack([np.argwhere(mask).T, np.ones(mask.sum())])

    def largest(c):
        return np.abs(frame.direction @ (eddy_matrix(c, frame) @ points - points)[:3]).max()

    coefficients *= LARGEST_MM / max(largest(c) for c in coefficients)
    fields = np.stack([eddy_matrix(c, frame) for c in coefficients])
    series = phantom.make_real_dwi(directory, anatomy, bvals, bvecs, motion, seed=1, eddy=fields)
    return series, bvals, coefficients, motion


def drop(series, anatomy, weighted, count: int, seed: int = 11):
    """``series`` with ``count`` dropped slices, and the ``(volume, slice)`` pairs."""
    from nidask.validation import phantom

    rng = np.random.default_rng(seed)
    extent = np.flatnonzero(anatomy.mask.any(axis=(0, 1)))
    inside = extent[len(extent) // 5 : len(extent) - len(extent) // 5]
    volumes = rng.choice(weighted, count, replace=False)
    pairs = [(int(v), int(rng.choice(inside))) for v in volumes]
    factors = rng.uniform(0.3, 0.6, count)
    return phantom.drop_slices(series, pairs, factors), set(pairs)


def errors(matrices, series, anatomy, volumes) -> dict:
    from nidask.validation.evaluation import motion_errors

    found = motion_errors(
        matrices, series.motion[volumes], anatomy.affine, anatomy.shape3d, mask=anatomy.mask
    )
    return found["displacement_mm"]


def run_nidask(series, eddy: bool) -> tuple[np.ndarray, float, dict]:
    import dask

    import nidask

    kwargs = {"phase_encoding": PE} if eddy else {}
    with dask.config.set(scheduler="threads", num_workers=2):
        with nidask.load(series.image, **series.companions, **kwargs) as dwi:
            estimator = nidask.Estimator(eddy_currents=eddy, progress=False)
            start = time.perf_counter()
            result = estimator.run(dwi)
            seconds = time.perf_counter() - start
            whole = result.whole_series()
            order = np.argsort(whole.original_index)
            return whole.motion_affines[order], seconds, estimator.report


def run_ants(series, bvals, volumes, out: Path) -> tuple[dict, np.ndarray | None]:
    import nibabel as nb

    python = Path(
        os.environ.get("NIDASK_PEER_VENV", Path.home() / ".cache/nidask/nifreeze-venv")
    ) / ("bin/python")
    if not python.exists():
        return {"error": f"no peer venv python at {python}"}, None
    source = nb.load(series.image)
    image, bval = out / "selected.nii", out / "selected.bval"
    nb.Nifti1Image(np.asarray(source.dataobj)[..., volumes], source.affine).to_filename(image)
    np.savetxt(bval, bvals[None, volumes], fmt="%g")
    matrices = out / "ants.npy"
    cmd = [str(python), str(HERE / "peer_ants.py"), "--nii", str(image), "--bval", str(bval)]
    cmd += ["--mask", series.companions["brainmask_file"], "--out", str(matrices)]
    cmd += ["--threads", "2", "--seed", "1234", "--transform", "Affine[0.1]"]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        return {"error": (proc.stderr or proc.stdout)[-2000:]}, None
    return json.loads(proc.stdout.strip().splitlines()[-1]), np.load(matrices)


def summary(displacement) -> dict:
    d = np.asarray(displacement)
    return {"median_mm": float(np.median(d)), "worst_mm": float(d.max()), "volumes": len(d)}


def run(args) -> dict:
    from nidask.ops import kernels
    from protocol_suite import load_anatomy

    kernels.warm_up()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        anatomy = load_anatomy(work)
        series, bvals, coefficients, _ = make_series(work, anatomy)
        weighted = np.flatnonzero(bvals > 0)
        n = len(bvals)
        results = {"series": "1 b=0 + 2 x 30 (b=1000/2000), 2 mm, SNR 25", "volumes": n}
        dropped = set()
        if args.dropouts:
            series, dropped = drop(series, anatomy, weighted, args.dropouts)
            results["dropouts"] = sorted(dropped)
        results["largest_eddy_mm"] = LARGEST_MM
        for name, eddy in (("nidask rigid only", False), ("nidask eddy_currents=True", True)):
            matrices, seconds, report = run_nidask(series, eddy)
            entry = summary(errors(matrices[weighted], series, anatomy, weighted))
            entry["s_per_volume"] = seconds / n
            if eddy:
                found = np.array(report["eddy_currents"]["coefficients"])[weighted]
                truth = coefficients[weighted]
                entry["slope_error_median"] = float(np.median(np.abs(found - truth)[:, 1:]))
                entry["slope_median"] = float(np.median(np.abs(truth[:, 1:])))
                entry["shift_error_median_mm"] = float(np.median(np.abs(found - truth)[:, 0]))
                entry["shift_median_mm"] = float(np.median(np.abs(truth[:, 0])))
                if dropped:
                    flagged = {(o["volume"], o["slice"]) for o in report["outliers"]}
                    slices = len(weighted) * anatomy.shape3d[2]
                    entry["dropouts_found"] = len(flagged & dropped)
                    entry["falsely_flagged"] = len(flagged - dropped)
                    entry["false_fraction"] = len(flagged - dropped) / slices
            results[name] = entry
            results[name + " (matrices)"] = matrices.tolist()
            print(name, {k: v for k, v in entry.items()}, flush=True)
        if not args.skip_ants:
            scored = np.concatenate([np.flatnonzero(bvals == 0), weighted[:: args.ants_every]])
            record, ants = run_ants(series, bvals, scored, work)
            entry = {"record": record}
            if ants is not None:
                dw = bvals[scored] > 0
                entry.update(summary(errors(ants[dw], series, anatomy, scored[dw])))
                entry["s_per_volume"] = record.get("s_per_volume")
                for name in ("nidask rigid only", "nidask eddy_currents=True"):
                    mine = np.array(results[name + " (matrices)"])[scored[dw]]
                    same = summary(errors(mine, series, anatomy, scored[dw]))
                    results[name]["on_ants_volumes"] = same
            results["ants affine to b=0"] = entry
            print("ants", entry, flush=True)
        for name in ("nidask rigid only", "nidask eddy_currents=True"):
            results.pop(name + " (matrices)")
    return results


def table(results: dict) -> str:
    rows = [
        "| tool | median (mm) | worst (mm) | s / volume | volumes |",
        "| --- | --- | --- | --- | --- |",
    ]
    for name in ("nidask eddy_currents=True", "nidask rigid only", "ants affine to b=0"):
        entry = results.get(name)
        if not entry or "median_mm" not in entry:
            continue
        speed = entry.get("s_per_volume")
        rows.append(
            f"| {name} | {entry['median_mm']:.3f} | {entry['worst_mm']:.3f} | "
            f"{'n/a' if speed is None else f'{speed:.2f}'} | {entry['volumes']} |"
        )
        same = entry.get("on_ants_volumes")
        if same:
            rows.append(
                f"| {name}, ANTs' volumes | {same['median_mm']:.3f} | {same['worst_mm']:.3f} "
                f"| | {same['volumes']} |"
            )
    entry = results.get("nidask eddy_currents=True", {})
    if "dropouts_found" in entry:
        rows.append("")
        rows.append(
            f"outlier slices: {entry['dropouts_found']} of {len(results['dropouts'])} "
            f"dropouts found, {entry['falsely_flagged']} clean slices flagged "
            f"({100 * entry['false_fraction']:.2f} % of diffusion-weighted slices)"
        )
    return "\n".join(rows)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--skip-ants", action="store_true", help="nidask only")
    p.add_argument("--ants-every", type=int, default=4, help="ANTs on every K-th DW volume")
    p.add_argument("--dropouts", type=int, default=0, help="slices that lose signal")
    p.add_argument("--out", default=str(HERE / "results" / "eddy.json"))
    p.add_argument("--table", help="print the table of a results file and exit")
    args = p.parse_args(argv)
    if args.table:
        return print_saved(args.table, table)
    results = run(args)
    return save_and_print(results, args.out, table)


if __name__ == "__main__":
    raise SystemExit(main())
