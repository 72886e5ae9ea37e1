"""One nidask benchmark measurement, run in its own process by ``benchmarks/run.py``.

    python benchmarks/_nidask_task.py TASK --nii IN.nii --bvec F --bval F --out OUTDIR \
        [--chunk-size 64MiB] [--workers N] [--cache-dir DIR] [--matrices M.npy] \
        [--order N] [--ext .nii|.nii.gz] [--model M] [--temporal F] [--mask F] [--passes N]

Tasks (each prints exactly one JSON line on stdout):

    copy                ``shutil.copyfile(--nii, OUTDIR/copy.nii)``: the I/O limit (stdlib only)
    open_one_volume     ``dmri.from_nii``, then one volume as a numpy array
    materialize         ``from_nii``, then ``materialize()`` into the owned cache
    to_filename         ``from_nii``, then ``to_filename(OUTDIR/nidask.h5)`` (NFDH5)
    to_nifti            ``from_nii``, then ``to_nifti(OUTDIR/nidask<ext>)`` (no motion)
    resampled_to_nifti  ``from_nii``, ``set_transform`` for every DW volume, ``to_nifti``
    lofo_sweep          ``from_nii``, ``Estimator(model=--model).sweep`` (every fold's
                        fit + predict, no registration) in OUTDIR/run; then the
                        predictions alone again (``sweep_s``)
    estimate            ``nidask.load(--nii, companions)``, then
                        ``Estimator(model=--model).run`` in OUTDIR/run; saves the
                        whole series' matrices (file order, b=0 included) to
                        OUTDIR/motion.npy and their file positions to OUTDIR/index.npy

Every line carries ``task``, ``wall_s`` (the work only: open + operation, imports
excluded), ``maxrss_mb`` (peak RSS of this process) and ``baseline_mb`` (peak RSS right
after the imports, before any work), as ``benchmarks/peer_nifreeze.py`` does for
nifreeze.  Peak RSS is ``VmHWM`` (see ``_peak.py``): a child's ``ru_maxrss``
starts at its parent's peak on Linux.  Dask runs on the threaded
scheduler with ``--workers`` threads; the chunk budget is ``nidask.chunk-size``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

from _peak import maxrss_mb, reset_peak

TASKS = (
    "copy",
    "open_one_volume",
    "materialize",
    "to_filename",
    "to_nifti",
    "resampled_to_nifti",
    "lofo_sweep",
    "estimate",
)


def _import_nidask() -> None:
    """Import everything the nidask tasks touch, so the baseline holds imports only."""
    import importlib.util

    if importlib.util.find_spec("nidask") is None:  # a checkout without an install
        sys.path.insert(0, os.path.join(os.path.dirname(__file__), os.pardir, "src"))
    import dask  # noqa: F401
    import dask.array  # noqa: F401
    import distributed  # noqa: F401  (dask imports it at the first compute)

    if importlib.util.find_spec("numba") is not None:
        import numba  # noqa: F401  (nidask.kernels imports it at the first resampling)
    import h5py  # noqa: F401
    import nibabel  # noqa: F401
    import numpy  # noqa: F401
    import scipy.ndimage  # noqa: F401

    import nidask  # noqa: F401

    for module in (
        "estimation.estimator",
        "export",
        "io.nfdh5",
        "io.nifti",
        "io.store",
        "ops.resample",
    ):
        import_nidask_module(module)


def import_nidask_module(name: str):
    """``nidask.<name>`` (e.g. ``io.nifti``), or its flat pre-subpackage path (``nifti``)."""
    import importlib

    try:
        return importlib.import_module(f"nidask.{name}")
    except ModuleNotFoundError as exc:
        if exc.name not in (f"nidask.{name}", f"nidask.{name.split('.')[0]}"):
            raise  # the module exists but something it imports does not
        return importlib.import_module(f"nidask.{name.rsplit('.', 1)[-1]}")


def _load(args):
    import nidask

    return nidask.data.dmri.from_nii(args.nii, bvec_file=args.bvec, bval_file=args.bval)


def _data_bytes(ds) -> int:
    return int(ds.dataobj.size * ds.dataobj.dtype.itemsize)


def _tree_mb(path: str) -> float:
    """Disk use (MiB) of the files under ``path``."""
    total = 0
    for root, _, files in os.walk(path):
        total += sum(os.path.getsize(os.path.join(root, f)) for f in files)
    return round(total / 2**20, 1)


def _outdir(args) -> str:
    os.makedirs(args.out, exist_ok=True)
    return args.out


# --------------------------------------------------------------------------- tasks


def task_copy(args) -> dict:
    import shutil

    dst = os.path.join(_outdir(args), "copy.nii")
    shutil.copyfile(args.nii, dst)
    return {"bytes": os.path.getsize(dst), "outputs": [dst]}


def task_open_one_volume(args) -> dict:
    import numpy as np

    with _load(args) as dwi:
        # index into the DW-only series, as nifreeze (b0 volumes are dropped)
        vol = np.asarray(dwi[args.index][0].compute())
        return {
            "index": args.index,
            "n_volumes": len(dwi),
            "bytes": int(vol.nbytes),
            "vol_sum": float(vol.sum(dtype=np.float64)),
        }


def task_materialize(args) -> dict:
    with _load(args) as dwi:
        m = dwi.materialize()
        size = os.path.getsize(m.memmap_path)
        return {"n_volumes": len(dwi), "bytes": _data_bytes(dwi), "file_bytes": size}


def task_to_filename(args) -> dict:
    path = os.path.join(_outdir(args), "nidask.h5")
    with _load(args) as dwi:
        dwi.to_filename(path)
        return {"n_volumes": len(dwi), "bytes": _data_bytes(dwi), "outputs": [path]}


def task_to_nifti(args) -> dict:
    path = os.path.join(_outdir(args), f"nidask{args.ext}")
    with _load(args) as dwi:
        dwi.to_nifti(path)
        return {
            "n_volumes": len(dwi),
            "bytes": _data_bytes(dwi),
            "file_bytes": os.path.getsize(path),
            "outputs": [path],
        }


def task_resampled_to_nifti(args) -> dict:
    import numpy as np

    path = os.path.join(_outdir(args), f"nidask_resampled{args.ext}")
    with _load(args) as dwi:
        matrices = np.load(args.matrices)
        if matrices.shape != (len(dwi), 4, 4):
            raise SystemExit(f"--matrices must be ({len(dwi)}, 4, 4), got {matrices.shape}")
        for i, matrix in enumerate(matrices):
            dwi.set_transform(i, matrix)
        dwi.to_nifti(path, order=args.order)
        return {
            "order": args.order,
            "n_volumes": len(dwi),
            "bytes": _data_bytes(dwi),
            "outputs": [path],
        }


def task_lofo_sweep(args) -> dict:
    """A whole sweep (open, materialize, layout, predictions), then the predictions alone.

    The second ``sweep`` reuses the run directory's materialized and voxel-major
    files, so it times the fit + predict of every fold only, as ``sweep_s``.
    """
    import numpy as np

    import nidask

    read_column = import_nidask_module("estimation.lofo").read_column

    workdir = os.path.join(_outdir(args), "run")
    t0 = time.perf_counter()
    with _load(args) as dwi:
        estimator = nidask.Estimator(model=args.model)
        predictions = estimator.sweep(dwi, workdir=workdir)
        setup_and_sweep = time.perf_counter() - t0
        os.remove(predictions.filename)
        t1 = time.perf_counter()
        predictions = estimator.sweep(dwi, workdir=workdir)
        sweep = time.perf_counter() - t1
        # column by column with pread: mapping the whole file would count in the RSS
        checksum = sum(
            float(np.sum(read_column(predictions.filename, i), dtype=np.float64))
            for i in range(predictions.shape[1])
        )
        return {
            "model": args.model,
            "n_folds": len(dwi),
            "bytes": _data_bytes(dwi),
            "pred_shape": list(predictions.shape),
            "checksum": checksum,
            "wall_s": setup_and_sweep,  # the task's work: the first, whole sweep
            "sweep_s": round(sweep, 6),
        }


def task_estimate(args) -> dict:
    """Motion estimation end to end: open the series, run every pass, save the matrices.

    ``--bvec``/``--bval`` make a DWI, ``--temporal`` a PET, neither a plain series;
    ``--mask`` is the brain mask.  The time covers the open and the run.
    """
    import numpy as np

    import nidask

    companions = {
        key: value
        for key, value in (
            ("bvec_file", args.bvec),
            ("bval_file", args.bval),
            ("temporal_file", args.temporal),
            ("json_file", args.sidecar),
            ("brainmask_file", args.mask),
        )
        if value
    }
    out = _outdir(args)
    dataset = nidask.load(args.nii, **companions)
    options = {} if args.passes is None else {"passes": args.passes}
    options["anchor"] = args.anchor
    # "a,b": one model per pass (the last one repeats)
    model = args.model.split(",") if "," in args.model else args.model
    estimator = nidask.Estimator(model=model, **options)
    workdir = os.path.join(out, "run")
    if args.cluster_workers:
        from distributed import Client

        # one single-threaded process per worker, lean monitoring (nidask.cluster)
        cluster = import_nidask_module("cluster").local_cluster(args.cluster_workers)
        with cluster, Client(cluster) as client:
            start = time.perf_counter()
            if args.warm:  # each worker compiles the kernels once, as a long-lived one has
                client.run(import_nidask_module("ops.kernels").warm_up)
            warm_s = time.perf_counter() - start
            start = time.perf_counter()
            result = estimator.run(dataset, client=client, workdir=workdir)
            cluster_s = time.perf_counter() - start
    else:
        result = estimator.run(dataset, workdir=workdir)
    whole = result.whole_series()
    motion, index = os.path.join(out, "motion.npy"), os.path.join(out, "index.npy")
    np.save(motion, np.asarray(whole.motion_affines, dtype=np.float64))
    np.save(index, np.asarray(whole.original_index, dtype=np.int64))
    report = estimator.report or {}
    flags: dict[str, int] = {}
    for volume in report.get("volumes", []):
        for flag in volume.get("flags", []):
            flags[flag] = flags.get(flag, 0) + 1
    extra = (
        {"cluster_workers": args.cluster_workers, "run_s": cluster_s, "warm_up_s": warm_s}
        if args.cluster_workers
        else {}
    )
    return {
        **extra,
        "run_dir_mb": _tree_mb(workdir),
        "cache_mb": _tree_mb(args.cache_dir) if args.cache_dir else None,
        "model": args.model,
        "dataset": type(dataset).__name__,
        "n_volumes": len(whole),
        "passes": [
            {"pass": p["pass"], "largest_change_mm": round(p["largest_change_mm"], 4)}
            for p in report.get("passes", [])
        ],
        "flags": flags,
        "motion": motion,
        "index": index,
    }


# ------------------------------------------------------------------------------ cli


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("task", choices=TASKS)
    p.add_argument("--nii", required=True, help="4D NIfTI input (.nii)")
    p.add_argument("--bvec", help="FSL-style .bvec")
    p.add_argument("--bval", help="FSL-style .bval")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--chunk-size", default="64MiB", help="nidask.chunk-size (default 64MiB)")
    p.add_argument("--workers", type=int, default=None, help="dask threads (default: cores)")
    p.add_argument("--cache-dir", default=None, help="nidask.cache-dir (default: temp dir)")
    p.add_argument("--matrices", help="(N_dw, 4, 4) .npy of motion matrices")
    p.add_argument("--order", type=int, default=3, help="interpolation order (default 3)")
    p.add_argument("--ext", default=".nii", choices=(".nii", ".nii.gz"))
    p.add_argument("--index", type=int, default=0, help="volume for open_one_volume")
    p.add_argument("--model", default="average", help="Estimator model (lofo_sweep, estimate)")
    p.add_argument("--temporal", help="PET frame timing JSON (estimate)")
    p.add_argument("--mask", help="brain mask NIfTI (estimate)")
    p.add_argument("--sidecar", help="BOLD JSON sidecar with RepetitionTime (estimate)")
    p.add_argument("--passes", type=int, help="Estimator passes (estimate; default nidask's)")
    p.add_argument("--anchor", default="auto", help="Estimator anchor (estimate: auto or none)")
    p.add_argument("--cluster-workers", type=int, help="estimate on a LocalCluster of N processes")
    p.add_argument(
        "--warm",
        action="store_true",
        help="compile the kernels before the baseline (memory above it is data only)",
    )
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    config = {}
    if args.task != "copy":
        _import_nidask()
        import dask

        config = {
            "scheduler": "threads",
            "num_workers": args.workers or os.cpu_count(),
            "nidask.chunk-size": args.chunk_size,
            "nidask.cache-dir": args.cache_dir,
            "nidask.progress": False,
        }
        dask.config.set(config)
    imports = maxrss_mb()
    if args.warm and args.task != "copy":
        import_nidask_module("ops.kernels").warm_up()
        reset_peak()
    baseline = maxrss_mb()

    t0 = time.perf_counter()
    info = globals()[f"task_{args.task}"](args)
    wall = info.pop("wall_s", time.perf_counter() - t0)

    record = {
        "task": args.task,
        "wall_s": round(wall, 6),
        "maxrss_mb": round(maxrss_mb(), 3),
        "baseline_mb": round(baseline, 3),
        "imports_mb": round(imports, 3),
        "workers": config.get("num_workers"),
        "chunk_size": config.get("nidask.chunk-size"),
        **info,
    }
    sys.stdout.write(json.dumps(record) + "\n")
    sys.stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
