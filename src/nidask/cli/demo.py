"""``nidask demo``: the whole pipeline on synthetic DWI and PET series.

:data:`DEMO_SIZES` holds the phantom sizes; :func:`cmd_demo` builds phantoms with
known head motion, opens them lazily, estimates the motion, writes the outputs and
prints the recovered-vs-true errors and the peak memory; :func:`add_parser` adds
the subcommand to the ``nidask`` parser.
"""

from __future__ import annotations

import argparse
import os
import shutil
import time

from nidask.cli.common import (
    UsageError,
    add_scheduler_options,
    atomic_directory,
    human_bytes,
    peak_memory,
    positive_int,
    say,
    scheduler,
    show_path,
    write_outputs,
)

DEMO_MARKER = ".nidask-demo"
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
    from nidask.validation import phantom
    from nidask.validation.evaluation import motion_errors

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
    say(f"phantom    {show_path(image)}: {shape} voxels, {what}")
    say("           known motion: drift and jumps up to 3 mm and 3 deg per axis")
    dataset = nidask.load(image, **relocate)
    from nidask.estimation.defaults import default_model

    with dataset:
        say(f"lazy       {dataset!r}")
        for line in _graph_facts(dataset):
            say(f"           {line}")
        estimator = nidask.Estimator(**({} if passes is None else {"passes": passes}))
        models = default_model(dataset)
        say(
            f"estimate   model {' then '.join(models)}, "
            f"{'default' if estimator.passes is None else 'up to ' + str(estimator.passes)} "
            f"passes, {len(dataset.whole_series())} leave-one-out folds"
        )
        t0 = time.perf_counter()
        estimated = estimator.run(dataset, client=client)
        seconds = time.perf_counter() - t0
        say(f"           done in {seconds:.1f} s")
        for record in estimator.report["passes"]:
            tie = record["frame_tie"].get("method") or "one frame"
            say(
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
    say(f"outputs    {', '.join(os.path.join(show_path(directory), w) for w in written)}")
    say(
        f"errors     translation median {errors['translation_mm_median']:.2f} mm, "
        f"worst {errors['translation_mm_max']:.2f} mm; rotation median "
        f"{errors['rotation_deg_median']:.2f} deg, worst {errors['rotation_deg_max']:.2f} deg"
    )
    say(
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
    baseline = peak_memory()[0]
    say(
        f"nidask demo ({args.size}): synthetic DWI and PET series with known head motion, "
        f"written to {show_path(out)}"
    )
    start = time.perf_counter()
    results = []
    with scheduler(args.scheduler, args.workers) as client:
        for kind in ("dwi", "pet"):
            say(f"\n== {kind.upper()} ==")
            results.append(_demo_series(kind, out, size, args.passes, client))
    own, children = peak_memory()
    say("\n== summary ==")
    for r in results:
        say(
            f"{r['kind'].upper():<4} translation error median {r['translation_mm_median']:.2f} mm"
            f" (worst {r['translation_mm_max']:.2f}), rotation error median "
            f"{r['rotation_deg_median']:.2f} deg (worst {r['rotation_deg_max']:.2f}), "
            f"estimated in {r['seconds_estimate']:.1f} s"
        )
    peak = f"peak memory {human_bytes(own)} (ru_maxrss; {human_bytes(baseline)} after start-up)"
    if children > 0 and args.scheduler == "processes":
        peak += f", worker processes {human_bytes(children)}"
    say(peak)
    say(f"total {time.perf_counter() - start:.1f} s; outputs in {show_path(out)}")
    return 0


def add_parser(subparsers, parents) -> argparse.ArgumentParser:
    """Add ``nidask demo`` to ``subparsers``; ``parents`` hold the shared options."""
    demo = subparsers.add_parser(
        "demo",
        parents=parents,
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
        "--passes", type=positive_int, help="most estimation passes (default: the estimator's)"
    )
    add_scheduler_options(demo)
    demo.set_defaults(func=cmd_demo)
    return demo
