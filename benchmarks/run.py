"""nidask benchmarks: streamed I/O, resampled export and flat memory, against nifreeze 0.1.0.

    python benchmarks/run.py [--shape 128,128,72,150] [--b0 6] [--chunk-size 64MiB]
                             [--suites io,resample,lofo] [--skip-peer]
                             [--out benchmarks/results/latest.json]
    python benchmarks/run.py --sizes 1GB,4GB        # flat-memory check, nidask only
    python benchmarks/run.py --suites estimate [--estimate-size small|medium]
                                                    # motion accuracy (estimate_suite.py)
    python benchmarks/run.py --suites estimate --shape 145,174,145,288
                                                    # HCP scale (scale_suite.py)

The series is generated once (int16 NIfTI, ``--b0`` b=0 volumes first, ``.bvec`` /
``.bval``, streamed by :func:`nidask.validation.phantom.write_series`) into a work directory
that is removed at the end unless ``--keep``.  Every measurement runs in its own
child process -- ``benchmarks/_nidask_task.py`` for nidask, the peer venv's python
running ``benchmarks/peer_nifreeze.py`` for nifreeze -- which prints one JSON line
with ``wall_s``, ``maxrss_mb`` and ``baseline_mb``; memory is reported as peak RSS
above the baseline (interpreter + imports).  See ``docs/benchmarks.md``.

A suite is one function ``suite_<name>(ctx) -> None`` registered in ``SUITES``; it
adds rows with :meth:`Context.add_row` and target checks with :meth:`Context.target`.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import json
import math
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
# NIDASK_BENCH_SRC: a copy of src/ to measure instead (e.g. a snapshot taken while
# others edit the checkout); it goes first on sys.path here and in the nidask children
SRC = Path(os.environ.get("NIDASK_BENCH_SRC") or ROOT / "src").resolve()
if os.environ.get("NIDASK_BENCH_SRC") or importlib.util.find_spec("nidask") is None:
    sys.path.insert(0, str(SRC))  # a snapshot, or a checkout without an install

import numpy as np  # noqa: E402
from dask.utils import parse_bytes  # noqa: E402

import estimate_suite  # noqa: E402  (benchmarks/, on sys.path as the script's directory)
import scale_suite  # noqa: E402

NIDASK_TASK = HERE / "_nidask_task.py"
PEER_TASK = HERE / "peer_nifreeze.py"
PEER_SETUP = HERE / "setup_peer_env.sh"
MB = 2**20

#: the features whose targets a run checks (the ``feature`` of every target)
STREAMED_IO = "streamed I/O"
RESAMPLE = "resampled export"
LOFO = "leave-one-out sweep"
#: targets of streamed I/O and resampled export
BUDGET_FACTOR = 2.0  # RSS above baseline <= 2x the chunk budget
RSS_VS_NIFREEZE = 0.15  # nidask peak RSS <= 0.15x nifreeze's on the same work
THROUGHPUT_VS_COPY = 0.5  # materialize / to_nifti(.nii) >= 50% of a plain copy
RESAMPLE_SPEEDUP = 5.0  # resampled to_nifti >= 5x faster than nifreeze
WORKER_SPEEDUP = 1.7  # 2 workers >= 1.7x faster than 1
LOFO_SPEEDUP = 20.0  # LOFO sweep >= 20x faster than nifreeze's ExpectationModel sweep
FLAT_TOLERANCE = 0.10  # RSS above baseline the same within 10% for 1 GB and 4 GB
FLAT_FLOOR_MB = 2.0  # ... or within this many MB (10% of a couple of MB is noise)


# ------------------------------------------------------------------------ the series


@dataclass
class Series:
    """Files of one generated DWI series."""

    nii: str
    bvec: str
    bval: str
    matrices: str
    shape: tuple[int, int, int, int]
    n_b0: int
    affine: np.ndarray

    @property
    def n_dw(self) -> int:
        return self.shape[3] - self.n_b0

    @property
    def volume_bytes(self) -> int:
        return math.prod(self.shape[:3]) * 2

    @property
    def dw_bytes(self) -> int:
        """Bytes of the diffusion-weighted volumes (what both libraries export)."""
        return self.volume_bytes * self.n_dw


def generate_series(directory: Path, shape, n_b0: int, seed: int = 0) -> Series:
    """Write the int16 series, its gradients and per-DW-volume motion matrices.

    The image is streamed by :func:`nidask.validation.phantom.write_series` (a few volumes at a
    time); the rigid matrices (uniform up to 3 mm / 3 degrees about the grid centre)
    are shared by nidask and nifreeze through one ``.npy``.
    """
    import nibabel as nb

    from nidask.validation.phantom import random_motion, write_series

    directory.mkdir(parents=True, exist_ok=True)
    shape = tuple(int(s) for s in shape)
    if n_b0 >= shape[3] - 6:
        raise SystemExit(f"--b0 {n_b0} leaves fewer than 6 diffusion-weighted volumes")
    nii = str(directory / "dwi.nii")
    write_series(nii, shape, dtype="int16", seed=seed)
    affine = nb.load(nii).affine
    rng = np.random.default_rng(seed)
    n_dw = shape[3] - n_b0
    dirs = rng.normal(size=(n_dw, 3))
    dirs /= np.linalg.norm(dirs, axis=1, keepdims=True)
    bvecs = np.vstack([np.zeros((n_b0, 3)), dirs])
    bvals = np.concatenate([np.zeros(n_b0), np.full(n_dw, 1000.0)])
    bvec, bval = str(directory / "dwi.bvec"), str(directory / "dwi.bval")
    np.savetxt(bvec, bvecs.T, fmt="%.6f")
    np.savetxt(bval, bvals[np.newaxis], fmt="%d")
    centre = affine[:3, :3] @ ((np.array(shape[:3]) - 1) / 2) + affine[:3, 3]
    matrices = str(directory / "motion.npy")
    np.save(matrices, random_motion(n_dw, rng, 3.0, 3.0, centre))
    return Series(nii, bvec, bval, matrices, shape, n_b0, affine)


# ------------------------------------------------------------------- child processes


def _nidask_env() -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(SRC), env.get("PYTHONPATH")) if p)
    return env


def _peer_env() -> dict:
    env = dict(os.environ)
    env.pop("PYTHONPATH", None)  # the peer venv must not see nidask's stack
    return env


def run_child(cmd: list[str], env: dict, repeat: int = 1) -> dict:
    """Run one measurement ``repeat`` times; keep the fastest run's JSON record.

    Every run's wall time and RSS above baseline are kept too; the report uses the
    fastest wall time and the *largest* RSS (memory targets are worst cases).

    A failing child gives ``{"error": <last lines of stderr>}`` instead of raising,
    so one broken measurement does not lose the others.
    """
    best = None
    walls, rss, cpus, loads = [], [], [], []
    for _ in range(max(1, repeat)):
        # flush dirty pages left by earlier runs, so writeback throttling of one
        # measurement's output does not land on the next one's clock
        os.sync()
        loads.append(round(os.getloadavg()[0], 2))
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
        if proc.returncode != 0 or not lines:
            tail = "\n".join(proc.stderr.strip().splitlines()[-6:])
            return {"error": f"exit {proc.returncode}: {tail}", "cmd": " ".join(cmd)}
        record = json.loads(lines[-1])
        walls.append(record["wall_s"])
        rss.append(max(record["maxrss_mb"] - record["baseline_mb"], 0.0))
        # CPU time of the whole child (imports included): robust to a busy machine
        cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
        cpus.append(round(cpu, 3))
        record["cpu_s"] = round(cpu, 3)
        if best is None or record["wall_s"] < best["wall_s"]:
            best = record
    best["walls"], best["rss_above_baseline_mb"] = walls, rss
    best["cpu_s_runs"], best["loadavg_at_start"] = cpus, loads
    return best


def find_peer_python(explicit: str | None, ants: bool = False) -> str | None:
    """The nifreeze venv's python: ``--peer-python``, else ``setup_peer_env.sh``'s answer.

    The setup script honours ``NIDASK_PEER_VENV`` and reuses an existing venv;
    ``ants`` adds ANTs to it (``NIDASK_PEER_ANTS=1``, for the estimate suite).
    """
    if explicit:
        return explicit
    env = estimate_suite.peer_setup_env() if ants else None
    proc = subprocess.run(["bash", str(PEER_SETUP)], capture_output=True, text=True, env=env)
    if proc.returncode != 0 or not proc.stdout.strip():
        print(f"warning: peer environment unavailable:\n{proc.stderr}", file=sys.stderr)
        return None
    return proc.stdout.strip().splitlines()[-1]


# --------------------------------------------------------------------------- context


@dataclass
class Context:
    """Everything a suite needs: options, the series, child runners, and the results."""

    args: argparse.Namespace
    series: Series | None  # None when only the estimate suite runs (it makes its own)
    work: Path
    peer_python: str | None
    rows: list[dict] = field(default_factory=list)
    targets: list[dict] = field(default_factory=list)
    notes: dict = field(default_factory=dict)

    @property
    def chunk_bytes(self) -> int:
        return parse_bytes(self.args.chunk_size)

    @property
    def budget_mb(self) -> float:
        return BUDGET_FACTOR * self.chunk_bytes / MB

    def outdir(self, name: str) -> Path:
        path = self.work / "out" / name
        path.mkdir(parents=True, exist_ok=True)
        return path

    def nidask(self, task: str, out: Path, workers: int | None = None, **opts) -> dict:
        s = self.series
        cmd = [sys.executable, str(NIDASK_TASK), task, "--nii", s.nii, "--out", str(out)]
        if task != "copy":
            cmd += ["--bvec", s.bvec, "--bval", s.bval, "--chunk-size", self.args.chunk_size]
            cmd += ["--cache-dir", str(self.work / "cache")]
            cmd += ["--workers", str(workers or self.args.workers)]
        for key, value in opts.items():
            cmd += [f"--{key.replace('_', '-')}", str(value)]
        return run_child(cmd, _nidask_env(), self.args.repeat)

    def nifreeze(self, task: str, out: Path, **opts) -> dict | None:
        if self.peer_python is None:
            return None
        s = self.series
        cmd = [self.peer_python, str(PEER_TASK), task, "--quiet", "--nii", s.nii]
        cmd += ["--bvec", s.bvec, "--bval", s.bval, "--out", str(out)]
        for key, value in opts.items():
            cmd += [f"--{key.replace('_', '-')}", str(value)]
        return run_child(cmd, _peer_env(), self.args.repeat)

    def add_row(self, suite: str, task: str, tool: str, record: dict | None, **extra) -> dict:
        """Append a result row; ``record`` is a child's JSON line (or ``None`` for n/a)."""
        row = {"suite": suite, "task": task, "tool": tool, **extra}
        if record is None:
            row.setdefault("note", "n/a")
        elif "error" in record:
            row["error"] = record["error"]
        else:
            row["wall_s"] = record["wall_s"]
            row["cpu_s"] = record.get("cpu_s")
            row["rss_mb"] = max(record["rss_above_baseline_mb"])
            row["record"] = record
            nbytes = record.get("bytes")
            if nbytes:
                row["throughput_mbs"] = nbytes / MB / max(record["wall_s"], 1e-9)
        self.rows.append(row)
        return row

    def target(self, feature: str, name: str, goal: str, measured: str, met: bool | None) -> None:
        """Record one target check (``met=None`` when it could not be measured)."""
        self.targets.append(
            {"feature": feature, "target": name, "goal": goal, "measured": measured, "met": met}
        )


def _ok(row: dict | None) -> bool:
    return row is not None and "wall_s" in row


def _ratio(a: float | None, b: float | None) -> float | None:
    if a is None or b is None or b == 0:
        return None
    return a / b


def _budget_check(ctx: Context, feature: str, row: dict, label: str) -> None:
    if not _ok(row):
        ctx.target(feature, f"RSS <= 2x chunk budget: {label}", "", "failed", None)
        return
    row["rss_vs_budget"] = row["rss_mb"] / ctx.budget_mb
    ctx.target(
        feature,
        f"RSS <= 2x chunk budget: {label}",
        f"<= {ctx.budget_mb:.0f} MB",
        f"{row['rss_mb']:.0f} MB ({row['rss_vs_budget']:.2f}x of 2x budget)",
        row["rss_mb"] <= ctx.budget_mb,
    )


# ----------------------------------------------------------------------------- suites


def suite_io(ctx: Context) -> None:
    """Streamed I/O: open + one volume / materialize / to_filename / to_nifti, and a file copy."""
    copy = ctx.add_row("io", "file copy (.nii)", "shutil", ctx.nidask("copy", ctx.outdir("copy")))
    _clean(ctx.outdir("copy"))
    copy_thru = copy.get("throughput_mbs")
    tasks = [
        ("open + one volume", "open_one_volume", {"index": 0}),
        ("open + materialize", "materialize", None),
        ("open + to_filename (NFDH5)", "to_filename", {}),
        ("open + to_nifti (.nii)", "to_nifti", {"ext": ".nii"}),
        ("open + to_nifti (.nii.gz)", "to_nifti", {"ext": ".nii.gz"}),
    ]
    for label, task, peer_opts in tasks:
        out = ctx.outdir(f"io-{task}")
        nd_opts = {"ext": peer_opts["ext"]} if peer_opts and "ext" in peer_opts else {}
        nd = ctx.add_row("io", label, "nidask", ctx.nidask(task, out, **nd_opts))
        _clean(out)
        if peer_opts is None:
            nf = ctx.add_row("io", label, "nifreeze", None, note="n/a (no materialize)")
        elif ctx.peer_python is None:
            nf = None
        else:
            nf = ctx.add_row("io", label, "nifreeze", ctx.nifreeze(task, out, **peer_opts))
            _clean(out)
        if _ok(nd) and _ok(nf):
            nd["time_vs_nifreeze"] = _ratio(nd["wall_s"], nf["wall_s"])
            nd["rss_vs_nifreeze"] = _ratio(nd["rss_mb"], nf["rss_mb"])
        if task in ("materialize", "to_nifti") and _ok(nd) and copy_thru:
            nd["thru_vs_copy"] = _ratio(nd.get("throughput_mbs"), copy_thru)
        # targets
        if task != "open_one_volume":
            _budget_check(ctx, STREAMED_IO, nd, label)
        if nf is not None and peer_opts is not None:
            ratio = nd.get("rss_vs_nifreeze")
            ctx.target(
                STREAMED_IO,
                f"RSS <= 0.15x nifreeze: {label}",
                f"<= {RSS_VS_NIFREEZE}x",
                "n/a"
                if ratio is None
                else f"{ratio:.3f}x ({nd['rss_mb']:.0f} vs {nf['rss_mb']:.0f} MB)",
                None if ratio is None else ratio <= RSS_VS_NIFREEZE,
            )
        if (task, nd_opts.get("ext")) in (("materialize", None), ("to_nifti", ".nii")):
            ratio = nd.get("thru_vs_copy")
            ctx.target(
                STREAMED_IO,
                f"throughput >= 50% of copy: {label}",
                f">= {THROUGHPUT_VS_COPY}x",
                "n/a"
                if ratio is None
                else f"{ratio:.2f}x ({nd['throughput_mbs']:.0f} vs {copy_thru:.0f} MB/s)",
                None if ratio is None else ratio >= THROUGHPUT_VS_COPY,
            )


def suite_resample(ctx: Context) -> None:
    """Resampled export: to_nifti(order=1, 3) vs nifreeze; 1 vs 2 workers; agreement."""
    s = ctx.series
    for order in ctx.args.orders:
        label = f"resampled to_nifti order={order}"
        out = ctx.outdir(f"resample-{order}")
        opts = {"matrices": s.matrices, "order": order, "ext": ".nii"}
        many = ctx.args.workers
        nd = ctx.add_row(
            "resample",
            label,
            f"nidask ({many} workers)",
            ctx.nidask("resampled_to_nifti", out, workers=many, **opts),
        )
        nidask_out = out / "nidask_resampled.nii"
        one = ctx.add_row(
            "resample",
            label,
            "nidask (1 worker)",
            ctx.nidask("resampled_to_nifti", out, workers=1, **opts),
        )
        nf = None
        if ctx.peer_python:
            record = ctx.nifreeze("resampled_to_nifti", out, **opts)
            nf = ctx.add_row("resample", label, "nifreeze", record)
        if _ok(nd) and _ok(one):
            nd["speedup_vs_1_worker"] = _ratio(one["wall_s"], nd["wall_s"])
            nd["note"] = f"{nd['speedup_vs_1_worker']:.2f}x faster than 1 worker"
            ctx.target(
                RESAMPLE,
                f"{many} workers >= 1.7x faster than 1: order {order}",
                f">= {WORKER_SPEEDUP}x",
                f"{nd['speedup_vs_1_worker']:.2f}x "
                f"({one['wall_s']:.1f} s -> {nd['wall_s']:.1f} s)",
                nd["speedup_vs_1_worker"] >= WORKER_SPEEDUP,
            )
        _budget_check(ctx, RESAMPLE, nd, f"{label}, {many} workers")
        _budget_check(ctx, RESAMPLE, one, f"{label}, 1 worker")
        if _ok(nd) and _ok(nf):
            nd["time_vs_nifreeze"] = _ratio(nd["wall_s"], nf["wall_s"])
            nd["rss_vs_nifreeze"] = _ratio(nd["rss_mb"], nf["rss_mb"])
            one["time_vs_nifreeze"] = _ratio(one["wall_s"], nf["wall_s"])
            one["rss_vs_nifreeze"] = _ratio(one["rss_mb"], nf["rss_mb"])
            speedup = nf["wall_s"] / nd["wall_s"]
            ctx.target(
                RESAMPLE,
                f">= 5x faster than nifreeze: order {order}",
                f">= {RESAMPLE_SPEEDUP}x",
                f"{speedup:.2f}x ({nf['wall_s']:.1f} s -> {nd['wall_s']:.1f} s)",
                speedup >= RESAMPLE_SPEEDUP,
            )
            agreement = compare_outputs(
                str(nidask_out), str(out / "peer_resampled.nii"), s.affine, np.load(s.matrices)
            )
            nf["agreement"] = agreement
            nf["note"] = (
                f"vs nidask: max|d| {agreement['max_abs_fov']:.3g}, "
                f"mean|d| {agreement['mean_abs_fov']:.3g}, r {agreement['r_fov']:.6f} (in FOV)"
            )
            ctx.notes[f"agreement_order{order}"] = agreement
        elif ctx.peer_python is None:
            ctx.target(RESAMPLE, f">= 5x faster than nifreeze: order {order}", "", "skipped", None)
        _clean(out)


def suite_lofo(ctx: Context) -> None:
    """Leave-one-out sweep: a full LOFO sweep of the average model, registration excluded.

    nidask: ``Estimator(model=...).sweep`` (materialize once, voxel-major layout once,
    every fold's fit + predict); nifreeze: ``peer_nifreeze.py lofo_average``
    (``ExpectationModel.fit_predict(i)`` for every fold, as its ``Estimator.run``
    does before registering).  One statistic per ``--lofo-stats`` entry (nifreeze's
    default is the median); 2 workers vs 1.
    """
    import nidask

    if not hasattr(nidask.Estimator, "sweep"):
        print("lofo: estimator not available yet (no nidask.Estimator.sweep); suite skipped")
        ctx.notes["lofo"] = "estimator not available yet"
        return
    for stat in ctx.args.lofo_stats:
        model = {"mean": "average", "median": "median"}[stat]
        label = f"LOFO sweep, average model ({stat})"
        out = ctx.outdir(f"lofo-{stat}")
        many = ctx.args.workers
        nd = ctx.add_row(
            "lofo", label, f"nidask ({many} workers)", ctx.nidask("lofo_sweep", out, model=model)
        )
        _clean(out)
        one = ctx.add_row(
            "lofo",
            label,
            "nidask (1 worker)",
            ctx.nidask("lofo_sweep", ctx.outdir(f"lofo-{stat}"), workers=1, model=model),
        )
        _clean(out)
        nf = None
        if ctx.peer_python:
            record = ctx.nifreeze("lofo_average", ctx.outdir(f"lofo-{stat}"), stat=stat)
            nf = ctx.add_row("lofo", label, "nifreeze", record)
            _clean(out)
        for row in (nd, one, nf):
            if _ok(row):
                row["sweep_s"] = row["record"]["sweep_s"]
                row["note"] = (
                    f"fit + predict of every fold {row['sweep_s']:.2f} s "
                    f"({row['record']['n_folds'] / row['sweep_s']:.1f} folds/s); "
                    "the rest: open + materialize + layout"
                    if row is not nf
                    else f"fit_predict of every fold {row['sweep_s']:.2f} s; the rest: from_nii"
                )
        if _ok(nd) and _ok(one):
            speedup = one["sweep_s"] / nd["sweep_s"]
            nd["speedup_vs_1_worker"] = speedup
            ctx.target(
                LOFO,
                f"{many} workers >= 1.7x fold throughput of 1: {stat}",
                f">= {WORKER_SPEEDUP}x",
                f"{speedup:.2f}x ({one['sweep_s']:.2f} s -> {nd['sweep_s']:.2f} s)",
                speedup >= WORKER_SPEEDUP,
            )
        if _ok(nd) and _ok(nf):
            for row in (nd, one):
                if _ok(row):
                    row["time_vs_nifreeze"] = _ratio(row["wall_s"], nf["wall_s"])
                    row["rss_vs_nifreeze"] = _ratio(row["rss_mb"], nf["rss_mb"])
            speedup = nf["sweep_s"] / nd["sweep_s"]
            ctx.target(
                LOFO,
                f">= 20x faster than nifreeze, fit + predict of every fold: {stat}",
                f">= {LOFO_SPEEDUP}x",
                f"{speedup:.1f}x ({nf['sweep_s']:.2f} s -> {nd['sweep_s']:.2f} s)",
                speedup >= LOFO_SPEEDUP,
            )
            speedup = nf["wall_s"] / nd["wall_s"]
            ctx.target(
                LOFO,
                f"(for reference) end to end, setup included: {stat}",
                "",
                f"{speedup:.1f}x ({nf['wall_s']:.1f} s -> {nd['wall_s']:.1f} s)",
                None,
            )


SUITES: dict[str, Callable[[Context], None]] = {
    "io": suite_io,
    "resample": suite_resample,
    "lofo": suite_lofo,
    "estimate": lambda ctx: (
        scale_suite.suite_scale(ctx) if ctx.args.scale else estimate_suite.suite_estimate(ctx)
    ),
}


# ------------------------------------------------------------------- flat memory mode


def run_sizes(ctx_args: argparse.Namespace, work: Path, meta: dict) -> dict:
    """nidask's sinks, resampled export and LOFO sweep on series of each ``--sizes``.

    Peak RSS must stay the same whatever the number of volumes (streamed I/O, resampled
    export, leave-one-out sweep).
    """
    shape3d = tuple(ctx_args.shape[:3])
    volume_bytes = math.prod(shape3d) * 2
    tasks = [  # (label, task, options, feature)
        ("open + materialize", "materialize", {}, STREAMED_IO),
        ("open + to_filename (NFDH5)", "to_filename", {}, STREAMED_IO),
        ("open + to_nifti (.nii)", "to_nifti", {"ext": ".nii"}, STREAMED_IO),
        (
            "resampled to_nifti order=1",
            "resampled_to_nifti",
            {"order": 1, "ext": ".nii"},
            RESAMPLE,
        ),
        ("LOFO sweep, average model (mean)", "lofo_sweep", {"model": "average"}, LOFO),
    ]
    rows: list[dict] = []
    targets: list[dict] = []
    by_task: dict[str, list[dict]] = {label: [] for label, *_ in tasks}
    features = {label: feature for label, _, _, feature in tasks}
    for size in ctx_args.sizes:
        n = max(ctx_args.b0 + 7, round(parse_bytes(size) / volume_bytes))
        series_dir = work / f"series-{size}"
        t0 = time.perf_counter()
        series = generate_series(series_dir, (*shape3d, n), ctx_args.b0, ctx_args.seed)
        print(
            f"generated {size}: {series.shape} ({series.volume_bytes * n / 1e9:.2f} GB) "
            f"in {time.perf_counter() - t0:.0f} s",
            file=sys.stderr,
        )
        ctx = Context(ctx_args, series, work, None)
        for label, task, opts, _ in tasks:
            if task == "resampled_to_nifti":
                opts = {**opts, "matrices": series.matrices}
            out = ctx.outdir(f"sizes-{task}")
            row = ctx.add_row(
                "flat", f"{label} [{size}]", "nidask", ctx.nidask(task, out, **opts), size=size
            )
            _clean(out)
            if _ok(row):
                row["rss_vs_budget"] = row["rss_mb"] / ctx.budget_mb
            by_task[label].append(row)
            print(_progress_line(row), file=sys.stderr)
        rows += ctx.rows
        shutil.rmtree(series_dir, ignore_errors=True)
        shutil.rmtree(work / "cache", ignore_errors=True)
    budget_mb = BUDGET_FACTOR * parse_bytes(ctx_args.chunk_size) / MB
    for label, measured in by_task.items():
        good = [r for r in measured if _ok(r)]
        feature = features[label]
        if len(good) < len(measured) or not good:
            targets.append(_target(feature, f"flat RSS: {label}", "", "failed", None))
            continue
        values = [r["rss_mb"] for r in good]
        spread = (max(values) - min(values)) / max(min(values), 1e-9)
        sizes = ", ".join(f"{r['size']}: {r['rss_mb']:.0f} MB" for r in good)
        targets.append(
            _target(
                feature,
                f"RSS flat across sizes: {label}",
                # resampled export's target is the budget bound at every size (below), not
                # flatness
                f"within {FLAT_TOLERANCE:.0%} or {FLAT_FLOOR_MB:.0f} MB"
                if feature != RESAMPLE
                else "(shown)",
                f"{sizes} (spread {spread:.1%})",
                (spread <= FLAT_TOLERANCE or max(values) - min(values) <= FLAT_FLOOR_MB)
                if feature != RESAMPLE
                else None,
            )
        )
        worst = max(values)
        if feature == LOFO:  # the sweep's target is flatness only
            continue
        targets.append(
            _target(
                feature,
                f"RSS <= 2x chunk budget: {label}, all sizes",
                f"<= {budget_mb:.0f} MB",
                f"max {worst:.0f} MB",
                worst <= budget_mb,
            )
        )
    return {"meta": meta, "rows": rows, "targets": targets, "notes": {}}


def _target(feature, name, goal, measured, met) -> dict:
    return {"feature": feature, "target": name, "goal": goal, "measured": measured, "met": met}


# ------------------------------------------------------------------------- reporting


def compare_outputs(a_path: str, b_path: str, affine, matrices, margin: float = 1.0) -> dict:
    """Voxel-wise agreement of two resampled 4D NIfTI files, read one volume at a time.

    Statistics are over all voxels and over the field of view ("fov": voxels whose
    sample point lies at least ``margin`` voxels inside the input grid for that
    volume's matrix).  nifreeze writes int16 (rounded), nidask float32, so
    differences up to 0.5 are the rounding of nifreeze's output.
    """
    import nibabel as nb

    try:
        from nidask.ops.resample import voxel_matrices
    except ModuleNotFoundError:  # before the io/ops/estimation layout
        from nidask.resample import voxel_matrices

    a = nb.load(a_path, mmap=False)
    b = nb.load(b_path, mmap=False)
    if a.shape != b.shape:
        return {"error": f"shapes differ: {a.shape} vs {b.shape}"}
    shape3d = a.shape[:3]
    grid = np.indices(shape3d, dtype=np.float32).reshape(3, -1)
    upper = np.array(shape3d, dtype=np.float32)[:, None] - 1 - margin
    voxmats = voxel_matrices(affine, matrices).astype(np.float32)
    # per selection: n, sum x, sum y, sum xx, sum yy, sum xy, sum |x - y|, max |x - y|
    acc = {"all": np.zeros(8), "fov": np.zeros(8)}
    within_half = 0
    for k in range(a.shape[3]):
        x = np.asarray(a.dataobj[..., k], dtype=np.float64).reshape(-1)
        y = np.asarray(b.dataobj[..., k], dtype=np.float64).reshape(-1)
        points = voxmats[k, :3, :3] @ grid + voxmats[k, :3, 3:4]
        fov = np.all((points >= margin) & (points <= upper), axis=0)
        for name, sel in (("all", slice(None)), ("fov", fov)):
            xs, ys = x[sel], y[sel]
            d = np.abs(xs - ys)
            s = acc[name]
            s[:7] += [xs.size, xs.sum(), ys.sum(), xs @ xs, ys @ ys, xs @ ys, d.sum()]
            s[7] = max(s[7], d.max(initial=0.0))
            if name == "fov":
                within_half += int((d <= 0.5 + 1e-3).sum())
    result = {}
    for name, (n, sx, sy, sxx, syy, sxy, sd, dmax) in acc.items():
        n = max(n, 1)
        var = max((sxx - sx * sx / n) * (syy - sy * sy / n), 1e-300)
        result[f"max_abs_{name}"] = float(dmax)
        result[f"mean_abs_{name}"] = float(sd / n)
        result[f"r_{name}"] = float((sxy - sx * sy / n) / math.sqrt(var))
        result[f"n_{name}"] = int(n)
    result["fraction_fov_within_0.5"] = within_half / result["n_fov"]
    return result


def _fmt(value, spec: str, suffix: str = "") -> str:
    return "" if value is None else f"{value:{spec}}{suffix}"


TABLE_COLUMNS = (
    "suite",
    "task",
    "tool",
    "wall s",
    "CPU s",
    "RSS above baseline MB",
    "time / nifreeze",
    "RSS / nifreeze",
    "throughput / copy",
    "RSS / (2x chunk)",
    "notes",
)


def markdown_table(rows: list[dict]) -> str:
    lines = ["| " + " | ".join(TABLE_COLUMNS) + " |", "|" + "---|" * len(TABLE_COLUMNS)]
    for row in rows:
        note = row.get("note", "")
        if "error" in row:
            note = "ERROR: " + row["error"].splitlines()[-1][:80]
        elif row.get("throughput_mbs") and row["task"] != "open + one volume":
            note = (note + "; " if note else "") + f"{row['throughput_mbs']:.0f} MB/s"
        cells = [
            row["suite"],
            row["task"],
            row["tool"],
            _fmt(row.get("wall_s"), ".2f"),
            _fmt(row.get("cpu_s"), ".1f"),
            _fmt(row.get("rss_mb"), ".0f"),
            _fmt(row.get("time_vs_nifreeze"), ".3f", "x"),
            _fmt(row.get("rss_vs_nifreeze"), ".3f", "x"),
            _fmt(row.get("thru_vs_copy"), ".2f", "x"),
            _fmt(row.get("rss_vs_budget"), ".2f", "x"),
            note,
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def targets_table(targets: list[dict]) -> str:
    lines = ["| feature | target | goal | measured | met |", "|---|---|---|---|---|"]
    for t in targets:
        met = {True: "yes", False: "**no**", None: "n/a"}[t["met"]]
        lines.append(f"| {t['feature']} | {t['target']} | {t['goal']} | {t['measured']} | {met} |")
    return "\n".join(lines)


def _progress_line(row: dict) -> str:
    if "error" in row:
        return f"  {row['task']} [{row['tool']}]: ERROR {row['error']}"
    if "wall_s" not in row:
        return f"  {row['task']} [{row['tool']}]: {row.get('note', 'n/a')}"
    return (
        f"  {row['task']} [{row['tool']}]: {row['wall_s']:.2f} s, "
        f"+{row['rss_mb']:.0f} MB above baseline"
    )


def _versions(peer_python: str | None) -> dict:
    from importlib.metadata import PackageNotFoundError, version

    import nidask

    ours = {"python": platform.python_version(), "nidask": nidask.__version__}
    for name in ("dask", "numpy", "scipy", "nibabel", "h5py"):
        try:
            ours[name] = version(name)
        except PackageNotFoundError:
            ours[name] = None
    try:
        commit = subprocess.run(
            ["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
        ).stdout.strip()
    except OSError:
        commit = ""
    ours["nidask_commit"] = commit or None
    ours["nidask_src"] = str(Path(nidask.__file__).resolve().parent.parent)
    try:
        dirty = subprocess.run(
            ["git", "-C", str(ROOT), "status", "--porcelain", "--", "src"],
            capture_output=True,
            text=True,
        ).stdout.strip()
    except OSError:
        dirty = ""
    ours["src_uncommitted_changes"] = bool(dirty)
    peer = None
    if peer_python:
        code = (
            "import json, platform; from importlib import metadata\n"
            "def v(n):\n"
            "    try:\n"
            "        return metadata.version(n)\n"
            "    except metadata.PackageNotFoundError:\n"
            "        return None\n"
            "print(json.dumps({'python': platform.python_version(), **{n: v(n) for n in "
            "('nifreeze', 'numpy', 'scipy', 'nibabel', 'nitransforms', 'h5py', 'antspyx')}}))"
        )
        proc = subprocess.run([peer_python, "-c", code], capture_output=True, text=True)
        peer = json.loads(proc.stdout) if proc.returncode == 0 else {"error": proc.stderr}
    return {"nidask_env": ours, "peer_env": peer}


def _machine() -> dict:
    model = ""
    try:
        with open("/proc/cpuinfo") as f:
            model = next((ln.split(":", 1)[1].strip() for ln in f if "model name" in ln), "")
    except OSError:
        pass
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return {
        "cores": os.cpu_count(),
        "cpu": model,
        "memory_gib": round(mem, 1),
        "platform": platform.platform(),
    }


def _clean(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)


# ------------------------------------------------------------------------------ cli


DEFAULT_SHAPE = (128, 128, 72, 150)


def _shape(text: str) -> tuple[int, ...]:
    shape = tuple(int(v) for v in text.replace("x", ",").split(","))
    if len(shape) != 4 or min(shape) < 1:
        raise argparse.ArgumentTypeError("--shape needs four positive integers X,Y,Z,N")
    return shape


def _list(text: str) -> list[str]:
    return [v.strip() for v in text.split(",") if v.strip()]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter
    )
    p.add_argument(
        "--shape",
        type=_shape,
        help="X,Y,Z,N of the generated series (default 128,128,72,150); with --suites "
        "estimate, the HCP-scale run (scale_suite.py), e.g. 145,174,145,288",
    )
    p.add_argument("--b0", type=int, default=6, help="b=0 volumes at the start (default 6)")
    p.add_argument("--chunk-size", default="64MiB", help="nidask.chunk-size (default 64MiB)")
    p.add_argument("--suites", type=_list, default=["io", "resample", "lofo"])
    p.add_argument("--skip-peer", action="store_true", help="do not run nifreeze")
    p.add_argument("--peer-python", help="python of the nifreeze venv (default: ask setup)")
    p.add_argument("--out", help="JSON results (default benchmarks/results/latest[_sizes].json)")
    p.add_argument("--sizes", type=_list, help="flat-memory mode, e.g. 1GB,4GB (nidask only)")
    p.add_argument("--orders", type=lambda t: [int(v) for v in _list(t)], default=[1, 3])
    p.add_argument(
        "--lofo-stats", type=_list, default=["mean", "median"], help="average model statistics"
    )
    p.add_argument("--workers", type=int, default=2, help="dask threads for nidask (default 2)")
    p.add_argument("--repeat", type=int, default=1, help="runs per measurement (fastest kept)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workdir", help="parent of the work directory (default: temp dir)")
    p.add_argument("--keep", action="store_true", help="keep the generated files")
    p.add_argument(
        "--estimate-size",
        choices=sorted(estimate_suite.SIZES),
        default="medium",
        help="series sizes of the estimate suite (default medium; small: a quick check)",
    )
    p.add_argument(
        "--estimate-series",
        type=_list,
        default=[key for key, _ in estimate_suite.GENERATORS],
        help="series of the estimate suite, comma-separated (default: "
        + ",".join(key for key, _ in estimate_suite.GENERATORS)
        + ")",
    )
    p.add_argument(
        "--scale-parts",
        type=_list,
        default=["full", "flat", "ants", "cluster"],
        help="parts of the HCP-scale run (scale_suite.py; default full,flat,ants,cluster)",
    )
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    args.scale = args.shape is not None and "estimate" in args.suites
    args.shape = args.shape or DEFAULT_SHAPE
    unknown = [s for s in args.suites if s not in SUITES]
    if unknown:
        raise SystemExit(f"unknown suite(s) {unknown}; choose from {sorted(SUITES)}")
    known = [key for key, _ in estimate_suite.GENERATORS]
    unknown = [s for s in args.estimate_series if s not in known]
    if unknown:
        raise SystemExit(f"unknown estimate series {unknown}; choose from {known}")
    parse_bytes(args.chunk_size)
    estimate_only = args.suites == ["estimate"]
    default_out = (
        "latest_sizes.json"
        if args.sizes
        else ("latest_estimate.json" if estimate_only else "latest.json")
    )
    out = Path(args.out) if args.out else HERE / "results" / default_out
    peer_python = (
        None
        if (args.skip_peer or args.sizes)
        else find_peer_python(args.peer_python, ants="estimate" in args.suites)
    )

    base = args.workdir or tempfile.gettempdir()
    os.makedirs(base, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="nidask-bench-", dir=base))
    started = time.perf_counter()
    meta = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": _machine(),
        **_versions(peer_python),
        "suites": args.suites,
        "shape": list(args.shape),
        "b0": args.b0,
        "chunk_size": args.chunk_size,
        "chunk_budget_bytes": parse_bytes(args.chunk_size),
        "workers": args.workers,
        "repeat": args.repeat,
        "seed": args.seed,
        "workdir": str(work),
        "loadavg_at_start": [round(v, 2) for v in os.getloadavg()],
    }
    try:
        if args.sizes:
            meta["sizes"] = args.sizes
            results = run_sizes(args, work, meta)
        else:
            series = None
            if set(args.suites) - {"estimate"}:  # the estimate suite makes its own series
                t0 = time.perf_counter()
                series = generate_series(work / "series", args.shape, args.b0, args.seed)
                meta["series_mb"] = round(series.volume_bytes * series.shape[3] / MB, 1)
                meta["dw_mb"] = round(series.dw_bytes / MB, 1)
                print(
                    f"generated {series.shape} int16 ({meta['series_mb']:.0f} MB) "
                    f"in {time.perf_counter() - t0:.1f} s; work dir {work}",
                    file=sys.stderr,
                )
            if "estimate" in args.suites:
                meta["estimate_size"] = args.estimate_size
                meta["estimate_series"] = args.estimate_series
            ctx = Context(args, series, work, peer_python)
            for name in args.suites:
                print(f"suite {name}", file=sys.stderr)
                before = len(ctx.rows)
                SUITES[name](ctx)
                for row in ctx.rows[before:]:
                    print(_progress_line(row), file=sys.stderr)
            results = {"meta": meta, "rows": ctx.rows, "targets": ctx.targets, "notes": ctx.notes}
    finally:
        if args.keep:
            print(f"kept {work}", file=sys.stderr)
        else:
            shutil.rmtree(work, ignore_errors=True)
    results["meta"]["total_s"] = round(time.perf_counter() - started, 1)
    results["meta"]["loadavg_at_end"] = [round(v, 2) for v in os.getloadavg()]
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2, default=_json_default) + "\n")

    m = results["meta"]
    series = "" if estimate_only else f"shape {m['shape']}, b0 {m['b0']}, "
    print(
        f"\nnidask benchmarks {m['date']} - {m['machine']['cores']} cores, "
        f"{series}chunk {m['chunk_size']}, workers {m['workers']}, "
        f"load average {m['loadavg_at_start'][0]} -> {m['loadavg_at_end'][0]}\n"
    )
    rows = [r for r in results["rows"] if r["suite"] != "estimate"]
    estimate_rows = [r for r in results["rows"] if r["suite"] == "estimate"]
    if rows or not estimate_rows:
        print(markdown_table(rows))
    if estimate_rows:
        size = "HCP-scale" if args.scale else m.get("estimate_size")
        print(f"\nmotion estimation ({size} series)\n")
        print(estimate_suite.estimate_table(estimate_rows, results["notes"].get("estimate")))
    if results["targets"]:
        print()
        print(targets_table(results["targets"]))
    print(f"\nresults: {out}")
    return 0


def _json_default(value):
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    return str(value)


if __name__ == "__main__":
    sys.exit(main())
