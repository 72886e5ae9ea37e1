"""``nidask convert``: convert a series between NIfTI (+ companions) and NFDH5.

:func:`cmd_convert` streams the series chunk by chunk into the format that the
output's extension names (``.h5``, ``.nii`` or ``.nii.gz``), optionally applying
the motion matrices; :func:`add_parser` adds the subcommand to the ``nidask`` parser.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

from nidask.cli.common import (
    UsageError,
    add_companion_options,
    human_bytes,
    open_dataset,
    say,
)
from nidask.io.sources import HDF5_SUFFIXES, NIFTI_SUFFIXES


def _output_kind(path: str) -> str:
    lower = path.lower()
    if lower.endswith(HDF5_SUFFIXES):
        return "nfdh5"
    if lower.endswith(NIFTI_SUFFIXES):
        return "nifti"
    raise UsageError(f"{path}: unknown output format (use .h5, .nii or .nii.gz)")


def cmd_convert(args) -> int:
    import attrs

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
                say(
                    "note: the motion matrices are not applied nor written "
                    "(add --apply-motion to resample and write an .x5)",
                    file=sys.stderr,
                )
                dataset = attrs.evolve(dataset, motion_affines=None)
            # a DWI converted without motion keeps nifreeze's layout: b=0 reference first
            insert_b0 = getattr(dataset, "bzero", None) is not None and not args.no_b0
            dataset.to_nifti(
                args.output,
                order=args.order,
                write_hmxfms=args.apply_motion,
                **({"insert_b0": True} if insert_b0 else {}),
            )
            sidecars = dataset.export_sidecars
            extra = f" (+ {'/'.join(sidecars)})" if sidecars else ""
            extra += " (+ .x5)" if args.apply_motion else ""
            extra += ", b=0 reference inserted as volume 0" if insert_b0 else ""
        elapsed = time.perf_counter() - start
    size = os.path.getsize(args.output)
    say(f"wrote {args.output}{extra}: {human_bytes(size)} in {elapsed:.1f} s")
    return 0


def add_parser(subparsers, parents) -> argparse.ArgumentParser:
    """Add ``nidask convert`` to ``subparsers``; ``parents`` hold the shared options."""
    convert = subparsers.add_parser(
        "convert",
        parents=parents,
        help="convert NIfTI (+ companions) <-> NFDH5, streamed",
        description="Convert a series between NIfTI (+ companion files) and NFDH5, "
        "chunk by chunk (the series is never held in memory). The output format "
        "follows OUTPUT's extension: .h5 (NFDH5), .nii or .nii.gz.",
    )
    convert.add_argument("input", help="input series")
    convert.add_argument("output", help="output file (.h5, .nii or .nii.gz)")
    add_companion_options(convert)
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
    return convert
