"""Estimation at HCP scale -- memory, speed, compressed input, cluster.

``python benchmarks/run.py --suites estimate --shape 145,174,145,288`` generates an
HCP-like 3-shell series of that shape with known motion (:func:`nidask.validation.phantom.
make_hcp_like`, 1.25 mm voxels, b=0 every 16 volumes, written as ``.nii.gz`` as HCP
and OpenNeuro ship it) and measures, each in its own child process:

- **nidask auto, every volume**: wall time per volume and in all, peak RSS above the
  baseline (imports and compiled kernels: ``_nidask_task.py --warm``), disk use of the
  run directory and of the decompressed copy, accuracy;
- **the same on the first 96 volumes**: the flat-memory row (same grid, same options);
- **ANTs to b0** on the first ``ANTS_VOLUMES`` volumes (antspyx in the peer venv,
  same threads): its seconds per volume, and its accuracy on those volumes;
- **1 vs 2 cluster workers** (:func:`nidask.cluster.local_cluster`: processes, one
  thread each, lean monitoring) on the first 96 volumes as ``.nii``, two passes: the
  speed-up of the
  estimation itself, on workers that compiled the kernels first (``warm_up_s``, a
  once-per-worker cost, as the other rows' baseline is warm), from an uncompressed copy
  (gunzip is one stream, the same for any number of workers, and is measured by the
  rows above).

``--scale-parts`` picks some of ``full,flat,ants,cluster`` (default all).

Children start with ``MALLOC_TRIM_THRESHOLD_=65536``, as ``distributed`` starts its
workers (see docs/concepts.md, "What one estimator task holds").
"""

from __future__ import annotations

import gzip
import shutil
import sys
from pathlib import Path

import numpy as np

import estimate_suite as es

#: the feature of this suite's targets (the ``feature`` of every target it records)
FEATURE = "HCP scale"
FLAT_VOLUMES = 96
ANTS_VOLUMES = 24
MIB = 2**20


def working_set_mb(shape3d) -> float:
    """``W`` of docs/concepts.md in MiB: 8 float32 volumes plus 24 MiB."""
    return 8 * 4 * float(np.prod(shape3d[:3])) / MIB + 24.0


def make_series(directory: Path, shape, label: str, compressed: bool = True):
    """An HCP-like 3-shell series of ``shape`` (X, Y, Z, N); .nii and, if asked, .nii.gz."""
    from nidask.validation import phantom

    x, y, z, n = (int(v) for v in shape)
    n_b0 = max(2, round(n / 16))
    per_shell = (n - n_b0) // 3
    n_b0 = n - 3 * per_shell
    directory.mkdir(parents=True, exist_ok=True)
    ph = phantom.make_hcp_like(
        directory,
        shape3d=(x, y, z),
        zooms=(1.25, 1.25, 1.25),
        n_per_shell=per_shell,
        n_b0=n_b0,
        b0_every=16,
        seed=0,
        supersample=1,
    )
    series = es._dwi_series("scale", label, ph)
    return _compressed(series) if compressed else series


def _compressed(series):
    """The series with its image gzipped beside the .nii (which is removed)."""
    target = series.image + ".gz"
    with open(series.image, "rb") as src, gzip.open(target, "wb", compresslevel=6) as dst:
        shutil.copyfileobj(src, dst, 16 * MIB)
    Path(series.image).unlink()
    series.image = target
    return series


def subset(series, volumes: np.ndarray, directory: Path, compressed: bool):
    """The chosen file volumes of ``series`` as a series of their own."""
    import nibabel as nb

    directory.mkdir(parents=True, exist_ok=True)
    img = nb.load(series.image)
    data = np.stack([np.asarray(img.dataobj[..., int(i)]) for i in volumes], axis=-1)
    path = directory / "dwi.nii"
    nb.Nifti1Image(data, img.affine, img.header).to_filename(path)
    bvals = np.loadtxt(series.bval).ravel()[volumes]
    bvecs = np.loadtxt(series.bvec).reshape(3, -1)[:, volumes]
    np.savetxt(directory / "dwi.bval", bvals[None], fmt="%g")
    np.savetxt(directory / "dwi.bvec", bvecs, fmt="%.6f")
    mask = directory / "mask.nii"
    shutil.copyfile(series.mask_file, mask)
    part = es.MotionSeries(
        key=series.key,
        label=f"{series.label}, first {len(volumes)}",
        image=str(path),
        motion=series.motion[volumes],
        affine=series.affine,
        shape3d=series.shape3d,
        mask_file=str(mask),
        nidask_args={
            "bvec": str(directory / "dwi.bvec"),
            "bval": str(directory / "dwi.bval"),
            "mask": str(mask),
        },
        models=series.models,
        ants_bval=str(directory / "dwi.bval"),
        bvec=str(directory / "dwi.bvec"),
        bval=str(directory / "dwi.bval"),
        dw_volumes=np.flatnonzero(bvals > 50),
    )
    return _compressed(part) if compressed else part


def _estimate(ctx, series, name: str, extra: list[str]) -> tuple[dict, tuple | None]:
    host = es._host(ctx)
    out = ctx.outdir(f"scale-{name}")
    cmd = [sys.executable, str(host.NIDASK_TASK), "estimate", "--nii", series.image]
    cmd += ["--out", str(out), "--model", "auto", "--workers", str(ctx.args.workers)]
    cmd += ["--chunk-size", ctx.args.chunk_size, "--cache-dir", str(ctx.work / "cache"), "--warm"]
    for key, value in series.nidask_args.items():
        cmd += [f"--{key}", value]
    env = host._nidask_env()
    env["MALLOC_TRIM_THRESHOLD_"] = "65536"
    record = host.run_child(cmd + extra, env, 1)
    estimate = None
    if "error" not in record:
        estimate = (np.load(record["motion"]), np.load(record["index"]))
    shutil.rmtree(out, ignore_errors=True)
    shutil.rmtree(ctx.work / "cache", ignore_errors=True)
    return record, estimate


def _row(ctx, series, tool: str, model: str, record: dict, estimate, **extra) -> dict:
    row = ctx.add_row(
        "estimate",
        series.label,
        tool,
        record,
        model=model,
        series=series.label,
        volumes=f"all ({series.n_volumes})",
        **extra,
    )
    if estimate is not None:
        row["n_estimated"] = len(estimate[1])
        row["s_per_volume"] = row["wall_s"] / row["n_estimated"]
        row["loadavg_at_start"] = record["loadavg_at_start"][0]
        row["errors"] = es.score(series, estimate, np.arange(series.n_volumes), series.mask())
        row["note"] = "; ".join(
            [f"{k} {record[k]:.0f} MB" for k in ("run_dir_mb", "cache_mb") if record.get(k)]
            + [f"{k} {record[k]:.1f} s" for k in ("warm_up_s", "run_s") if record.get(k)]
        )
    return row


def suite_scale(ctx) -> None:
    """HCP scale at ``--shape``: see the module docstring."""
    shape = tuple(ctx.args.shape)
    notes = ctx.notes.setdefault("scale", {"shape": list(shape), "threads": ctx.args.workers})
    budget_mb = es._host(ctx).parse_bytes(ctx.args.chunk_size) / MIB
    w_mb = working_set_mb(shape)
    bound = 2 * budget_mb + ctx.args.workers * w_mb
    notes.update(budget_mb=budget_mb, working_set_mb=round(w_mb, 1), bound_mb=round(bound, 1))
    directory = ctx.work / "scale"
    print(f"scale: generating {shape}", file=sys.stderr, flush=True)
    # subsets are cut from the .nii (a .nii.gz read volume by volume decompresses
    # everything before each one), then the series is gzipped as HCP ships it
    series = make_series(directory / "full", shape, "HCP-scale 3 shells", compressed=False)
    small = None
    first = np.arange(min(FLAT_VOLUMES, shape[3]))
    if shape[3] > FLAT_VOLUMES:
        small = subset(series, first, directory / "flat", compressed=True)
    parts = set(ctx.args.scale_parts)
    if "cluster" in parts:
        cluster = subset(series, first, directory / "cluster", compressed=False)
    ants_part = subset(series, np.arange(min(ANTS_VOLUMES, shape[3])), directory / "ants", False)
    series = _compressed(series)

    rows = {}
    for key, part in (("full", series), ("flat", small)):
        if part is None or key not in parts:
            continue
        record, estimate = _estimate(ctx, part, key, [])
        rows[key] = _row(ctx, part, "nidask", "auto", record, estimate)
        print(
            f"scale: nidask {part.label}: {record.get('wall_s', record.get('error'))}",
            file=sys.stderr,
            flush=True,
        )
    if "ants" not in parts:
        pass
    elif es._ants_available(ctx.peer_python):
        record, estimate = es.run_ants(ctx, ants_part, ctx.outdir("scale-ants"))
        rows["ants"] = _row(
            ctx, ants_part, ants_part.ants_label, "rigid Mattes MI", record, estimate
        )
    else:
        ctx.rows.append(
            {
                "suite": "estimate",
                "task": ants_part.label,
                "tool": "ANTs to b0",
                "note": "n/a (--skip-peer or no peer env)",
            }
        )

    for workers in (1, 2) if "cluster" in parts else ():
        record, estimate = _estimate(
            ctx,
            cluster,
            f"cluster-{workers}",
            ["--cluster-workers", str(workers), "--passes", "2"],
        )
        rows[f"cluster{workers}"] = _row(
            ctx, cluster, f"nidask, {workers} cluster workers", "auto, 2 passes", record, estimate
        )
    shutil.rmtree(directory, ignore_errors=True)
    _targets(ctx, rows, bound)


def _targets(ctx, rows: dict, bound: float) -> None:
    full, flat, ants = rows.get("full"), rows.get("flat"), rows.get("ants")
    rss = (full or {}).get("rss_mb")
    ctx.target(
        FEATURE,
        "peak RSS above baseline <= 2 x budget + threads x W",
        f"<= {bound:.0f} MB",
        "n/a" if rss is None else f"{rss:.0f} MB",
        None if rss is None else rss <= bound,
    )
    flat_rss = (flat or {}).get("rss_mb")
    change = None if rss is None or not flat_rss else abs(rss - flat_rss) / flat_rss
    ctx.target(
        FEATURE,
        f"peak RSS within 10 % between {FLAT_VOLUMES} volumes and all",
        "<= 10 %",
        "n/a" if change is None else f"{flat_rss:.0f} vs {rss:.0f} MB ({100 * change:.1f} %)",
        None if change is None else change <= 0.10,
    )
    spv, ants_spv = (full or {}).get("s_per_volume"), (ants or {}).get("s_per_volume")
    ctx.target(
        FEATURE,
        "seconds per volume <= half of ANTs to b0's",
        "<= 0.5 x ANTs",
        "n/a" if spv is None or ants_spv is None else f"{spv:.2f} vs {ants_spv:.2f} s",
        None if spv is None or ants_spv is None else spv <= 0.5 * ants_spv,
    )
    one, two = (rows.get(f"cluster{k}", {}).get("record") or {} for k in (1, 2))
    speedup = one["run_s"] / two["run_s"] if one.get("run_s") and two.get("run_s") else None
    ctx.target(
        FEATURE,
        "2 cluster workers >= 1.8 x one worker",
        ">= 1.8 x",
        "n/a"
        if speedup is None
        else f"{speedup:.2f} x ({one['run_s']:.0f} vs {two['run_s']:.0f} s)",
        None if speedup is None else speedup >= 1.8,
    )
