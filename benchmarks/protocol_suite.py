"""Motion accuracy on real anatomy, for every class of diffusion protocol.

    python benchmarks/protocol_suite.py [--series a,b,c,d,e,f,g] [--motion random,mcflirt]
        [--skip-ants] [--ants-volumes N] [--out benchmarks/results/protocols.json]
    python benchmarks/protocol_suite.py --table benchmarks/results/protocols.json
    python benchmarks/protocol_suite.py --contrast-floor [--out ...]

The anatomy is heudiconv's whole-brain Siemens DWI (``tests/data/b0dwiForFmap``,
converted by the dcm2niix package's executable): its b=0 and b=1500 images give
the tissue classes of :func:`nidask.validation.phantom.real_anatomy` on a 2 mm grid that keeps
the scan's oblique LAS orientation.  Each protocol
(:data:`PROTOCOLS`) is written by :func:`nidask.validation.phantom.make_real_dwi` (a
multi-compartment signal per voxel, the gradient as the moved head sees it, Rician
noise of SNR 25 at b=0) with known motion of one of two kinds: ``random``
(independent per volume, up to 2 mm / 2 degrees) or ``mcflirt`` (nipype's real
MCFLIRT trajectory, drift and jumps, scaled to 2.5 mm / 2.5 degrees at its largest),
and again without noise, the twin that gives each volume's Cramér-Rao bound.

Tools, each in its own child process on 2 threads: nidask's ``Estimator``
(``benchmarks/_nidask_task.py estimate``) and ANTs to b0 (``benchmarks/peer_ants.py``:
rigid Mattes MI to the registered mean of the b=0 volumes, in the peer venv; with
``-k K`` on the b=0 volumes and every K-th volume of each shell only, which keeps ANTs' 20 s per
volume affordable; both tools are then scored on those volumes).  nidask runs twice:
the b=0 anchor alone (``passes=0``) and two leave-one-out passes after it
(``passes=2``); the table marks the one the default picks (by the smallest shell).  Errors:
:func:`nidask.validation.evaluation.motion_errors` over the volumes both tools estimated, after
one common rigid offset (every tool reports motion in its own frame), per shell: the
median translation of the centre of the field of view (mm) and rotation (degrees),
the worst mean displacement over the brain (mm), and the number of volumes whose
mean displacement exceeds 0.5 mm without a flag.  ``NIDASK_BENCH_SRC=DIR`` runs
nidask from a copy of ``src/``.

``--contrast-floor`` measures what registration across contrasts leaves without
noise: a series with one b=0 and :data:`FLOOR_DIRECTIONS` directions at each of
b = 1000, 2000, 3000 and 5000, without noise, the b=0 unmoved and every other volume
moved at random (as ``random`` above), estimated by both tools as above and scored
against the truth without removing an offset (the b=0 fixes the frame).  Each error is
then the offset that the tool's similarity and optimiser leave between that contrast
and the b=0's; its part common to the diffusion-weighted volumes is what the b=0 rows
of the main table measure once the common offset is removed.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from _results import print_saved, save_and_print

HERE = Path(__file__).resolve().parent
SNR = 25.0
#: key -> (label, b=0 volumes, diffusion-weighted volumes, shells, one b=0 every)
PROTOCOLS = {
    "a": ("HCP-like: 18 b=0 + 3 x 90", 18, 270, (1000, 2000, 3000), 16),
    "b": ("2 b=0 + 3 x 15", 2, 45, (1000, 2000, 3000), None),
    "c": ("clinical: 1 b=0 + 2 x 30", 1, 60, (1000, 2000), None),
    "d": ("single shell: 1 b=0 + 32 at b=1000", 1, 32, (1000,), None),
    "e": ("high b: 2 b=0 + 2 x 30 at b=3000/5000", 2, 60, (3000, 5000), None),
    "f": ("UK Biobank-like: 5 b=0 + 2 x 50", 5, 100, (1000, 2000), 21),
    "g": ("sparse: 1 b=0 + 2 x 15", 1, 30, (1000, 2000), None),
}
LIMIT_MM = 0.5
#: nidask runs: the b=0 anchor alone, and two leave-one-out passes after it (the
#: estimator's default picks one of them by the size of the smallest shell)
ANCHOR_ONLY, REFINED = "nidask passes=0", "nidask passes=2"
VARIANTS = ((ANCHOR_ONLY, 0), (REFINED, 2))


def package_file(package: str, *parts: str) -> Path:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(f"the protocol suite needs the {package} package (test extra)")
    return Path(next(iter(spec.submodule_search_locations)), *parts)


def load_anatomy(work: Path, **grid):
    """heudiconv's DICOMs through dcm2niix, as :func:`nidask.validation.phantom.real_anatomy`
    (``grid``: its ``zooms`` and ``shape3d``)."""
    import nibabel as nb

    from nidask.validation import phantom

    dicoms = package_file("heudiconv", "tests", "data", "b0dwiForFmap")
    converted = work / "dcm2niix"
    converted.mkdir(parents=True, exist_ok=True)
    subprocess.run(
        [shutil.which("dcm2niix") or "dcm2niix", "-o", str(converted), "-f", "dwi", str(dicoms)],
        check=True,
        capture_output=True,
    )
    image = nb.load(converted / "dwi.nii")
    bvals = np.loadtxt(converted / "dwi.bval")
    data = np.asarray(image.dataobj, dtype=np.float64)
    b0 = data[..., bvals < 50].mean(axis=-1)
    weighted = np.flatnonzero(bvals >= 50)[0]
    return phantom.real_anatomy(b0, data[..., weighted], bvals[weighted], image.affine, **grid)


def protocol_motion(kind: str, n: int, anatomy, rng) -> np.ndarray:
    from nidask.geometry import fov_center
    from nidask.validation import phantom

    centre = fov_center(anatomy.affine, anatomy.shape3d)
    if kind == "random":
        return phantom.random_motion(n, rng, 2.0, 2.0, centre)
    rows = np.loadtxt(package_file("nipype", "testing", "data", "fsl_mcflirt_movpar.txt"))
    rows = np.resize(rows, (n, 6))  # 365 rows: repeated for a longer series
    params = np.hstack([rows[:, 3:], rows[:, :3]])
    params -= params[0]
    params[:, :3] *= 2.5 / np.abs(params[:, :3]).max()
    params[:, 3:] *= np.radians(2.5) / np.abs(params[:, 3:]).max()
    return phantom.motion_from_parameters(params, centre)


def make_series(directory: Path, key: str, kind: str, anatomy, seed: int = 7):
    """The noisy series and its noise-free twin (same motion and directions)."""
    from nidask.validation import phantom

    _, n_b0, n_dw, shells, every = PROTOCOLS[key]
    rng = np.random.default_rng(seed)
    bvals, bvecs = phantom.acquisition_scheme(n_b0, n_dw, shells, rng, every)
    motion = protocol_motion(kind, len(bvals), anatomy, rng)
    noisy = phantom.make_real_dwi(directory, anatomy, bvals, bvecs, motion, snr=SNR, seed=1)
    (directory / "clean").mkdir(exist_ok=True)
    clean = phantom.make_real_dwi(directory / "clean", anatomy, bvals, bvecs, motion, snr=0)
    return noisy, clean, bvals


#: Directions per shell of the ``--contrast-floor`` series.
FLOOR_DIRECTIONS = 8
FLOOR_SHELLS = (1000, 2000, 3000, 5000)


def contrast_floor(args) -> dict:
    """Both tools on a noise-free series whose b=0 is unmoved: errors against the truth."""
    from nidask.validation import phantom
    from nidask.validation.evaluation import motion_errors

    work = Path(tempfile.mkdtemp(prefix="nidask-floor-", dir=args.work))
    try:
        anatomy = load_anatomy(work)
        rng = np.random.default_rng(7)
        n_dw = FLOOR_DIRECTIONS * len(FLOOR_SHELLS)
        bvals, bvecs = phantom.acquisition_scheme(1, n_dw, FLOOR_SHELLS, rng)
        motion = protocol_motion("random", len(bvals), anatomy, rng)
        motion[bvals < 50] = np.eye(4)  # the b=0 in the truth's frame: no offset to remove
        series = phantom.make_real_dwi(work, anatomy, bvals, bvecs, motion, snr=0)
        estimates = {"nidask anchor": run_nidask(series, work / "nidask", args.workers, 0)[1]}
        if not args.skip_ants:
            everything = np.arange(len(bvals))
            estimates["ANTs to b0"] = run_ants(series, work, bvals, args.workers, everything)[1]
        results = {"shells": [float(b) for b in FLOOR_SHELLS], "tools": {}}
        shells = np.round(bvals, -2)
        for tool, matrices in estimates.items():
            if matrices is None:
                continue
            errors = motion_errors(matrices, motion, series.affine, anatomy.shape3d, align=False)
            translation = np.asarray(errors["translation_mm"])
            rotation = np.asarray(errors["rotation_deg"])
            results["tools"][tool] = {
                f"b={b:g}": {
                    "translation_mm_median": float(np.median(translation[shells == b])),
                    "rotation_deg_median": float(np.median(rotation[shells == b])),
                }
                for b in FLOOR_SHELLS
            }
        return results
    finally:
        shutil.rmtree(work, ignore_errors=True)


def floor_table(results: dict) -> str:
    """Median offset (mm / deg) of each shell's volumes from the b=0, per tool."""
    shells = [f"b={b:g}" for b in results["shells"]]
    lines = ["| tool | " + " | ".join(shells) + " |", "|---|" + "---|" * len(shells)]
    for tool, cells in results["tools"].items():
        lines.append(f"| {tool} | " + " | ".join(_cell(cells, s) for s in shells) + " |")
    return "\n".join(lines)


def bounds(noisy, clean, mask) -> np.ndarray:
    """Each volume's Cramér-Rao covariance against its noise-free twin."""
    import nibabel as nb

    from nidask.validation.evaluation import registration_bound

    a, b = nb.load(noisy.image), nb.load(clean.image)
    out = []
    for i in range(a.shape[3]):
        truth = np.asarray(b.dataobj[..., i], dtype=np.float64)
        sigma = float(np.std((np.asarray(a.dataobj[..., i], np.float64) - truth)[mask]))
        out.append(registration_bound(truth, a.affine, sigma, mask))
    return np.array(out)


def child_json(cmd, env=None) -> dict:
    """Run ``cmd``; its last stdout line as JSON (plus ``child_s``), or ``{"error": ...}``."""
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        return {"error": (proc.stderr or proc.stdout)[-2000:]}
    record = json.loads(proc.stdout.strip().splitlines()[-1])
    record["child_s"] = time.perf_counter() - start
    return record


def run_nidask(
    series, out: Path, workers: int, passes: int | None = None
) -> tuple[dict, np.ndarray | None, list]:
    c = series.companions
    cmd = [sys.executable, str(HERE / "_nidask_task.py"), "estimate", "--nii", series.image]
    cmd += ["--bvec", c["bvec_file"], "--bval", c["bval_file"], "--mask", c["brainmask_file"]]
    cmd += ["--out", str(out), "--model", "auto", "--workers", str(workers)]
    cmd += ["--cache-dir", str(out / "cache")]
    cmd += [] if passes is None else ["--passes", str(passes)]
    env = dict(os.environ)
    if os.environ.get("NIDASK_BENCH_SRC"):  # a snapshot of src/ measured instead
        env["PYTHONPATH"] = os.environ["NIDASK_BENCH_SRC"]
    record = child_json(cmd, env)
    if "error" in record:
        return record, None, []
    matrices = np.load(record["motion"])[np.argsort(np.load(record["index"]))]
    with open(out / "run" / "report.json") as f:
        report = json.load(f)
    order = np.argsort([v["index"] for v in report["volumes"]])
    flags = [report["volumes"][k]["flags"] for k in order]
    return record, matrices, flags


def peer_python() -> str:
    """The peer venv's interpreter (``NIDASK_PEER_PYTHON_BIN``, else ``NIDASK_PEER_VENV``'s)."""
    venv = os.environ.get("NIDASK_PEER_VENV", Path.home() / ".cache/nidask/nifreeze-venv")
    return os.environ.get("NIDASK_PEER_PYTHON_BIN") or str(Path(venv) / "bin" / "python")


def run_ants(series, out: Path, bvals, workers: int, volumes) -> tuple[dict, object]:
    import nibabel as nb

    python = peer_python()
    if not Path(python).exists():
        return {"error": f"no peer venv python at {python}"}, None
    image, bval = series.image, series.companions["bval_file"]
    if len(volumes) < len(bvals):
        source = nb.load(series.image)
        image = str(out / "selected.nii")
        data = np.asarray(source.dataobj)[..., volumes]
        nb.Nifti1Image(data, source.affine).to_filename(image)
        bval = str(out / "selected.bval")
        np.savetxt(bval, bvals[None, volumes], fmt="%g")
    matrices = out / "ants.npy"
    cmd = [python, str(HERE / "peer_ants.py"), "--nii", image, "--bval", bval]
    cmd += ["--mask", series.companions["brainmask_file"], "--out", str(matrices)]
    cmd += ["--threads", str(workers), "--seed", "1234"]
    record = child_json(cmd)
    return record, (None if "error" in record else np.load(matrices))


def shell_errors(estimate, truth, affine, shape3d, mask, bvals, cov=None, flags=None) -> dict:
    """Per shell (and all volumes): median translation / rotation, worst displacement."""
    from nidask.validation.evaluation import bound_errors, motion_errors

    errors = motion_errors(estimate, truth, affine, shape3d, mask=mask)
    translation = np.asarray(errors["translation_mm"])
    rotation = np.asarray(errors["rotation_deg"])
    displacement = np.asarray(errors["displacement_mm"])
    shells = np.round(bvals, -2)
    out = {}
    for label, where in [(f"b={b:g}", shells == b) for b in np.unique(shells)] + [
        ("all", np.ones(len(bvals), bool))
    ]:
        cell = {
            "translation_mm_median": float(np.median(translation[where])),
            "rotation_deg_median": float(np.median(rotation[where])),
            "displacement_mm_max": float(displacement[where].max()),
            "translation_mm_max": float(translation[where].max()),
            "rotation_deg_max": float(rotation[where].max()),
        }
        if cov is not None:
            best = bound_errors(cov[where])
            cell["bound_mm_median"] = best["translation_mm_median"]
            cell["bound_deg_median"] = best["rotation_deg_median"]
        if flags is not None:
            bad = [i for i in np.flatnonzero(where) if displacement[i] > LIMIT_MM]
            cell["over_limit"] = len(bad)
            cell["over_limit_unflagged"] = sum(1 for i in bad if not flags[i])
        out[label] = cell
    return out


def scored_volumes(bvals: np.ndarray, k: int) -> np.ndarray:
    """Every b=0 volume and every ``k``-th volume of each shell, in series order.

    Taken per shell, since interleaved shells alias with a stride over the series.
    """
    shells = np.round(bvals, -2)
    picked = [np.flatnonzero(bvals < 50)]
    for b in np.unique(shells[bvals >= 50]):
        picked.append(np.flatnonzero((shells == b) & (bvals >= 50))[::k])
    return np.sort(np.concatenate(picked))


def run(args) -> dict:
    import nibabel as nb

    work = Path(tempfile.mkdtemp(prefix="nidask-protocols-", dir=args.work))
    results = {"snr_b0": SNR, "series": []}
    try:
        anatomy = load_anatomy(work)
        results["grid"] = [*anatomy.shape3d]
        results["voxel_mm"] = 2.0
        for key in args.series:
            for kind in args.motion:
                directory = work / f"{key}-{kind}"
                directory.mkdir()
                noisy, clean, bvals = make_series(directory, key, kind, anatomy)
                mask = np.asarray(nb.load(noisy.companions["brainmask_file"]).dataobj) > 0
                cov = bounds(noisy, clean, mask)
                entry = {"key": key, "label": PROTOCOLS[key][0], "motion": kind}
                entry["n_volumes"] = len(bvals)
                print(f"protocols: {key} {kind} ({len(bvals)} volumes)", file=sys.stderr)
                # ANTs on every b=0 and every k-th volume of each shell; both scored there
                scored = scored_volumes(bvals, args.k)
                if not args.skip_ants:
                    record, ants = run_ants(noisy, directory, bvals, args.workers, scored)
                    entry["ants"] = {"wall_s": record.get("wall_s"), "volumes": len(scored)}
                    if ants is None:
                        entry["ants"]["error"] = record["error"]
                    else:
                        entry["ants"]["s_per_volume"] = record.get("s_per_volume")
                        entry["ants"]["errors"] = shell_errors(
                            ants, noisy.motion[scored], noisy.affine, anatomy.shape3d, mask,
                            bvals[scored], cov[scored],
                        )  # fmt: skip
                for name, passes in VARIANTS:
                    out = directory / name
                    record, nidask, flags = run_nidask(noisy, out, args.workers, passes)
                    entry[name] = {k: record.get(k) for k in ("wall_s", "passes", "flags")}
                    if nidask is None:
                        entry[name]["error"] = record["error"]
                        continue
                    entry[name]["s_per_volume"] = record["wall_s"] / len(bvals)
                    entry[name]["errors_all_volumes"] = shell_errors(
                        nidask,
                        noisy.motion,
                        noisy.affine,
                        anatomy.shape3d,
                        mask,
                        bvals,
                        cov,
                        flags,
                    )
                    entry[name]["errors"] = shell_errors(  # the volumes ANTs estimated
                        nidask[scored], noisy.motion[scored], noisy.affine, anatomy.shape3d,
                        mask, bvals[scored], cov[scored], [flags[i] for i in scored],
                    )  # fmt: skip
                    shutil.rmtree(out, ignore_errors=True)
                results["series"].append(entry)
                print(table(results), file=sys.stderr)
                shutil.rmtree(directory, ignore_errors=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return results


def _cell(errors: dict | None, shell: str) -> str:
    if not errors or shell not in errors:
        return ""
    c = errors[shell]
    return f"{c['translation_mm_median']:.3f} / {c['rotation_deg_median']:.3f}"


def _ratio(mine: dict, theirs: dict, shell: str) -> str:
    if shell not in theirs or shell not in mine or theirs[shell]["translation_mm_median"] <= 0:
        return ""
    return f"{mine[shell]['translation_mm_median'] / theirs[shell]['translation_mm_median']:.2f}"


def default_variant(key: str) -> str:
    """The run the estimator's default makes on protocol ``key`` (by its shell size)."""
    from nidask import Estimator

    _, _, n_dw, shells, _ = PROTOCOLS[key]
    return REFINED if Estimator().pass_count(True, n_dw // len(shells)) else ANCHOR_ONLY


def table(results: dict) -> str:
    """The markdown table: one row per series and shell (median translation / rotation).

    Worst displacement and volumes over the limit are the default's (the variant in
    bold).
    """
    lines = [
        "| series | motion | shell | Cramér-Rao bound | ANTs to b0 | anchor only (passes=0) "
        "| / ANTs | anchor + 2 passes | / ANTs | / bound (default) | worst mm (default) "
        "| > 0.5 mm, unflagged (default) | s / vol: ANTs, passes=0, passes=2 |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for entry in results["series"]:
        theirs = entry.get("ants", {}).get("errors") or {}
        runs = {name: entry.get(name, {}).get("errors") or {} for name, _ in VARIANTS}
        chosen = default_variant(entry["key"])
        default = runs[chosen]
        speeds = ", ".join(
            f"{entry.get(name, {}).get('s_per_volume') or float('nan'):.2f}"
            for name in ("ants", ANCHOR_ONLY, REFINED)
        )
        for k, shell in enumerate(default):
            c = default[shell]
            first = k == 0
            cells = [
                f"{entry['label']} ({entry['n_volumes']} vol.)" if first else "",
                entry["motion"] if first else "",
                shell,
                f"{c['bound_mm_median']:.3f} / {c['bound_deg_median']:.3f}",
                _cell(theirs, shell),
            ]
            for name, _ in VARIANTS:
                cell = _cell(runs[name], shell)
                cells += [f"**{cell}**" if name == chosen and cell else cell]
                cells += [_ratio(runs[name], theirs, shell)]
            cells += [
                f"{c['translation_mm_median'] / max(c['bound_mm_median'], 1e-9):.1f}",
                f"{c['displacement_mm_max']:.3f}",
                f"{c['over_limit']} ({c['over_limit_unflagged']})",
                speeds if first else "",
            ]
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--series", default="b,c,d,e", help="protocols (a,b,c,d,e,f,g)")
    p.add_argument("--motion", default="random,mcflirt", help="random, mcflirt or both")
    p.add_argument("--skip-ants", action="store_true", help="nidask only")
    p.add_argument(
        "-k",
        type=int,
        default=1,
        help="ANTs on the b=0 and every k-th volume of each shell (default 1: all)",
    )
    p.add_argument("--workers", type=int, default=2, help="threads per tool (default 2)")
    p.add_argument("--work", default=None, help="where series are written (default: temp)")
    p.add_argument("--out", help="results (default results/protocols.json)")
    p.add_argument("--table", metavar="JSON", help="print the table of a saved run")
    p.add_argument(
        "--contrast-floor",
        action="store_true",
        help="both tools on a noise-free series (the offset left between contrasts)",
    )
    args = p.parse_args(argv)
    if args.table:
        return print_saved(args.table, lambda r: (floor_table if "tools" in r else table)(r))
    if args.contrast_floor:
        out = args.out or HERE / "results" / "contrast_floor.json"
        return save_and_print(contrast_floor(args), out, floor_table)
    args.series = [s for s in args.series.split(",") if s]
    args.motion = [m for m in args.motion.split(",") if m]
    unknown = set(args.series) - set(PROTOCOLS) | set(args.motion) - {"random", "mcflirt"}
    if unknown:
        p.error(f"unknown series or motion: {', '.join(sorted(unknown))}")
    results = run(args)
    return save_and_print(results, args.out or HERE / "results" / "protocols.json", table)


if __name__ == "__main__":
    sys.exit(main())
