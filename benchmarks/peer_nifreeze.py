"""Drive the peer library nifreeze 0.1.0 for benchmarks and interoperability tests.

Run with the peer venv's interpreter (see ``benchmarks/setup_peer_env.sh``); this
script never imports nidask, so it is the ground truth for "what nifreeze does".

    PY=$(bash benchmarks/setup_peer_env.sh)
    $PY benchmarks/peer_nifreeze.py TASK --nii IN.nii[.gz] --bvec F --bval F --out OUTDIR \
        [--matrices M.npy] [--order N] [--ext .nii|.nii.gz] [--h5 FILE]

Tasks (each prints exactly one JSON line on stdout; warnings go to stderr):

    synth               write a synthetic int16 DWI (+ .bvec/.bval, motion .npy, PET json)
    open_one_volume     from_nii, then one volume of ``dataobj`` as a numpy array
    to_filename         from_nii, then ``DWI.to_filename(OUTDIR/peer.h5)``
    to_nifti            from_nii, then ``to_nifti(OUTDIR/peer<ext>)`` (no motion)
    resampled_to_nifti  from_nii, ``set_transform`` for every DW volume, ``to_nifti``
    lofo_average        leave-one-out fit+predict sweep of the average model (no registration)
    write_h5            write an NFDH5 file with nifreeze (DWI, or PET with --temporal)
    read_h5             load an NFDH5 file with nifreeze's ``from_filename`` and summarise it

Every JSON line carries ``task``, ``wall_s`` (the work only, imports excluded),
``maxrss_mb`` (peak RSS of this process at the end, ``VmHWM``) and ``baseline_mb`` (peak RSS
right after the imports a task needs, before any work).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np

from _peak import maxrss_mb

Post = Callable[[], dict] | None
"""What a task returns besides its info: checks computed after the clock stops."""

TASKS = (
    "synth",
    "open_one_volume",
    "to_filename",
    "to_nifti",
    "resampled_to_nifti",
    "lofo_average",
    "write_h5",
    "read_h5",
)


def _import_for(task: str) -> None:
    """Import what ``task`` needs, so the baseline includes import costs only."""
    import nibabel  # noqa: F401

    if task == "synth":
        return
    import h5py  # noqa: F401
    import nifreeze.data.base  # noqa: F401
    import nifreeze.data.dmri  # noqa: F401
    import nifreeze.data.pet  # noqa: F401

    if task == "lofo_average":
        import nifreeze.model  # noqa: F401
        import nifreeze.utils.iterators  # noqa: F401


def _tolist(value):
    return None if value is None else np.asarray(value).tolist()


def _fsum(value) -> float | None:
    if value is None:
        return None
    return float(np.sum(np.asarray(value), dtype=np.float64))


def summarize(ds) -> dict:
    """Describe a nifreeze dataset with plain JSON types (for cross-env comparison)."""
    out = {
        "class": type(ds).__name__,
        "shape": list(ds.dataobj.shape),
        "dtype": str(ds.dataobj.dtype),
        "dataobj_sum": _fsum(ds.dataobj),
        "affine": _tolist(ds.affine),
        "brainmask_sum": _fsum(ds.brainmask),
        "motion_affines": _tolist(ds.motion_affines),
    }
    gradients = getattr(ds, "gradients", None)
    if gradients is not None:
        out["gradients_shape"] = list(gradients.shape)
        out["gradients_dtype"] = str(gradients.dtype)
        out["gradients_sum"] = _fsum(gradients)
        out["gradients"] = _tolist(gradients)
    if hasattr(ds, "bzero"):
        out["bzero_sum"] = _fsum(ds.bzero)
        out["bzero_dtype"] = None if ds.bzero is None else str(ds.bzero.dtype)
    if hasattr(ds, "midframe"):
        out["midframe"] = _tolist(ds.midframe)
        out["total_duration"] = float(ds.total_duration)
    return out


def _need(args: argparse.Namespace, *names: str) -> None:
    missing = [f"--{n.replace('_', '-')}" for n in names if getattr(args, n) is None]
    if missing:
        raise SystemExit(f"{args.task}: missing required option(s): {', '.join(missing)}")


def _outdir(args: argparse.Namespace) -> Path:
    _need(args, "out")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    return out


def _load_dwi(args: argparse.Namespace):
    from nifreeze.data.dmri import from_nii

    _need(args, "nii", "bvec", "bval")
    return from_nii(args.nii, bvec_file=args.bvec, bval_file=args.bval, brainmask_file=args.mask)


def _load_matrices(path: str, n: int) -> np.ndarray:
    mats = np.load(path)
    if mats.shape != (n, 4, 4):
        raise SystemExit(
            f"--matrices must hold one 4x4 per diffusion-weighted volume: "
            f"expected {(n, 4, 4)}, got {mats.shape}"
        )
    return mats


def _nifti_result(nii, paths: list[Path]) -> dict:
    return {
        "outputs": [str(p) for p in paths if p.exists()],
        "out_shape": list(nii.shape),
        "out_dtype": str(nii.get_data_dtype()),
        "out_sum": _fsum(nii.dataobj),
    }


def _sidecars(path: Path) -> list[Path]:
    stem = path.name.replace("".join(path.suffixes), "")
    return [path, path.with_name(stem + ".bvec"), path.with_name(stem + ".bval")]


# --------------------------------------------------------------------------- tasks


def task_synth(args: argparse.Namespace) -> tuple[dict, Post]:
    """Synthetic int16 DWI: smooth 'head' with direction-dependent attenuation."""
    import nibabel as nb

    out = _outdir(args)
    rng = np.random.default_rng(args.seed)
    shape = tuple(args.shape)
    nb0, ndw = args.nb0, args.ndw
    dirs = rng.normal(size=(ndw, 3))
    dirs /= np.linalg.norm(dirs, axis=1, keepdims=True)
    bvecs = np.vstack([np.zeros((nb0, 3)), dirs])
    bvals = np.concatenate([np.zeros(nb0), np.full(ndw, float(args.bvalue))])

    grid = np.stack(np.meshgrid(*[np.linspace(-1, 1, s) for s in shape], indexing="ij"), -1)
    radius = np.linalg.norm(grid * [1.0, 1.1, 1.25], axis=-1)
    s0 = np.clip(1.0 - radius, 0, None) * 2000.0 + 50.0
    # a fibre direction that varies smoothly in space: attenuation depends on the b-vector
    fibre = grid / (np.linalg.norm(grid, axis=-1, keepdims=True) + 1e-3)
    data = np.empty(shape + (nb0 + ndw,), dtype=np.int16)
    for k in range(nb0 + ndw):
        cos2 = (fibre @ bvecs[k]) ** 2
        adc = 0.0003 + 0.0015 * (1.0 - cos2)
        vol = s0 * np.exp(-bvals[k] * adc) + rng.normal(scale=10.0, size=shape)
        data[..., k] = np.clip(np.rint(vol), -32768, 32767).astype(np.int16)

    affine = np.diag([2.0, 2.0, 2.5, 1.0])
    affine[:3, 3] = -np.asarray(affine.diagonal()[:3]) * (np.asarray(shape) - 1) / 2
    img = nb.Nifti1Image(data, affine)
    img.header.set_data_dtype(np.int16)
    img.header.set_xyzt_units("mm", "sec")
    nii = out / f"synth_dwi{args.ext}"
    img.to_filename(nii)
    np.savetxt(out / "synth_dwi.bvec", bvecs.T, fmt="%.6f")
    np.savetxt(out / "synth_dwi.bval", bvals[np.newaxis], fmt="%d")

    # rigid motion (RAS, about the grid centre which is at the origin): <=2 deg, <=1 mm
    mats = np.repeat(np.eye(4)[np.newaxis], ndw, axis=0)
    for k in range(ndw):
        ax, ay, az = np.deg2rad(rng.uniform(-2, 2, size=3))
        rx = np.array([[1, 0, 0], [0, np.cos(ax), -np.sin(ax)], [0, np.sin(ax), np.cos(ax)]])
        ry = np.array([[np.cos(ay), 0, np.sin(ay)], [0, 1, 0], [-np.sin(ay), 0, np.cos(ay)]])
        rz = np.array([[np.cos(az), -np.sin(az), 0], [np.sin(az), np.cos(az), 0], [0, 0, 1]])
        mats[k, :3, :3] = rz @ ry @ rx
        mats[k, :3, 3] = rng.uniform(-1, 1, size=3)
    np.save(out / "synth_motion.npy", mats)

    mask = (radius < 0.9).astype(np.uint8)
    nb.Nifti1Image(mask, affine).to_filename(out / f"synth_mask{args.ext}")
    # a PET-like series can reuse the same 4D file: frame starts for nb0 + ndw frames
    frames = np.cumsum(np.r_[0, np.full(nb0 + ndw - 1, 60.0)]).tolist()
    (out / "synth_pet.json").write_text(json.dumps({"FrameTimesStart": frames}))
    return {
        "nii": str(nii),
        "bvec": str(out / "synth_dwi.bvec"),
        "bval": str(out / "synth_dwi.bval"),
        "matrices": str(out / "synth_motion.npy"),
        "mask": str(out / f"synth_mask{args.ext}"),
        "temporal": str(out / "synth_pet.json"),
        "shape": list(data.shape),
    }, None


def task_open_one_volume(args: argparse.Namespace) -> tuple[dict, Post]:
    dwi = _load_dwi(args)
    # index into the DW-only series (nifreeze drops b0 volumes at construction)
    vol = np.array(dwi.dataobj[..., args.index])
    return {"index": args.index, "n_volumes": len(dwi)}, lambda: {
        "vol_shape": list(vol.shape),
        "vol_dtype": str(vol.dtype),
        "vol_sum": _fsum(vol),
    }


def task_to_filename(args: argparse.Namespace) -> tuple[dict, Post]:
    dwi = _load_dwi(args)
    path = _outdir(args) / "peer.h5"
    dwi.to_filename(path, compression=args.compression)
    return {"outputs": [str(path)], "bytes": path.stat().st_size}, None


def task_to_nifti(args: argparse.Namespace) -> tuple[dict, Post]:
    dwi = _load_dwi(args)
    path = _outdir(args) / f"peer{args.ext}"
    nii = dwi.to_nifti(path, insert_b0=args.insert_b0)
    return {}, lambda: _nifti_result(nii, _sidecars(path))


def task_resampled_to_nifti(args: argparse.Namespace) -> tuple[dict, Post]:
    _need(args, "matrices")
    dwi = _load_dwi(args)
    mats = _load_matrices(args.matrices, len(dwi))
    for i, mat in enumerate(mats):
        dwi.set_transform(i, mat)
    path = _outdir(args) / f"peer_resampled{args.ext}"
    nii = dwi.to_nifti(
        path, order=args.order, insert_b0=args.insert_b0, write_hmxfms=args.write_hmxfms
    )
    return {"order": args.order}, lambda: _nifti_result(nii, _sidecars(path))


def task_lofo_average(args: argparse.Namespace) -> tuple[dict, Post]:
    """Leave-one-out sweep as nifreeze's Estimator does it, minus the registration.

    ``Estimator.run`` (nifreeze/estimator.py) builds ``ModelFactory.init(model, dataset=...)``
    and calls ``model.fit_predict(i, n_jobs=..., omp_nthreads=...)`` for each index of an
    iterator from ``nifreeze.utils.iterators``; registration (ANTs) follows each call and
    cannot be switched off, so the sweep is reproduced here directly.
    """
    from nifreeze.model import ModelFactory
    from nifreeze.utils import iterators

    t0 = time.perf_counter()
    dwi = _load_dwi(args)
    model = ModelFactory.init(model=args.model, dataset=dwi, stat=args.stat)
    t1 = time.perf_counter()
    sums = np.zeros(len(dwi))
    for i in iterators.linear_iterator(size=len(dwi)):
        predicted = model.fit_predict(i)
        sums[i] = np.sum(predicted, dtype=np.float64)
    return {
        "model": type(model).__name__,
        "stat": args.stat,
        "n_folds": len(dwi),
        "pred_dtype": str(predicted.dtype),
        "setup_s": round(t1 - t0, 6),  # from_nii + model construction
        "sweep_s": round(time.perf_counter() - t1, 6),  # fit_predict of every fold
    }, lambda: {"pred_sums": sums.tolist(), "checksum": float(sums.sum())}


def task_write_h5(args: argparse.Namespace) -> tuple[dict, Post]:
    if args.temporal is not None:
        from nifreeze.data.pet import from_nii

        _need(args, "nii")
        ds = from_nii(args.nii, temporal_file=args.temporal, brainmask_file=args.mask)
    else:
        ds = _load_dwi(args)
    if args.matrices is not None:
        mats = _load_matrices(args.matrices, len(ds))
        if args.temporal is not None:
            # PET.set_transform resamples eagerly and stores Affine objects, which
            # to_filename cannot serialise; record plain matrices instead.
            ds.motion_affines = mats.copy()
        else:
            for i, mat in enumerate(mats):
                ds.set_transform(i, mat)
    path = Path(args.h5) if args.h5 else _outdir(args) / "peer.h5"
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.to_filename(path, compression=args.compression)
    return {"outputs": [str(path)]}, lambda: summarize(ds)


def _nifreeze_class(path: Path, kind: str):
    import h5py
    from nifreeze.data.base import BaseDataset
    from nifreeze.data.dmri import DWI
    from nifreeze.data.pet import PET

    classes = {"dwi": DWI, "pet": PET, "base": BaseDataset}
    if kind != "auto":
        return classes[kind], {}
    with h5py.File(path, "r") as f:
        attrs = {k: _attr(v) for k, v in f.attrs.items()}
        gtype = _attr(f["/0"].attrs.get("Type")) if "0" in f else None
        names = set(f["/0"].keys()) if "0" in f else set()
    attrs["/0:Type"] = gtype
    if attrs.get("Type") == "dmri" or gtype == "dmri" or "gradients" in names:
        return DWI, attrs
    if attrs.get("Format") == "EMC/PET" or gtype == "pet" or "midframe" in names:
        return PET, attrs
    return BaseDataset, attrs


def _attr(value):
    if isinstance(value, bytes):
        return value.decode()
    if isinstance(value, np.generic):
        return value.item()
    return value


def task_read_h5(args: argparse.Namespace) -> tuple[dict, Post]:
    _need(args, "h5")
    path = Path(args.h5)
    cls, attrs = _nifreeze_class(path, args.kind)
    ds = cls.from_filename(path)
    return {"h5": str(path), "file_attrs": attrs}, lambda: summarize(ds)


# ------------------------------------------------------------------------------ cli


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter
    )
    p.add_argument("task", choices=TASKS)
    p.add_argument("--nii", help="4D NIfTI input (.nii or .nii.gz)")
    p.add_argument("--bvec", help="FSL-style .bvec (3xN or Nx3)")
    p.add_argument("--bval", help="FSL-style .bval")
    p.add_argument("--mask", help="brain mask NIfTI (optional)")
    p.add_argument("--out", help="output directory")
    p.add_argument("--matrices", help="(N,4,4) .npy of motion matrices for the DW volumes")
    p.add_argument("--order", type=int, default=3, help="interpolation order (default 3)")
    p.add_argument("--ext", default=".nii.gz", choices=(".nii", ".nii.gz"))
    p.add_argument("--h5", help="NFDH5 file (read_h5 input, write_h5 output)")
    p.add_argument("--kind", default="auto", choices=("auto", "dwi", "pet", "base"))
    p.add_argument("--temporal", help="PET JSON with FrameTimesStart (write_h5 only)")
    p.add_argument("--compression", default=None, help="h5py compression, e.g. gzip")
    p.add_argument("--index", type=int, default=0, help="volume for open_one_volume")
    p.add_argument("--insert-b0", action="store_true", help="to_nifti insert_b0=True")
    p.add_argument("--write-hmxfms", action="store_true", help="to_nifti write_hmxfms=True")
    p.add_argument("--model", default="average", help="ModelFactory name (average, avgdwi)")
    p.add_argument("--stat", default="median", help="numpy statistic for the average model")
    p.add_argument("--quiet", action="store_true", help="silence Python warnings")
    synth = p.add_argument_group("synth")
    synth.add_argument("--shape", type=int, nargs=3, default=(32, 32, 20))
    synth.add_argument("--nb0", type=int, default=2)
    synth.add_argument("--ndw", type=int, default=12)
    synth.add_argument("--bvalue", type=float, default=1000.0)
    synth.add_argument("--seed", type=int, default=1234)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.quiet:
        warnings.simplefilter("ignore")
    _import_for(args.task)
    baseline = maxrss_mb()

    func = globals()[f"task_{args.task}"]
    # Every nifreeze dataset calls tempfile.mkdtemp() at construction (its `_filepath`
    # default) and never removes it; keep those directories in one we delete.
    with tempfile.TemporaryDirectory(prefix="peer_nifreeze_") as tmp:
        tempfile.tempdir = tmp
        try:
            t0 = time.perf_counter()
            info, post = func(args)
            wall = time.perf_counter() - t0
            checks = post() if post is not None else {}  # checksums are not timed
        finally:
            tempfile.tempdir = None

    record = {
        "task": args.task,
        "wall_s": round(wall, 6),
        "maxrss_mb": round(maxrss_mb(), 3),
        "baseline_mb": round(baseline, 3),
        **info,
        **checks,
    }
    sys.stdout.write(json.dumps(record) + "\n")
    sys.stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
