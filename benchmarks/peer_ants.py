"""Baseline head-motion estimate: every volume registered to the b=0 template with ANTs.

"Register each volume to the b=0 with ANTs rigid, mutual information" is what a user
would reach for first, so it is the baseline of the motion-estimation benchmark. Run
with the peer venv's interpreter after ``NIDASK_PEER_ANTS=1 bash
benchmarks/setup_peer_env.sh`` (antspyx needs numpy<2.4); this script never imports
nidask.

    PY=$(NIDASK_PEER_ANTS=1 bash benchmarks/setup_peer_env.sh)
    $PY benchmarks/peer_ants.py --nii DWI.nii[.gz] --bval DWI.bval [--mask MASK.nii] \
        --out matrices.npy [--threads N] [--seed N] [--template b0|first|mean]

Steps (``b <= 50`` counts as b=0, as in nifreeze):

1. The template (``--template``): ``b0`` (default), the first b=0 volume, or, with
   several, the mean of the first and every other b=0 registered to it (rigid,
   Mattes MI) and resampled (linear); ``first``, the first b=0 volume alone;
   ``mean``, the plain voxel-wise mean of every volume (no registration; e.g. a PET
   series registered to its mean frame, with a ``.bval`` of zeros).
2. Every volume of the file, b=0 included, is registered to the template with the
   same rigid Mattes MI registration (``ANTS_ARGS`` below), through antspyx's
   ``antsRegistration`` command-line main with ``--float 1``.

Output: ``--out`` holds an (N, 4, 4) float64 array, one matrix per file volume, in
nidask's convention: ``A`` maps template RAS mm to the volume's RAS mm, so
``template(x) = volume(A x)`` and resampling volume i samples it at
``inv(affine) @ A @ affine @ o`` for output voxel ``o``. ANTs/ITK transforms map fixed
(template) LPS points to moving LPS points, the same direction, so
``A = F @ A_lps @ F`` with ``F = diag(-1, -1, 1, 1)``.

One JSON line on stdout: ``wall_s`` (all work after the imports: template + every
registration + file I/O), ``s_per_volume`` (the template's time over ``n_volumes``
plus the time of one registration: ``wall_s / n_volumes`` when every volume is registered),
``register_s_per_volume`` (the per-volume loop only), ``template_s``, ``cpu_s`` (CPU
time of the work, all threads), ``loadavg`` (1-minute, at the end), ``maxrss_mb`` and
``baseline_mb`` (``VmHWM`` at the end and after the imports), ``n_volumes``, ``n_b0``,
``threads``, ``seed`` and the ANTs arguments used.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from _peak import maxrss_mb

LOWB_THRESHOLD = 50.0
"""b-values at or below this are b=0 volumes (nifreeze's ``DEFAULT_LOWB_THRESHOLD``)."""

F_RAS_LPS = np.diag([-1.0, -1.0, 1.0, 1.0])
"""RAS <-> LPS (its own inverse)."""

# Rigid + Mattes mutual information, three levels. Every fixed-image voxel is sampled
# (no sampling strategy): affordable at ~10^5 voxels, deterministic with one thread,
# and on the phantom the most robust of the variants tried (Regular/Random sampling,
# antsRegistrationSyN's 8x4x2x1 rigid stage, more iterations, other steps and bins;
# see benchmarks/ANTS_PEER.md).
TRANSFORM = "Rigid[0.1]"
METRIC = "Mattes[{fixed},{moving},1,32]"
CONVERGENCE = "[100x50x25,1e-6,10]"
SHRINK = "4x2x1"
SMOOTH = "2x1x0vox"
WINSORIZE = "[0.005,0.995]"


def ants_args(
    fixed: Path, moving: Path, prefix: Path, seed: int, mask: Path | None, transform=TRANSFORM
) -> list:
    """Arguments of antsRegistration (without the program name)."""
    args = [
        "--dimensionality", "3",
        "--float", "1",  # antspyx's main needs it for float images
        "--output", f"[{prefix}]",
        "--interpolation", "Linear",
        "--winsorize-image-intensities", WINSORIZE,
        "--use-histogram-matching", "0",
        "--collapse-output-transforms", "1",
        "--random-seed", str(seed),
        # identity, rotating about the centre of the fixed image's field of view
        "--initial-moving-transform", f"[{fixed},{moving},0]",
        "--transform", transform,
        "--metric", METRIC.format(fixed=fixed, moving=moving),
        "--convergence", CONVERGENCE,
        "--shrink-factors", SHRINK,
        "--smoothing-sigmas", SMOOTH,
        "--verbose", "0",
    ]  # fmt: skip
    if mask is not None:
        args += ["--masks", f"[{mask}]"]
    return args


def itk_to_nidask(path: Path) -> np.ndarray:
    """Read an ITK linear transform file and return nidask's RAS matrix.

    ITK's ``MatrixOffsetTransformBase`` maps a fixed LPS point ``x`` to
    ``M (x - c) + t + c`` in the moving image (parameters: the 9 entries of ``M`` row
    by row, then ``t``; fixed parameters: the centre ``c``).
    """
    import ants

    tx = ants.read_transform(str(path), precision="double")
    params = np.asarray(tx.parameters, dtype=np.float64)
    centre = np.asarray(tx.fixed_parameters, dtype=np.float64)
    if "Affine" not in tx.transform_type or params.size != 12 or centre.size != 3:
        raise RuntimeError(f"unexpected transform {tx.transform_type} in {path}")
    matrix = params[:9].reshape(3, 3)
    a_lps = np.eye(4)
    a_lps[:3, :3] = matrix
    a_lps[:3, 3] = params[9:] + centre - matrix @ centre
    # the same map evaluated by ITK itself, as a guard on the composition above
    for point in (np.zeros(3), np.array([50.0, -30.0, 20.0])):
        mapped = np.asarray(tx.apply_to_point(point.tolist()), dtype=np.float64)
        if not np.allclose(mapped, (a_lps @ np.append(point, 1.0))[:3], atol=1e-3):
            raise RuntimeError(f"ITK transform composition mismatch for {path}")
    return F_RAS_LPS @ a_lps @ F_RAS_LPS


def _write(vol: np.ndarray, affine: np.ndarray, path: Path) -> Path:
    import nibabel as nb

    img = nb.Nifti1Image(np.asarray(vol, dtype=np.float32), affine)
    # the same affine in both forms: ITK then reads one geometry whatever it prefers
    img.header.set_sform(affine, code=1)
    img.header.set_qform(affine, code=1)
    img.to_filename(path)
    return path


#: ``--transform antspy:NAME``: antspyx's ``ants.registration(type_of_transform=NAME)``
#: with its defaults, as a user calls it (for ``Rigid``: MI with 20 % regular sampling,
#: shrink factors 4x2x1 and no iteration at full resolution in antspyx 0.6.3).
ANTSPY = "antspy:"


def _register(
    fixed: Path, moving: Path, prefix: Path, seed: int, mask: Path | None, transform=TRANSFORM
):
    import ants

    if transform.startswith(ANTSPY):
        result = ants.registration(
            ants.image_read(str(fixed)),
            ants.image_read(str(moving)),
            type_of_transform=transform[len(ANTSPY) :],
            mask=None if mask is None else ants.image_read(str(mask)),
            outprefix=str(prefix),
            random_seed=seed,
        )
        return itk_to_nidask(Path(result["fwdtransforms"][0]))
    args = ants_args(fixed, moving, prefix, seed, mask, transform)
    code = ants.lib.antsRegistration(args)
    if code != 0:
        raise RuntimeError(f"antsRegistration exit {code}: {' '.join(args)}")
    return itk_to_nidask(Path(f"{prefix}0GenericAffine.mat"))


def _b0_template(
    volume, b0, affine, tmp: Path, seed: int, mask: Path | None, transform=TRANSFORM
) -> np.ndarray:
    """Mean of the first b=0 volume and every other one registered to it (linear)."""
    from scipy.ndimage import affine_transform

    first = volume(b0[0])
    template = first.astype(np.float64)
    first_path = _write(first, affine, tmp / "b0_first.nii")
    for k in b0[1:]:
        moving = _write(volume(k), affine, tmp / f"b0_{k:05d}.nii")
        a_ras = _register(first_path, moving, tmp / f"b0_{k:05d}_", seed, mask, transform)
        # b0_k resampled onto the first b0 (linear): samples at inv(aff) @ A @ aff @ o
        vox = np.linalg.inv(affine) @ a_ras @ affine
        template += affine_transform(volume(k), vox, order=1, mode="nearest")
    return template / len(b0)


def estimate(args: argparse.Namespace, tmp: Path) -> dict:
    import nibabel as nb

    img = nb.load(args.nii)
    if len(img.shape) != 4:
        raise SystemExit(f"{args.nii}: not a 4D image")
    affine = img.affine
    n = img.shape[3]
    bvals = np.loadtxt(args.bval, dtype=np.float64).ravel()
    if bvals.size != n:
        raise SystemExit(f"{args.bval}: {bvals.size} b-values for {n} volumes")
    b0 = np.flatnonzero(bvals <= LOWB_THRESHOLD)
    if b0.size == 0 and args.template != "mean":
        raise SystemExit("no b=0 volume (b <= 50)")
    mask = None
    if args.mask:
        mask_img = nb.load(args.mask)
        mask_data = (np.asarray(mask_img.dataobj) > 0).astype(np.uint8)
        mask = tmp / "mask.nii"
        nb.Nifti1Image(mask_data, mask_img.affine).to_filename(mask)

    def volume(i: int) -> np.ndarray:
        return np.asarray(img.dataobj[..., i], dtype=np.float32)  # scaling applied

    t0 = time.perf_counter()
    if args.template == "mean":
        template = np.zeros(img.shape[:3])
        for i in range(n):
            template += volume(i)
        template /= n
        template_volumes = np.arange(n)
    else:
        template_volumes = b0 if args.template == "b0" else b0[:1]
        template = _b0_template(
            volume, template_volumes, affine, tmp, args.seed, mask, args.transform
        )
    template_path = _write(template, affine, tmp / "template.nii")
    t1 = time.perf_counter()

    matrices = np.full((n, 4, 4), np.nan)
    chosen = range(n) if args.volumes is None else [int(v) for v in args.volumes.split(",")]
    for i in chosen:
        moving = _write(volume(i), affine, tmp / "moving.nii")
        matrices[i] = _register(
            template_path, moving, tmp / "vol_", args.seed, mask, args.transform
        )
    t2 = time.perf_counter()
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    np.save(out, matrices)
    wall = time.perf_counter() - t0
    return {
        "wall_s": round(wall, 6),
        # the template's share plus one registration (a --volumes subset extrapolates)
        "s_per_volume": round((t1 - t0) / n + (t2 - t1) / len(chosen), 6),
        "register_s_per_volume": round((t2 - t1) / len(chosen), 6),
        "registered_volumes": len(chosen),
        "template_s": round(t1 - t0, 6),
        "n_volumes": int(n),
        "n_b0": int(b0.size),
        "b0_volumes": b0.tolist(),
        "template": args.template,
        "template_volumes": len(template_volumes),
        "out": str(out),
    }


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--nii", required=True, help="4D NIfTI (.nii or .nii.gz)")
    p.add_argument("--bval", required=True, help="FSL-style .bval")
    p.add_argument("--mask", help="brain mask NIfTI (fixed-image mask; optional)")
    p.add_argument("--out", required=True, help="output .npy of (N, 4, 4) matrices")
    p.add_argument("--threads", type=int, default=1, help="ITK threads (default 1)")
    p.add_argument("--seed", type=int, default=1234, help="ANTs random seed (non-zero)")
    p.add_argument(
        "--transform",
        default=TRANSFORM,
        help=f"ANTs transform of every volume to the template (default {TRANSFORM}; "
        "Affine[0.1]: the eddy_correct approach to eddy currents; antspy:Rigid: "
        "antspyx's ants.registration(type_of_transform='Rigid') with its defaults)",
    )
    p.add_argument(
        "--volumes",
        help="comma-separated file volumes to register (default all; the others are NaN)",
    )
    p.add_argument(
        "--template",
        choices=("b0", "first", "mean"),
        default="b0",
        help="b0: registered mean of the b=0 volumes (default); first: the first b=0; "
        "mean: plain mean of every volume",
    )
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.seed == 0:
        raise SystemExit("--seed must be non-zero (ANTs seeds from the clock with 0)")
    if args.threads < 1:
        raise SystemExit("--threads must be >= 1")
    # ITK reads these when its thread pool is first set up: before importing ants
    os.environ["ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS"] = str(args.threads)
    os.environ["ANTS_RANDOM_SEED"] = str(args.seed)
    t_import = time.perf_counter()
    import ants  # noqa: F401
    import nibabel  # noqa: F401
    import scipy.ndimage  # noqa: F401

    import_s = time.perf_counter() - t_import
    baseline = maxrss_mb()
    cpu0 = time.process_time()
    with tempfile.TemporaryDirectory(prefix="peer_ants_") as tmp:
        info = estimate(args, Path(tmp))
    cpu = time.process_time() - cpu0
    if args.transform.startswith(ANTSPY):
        name = args.transform[len(ANTSPY) :]
        settings = [f"ants.registration(type_of_transform={name!r}) defaults"]
    else:
        settings = ants_args(
            Path("FIXED"), Path("MOVING"), Path("PREFIX"), args.seed, None, args.transform
        )
    record = {
        "task": "ants_to_b0",
        **info,
        "cpu_s": round(cpu, 3),  # all threads; steadier than wall_s on a busy machine
        "loadavg": round(os.getloadavg()[0], 2),
        "maxrss_mb": round(maxrss_mb(), 3),
        "baseline_mb": round(baseline, 3),
        "import_s": round(import_s, 6),
        "threads": args.threads,
        "seed": args.seed,
        "ants_args": " ".join(settings) + (" --masks [MASK]" if args.mask else ""),
    }
    sys.stdout.write(json.dumps(record) + "\n")
    sys.stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
