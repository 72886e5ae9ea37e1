"""nifreeze 0.1.0's motion Estimator end to end, as a peer of nidask's estimator.

Run with the peer venv's interpreter after ``NIDASK_PEER_ANTS=1 bash
benchmarks/setup_peer_env.sh``, which adds antspyx and an ``antsRegistration``
executable to the venv's ``bin`` (nifreeze calls ANTs through nipype's command line).
This script puts that ``bin`` first on ``PATH`` and never imports nidask.

    PY=$(NIDASK_PEER_ANTS=1 bash benchmarks/setup_peer_env.sh)
    $PY benchmarks/peer_nifreeze_estimate.py --nii DWI.nii[.gz] --bvec DWI.bvec \
        --bval DWI.bval [--mask MASK.nii] --out matrices.npy [--model avgdwi|dti] \
        [--threads N] [--seed N] [--ants-config b0-to-b0_level0|dwi-to-b0_level0]

What runs (``nifreeze/estimator.py``)::

    dwi = nifreeze.data.dmri.from_nii(nii, brainmask_file=mask, bvec_file=bvec,
                                      bval_file=bval)   # drops the b <= 50 volumes
    Estimator(model, strategy="random").run(dwi, seed=seed, n_jobs=threads,
                                            omp_nthreads=threads)

For every DW volume in a seeded random order it fits the model without that volume,
predicts it, and registers the volume (moving) to the prediction (fixed) with ANTs
rigid through nipype, using nifreeze's packaged settings (default
``b0-to-b0_level0``: two GC stages). The seed also becomes ``ANTS_RANDOM_SEED``
(``registration/ants.py``); it must be non-zero, as ANTs seeds from the clock with 0.

Outputs: ``--out`` holds ``dwi.motion_affines`` (N_dw, 4, 4), reference RAS -> moving
RAS (nidask's convention: nifreeze builds them with nitransforms'
``ITKLinearTransform.to_ras(reference=fixed, moving=moving)``); ``--out-index`` (default
``<out stem>_index.npy``) holds the file volume of each row, also listed in the JSON
line as ``volumes``. One JSON line on stdout: ``wall_s`` (from_nii + estimation, imports
excluded), ``s_per_volume`` (``wall_s`` per DW volume), ``cpu_s`` (CPU time of this
process and the ANTs children), ``loadavg``, ``maxrss_mb``, ``baseline_mb``,
``children_maxrss_mb`` (the ANTs child processes; see the note in the code),
``n_volumes``, ``threads``, ``seed``, ``model``, ``ants_config``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import resource
import shutil
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np

from _peak import maxrss_mb


def cpu_seconds() -> float:
    """CPU time (user + system) of this process and its waited-for children."""
    own = resource.getrusage(resource.RUSAGE_SELF)
    kids = resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def children_maxrss_mb() -> float:
    """Largest ``ru_maxrss`` of the waited-for child processes, in MiB (Linux: KiB)."""
    return resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024


def dw_file_volumes(bvec: str, bval: str) -> np.ndarray:
    """File indices of the volumes nifreeze keeps, decided as ``from_nii`` decides."""
    from nifreeze.data.dmri.utils import DEFAULT_LOWB_THRESHOLD, format_gradients

    bvecs = np.loadtxt(bvec, dtype="float32")
    if bvecs.shape[1] != 3 and bvecs.shape[0] == 3:
        bvecs = bvecs.T
    bvals = np.loadtxt(bval, dtype="float32")
    gradients = format_gradients(np.column_stack((bvecs, bvals)))
    return np.flatnonzero(gradients[:, -1] > DEFAULT_LOWB_THRESHOLD)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--nii", required=True, help="4D NIfTI (.nii or .nii.gz)")
    p.add_argument("--bvec", required=True, help="FSL-style .bvec")
    p.add_argument("--bval", required=True, help="FSL-style .bval")
    p.add_argument("--mask", help="brain mask NIfTI (optional)")
    p.add_argument("--out", required=True, help="output .npy of (N_dw, 4, 4) matrices")
    p.add_argument("--out-index", help="output .npy of file volume indices")
    p.add_argument("--model", default="avgdwi", help="nifreeze model (avgdwi, dti, ...)")
    p.add_argument("--strategy", default="random", help="nifreeze iterator (default random)")
    p.add_argument("--ants-config", default=None, help="nifreeze ANTs settings file stem")
    p.add_argument("--threads", type=int, default=1, help="n_jobs and omp_nthreads")
    p.add_argument("--seed", type=int, default=1234, help="iterator + ANTs seed (non-zero)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.seed == 0:
        raise SystemExit("--seed must be non-zero (ANTs seeds from the clock with 0)")
    bindir = str(Path(sys.executable).parent)
    os.environ["PATH"] = bindir + os.pathsep + os.environ.get("PATH", "")
    os.environ["ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS"] = str(args.threads)
    if shutil.which("antsRegistration") != os.path.join(bindir, "antsRegistration"):
        raise SystemExit(
            f"no antsRegistration in {bindir}: run NIDASK_PEER_ANTS=1 setup_peer_env.sh"
        )
    warnings.simplefilter("ignore")

    t_import = time.perf_counter()
    import nibabel  # noqa: F401
    from nifreeze.data.dmri import from_nii
    from nifreeze.estimator import Estimator

    import_s = time.perf_counter() - t_import
    baseline = maxrss_mb()
    align = {} if args.ants_config is None else {"ants_config": args.ants_config}

    # nifreeze datasets leak one tempfile.mkdtemp() each: keep them in one we delete
    with tempfile.TemporaryDirectory(prefix="peer_nifreeze_est_") as tmp:
        tempfile.tempdir = tmp
        try:
            # the Estimator prints progress on stdout: keep stdout for the JSON line
            with contextlib.redirect_stdout(sys.stderr):
                cpu0 = cpu_seconds()
                t0 = time.perf_counter()
                dwi = from_nii(
                    args.nii,
                    brainmask_file=args.mask,
                    bvec_file=args.bvec,
                    bval_file=args.bval,
                )
                t1 = time.perf_counter()
                Estimator(args.model, strategy=args.strategy, **align).run(
                    dwi, seed=args.seed, n_jobs=args.threads, omp_nthreads=args.threads
                )
                wall = time.perf_counter() - t0
                cpu = cpu_seconds() - cpu0
        finally:
            tempfile.tempdir = None

    matrices = np.asarray(dwi.motion_affines, dtype=np.float64)
    volumes = dw_file_volumes(args.bvec, args.bval)
    if len(volumes) != len(matrices):
        raise SystemExit(f"{len(matrices)} matrices for {len(volumes)} DW volumes")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    np.save(out, matrices)
    index_out = Path(args.out_index) if args.out_index else out.with_name(out.stem + "_index.npy")
    np.save(index_out, volumes)
    record = {
        "task": f"nifreeze_estimate_{args.model}",
        "wall_s": round(wall, 6),
        "s_per_volume": round(wall / len(matrices), 6),
        "load_s": round(t1 - t0, 6),
        "cpu_s": round(cpu, 3),  # this process + the ANTs children
        "loadavg": round(os.getloadavg()[0], 2),
        "n_volumes": len(matrices),
        "volumes": volumes.tolist(),
        "out": str(out),
        "out_index": str(index_out),
        "maxrss_mb": round(maxrss_mb(), 3),
        "baseline_mb": round(baseline, 3),
        # the ANTs runs are child processes (the antsRegistration shim): their peak,
        # which the kernel floors at this process's RSS when each was forked
        "children_maxrss_mb": round(children_maxrss_mb(), 3),
        "import_s": round(import_s, 6),
        "threads": args.threads,
        "seed": args.seed,
        "model": args.model,
        "strategy": args.strategy,
        "ants_config": args.ants_config or "b0-to-b0_level0",
    }
    sys.stdout.write(json.dumps(record) + "\n")
    sys.stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
