"""The ``nidask`` command line: ``info``, ``convert``, ``estimate`` and ``demo``.

Run ``nidask --help`` or ``nidask COMMAND --help``.

Exit codes: 0 success, 1 failure (unreadable input, unwritable output, ...),
2 usage error (bad options), 130 interrupted (Ctrl-C), 143 terminated (SIGTERM).
Every error is one line on stderr, ``nidask: error: <file>: <problem>``;
``--debug`` prints the traceback too.  Outputs are written under temporary names
and renamed when complete, so an interrupted command leaves no partial files.

The package holds one module per subcommand (:mod:`nidask.cli.info`,
:mod:`nidask.cli.convert`, :mod:`nidask.cli.estimate`, :mod:`nidask.cli.demo`),
each with its ``cmd_*`` function and an ``add_parser(subparsers, parents)``, and
their shared helpers in :mod:`nidask.cli.common`; this module assembles the parser
(:func:`build_parser`) and runs it (:func:`main`).
"""

from __future__ import annotations

import argparse
import traceback

from nidask.cli import convert, demo, estimate, info
from nidask.cli.common import (
    COMPANIONS,
    MODEL_NEEDS_HINT,
    PROG,
    STOP_SIGNALS,
    Parser,
    Terminated,
    UsageError,
    atomic_directory,
    common_options,
    error_line,
    format_error,
    open_dataset,
    scheduler,
    write_outputs,
)
from nidask.cli.convert import cmd_convert
from nidask.cli.demo import DEMO_SIZES, cmd_demo
from nidask.cli.estimate import MODELS, cmd_estimate, cmd_estimate_bids
from nidask.cli.info import cmd_info, describe

__all__ = [
    "COMPANIONS",
    "DEMO_SIZES",
    "MODELS",
    "MODEL_NEEDS_HINT",
    "PROG",
    "Terminated",
    "UsageError",
    "atomic_directory",
    "build_parser",
    "cmd_convert",
    "cmd_demo",
    "cmd_estimate",
    "cmd_estimate_bids",
    "cmd_info",
    "describe",
    "main",
    "open_dataset",
    "scheduler",
    "write_outputs",
]


def build_parser() -> argparse.ArgumentParser:
    """The ``nidask`` argument parser."""
    from nidask import __version__

    parser = Parser(
        prog=PROG,
        description="Lazy, out-of-core 4D neuroimaging series and head-motion estimation.",
        epilog="Start with 'nidask demo'. Exit codes: 0 ok, 1 failure, 2 usage error, "
        "130 interrupted.",
        parents=[common_options(False)],
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    common = common_options(argparse.SUPPRESS)

    for command in (info, convert, estimate, demo):
        command.add_parser(commands, [common])
    return parser


def main(argv=None) -> int:
    """Run the command line; returns the exit code."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except UsageError as exc:
        error_line(str(exc))
        return 2
    except SystemExit as exc:  # --help, --version
        return exc.code if isinstance(exc.code, int) else 0
    debug = args.debug
    import dask

    try:
        with STOP_SIGNALS, dask.config.set({"nidask.progress": not args.quiet}):
            return args.func(args)
    except UsageError as exc:
        if debug:
            traceback.print_exc()
        error_line(str(exc))
        return 2
    except KeyboardInterrupt as exc:
        if debug:
            traceback.print_exc()
        error_line(str(exc) or "interrupted")
        return 130
    except Terminated as exc:
        error_line(str(exc) or "terminated")
        return 143
    except Exception as exc:
        from nidask.errors import NidaskError

        if debug:
            traceback.print_exc()
        if isinstance(exc, NidaskError | OSError):
            error_line(format_error(exc))
        else:
            hint = "" if debug else " (run with --debug for the traceback)"
            error_line(f"unexpected error: {format_error(exc)}{hint}")
        return 1
