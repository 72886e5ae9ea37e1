"""nifreeze 0.1.0's Estimator on a series handed over by ``nidask.interop.to_nifreeze``.

Run with the peer venv's interpreter, which holds nifreeze, antspyx's antsRegistration
and this nidask (``NIDASK_PEER_ANTS=1 NIDASK_PEER_NIDASK=1 bash
benchmarks/setup_peer_env.sh``).  One run, one process, one JSON line on stdout:

    PY benchmarks/peer_bridge.py --via nidask|nifreeze --nii IN --bvec F --bval F \
        --mask M --out DIR [--model avg] [--estimate]

``--via nidask`` opens the series with nidask and hands nifreeze ``to_nifreeze``'s
dataset (a memmap); ``--via nifreeze`` opens it with nifreeze's own ``from_nii`` (the
whole series in RAM).  With ``--estimate`` nifreeze's Estimator registers every
volume to its prediction (ANTs); the matrices are saved as ``DIR/motion.npy``.  The
line carries ``open_s``/``estimate_s``, ``maxrss_mb`` (the process's ``VmHWM``) and
``baseline_mb`` (after the imports), and what the dataset holds.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np

from _peak import maxrss_mb


def _open(args):
    if args.via == "nifreeze":
        from nifreeze.data.dmri import from_nii

        return from_nii(
            args.nii, bvec_file=args.bvec, bval_file=args.bval, brainmask_file=args.mask
        )
    import nidask
    from nidask.interop import to_nifreeze

    source = nidask.dmri.from_nii(
        args.nii, bvec_file=args.bvec, bval_file=args.bval, brainmask_file=args.mask
    )
    return to_nifreeze(source, Path(args.out) / "series.npy"), source


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--via", choices=("nidask", "nifreeze"), required=True)
    for name in ("nii", "bvec", "bval", "mask", "out"):
        parser.add_argument(f"--{name}", required=True)
    parser.add_argument("--model", default="avg")
    parser.add_argument("--estimate", action="store_true")
    args = parser.parse_args(argv)
    warnings.simplefilter("ignore")
    from nifreeze.estimator import Estimator

    import nidask.interop  # noqa: F401  (imports counted in the baseline either way)

    baseline = maxrss_mb()
    Path(args.out).mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="peer_bridge_") as tmp:
        tempfile.tempdir = tmp  # nifreeze's datasets make temporary folders it never removes
        t0 = time.perf_counter()
        opened = _open(args)
        dataset = opened[0] if isinstance(opened, tuple) else opened
        open_s = time.perf_counter() - t0
        record = {
            "via": args.via,
            "type": type(dataset).__module__ + "." + type(dataset).__name__,
            "memmap": isinstance(dataset.dataobj, np.memmap),
            "filename": getattr(dataset.dataobj, "filename", None),
            "writeable": bool(dataset.dataobj.flags.writeable),
            "shape": list(dataset.dataobj.shape),
            "dataobj_sum": float(np.sum(dataset.dataobj, dtype=np.float64)),
            "gradients": np.asarray(dataset.gradients).tolist(),
            "bzero_sum": float(np.sum(dataset.bzero, dtype=np.float64)),
            "affine": np.asarray(dataset.affine).tolist(),
            "mask_voxels": int(np.sum(dataset.brainmask)),
            "open_s": round(open_s, 3),
        }
        if args.estimate:
            t0 = time.perf_counter()
            Estimator(args.model).run(dataset, n_jobs=1, omp_nthreads=1, seed=0)
            record["estimate_s"] = round(time.perf_counter() - t0, 3)
            np.save(Path(args.out) / "motion.npy", np.asarray(dataset.motion_affines))
        tempfile.tempdir = None
    record.update(maxrss_mb=round(maxrss_mb(), 3), baseline_mb=round(baseline, 3))
    sys.stdout.write(json.dumps(record) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
