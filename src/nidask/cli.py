"""The ``nidask`` command line: ``info``, ``convert``, ``estimate`` and ``demo``.

Run ``nidask --help`` or ``nidask COMMAND --help``.

Exit codes: 0 success, 1 failure (unreadable input, unwritable output, ...),
2 usage error (bad options), 130 interrupted (Ctrl-C), 143 terminated (SIGTERM).
Every error is one line on stderr, ``nidask: error: <file>: <problem>``;
``--debug`` prints the traceback too.  Outputs are written under temporary names
and renamed when complete, so an interrupted command leaves no partial files.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import resource
import shutil
import signal
import sys
import time
import traceback

import numpy as np

PROG = "nidask"
DEMO_MARKER = ".nidask-demo"
COMPANIONS = {
    "bvec": "bvec_file",
    "bval": "bval_file",
    "gradients": "gradients_file",
    "b0": "b0_file",
    "mask": "brainmask_file",
    "timing": "temporal_file",
}
MODELS = ("auto", "gp", "average", "median", "dti", "b0", "pet")
ORDERS = ("sequential", "reverse", "random", "bvalue")
NFDH5_SUFFIXES = (".h5", ".hdf5", ".nfdh5")
NIFTI_SUFFIXES = (".nii", ".nii.gz")


class UsageError(Exception):
    """Bad command-line usage (exit code 2)."""


class Terminated(BaseException):
    """SIGTERM received (exit code 143); a BaseException so cleanups run."""


class _Parser(argparse.ArgumentParser):
    """An ArgumentParser whose errors become :class:`UsageError` (one line, exit 2)."""

    def error(self, message):
        raise UsageError(f"{message} (see '{self.prog} --help')")


# -- small helpers ------------------------------------------------------------------------
def _say(*parts, file=None) -> None:
    print(*parts, file=file or sys.stdout, flush=True)


def _bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"  # pragma: no cover


def _peak_memory() -> tuple[int, int]:
    """Peak resident memory (bytes) of this process and of its finished children."""
    scale = 1 if sys.platform == "darwin" else 1024  # Linux reports KiB
    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale
    children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * scale
    return own, children


def _format_error(exc: BaseException) -> str:
    from nidask.errors import NidaskError

    if isinstance(exc, NidaskError):
        message = str(exc)
    elif isinstance(exc, OSError) and exc.strerror:
        name = exc.filename if exc.filename is not None else None
        message = f"{name}: {exc.strerror}" if name is not None else exc.strerror
        if exc.filename2 is not None:
            message += f" (-> {exc.filename2})"
    else:
        message = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
    return " ".join(message.split())  # one line, whatever the message held


def _show(path: str) -> str:
    """``path`` relative to the working directory when below it, else absolute."""
    relative = os.path.relpath(path)
    return path if relative.startswith("..") else relative


def _error_line(message: str) -> None:
    _say(f"{PROG}: error: {' '.join(str(message).split())}", file=sys.stderr)


def _is_hdf5(path: str) -> bool:
    import h5py

    try:
        return os.path.isfile(path) and h5py.is_hdf5(path)
    except OSError:
        return False


def _companions(args) -> dict:
    kwargs = {}
    for option, keyword in COMPANIONS.items():
        value = getattr(args, option, None)
        if value is not None:
            kwargs[keyword] = value
    return kwargs


def open_dataset(path: str, args):
    """Open ``path`` lazily with the companion files given on the command line."""
    import nidask

    kwargs = _companions(args)
    given = sorted(f"--{o}" for o in COMPANIONS if getattr(args, o, None) is not None)
    if (args.bvec is None) != (args.bval is None):
        raise UsageError("--bvec and --bval go together")
    if args.timing is not None and {"bvec_file", "gradients_file", "b0_file"} & kwargs.keys():
        raise UsageError("--timing (PET) cannot be combined with diffusion gradients")
    if args.b0 is not None and not {"bvec_file", "gradients_file"} & kwargs.keys():
        raise UsageError("--b0 needs the gradients (--bvec/--bval or --gradients)")
    if given and _is_hdf5(os.path.abspath(path)):
        raise UsageError(
            f"{path}: an NFDH5 file carries its own metadata; {', '.join(given)} not accepted"
        )
    return nidask.load(path, **kwargs)


def _model_for(dataset, model: str | None) -> str:
    from nidask.dmri import DWI
    from nidask.pet import PET

    if model is None or model == "auto":
        return "auto"
    if model == "pet" and not isinstance(dataset, PET):
        raise UsageError("--model pet needs a PET series (give --timing)")
    if model in ("dti", "b0", "gp") and not isinstance(dataset, DWI):
        raise UsageError(f"--model {model} needs a DWI (give --bvec/--bval or --gradients)")
    if model == "b0" and dataset.bzero is None:
        raise UsageError("--model b0 needs a b=0 reference (b=0 volumes or --b0)")
    return model


def _reference(value: str):
    if value in ("template", "model"):
        return "template"
    try:
        return int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"invalid reference {value!r} (use 'template' or a volume index)"
        ) from None


def _positive_int(value: str) -> int:
    try:
        number = int(value)
    except ValueError:
        number = 0
    if number < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value!r}")
    return number


@contextlib.contextmanager
def scheduler(name: str, workers: int | None):
    """Run the enclosed computations on a dask scheduler named on the command line.

    ``threads`` (default), ``processes``, ``synchronous``, ``local`` (a
    ``distributed.LocalCluster`` of ``workers`` processes) or the address of a
    running ``distributed`` scheduler.  Yields the ``distributed.Client`` or ``None``.
    """
    import dask

    from nidask.errors import InputError

    if name in ("threads", "processes", "synchronous"):
        settings = {"scheduler": name}
        if workers and name != "synchronous":
            settings["num_workers"] = workers
        with dask.config.set(settings):
            yield None
        return
    from distributed import Client, LocalCluster

    if name == "local":
        cluster = LocalCluster(n_workers=workers or 2, threads_per_worker=1)
        with cluster, Client(cluster) as client:
            _say(f"dashboard: {client.dashboard_link}", file=sys.stderr)
            yield client
        return
    if workers:
        _say("note: --workers is ignored with a scheduler address", file=sys.stderr)
    try:
        client = Client(name, timeout="10s")
    except (OSError, TimeoutError, ValueError) as exc:
        raise InputError(f"cannot connect to the dask scheduler ({exc})", name) from exc
    with client:
        yield client


@contextlib.contextmanager
def atomic_directory(final: str):
    """Fill a temporary directory beside ``final`` and rename it into place on success."""
    from nidask.io.cache import temporary_name

    temp = temporary_name(os.path.abspath(final))
    os.mkdir(temp)
    try:
        yield temp
        os.replace(temp, final)
    except BaseException:
        shutil.rmtree(temp, ignore_errors=True)
        raise


# -- outputs shared by estimate and demo --------------------------------------------------
def _write_text(path: str, text: str) -> None:
    from nidask.io.cache import atomic_output

    with atomic_output(path) as temp, open(temp, "w") as f:
        f.write(text)


def write_outputs(raw, estimated, directory, **options) -> list[str]:
    """:func:`nidask.reports.write_outputs`, notes on stderr."""
    from nidask.reports import write_outputs as write

    return write(
        raw, estimated, directory, warn=lambda m: _say(f"note: {m}", file=sys.stderr), **options
    )


FLAG_MEANINGS = {
    "implausible": "motion beyond the plausible bound",
    "poor_fit": "registered poorly to its prediction",
    "unconverged": "registration did not converge",
    "small_fov": "field of view small for motion estimation",
}


def _warn_flags(report) -> None:
    """One warning line per flag raised (see motion.tsv)."""
    from nidask.reports import flagged

    for flag, volumes in flagged(report).items():
        shown = ", ".join(str(v) for v in volumes[:8]) + (", ..." if len(volumes) > 8 else "")
        meaning = FLAG_MEANINGS.get(flag, flag)
        _say(
            f"warning: {len(volumes)} volume(s) flagged {flag} ({meaning}): {shown}",
            file=sys.stderr,
        )


def _motion_summary(dataset) -> str:
    from nidask.geometry import motion_table

    dataset = dataset.whole_series()
    table = motion_table(dataset.motion_affines, dataset.affine, dataset.shape3d)
    worst = int(np.argmax(table[:, 6]))
    return (
        f"max |translation| {np.abs(table[:, :3]).max():.2f} mm, "
        f"max |rotation| {np.abs(table[:, 3:6]).max():.2f} deg, "
        f"mean FD {table[:, 6].mean():.2f} mm, "
        f"max FD {table[worst, 6]:.2f} mm (volume {int(dataset.original_index[worst])})"
    )


# -- info ---------------------------------------------------------------------------------
def _file_facts(path: str) -> dict:
    """Storage facts read from the file's header only."""
    import h5py
    import nibabel as nb

    lower = path.lower()
    facts: dict = {"bytes_on_disk": os.path.getsize(path)}
    if _is_hdf5(path):
        with h5py.File(path, "r") as f:
            dset = f["/0/dataobj"]
            version = f.attrs.get("Version")
            facts.update(
                format=f"NFDH5 v{int(version) if version is not None else '?'}",
                layout="(N, X, Y, Z)" if "volume_axis" in dset.attrs else "(X, Y, Z, N)",
                on_disk_dtype=str(dset.dtype),
                hdf5_chunks=list(dset.chunks) if dset.chunks else None,
                compression=dset.compression,
            )
    elif lower.endswith((".nii", ".nii.gz")):
        image = nb.load(path)
        slope, inter = getattr(image.dataobj, "slope", 1.0), getattr(image.dataobj, "inter", 0.0)
        facts.update(
            format="NIfTI-2" if isinstance(image, nb.Nifti2Image) else "NIfTI-1",
            compression="gzip" if lower.endswith(".gz") else None,
            on_disk_dtype=str(image.get_data_dtype()),
            scaled=bool(slope not in (1.0, None) or inter not in (0.0, None)),
            volumes_in_file=int(image.shape[3]) if len(image.shape) > 3 else 1,
        )
    elif lower.endswith(".npy"):
        from nidask.io.npy import read_npy_header

        shape, fortran, dtype, _ = read_npy_header(path)
        facts.update(
            format="npy",
            layout="volume-contiguous (Fortran)" if fortran else "C order",
            on_disk_dtype=str(dtype),
        )
    return facts


def _bzero_kind(bzero) -> str | None:
    if bzero is None:
        return None
    return "lazy (computed when needed)" if hasattr(bzero, "dask") else "stored"


def describe(dataset, path: str) -> dict:
    """What ``nidask info`` reports, as a JSON-friendly dict (no data are read)."""
    from nidask.dmri import DWI
    from nidask.pet import PET

    path = os.path.abspath(path)
    chunks = dataset.dataobj.chunks[3]
    volume_bytes = dataset.size3d * dataset.dtype.itemsize
    zooms = np.linalg.norm(dataset.affine[:3, :3], axis=0)
    facts = {
        "file": path,
        **_file_facts(path),
        "type": type(dataset).__name__,
        "shape": list(dataset.shape),
        "volumes": len(dataset),
        "voxel_size_mm": [round(float(z), 4) for z in zooms],
        "dtype": str(dataset.dtype),
        "chunks": {
            "volumes_per_chunk": int(max(chunks)),
            "n_chunks": len(chunks),
            "bytes_per_chunk": int(max(chunks) * volume_bytes),
        },
        "bytes_in_ram": int(dataset.dataobj.nbytes),
        "bytes_in_ram_float32": int(dataset.size3d * len(dataset) * 4),
        "mask_voxels": None if dataset.brainmask is None else int(dataset.brainmask.sum()),
        "motion": dataset.motion_affines is not None,
    }
    if isinstance(dataset, DWI):
        in_file = facts.get("volumes_in_file", int(dataset.original_index.max()) + 1)
        facts["dwi"] = {
            "b0_volumes": int(in_file - len(dataset)),
            "bzero": _bzero_kind(dataset.bzero),
            "shells": [
                {"bvalue": round(b, 1), "volumes": len(members)}
                for b, members in dataset.get_shells()
            ],
        }
    if isinstance(dataset, PET):
        starts = dataset.midframe  # mid-frame times
        facts["pet"] = {
            "frames": len(dataset),
            "total_duration_s": float(dataset.total_duration),
            "first_midframe_s": float(starts[0]),
            "last_midframe_s": float(starts[-1]),
        }
    return facts


def _print_info(facts: dict) -> None:
    rows = [("file", facts["file"])]
    storage = facts.get("format", "unknown")
    if facts.get("compression"):
        storage += f", {facts['compression']}-compressed"
    if facts.get("layout"):
        storage += f", layout {facts['layout']}"
    if facts.get("hdf5_chunks"):
        storage += f", HDF5 chunks {tuple(facts['hdf5_chunks'])}"
    rows.append(("format", storage))
    rows.append(("type", facts["type"]))
    x, y, z, n = facts["shape"]
    volumes = f"{x} x {y} x {z} x {n} volumes"
    if "volumes_in_file" in facts and facts["volumes_in_file"] != n:
        volumes += f" ({facts['volumes_in_file']} in the file)"
    rows.append(("shape", volumes))
    rows.append(("voxel size", " x ".join(f"{v:g}" for v in facts["voxel_size_mm"]) + " mm"))
    dtype = facts["dtype"]
    if facts.get("on_disk_dtype") and facts["on_disk_dtype"] != dtype:
        dtype += f" (stored as {facts['on_disk_dtype']}" + (
            ", scaled)" if facts.get("scaled") else ")"
        )
    rows.append(("dtype", dtype))
    c = facts["chunks"]
    rows.append(
        (
            "chunks",
            f"{c['volumes_per_chunk']} volume(s) per chunk, {c['n_chunks']} chunk(s), "
            f"{_bytes(c['bytes_per_chunk'])} per chunk",
        )
    )
    rows.append(
        (
            "size",
            f"{_bytes(facts['bytes_on_disk'])} on disk, {_bytes(facts['bytes_in_ram'])} in RAM "
            f"({facts['dtype']}; {_bytes(facts['bytes_in_ram_float32'])} as float32)",
        )
    )
    if "dwi" in facts:
        dwi = facts["dwi"]
        shells = [f"b={s['bvalue']:g}: {s['volumes']}" for s in dwi["shells"]]
        rows.append(("b-values", ", ".join([f"b=0: {dwi['b0_volumes']}", *shells])))
        rows.append(("b=0 ref", dwi["bzero"] or "none"))
    if "pet" in facts:
        pet = facts["pet"]
        rows.append(
            (
                "frames",
                f"{pet['frames']} frames over {pet['total_duration_s']:g} s "
                f"(mid-frames {pet['first_midframe_s']:g} .. {pet['last_midframe_s']:g} s)",
            )
        )
    mask = facts["mask_voxels"]
    rows.append(("brain mask", "none" if mask is None else f"{mask} voxels"))
    rows.append(("motion", "set" if facts["motion"] else "none"))
    width = max(len(k) for k, _ in rows)
    for key, value in rows:
        _say(f"{key:<{width}}  {value}")


def cmd_info(args) -> int:
    dataset = open_dataset(args.file, args)
    with dataset:
        facts = describe(dataset, args.file)
    if args.json:
        _say(json.dumps(facts, indent=2))
    else:
        _print_info(facts)
    return 0


# -- convert ------------------------------------------------------------------------------
def _output_kind(path: str) -> str:
    lower = path.lower()
    if lower.endswith(NFDH5_SUFFIXES):
        return "nfdh5"
    if lower.endswith(NIFTI_SUFFIXES):
        return "nifti"
    raise UsageError(f"{path}: unknown output format (use .h5, .nii or .nii.gz)")


def cmd_convert(args) -> int:
    import attrs

    from nidask.dmri import DWI
    from nidask.errors import InputError, OutputError

    kind = _output_kind(args.output)
    if args.compression and kind != "nfdh5":
        raise UsageError("--compression applies to NFDH5 (.h5) outputs only")
    if kind == "nfdh5" and (args.apply_motion or args.no_b0):
        raise UsageError("--apply-motion and --no-b0 apply to NIfTI outputs only")
    directory = os.path.dirname(os.path.abspath(args.output))
    if not os.path.isdir(directory):  # fail before any work
        raise OutputError("output directory does not exist", directory)
    dataset = open_dataset(args.input, args)
    with dataset:
        start = time.perf_counter()
        if kind == "nfdh5":
            dataset.to_filename(args.output, compression=args.compression)
            extra = ""
        else:
            if args.apply_motion and dataset.motion_affines is None:
                raise InputError("has no motion matrices to apply", args.input)
            if dataset.motion_affines is not None and not args.apply_motion:
                _say(
                    "note: the motion matrices are not applied nor written "
                    "(add --apply-motion to resample and write an .x5)",
                    file=sys.stderr,
                )
                dataset = attrs.evolve(dataset, motion_affines=None)
            is_dwi = isinstance(dataset, DWI)
            insert_b0 = is_dwi and dataset.bzero is not None and not args.no_b0
            dataset.to_nifti(
                args.output,
                order=args.order,
                write_hmxfms=args.apply_motion,
                insert_b0=insert_b0,
            )
            extra = " (+ .bval/.bvec)" if is_dwi else ""
            extra += " (+ .x5)" if args.apply_motion else ""
            extra += ", b=0 reference inserted as volume 0" if insert_b0 else ""
        elapsed = time.perf_counter() - start
    size = os.path.getsize(args.output)
    _say(f"wrote {args.output}{extra}: {_bytes(size)} in {elapsed:.1f} s")
    return 0


# -- estimate -----------------------------------------------------------------------------
def cmd_estimate(args) -> int:
    import nidask
    from nidask.errors import NidaskError, OutputError

    out = os.path.abspath(args.out)
    work = os.path.join(out, "work")
    if os.path.exists(work) and not args.resume:
        raise UsageError(
            f"{work}: holds a previous run; add --resume to continue it or choose another --out"
        )
    dataset = open_dataset(args.input, args)
    with dataset:
        model = _model_for(dataset, args.model)
        n = len(dataset.whole_series())
        if isinstance(args.reference, int) and not -n <= args.reference < n:
            raise UsageError(f"--reference {args.reference}: out of range for {n} volumes")
        estimator = nidask.Estimator(
            model=model,
            order=args.order,
            seed=args.seed,
            passes=args.passes,
            tolerance=args.tolerance,
            reference=args.reference,
        )
        with scheduler(args.scheduler, args.workers) as client:
            try:
                os.makedirs(out, exist_ok=True)
            except OSError as exc:
                raise OutputError(
                    f"cannot create the output directory: {exc.strerror}", out
                ) from exc
            fresh = not os.path.exists(work)
            _say(
                f"estimating {len(dataset)} volumes of {args.input}: model {model}, "
                f"{args.passes} pass(es), scheduler {args.scheduler}"
                + ("" if fresh else " (resuming)")
            )
            start = time.perf_counter()
            try:
                estimated = estimator.run(dataset, client=client, workdir=work)
            except NidaskError as exc:
                # a run refused for its input or configuration holds nothing worth
                # resuming: leave no work directory behind to block a corrected retry
                if fresh and not isinstance(exc, OSError):
                    shutil.rmtree(work, ignore_errors=True)
                raise
            except KeyboardInterrupt:
                raise KeyboardInterrupt(f"{work}: interrupted; continue with --resume") from None
            except Terminated:
                raise Terminated(f"{work}: terminated; continue with --resume") from None
            _say(f"estimated in {time.perf_counter() - start:.1f} s: {_motion_summary(estimated)}")
            _warn_flags(estimator.report)
            written = write_outputs(
                dataset,
                estimated,
                out,
                report=estimator.report,
                order=args.interpolation,
                insert_b0=args.insert_b0,
                plots=not args.no_plots,
            )
    _say(f"wrote {', '.join(written)} in {out}")
    return 0


# -- demo ---------------------------------------------------------------------------------
DEMO_SIZES = {
    "small": {
        "shape3d": (36, 42, 32),
        "zooms": 3.5,
        "bvalues": (1000.0, 2000.0),
        "per_shell": 24,
        "n_b0": 6,
        "n_frames": 12,
    },
    "medium": {
        "shape3d": (48, 56, 44),
        "zooms": 3.0,
        "bvalues": (1000.0, 2000.0, 3000.0),
        "per_shell": 30,
        "n_b0": 9,
        "n_frames": 20,
    },
}


def _prepare_demo_directory(out: str) -> None:
    if os.path.isdir(out) and os.listdir(out):
        if not os.path.exists(os.path.join(out, DEMO_MARKER)):
            raise UsageError(
                f"{out}: exists and is not a nidask demo directory; choose another --out"
            )
        for name in ("dwi", "pet"):
            shutil.rmtree(os.path.join(out, name), ignore_errors=True)
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, DEMO_MARKER), "w") as f:
        f.write("created by 'nidask demo'; the directory is rewritten by the next demo run\n")


def _graph_facts(dataset) -> list[str]:
    data = dataset.dataobj
    graph = data.__dask_graph__()
    chunks = data.chunks[3]
    train, _ = dataset.lofo(0)
    own_keys = set(graph.keys())
    train_graph = train.dataobj.__dask_graph__()
    shared = own_keys <= set(train_graph.keys())
    return [
        f"dataobj: dask array {data.shape} {data.dtype}, "
        f"{max(chunks)} volume(s) per chunk x {len(chunks)} chunk(s), "
        f"{len(graph)} task(s); nothing read yet",
        f"fold 0 training set: {len(train)} volumes, {len(train_graph)} task(s), "
        + ("references the series' chunks (no copy)" if shared else "a new graph"),
        f"resampled view (deferred): {dataset.resampled().dataobj.dtype} graph of "
        f"{len(dataset.resampled().dataobj.__dask_graph__())} task(s)",
    ]


def _demo_series(kind: str, out: str, size: dict, passes: int, client) -> dict:
    import nidask
    from nidask import phantom
    from nidask.evaluation import motion_errors

    directory = os.path.join(out, kind)
    start = time.perf_counter()
    with atomic_directory(directory) as temp:
        if kind == "dwi":
            truth = phantom.make_hcp_like(
                temp,
                shape3d=size["shape3d"],
                zooms=(size["zooms"],) * 3,
                n_per_shell=size["per_shell"],
                n_b0=size["n_b0"],
                bvalues=size["bvalues"],
            )
            shells = ", ".join(f"{b:g}" for b in size["bvalues"])
            what = (
                f"{size['n_b0']} b=0 (interleaved, moving) + {len(size['bvalues'])} x "
                f"{size['per_shell']} diffusion-weighted volumes (b={shells}, interleaved)"
            )
        else:
            truth = phantom.make_pet(temp, shape3d=size["shape3d"], n_frames=size["n_frames"])
            what = f"{size['n_frames']} frames"
    relocate = {k: v.replace(temp, directory) for k, v in truth.companions.items()}
    image = truth.image.replace(temp, directory)
    shape = "x".join(map(str, size["shape3d"]))
    _say(f"phantom    {_show(image)}: {shape} voxels, {what}")
    _say("           known motion: drift and jumps up to 3 mm and 3 deg per axis")
    dataset = nidask.load(image, **relocate)
    with dataset:
        _say(f"lazy       {dataset!r}")
        for line in _graph_facts(dataset):
            _say(f"           {line}")
        estimator = nidask.Estimator(**({} if passes is None else {"passes": passes}))
        models = dataset.default_model()
        _say(
            f"estimate   model {' then '.join(models) if isinstance(models, list) else models}, "
            f"up to {estimator.passes} passes, {len(dataset.whole_series())} leave-one-out folds"
        )
        t0 = time.perf_counter()
        estimated = estimator.run(dataset, client=client)
        seconds = time.perf_counter() - t0
        _say(f"           done in {seconds:.1f} s")
        for record in estimator.report["passes"]:
            tie = record["frame_tie"].get("method") or "one frame"
            _say(
                f"           pass {record['pass']}: largest change "
                f"{record['largest_change_mm']:.2f} mm, frames: {tie}"
            )
        whole = estimated.whole_series()
        true = truth.motion[whole.original_index]
        errors = motion_errors(whole.motion_affines, true, whole.affine, whole.shape3d)
        written = write_outputs(
            dataset,
            estimated,
            directory,
            report=estimator.report,
            true=true @ errors["offset"],
            title=f"{kind.upper()} phantom: ",
        )
    _say(f"outputs    {', '.join(os.path.join(_show(directory), w) for w in written)}")
    _say(
        f"errors     translation median {errors['translation_mm_median']:.2f} mm, "
        f"worst {errors['translation_mm_max']:.2f} mm; rotation median "
        f"{errors['rotation_deg_median']:.2f} deg, worst {errors['rotation_deg_max']:.2f} deg"
    )
    _say(
        "           (every volume of the file, estimated vs true, after removing the common "
        "offset between the estimator's frame and the truth's)"
    )
    return {
        "kind": kind,
        "seconds_total": time.perf_counter() - start,
        "seconds_estimate": seconds,
        **{k: v for k, v in errors.items() if k.endswith(("_median", "_max"))},
    }


def cmd_demo(args) -> int:
    out = os.path.abspath(args.out)
    size = DEMO_SIZES[args.size]
    _prepare_demo_directory(out)
    baseline = _peak_memory()[0]
    _say(
        f"nidask demo ({args.size}): synthetic DWI and PET series with known head motion, "
        f"written to {_show(out)}"
    )
    start = time.perf_counter()
    results = []
    with scheduler(args.scheduler, args.workers) as client:
        for kind in ("dwi", "pet"):
            _say(f"\n== {kind.upper()} ==")
            results.append(_demo_series(kind, out, size, args.passes, client))
    own, children = _peak_memory()
    _say("\n== summary ==")
    for r in results:
        _say(
            f"{r['kind'].upper():<4} translation error median {r['translation_mm_median']:.2f} mm"
            f" (worst {r['translation_mm_max']:.2f}), rotation error median "
            f"{r['rotation_deg_median']:.2f} deg (worst {r['rotation_deg_max']:.2f}), "
            f"estimated in {r['seconds_estimate']:.1f} s"
        )
    peak = f"peak memory {_bytes(own)} (ru_maxrss; {_bytes(baseline)} after start-up)"
    if children > 0 and args.scheduler == "processes":
        peak += f", worker processes {_bytes(children)}"
    _say(peak)
    _say(f"total {time.perf_counter() - start:.1f} s; outputs in {_show(out)}")
    return 0


# -- parser -------------------------------------------------------------------------------
def _common_options(default) -> argparse.ArgumentParser:
    parent = argparse.ArgumentParser(add_help=False)
    group = parent.add_argument_group("general options")
    group.add_argument(
        "-q", "--quiet", action="store_true", default=default, help="no progress display"
    )
    group.add_argument(
        "--debug", action="store_true", default=default, help="show tracebacks of errors"
    )
    return parent


def _companion_options(parser) -> None:
    group = parser.add_argument_group("companion files (NIfTI inputs)")
    group.add_argument("--bvec", metavar="FILE", help="FSL b-vectors (DWI)")
    group.add_argument("--bval", metavar="FILE", help="FSL b-values (DWI)")
    group.add_argument(
        "--gradients", metavar="FILE", help="(N, 4) RAS direction + b-value table (DWI)"
    )
    group.add_argument("--b0", metavar="FILE", help="3D b=0 reference (DWI)")
    group.add_argument("--mask", metavar="FILE", help="3D brain mask")
    group.add_argument("--timing", metavar="FILE", help="BIDS JSON sidecar with frame times (PET)")


def _scheduler_options(parser, default_workers=None) -> None:
    group = parser.add_argument_group("where to compute")
    group.add_argument(
        "--scheduler",
        default="threads",
        metavar="NAME|ADDRESS",
        help="threads (default), processes, synchronous, local (a LocalCluster) or "
        "the address of a dask.distributed scheduler (tcp://host:8786)",
    )
    group.add_argument(
        "--workers", type=_positive_int, default=default_workers, help="number of workers"
    )


def build_parser() -> argparse.ArgumentParser:
    """The ``nidask`` argument parser."""
    from nidask import __version__

    parser = _Parser(
        prog=PROG,
        description="Lazy, out-of-core 4D neuroimaging series and head-motion estimation.",
        epilog="Start with 'nidask demo'. Exit codes: 0 ok, 1 failure, 2 usage error, "
        "130 interrupted.",
        parents=[_common_options(False)],
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    common = _common_options(argparse.SUPPRESS)

    info = commands.add_parser(
        "info",
        parents=[common],
        help="describe a series without reading its data",
        description="Shape, dtype, chunking, modality metadata (b-shells, frame timing) "
        "and size on disk vs in RAM, from headers only.",
    )
    info.add_argument("file", help="NIfTI (.nii, .nii.gz), NFDH5 (.h5) or .npy series")
    _companion_options(info)
    info.add_argument("--json", action="store_true", help="print the facts as JSON")
    info.set_defaults(func=cmd_info)

    convert = commands.add_parser(
        "convert",
        parents=[common],
        help="convert NIfTI (+ companions) <-> NFDH5, streamed",
        description="Convert a series between NIfTI (+ companion files) and NFDH5, "
        "chunk by chunk (the series is never held in memory). The output format "
        "follows OUTPUT's extension: .h5 (NFDH5), .nii or .nii.gz.",
    )
    convert.add_argument("input", help="input series")
    convert.add_argument("output", help="output file (.h5, .nii or .nii.gz)")
    _companion_options(convert)
    group = convert.add_argument_group("output options")
    group.add_argument(
        "--compression", choices=("gzip", "lzf"), help="HDF5 compression (NFDH5 outputs)"
    )
    group.add_argument(
        "--apply-motion",
        action="store_true",
        help="NIfTI outputs: resample with the file's motion matrices and write an .x5",
    )
    group.add_argument(
        "--order", type=int, default=3, help="interpolation order with --apply-motion"
    )
    group.add_argument(
        "--no-b0",
        action="store_true",
        help="NIfTI outputs of a DWI: do not insert the b=0 reference as volume 0",
    )
    convert.set_defaults(func=cmd_convert)

    estimate = commands.add_parser(
        "estimate",
        parents=[common],
        help="estimate head motion (leave-one-volume-out) and correct the series",
        description="Estimate every volume's head motion with a leave-one-volume-out "
        "model and rigid registration. Writes OUT/corrected.nii.gz (+ .bval/.bvec for "
        "a DWI), OUT/motion.x5 (one transform per volume), OUT/motion.tsv (tx ty tz in "
        "mm, rx ry rz in degrees about the centre of the field of view, framewise "
        "displacement) and PNG plots. The run lives in OUT/work; an interrupted run "
        "continues with --resume.",
    )
    estimate.add_argument("input", help="input series (NIfTI + companions, or NFDH5)")
    _companion_options(estimate)
    group = estimate.add_argument_group("estimation")
    group.add_argument("--out", required=True, metavar="DIR", help="output directory")
    group.add_argument(
        "--model",
        choices=MODELS,
        default="auto",
        help="prediction model (default auto: for a DWI the shell average, then the "
        "Gaussian process; pet for PET; the average otherwise)",
    )
    group.add_argument(
        "--passes", type=_positive_int, default=4, help="most estimation passes (default 4)"
    )
    group.add_argument(
        "--tolerance",
        type=float,
        default=0.1,
        metavar="MM",
        help="stop once no volume's estimate moves more than this (default 0.1 mm)",
    )
    group.add_argument("--order", choices=ORDERS, default="sequential", help="fold order")
    group.add_argument("--seed", type=int, default=0, help="seed of --order random")
    group.add_argument(
        "--reference",
        type=_reference,
        default="template",
        metavar="template|INDEX",
        help="frame of the matrices: the b=0 template's for a DWI, the series' mean "
        "position otherwise (default), or that of file volume INDEX",
    )
    group.add_argument(
        "--resume", action="store_true", help="continue the run in OUT/work if there is one"
    )
    group = estimate.add_argument_group("outputs")
    group.add_argument(
        "--interpolation", type=int, default=3, help="interpolation order of the corrected series"
    )
    group.add_argument(
        "--insert-b0",
        action="store_true",
        help="DWI: write the b=0 reference as volume 0 of the corrected series",
    )
    group.add_argument("--no-plots", action="store_true", help="do not write PNG plots")
    _scheduler_options(estimate)
    estimate.set_defaults(func=cmd_estimate)

    demo = commands.add_parser(
        "demo",
        parents=[common],
        help="the whole pipeline on synthetic DWI and PET series with known motion",
        description="Build DWI and PET phantoms with known head motion, open them "
        "lazily, estimate the motion, write corrected NIfTI, X5 transforms, a motion "
        "report and plots, and print the recovered-vs-true motion errors and the peak "
        "memory.",
    )
    demo.add_argument(
        "--out", default="nidask-demo", metavar="DIR", help="output directory (./nidask-demo)"
    )
    demo.add_argument(
        "--size",
        choices=tuple(DEMO_SIZES),
        default="medium",
        help="phantom size: medium (default: 48x56x44 voxels of 3 mm, 9 b=0 + 3 shells of 30 "
        "directions, 20 PET frames) or small (36x42x32 voxels of 3.5 mm, 6 b=0 + 2 shells "
        "of 24 directions, 12 frames)",
    )
    demo.add_argument(
        "--passes", type=_positive_int, help="most estimation passes (default: the estimator's)"
    )
    _scheduler_options(demo)
    demo.set_defaults(func=cmd_demo)
    return parser


# -- entry point --------------------------------------------------------------------------
def _terminate(signum, frame):
    raise Terminated()


def main(argv=None) -> int:
    """Run the command line; returns the exit code."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except UsageError as exc:
        _error_line(str(exc))
        return 2
    except SystemExit as exc:  # --help, --version
        return exc.code if isinstance(exc.code, int) else 0
    debug = args.debug
    previous = None
    with contextlib.suppress(ValueError):  # not the main thread
        previous = signal.signal(signal.SIGTERM, _terminate)
    import dask

    try:
        with dask.config.set({"nidask.progress": not args.quiet}):
            return args.func(args)
    except UsageError as exc:
        if debug:
            traceback.print_exc()
        _error_line(str(exc))
        return 2
    except KeyboardInterrupt as exc:
        if debug:
            traceback.print_exc()
        _error_line(str(exc) or "interrupted")
        return 130
    except Terminated as exc:
        _error_line(str(exc) or "terminated")
        return 143
    except Exception as exc:
        from nidask.errors import NidaskError

        if debug:
            traceback.print_exc()
        if isinstance(exc, NidaskError | OSError):
            _error_line(_format_error(exc))
        else:
            hint = "" if debug else " (run with --debug for the traceback)"
            _error_line(f"unexpected error: {_format_error(exc)}{hint}")
        return 1
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
