"""``nidask estimate``: estimate head motion of one series or of a BIDS dataset.

:func:`cmd_estimate` runs the leave-one-volume-out estimation of one series and
writes the corrected series, transforms, motion table and plots under ``--out``;
:func:`cmd_estimate_bids` is the BIDS-Apps form (``BIDS_DIR OUT_DIR participant``)
that estimates every selected series and writes a BIDS derivative;
:func:`add_parser` adds the subcommand, its choices and option types to the
``nidask`` parser.
"""

from __future__ import annotations

import argparse
import os
import shutil
import time

from nidask.cli.common import (
    COMPANIONS,
    STOP_SIGNALS,
    Terminated,
    UsageError,
    add_companion_options,
    add_scheduler_options,
    model_for,
    motion_summary,
    non_negative_int,
    open_dataset,
    positive_int,
    say,
    scheduler,
    warn_flags,
    write_outputs,
)
from nidask.estimation.lofo import FOLD_ORDERS
from nidask.estimation.models import MODELS as MODEL_NAMES

#: ``--model`` choices: ``auto`` (the default for the series) or a model name.
MODELS = ("auto", *MODEL_NAMES)


def _reference(value: str):
    if value in ("template", "model"):
        return "template"
    try:
        return int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"invalid reference {value!r} (use 'template' or a volume index)"
        ) from None


def _estimator_from(args, model="auto"):
    import nidask

    return nidask.Estimator(
        model=model,
        order=args.order,
        seed=args.seed,
        passes=args.passes,
        anchor=args.anchor,
        tolerance=args.tolerance,
        reference=args.reference,
        keep_work=args.keep_work,
        eddy_currents=args.eddy_currents,
        outliers=args.outliers,
    )


def _run_settings(args, model) -> dict:
    """The settings of one run, for its QC page (report.html)."""
    return {
        "input": args.input,
        "model": model,
        "passes": "default" if args.passes is None else args.passes,
        "anchor": args.anchor,
        "eddy currents": args.eddy_currents,
        "outlier slices": args.outliers,
        "tolerance (mm)": args.tolerance,
        "fold order": args.order,
        "seed": args.seed,
        "reference": args.reference,
        "interpolation order": args.interpolation,
        "insert b=0": args.insert_b0,
        "scheduler": args.scheduler,
        "workers": args.workers,
    }


def cmd_estimate_bids(args) -> int:
    """``nidask estimate BIDS_DIR OUT_DIR participant``: every selected series."""
    from nidask.bids.participants import run_participants, summary_table

    given = sorted(
        f"--{o.replace('_', '-')}" for o in COMPANIONS if getattr(args, o, None) is not None
    )
    if given or args.out:
        raise UsageError(
            f"a BIDS dataset finds its own companions and names its outputs: "
            f"{', '.join(given + (['--out'] if args.out else []))} not accepted"
        )
    if args.model not in ("auto", None):
        raise UsageError("BIDS mode estimates every modality with its default model")
    settings = {
        "passes": args.passes,
        "anchor": args.anchor,
        "tolerance": args.tolerance,
        "order": args.order,
        "outliers": args.outliers,
    }
    with scheduler(args.scheduler, args.workers) as client:
        results = run_participants(
            args.input,
            args.output_dir,
            lambda: _estimator_from(args),
            participant_labels=args.participant_label,
            modalities=args.modality,
            client=client,
            settings=settings,
            concurrent=args.series_at_once,
            say=say,
        )
    say(summary_table(results))
    say(f"QC pages linked from {os.path.join(os.path.abspath(args.output_dir), 'report.html')}")
    return 1 if any(r.status == "failed" for r in results) else 0


def cmd_estimate(args) -> int:
    from nidask.errors import NidaskError, OutputError

    if args.analysis_level is not None:
        return cmd_estimate_bids(args)
    if args.output_dir is not None:
        raise UsageError("BIDS mode needs three arguments: BIDS_DIR OUT_DIR participant")
    if args.out is None:
        raise UsageError(
            "the following arguments are required: --out (or, for a BIDS dataset: "
            "BIDS_DIR OUT_DIR participant)"
        )
    out = os.path.abspath(args.out)
    work = os.path.join(out, "work")
    if os.path.exists(work) and not args.resume:
        raise UsageError(
            f"{work}: holds a previous run; add --resume to continue it or choose another --out"
        )
    dataset = open_dataset(args.input, args)
    with dataset:
        model = model_for(dataset, args.model)
        n = len(dataset.whole_series())
        if isinstance(args.reference, int) and not -n <= args.reference < n:
            raise UsageError(f"--reference {args.reference}: out of range for {n} volumes")
        estimator = _estimator_from(args, model)
        with scheduler(args.scheduler, args.workers) as client:
            try:
                os.makedirs(out, exist_ok=True)
            except OSError as exc:
                raise OutputError(
                    f"cannot create the output directory: {exc.strerror}", out
                ) from exc
            fresh = not os.path.exists(work)
            say(
                f"estimating {len(dataset)} volumes of {args.input}: model {model}, "
                f"{'default' if args.passes is None else args.passes} pass(es), "
                f"scheduler {args.scheduler}" + ("" if fresh else " (resuming)")
            )
            start = time.perf_counter()
            try:
                estimated = estimator.run(dataset, client=client, workdir=work)
                STOP_SIGNALS.raise_if_received()
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
            say(f"estimated in {time.perf_counter() - start:.1f} s: {motion_summary(estimated)}")
            warn_flags(estimator.report)
            written = write_outputs(
                dataset,
                estimated,
                out,
                report=estimator.report,
                order=args.interpolation,
                insert_b0=args.insert_b0,
                plots=not args.no_plots,
                name=os.path.basename(args.input),
                settings=_run_settings(args, model),
            )
    say(f"wrote {', '.join(written)} in {out}")
    return 0


def add_parser(subparsers, parents) -> argparse.ArgumentParser:
    """Add ``nidask estimate`` to ``subparsers``; ``parents`` hold the shared options."""
    estimate = subparsers.add_parser(
        "estimate",
        parents=parents,
        help="estimate head motion (leave-one-volume-out) and correct the series",
        description="Estimate every volume's head motion with a leave-one-volume-out "
        "model and rigid registration. Writes OUT/corrected.nii.gz (+ .bval/.bvec for "
        "a DWI), OUT/motion.x5 (one transform per volume), OUT/motion.tsv (tx ty tz in "
        "mm, rx ry rz in degrees about the centre of the field of view, framewise "
        "displacement), OUT/report.html (a self-contained QC page: motion, the volumes "
        "that moved most before and after correction, flags, settings), "
        "OUT/outliers.tsv (a DWI's outlier slices, signal lost to motion during the "
        "diffusion encoding: volume, slice, score, replaced; see --outliers) and PNG plots. "
        "The run lives in OUT/work; an interrupted run "
        "continues with --resume. On a BIDS dataset, in the BIDS-Apps form "
        "'nidask estimate BIDS_DIR OUT_DIR participant', every DWI, PET and BOLD series "
        "of the selected participants is estimated on one scheduler and written as a "
        "BIDS derivative (sidecars found by the BIDS inheritance rules), each series with "
        "its QC page and OUT_DIR/report.html linking them.",
    )
    estimate.add_argument(
        "input", help="input series (NIfTI + companions, or NFDH5), or a BIDS dataset"
    )
    estimate.add_argument(
        "output_dir", nargs="?", help="BIDS mode: the derivative dataset to write"
    )
    estimate.add_argument(
        "analysis_level", nargs="?", choices=("participant",), help="BIDS mode: participant"
    )
    add_companion_options(estimate)
    group = estimate.add_argument_group("BIDS datasets")
    group.add_argument(
        "--participant-label",
        nargs="+",
        metavar="LABEL",
        help="participants to estimate (sub- prefix optional; default all)",
    )
    group.add_argument(
        "--modality",
        nargs="+",
        choices=("dwi", "pet", "bold"),
        default=["dwi", "pet", "bold"],
        help="series suffixes to estimate (default all three)",
    )
    group.add_argument(
        "--series-at-once",
        type=positive_int,
        metavar="N",
        help="series estimated together on the scheduler (default: one per worker, at "
        "least two with a scheduler, as memory allows)",
    )
    group = estimate.add_argument_group("estimation")
    group.add_argument("--out", metavar="DIR", help="output directory (one series)")
    group.add_argument(
        "--model",
        choices=MODELS,
        default="auto",
        help="prediction model (default auto: for a DWI the shell average, then the "
        "Gaussian process; pet for PET; the average otherwise)",
    )
    group.add_argument(
        "--passes",
        type=non_negative_int,
        help=(
            "most leave-one-out passes (default: after a DWI's b=0 anchor, 2 when every "
            "shell has 60+ directions, else 0; 4 without the anchor)"
        ),
    )
    group.add_argument(
        "--anchor",
        choices=("auto", "none"),
        default="auto",
        help="auto (default): a DWI with b=0 volumes starts from its b=0 anchor, every "
        "volume registered to the b=0 template; none: leave-one-out passes only",
    )
    group.add_argument(
        "--tolerance",
        type=float,
        default=0.1,
        metavar="MM",
        help="stop once no volume's estimate moves more than this (default 0.1 mm)",
    )
    group.add_argument(
        "--eddy-currents",
        action="store_true",
        help="DWI: estimate each volume's eddy-current distortion (FSL eddy's linear model) "
        "with its motion; needs --phase-encoding (or a BIDS sidecar's PhaseEncodingDirection) "
        "and writes OUT/eddy.tsv",
    )
    group.add_argument(
        "--outliers",
        choices=("off", "flag", "replace"),
        default="flag",
        help="a DWI's outlier slices (signal lost to motion during the diffusion "
        "encoding, as FSL eddy finds them): flag (default) scores every slice against "
        "its leave-one-out prediction and lists the outliers in OUT/outliers.tsv; "
        "replace also replaces them by the prediction in the corrected series (and in "
        "the next pass); off skips the scoring",
    )
    group.add_argument("--order", choices=FOLD_ORDERS, default="sequential", help="fold order")
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
    group.add_argument(
        "--keep-work",
        action="store_true",
        help="keep every intermediate array in OUT/work (by default a pass's arrays go once "
        "it is recorded and the run's copy of the series when it is done)",
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
    group.add_argument(
        "--no-plots",
        action="store_true",
        help="do not write the PNG plots (OUT/report.html is written all the same)",
    )
    add_scheduler_options(estimate)
    estimate.set_defaults(func=cmd_estimate)
    return estimate
