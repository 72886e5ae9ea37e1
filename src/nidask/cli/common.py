"""Helpers shared by the ``nidask`` subcommands.

The usage-error and termination exceptions and the parser that raises them, console
output (``say``, byte sizes, paths, one-line errors), opening a series with the
companion files named on the command line, model checks, the dask ``scheduler``
context, atomic output directories, the outputs and warnings of ``estimate`` and
``demo``, and the option groups (general, companion files, where to compute) that
the subcommands add to their parsers.  It imports none of the subcommand modules.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import resource
import signal
import sys

import numpy as np

from nidask.io.sources import is_hdf5

PROG = "nidask"
COMPANIONS = {
    "bvec": "bvec_file",
    "bval": "bval_file",
    "gradients": "gradients_file",
    "b0": "b0_file",
    "mask": "brainmask_file",
    "timing": "temporal_file",
    "sidecar": "json_file",
    "tr": "repetition_time",
    "phase_encoding": "phase_encoding",
}


class UsageError(Exception):
    """Bad command-line usage (exit code 2)."""


class Terminated(BaseException):
    """SIGTERM received (exit code 143); a BaseException so cleanups run."""


class StopSignals(contextlib.AbstractContextManager):
    """Ctrl-C (SIGINT) and SIGTERM stop the command, even when Python drops the exception.

    A signal's exception raised while Python runs a weakref callback, a finaliser or an
    import-lock callback is only printed ("Exception ignored in ...") and the work goes
    on.  Inside this context both signals are recorded as they arrive, such a dropped
    exception is not printed, and :meth:`raise_if_received` raises it again at a point
    where it cannot be lost.  SIGINT is handled only where Python's default handler is
    installed (a job started with SIGINT ignored keeps ignoring it).
    """

    def __enter__(self):
        self.received: list[int] = []
        self._previous = {}
        self._hook = sys.unraisablehook
        for signum in (signal.SIGINT, signal.SIGTERM):
            current = signal.getsignal(signum)
            if signum == signal.SIGINT and current is not signal.default_int_handler:
                continue
            with contextlib.suppress(ValueError):  # not the main thread
                self._previous[signum] = signal.signal(signum, self._handle)
        sys.unraisablehook = self._unraisable
        return self

    def __exit__(self, *exc_info):
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        sys.unraisablehook = self._hook
        return None

    def _handle(self, signum, frame):
        self.received.append(signum)
        raise self._exception(signum)

    @staticmethod
    def _exception(signum) -> BaseException:
        return KeyboardInterrupt() if signum == signal.SIGINT else Terminated()

    def _unraisable(self, unraisable):
        if not isinstance(unraisable.exc_value, KeyboardInterrupt | Terminated):
            self._hook(unraisable)

    def raise_if_received(self) -> None:
        """Raise the exception of the first signal received, if any."""
        if self.received:
            raise self._exception(self.received[0])


STOP_SIGNALS = StopSignals()


class Parser(argparse.ArgumentParser):
    """An ArgumentParser whose errors become :class:`UsageError` (one line, exit 2)."""

    def error(self, message):
        raise UsageError(f"{message} (see '{self.prog} --help')")


# -- small helpers ------------------------------------------------------------------------
def say(*parts, file=None) -> None:
    """Print a line of the command's output at once (flushed)."""
    print(*parts, file=file or sys.stdout, flush=True)


def human_bytes(n: float) -> str:
    """``n`` bytes in B, KiB, MiB, GiB or TiB.

    >>> human_bytes(512), human_bytes(1536), human_bytes(3 * 1024**3)
    ('512 B', '1.5 KiB', '3.0 GiB')
    """
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"  # pragma: no cover


def peak_memory() -> tuple[int, int]:
    """Peak resident memory (bytes) of this process and of its finished children."""
    scale = 1 if sys.platform == "darwin" else 1024  # Linux reports KiB
    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale
    children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * scale
    return own, children


def format_error(exc: BaseException) -> str:
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


def show_path(path: str) -> str:
    """``path`` relative to the working directory when below it, else absolute."""
    relative = os.path.relpath(path)
    return path if relative.startswith("..") else relative


def error_line(message: str) -> None:
    say(f"{PROG}: error: {' '.join(str(message).split())}", file=sys.stderr)


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
    given = sorted(
        f"--{o.replace('_', '-')}" for o in COMPANIONS if getattr(args, o, None) is not None
    )
    if (args.bvec is None) != (args.bval is None):
        raise UsageError("--bvec and --bval go together")
    from nidask.data.loading import modalities_for

    kinds = [cls.__name__ for cls in modalities_for(kwargs)]
    if len(kinds) > 1:
        raise UsageError(f"options for a {' and a '.join(kinds)} cannot be combined")
    if args.b0 is not None and not {"bvec_file", "gradients_file"} & kwargs.keys():
        raise UsageError("--b0 needs the gradients (--bvec/--bval or --gradients)")
    if given and is_hdf5(os.path.abspath(path)):
        raise UsageError(
            f"{path}: an NFDH5 file carries its own metadata; {', '.join(given)} not accepted"
        )
    return nidask.load(path, **kwargs)


#: What to give on the command line for the metadata a model needs.
MODEL_NEEDS_HINT = {
    "gradients": "a DWI (give --bvec/--bval or --gradients)",
    "bzero": "a b=0 reference (b=0 volumes or --b0)",
    "midframe": "a PET series (give --timing)",
    "time": "a BOLD series (give --sidecar or --tr)",
}


def model_for(dataset, model: str | None) -> str:
    from nidask.estimation.models import get_model

    if model is None or model == "auto":
        return "auto"
    available = set(dataset.volume_meta()) | set(dataset.voxel_meta())
    for need in getattr(get_model(model), "needs", ()):
        if need not in available:
            raise UsageError(f"--model {model} needs {MODEL_NEEDS_HINT.get(need, need)}")
    return model


def non_negative_int(value: str) -> int:
    try:
        number = int(value)
    except ValueError:
        number = -1
    if number < 0:
        raise argparse.ArgumentTypeError(f"expected a non-negative integer, got {value!r}")
    return number


def positive_int(value: str) -> int:
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

    ``threads`` (default), ``processes``, ``synchronous``, ``local``
    (:func:`nidask.cluster.local_cluster` of ``workers`` processes) or the address of
    a running ``distributed`` scheduler.  Yields the ``distributed.Client`` or ``None``.
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
    from distributed import Client

    if name == "local":
        from nidask.cluster import local_cluster

        cluster = local_cluster(workers or 2)
        with cluster, Client(cluster) as client:
            say(f"dashboard: {client.dashboard_link}", file=sys.stderr)
            yield client
        return
    if workers:
        say("note: --workers is ignored with a scheduler address", file=sys.stderr)
    try:
        client = Client(name, timeout="10s")
    except (OSError, TimeoutError, ValueError) as exc:
        raise InputError(f"cannot connect to the dask scheduler ({exc})", name) from exc
    with client:
        yield client


@contextlib.contextmanager
def atomic_directory(final: str):
    """Fill a temporary directory beside ``final`` and rename it into place on success."""
    from nidask.io.cache import atomic_output

    with atomic_output(final) as temp:
        os.mkdir(temp)
        yield temp


# -- outputs shared by estimate and demo --------------------------------------------------
def write_outputs(raw, estimated, directory, **options) -> list[str]:
    """:func:`nidask.reporting.tables.write_outputs`, notes on stderr."""
    from nidask.reporting.tables import write_outputs as write

    return write(
        raw, estimated, directory, warn=lambda m: say(f"note: {m}", file=sys.stderr), **options
    )


def warn_flags(report) -> None:
    """One warning line per flag raised (see motion.tsv)."""
    from nidask.reporting.html import FLAG_MEANINGS
    from nidask.reporting.tables import flagged

    for flag, volumes in flagged(report).items():
        shown = ", ".join(str(v) for v in volumes[:8]) + (", ..." if len(volumes) > 8 else "")
        meaning = FLAG_MEANINGS.get(flag, flag)
        say(
            f"warning: {len(volumes)} volume(s) flagged {flag} ({meaning}): {shown}",
            file=sys.stderr,
        )


def motion_summary(dataset) -> str:
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


# -- parser options shared by the subcommands -----------------------------------
def common_options(default) -> argparse.ArgumentParser:
    parent = argparse.ArgumentParser(add_help=False)
    group = parent.add_argument_group("general options")
    group.add_argument(
        "-q", "--quiet", action="store_true", default=default, help="no progress display"
    )
    group.add_argument(
        "--debug", action="store_true", default=default, help="show tracebacks of errors"
    )
    return parent


def add_companion_options(parser) -> None:
    """The ``--bvec``/``--bval``/... options of commands that read a NIfTI series."""
    group = parser.add_argument_group("companion files (NIfTI inputs)")
    group.add_argument("--bvec", metavar="FILE", help="FSL b-vectors (DWI)")
    group.add_argument("--bval", metavar="FILE", help="FSL b-values (DWI)")
    group.add_argument(
        "--gradients", metavar="FILE", help="(N, 4) RAS direction + b-value table (DWI)"
    )
    group.add_argument("--b0", metavar="FILE", help="3D b=0 reference (DWI)")
    group.add_argument(
        "--phase-encoding",
        metavar="DIR",
        help="phase-encoding direction, as BIDS writes it: i, i-, j, j-, k, k- (DWI)",
    )
    group.add_argument("--mask", metavar="FILE", help="3D brain mask")
    group.add_argument("--timing", metavar="FILE", help="BIDS JSON sidecar with frame times (PET)")
    group.add_argument(
        "--sidecar", metavar="FILE", help="BIDS JSON sidecar with RepetitionTime (BOLD)"
    )
    group.add_argument("--tr", type=float, metavar="SECONDS", help="repetition time (BOLD)")


def add_scheduler_options(parser, default_workers=None) -> None:
    group = parser.add_argument_group("where to compute")
    group.add_argument(
        "--scheduler",
        default="threads",
        metavar="NAME|ADDRESS",
        help="threads (default), processes, synchronous, local (nidask.cluster.local_cluster) or "
        "the address of a dask.distributed scheduler (tcp://host:8786)",
    )
    group.add_argument(
        "--workers", type=positive_int, default=default_workers, help="number of workers"
    )
