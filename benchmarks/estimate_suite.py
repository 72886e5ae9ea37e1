"""Motion-estimation accuracy against known motion: nidask beside ANTs and nifreeze.

    python benchmarks/run.py --suites estimate [--estimate-size small|medium] [--skip-peer]
        [--estimate-series hcp,shell,pet,real,bold]

Registered in ``run.py``'s ``SUITES`` as ``"estimate"``.  The suite writes its own
series into the work directory (not ``run.py``'s random-noise series), each with
known motion, and runs every tool on the same files, each run in its own child
process:

- **3-shell HCP-like**: :func:`nidask.validation.phantom.make_hcp_like` (b = 1000/2000/3000,
  interleaved moving b=0 volumes, realistic motion);
- **single shell b=1000**: :func:`nidask.validation.phantom.make_dwi` (interleaved b=0);
- **PET**: :func:`nidask.validation.phantom.make_pet` (frame 0 is the motion-free reference);
- **real anatomy, same contrast**: heudiconv's Siemens DWI test DICOMs converted
  with ``dcm2niix``, its first volume (b=5, a b=0) moved by nipype's real MCFLIRT
  trajectory scaled x3 (:func:`nidask.validation.phantom.make_moved_series`).

Tools: nidask's ``Estimator`` (``benchmarks/_nidask_task.py estimate``, one child per
model); ``benchmarks/peer_ants.py`` (every volume registered to a template with ANTs
rigid Mattes MI); ``benchmarks/peer_nifreeze_estimate.py`` (nifreeze 0.1.0's
Estimator, avgdwi model, DW volumes only).  Peers run with the peer venv's python
(``NIDASK_PEER_ANTS=1 bash benchmarks/setup_peer_env.sh``); they are n/a with
``--skip-peer`` or without that venv.  Every tool gets the phantom's brain mask and
``--workers`` threads (2 by default).

Errors are :func:`nidask.validation.evaluation.motion_errors` in the parent: translation of the
field-of-view centre (mm) and rotation angle (degrees) of each volume's residual
after one common rigid offset is removed (each tool reports motion in its own
reference frame), and the residual's mean displacement over the brain mask (mm).
Within one row group (series + "volumes" column) every tool is scored on the same
volumes: all file volumes, or, for DWI series, the diffusion-weighted volumes only
(nifreeze estimates those alone; nidask's and ANTs' errors on them come from the
same runs as their all-volume rows).  Time is the child's work (imports excluded);
``s/volume`` divides it by the number of volumes the tool estimated (nidask and ANTs:
every file volume; nifreeze: the DW volumes).  ``CPU s/volume`` is the child's CPU
time (all threads and its own children, imports included) over the same count.  Other
jobs on the cores inflate both (``load``: the 1-minute load average at the child's
start).  Memory is peak RSS (VmHWM) above the child's post-import baseline.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
ANTS_TASK = HERE / "peer_ants.py"
NIFREEZE_TASK = HERE / "peer_nifreeze_estimate.py"
PEER_SEED = 1234  # ANTs and nifreeze seed (non-zero: ANTs seeds from the clock with 0)

#: the feature of this suite's targets (the ``feature`` of every target it records), checked
#: on the 3-shell HCP-like series (nidask, model "auto")
FEATURE = "accuracy"
MEDIAN_MM, MEDIAN_DEG = 0.05, 0.05
WORST_MM, WORST_DEG = 0.3, 0.3

#: series sizes per ``--estimate-size``
SIZES = {
    "medium": {
        "hcp": {"shape3d": (44, 52, 38), "zooms": (2.7, 2.7, 2.7), "n_per_shell": 90, "n_b0": 18},
        "shell": {"shape3d": (48, 48, 36), "n_b0": 6, "n_directions": 64, "b0_every": 12},
        "pet": {"shape3d": (40, 40, 30), "n_frames": 20},
        # the DICOM grid is 150x152x81 at 1.5 mm; ANTs takes about a minute per volume
        # there on this machine, so the medium run uses it block-averaged to 3 mm
        "real": {"factor": 2, "n_volumes": 60},
        "bold": {"n_volumes": 40},
    },
    "small": {
        "hcp": {"shape3d": (28, 32, 24), "zooms": (3.0, 3.0, 3.0), "n_per_shell": 20, "n_b0": 6},
        "shell": {"shape3d": (32, 32, 24), "n_b0": 3, "n_directions": 30, "b0_every": 12},
        "pet": {"shape3d": (28, 28, 20), "n_frames": 12},
        "real": {"factor": 2, "n_volumes": 20},
        "bold": {"n_volumes": 16},
    },
}
MCFLIRT_SCALE = 3.0
BOUND_TOOL = "Cramér-Rao bound"
REAL_NOISE = 0.03


# ------------------------------------------------------------------------ the series


@dataclass
class MotionSeries:
    """One generated series with known motion, and how every tool is run on it."""

    key: str
    label: str
    image: str
    motion: np.ndarray  # (N, 4, 4) true matrix of every file volume
    affine: np.ndarray
    shape3d: tuple
    mask_file: str
    nidask_args: dict  # companions for _nidask_task.py (bvec, bval, temporal, mask)
    models: list  # (nidask model, label)
    ants_bval: str | None = None  # peer_ants.py --bval
    ants_template: str = "b0"  # peer_ants.py --template
    ants_label: str = "ANTs to b0"
    bvec: str | None = None
    bval: str | None = None
    dw_volumes: np.ndarray | None = None  # file positions of the DW volumes (DWI only)
    info: dict = field(default_factory=dict)

    @property
    def n_volumes(self) -> int:
        return len(self.motion)

    def mask(self) -> np.ndarray:
        import nibabel as nb

        return np.asarray(nb.load(self.mask_file).dataobj) > 0


def fov_centre(affine, shape3d) -> np.ndarray:
    """RAS mm of the grid's centre (``nidask``'s ``fov_center``, without its module path)."""
    affine = np.asarray(affine, dtype=float)
    return affine[:3, :3] @ ((np.asarray(shape3d[:3], dtype=float) - 1) / 2) + affine[:3, 3]


def _motion_range(motion, affine, shape3d) -> dict:
    """Largest displacement of the FOV centre (mm) and rotation angle (deg) of the truth."""
    from nidask.validation.evaluation import rotation_angle

    centre = np.append(fov_centre(affine, shape3d), 1.0)
    shifts = [np.linalg.norm((m @ centre - centre)[:3]) for m in motion]
    return {
        "max_translation_mm": round(float(max(shifts)), 2),
        "max_rotation_deg": round(max(rotation_angle(m) for m in motion), 2),
    }


def _dwi_series(key: str, label: str, ph, ants_template="b0") -> MotionSeries:
    import nibabel as nb

    img = nb.load(ph.image)
    bvals = np.loadtxt(ph.companions["bval_file"]).ravel()
    c = ph.companions
    return MotionSeries(
        key=key,
        label=label,
        image=ph.image,
        motion=np.asarray(ph.motion),
        affine=img.affine,
        shape3d=tuple(img.shape[:3]),
        mask_file=c["brainmask_file"],
        nidask_args={"bvec": c["bvec_file"], "bval": c["bval_file"], "mask": c["brainmask_file"]},
        models=[("auto", "auto"), ("average", "average"), ("dti", "dti")],
        ants_bval=c["bval_file"],
        ants_template=ants_template,
        bvec=c["bvec_file"],
        bval=c["bval_file"],
        dw_volumes=np.flatnonzero(bvals > 50),
        info={"n_b0": int((bvals <= 50).sum()), "shells": sorted({float(b) for b in bvals})},
    )


def _noise(noise_free: bool, noise: float | None = None) -> dict:
    """The generator's ``noise`` option: 0 for the noise-free twin, else its own."""
    if noise_free:
        return {"noise": 0.0}
    return {} if noise is None else {"noise": noise}


def make_hcp(directory: Path, size: dict, noise_free: bool = False) -> MotionSeries:
    from nidask.validation import phantom

    ph = phantom.make_hcp_like(directory, **size, seed=0, **_noise(noise_free))
    return _dwi_series("hcp", "3-shell HCP-like", ph)


def make_single_shell(directory: Path, size: dict, noise_free: bool = False) -> MotionSeries:
    from nidask.validation import phantom

    ph = phantom.make_dwi(
        directory,
        **size,
        bvalues=(1000.0,),
        motion="realistic",
        seed=0,
        name="dwi",
        **_noise(noise_free),
    )
    return _dwi_series("shell", "single shell b=1000", ph)


def _zeros_bval(path: str, n: int) -> str:
    np.savetxt(path, np.zeros((1, n)), fmt="%d")
    return path


def make_pet_series(directory: Path, size: dict, noise_free: bool = False) -> MotionSeries:
    import nibabel as nb

    from nidask.validation import phantom

    ph = phantom.make_pet(directory, **size, seed=2, **_noise(noise_free))
    img = nb.load(ph.image)
    c = ph.companions
    n = img.shape[3]
    return MotionSeries(
        key="pet",
        label="PET",
        image=ph.image,
        motion=np.asarray(ph.motion),
        affine=img.affine,
        shape3d=tuple(img.shape[:3]),
        mask_file=c["brainmask_file"],
        nidask_args={"temporal": c["temporal_file"], "mask": c["brainmask_file"]},
        models=[("average", "average (= auto)"), ("pet", "pet")],
        # every frame to the plain mean frame: .bval of zeros, --template mean
        ants_bval=_zeros_bval(str(directory / "pet.bval"), n),
        ants_template="mean",
        ants_label="ANTs to mean frame",
    )


def _package_file(package: str, *parts: str) -> Path | None:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(next(iter(spec.submodule_search_locations)), *parts)
    return path if path.exists() else None


def _block_mean(volume: np.ndarray, affine: np.ndarray, factor: int):
    """Average ``factor``^3 blocks (the grid cropped to a multiple); the matching affine."""
    if factor == 1:
        return volume, affine
    x, y, z = (s // factor for s in volume.shape)
    cropped = volume[: x * factor, : y * factor, : z * factor]
    coarse = cropped.reshape(x, factor, y, factor, z, factor).mean(axis=(1, 3, 5))
    scale = np.diag([float(factor)] * 3 + [1.0])
    scale[:3, 3] = (factor - 1) / 2.0  # a block's centre, in fine voxels
    return coarse, affine @ scale


def make_real(directory: Path, size: dict, noise_free: bool = False) -> MotionSeries:
    """heudiconv's b=0 DICOM volume, moved by MCFLIRT's trajectory (x3)."""
    import nibabel as nb

    from nidask.validation import phantom

    dicoms = _package_file("heudiconv", "tests", "data", "b0dwiForFmap")
    par = _package_file("nipype", "testing", "data", "fsl_mcflirt_movpar.txt")
    dcm2niix = shutil.which("dcm2niix")
    if dicoms is None or par is None or dcm2niix is None:
        missing = [
            name
            for name, found in (("heudiconv", dicoms), ("nipype", par), ("dcm2niix", dcm2niix))
            if found is None
        ]
        raise RuntimeError(f"real-anatomy series needs {', '.join(missing)}")
    converted = directory / "dcm2niix"
    converted.mkdir(parents=True, exist_ok=True)
    proc = subprocess.run(
        [dcm2niix, "-o", str(converted), "-f", "dwi", str(dicoms)], capture_output=True, text=True
    )
    if proc.returncode != 0 or not (converted / "dwi.nii").exists():
        raise RuntimeError(f"dcm2niix failed: {proc.stdout[-300:]} {proc.stderr[-300:]}")
    img = nb.load(converted / "dwi.nii")
    bvals = np.loadtxt(converted / "dwi.bval").ravel()
    if bvals[0] > 50:
        raise RuntimeError(f"volume 0 of the DICOM series is not a b=0 (b={bvals[0]})")
    volume, affine = _block_mean(
        np.asarray(img.dataobj[..., 0], dtype=np.float64), img.affine, size["factor"]
    )
    shape3d = volume.shape
    motion = phantom.mcflirt_trajectory(
        par, n=size["n_volumes"], scale=MCFLIRT_SCALE, centre=fov_centre(affine, shape3d)
    )
    ph = phantom.make_moved_series(
        directory, volume, affine, motion, **_noise(noise_free, REAL_NOISE)
    )
    return MotionSeries(
        key="real",
        label="real anatomy, same contrast",
        image=ph.image,
        motion=np.asarray(ph.motion),
        affine=np.asarray(affine),
        shape3d=tuple(shape3d),
        mask_file=ph.companions["brainmask_file"],
        nidask_args={"mask": ph.companions["brainmask_file"]},
        models=[("average", "average (= auto)"), ("median", "median")],
        # every volume counts as b=0: the template is their registered mean
        ants_bval=_zeros_bval(str(directory / "series.bval"), len(motion)),
        ants_template="b0",
        ants_label="ANTs to template",
        info={
            "source": f"heudiconv {dicoms.relative_to(dicoms.parents[3])}, volume 0",
            "source_bvalue": float(bvals[0]),
            "dicom_grid": list(img.shape[:3]),
            "block_average": size["factor"],
            "trajectory": f"nipype {par.name}, first {len(motion)} rows x{MCFLIRT_SCALE:g}",
            "noise": REAL_NOISE,
        },
    )


def make_bold(directory: Path, size: dict, noise_free: bool = False) -> MotionSeries:
    """nibabel's real EPI volume (example4d, oblique 2 x 2 x 2.2 mm slab) as a BOLD run."""
    import json

    import nibabel as nb

    from nidask.validation import phantom

    epi = nb.load(_package_file("nibabel", "tests", "data", "example4d.nii.gz"))
    par = _package_file("nipype", "testing", "data", "fsl_mcflirt_movpar.txt")
    volume = np.asarray(epi.dataobj[..., 0], dtype=np.float64)
    motion = phantom.mcflirt_trajectory(
        par, n=size["n_volumes"], scale=MCFLIRT_SCALE, centre=fov_centre(epi.affine, volume.shape)
    )
    ph = phantom.make_moved_series(
        directory, volume, epi.affine, motion, name="bold", **_noise(noise_free, REAL_NOISE)
    )
    sidecar = directory / "bold.json"
    sidecar.write_text(json.dumps({"RepetitionTime": 2.0}))
    return MotionSeries(
        key="bold",
        label="BOLD: real EPI, real trajectory",
        image=ph.image,
        motion=np.asarray(ph.motion),
        affine=np.asarray(epi.affine),
        shape3d=tuple(volume.shape),
        mask_file=ph.companions["brainmask_file"],
        nidask_args={"sidecar": str(sidecar), "mask": ph.companions["brainmask_file"]},
        models=[
            ("average", "average (= auto)"),
            ("neighbours", "neighbours"),
            ("average,neighbours", "average, then neighbours"),
        ],
        ants_bval=_zeros_bval(str(directory / "bold.bval"), len(motion)),
        ants_template="b0",
        ants_label="ANTs to template",
        info={
            "source": "nibabel tests/data/example4d.nii.gz, volume 0",
            "trajectory": f"nipype {Path(par).name}, first {len(motion)} rows x{MCFLIRT_SCALE:g}",
            "noise": REAL_NOISE,
        },
    )


GENERATORS = (
    ("hcp", make_hcp),
    ("shell", make_single_shell),
    ("pet", make_pet_series),
    ("real", make_real),
    ("bold", make_bold),
)


# ------------------------------------------------------------------------ the runs


def src_digest(src: Path) -> str:
    """Digest of nidask's sources under ``src``: whether they changed while a series ran."""
    digest = hashlib.sha256()
    for path in sorted((src / "nidask").rglob("*.py")):
        digest.update(str(path.relative_to(src)).encode() + path.read_bytes())
    return digest.hexdigest()[:12]


def _host(ctx):
    """run.py's module (``__main__`` when run as a script): its child-process helpers."""
    return sys.modules[type(ctx).__module__]


def _ants_available(peer_python: str | None) -> bool:
    return peer_python is not None and (Path(peer_python).parent / "antsRegistration").exists()


def run_nidask(ctx, series: MotionSeries, model: str, out: Path) -> tuple[dict, tuple | None]:
    host = _host(ctx)
    cmd = [sys.executable, str(host.NIDASK_TASK), "estimate", "--nii", series.image]
    cmd += ["--out", str(out), "--model", model, "--workers", str(ctx.args.workers)]
    cmd += ["--chunk-size", ctx.args.chunk_size, "--cache-dir", str(ctx.work / "cache")]
    for key, value in series.nidask_args.items():
        cmd += [f"--{key}", value]
    record = host.run_child(cmd, host._nidask_env(), 1)
    if "error" in record:
        return record, None
    return record, (np.load(record["motion"]), np.load(record["index"]))


def run_ants(ctx, series: MotionSeries, out: Path) -> tuple[dict, tuple | None]:
    host = _host(ctx)
    matrices = out / "ants.npy"
    cmd = [ctx.peer_python, str(ANTS_TASK), "--nii", series.image, "--bval", series.ants_bval]
    cmd += ["--mask", series.mask_file, "--out", str(matrices), "--template", series.ants_template]
    cmd += ["--threads", str(ctx.args.workers), "--seed", str(PEER_SEED)]
    record = host.run_child(cmd, host._peer_env(), 1)
    if "error" in record:
        return record, None
    return record, (np.load(matrices), np.arange(series.n_volumes))


def run_nifreeze(ctx, series: MotionSeries, out: Path) -> tuple[dict, tuple | None]:
    host = _host(ctx)
    matrices = out / "nifreeze.npy"
    cmd = [ctx.peer_python, str(NIFREEZE_TASK), "--nii", series.image, "--bvec", series.bvec]
    cmd += ["--bval", series.bval, "--mask", series.mask_file, "--out", str(matrices)]
    cmd += ["--model", "avgdwi", "--threads", str(ctx.args.workers), "--seed", str(PEER_SEED)]
    record = host.run_child(cmd, host._peer_env(), 1)
    if "error" in record:
        return record, None
    return record, (np.load(matrices), np.load(record["out_index"]))


# ----------------------------------------------------------------------- the errors


def score(series: MotionSeries, estimate: tuple, volumes: np.ndarray, mask) -> dict:
    """``motion_errors`` of an estimate (matrices, file positions) on file ``volumes``."""
    from nidask.validation.evaluation import motion_errors

    matrices, index = estimate
    row_of = {int(v): r for r, v in enumerate(index)}
    missing = [int(v) for v in volumes if int(v) not in row_of]
    if missing:
        raise ValueError(f"no estimate for file volumes {missing[:5]}")
    estimated = matrices[[row_of[int(v)] for v in volumes]]
    errors = motion_errors(
        estimated, series.motion[volumes], series.affine, series.shape3d, mask=mask
    )
    keep = (
        "translation_mm_median",
        "translation_mm_max",
        "rotation_deg_median",
        "rotation_deg_max",
        "displacement_mm_median",
        "displacement_mm_max",
        "worst_volume",
        "offset_parameters",
        "translation_mm",
        "rotation_deg",
        "displacement_mm",
    )
    summary = {k: errors[k] for k in keep if k in errors}
    summary["worst_volume"] = int(volumes[summary["worst_volume"]])  # a file position
    return summary


def _group_label(series: MotionSeries, volumes: np.ndarray) -> str:
    if len(volumes) == series.n_volumes:
        return f"all ({len(volumes)})"
    return f"DW ({len(volumes)})"


def precision_bound(series: MotionSeries, clean: MotionSeries) -> np.ndarray:
    """Each volume's Cramér-Rao covariance (N, 6, 6), from its noise-free twin.

    The noise is measured, not assumed: its standard deviation is that of the
    difference between the series and its noise-free twin inside the brain mask.
    """
    import nibabel as nb

    from nidask.validation.evaluation import registration_bound

    noisy, twin = nb.load(series.image), nb.load(clean.image)
    if not np.allclose(clean.motion, series.motion):
        raise RuntimeError(f"the noise-free twin of {series.label} moves differently")
    mask = series.mask()
    covariances = []
    for i in range(series.n_volumes):
        truth = np.asarray(twin.dataobj[..., i], dtype=np.float64)
        sigma = float(np.std((np.asarray(noisy.dataobj[..., i], dtype=np.float64) - truth)[mask]))
        covariances.append(registration_bound(truth, series.affine, sigma, mask))
    return np.array(covariances)


def _bound_row(series: MotionSeries, bound: np.ndarray, volumes: np.ndarray) -> dict:
    from nidask.validation.evaluation import bound_errors

    return {
        "suite": "estimate",
        "task": series.label,
        "tool": BOUND_TOOL,
        "model": "noise-free reference",
        "series": series.label,
        "volumes": _group_label(series, volumes),
        "errors": bound_errors(bound[volumes]),
        "note": "the best any unbiased registration of each volume can do",
    }


def _by_bvalue(series: MotionSeries, runs: list, bound: np.ndarray) -> dict:
    """Median translation / rotation error per b-value: the bound and nidask's runs."""
    from nidask.validation.evaluation import bound_errors

    bvals = np.round(np.loadtxt(series.bval).ravel(), -2)
    table = {}
    for b in np.unique(bvals):
        volumes = np.flatnonzero(bvals == b)
        errors = bound_errors(bound[volumes])
        cells = {BOUND_TOOL: [errors["translation_mm_median"], errors["rotation_deg_median"]]}
        for run in runs:
            if run.tool == "nidask" and run.estimate is not None:
                scored = score(series, run.estimate, volumes, None)
                cells[f"nidask {run.model}"] = [
                    scored["translation_mm_median"],
                    scored["rotation_deg_median"],
                ]
        table[f"b={b:g}"] = cells
    return table


# ---------------------------------------------------------------------------- suite


def suite_estimate(ctx) -> None:
    """Motion-estimation accuracy on series with known motion, nidask beside its peers."""
    size_name = getattr(ctx.args, "estimate_size", "medium")
    sizes = SIZES[size_name]
    peer = ctx.peer_python
    ants_ok = _ants_available(peer)
    peer_note = (
        "n/a (--skip-peer or no peer env)"
        if peer is None
        else ("n/a (no ANTs in the peer env)" if not ants_ok else None)
    )
    notes = ctx.notes.setdefault(
        "estimate", {"size": size_name, "threads": ctx.args.workers, "series": {}}
    )
    chosen = getattr(ctx.args, "estimate_series", None) or [key for key, _ in GENERATORS]
    for key, generate in GENERATORS:
        if key not in chosen:
            continue
        directory = ctx.work / "estimate" / key
        directory.mkdir(parents=True, exist_ok=True)
        try:
            series = generate(directory, sizes[key])
        except Exception as exc:  # one missing input must not lose the other series
            print(f"estimate: {key} series not generated: {exc}", file=sys.stderr)
            notes["series"][key] = {"error": str(exc)}
            ctx.rows.append(
                {"suite": "estimate", "task": key, "tool": "-", "error": f"series: {exc}"}
            )
            continue
        notes["series"][key] = {
            "label": series.label,
            "shape": [*series.shape3d, series.n_volumes],
            "voxel_mm": np.linalg.norm(series.affine[:3, :3], axis=0).round(3).tolist(),
            **_motion_range(series.motion, series.affine, series.shape3d),
            **series.info,
        }
        print(f"estimate: {series.label} {notes['series'][key]['shape']}", file=sys.stderr)
        twin = directory / "noise-free"
        twin.mkdir(exist_ok=True)
        bound = precision_bound(series, generate(twin, sizes[key], noise_free=True))
        before = src_digest(_host(ctx).SRC)
        _run_series(ctx, series, ants_ok, peer_note, bound)
        after = src_digest(_host(ctx).SRC)
        notes["series"][key]["src_digest"] = before if before == after else f"{before}->{after}"
        shutil.rmtree(directory, ignore_errors=True)


@dataclass
class _Run:
    """One tool's run on a series: its child's record and (matrices, file positions)."""

    tool: str
    model: str
    record: dict | None
    estimate: tuple | None
    note: str | None
    dw_only: bool = False


def _progress(run: _Run) -> None:
    if run.record is None:
        state = run.note or "n/a"
    elif "error" in run.record:
        state = "ERROR " + run.record["error"].strip().splitlines()[-1][:100]
    else:
        state = f"{run.record['wall_s']:.1f} s"
    print(f"estimate:   {run.tool} ({run.model}): {state}", file=sys.stderr, flush=True)


def _run_series(
    ctx, series: MotionSeries, ants_ok: bool, peer_note: str | None, bound: np.ndarray
) -> None:
    mask = series.mask()
    all_volumes = np.arange(series.n_volumes)
    runs: list[_Run] = []  # every tool's run on this series
    for model, label in series.models:
        out = ctx.outdir(f"estimate-{series.key}-{model}")
        record, estimate = run_nidask(ctx, series, model, out)
        note = ""
        if estimate is not None:
            note = f"{len(record.get('passes', []))} passes"
            if record.get("flags"):
                note += "; flags " + ", ".join(f"{k} {v}" for k, v in record["flags"].items())
        runs.append(_Run("nidask", label, record, estimate, note))
        _progress(runs[-1])
        shutil.rmtree(out, ignore_errors=True)
        shutil.rmtree(ctx.work / "cache", ignore_errors=True)
    if series.ants_bval is not None:
        tool, model = series.ants_label, "rigid Mattes MI"
        if ants_ok:
            out = ctx.outdir(f"estimate-{series.key}-ants")
            record, estimate = run_ants(ctx, series, out)
            note = ""
            if estimate is not None:
                note = (
                    f"template: {series.ants_template} ({record['template_volumes']} vol, "
                    f"{record['template_s']:.0f} s); registration "
                    f"{record['register_s_per_volume']:.2f} s/vol"
                )
            runs.append(_Run(tool, model, record, estimate, note))
            _progress(runs[-1])
            shutil.rmtree(out, ignore_errors=True)
        else:
            runs.append(_Run(tool, model, None, None, peer_note))
    if series.dw_volumes is not None:
        tool, model = "nifreeze 0.1.0", "avgdwi"
        note = "estimates DW volumes only"
        if ants_ok:
            out = ctx.outdir(f"estimate-{series.key}-nifreeze")
            record, estimate = run_nifreeze(ctx, series, out)
            if estimate is not None:
                note += "; RSS excludes its ANTs child processes"
            runs.append(_Run(tool, model, record, estimate, note, dw_only=True))
            _progress(runs[-1])
            shutil.rmtree(out, ignore_errors=True)
        else:
            runs.append(_Run(tool, model, None, None, peer_note, dw_only=True))

    groups = [all_volumes]
    if series.dw_volumes is not None:
        groups.append(series.dw_volumes)
    rows_by_group: list[dict[str, dict]] = []
    for volumes in groups:
        whole = volumes is all_volumes
        extra = {"series": series.label, "volumes": _group_label(series, volumes)}
        by_tool: dict[str, dict] = {}
        for run in runs:
            if whole and run.dw_only:
                continue
            if whole or run.dw_only:  # the run's own row: time and memory
                row = ctx.add_row(
                    "estimate", series.label, run.tool, run.record, model=run.model, **extra
                )
                if run.note:
                    row["note"] = run.note
                if "wall_s" in row and run.estimate is not None:
                    n = len(run.estimate[1])
                    row["n_estimated"] = n
                    row["s_per_volume"] = row["wall_s"] / n
                    row["loadavg_at_start"] = run.record["loadavg_at_start"][0]
            else:  # the same run scored on the DW volumes only
                row = {"suite": "estimate", "task": series.label, "tool": run.tool}
                row.update(model=run.model, **extra)
                row["note"] = (
                    "same run as the all-volume row"
                    if run.estimate is not None
                    else "see the all-volume row"
                )
                ctx.rows.append(row)
            if run.estimate is not None:
                try:
                    row["errors"] = score(series, run.estimate, volumes, mask)
                except ValueError as exc:
                    row["error"] = f"scoring: {exc}"
            by_tool[f"{run.tool}|{run.model}"] = row
        ctx.rows.append(_bound_row(series, bound, volumes))
        by_tool[BOUND_TOOL] = ctx.rows[-1]
        rows_by_group.append(by_tool)
    if series.bval is not None:
        ctx.notes["estimate"]["series"][series.key]["by_bvalue"] = _by_bvalue(series, runs, bound)
    if series.key == "hcp":
        _targets(ctx, rows_by_group[0])


def _targets(ctx, rows: dict[str, dict]) -> None:
    """Accuracy targets on the 3-shell series, all volumes: nidask auto vs fixed bounds, ANTs."""
    nd = rows.get("nidask|auto")
    ants = next((r for k, r in rows.items() if k.startswith("ANTs")), None)
    err = (nd or {}).get("errors")
    checks = (
        ("median translation", "translation_mm_median", MEDIAN_MM, "mm"),
        ("median rotation", "rotation_deg_median", MEDIAN_DEG, "deg"),
        ("worst translation", "translation_mm_max", WORST_MM, "mm"),
        ("worst rotation", "rotation_deg_max", WORST_DEG, "deg"),
    )
    best = rows[BOUND_TOOL]["errors"]
    for name, key, bound, unit in checks:
        ctx.target(
            FEATURE,
            f"3-shell, nidask auto: {name}",
            f"<= {bound} {unit}",
            "failed" if err is None else f"{err[key]:.3f} {unit}",
            None if err is None else err[key] <= bound,
        )
        # a target below the bound cannot be met by any registration of these data
        ctx.target(
            FEATURE,
            f"3-shell, Cramér-Rao bound: {name}",
            f"<= {bound} {unit}",
            f"{best[key]:.3f} {unit}",
            best[key] <= bound,
        )
    ants_err = (ants or {}).get("errors")
    for name, key, unit in (
        ("median translation", "translation_mm_median", "mm"),
        ("median rotation", "rotation_deg_median", "deg"),
    ):
        ctx.target(
            FEATURE,
            f"3-shell: nidask auto {name} better than ANTs to b0",
            "< ANTs",
            "n/a"
            if err is None or ants_err is None
            else f"{err[key]:.3f} vs {ants_err[key]:.3f} {unit}",
            None if err is None or ants_err is None else err[key] < ants_err[key],
        )
    nd_spv = (nd or {}).get("s_per_volume")
    ants_spv = (ants or {}).get("s_per_volume")
    ctx.target(
        FEATURE,
        "3-shell: nidask auto seconds per volume <= ANTs to b0",
        "<= ANTs",
        "n/a" if nd_spv is None or ants_spv is None else f"{nd_spv:.2f} vs {ants_spv:.2f} s",
        None if nd_spv is None or ants_spv is None else nd_spv <= ants_spv,
    )


# ------------------------------------------------------------------------- reporting

COLUMNS = (
    "series",
    "volumes",
    "tool",
    "model",
    "median / worst mm",
    "median / worst deg",
    "displacement mm",
    "s / volume",
    "CPU s / volume",
    "total s",
    "peak RSS MB",
    "load",
    "notes",
)


def _pair(errors: dict | None, key: str) -> str:
    if not errors:
        return ""
    return f"{errors[f'{key}_median']:.3f} / {errors[f'{key}_max']:.3f}"


def estimate_table(rows: list[dict], notes: dict | None = None) -> str:
    """Markdown table of the estimate suite's rows (and a line per series)."""
    lines = []
    for info in ((notes or {}).get("series") or {}).values():
        if "error" in info:
            continue
        voxel = "x".join(f"{z:g}" for z in info["voxel_mm"])
        changed = "->" in info.get("src_digest", "")
        lines.append(
            f"- {info['label']}: {'x'.join(map(str, info['shape']))} at {voxel} mm, "
            f"true motion up to {info['max_translation_mm']} mm / "
            f"{info['max_rotation_deg']} deg"
            + ("; **nidask's sources changed during these runs**" if changed else "")
        )
    if lines:
        lines.append("")
    lines += ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for row in rows:
        errors = row.get("errors")
        note = row.get("note", "")
        if "error" in row:
            note = "ERROR: " + row["error"].strip().splitlines()[-1][:100]
        disp = (
            f"{errors['displacement_mm_median']:.3f}"
            if errors and "displacement_mm_median" in errors
            else ""
        )
        cells = [
            row.get("series", row["task"]),
            row.get("volumes", ""),
            row["tool"],
            row.get("model", ""),
            _pair(errors, "translation_mm"),
            _pair(errors, "rotation_deg"),
            disp,
            f"{row['s_per_volume']:.2f}" if "s_per_volume" in row else "",
            f"{row['cpu_s'] / row['n_estimated']:.2f}"
            if row.get("cpu_s") and row.get("n_estimated")
            else "",
            f"{row['wall_s']:.1f}" if "wall_s" in row else "",
            f"{row['rss_mb']:.0f}" if "rss_mb" in row else "",
            f"{row['loadavg_at_start']:.1f}" if "loadavg_at_start" in row else "",
            note,
        ]
        lines.append("| " + " | ".join(cells) + " |")
    for info in ((notes or {}).get("series") or {}).values():
        if "by_bvalue" in info:
            lines += ["", f"{info['label']}, median translation (mm) / rotation (deg) by b-value:"]
            lines += [""] + bvalue_table(info["by_bvalue"])
    return "\n".join(lines)


def bvalue_table(by_bvalue: dict) -> list[str]:
    """Markdown lines: one row per b-value, one column per tool."""
    tools = list(next(iter(by_bvalue.values())))
    lines = ["| b-value | " + " | ".join(tools) + " |", "|---|" + "---|" * len(tools)]
    for b, cells in by_bvalue.items():
        pairs = [f"{cells[t][0]:.3f} / {cells[t][1]:.3f}" if t in cells else "" for t in tools]
        lines.append(f"| {b} | " + " | ".join(pairs) + " |")
    return lines


def peer_setup_env() -> dict:
    """Environment for ``setup_peer_env.sh`` when this suite runs: ANTs in the venv."""
    return {**os.environ, "NIDASK_PEER_ANTS": "1"}


def targets_table(targets: list[dict]) -> str:
    """Markdown table of the accuracy target checks."""
    lines = ["| target | goal | measured | met |", "|---|---|---|---|"]
    for t in targets:
        if t.get("feature") != FEATURE:
            continue
        met = {True: "yes", False: "**no**", None: "n/a"}[t["met"]]
        lines.append(f"| {t['target']} | {t['goal']} | {t['measured']} | {met} |")
    return "\n".join(lines)


if __name__ == "__main__":  # a saved results file's tables
    with open(sys.argv[1]) as f:
        saved = json.load(f)
    rows = [r for r in saved["rows"] if r.get("suite") == "estimate"]
    print(estimate_table(rows, saved.get("notes", {}).get("estimate")))
    if any(t.get("feature") == FEATURE for t in saved.get("targets", [])):
        print()
        print(targets_table(saved["targets"]))
