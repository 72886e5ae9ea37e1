"""A whole HCP subject, end to end: wall time per stage, accuracy, and ANTs beside it.

    python benchmarks/hcp_suite.py [--anatomy real|phantom] [--work DIR] [-k 9] \
        [--skip-ants] [--out benchmarks/results/hcp_subject.json]
    python benchmarks/hcp_suite.py --table benchmarks/results/hcp_subject.json

The series has HCP's grid and protocol: 145 x 174 x 145 voxels of 1.25 mm, 18 b=0 +
3 shells x 90 directions (b = 1000, 2000, 3000, interleaved, a b=0 every 16
volumes), int16, gzipped as HCP ships it, with known motion.  ``--anatomy real``
(the default) builds it from real anatomy as the protocol suite does
(heudiconv's Siemens DWI as tissue classes, :func:`nidask.validation.phantom.real_anatomy`
on HCP's grid, a multi-compartment signal, Rician noise of SNR 25 at b=0) moved by
nipype's real MCFLIRT trajectory scaled to 2.5 mm / 2.5 degrees;
``--anatomy phantom`` uses the smooth HCP-like phantom of the scale suite
(:func:`scale_suite.make_series`, realistic motion).  The series is made once
(~10 minutes) in ``--work`` and reused.

``nidask estimate`` runs with its defaults (the b=0 anchor, then leave-one-out passes
on these dense shells, outlier slices flagged, the QC page) from the ``.nii.gz`` to
the written outputs, in a child process on the machine's threads; its progress lines
give the time of each stage, and its peak memory is read in the child (``VmHWM``)
beside the baseline of a child that only imported nidask and compiled its kernels.
The estimates of the anchor alone and after each pass, kept in the run directory,
are scored too: what fewer passes would give.  ANTs runs as a user calls it,
antspyx's ``ants.registration(type_of_transform="Rigid")`` with its defaults
(``peer_ants.py --transform antspy:Rigid``, the same b=0 template procedure), on the
b=0 volumes and every ``k``-th volume of each shell; every tool is scored on those
volumes after one common rigid offset (:func:`protocol_suite.shell_errors`).
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import re
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

import protocol_suite as ps
import scale_suite
from _results import print_saved, save_and_print

HERE = Path(__file__).resolve().parent
SHAPE = (145, 174, 145, 288)
STAGE = re.compile(r"^(?P<label>.+): done in (?P<seconds>[\d.]+) s$")


def series_in(work: Path, anatomy: str = "real"):
    """The HCP-sized series in ``work`` (made once) and its true motion."""
    directory = work / ("series" if anatomy == "phantom" else "real")
    truth = directory / "motion.npy"
    image = directory / "dwi.nii.gz"
    if not (truth.exists() and image.exists()):
        if anatomy == "phantom":
            made = scale_suite.make_series(directory, SHAPE, "HCP subject")
        else:
            made = real_series(work, directory)
        np.save(truth, made.motion)
    companions = {k: str(directory / f"dwi.{k}") for k in ("bvec", "bval")}
    companions["mask"] = str(directory / "dwi_mask.nii")
    return str(image), companions, np.load(truth)


def real_series(work: Path, directory: Path):
    """HCP's protocol on real anatomy at HCP's grid, gzipped (see the module docstring)."""
    from nidask.validation import phantom

    directory.mkdir(parents=True, exist_ok=True)
    anatomy = ps.load_anatomy(work, zooms=1.25, shape3d=SHAPE[:3])
    rng = np.random.default_rng(7)
    _, n_b0, n_dw, shells, every = ps.PROTOCOLS["a"]
    bvals, bvecs = phantom.acquisition_scheme(n_b0, n_dw, shells, rng, every)
    motion = ps.protocol_motion("mcflirt", len(bvals), anatomy, rng)
    made = phantom.make_real_dwi(
        directory, anatomy, bvals, bvecs, motion, snr=ps.SNR, seed=1, dtype="int16"
    )
    plain = Path(made.image)
    with open(plain, "rb") as src, gzip.open(f"{plain}.gz", "wb", compresslevel=6) as dst:
        shutil.copyfileobj(src, dst, 16 * 2**20)
    plain.unlink()
    return made


def run_nidask(image: str, companions: dict, out: Path) -> dict:
    """``nidask estimate`` with its defaults, timed per stage from its progress lines,
    its memory read in the child (``_cli_peak.py``)."""
    cmd = [sys.executable, str(HERE / "_cli_peak.py"), "estimate", image, "--out", str(out)]
    cmd += ["--no-plots"]
    for name, path in companions.items():
        cmd += [f"--{name}", path]
    peak_file = out.parent / f"{out.name}-peak.json"
    env = {**os.environ, "NIDASK_PEAK_JSON": str(peak_file), "MALLOC_TRIM_THRESHOLD_": "65536"}
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    wall = time.perf_counter() - start
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    if proc.returncode != 0:
        raise SystemExit(f"nidask estimate failed:\n{proc.stderr[-3000:]}")
    stages = []
    for line in (proc.stdout + proc.stderr).splitlines():
        match = STAGE.match(line.strip())
        if match:
            stages.append([match["label"], float(match["seconds"])])
    with open(peak_file) as f:
        memory = json.load(f)
    return {
        "wall_s": wall,
        "cpu_s": usage.ru_utime + usage.ru_stime - before.ru_utime - before.ru_stime,
        "memory": memory,
        "stages": stages,
        "command": " ".join(["nidask", *cmd[2:]]),
    }


def stage_estimates(work: Path, n: int, affine, shape3d) -> dict:
    """Every volume's matrix after the b=0 anchor and after each pass of the run."""
    from nidask.estimation.anchor import TEMPLATE_ROUNDS
    from nidask.estimation.frames import recentre

    anchor = work / "anchor"
    rounds = anchor / "template" / f"round-{TEMPLATE_ROUNDS}"
    estimates = np.tile(np.eye(4), (n, 1, 1))
    b0 = sorted(int(p.stem.split("-")[1]) for p in rounds.glob("fold-*.npy"))
    raw = np.stack([np.load(rounds / f"fold-{i:05d}.npy") for i in b0])
    estimates[b0] = recentre(raw, slice(None), affine, shape3d)
    for path in anchor.glob("fold-*.npy"):
        estimates[int(path.stem.split("-")[1])] = np.load(path)
    stages = {"anchor only (passes=0)": estimates}
    for p in (1, 2):
        path = work / f"pass-{p}" / "estimates.npy"
        if path.exists():
            label = "anchor + 1 pass" if p == 1 else "anchor + 2 passes (default)"
            stages[label] = np.load(path)
    return stages


def run(args) -> dict:
    import nibabel as nb

    work = Path(args.work or tempfile.mkdtemp(prefix="nidask-hcp-"))
    image, companions, truth = series_in(work, args.anatomy)
    img = nb.load(image)
    affine, shape3d = img.affine, img.shape[:3]
    bvals = np.loadtxt(companions["bval"]).ravel()
    mask = np.asarray(nb.load(companions["mask"]).dataobj) > 0
    out = work / f"nidask-{args.anatomy}"
    if out.exists():
        raise SystemExit(f"{out}: remove the previous run first")
    record = run_nidask(image, companions, out)
    volumes = ps.scored_volumes(bvals, args.k)
    results = {"shape": list(SHAPE), "k": args.k, "nidask": record, "tools": {}}
    # the file's order: the run directory holds volumes in the estimator's order
    with open(out / "work" / "report.json") as f:
        order = np.argsort([v["index"] for v in json.load(f)["volumes"]])
    for label, estimates in stage_estimates(out / "work", len(bvals), affine, shape3d).items():
        estimates = estimates[order]
        results["tools"][label] = {
            "all": ps.shell_errors(estimates, truth, affine, shape3d, mask, bvals),
            "scored": ps.shell_errors(
                estimates[volumes], truth[volumes], affine, shape3d, mask, bvals[volumes]
            ),
        }
    if not args.skip_ants:
        plain = Path(image[: -len(".gz")])  # ANTs reads volumes one by one: no gzip
        if not plain.exists():
            nb.save(nb.load(image), plain)
        ants, matrices = run_ants(plain, companions, work, volumes, args.workers)
        results["ants"] = ants
        if matrices is not None:
            results["tools"]["ANTs Rigid (antspyx defaults)"] = {
                "scored": ps.shell_errors(
                    matrices[volumes], truth[volumes], affine, shape3d, mask, bvals[volumes]
                )
            }
    return results


def run_ants(image: Path, companions: dict, work: Path, volumes, workers: int):
    """``peer_ants.py --transform antspy:Rigid`` on ``volumes`` of the whole series."""
    matrices = work / "ants.npy"
    cmd = [ps.peer_python(), str(HERE / "peer_ants.py"), "--nii", str(image)]
    cmd += ["--bval", companions["bval"], "--mask", companions["mask"]]
    cmd += ["--out", str(matrices), "--threads", str(workers), "--seed", "1234"]
    cmd += ["--transform", "antspy:Rigid", "--volumes", ",".join(str(int(v)) for v in volumes)]
    record = ps.child_json(cmd)
    return record, (None if "error" in record else np.load(matrices))


def table(results: dict) -> str:
    """The stage table and the accuracy table of a run, as Markdown."""
    record = results["nidask"]
    n = results["shape"][3]
    lines = ["| stage | s | s / volume |", "|---|---|---|"]
    for label, seconds in record["stages"]:
        lines.append(f"| {label} | {seconds:.1f} | {seconds / n:.2f} |")
    memory = record["memory"]
    above = memory["peak_mb"] - memory["baseline_mb"]
    lines.append(
        f"| **whole command** (wall; CPU {record['cpu_s']:.0f} s; peak RSS {above:.0f} MB "
        f"above the baseline, of which at most {memory['RssFile_mb']:.0f} MB mapped file "
        f"pages) | **{record['wall_s']:.0f}** | {record['wall_s'] / n:.2f} |"
    )
    shells = [s for s in results["tools"]["anchor only (passes=0)"]["scored"] if s != "all"]
    head = "| tool | volumes | " + " | ".join(shells) + " | all: median mm / deg | worst mm |"
    lines += ["", head, "|" + "---|" * (len(shells) + 4)]
    for label, cells in results["tools"].items():
        for which in ("scored", "all"):
            if which not in cells:
                continue
            c = cells[which]
            counted = "every volume" if which == "all" else f"b=0 + every {results['k']}th"
            row = [f"{c[s]['translation_mm_median']:.3f}" for s in shells]
            a = c["all"]
            lines.append(
                f"| {label} | {counted} | " + " | ".join(row) + f" | "
                f"{a['translation_mm_median']:.3f} / {a['rotation_deg_median']:.3f} | "
                f"{a['displacement_mm_max']:.3f} |"
            )
    if "ants" in results and "error" not in results["ants"]:
        ants = results["ants"]
        lines.append(
            f"\nANTs: {ants['register_s_per_volume']:.2f} s per registration "
            f"({ants['registered_volumes']} volumes, template {ants['template_s']:.0f} s, "
            f"{ants['threads']} threads): {ants['ants_args']}"
        )
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument(
        "--anatomy",
        choices=("real", "phantom"),
        default="real",
        help="real anatomy on HCP's grid (default) or the smooth HCP-like phantom",
    )
    p.add_argument("--work", help="where the series (reused) and the runs go (default: temp)")
    p.add_argument("-k", type=int, default=9, help="ANTs on the b=0 and every k-th volume")
    p.add_argument("--skip-ants", action="store_true", help="nidask only")
    p.add_argument("--workers", type=int, default=2, help="ANTs threads (default 2)")
    p.add_argument("--out", default=str(HERE / "results" / "hcp_subject.json"))
    p.add_argument("--table", metavar="JSON", help="print the tables of a saved run")
    args = p.parse_args(argv)
    if args.table:
        return print_saved(args.table, table)
    results = run(args)
    return save_and_print(results, args.out, table)


if __name__ == "__main__":
    sys.exit(main())
