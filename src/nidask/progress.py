"""Compute dask collections with an optional progress display.

Local schedulers get :class:`dask.diagnostics.ProgressBar`; under an active
``distributed.Client`` (where that bar shows nothing) ``distributed.progress``
is used instead.  ``progress=None`` follows the ``nidask.progress`` config key
(default off, so library calls stay quiet).  When stderr is neither a terminal nor
a notebook (a log file, a batch job's output) the bars, which redraw with carriage
returns, are replaced by one line per computation with its duration.
"""

from __future__ import annotations

import contextlib
import sys
import time

import dask

dask.config.update_defaults({"nidask": {"progress": False}})


def active_client():
    """The current ``distributed.Client`` (``as_current`` or the default) or ``None``."""
    try:
        from distributed import Client
    except ImportError:  # pragma: no cover - distributed is a dependency
        return None
    try:
        return Client.current()
    except ValueError:
        return None


def interactive(stream) -> bool:
    """Whether ``stream`` shows redrawn progress bars: a terminal or a notebook."""
    if stream is None:
        return False
    if type(stream).__module__.split(".")[0] == "ipykernel":
        return True
    try:
        return stream.isatty()
    except (AttributeError, ValueError):  # no isatty, or closed
        return False


def compute(*collections, label: str = "computing", progress: bool | None = None):
    """``dask.compute`` with a progress display when asked for.

    Parameters
    ----------
    *collections
        Dask collections.
    label : str
        Shown before the bar.
    progress : bool, optional
        Show progress; default from ``nidask.progress``.
    """
    if progress is None:
        progress = bool(dask.config.get("nidask.progress"))
    if not progress:
        return dask.compute(*collections)
    client = active_client()
    if not interactive(sys.stderr):
        start = time.perf_counter()
        if client is not None:
            futures = client.compute(list(collections))
            results = tuple(f.result() for f in futures)
        else:
            results = dask.compute(*collections)
        if sys.stderr is not None:
            print(f"{label}: done in {time.perf_counter() - start:.1f} s", file=sys.stderr)
        return results
    if client is not None:
        from distributed import progress as distributed_progress

        futures = client.compute(list(collections))
        print(label, file=sys.stderr)
        # the notebook widget needs ipywidgets; fall back to the text bar
        try:
            import ipywidgets  # noqa: F401

            distributed_progress(futures)
        except ImportError:
            distributed_progress(futures, notebook=False)
        return tuple(f.result() for f in futures)
    from dask.diagnostics import ProgressBar

    print(label, file=sys.stderr)
    with ProgressBar(out=sys.stderr) if sys.stderr else contextlib.nullcontext():
        return dask.compute(*collections)
